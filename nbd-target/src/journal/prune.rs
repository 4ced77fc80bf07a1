//! Retention: the oldest segments go when every entry in them is older
//! than `--retention`, or while the journal is over `--journal-max`;
//! never the newest segment, and never one a live lease needs (a view of
//! point P needs every entry after P: segment k holds entries up to the
//! base of segment k+1, so it may go only if that base is at or before P
//! for every lease).
//!
//! A segment goes index first, then payloads: a crash in between leaves
//! a payload file without an index, which the next open removes; the
//! oldest point is always the base of the oldest index kept.

use std::path::Path;

use super::segment::{self, Segment};
use super::JournalConfig;
use crate::error::Result;
use crate::state::now_ns;

/// What one prune did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Segments removed.
    pub segments: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Segments the size limit wanted gone that a lease kept.
    pub kept_for_leases: u64,
}

/// Prune journal `dir` under `cfg`.
pub fn prune(dir: &Path, cfg: &JournalConfig, disk_id: &str) -> Result<Pruned> {
    let segs = segment::list(dir)?;
    let mut done = Pruned::default();
    if segs.len() < 2 {
        return Ok(done);
    }
    let sizes: Vec<u64> = segs.iter().map(|&n| segment::bytes(dir, n)).collect();
    let mut total: u64 = sizes.iter().sum();
    let leases = super::lease::live(dir);
    let cutoff =
        now_ns().saturating_sub(u64::try_from(cfg.retention.as_nanos()).unwrap_or(u64::MAX));
    for i in 0..segs.len() - 1 {
        // Segment i ends where segment i+1 begins.
        let Some(next) = Segment::open(dir, segs[i + 1])? else {
            break;
        };
        let old = next.header.created_ns < cutoff;
        let big = total > cfg.max_bytes;
        if !old && !big {
            break;
        }
        if let Some(l) = leases.iter().find(|l| l.point < next.header.base) {
            if big {
                done.kept_for_leases += 1;
                log::warn!(
                    "disk {disk_id:?}: journal over its limit ({total} bytes > {}), but {} (pid {}) holds point {}: segment {} kept until it ends",
                    cfg.max_bytes, l.what, l.pid, l.point, segs[i]
                );
            }
            break;
        }
        segment::remove_pair(dir, segs[i])?;
        total = total.saturating_sub(sizes[i]);
        done.segments += 1;
        done.bytes += sizes[i];
        log::info!(
            "disk {disk_id:?}: pruned journal segment {} ({} bytes, {}); the oldest point is now {}",
            segs[i],
            sizes[i],
            if old { "older than the retention" } else { "over the size limit" },
            next.header.base
        );
    }
    Ok(done)
}
