//! `splitter ring drain`: a consumer that reads every record, checks it, can
//! apply it to a copy of the disk, and releases it. It stands in for the
//! shipper in tests and benchmarks, and rebuilds a disk from its ring for
//! debugging; it is not the replication (that is the shipper's job).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::{Batch, Consumer, Kind, Record};

use crate::error::{Error, Result};

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

fn apply(f: &File, r: &Record<'_>, zeroes: &[u8]) -> std::io::Result<()> {
    match r.kind {
        Kind::Write => f.write_all_at(r.payload, r.offset),
        Kind::Trim | Kind::Zero => {
            if punch_hole(f, r.offset, u64::from(r.len)).is_ok() {
                return Ok(());
            }
            let mut at = r.offset;
            let end = r.offset + u64::from(r.len);
            while at < end {
                // Bounded by zeroes.len() (1 MiB).
                let n = usize::try_from(end - at)
                    .unwrap_or(zeroes.len())
                    .min(zeroes.len());
                f.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Kind::Mark | Kind::Pad => Ok(()),
    }
}

/// Make `offset..offset+len` of `f` read as zeroes by deallocating it.
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let bad = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let (off, len) = (
        libc::off_t::try_from(offset).map_err(bad)?,
        libc::off_t::try_from(len).map_err(bad)?,
    );
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes a descriptor `f` keeps open and no pointers.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drain the ring at `ring_path` until idle or `stop` is set.
pub fn drain(ring_path: &Path, opts: &DrainOptions, stop: &AtomicBool) -> Result<DrainStats> {
    let mut c = Consumer::open(ring_path)?;
    let target = match &opts.apply_to {
        Some(p) => Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(io("opening the copy to apply records to"))?,
        ),
        None => None,
    };
    let zeroes = vec![0u8; 1 << 20];
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
                apply(f, &r, &zeroes).map_err(io("applying a record to the copy"))?;
            }
            f.sync_data().map_err(io("syncing the copy"))?;
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
