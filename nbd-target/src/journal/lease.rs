//! Leases: what an open point view (a test failover, an `ID@POINT`
//! export, a failover) holds so that pruning keeps every segment it needs.
//!
//! A lease is a small JSON file in `journal/leases/`, named after the
//! process and a counter, holding the point; it is removed when the view
//! closes. A lease whose process is gone (a `kill -9`) is stale: pruning
//! ignores it and removes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::Pos;
use crate::error::{io, Result};

/// The lease folder inside a journal folder.
pub const LEASE_DIR: &str = "leases";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A held lease: removed on drop.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

impl Lease {
    /// Hold `point` in the journal `dir`, for `what` (shown in status).
    pub fn take(dir: &Path, point: Pos, what: &str) -> Result<Lease> {
        let ld = dir.join(LEASE_DIR);
        std::fs::create_dir_all(&ld).map_err(io(&ld, "creating the lease folder"))?;
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = ld.join(format!("{pid}-{n}.json"));
        let v = serde_json::json!({
            "pid": pid,
            "epoch": point.epoch,
            "seq": point.seq,
            "sub": point.sub,
            "what": what,
            "since_ns": crate::state::now_ns(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, v.to_string()).map_err(io(&tmp, "writing a lease"))?;
        std::fs::rename(&tmp, &path).map_err(io(&path, "installing a lease"))?;
        Ok(Lease { path })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A live lease, as pruning and status see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The point held.
    pub point: Pos,
    /// Holding process.
    pub pid: u32,
    /// What holds it.
    pub what: String,
}

/// The live leases of journal `dir`; stale ones (their process is gone)
/// are removed.
pub fn live(dir: &Path) -> Vec<LeaseInfo> {
    let ld = dir.join(LEASE_DIR);
    let Ok(rd) = std::fs::read_dir(&ld) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let p = ent.path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let pid = v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!(
                "journal {}: removing the stale lease {} (its process {pid} is gone)",
                dir.display(),
                p.display()
            );
            let _ = std::fs::remove_file(&p);
            continue;
        }
        out.push(LeaseInfo {
            point: Pos {
                epoch: v["epoch"]
                    .as_u64()
                    .and_then(|e| u32::try_from(e).ok())
                    .unwrap_or(0),
                seq: v["seq"].as_u64().unwrap_or(0),
                sub: v["sub"].as_bool().unwrap_or(false),
            },
            pid,
            what: v["what"].as_str().unwrap_or("").to_string(),
        });
    }
    out
}
