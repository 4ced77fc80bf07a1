//! The failed-over disk as a [`Backend`]: a durable copy-on-write
//! [`Overlay`] (`DISK/failover/NAME/overlay.img` and its map, NAME as the
//! failover record says: a move makes the new one beside the old and
//! switches the record to it, so a failed or interrupted move loses
//! nothing) over the
//! [`PointView`] of the failover's point, so that the replica and its
//! journal stay exactly as they were until `--commit` (a rollback or a
//! move discards only the overlay).
//!
//! One process at a time has it open: the opener holds `failover/lock`
//! (the daemon while NBD clients use it, a `failover` command while it
//! moves, rolls back or commits the disk).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::{Backend, Caps, Overlay};

use crate::error::{Error, Result};
use crate::journal::{PointView, Pos};
use crate::lockfile::{self, Locked};
use crate::replica::ReplicaSpec;

/// The overlay's folder in a disk's folder.
pub const FAILOVER_DIR: &str = "failover";
/// The overlay's data file in it.
pub const OVERLAY_FILE: &str = "overlay.img";
/// Held by whoever has the overlay open.
pub const LOCK_FILE: &str = "lock";

/// What the failed-over disk's export offers (the overlay's abilities).
pub const CAPS: Caps = Caps {
    read_only: false,
    trim: true,
    fast_zero: false,
    extents: false,
    multi_conn: true,
    inline_writes: true,
};

/// `DISK/failover`.
pub fn dir_of(disk_dir: &Path) -> PathBuf {
    disk_dir.join(FAILOVER_DIR)
}

/// The overlay's data file for overlay folder `name` of the disk in `disk_dir`.
pub fn overlay_path(disk_dir: &Path, name: &str) -> PathBuf {
    dir_of(disk_dir).join(name).join(OVERLAY_FILE)
}

/// A fresh overlay folder name for a failover at `point`.
pub fn new_name(point: Pos) -> String {
    format!(
        "at-{}-{}{}-{}",
        point.epoch,
        point.seq,
        if point.sub { "s" } else { "" },
        crate::state::now_ns()
    )
}

/// What the overlay reads through to: the point's view of the journal,
/// or (`journal` false: a disk without a journal, failed over at its
/// latest state) the replica itself, read-only.
pub fn base(
    journal_dir: &Path,
    spec: &ReplicaSpec,
    size: u64,
    point: Pos,
    journal: bool,
) -> Result<Arc<dyn Backend>> {
    let reader = spec.open_reader()?;
    if journal {
        Ok(Arc::new(PointView::open(
            journal_dir,
            reader,
            size,
            point,
            "failover",
        )?))
    } else {
        Ok(Arc::new(crate::export::SizedReplica {
            inner: reader,
            size,
        }))
    }
}

/// Take the overlay's lock, or say who has it.
pub fn lock(disk_dir: &Path, disk_id: &str) -> Result<Locked> {
    let d = dir_of(disk_dir);
    std::fs::create_dir_all(&d).map_err(crate::error::io(&d, "creating the failover folder"))?;
    // A client that just disconnected takes a moment to let go.
    lockfile::lock_within(&d.join(LOCK_FILE), std::time::Duration::from_secs(5))?.ok_or_else(|| {
        Error::Invalid(format!(
            "the failed-over disk {disk_id:?} is in use (NBD clients of the running nbd-target, or another failover command): unmount and disconnect its clients (umount; kill nbdfuse; qemu-nbd -d), then run the command again"
        ))
    })
}

/// The failed-over disk, open.
pub struct FailedOverDisk {
    overlay: Overlay,
    point: Pos,
    name: String,
    _lock: Locked,
}

impl std::fmt::Debug for FailedOverDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailedOverDisk")
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

impl FailedOverDisk {
    /// Make a new, empty overlay in folder `name` for a failover at
    /// `point` (the lock held by the caller), synced with its folders.
    pub fn create(
        disk_dir: &Path,
        name: &str,
        journal_dir: &Path,
        spec: &ReplicaSpec,
        size: u64,
        point: (Pos, bool),
    ) -> Result<()> {
        let (point, journal) = point;
        let p = overlay_path(disk_dir, name);
        let d = dir_of(disk_dir).join(name);
        remove_dir(&d)?;
        std::fs::create_dir_all(&d).map_err(crate::error::io(&d, "creating the overlay folder"))?;
        Overlay::create_durable(base(journal_dir, spec, size, point, journal)?, &p, None)
            .map_err(|e| Error::Invalid(format!("failover: {e}")))?;
        crate::failover::record::sync_dir(&dir_of(disk_dir))
    }

    /// Open the failed-over disk of `disk_dir` at `point` with overlay
    /// folder `name`, taking the lock.
    pub fn open(
        disk_dir: &Path,
        disk_id: &str,
        name: &str,
        journal_dir: &Path,
        spec: &ReplicaSpec,
        size: u64,
        point: (Pos, bool),
    ) -> Result<FailedOverDisk> {
        let l = lock(disk_dir, disk_id)?;
        FailedOverDisk::open_locked(l, disk_dir, name, journal_dir, spec, size, point)
    }

    /// Open it with the lock `l` already held.
    #[allow(clippy::too_many_arguments)]
    pub fn open_locked(
        l: Locked,
        disk_dir: &Path,
        name: &str,
        journal_dir: &Path,
        spec: &ReplicaSpec,
        size: u64,
        point: (Pos, bool),
    ) -> Result<FailedOverDisk> {
        let (point, journal) = point;
        let b = base(journal_dir, spec, size, point, journal)?;
        let overlay = Overlay::open_durable(b, &overlay_path(disk_dir, name), None)
            .map_err(|e| Error::Invalid(format!("the failed-over disk's overlay: {e}")))?;
        Ok(FailedOverDisk {
            overlay,
            point,
            name: name.to_string(),
            _lock: l,
        })
    }

    /// The overlay (what was written since the failover).
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// The point it presents.
    pub fn point(&self) -> Pos {
        self.point
    }

    /// Its overlay folder's name.
    pub fn overlay_name(&self) -> &str {
        &self.name
    }
}

fn remove_dir(d: &Path) -> Result<()> {
    match std::fs::remove_dir_all(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::error::io(d, "removing a failover overlay")(e)),
    }
}

/// Remove every overlay folder of `disk_dir` but `keep` (the lock held by
/// the caller), durably.
pub fn discard_except(disk_dir: &Path, keep: Option<&str>) -> Result<()> {
    let d = dir_of(disk_dir);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if e.path().is_dir() && Some(name.to_string_lossy().as_ref()) != keep {
            remove_dir(&e.path())?;
        }
    }
    crate::failover::record::sync_dir(&d)
}

/// Bytes allocated by overlay folder `name` of `disk_dir` (0 when none):
/// about what was written on the failed-over disk.
pub fn written_bytes(disk_dir: &Path, name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(overlay_path(disk_dir, name))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

impl Backend for FailedOverDisk {
    fn size(&self) -> u64 {
        self.overlay.size()
    }
    /// The overlay's: one overlay serves every connection and a flush
    /// syncs all of it, so multi-conn holds.
    fn caps(&self) -> Caps {
        CAPS
    }
    fn describe(&self) -> String {
        format!("failed-over disk at point {}", self.point)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.overlay.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.overlay.write_at(offset, data, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.overlay.trim(offset, len)
    }
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> io::Result<()> {
        self.overlay.zero(offset, len, may_trim, fast_only)
    }
    fn flush(&self) -> io::Result<()> {
        self.overlay.flush()
    }
}
