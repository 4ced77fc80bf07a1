//! Which disk a replica belongs to, across failover and failback:
//! `DATA_DIR/ID/identity.json` (keys below), checked at every HELLO
//! against the shipper's lineage (`wire::frame::Lineage`, from the disk
//! marker `blockdev::marker`).
//!
//! - `uuid`, `marked`: the disk's identity, adopted from the first HELLO
//!   (or from the marker of a disk seeded in place). Enforced only when
//!   both sides know it from a marker: a marked disk of another identity
//!   under this disk id is refused (Mismatch), unless the replica was
//!   seeded with `--force` (then the first HELLO's identity is adopted).
//! - `in_place`: the replica is the original disk file itself (`seed
//!   --in-place`): its path, the ring that captured it, that ring's last
//!   sequence and the time of its last captured write. A failed-over copy
//!   protected back toward it (a HELLO whose lineage says FAILED_OVER from
//!   that ring) is refused as a **split brain** when both sides were
//!   written since the failover: the original after the failover's time,
//!   the copy after its point (WRITTEN, or records in its ring). The
//!   refusal names both sides' last sequence; nothing is changed.
//!
//! It is not the failover state (`crate::failover`) nor the consistency of
//! the replica's bytes (`crate::consistency`).

use std::path::Path;

use serde_json::{json, Value};
use wire::frame::{ErrorCode, Hello, LINEAGE_MARKED, LINEAGE_WRITTEN};

use crate::error::{io, Error, Result};
use crate::failover::record::{hex, sync_dir, unhex};
use crate::journal::timeline::format_rfc3339;

/// The file's name in a disk's folder.
pub const IDENTITY_FILE: &str = "identity.json";

/// The original disk a replica was seeded in place from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlace {
    /// The disk file.
    pub path: String,
    /// The ring that captured its writes, if its marker named one.
    pub ring_id: Option<[u8; 16]>,
    /// That ring's last sequence when seeded.
    pub head_seq: u64,
    /// When its last captured write happened (ns since the epoch; 0: none known).
    pub last_write_ns: u64,
}

/// A replica's identity record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The disk's identity.
    pub uuid: [u8; 16],
    /// It came from a disk marker.
    pub marked: bool,
    /// Adopt the first HELLO's identity, and skip the split-brain check
    /// (`seed --force`).
    pub force: bool,
    /// Seeded in place from the original disk.
    pub in_place: Option<InPlace>,
}

impl Identity {
    /// As JSON (the file).
    pub fn to_json(&self) -> Value {
        json!({
            "version": 1,
            "uuid": hex(&self.uuid),
            "marked": self.marked,
            "force": self.force,
            "in_place": self.in_place.as_ref().map(|p| json!({
                "path": p.path,
                "ring_id": p.ring_id.map(|r| hex(&r)),
                "head_seq": p.head_seq,
                "last_write_ns": p.last_write_ns,
                "last_write_at": (p.last_write_ns > 0).then(|| format_rfc3339(p.last_write_ns)),
            })),
        })
    }

    fn from_json(v: &Value) -> Option<Identity> {
        let in_place = match v.get("in_place") {
            Some(Value::Null) | None => None,
            Some(p) => Some(InPlace {
                path: p.get("path")?.as_str()?.to_string(),
                ring_id: p.get("ring_id").and_then(Value::as_str).and_then(unhex),
                head_seq: p.get("head_seq")?.as_u64()?,
                last_write_ns: p.get("last_write_ns")?.as_u64()?,
            }),
        };
        Some(Identity {
            uuid: unhex(v.get("uuid")?.as_str()?)?,
            marked: v.get("marked")?.as_bool()?,
            force: v.get("force")?.as_bool()?,
            in_place,
        })
    }
}

/// The identity record of the disk in `dir`, if any.
pub fn load(dir: &Path) -> Result<Option<Identity>> {
    let p = dir.join(IDENTITY_FILE);
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&p, "reading the disk identity")(e)),
    };
    let v: Value = serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
        path: p.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    Identity::from_json(&v).map(Some).ok_or(Error::Corrupt {
        path: p,
        reason: "not a disk identity record".into(),
    })
}

/// Write the identity record durably.
pub fn save(dir: &Path, id: &Identity) -> Result<()> {
    let p = dir.join(IDENTITY_FILE);
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let body =
        serde_json::to_vec_pretty(&id.to_json()).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&tmp, body).map_err(io(&tmp, "writing the disk identity"))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp, "syncing the disk identity"))?;
    std::fs::rename(&tmp, &p).map_err(io(&p, "replacing the disk identity"))?;
    sync_dir(dir)
}

/// Check a HELLO's lineage against the disk in `dir`, adopting its
/// identity when the disk has none yet. `Err((code, message))`: refuse it.
pub fn check_hello(dir: &Path, hello: &Hello) -> std::result::Result<(), (ErrorCode, String)> {
    let Some(l) = hello.lineage else {
        return Ok(());
    };
    let io_err = |e: Error| (ErrorCode::ReplicaIo, e.to_string());
    let marked = l.flags & LINEAGE_MARKED != 0;
    let Some(mut id) = load(dir).map_err(io_err)? else {
        return save(
            dir,
            &Identity {
                uuid: l.disk_uuid,
                marked,
                ..Identity::default()
            },
        )
        .map_err(io_err);
    };
    if let (Some(p), true, false) = (&id.in_place, l.failed_over(), id.force) {
        let from_this = p.ring_id.is_none_or(|r| r == l.from_ring);
        let original_written = p.last_write_ns > l.failed_over_ns;
        let copy_written = l.flags & LINEAGE_WRITTEN != 0 || hello.next_seq > 1;
        if from_this && original_written && copy_written {
            return Err((
                ErrorCode::FailedOver,
                format!(
                    "split brain on disk {:?}: both sides were written since the failover at seq {} ({}). The original disk {} (ring {}) is at seq {}, its last write at {}, after the failover; the failed-over copy (ring {}) is at seq {}{}. Both acted as primary: nothing was changed on either side. Keep one: protect the original again (stop this shipper, roll the recovery site back to it), or keep the copy (seed again with `nbd-target seed --in-place --force`, which discards the original's writes since the failover)",
                    hello.disk_id,
                    l.from_seq,
                    format_rfc3339(l.failed_over_ns),
                    p.path,
                    p.ring_id.map_or("?".into(), |r| hex(&r)),
                    p.head_seq,
                    format_rfc3339(p.last_write_ns),
                    hex(&hello.ring_id),
                    hello.next_seq.saturating_sub(1),
                    if l.flags & LINEAGE_WRITTEN != 0 {
                        ", and it was written before that ring began"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    if id.uuid == l.disk_uuid {
        return Ok(());
    }
    if id.force || !id.marked || !marked {
        // Adopt: forced, or one side never knew the identity from a marker.
        id.uuid = l.disk_uuid;
        id.marked = marked;
        id.force = false;
        return save(dir, &id).map_err(io_err);
    }
    Err((
        ErrorCode::Mismatch,
        format!(
            "disk {:?}: this replica belongs to the disk with identity {}, but this shipper's disk is {}: a different disk under the same disk id; nothing written (use another disk id, or move the replica's folder away)",
            hello.disk_id,
            hex(&id.uuid),
            hex(&l.disk_uuid)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::frame::{Lineage, LINEAGE_FAILED_OVER};

    fn hello(uuid: u8, flags: u32, next_seq: u64) -> Hello {
        Hello {
            min_version: 1,
            max_version: 1,
            flags: 0,
            ring_id: [9; 16],
            disk_size: 1 << 20,
            block_size: 4096,
            tail_seq: 1,
            next_seq,
            disk_id: "db".into(),
            lineage: Some(Lineage {
                disk_uuid: [uuid; 16],
                flags,
                from_ring: [5; 16],
                from_seq: 100,
                failed_over_ns: 1_000,
            }),
        }
    }

    #[test]
    fn adopt_then_enforce_marked_identities() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert!(check_hello(d.path(), &hello(1, LINEAGE_MARKED, 1)).is_ok());
        assert!(check_hello(d.path(), &hello(1, LINEAGE_MARKED, 1)).is_ok());
        let e = check_hello(d.path(), &hello(2, LINEAGE_MARKED, 1)).err();
        assert_eq!(e.map(|e| e.0), Some(ErrorCode::Mismatch));
        // Unmarked (no xattrs there): adopted, never refused.
        assert!(check_hello(d.path(), &hello(3, 0, 1)).is_ok());
        assert_eq!(load(d.path()).ok().flatten().map(|i| i.uuid), Some([3; 16]));
    }

    #[test]
    fn split_brain_needs_both_sides_written() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let seeded = |last_write_ns| Identity {
            uuid: [1; 16],
            marked: true,
            force: false,
            in_place: Some(InPlace {
                path: "/disk.img".into(),
                ring_id: Some([5; 16]),
                head_seq: 120,
                last_write_ns,
            }),
        };
        let fo = LINEAGE_MARKED | LINEAGE_FAILED_OVER;
        // The original was last written before the failover: a failback.
        save(d.path(), &seeded(900)).unwrap_or_else(|e| panic!("{e}"));
        assert!(check_hello(d.path(), &hello(1, fo | LINEAGE_WRITTEN, 50)).is_ok());
        // Written after it, but the copy was not: no split brain either.
        save(d.path(), &seeded(2_000)).unwrap_or_else(|e| panic!("{e}"));
        assert!(check_hello(d.path(), &hello(1, fo, 1)).is_ok());
        // Both: refused, naming both sides' last sequence.
        let e = check_hello(d.path(), &hello(1, fo, 57)).err();
        let (code, m) = e.unwrap_or((ErrorCode::Internal, String::new()));
        assert_eq!(code, ErrorCode::FailedOver);
        assert!(
            m.contains("split brain") && m.contains("at seq 120") && m.contains("at seq 56"),
            "{m}"
        );
        let e = check_hello(d.path(), &hello(1, fo | LINEAGE_WRITTEN, 1)).err();
        assert!(e.is_some());
        // --force: accepted.
        let mut f = seeded(2_000);
        f.force = true;
        save(d.path(), &f).unwrap_or_else(|e| panic!("{e}"));
        assert!(check_hello(d.path(), &hello(1, fo, 57)).is_ok());
    }
}
