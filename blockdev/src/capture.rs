//! The write-capture filter: where every change to the disk is duplicated
//! before the client hears it succeeded ("tee to ring").
//!
//! Every front end (NBD today, ublk later) opens one [`CaptureSession`] per
//! connection and calls it around each change:
//! 1. [`CaptureSession::begin`] before the disk is touched (the ring marks
//!    the extent in its in-flight table, so a crash between the disk and the
//!    ring cannot hide the change from the replica);
//! 2. after the disk succeeded, [`CaptureSession::write`] / `trim` / `zero`
//!    append the change (this also ends the in-flight mark), then the client
//!    is answered; or [`CaptureSession::failed`] / [`CaptureSession::cancel`]
//!    when the disk failed or was never touched;
//! 3. for FLUSH and FUA, after the disk is durable, the ranges of
//!    [`CaptureSession::sync_plan`] are synced (with io_uring, alongside the
//!    disk) and [`CaptureSession::synced`] is called before the answer.
//!
//! Without `--ring`, [`NoCapture`] serves the disk as is: the baseline.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use ring::{Appended, Change, Lane, Producer, SyncPlan};

// Every request slot of a connection owns one entry of its in-flight lane:
// a deeper queue would make two requests share an entry (and a crash could
// then hide one of them).
const _: () = assert!(crate::MAX_OPS as u64 <= ring::format::LANE_ENTRIES);

/// What must be synced to make every change captured so far durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSync {
    /// The file to sync.
    pub fd: RawFd,
    /// The producer's plan: byte ranges of that file.
    pub plan: SyncPlan,
    /// The file lives on the disk's own file system, and its blocks are
    /// allocated and written: writing its ranges back and then fdatasyncing
    /// the disk (one device cache flush) makes both durable.
    pub shares_disk_device: bool,
}

impl CaptureSync {
    /// The io_uring entry that makes the plan's range `offset..offset+len`
    /// durable. `then_disk_sync`: an fdatasync of the disk follows on the
    /// same device (`shares_disk_device`), so the range is only written
    /// back (sync_file_range, waiting) and that fdatasync flushes the device
    /// cache for both; otherwise the range is fdatasynced itself.
    pub fn range_entry(
        &self,
        offset: u64,
        len: u32,
        then_disk_sync: bool,
    ) -> io_uring::squeue::Entry {
        use io_uring::{opcode, types};
        if then_disk_sync {
            opcode::SyncFileRange::new(types::Fd(self.fd), len)
                .offset(offset)
                .flags(
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
                .build()
        } else {
            opcode::Fsync::new(types::Fd(self.fd))
                .flags(types::FsyncFlags::DATASYNC)
                .offset(offset)
                .len(len)
                .build()
        }
    }
}

/// The capture side shared by all connections.
pub trait WriteCapture: Send + Sync {
    /// Start capturing for one connection.
    fn session(&self) -> Box<dyn CaptureSession + '_>;
    /// Every connection has stopped: make everything durable and record a
    /// clean stop.
    fn close(&self) -> io::Result<()>;
    /// The front ends are shutting down: nothing may wait for the capture
    /// any more (a ring that blocks writers when full puts them in its
    /// dirty bitmap instead).
    fn interrupt(&self) {}
}

/// One connection's use of the capture. `slot` identifies a request in
/// flight on the connection (below [`crate::MAX_OPS`]).
pub trait CaptureSession {
    /// The change in `slot` is about to touch `offset..offset+len` on the disk.
    fn begin(&mut self, slot: usize, offset: u64, len: u64);
    /// `data` was written at `offset`.
    fn write(&mut self, slot: usize, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `len` bytes at `offset` were discarded (they read as zeroes).
    fn trim(&mut self, slot: usize, offset: u64, len: u32) -> io::Result<()>;
    /// `len` bytes at `offset` were zeroed.
    fn zero(&mut self, slot: usize, offset: u64, len: u32) -> io::Result<()>;
    /// The change in `slot` failed on the disk, which may hold part of it.
    fn failed(&mut self, slot: usize, offset: u64, len: u64);
    /// The change in `slot` never touched the disk.
    fn cancel(&mut self, slot: usize);
    /// What to sync for a durable point (None: nothing to sync).
    fn sync_plan(&mut self) -> Option<CaptureSync>;
    /// The plan's ranges are durable.
    fn synced(&mut self, sync: &CaptureSync);
}

/// No capture: serve the disk without recording its changes.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCapture;

impl WriteCapture for NoCapture {
    fn session(&self) -> Box<dyn CaptureSession + '_> {
        Box::new(NoCapture)
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

impl CaptureSession for NoCapture {
    fn begin(&mut self, _: usize, _: u64, _: u64) {}
    fn write(&mut self, _: usize, _: u64, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn trim(&mut self, _: usize, _: u64, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn zero(&mut self, _: usize, _: u64, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn failed(&mut self, _: usize, _: u64, _: u64) {}
    fn cancel(&mut self, _: usize) {}
    fn sync_plan(&mut self) -> Option<CaptureSync> {
        None
    }
    fn synced(&mut self, _: &CaptureSync) {}
}

/// Capture into a ring (the splitter's `--ring`).
#[derive(Debug)]
pub struct RingCapture {
    producer: Arc<Producer>,
    shares_disk_device: bool,
}

impl RingCapture {
    /// Capture into `producer`. `shares_disk_device`: the ring file is on
    /// the same file system as the disk (a file), so one fdatasync of the
    /// disk flushes the device cache for both.
    pub fn new(producer: Arc<Producer>, shares_disk_device: bool) -> RingCapture {
        RingCapture {
            producer,
            shares_disk_device,
        }
    }
}

struct RingSession<'a> {
    producer: &'a Producer,
    lane: Option<Lane>,
    shares_disk_device: bool,
}

fn ring_err(e: ring::Error) -> io::Error {
    io::Error::other(e)
}

impl WriteCapture for RingCapture {
    fn session(&self) -> Box<dyn CaptureSession + '_> {
        let lane = self.producer.take_lane();
        if lane.is_none() {
            log::warn!("every in-flight lane of the ring is taken: this connection's crash window is not covered");
        }
        Box::new(RingSession {
            producer: &self.producer,
            lane,
            shares_disk_device: self.shares_disk_device,
        })
    }

    fn close(&self) -> io::Result<()> {
        self.producer.close().map_err(ring_err)
    }

    fn interrupt(&self) {
        self.producer.interrupt();
    }
}

impl RingSession<'_> {
    fn end(&self, slot: usize) {
        if let Some(l) = &self.lane {
            self.producer.end(l, slot as u64);
        }
    }

    fn append(&mut self, slot: usize, change: Change<'_>) -> io::Result<()> {
        let r = self.producer.append(change).map_err(ring_err);
        if let (Err(_), Some((offset, len))) = (&r, change.extent()) {
            // The disk holds the change but the ring could not take it (EIO,
            // ENOSPC): the dirty bitmap must know, before the in-flight mark
            // that covers it now is cleared.
            self.producer.mark_dirty(offset, len);
        }
        // Appended or in the dirty bitmap: either way the change is known.
        self.end(slot);
        r.map(|a| {
            if a == Appended::Overflowed {
                log::debug!("change at slot {slot} went to the dirty bitmap");
            }
        })
    }
}

impl CaptureSession for RingSession<'_> {
    fn begin(&mut self, slot: usize, offset: u64, len: u64) {
        if let Some(l) = &self.lane {
            self.producer.begin(l, slot as u64, offset, len);
        }
    }
    fn write(&mut self, slot: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        self.append(slot, Change::Write { offset, data })
    }
    fn trim(&mut self, slot: usize, offset: u64, len: u32) -> io::Result<()> {
        self.append(slot, Change::Trim { offset, len })
    }
    fn zero(&mut self, slot: usize, offset: u64, len: u32) -> io::Result<()> {
        self.append(slot, Change::Zero { offset, len })
    }
    fn failed(&mut self, slot: usize, offset: u64, len: u64) {
        // The disk may hold part of the change: resync the extent.
        self.producer.mark_dirty(offset, len);
        self.end(slot);
    }
    fn cancel(&mut self, slot: usize) {
        self.end(slot);
    }
    fn sync_plan(&mut self) -> Option<CaptureSync> {
        Some(CaptureSync {
            fd: self.producer.fd(),
            plan: self.producer.sync_plan(),
            shares_disk_device: self.shares_disk_device,
        })
    }
    fn synced(&mut self, sync: &CaptureSync) {
        self.producer.synced(&sync.plan);
    }
}

impl Drop for RingSession<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.lane.take() {
            self.producer.release_lane(l);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;

    #[test]
    fn a_change_the_ring_could_not_take_is_marked_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let disk = ring::DiskIdentity {
            size: 64 << 20,
            fingerprint: [1, 2],
            path: "/dev/test".into(),
        };
        let opts = ring::CreateOptions {
            capacity: 1 << 20,
            granularity: 64 << 10,
            disk_holds_data: false,
        };
        let (p, _) =
            ring::Producer::open_or_create(&path, &opts, &disk, ring::FullPolicy::Bitmap).unwrap();
        let p = Arc::new(p);
        let cap = RingCapture::new(p.clone(), false);
        {
            let mut s = cap.session();
            s.begin(3, 5 << 20, 4096);
            // The disk took the write; the ring's write fails (EIO).
            p.fail_next_appends(1);
            assert!(s.write(3, 5 << 20, &[1u8; 4096]).is_err());
            s.cancel(3);
        }
        let dirty = p.dirty_extents();
        assert!(
            dirty
                .iter()
                .any(|e| e.offset <= 5 << 20 && e.offset + e.len > 5 << 20),
            "the change must be in the dirty bitmap: {dirty:?}"
        );
        // And the plan that precedes CLEAN makes the bit durable.
        assert!(p.sync_plan().ranges.len() > 1);
        cap.close().unwrap();
        assert!(ring::status(&path).unwrap().dirty_bytes > 0);
    }
}
