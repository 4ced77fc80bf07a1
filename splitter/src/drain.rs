//! `splitter ring drain`: a consumer that reads every record, checks it, can
//! apply it to a copy of the disk, and releases it. It stands in for the
//! shipper in tests and benchmarks, and rebuilds a disk from its ring for
//! debugging; it is not the replication (that is the shipper's job).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::{Batch, Consumer, Kind, Record};

use blockdev::{Backend, Error, FileDisk, Result};

/// How to drain.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Apply every record to this file (a copy of the disk), synced before release.
    pub apply_to: Option<PathBuf>,
    /// Stop after this long without new records (None: until `stop`).
    pub exit_when_idle: Option<Duration>,
    /// Most records read per batch.
    pub batch: usize,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Records read and released.
    pub records: u64,
    /// Payload bytes read.
    pub bytes: u64,
    /// The last sequence number released (0: none).
    pub last_seq: u64,
    /// Sequence gaps seen (records lost to a torn tail).
    pub gaps: u64,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Apply one record to `copy` through the shared backend operations.
fn apply(copy: &dyn Backend, r: &Record<'_>) -> std::io::Result<()> {
    match r.kind {
        Kind::Write => copy.write_at(r.offset, r.payload, false),
        Kind::Trim | Kind::Zero => copy.zero(r.offset, u64::from(r.len), true, false),
        Kind::Mark | Kind::Pad => Ok(()),
    }
}

/// Drain the ring at `ring_path` until idle or `stop` is set.
pub fn drain(ring_path: &Path, opts: &DrainOptions, stop: &AtomicBool) -> Result<DrainStats> {
    let mut c = Consumer::open(ring_path)?;
    let target = match &opts.apply_to {
        Some(p) => Some(FileDisk::open(p, false)?),
        None => None,
    };
    let mut stats = DrainStats::default();
    let mut batch = Batch::new();
    let mut idle_since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = c.read(opts.batch, 64 << 20, &mut batch)?;
        if n == 0 {
            if opts
                .exit_when_idle
                .is_some_and(|d| idle_since.elapsed() >= d)
            {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        idle_since = Instant::now();
        if let Some(f) = &target {
            for r in batch.iter() {
                apply(f, &r).map_err(io("applying a record to the copy"))?;
            }
            f.flush().map_err(io("syncing the copy"))?;
        }
        for r in batch.iter() {
            stats.records += 1;
            stats.bytes += r.payload.len() as u64;
            if r.after_gap {
                stats.gaps += 1;
            }
        }
        stats.last_seq = batch.last_seq().unwrap_or(stats.last_seq);
        c.release(stats.last_seq)?;
    }
    Ok(stats)
}
