//! The replicas this target keeps: where each one lives, which shipper is
//! connected to it, and its live numbers for status and metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::replica::ReplicaSpec;
use crate::state::{self, ReplicaState};

/// Name of the replica image in a disk's folder.
pub const REPLICA_FILE: &str = "replica.img";
/// Name of the state file in a disk's folder.
pub const STATE_FILE: &str = "state";
/// Name of the live status file the daemon rewrites every second.
pub const LIVE_FILE: &str = "live.json";

/// A disk's live numbers (what the running daemon knows beyond the state file).
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// A shipper is connected.
    pub connected: bool,
    /// Its address.
    pub peer: String,
    /// Its certificate's name.
    pub peer_name: String,
    /// Durably applied sequence.
    pub applied_seq: u64,
    /// How far the current full pass got (bytes).
    pub sync_cursor: u64,
    /// The newest sequence the source has (from heartbeats).
    pub source_head_seq: u64,
    /// Capture time of the source's oldest unacknowledged record (0: none).
    pub oldest_pending_ns: u64,
    /// Records waiting at the source.
    pub records_waiting: u64,
    /// Bytes waiting at the source.
    pub bytes_waiting: u64,
    /// Frame bytes received, cumulative.
    pub wire_bytes: u64,
    /// Record bytes applied (before compression), cumulative.
    pub plain_bytes: u64,
    /// Batches applied, cumulative.
    pub batches: u64,
    /// Record bytes per second applied, recent.
    pub rate: f64,
    /// Why the last connection ended badly, if it did.
    pub last_error: String,
    /// When the numbers last changed (ns since the epoch).
    pub updated_ns: u64,
}

/// One replica.
#[derive(Debug)]
pub struct DiskEntry {
    /// Disk id.
    pub id: String,
    /// Where its bytes live.
    pub spec: ReplicaSpec,
    /// Its folder (state and live files).
    pub dir: PathBuf,
    busy: AtomicBool,
    live: Mutex<Live>,
}

impl DiskEntry {
    /// The live numbers.
    pub fn live(&self) -> MutexGuard<'_, Live> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Its persisted state, if any.
    pub fn state(&self) -> Option<ReplicaState> {
        state::read(&self.dir.join(STATE_FILE)).ok().flatten()
    }
}

/// Held while a shipper is connected to a disk; frees it when dropped.
#[derive(Debug)]
pub struct Claim(pub Arc<DiskEntry>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.live().connected = false;
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Every replica of this target.
#[derive(Debug)]
pub struct Registry {
    data_dir: PathBuf,
    backends: HashMap<String, ReplicaSpec>,
    disks: Mutex<HashMap<String, Arc<DiskEntry>>>,
}

impl Registry {
    /// Replicas under `data_dir`, with some disks kept on NBD backends.
    pub fn new(data_dir: &Path, backends: HashMap<String, ReplicaSpec>) -> Registry {
        let r = Registry {
            data_dir: data_dir.to_path_buf(),
            backends,
            disks: Mutex::new(HashMap::new()),
        };
        for id in known_disks(data_dir) {
            r.entry(&id);
        }
        r
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The entry for `id` (made on first use).
    pub fn entry(&self, id: &str) -> Arc<DiskEntry> {
        let mut m = self
            .disks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(id.to_string())
            .or_insert_with(|| {
                let dir = self.data_dir.join(id);
                Arc::new(DiskEntry {
                    id: id.to_string(),
                    spec: self
                        .backends
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| ReplicaSpec::File(dir.join(REPLICA_FILE))),
                    dir,
                    busy: AtomicBool::new(false),
                    live: Mutex::new(Live::default()),
                })
            })
            .clone()
    }

    /// Take `id` for one shipper; `None` when another is connected.
    pub fn claim(&self, id: &str) -> Option<Claim> {
        let e = self.entry(id);
        e.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Claim(e))
    }

    /// Every entry, sorted by id.
    pub fn all(&self) -> Vec<Arc<DiskEntry>> {
        let m = self
            .disks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = m.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// Disk ids with a state file under `data_dir`.
pub fn known_disks(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(STATE_FILE).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| wire::identity::validate_disk_id(id).is_ok())
        .collect();
    v.sort();
    v
}
