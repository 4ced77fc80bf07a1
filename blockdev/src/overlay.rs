//! A copy-on-write overlay: a writable [`Backend`] over a base backend that
//! is never written, for "test failover" (a writable NBD export of a disk
//! at a recovery point, thrown away afterwards).
//!
//! What it is:
//! - The disk is cut in blocks of [`OVERLAY_BLOCK`] (4 KiB; the last one
//!   may be shorter). A block is either *absent* (read from the base) or
//!   *present* in the overlay file, an unnamed sparse file made in the
//!   directory given to [`Overlay::create`] (O_TMPFILE where the file
//!   system has it, otherwise created and unlinked at once): it has no
//!   name, and its space is given back when the [`Overlay`] drops or the
//!   process dies. An in-memory bitmap (two bits per block) says which
//!   blocks are present and which of them hold written data.
//! - Reads assemble each request from runs of present blocks (read from
//!   the overlay file) and runs of absent blocks (read from the base): one
//!   read per contiguous run, not one per block.
//! - Writes of whole blocks go straight to the overlay file; a first or
//!   last block that the write covers only in part and that is still
//!   absent is read from the base first and written whole
//!   (read-modify-write). Zero and trim make the blocks they cover present
//!   and punch a hole over them in the overlay file (fallocate
//!   `PUNCH_HOLE | KEEP_SIZE`: they read as zeroes and take no space), with
//!   a read-modify-write of absent blocks they cover only in part.
//! - An optional cap on its size ([`Overlay::limit`]): [`Overlay::bytes_used`]
//!   counts 4 KiB for every block that holds written data, from the first
//!   write into it on. Blocks that were only ever zeroed or trimmed (holes)
//!   do not count, so a guest that discards the whole disk (mkfs, fstrim)
//!   does not fill the cap; a zero or trim of a block that had data does
//!   punch its space free but does not give the 4 KiB back to the count,
//!   which so stays an upper bound of the file's allocation, exact without
//!   a lock per block. A change that would take the count beyond the cap
//!   fails with ENOSPC before anything is written (nothing is half
//!   applied), is counted in [`Overlay::full_events`] and logged once per
//!   episode (until a change allocates again); changes of blocks that hold
//!   data already, and all reads, keep working.
//!
//! - **Durable** overlays ([`Overlay::create_durable`], for a failover: the
//!   writes made on a failed-over disk are the user's data) have a named
//!   data file and a map file ([`crate::overlay_map`]): a flush or a FUA
//!   write syncs the data file, then writes the map pages changed since
//!   the last flush (the bits as they were *before* that sync, so every bit
//!   written points at synced data) and syncs them.
//!   [`Overlay::open_durable`] opens them again after a restart or a crash.
//!
//! What it is not: durable unless made so (an unnamed overlay's flush and
//! FUA do nothing: it is discarded when the export ends, a crash loses it,
//! by design), a snapshot format, shared between processes (one process
//! opens a durable overlay at a time: its users lock it), or a
//! block-status source (`extents` reports all data).
//!
//! # Locking
//!
//! One `Mutex` over the bitmap and the count, and a `Condvar`:
//! - A change (write, zero, trim) takes the mutex, waits on the condvar
//!   while a *reservation* of another change overlaps its blocks and its
//!   own blocks include absent ones, checks the cap, marks the blocks it
//!   gives data, and, when some of its blocks are absent, reserves its
//!   block range; then it lets the mutex go for the I/O (the base reads
//!   of the read-modify-write and the overlay writes). When the I/O is
//!   done it takes the mutex again, marks the blocks of its range present,
//!   drops the reservation and wakes the waiters (on an I/O error or a
//!   panic it rolls the reservation back instead: the blocks stay absent
//!   and their count is given back).
//! - So the allocation of a block (absent → present, which writes the
//!   whole block to the overlay file) is done by one change at a time, and
//!   a block is marked present only after the overlay file holds all of
//!   it. Two changes into the same absent block are serialized, so a
//!   read-modify-write never overwrites bytes another change wrote (two
//!   partial writes into one new block both land).
//! - A block never goes back from present to absent, so a change whose
//!   blocks are all present needs no reservation: it writes the overlay
//!   file directly, concurrently with other changes (overlapping writes in
//!   flight at once have no defined order, as on any disk).
//! - Reads never wait: they take the mutex only to find the end of the
//!   next run of blocks in the same state. A block being allocated is
//!   still absent and reads from the base, its content before the change
//!   in flight; a present block's file content is complete.
//!
//! So one overlay serves all connections of an export (multi-conn is
//! safe: there is nothing to flush).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::backend::{Backend, Caps};
use crate::file::fallocate;
use crate::overlay_map::{self, MapLayout};

/// The map file of the durable overlay whose data file is `path`.
pub fn map_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

/// The overlay's block size: the unit of copy-on-write and of its count.
pub const OVERLAY_BLOCK: u64 = 4096;

/// [`OVERLAY_BLOCK`] as a buffer length.
const BLOCK_LEN: usize = 4096;
const _: () = assert!(BLOCK_LEN as u64 == OVERLAY_BLOCK);
/// [`OVERLAY_BLOCK`] as the map header stores it.
const OVERLAY_BLOCK_U32: u32 = 4096;
const _: () = assert!(OVERLAY_BLOCK_U32 as u64 == OVERLAY_BLOCK);

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Why an overlay could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// The overlay file could not be created or sized.
    #[error("test-failover overlay in {dir}: {what}: {source}")]
    File {
        /// The directory it was to be made in.
        dir: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory's file system cannot punch holes, which zero and trim
    /// need to stay cheap.
    #[error("test-failover overlay in {dir}: the file system cannot punch holes (fallocate PUNCH_HOLE: {source}); put the overlay on ext4, xfs, btrfs or tmpfs")]
    NoPunchHole {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The base disk's bitmap does not fit in memory addresses.
    #[error("test-failover overlay: a base disk of {size} bytes is too large for this machine")]
    TooLarge {
        /// The base's size in bytes.
        size: u64,
    },
}

/// A length or an index known to be below a `usize` (a buffer's length,
/// the bitmap's length).
fn us(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The words of a bitmap and the masks of their bits that cover blocks
/// `from..to`, in order.
fn words(from: u64, to: u64) -> impl Iterator<Item = (usize, u64)> {
    let stop = if to > from {
        (to - 1) / 64 + 1
    } else {
        from / 64
    };
    (from / 64..stop).map(move |w| {
        let lo = if w == from / 64 { from % 64 } else { 0 };
        let hi = (to - w * 64).min(64);
        let below_hi = if hi == 64 { !0u64 } else { (1u64 << hi) - 1 };
        (us(w), below_hi & (!0u64 << lo))
    })
}

/// The bitmap and the count, under the overlay's mutex.
#[derive(Debug)]
struct Map {
    /// Blocks present in the overlay file (read from it).
    present: Vec<u64>,
    /// Blocks that hold written data (counted). Set for present blocks,
    /// and for absent blocks inside a reservation that writes them.
    data: Vec<u64>,
    /// Block ranges of the changes allocating blocks now (pairwise
    /// disjoint: at most one per thread in a change).
    reserved: Vec<(u64, u64)>,
    /// Bits set in `data`.
    used_blocks: u64,
    /// Map pages changed since the last flush (durable overlays only;
    /// one bit per page of [`overlay_map::WORDS_PER_PAGE`] words).
    dirty: Vec<u64>,
    /// A refusal for the cap was logged since the last allocation.
    full_logged: bool,
}

impl Map {
    fn count(bits: &[u64], from: u64, to: u64) -> u64 {
        words(from, to)
            .map(|(w, m)| u64::from((bits[w] & m).count_ones()))
            .sum()
    }

    fn is_set(bits: &[u64], b: u64) -> bool {
        bits[us(b / 64)] & (1u64 << (b % 64)) != 0
    }

    fn set(bits: &mut [u64], b: u64) {
        bits[us(b / 64)] |= 1u64 << (b % 64);
    }

    fn present(&self, b: u64) -> bool {
        Map::is_set(&self.present, b)
    }

    /// Whether block `from` is present, and the end of the run of blocks
    /// in the same state that starts there (at most `to`).
    fn run(&self, from: u64, to: u64) -> (bool, u64) {
        let present = self.present(from);
        for (w, m) in words(from, to) {
            let other = if present {
                !self.present[w]
            } else {
                self.present[w]
            } & m;
            if other != 0 {
                let at = (w as u64) * 64 + u64::from(other.trailing_zeros());
                return (present, at);
            }
        }
        (present, to)
    }

    /// Note that the words covering blocks `from..to` changed.
    fn touch(&mut self, from: u64, to: u64) {
        if self.dirty.is_empty() || to <= from {
            return;
        }
        let per = overlay_map::WORDS_PER_PAGE as u64;
        for p in (from / 64 / per)..=((to - 1) / 64 / per) {
            Map::set(&mut self.dirty, p);
        }
    }

    fn overlaps_reservation(&self, from: u64, to: u64) -> bool {
        self.reserved.iter().any(|&(a, b)| a < to && from < b)
    }

    /// Count `n` more blocks with data, if the cap allows.
    fn allocate(&mut self, n: u64, limit: Option<u64>) -> Result<(), u64> {
        if n == 0 {
            return Ok(());
        }
        let want = (self.used_blocks + n).saturating_mul(OVERLAY_BLOCK);
        if let Some(limit) = limit {
            if want > limit {
                return Err(self.used_blocks * OVERLAY_BLOCK);
            }
        }
        self.used_blocks += n;
        self.full_logged = false;
        Ok(())
    }
}

/// What a change puts in its range.
#[derive(Clone, Copy)]
enum Fill<'a> {
    /// These bytes (as long as the range).
    Data(&'a [u8]),
    /// Zeroes, as holes.
    Zero,
}

/// A copy-on-write overlay over a base [`Backend`] that is never written.
/// See the [module documentation](self).
pub struct Overlay {
    base: Arc<dyn Backend>,
    file: File,
    /// Its map file, when the overlay is durable.
    durable: Option<Durable>,
    size: u64,
    limit: Option<u64>,
    map: Mutex<Map>,
    settled: Condvar,
    full_events: AtomicU64,
}

impl fmt::Debug for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overlay")
            .field("base", &self.base.describe())
            .field("size", &self.size)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A durable overlay's map file (see [`overlay_map`]).
struct Durable {
    map: File,
    layout: MapLayout,
    path: PathBuf,
    /// One flush at a time (each writes the pages it took from the map).
    flushing: Mutex<()>,
}

impl Durable {
    fn new(map: File, layout: MapLayout, path: &Path) -> Durable {
        Durable {
            map,
            layout,
            path: path.to_path_buf(),
            flushing: Mutex::new(()),
        }
    }
}

/// A change's reservation of a block range: settled when committed, rolled
/// back when dropped uncommitted (an I/O error or a panic).
struct Reservation<'a> {
    overlay: &'a Overlay,
    range: Option<(u64, u64)>,
}

impl Reservation<'_> {
    fn commit(mut self) {
        self.settle(true);
    }

    fn settle(&mut self, ok: bool) {
        let Some((from, to)) = self.range.take() else {
            return;
        };
        let mut map = self.overlay.lock();
        for (w, m) in words(from, to) {
            // The absent blocks of the range: only this change touches
            // their bits while it holds the reservation.
            let absent = !map.present[w] & m;
            if ok {
                map.present[w] |= absent;
                if absent != 0 {
                    map.touch(w as u64 * 64, w as u64 * 64 + 1);
                }
            } else {
                let counted = map.data[w] & absent;
                map.data[w] &= !counted;
                map.used_blocks -= u64::from(counted.count_ones());
            }
        }
        map.reserved.retain(|&r| r != (from, to));
        drop(map);
        self.overlay.settled.notify_all();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.settle(false);
    }
}

impl Overlay {
    /// An overlay over `base`, its file made (unnamed) in `dir`, at most
    /// `max_bytes` of blocks with data when given (see the module doc for
    /// what counts).
    pub fn create(
        base: Arc<dyn Backend>,
        dir: &Path,
        max_bytes: Option<u64>,
    ) -> Result<Overlay, OverlayError> {
        let size = base.size();
        let words = usize::try_from(size.div_ceil(OVERLAY_BLOCK).div_ceil(64))
            .map_err(|_| OverlayError::TooLarge { size })?;
        let err = |what| {
            let dir = dir.to_path_buf();
            move |source| OverlayError::File { dir, what, source }
        };
        let file = tempfile::tempfile_in(dir).map_err(err("creating the overlay file"))?;
        file.set_len(size).map_err(err("sizing the overlay file"))?;
        fallocate(file.as_raw_fd(), PUNCH, 0, OVERLAY_BLOCK).map_err(|source| {
            OverlayError::NoPunchHole {
                dir: dir.to_path_buf(),
                source,
            }
        })?;
        Ok(Overlay::assemble(
            base,
            file,
            None,
            max_bytes,
            vec![0; words],
            vec![0; words],
        ))
    }

    fn assemble(
        base: Arc<dyn Backend>,
        file: File,
        durable: Option<Durable>,
        limit: Option<u64>,
        present: Vec<u64>,
        data: Vec<u64>,
    ) -> Overlay {
        let size = base.size();
        let used_blocks = data.iter().map(|w| u64::from(w.count_ones())).sum();
        let pages = present.len().div_ceil(overlay_map::WORDS_PER_PAGE);
        let dirty = if durable.is_some() {
            vec![0; pages.div_ceil(64).max(1)]
        } else {
            Vec::new()
        };
        Overlay {
            base,
            file,
            durable,
            size,
            limit,
            map: Mutex::new(Map {
                present,
                data,
                reserved: Vec::new(),
                used_blocks,
                full_logged: false,
                dirty,
            }),
            settled: Condvar::new(),
            full_events: AtomicU64::new(0),
        }
    }

    /// A *durable* overlay over `base`: its data in the new file `path`
    /// (the disk's size, sparse) and its map in `path` + `.map`, both
    /// created here (never over existing files) and synced with their
    /// folder. A flush (or a FUA write) makes every write completed before
    /// it survive a crash; [`Overlay::open_durable`] opens it again.
    pub fn create_durable(
        base: Arc<dyn Backend>,
        path: &Path,
        max_bytes: Option<u64>,
    ) -> Result<Overlay, OverlayError> {
        let size = base.size();
        let layout = MapLayout::new(size, OVERLAY_BLOCK_U32);
        usize::try_from(layout.words).map_err(|_| OverlayError::TooLarge { size })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let err = |what| {
            let dir = dir.clone();
            move |source| OverlayError::File { dir, what, source }
        };
        let new = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
        };
        let file = new(path).map_err(err("creating the overlay file"))?;
        file.set_len(size).map_err(err("sizing the overlay file"))?;
        fallocate(file.as_raw_fd(), PUNCH, 0, OVERLAY_BLOCK).map_err(|source| {
            OverlayError::NoPunchHole {
                dir: dir.clone(),
                source,
            }
        })?;
        let mp = map_path(path);
        let map = new(&mp).map_err(err("creating the overlay map"))?;
        map.set_len(layout.file_len())
            .map_err(err("sizing the overlay map"))?;
        map.write_all_at(&layout.encode(), 0)
            .map_err(err("writing the overlay map"))?;
        file.sync_all().map_err(err("syncing the overlay file"))?;
        map.sync_all().map_err(err("syncing the overlay map"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing the overlay's folder"))?;
        let words = usize::try_from(layout.words).unwrap_or(0);
        Ok(Overlay::assemble(
            base,
            file,
            Some(Durable::new(map, layout, path)),
            max_bytes,
            vec![0; words],
            vec![0; words],
        ))
    }

    /// Open the durable overlay made by [`Overlay::create_durable`] at
    /// `path` over `base` (which must be as large as the disk it was made
    /// for): every block flushed before a crash is there.
    pub fn open_durable(
        base: Arc<dyn Backend>,
        path: &Path,
        max_bytes: Option<u64>,
    ) -> Result<Overlay, OverlayError> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let err = |what| {
            let dir = dir.clone();
            move |source| OverlayError::File { dir, what, source }
        };
        let open = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
        let file = open(path).map_err(err("opening the overlay file"))?;
        let map = open(&map_path(path)).map_err(err("opening the overlay map"))?;
        let (layout, present, data) =
            overlay_map::read(&map).map_err(err("reading the overlay map"))?;
        if layout.size != base.size() || u64::from(layout.block) != OVERLAY_BLOCK {
            return Err(OverlayError::File {
                dir,
                what: "checking the overlay map",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "made for a disk of {} bytes in blocks of {}, not {} bytes",
                        layout.size,
                        layout.block,
                        base.size()
                    ),
                ),
            });
        }
        Ok(Overlay::assemble(
            base,
            file,
            Some(Durable::new(map, layout, path)),
            max_bytes,
            present,
            data,
        ))
    }

    /// Whether it is durable (made by [`Overlay::create_durable`] or
    /// [`Overlay::open_durable`]).
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// The runs of present blocks, as byte ranges `(offset, len)` in
    /// order (what the overlay changed).
    pub fn present_ranges(&self) -> Vec<(u64, u64)> {
        let map = self.lock();
        let blocks = self.size.div_ceil(OVERLAY_BLOCK);
        let mut out = Vec::new();
        let mut b = 0;
        while b < blocks {
            let (present, end) = map.run(b, blocks);
            if present {
                let start = b * OVERLAY_BLOCK;
                out.push((start, (end * OVERLAY_BLOCK).min(self.size) - start));
            }
            b = end;
        }
        out
    }

    /// Read `buf.len()` bytes at `offset` from the overlay's own file
    /// (meaningful only inside [`Overlay::present_ranges`]).
    pub fn read_own(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// A durable overlay's flush: the data file synced, then the map pages
    /// changed before it written and synced. Nothing for an unnamed one.
    fn persist(&self) -> io::Result<()> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let _one = d.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        // The bits as they are now: every block they say is present was
        // written completely before this point, so the sync below covers it.
        let mut pages = Vec::new();
        {
            let mut map = self.lock();
            let per = overlay_map::WORDS_PER_PAGE;
            for w in 0..map.dirty.len() {
                let mut bits = std::mem::take(&mut map.dirty[w]);
                while bits != 0 {
                    let p = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let lo = (p * per).min(map.present.len());
                    let hi = (lo + per).min(map.present.len());
                    pages.push((p, map.present[lo..hi].to_vec(), map.data[lo..hi].to_vec()));
                }
            }
        }
        let written = (|| {
            self.file.sync_data()?;
            if pages.is_empty() {
                return Ok(());
            }
            for (p, present, data) in &pages {
                overlay_map::write_page(&d.map, d.layout.present_off(), *p, present)?;
                overlay_map::write_page(&d.map, d.layout.data_off(), *p, data)?;
            }
            d.map.sync_data()
        })();
        if let Err(e) = written {
            let mut map = self.lock();
            for (p, _, _) in &pages {
                Map::set(&mut map.dirty, *p as u64);
            }
            log::warn!("overlay {}: flush failed: {e}", d.path.display());
            return Err(e);
        }
        Ok(())
    }

    /// Bytes counted against the cap: 4 KiB for every block that holds
    /// written data.
    pub fn bytes_used(&self) -> u64 {
        self.lock().used_blocks * OVERLAY_BLOCK
    }

    /// The cap given to [`Overlay::create`].
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// How many changes were refused with ENOSPC for the cap.
    pub fn full_events(&self) -> u64 {
        self.full_events.load(Ordering::Relaxed)
    }

    /// The base it reads through to.
    pub fn base(&self) -> &Arc<dyn Backend> {
        &self.base
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // Every critical section leaves the map consistent at each step.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The end of `offset..offset+len`, or EINVAL when it is not inside
    /// the disk.
    fn end_of(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// The byte range of block `b`.
    fn bounds(&self, b: u64) -> (u64, u64) {
        let start = b * OVERLAY_BLOCK;
        (start, (start + OVERLAY_BLOCK).min(self.size))
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.file.as_raw_fd(), PUNCH, offset, len)
    }

    /// Write absent block `b` whole: the base's bytes with the part of
    /// `offset..end` inside it replaced by `fill`.
    fn read_modify_write(&self, b: u64, offset: u64, end: u64, fill: Fill<'_>) -> io::Result<()> {
        let (start, stop) = self.bounds(b);
        let mut block = [0u8; BLOCK_LEN];
        let block = &mut block[..us(stop - start)];
        self.base.read_at(start, block)?;
        let (lo, hi) = (offset.max(start), end.min(stop));
        let dst = &mut block[us(lo - start)..us(hi - start)];
        match fill {
            Fill::Data(d) => dst.copy_from_slice(&d[us(lo - offset)..us(hi - offset)]),
            Fill::Zero => dst.fill(0),
        }
        self.file.write_all_at(block, start)
    }

    /// Log (once per episode) and count a change refused for the cap.
    fn refuse(&self, mut map: MutexGuard<'_, Map>, used: u64) -> io::Error {
        self.full_events.fetch_add(1, Ordering::Relaxed);
        let first = !map.full_logged;
        map.full_logged = true;
        drop(map);
        if first {
            log::warn!(
                "test-failover overlay full: {used} bytes of {} (over {}); writes get ENOSPC, reads keep working",
                self.limit.unwrap_or(0),
                self.base.describe(),
            );
        }
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    /// Put `fill` over `offset..end` (inside the disk).
    fn change(&self, offset: u64, end: u64, fill: Fill<'_>) -> io::Result<()> {
        if offset >= end {
            return Ok(());
        }
        let (first, last) = (offset / OVERLAY_BLOCK, (end - 1) / OVERLAY_BLOCK);
        let (from, to) = (first, last + 1);
        let partial = |b| {
            let (start, stop) = self.bounds(b);
            offset > start || end < stop
        };

        let mut map = self.lock();
        let mut absent = to - from - Map::count(&map.present, from, to);
        while absent > 0 && map.overlaps_reservation(from, to) {
            map = self
                .settled
                .wait(map)
                .unwrap_or_else(PoisonError::into_inner);
            absent = to - from - Map::count(&map.present, from, to);
        }
        let rmw_first = partial(first) && !map.present(first);
        let rmw_last = last != first && partial(last) && !map.present(last);
        match fill {
            Fill::Data(_) => {
                let new = to - from - Map::count(&map.data, from, to);
                if let Err(used) = map.allocate(new, self.limit) {
                    return Err(self.refuse(map, used));
                }
                for (w, m) in words(from, to) {
                    map.data[w] |= m;
                }
                map.touch(from, to);
            }
            Fill::Zero => {
                // Only the blocks read-modify-written get data; the others
                // become (or stay) holes.
                let new = u64::from(rmw_first) + u64::from(rmw_last);
                if let Err(used) = map.allocate(new, self.limit) {
                    return Err(self.refuse(map, used));
                }
                for b in [(rmw_first, first), (rmw_last, last)] {
                    if b.0 {
                        Map::set(&mut map.data, b.1);
                        map.touch(b.1, b.1 + 1);
                    }
                }
            }
        }
        let range = (absent > 0).then_some((from, to));
        if let Some(r) = range {
            map.reserved.push(r);
        }
        drop(map);
        let reservation = Reservation {
            overlay: self,
            range,
        };

        // The middle: what is not read-modify-written.
        let mut lo = offset;
        let mut hi = end;
        if rmw_first {
            self.read_modify_write(first, offset, end, fill)?;
            lo = self.bounds(first).1.min(end);
        }
        if rmw_last {
            self.read_modify_write(last, offset, end, fill)?;
            hi = self.bounds(last).0.max(lo);
        }
        if lo < hi {
            match fill {
                Fill::Data(d) => self
                    .file
                    .write_all_at(&d[us(lo - offset)..us(hi - offset)], lo)?,
                // Partial blocks here are present: punching zeroes exactly
                // the bytes of the range in them.
                Fill::Zero => self.punch(lo, hi - lo)?,
            }
        }
        reservation.commit();
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.durable.is_some() {
            if let Err(e) = self.persist() {
                log::warn!(
                    "overlay over {}: last flush failed: {e}",
                    self.base.describe()
                );
            }
        }
    }
}

impl Backend for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            trim: true,
            fast_zero: false,
            extents: false,
            multi_conn: true,
            inline_writes: true,
        }
    }

    fn describe(&self) -> String {
        format!("copy-on-write overlay of {}", self.base.describe())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = self.end_of(offset, buf.len() as u64)?;
        let to = end.div_ceil(OVERLAY_BLOCK);
        let mut pos = offset;
        while pos < end {
            let (present, run_end) = self.lock().run(pos / OVERLAY_BLOCK, to);
            let stop = (run_end * OVERLAY_BLOCK).min(end);
            let dst = &mut buf[us(pos - offset)..us(stop - offset)];
            if present {
                self.file.read_exact_at(dst, pos)?;
            } else {
                self.base.read_at(pos, dst)?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// `fua` flushes a durable overlay after the write (and is nothing
    /// for an unnamed one).
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let end = self.end_of(offset, data.len() as u64)?;
        self.change(offset, end, Fill::Data(data))?;
        if fua {
            self.persist()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.end_of(offset, len)?;
        self.change(offset, end, Fill::Zero)
    }

    /// Always punches holes (`may_trim` or not: the overlay is discarded
    /// anyway), and is always fast, so `fast_only` never refuses.
    fn zero(&self, offset: u64, len: u64, _may_trim: bool, _fast_only: bool) -> io::Result<()> {
        let end = self.end_of(offset, len)?;
        self.change(offset, end, Fill::Zero)
    }

    /// A durable overlay: every write completed before it survives a
    /// crash (data synced, then the map). An unnamed one: nothing (it is
    /// discarded when it drops).
    fn flush(&self) -> io::Result<()> {
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Barrier;

    const B: u64 = OVERLAY_BLOCK;

    /// The base: a pattern in memory that counts reads and fails the test
    /// on any change.
    struct MemDisk {
        data: Vec<u8>,
        reads: AtomicU64,
        changes: AtomicU64,
        /// Reads sleep this long (widens the window of races).
        delay: std::time::Duration,
        /// Reads fail with EIO.
        failing: std::sync::atomic::AtomicBool,
    }

    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 12) ^ 0x5a).to_le_bytes()[0]
    }

    impl MemDisk {
        fn new(size: u64) -> Arc<MemDisk> {
            MemDisk::slow(size, std::time::Duration::ZERO)
        }

        fn slow(size: u64, delay: std::time::Duration) -> Arc<MemDisk> {
            Arc::new(MemDisk {
                data: (0..size).map(pattern).collect(),
                reads: AtomicU64::new(0),
                changes: AtomicU64::new(0),
                delay,
                failing: Default::default(),
            })
        }

        fn changed(&self) -> ! {
            self.changes.fetch_add(1, Ordering::SeqCst);
            panic!("the overlay changed its base");
        }
    }

    impl Backend for MemDisk {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                read_only: true,
                trim: false,
                fast_zero: false,
                extents: false,
                multi_conn: true,
                inline_writes: false,
            }
        }
        fn describe(&self) -> String {
            "memory".into()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            let at = us(offset);
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
            self.changed()
        }
        fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            self.changed()
        }
        fn zero(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
            self.changed()
        }
        fn flush(&self) -> io::Result<()> {
            self.changed()
        }
    }

    fn overlay(size: u64, cap: Option<u64>) -> (Arc<MemDisk>, Overlay, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let base = MemDisk::new(size);
        let ov = Overlay::create(base.clone(), dir.path(), cap).unwrap();
        (base, ov, dir)
    }

    fn read(ov: &Overlay, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0xeeu8; us(len)];
        ov.read_at(offset, &mut buf).unwrap();
        buf
    }

    fn base_bytes(base: &MemDisk, offset: u64, len: u64) -> Vec<u8> {
        base.data[us(offset)..us(offset + len)].to_vec()
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn untouched_reads_equal_the_base() {
        let size = 16 * B + 1000;
        let (base, ov, _dir) = overlay(size, None);
        assert_eq!(ov.size(), size);
        assert_eq!(read(&ov, 0, size), base.data);
        assert_eq!(read(&ov, 4000, 5000), base_bytes(&base, 4000, 5000));
        assert_eq!(read(&ov, size - 7, 7), base_bytes(&base, size - 7, 7));
        assert_eq!(read(&ov, 5, 0), Vec::<u8>::new());
        assert_eq!(ov.bytes_used(), 0);
        assert!(ov.describe().contains("memory"));
        let caps = ov.caps();
        assert!(!caps.read_only && caps.trim && caps.multi_conn && caps.inline_writes);
        assert_eq!(ov.uring_fd(), None);
        ov.flush().unwrap();
    }

    #[test]
    fn durable_overlay_keeps_what_was_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3000 * B + 100; // more than one map page of words
        let base = MemDisk::new(size);
        let path = dir.path().join("ov.img");
        let ov = Overlay::create_durable(base.clone(), &path, None).unwrap();
        assert!(ov.is_durable());
        assert!(Overlay::create_durable(base.clone(), &path, None).is_err());
        ov.write_at(10, &[1u8; 5000], false).unwrap();
        ov.write_at(2900 * B, &[2u8; 4096], false).unwrap();
        ov.zero(40 * B, 3 * B, true, false).unwrap();
        ov.flush().unwrap();
        // A FUA write is durable by itself.
        ov.write_at(size - 100, &[4u8; 100], true).unwrap();
        // Written after the last flush, then the process dies (no drop:
        // no last flush): the map does not have it.
        ov.write_at(100 * B, &[3u8; 4096], false).unwrap();
        std::mem::forget(ov);
        let ov = Overlay::open_durable(base.clone(), &path, None).unwrap();
        let mut want = base_bytes(&base, 0, size);
        want[10..5010].fill(1);
        want[us(2900 * B)..us(2901 * B)].fill(2);
        want[us(40 * B)..us(43 * B)].fill(0);
        want[us(size - 100)..].fill(4);
        let got = read(&ov, 0, size);
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "differs from byte {first_bad:?}");
        assert_eq!(
            ov.present_ranges(),
            vec![
                (0, 2 * B),
                (40 * B, 3 * B),
                (2900 * B, B),
                (
                    size - 100 - (size - 100) % B,
                    size - (size - 100 - (size - 100) % B)
                )
            ]
        );
        // Blocks holding data: the two of the first write, one, and the
        // last (the zeroed ones are holes).
        assert_eq!(ov.bytes_used(), 4 * B);
        drop(ov);
        // A base of another size is refused.
        assert!(Overlay::open_durable(MemDisk::new(size + B), &path, None).is_err());
        let mut own = vec![0u8; 4096];
        let ov = Overlay::open_durable(base, &path, None).unwrap();
        ov.read_own(2900 * B, &mut own).unwrap();
        assert_eq!(own, vec![2u8; 4096]);
    }

    #[test]
    fn whole_and_partial_block_writes() {
        let (base, ov, _dir) = overlay(8 * B, None);
        ov.write_at(2 * B, &[7u8; BLOCK_LEN], false).unwrap();
        assert_eq!(ov.bytes_used(), B);
        // A whole block needs nothing from the base.
        base.reads.store(0, Ordering::SeqCst);
        ov.write_at(3 * B, &[8u8; BLOCK_LEN], true).unwrap();
        assert_eq!(base.reads.load(Ordering::SeqCst), 0);
        // A partial block is read from the base first.
        ov.write_at(5 * B + 10, &[9u8; 100], false).unwrap();
        assert_eq!(base.reads.load(Ordering::SeqCst), 1);
        assert_eq!(ov.bytes_used(), 3 * B);
        // Partial again into the now present block: no base read.
        ov.write_at(5 * B + 200, &[10u8; 50], false).unwrap();
        assert_eq!(base.reads.load(Ordering::SeqCst), 1);
        assert_eq!(ov.bytes_used(), 3 * B);

        let mut want = base.data.clone();
        want[us(2 * B)..us(3 * B)].fill(7);
        want[us(3 * B)..us(4 * B)].fill(8);
        want[us(5 * B + 10)..us(5 * B + 110)].fill(9);
        want[us(5 * B + 200)..us(5 * B + 250)].fill(10);
        assert_eq!(read(&ov, 0, 8 * B), want);
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn unaligned_writes_spanning_blocks() {
        let size = 10 * B + 123;
        let (base, ov, _dir) = overlay(size, None);
        let mut want = base.data.clone();
        let data: Vec<u8> = (0..9000u64).map(|i| pattern(i + 77)).collect();
        ov.write_at(4000, &data, false).unwrap();
        want[4000..13000].copy_from_slice(&data);
        // 4000..13000 touches blocks 0..=3.
        assert_eq!(ov.bytes_used(), 4 * B);
        // The disk's last, short block, in part and then to its end.
        ov.write_at(size - 100, &[1u8; 50], false).unwrap();
        want[us(size - 100)..us(size - 50)].fill(1);
        ov.write_at(10 * B, &[2u8; 123], false).unwrap();
        want[us(10 * B)..].fill(2);
        assert_eq!(ov.bytes_used(), 5 * B);
        assert_eq!(read(&ov, 0, size), want);
        for (off, len) in [(3999, 2), (4095, 9000), (12999, 5), (size - 124, 124)] {
            assert_eq!(read(&ov, off, len), want[us(off)..us(off + len)]);
        }
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reads_coalesce_runs() {
        let (base, ov, _dir) = overlay(10 * B, None);
        for b in [2, 3, 6] {
            ov.write_at(b * B, &[1u8; BLOCK_LEN], false).unwrap();
        }
        base.reads.store(0, Ordering::SeqCst);
        let got = read(&ov, 0, 10 * B);
        // Base runs 0..2, 4..6, 7..10.
        assert_eq!(base.reads.load(Ordering::SeqCst), 3);
        let mut want = base.data.clone();
        for b in [2, 3, 6] {
            want[us(b * B)..us((b + 1) * B)].fill(1);
        }
        assert_eq!(got, want);
        base.reads.store(0, Ordering::SeqCst);
        assert_eq!(
            read(&ov, 2 * B + 5, 2 * B - 10),
            want[us(2 * B + 5)..us(4 * B - 5)]
        );
        assert_eq!(base.reads.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn zero_and_trim() {
        let size = 300 * B;
        let (base, ov, _dir) = overlay(size, None);
        let mut want = base.data.clone();
        // Absent whole blocks: holes, nothing counted.
        ov.zero(0, 4 * B, false, true).unwrap();
        want[..us(4 * B)].fill(0);
        assert_eq!(ov.bytes_used(), 0);
        // Absent partial blocks: read-modify-write.
        ov.zero(10 * B + 100, 2 * B, true, false).unwrap();
        want[us(10 * B + 100)..us(12 * B + 100)].fill(0);
        assert_eq!(ov.bytes_used(), 2 * B);
        ov.trim(20 * B + 1, 10).unwrap();
        want[us(20 * B + 1)..us(20 * B + 11)].fill(0);
        assert_eq!(ov.bytes_used(), 3 * B);
        assert_eq!(read(&ov, 0, size), want);

        // Data written then trimmed: holes again in the file (the count
        // keeps it).
        let data = vec![3u8; us(256 * B)];
        ov.write_at(40 * B, &data, false).unwrap();
        ov.file.sync_data().unwrap();
        let allocated = ov.file.metadata().unwrap().blocks() * 512;
        assert!(allocated >= 256 * B, "{allocated}");
        ov.trim(40 * B, 256 * B).unwrap();
        want[us(40 * B)..us(296 * B)].fill(0);
        let after = ov.file.metadata().unwrap().blocks() * 512;
        assert!(after + 200 * B <= allocated, "{allocated} -> {after}");
        assert_eq!(ov.bytes_used(), 259 * B);
        // Partial zero inside present blocks, and a write into a hole.
        ov.write_at(41 * B + 7, &[4u8; 9], false).unwrap();
        want[us(41 * B + 7)..us(41 * B + 16)].fill(4);
        ov.zero(41 * B + 10, 2, false, false).unwrap();
        want[us(41 * B + 10)..us(41 * B + 12)].fill(0);
        ov.write_at(B + 3, &[5u8; 3], false).unwrap();
        want[us(B + 3)..us(B + 6)].fill(5);
        assert_eq!(ov.bytes_used(), 260 * B);
        assert_eq!(read(&ov, 0, size), want);
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn out_of_range_is_einval() {
        let (_base, ov, _dir) = overlay(4 * B, None);
        let mut buf = [0u8; 2];
        assert_eq!(errno(ov.read_at(4 * B - 1, &mut buf)), Some(libc::EINVAL));
        assert_eq!(errno(ov.write_at(4 * B, &[1], false)), Some(libc::EINVAL));
        assert_eq!(
            errno(ov.zero(u64::MAX, 2, false, false)),
            Some(libc::EINVAL)
        );
        assert_eq!(errno(ov.trim(1, u64::MAX)), Some(libc::EINVAL));
        ov.write_at(4 * B, &[], false).unwrap();
        assert_eq!(ov.bytes_used(), 0);
    }

    #[test]
    fn the_cap_refuses_allocation_whole() {
        let (base, ov, _dir) = overlay(16 * B, Some(3 * B));
        assert_eq!(ov.limit(), Some(3 * B));
        let mut want = base.data.clone();
        ov.write_at(0, &[1u8; 2 * BLOCK_LEN], false).unwrap();
        want[..us(2 * B)].fill(1);
        // Two new blocks, one allowed: refused, nothing written.
        let e = ov.write_at(4 * B, &[2u8; 2 * BLOCK_LEN], false);
        assert_eq!(errno(e), Some(libc::ENOSPC));
        // A present block and two new ones: the present one is untouched.
        let e = ov.write_at(B + 100, &[3u8; 2 * BLOCK_LEN], false);
        assert_eq!(errno(e), Some(libc::ENOSPC));
        assert_eq!(ov.full_events(), 2);
        assert_eq!(ov.bytes_used(), 2 * B);
        assert_eq!(read(&ov, 0, 16 * B), want);
        // Overwriting present blocks still works, and so does the last
        // block the cap allows.
        ov.write_at(10, &[4u8; 5000], false).unwrap();
        want[10..5010].fill(4);
        ov.write_at(9 * B + 1, &[5u8; 1], false).unwrap();
        want[us(9 * B + 1)] = 5;
        assert_eq!(ov.bytes_used(), 3 * B);
        assert_eq!(errno(ov.write_at(12 * B, &[6], false)), Some(libc::ENOSPC));
        // Zeroing absent whole blocks costs nothing; in part it does.
        ov.zero(12 * B, 2 * B, false, false).unwrap();
        want[us(12 * B)..us(14 * B)].fill(0);
        assert_eq!(errno(ov.trim(15 * B + 1, 1)), Some(libc::ENOSPC));
        assert_eq!(ov.full_events(), 4);
        assert_eq!(ov.bytes_used(), 3 * B);
        assert_eq!(read(&ov, 0, 16 * B), want);
        assert!(ov.lock().full_logged);
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_change_is_rolled_back() {
        let (base, ov, _dir) = overlay(8 * B, Some(6 * B));
        let mut want = base.data.clone();
        ov.write_at(0, &[1u8; BLOCK_LEN], false).unwrap();
        want[..BLOCK_LEN].fill(1);
        base.failing.store(true, Ordering::SeqCst);
        // The base read of the read-modify-write fails: the blocks stay
        // absent and their count is given back.
        let e = ov.write_at(2 * B + 1, &[2u8; 3 * BLOCK_LEN], false);
        assert_eq!(errno(e), Some(libc::EIO));
        assert_eq!(errno(ov.zero(6 * B + 1, 10, false, false)), Some(libc::EIO));
        assert_eq!(ov.bytes_used(), B);
        assert!(ov.lock().reserved.is_empty());
        // What needs no base read still works.
        ov.write_at(7 * B, &[3u8; BLOCK_LEN], false).unwrap();
        want[us(7 * B)..].fill(3);
        ov.zero(4 * B, B, false, false).unwrap();
        want[us(4 * B)..us(5 * B)].fill(0);
        base.failing.store(false, Ordering::SeqCst);
        assert_eq!(read(&ov, 0, 8 * B), want);
        ov.write_at(2 * B + 1, &[2u8; 3 * BLOCK_LEN], false)
            .unwrap();
        want[us(2 * B + 1)..us(5 * B + 1)].fill(2);
        assert_eq!(ov.bytes_used(), 6 * B);
        assert_eq!(read(&ov, 0, 8 * B), want);
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn concurrent_partial_writes_into_new_blocks_all_land() {
        const THREADS: u64 = 8;
        const BLOCKS: u64 = 128;
        let size = (BLOCKS + 1) * B;
        let dir = tempfile::tempdir().unwrap();
        let base = MemDisk::slow(size, std::time::Duration::from_micros(20));
        let ov = Overlay::create(base.clone(), dir.path(), None).unwrap();
        // Thread t writes 400 bytes at t*512+300 of each block (thread 7's
        // runs into the next block), and a zeroing thread 90 bytes at 200:
        // the same blocks, never the same bytes, gaps keep the base.
        let slice = |t: u64, b: u64| (b * B + t * 512 + 300, 400u64);
        let value = |t: u64, b: u64| pattern(t * 1000 + b) | 1;
        let mut want = base.data.clone();
        for b in 0..BLOCKS {
            for t in 0..THREADS {
                let (off, len) = slice(t, b);
                want[us(off)..us(off + len)].fill(value(t, b));
            }
            want[us(b * B + 200)..us(b * B + 290)].fill(0);
        }
        let barrier = Barrier::new(us(THREADS) + 2);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (ov, barrier) = (&ov, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..BLOCKS {
                        // Different orders meet in different blocks.
                        let b = if t % 2 == 0 { i } else { BLOCKS - 1 - i };
                        let (off, len) = slice(t, b);
                        ov.write_at(off, &vec![value(t, b); us(len)], false)
                            .unwrap();
                    }
                });
            }
            let (ov, barrier) = (&ov, &barrier);
            s.spawn(move || {
                barrier.wait();
                for b in 0..BLOCKS {
                    ov.zero(b * B + 200, 90, false, false).unwrap();
                }
            });
            // A reader: every byte it sees is the base's or the final one.
            let (base, want) = (&base, &want);
            s.spawn(move || {
                barrier.wait();
                for _ in 0..8 {
                    let got = read(ov, 0, size);
                    for (i, &g) in got.iter().enumerate() {
                        assert!(g == base.data[i] || g == want[i], "byte {i}: {g}");
                    }
                }
            });
        });
        assert_eq!(read(&ov, 0, size), want);
        assert_eq!(ov.bytes_used(), (BLOCKS + 1) * B);
        assert!(ov.lock().reserved.is_empty());
        assert_eq!(base.changes.load(Ordering::SeqCst), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { at: u64, len: u64, seed: u8 },
        Zero { at: u64, len: u64, may_trim: bool },
        Trim { at: u64, len: u64 },
        Read { at: u64, len: u64 },
    }

    const MODEL_SIZE: u64 = 12 * B + 321;

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..MODEL_SIZE, 0..3 * B + 200).prop_map(|(at, len)| (at, len.min(MODEL_SIZE - at)))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (range(), any::<u8>()).prop_map(|((at, len), seed)| Op::Write { at, len, seed }),
            (range(), any::<bool>()).prop_map(|((at, len), may_trim)| Op::Zero {
                at,
                len,
                may_trim
            }),
            range().prop_map(|(at, len)| Op::Trim { at, len }),
            range().prop_map(|(at, len)| Op::Read { at, len }),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_model(
            ops in proptest::collection::vec(op(), 1..40),
            cap in proptest::option::of(0..14u64),
        ) {
            let (base, ov, _dir) = overlay(MODEL_SIZE, cap.map(|c| c * B));
            let blocks = us(MODEL_SIZE.div_ceil(B));
            let mut model = base.data.clone();
            let mut present = vec![false; blocks];
            let mut data = vec![false; blocks];
            for op in ops {
                let (at, len) = match op {
                    Op::Write { at, len, .. } | Op::Zero { at, len, .. }
                    | Op::Trim { at, len } | Op::Read { at, len } => (at, len),
                };
                let (lo, hi) = (us(at), us(at + len));
                let blocks = if len == 0 { 0..0 } else { us(at / B)..us((at + len - 1) / B + 1) };
                let partial = |b: usize| {
                    let start = b as u64 * B;
                    at > start || at + len < (start + B).min(MODEL_SIZE)
                };
                if let Op::Read { .. } = op {
                    prop_assert_eq!(read(&ov, at, len), &model[lo..hi]);
                    continue;
                }
                // What the model expects the change to add to the count.
                let new: Vec<usize> = match op {
                    Op::Write { .. } => blocks.clone().filter(|&b| !data[b]).collect(),
                    _ => blocks.clone().filter(|&b| partial(b) && !present[b]).collect(),
                };
                let used = data.iter().filter(|&&d| d).count() + new.len();
                let fits = cap.is_none_or(|c| used as u64 <= c);
                let r = match op {
                    Op::Write { seed, .. } => {
                        let bytes: Vec<u8> =
                            (0..len).map(|i| pattern(i + u64::from(seed) * 4099)).collect();
                        let r = ov.write_at(at, &bytes, seed % 2 == 0);
                        if r.is_ok() {
                            model[lo..hi].copy_from_slice(&bytes);
                        }
                        r
                    }
                    Op::Zero { may_trim, .. } => {
                        let r = ov.zero(at, len, may_trim, true);
                        if r.is_ok() {
                            model[lo..hi].fill(0);
                        }
                        r
                    }
                    Op::Trim { .. } => {
                        let r = ov.trim(at, len);
                        if r.is_ok() {
                            model[lo..hi].fill(0);
                        }
                        r
                    }
                    Op::Read { .. } => unreachable!(),
                };
                if fits {
                    prop_assert!(r.is_ok(), "{:?}", r);
                    for b in blocks {
                        present[b] = true;
                    }
                    for b in new {
                        data[b] = true;
                    }
                } else {
                    prop_assert_eq!(errno(r), Some(libc::ENOSPC));
                }
                let counted = data.iter().filter(|&&d| d).count() as u64;
                prop_assert_eq!(ov.bytes_used(), counted * B);
                prop_assert_eq!(read(&ov, 0, MODEL_SIZE), &model[..]);
            }
            prop_assert_eq!(base.changes.load(Ordering::SeqCst), 0);
        }
    }
}
