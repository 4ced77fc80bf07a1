//! Failover: presenting a replica at a recovery point as the disk itself,
//! reversibly until committed.
//!
//! `nbd-target failover --data-dir DIR --disk-id ID --point P`:
//! 1. **Fence.** The failover record (`ID/failover.json`, [`record`]) is
//!    written first, phase `fencing`: from then on the daemon refuses the
//!    disk's shipper (ERROR FailedOver: it keeps its ring, nothing at the
//!    source is released) and ends a connected one within half a second.
//!    The command then takes `ID/apply.lock`, which a session holds while
//!    it applies, so once it has it nothing is applying.
//! 2. **Present.** The point is resolved (`latest`, a sequence, a time, a
//!    mark; never inside a resync gap; without a journal, `latest` only),
//!    an empty durable overlay is made in its own folder over the point's
//!    view ([`disk`]; the replica itself without a journal), and the record
//!    says `uncommitted` and names the folder. The daemon serves the disk
//!    as the writable export `ID`.
//! 3. `--point P2` moves (a new overlay folder beside the old one, the
//!    record switched to it, then the old one removed: a failed move loses
//!    nothing); `--rollback` removes the record, then the overlay: the
//!    replica and its journal were never touched, so the shipper resumes
//!    exactly where it stopped, without a resync.
//! 4. `--commit` makes it final. Everything that can fail without changing
//!    anything is opened first (the overlay, the view, the replica's writer
//!    and its lock); then the record says `committing` (no longer
//!    reversible); the replica is rolled back **in place** to the point
//!    (each range changed since it rewritten from the journal's
//!    before-images: work in proportion to the changes since the point, not
//!    to the disk), the overlay's blocks are written over it, the replica is
//!    synced and marked; the record says `committed` with the image's path;
//!    only then are the overlay and the journal removed ([`finish_commit`],
//!    run again after a crash). Until `committed` every step reads what the
//!    previous ones left intact, so an interrupted commit is simply run
//!    again.
//!
//! One command runs per disk at a time (`ID/failover.cmd.lock`); the record
//! is read under it.
//!
//! Move, rollback and commit need the failed-over disk closed (no NBD
//! client of the daemon on it): they change what a client would be
//! reading.

pub mod disk;
pub mod record;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::error::{io, Error, Result};
use crate::journal::{PointName, Pos};
use crate::lockfile::{self, Locked};
use crate::points::DiskPoints;
use crate::registry::STATE_FILE;
use crate::replica::ReplicaSpec;
use crate::state::now_ns;
pub use disk::FailedOverDisk;
pub use record::{Phase, Record};

/// The lock a session holds while it applies to a replica.
pub const APPLY_LOCK: &str = "apply.lock";
/// How long a failover waits for the disk's shipper session to end.
pub const FENCE_WAIT: Duration = Duration::from_secs(30);

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fail over at a point (or move an uncommitted failover to it).
    Failover(String),
    /// Undo an uncommitted failover.
    Rollback,
    /// Make it final (failing over at the point first, when given and the
    /// disk is not failed over yet).
    Commit(Option<String>),
}

/// Which disk.
#[derive(Debug, Clone)]
pub struct Target {
    /// The data folder.
    pub data_dir: PathBuf,
    /// The disk.
    pub disk_id: String,
    /// Its replica on an upstream NBD server (as given to `serve --backend`).
    pub backend: Option<String>,
}

/// What a command did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One line for the operator.
    pub message: String,
    /// The record after it (None: replicating again).
    pub record: Option<Record>,
    /// Bytes written on the failed-over disk that a move or rollback threw
    /// away.
    pub discarded_bytes: u64,
}

impl Outcome {
    /// As JSON (`failover --json`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "message": self.message,
            "failover": self.record.as_ref().map(Record::to_json),
            "discarded_bytes": self.discarded_bytes,
        })
    }
}

/// One failover command at a time per disk (held for a whole [`run`]).
pub const COMMAND_LOCK: &str = "failover.cmd.lock";
/// How long a command waits for another one on the same disk.
pub const COMMAND_WAIT: Duration = Duration::from_secs(60);

/// Run `action` on `t`.
pub fn run(t: &Target, action: &Action) -> Result<Outcome> {
    wire::identity::validate_disk_id(&t.disk_id)
        .map_err(|e| Error::Invalid(format!("disk id {:?}: {e}", t.disk_id)))?;
    let dir = t.data_dir.join(&t.disk_id);
    if !dir.join(STATE_FILE).is_file() {
        return Err(Error::Invalid(format!(
            "no replica of disk {:?} in {} (see `nbd-target status --data-dir {}`)",
            t.disk_id,
            t.data_dir.display(),
            t.data_dir.display()
        )));
    }
    let _one = lockfile::lock_within(&dir.join(COMMAND_LOCK), COMMAND_WAIT)?.ok_or_else(|| {
        Error::Invalid(format!(
            "disk {:?}: another failover command has been working on it for {} s; let it finish, then run this one again",
            t.disk_id,
            COMMAND_WAIT.as_secs()
        ))
    })?;
    // Read under the command lock: what another command did is final.
    let rec = record::load(&dir)?;
    if let Some(r) = &rec {
        if r.phase == Phase::Committed {
            finish_commit(&dir)?;
        }
    }
    match (action, rec) {
        (Action::Failover(p), None) => failover(t, &dir, p, None),
        (Action::Failover(p), Some(r)) => match r.phase {
            Phase::Fencing => failover(t, &dir, p, Some(r)),
            Phase::Uncommitted => move_to(t, &dir, p, r),
            Phase::Committing | Phase::Committed => Err(Error::Invalid(format!(
                "disk {:?} is already failed over and {}: {}. A committed failover cannot be failed over again; protect the disk again instead (docs/OPERATIONS.md)",
                t.disk_id,
                r.phase.name(),
                r.describe()
            ))),
        },
        (Action::Rollback, None) => Err(Error::Invalid(format!(
            "disk {:?} is not failed over: nothing to roll back",
            t.disk_id
        ))),
        (Action::Rollback, Some(r)) => rollback(t, &dir, r),
        (Action::Commit(None), None) => Err(Error::Invalid(format!(
            "disk {:?} is not failed over: nothing to commit (fail over and commit at once with --point P --commit)",
            t.disk_id
        ))),
        (Action::Commit(Some(p)), None) => {
            let o = failover(t, &dir, p, None)?;
            let r = o.record.ok_or_else(|| Error::Invalid("failover left no record".into()))?;
            commit(t, &dir, r, None)
        }
        (Action::Commit(p), Some(r)) => match r.phase {
            Phase::Fencing => match p {
                Some(p) => {
                    let o = failover(t, &dir, p, Some(r))?;
                    let r = o
                        .record
                        .ok_or_else(|| Error::Invalid("failover left no record".into()))?;
                    commit(t, &dir, r, None)
                }
                None => Err(Error::Invalid(format!(
                    "disk {:?}: a failover was interrupted before it presented a point: run it again with --point P",
                    t.disk_id
                ))),
            },
            Phase::Committed => Err(Error::Invalid(format!(
                "disk {:?} is already committed: {}",
                t.disk_id,
                r.describe()
            ))),
            Phase::Uncommitted | Phase::Committing => commit(t, &dir, r, p.as_deref()),
        },
    }
}

/// The point named `name`, and whether it is read through the journal. A
/// disk without a journal (`serve --journal off`) can be failed over at
/// `latest` only: its replica as the fence left it, when consistent.
fn resolve_point(dp: &DiskPoints, name: &str) -> Result<(Pos, bool)> {
    let no_journal = crate::journal::segment::list(&dp.journal).map_or(true, |v| v.is_empty());
    if !no_journal {
        return dp.resolve(name).map(|p| (p, true));
    }
    if PointName::parse(name) != PointName::Latest {
        return Err(Error::Invalid(format!(
            "disk {:?} has no journal (`nbd-target serve --journal off`), so it has no recovery points: only --point latest can be failed over to",
            dp.disk_id
        )));
    }
    if !dp.state.consistent() {
        return Err(Error::Invalid(format!(
            "disk {:?}: the replica is not consistent ({}) and has no journal to go back to a consistent point: wait for the resync to finish",
            dp.disk_id,
            dp.state.reason.explain()
        )));
    }
    Ok((
        Pos {
            epoch: 0,
            seq: dp.state.applied_seq,
            sub: false,
        },
        false,
    ))
}

fn spec_of(t: &Target, dp: &DiskPoints) -> Result<ReplicaSpec> {
    dp.replica_spec(t.backend.as_deref())
}

/// Wait for the disk's session to end (it sees the record) and hold it off.
fn fence(t: &Target, dir: &Path) -> Result<Locked> {
    lockfile::lock_within(&dir.join(APPLY_LOCK), FENCE_WAIT)?.ok_or_else(|| {
        Error::Invalid(format!(
            "disk {:?}: its shipper's session did not end within {} s of the failover record; is the nbd-target daemon of {} healthy? (run the command again, or --rollback)",
            t.disk_id,
            FENCE_WAIT.as_secs(),
            t.data_dir.display()
        ))
    })
}

fn failover(t: &Target, dir: &Path, point: &str, fencing: Option<Record>) -> Result<Outcome> {
    let dp = DiskPoints::load(&t.data_dir, &t.disk_id)?;
    // Resolve once before fencing, so that a bad name changes nothing.
    resolve_point(&dp, point)?;
    let mut rec =
        fencing.unwrap_or_else(|| Record::fencing(dp.state.ring_id, dp.state.applied_seq));
    record::save(dir, &rec)?;
    let undo = |e: Error| {
        // Nothing was presented (this command, under the command lock,
        // wrote the fencing record): replicating again is the way back.
        if let Err(e2) = record::remove(dir) {
            log::warn!("disk {:?}: removing the failover record: {e2}", t.disk_id);
        }
        e
    };
    let _apply = fence(t, dir).map_err(undo)?;
    // What the session left applied is final now.
    let dp = DiskPoints::load(&t.data_dir, &t.disk_id).map_err(undo)?;
    let (pos, journal) = resolve_point(&dp, point).map_err(undo)?;
    let spec = spec_of(t, &dp).map_err(undo)?;
    let _ov = disk::lock(dir, &t.disk_id).map_err(undo)?;
    let name = new_overlay(dir, &dp, &spec, pos, journal).map_err(undo)?;
    rec.phase = Phase::Uncommitted;
    rec.source_ring = dp.state.ring_id;
    rec.applied_seq = dp.state.applied_seq;
    present(dir, &mut rec, (pos, journal), point, name)?;
    record::log_event(dir, "failover", &rec, json!({}))?;
    log::info!(
        "disk {:?} failed over at point {pos} ({point}); the shipper is refused until a rollback",
        t.disk_id
    );
    Ok(Outcome {
        message: format!(
            "disk {:?} failed over at point {pos} ({point}): served writable as the NBD export {:?} of the running nbd-target; its shipper is refused and keeps its ring. Undo with --rollback, move with --point P2, make final with --commit",
            t.disk_id, t.disk_id
        ),
        record: Some(rec),
        discarded_bytes: 0,
    })
}

/// A new, empty overlay folder for the disk at `pos`: its name.
fn new_overlay(
    dir: &Path,
    dp: &DiskPoints,
    spec: &ReplicaSpec,
    pos: Pos,
    journal: bool,
) -> Result<String> {
    let name = disk::new_name(pos);
    FailedOverDisk::create(
        dir,
        &name,
        &dp.journal,
        spec,
        dp.state.disk_size,
        (pos, journal),
    )?;
    Ok(name)
}

/// Switch the record to the overlay `name` at `point` (named `point_name`),
/// durably, then remove every other overlay.
fn present(
    dir: &Path,
    rec: &mut Record,
    point: (Pos, bool),
    point_name: &str,
    name: String,
) -> Result<()> {
    rec.point = Some(point.0);
    rec.journal = point.1;
    rec.point_name = point_name.to_string();
    rec.overlay = name;
    record::save(dir, rec)?;
    disk::discard_except(dir, Some(&rec.overlay))
}

fn move_to(t: &Target, dir: &Path, point: &str, mut rec: Record) -> Result<Outcome> {
    let dp = DiskPoints::load(&t.data_dir, &t.disk_id)?;
    let (pos, journal) = resolve_point(&dp, point)?;
    if Some(pos) == rec.point {
        return Err(Error::Invalid(format!(
            "disk {:?} is already {}; give another --point to move, --rollback or --commit",
            t.disk_id,
            rec.describe()
        )));
    }
    let _ov = disk::lock(dir, &t.disk_id)?;
    let discarded = disk::written_bytes(dir, &rec.overlay);
    let spec = spec_of(t, &dp)?;
    // The new overlay beside the old one; the record switches to it; only
    // then the old one goes (a failed or interrupted move loses nothing).
    let name = new_overlay(dir, &dp, &spec, pos, journal)?;
    let from = rec.point;
    present(dir, &mut rec, (pos, journal), point, name)?;
    record::log_event(
        dir,
        "move",
        &rec,
        json!({"from": from.map(|p| p.to_string()), "discarded_bytes": discarded}),
    )?;
    log::info!(
        "disk {:?}: failover moved to point {pos} ({point}); {discarded} bytes written at the previous point discarded",
        t.disk_id
    );
    Ok(Outcome {
        message: format!(
            "disk {:?} now failed over at point {pos} ({point}) (moved from {}; {discarded} bytes written there discarded)",
            t.disk_id,
            from.map(|p| p.to_string()).unwrap_or_default()
        ),
        record: Some(rec),
        discarded_bytes: discarded,
    })
}

fn rollback(t: &Target, dir: &Path, rec: Record) -> Result<Outcome> {
    match rec.phase {
        Phase::Fencing | Phase::Uncommitted => {}
        Phase::Committing | Phase::Committed => {
            return Err(Error::Invalid(format!(
                "disk {:?} cannot be rolled back: {} (a commit is final)",
                t.disk_id,
                rec.describe()
            )))
        }
    }
    let _ov = disk::lock(dir, &t.disk_id)?;
    let discarded = disk::written_bytes(dir, &rec.overlay);
    // The record first: once it is gone the overlay is garbage either way.
    record::remove(dir)?;
    disk::discard_except(dir, None)?;
    record::log_event(dir, "rollback", &rec, json!({"discarded_bytes": discarded}))?;
    log::info!(
        "disk {:?}: failover rolled back ({discarded} bytes written on the failed-over disk discarded); replicating again from seq {}",
        t.disk_id,
        rec.applied_seq
    );
    Ok(Outcome {
        message: format!(
            "disk {:?}: failover rolled back; replication resumes after seq {} when the shipper reconnects (no resync); {discarded} bytes written on the failed-over disk discarded",
            t.disk_id, rec.applied_seq
        ),
        record: None,
        discarded_bytes: discarded,
    })
}

/// The path an operator uses for the committed image.
fn image_of(spec: &ReplicaSpec) -> String {
    match spec {
        ReplicaSpec::File(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        ReplicaSpec::Nbd { .. } => spec.describe(),
    }
}

/// Leases of the disk's journal held by other processes (point exports,
/// test failovers), as "what (pid N)".
fn foreign_leases(journal: &Path) -> Vec<String> {
    crate::journal::lease::live(journal)
        .into_iter()
        .filter(|l| l.pid != std::process::id())
        .map(|l| format!("{} (pid {})", l.what, l.pid))
        .collect()
}

fn commit(t: &Target, dir: &Path, mut rec: Record, point: Option<&str>) -> Result<Outcome> {
    let dp = DiskPoints::load(&t.data_dir, &t.disk_id)?;
    let pos = rec
        .point
        .ok_or_else(|| Error::Invalid("the failover record has no point".into()))?;
    if let Some(p) = point {
        let (want, _) = resolve_point(&dp, p)?;
        if want != pos {
            return Err(Error::Invalid(format!(
                "disk {:?} is failed over at {pos}, not at {want} ({p}): move it first (--point {p}) or commit without --point",
                t.disk_id
            )));
        }
    }
    let in_use = |what: Vec<String>| {
        Error::Invalid(format!(
            "disk {:?}: its recovery points are in use ({}): stop those test failovers and disconnect the ID@POINT exports, then commit",
            t.disk_id,
            what.join(", ")
        ))
    };
    let ov_lock = disk::lock(dir, &t.disk_id)?;
    let spec = spec_of(t, &dp)?;
    // Everything that can fail without changing anything, first.
    let fo = FailedOverDisk::open_locked(
        ov_lock,
        dir,
        &rec.overlay,
        &dp.journal,
        &spec,
        dp.state.disk_size,
        (pos, rec.journal),
    )?;
    // Without a journal the point is the replica as it was fenced: nothing
    // to roll back.
    let view = if rec.journal {
        Some(dp.open_view_during_commit(&spec, pos, "failover commit")?)
    } else {
        None
    };
    let mut w = spec.open_writer(dp.state.disk_size)?;
    let leases = foreign_leases(&dp.journal);
    if !leases.is_empty() {
        return Err(in_use(leases));
    }
    let was = rec.phase;
    rec.phase = Phase::Committing;
    record::save(dir, &rec)?;
    // A point export opened meanwhile refuses itself once it sees the
    // record; one that slipped in before is seen here.
    let leases = foreign_leases(&dp.journal);
    if !leases.is_empty() {
        if was == Phase::Uncommitted {
            rec.phase = was;
            record::save(dir, &rec)?;
        }
        return Err(in_use(leases));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut copy = |w: &mut crate::replica::ReplicaWriter,
                    off: u64,
                    len: u64,
                    read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>|
     -> Result<u64> {
        let mut at = off;
        while at < off + len {
            let n = usize::try_from((off + len - at).min(buf.len() as u64)).unwrap_or(buf.len());
            read(at, &mut buf[..n]).map_err(io(dir, "reading the failed-over disk"))?;
            if buf[..n].iter().all(|&b| b == 0) {
                w.zero(at, n as u64)?;
            } else {
                w.write(at, &buf[..n])?;
            }
            at += n as u64;
        }
        Ok(len)
    };
    // 1. The replica back to the point, in place: the ranges changed since
    //    it, read through the view (which reads them from the journal only,
    //    never from the replica being rewritten).
    let mut rolled = 0;
    for (off, len) in view
        .as_ref()
        .map(|v| v.changed_ranges())
        .unwrap_or_default()
    {
        rolled += copy(&mut w, off, len, &|o, b| match &view {
            Some(v) => blockdev::Backend::read_at(v, o, b),
            None => Err(std::io::Error::other("no journal")),
        })?;
    }
    // 2. What was written on the failed-over disk.
    let ov = fo.overlay();
    let present = ov.present_ranges();
    let mut merged = 0;
    for &(off, len) in &present {
        merged += copy(&mut w, off, len, &|o, b| ov.read_own(o, b))?;
    }
    w.sync()?;
    let written = !present.is_empty();
    let written_bytes = ov.bytes_used();
    drop(view);
    drop(fo);
    // 3. The image carries the disk's identity and where it began, for
    //    the splitter and shipper that protect it from now on.
    mark_image(t, dir, &spec, &rec, pos, written)?;
    // 4. Final. Only now do the overlay and the journal (points of a
    //    timeline the disk left) go: a commit interrupted before this line
    //    is run again from the start; after it, `finish_commit` tidies up.
    let image = image_of(&spec);
    rec.phase = Phase::Committed;
    rec.committed_ns = now_ns();
    rec.written_bytes = written_bytes;
    rec.image = image.clone();
    record::save(dir, &rec)?;
    // The image stays locked (the writer's flock) until it is recorded as
    // the disk: a splitter cannot start on it before.
    drop(w);
    record::log_event(
        dir,
        "commit",
        &rec,
        json!({"rolled_back_bytes": rolled, "merged_bytes": merged}),
    )?;
    finish_commit(dir)?;
    log::info!(
        "disk {:?}: failover at {pos} committed: {rolled} bytes rolled back to the point, {merged} bytes written since merged; the disk is {image}",
        t.disk_id
    );
    Ok(Outcome {
        message: image,
        record: Some(rec),
        discarded_bytes: 0,
    })
}

/// After a commit is recorded: remove the overlays and the journal of the
/// old timeline, durably (again, when a crash interrupted it).
pub fn finish_commit(dir: &Path) -> Result<()> {
    disk::discard_except(dir, None)?;
    let j = crate::journal::dir_of(dir);
    if j.exists() {
        remove_tree(&j)?;
        record::sync_dir(dir)?;
    }
    Ok(())
}

/// Write the committed image's marker: the disk's identity, its disk id,
/// no ring (whatever ring captured it before no longer describes it), and
/// the failover it began as. Synced before the commit is recorded.
fn mark_image(
    t: &Target,
    dir: &Path,
    spec: &ReplicaSpec,
    rec: &Record,
    pos: Pos,
    written: bool,
) -> Result<()> {
    let ReplicaSpec::File(p) = spec else {
        return Ok(());
    };
    let old = blockdev::marker::read(p).ok().flatten();
    let uuid = crate::identity::load(dir)
        .ok()
        .flatten()
        .map(|i| i.uuid)
        .or(old.map(|m| m.uuid))
        .unwrap_or(rec.source_ring);
    let m = blockdev::marker::Marker {
        uuid,
        disk_id: Some(t.disk_id.clone()),
        ring_id: None,
        ring_path: None,
        failover: Some(blockdev::marker::Origin {
            from_ring: rec.source_ring,
            seq: pos.seq,
            at_ns: rec.failed_over_ns,
            written,
        }),
    };
    match blockdev::marker::write(p, &m) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            log::warn!(
                "disk {:?}: {} keeps no user xattrs, so it carries no identity marker: protecting it back needs `seed --in-place --force` at the other site",
                t.disk_id,
                p.display()
            );
            Ok(())
        }
        Err(e) => Err(io(p, "writing the disk marker")(e)),
    }
}

fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p, "removing the journal of the old timeline")(e)),
    }
}

/// A HELLO for a disk whose failover is committed: acceptable only as the
/// return of the disk to the original site. Its lineage must say it was
/// failed over (after the commit) from the ring that protected this image
/// back, at a point the image was not written after (else: a split
/// brain), and nothing may use the image any more (`image_held`: this
/// session's writer holds it). `Err`: why not (for the
/// shipper, which keeps its ring). Changes nothing: [`reuse_committed`]
/// does, once the session holds the replica.
pub fn check_failback(
    e: &crate::registry::DiskEntry,
    rec: &Record,
    hello: &wire::frame::Hello,
    image_held: bool,
) -> std::result::Result<(), String> {
    let not_back = || {
        format!(
            "disk {:?} is {} at the recovery site; this shipper's disk was not failed back from it, so nothing is applied (keep the ring). To return to the original site see docs/OPERATIONS.md (reverse protection, then failover --commit there)",
            e.id,
            rec.describe()
        )
    };
    let Some(l) = hello.lineage.filter(|l| {
        l.failed_over() && l.failed_over_ns >= rec.committed_ns && l.from_ring != rec.source_ring
    }) else {
        return Err(not_back());
    };
    if hello.ring_id == rec.source_ring {
        return Err(not_back());
    }
    let ReplicaSpec::File(p) = &e.spec else {
        return Ok(());
    };
    match lockfile::in_use(p).map(|u| u && !image_held) {
        Ok(false) => {}
        Ok(true) => {
            return Err(format!(
                "disk {:?}: the failed-over image {} is still in use (the recovery site's splitter?): stop it, and this shipper is taken as the failback",
                e.id,
                p.display()
            ))
        }
        Err(err) => return Err(err.to_string()),
    }
    // The ring that protected the image back, from the image's marker.
    let Ok(Some(m)) = blockdev::marker::read(p) else {
        log::warn!(
            "disk {:?}: {} carries no marker: the failback cannot be checked against the ring that protected it back",
            e.id,
            p.display()
        );
        return Ok(());
    };
    match m.ring_id {
        Some(r) if r == l.from_ring => {}
        _ => return Err(not_back()),
    }
    if let Some(rp) = m.ring_path.as_deref() {
        let st = match ring::status(Path::new(rp)) {
            Ok(st) if st.disk_id == ring::uuid_string(&l.from_ring) => st,
            Ok(_) | Err(_) => {
                return Err(format!(
                    "disk {:?}: the ring that protected {} back ({rp}) cannot be read or is another ring now, so whether the image was written after the failback cannot be checked; nothing applied. Put that ring back, or move {} away to protect the disk anew (a full copy)",
                    e.id,
                    p.display(),
                    e.dir.display()
                ))
            }
        };
        {
            if st.head_seq > l.from_seq {
                return Err(format!(
                    "split brain on disk {:?}: the original site failed back at seq {} of the recovery site's ring {}, but this image was written after it (that ring is at seq {}, {} records never reached the original site). Both acted as primary: nothing was changed. Protect the recovery site's disk back again, or discard its late writes by moving {} away",
                    e.id,
                    l.from_seq,
                    st.disk_id,
                    st.head_seq,
                    st.head_seq - l.from_seq,
                    e.dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// Take the committed image back as the disk's replica (the session holds
/// it now): the old timeline's files go and the state says `Seeded` (the
/// first full pass compares by hashes and sends only what differs). The
/// record stays until the session is set up ([`reprotected`]): a refusal
/// before that leaves the guard in place (redoing this is harmless).
pub fn reuse_committed(dir: &Path, state: &mut crate::state::StateFile) -> Result<()> {
    finish_commit(dir)?;
    state.state.applied_seq = 0;
    state.state.ring_id = [0; 16];
    state.state.reason = crate::state::Reason::Seeded;
    state.state.since_seq = 0;
    state.state.sync_cursor = 0;
    state.save()?;
    log::info!(
        "{}: the disk was failed back to its original site, which protects it again: the recovery site's image is its seed (a full pass compares by hashes and sends only what differs)",
        dir.display()
    );
    Ok(())
}

/// The session that took the committed image back is set up: the record
/// goes (the disk is a replica again).
pub fn reprotected(dir: &Path, rec: &Record) -> Result<()> {
    record::log_event(dir, "reprotect", rec, json!({}))?;
    record::remove(dir)
}
