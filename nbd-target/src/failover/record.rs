//! The failover record, `DATA_DIR/ID/failover.json`: that a disk is failed
//! over, at which point, since when, and how far its commit got; and the
//! disk's failover history, `failover-history.jsonl` (one JSON object a
//! line: failover, move, rollback, commit, failback). Keys in
//! `docs/OPERATIONS.md`.
//!
//! The record is what fences the disk's shipper: while it exists the
//! target applies nothing to the replica. It is replaced atomically
//! (written beside, synced, renamed, the folder synced), so a crash leaves
//! the old record or the new one, never a torn one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{io, Error, Result};
use crate::journal::timeline::format_rfc3339;
use crate::journal::Pos;
use crate::state::now_ns;

/// The record's file name in a disk's folder.
pub const RECORD_FILE: &str = "failover.json";
/// The history's file name in a disk's folder.
pub const HISTORY_FILE: &str = "failover-history.jsonl";
/// Record format version.
pub const RECORD_VERSION: u64 = 1;

/// Where a failover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The shipper is being stopped (a `failover` command is at work, or
    /// was interrupted: run it again, or `--rollback`).
    Fencing,
    /// Presented at the point, reversible (`--rollback`, `--point P2`).
    Uncommitted,
    /// `--commit` is at work (or was interrupted: run it again); no longer
    /// reversible.
    Committing,
    /// Final: the replica image is the disk now.
    Committed,
}

impl Phase {
    /// As in the record and in `status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fencing => "fencing",
            Phase::Uncommitted => "uncommitted",
            Phase::Committing => "committing",
            Phase::Committed => "committed",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "fencing" => Phase::Fencing,
            "uncommitted" => Phase::Uncommitted,
            "committing" => Phase::Committing,
            "committed" => Phase::Committed,
            _ => return None,
        })
    }
}

/// A disk's failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it is.
    pub phase: Phase,
    /// The point presented (none while fencing).
    pub point: Option<Pos>,
    /// The point as the operator named it.
    pub point_name: String,
    /// When the disk was (first) failed over, ns since the epoch.
    pub failed_over_ns: u64,
    /// When it was committed (0: not yet).
    pub committed_ns: u64,
    /// The source ring whose sequence numbers the point counts.
    pub source_ring: [u8; 16],
    /// The replica's applied sequence when it was failed over (what the
    /// source's shipper resumes after on a rollback).
    pub applied_seq: u64,
    /// Bytes the failed-over disk held written when committed.
    pub written_bytes: u64,
    /// The image that holds the disk once committed.
    pub image: String,
    /// The overlay folder (in `ID/failover/`) holding what was written.
    pub overlay: String,
    /// The point is read through the journal (false: the disk has no
    /// journal, `serve --journal off`, and the point is the replica's
    /// latest state itself).
    pub journal: bool,
}

impl Record {
    /// A new record, fencing.
    pub fn fencing(source_ring: [u8; 16], applied_seq: u64) -> Record {
        Record {
            phase: Phase::Fencing,
            point: None,
            point_name: String::new(),
            failed_over_ns: now_ns(),
            committed_ns: 0,
            source_ring,
            applied_seq,
            written_bytes: 0,
            image: String::new(),
            overlay: String::new(),
            journal: true,
        }
    }

    /// As JSON (the file, and `status --json`'s `failover`).
    pub fn to_json(&self) -> Value {
        json!({
            "version": RECORD_VERSION,
            "state": self.phase.name(),
            "point": self.point.map(|p| p.to_string()),
            "point_epoch": self.point.map(|p| p.epoch),
            "point_seq": self.point.map(|p| p.seq),
            "point_sub": self.point.map(|p| p.sub),
            "point_name": self.point_name,
            "failed_over_at": format_rfc3339(self.failed_over_ns),
            "failed_over_ns": self.failed_over_ns,
            "committed_at": (self.committed_ns > 0).then(|| format_rfc3339(self.committed_ns)),
            "committed_ns": self.committed_ns,
            "source_ring_id": hex(&self.source_ring),
            "applied_seq": self.applied_seq,
            "written_bytes": self.written_bytes,
            "image": (!self.image.is_empty()).then_some(&self.image),
            "overlay": self.overlay,
            "journal": self.journal,
        })
    }

    fn from_json(v: &Value) -> Option<Record> {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        if u("version")? != RECORD_VERSION {
            return None;
        }
        let point = match u("point_seq") {
            Some(seq) => Some(Pos {
                epoch: u32::try_from(u("point_epoch")?).ok()?,
                seq,
                sub: v.get("point_sub")?.as_bool()?,
            }),
            None => None,
        };
        Some(Record {
            phase: Phase::parse(v.get("state")?.as_str()?)?,
            point,
            point_name: v.get("point_name")?.as_str()?.to_string(),
            failed_over_ns: u("failed_over_ns")?,
            committed_ns: u("committed_ns")?,
            source_ring: unhex(v.get("source_ring_id")?.as_str()?)?,
            applied_seq: u("applied_seq")?,
            written_bytes: u("written_bytes")?,
            image: v
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            overlay: v
                .get("overlay")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            journal: v.get("journal").and_then(Value::as_bool).unwrap_or(true),
        })
    }

    /// What `status` says: `failed over at P (uncommitted)`.
    pub fn describe(&self) -> String {
        let at = match self.point {
            Some(p) if self.point_name.is_empty() || self.point_name == p.to_string() => {
                p.to_string()
            }
            Some(p) => format!("{p} ({})", self.point_name),
            None => "(no point yet)".into(),
        };
        match self.phase {
            Phase::Fencing => "failing over: stopping the shipper (interrupted? run the failover again, or --rollback)".into(),
            Phase::Uncommitted => format!("failed over at {at} (uncommitted: --rollback or --point P2 undo it, --commit makes it final)"),
            Phase::Committing => format!("failed over at {at}, committing (interrupted? run --commit again)"),
            Phase::Committed => format!("failed over at {at} (committed: the disk is {})", self.image),
        }
    }
}

/// `DIR/failover.json`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(RECORD_FILE)
}

/// The disk's record, if it is failed over.
pub fn load(dir: &Path) -> Result<Option<Record>> {
    let p = path(dir);
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&p, "reading the failover record")(e)),
    };
    let v: Value = serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
        path: p.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    Record::from_json(&v).map(Some).ok_or(Error::Corrupt {
        path: p,
        reason: "not a failover record of version 1".into(),
    })
}

/// Write `r` as the disk's record, durably and atomically.
pub fn save(dir: &Path, r: &Record) -> Result<()> {
    let p = path(dir);
    let tmp = dir.join(format!("{RECORD_FILE}.{}.tmp", std::process::id()));
    let body =
        serde_json::to_vec_pretty(&r.to_json()).map_err(|e| Error::Invalid(e.to_string()))?;
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp, "writing the failover record"))?;
        f.write_all(&body)
            .map_err(io(&tmp, "writing the failover record"))?;
        f.sync_all()
            .map_err(io(&tmp, "syncing the failover record"))?;
    }
    std::fs::rename(&tmp, &p).map_err(io(&p, "replacing the failover record"))?;
    sync_dir(dir)
}

/// Remove the disk's record durably (it is replicating again).
pub fn remove(dir: &Path) -> Result<()> {
    let p = path(dir);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&p, "removing the failover record")(e)),
    }
    sync_dir(dir)
}

/// Append an event to the disk's history (best effort for the reader,
/// synced for the writer).
pub fn log_event(dir: &Path, event: &str, r: &Record, extra: Value) -> Result<()> {
    let p = dir.join(HISTORY_FILE);
    let mut v = r.to_json();
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
        o.insert("event".into(), json!(event));
        o.insert("at".into(), json!(format_rfc3339(now_ns())));
        o.insert("at_ns".into(), json!(now_ns()));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(io(&p, "writing the failover history"))?;
    writeln!(f, "{v}").map_err(io(&p, "writing the failover history"))?;
    f.sync_data()
        .map_err(io(&p, "syncing the failover history"))
}

/// The last event of the disk's history, if any.
pub fn last_event(dir: &Path) -> Option<Value> {
    let b = std::fs::read_to_string(dir.join(HISTORY_FILE)).ok()?;
    b.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
}

/// The last event of the disk's history that presented a point
/// (`failover` or `move`), for "the last failover's point and time".
pub fn last_failover(dir: &Path) -> Option<Value> {
    let b = std::fs::read_to_string(dir.join(HISTORY_FILE)).ok()?;
    b.lines().rev().find_map(|l| {
        let v = serde_json::from_str::<Value>(l).ok()?;
        matches!(
            v.get("event").and_then(Value::as_str),
            Some("failover" | "move")
        )
        .then_some(v)
    })
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the folder"))
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 16 bytes from 32 hex digits.
pub fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(d.path()).unwrap_or_else(|e| panic!("{e}")), None);
        let mut r = Record::fencing([7; 16], 42);
        save(d.path(), &r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            load(d.path()).unwrap_or_else(|e| panic!("{e}")),
            Some(r.clone())
        );
        r.phase = Phase::Uncommitted;
        r.point = Some(Pos {
            epoch: 1,
            seq: 40,
            sub: true,
        });
        r.point_name = "before".into();
        save(d.path(), &r).unwrap_or_else(|e| panic!("{e}"));
        let back = load(d.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, Some(r.clone()));
        assert!(r
            .describe()
            .starts_with("failed over at 40+sync (epoch 1) (before)"));
        log_event(d.path(), "failover", &r, json!({})).unwrap_or_else(|e| panic!("{e}"));
        log_event(d.path(), "rollback", &r, json!({"discarded_bytes": 5}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            last_event(d.path()).and_then(|v| v["event"].as_str().map(String::from)),
            Some("rollback".into())
        );
        assert_eq!(
            last_failover(d.path()).and_then(|v| v["point_seq"].as_u64()),
            Some(40)
        );
        remove(d.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(d.path()).unwrap_or_else(|e| panic!("{e}")), None);
        // A damaged record is an error, never "not failed over".
        std::fs::write(path(d.path()), b"{\"version\": 1").unwrap_or_else(|e| panic!("{e}"));
        assert!(load(d.path()).is_err());
        assert_eq!(unhex(&hex(&[0xab; 16])), Some([0xab; 16]));
        assert_eq!(unhex("zz"), None);
    }
}
