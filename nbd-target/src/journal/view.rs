//! A disk as it was at a point: a read-only `blockdev::Backend` over the
//! replica (which holds the latest state) and the journal.
//!
//! For each block changed after the point, the view reads the oldest
//! before-image kept after the point; every other block is read from the
//! replica. The map (disk range → before-image) is built when the view
//! opens from the index files alone, in one pass over the entries after
//! the point, oldest first, the first entry for a range winning; it is
//! extended as replication goes on (the daemon keeps applying while a
//! view is open: a block first changed after the view opened gets its
//! before-image appended to the journal before the replica changes).
//!
//! A read takes the replica's bytes first and only then looks at the
//! journal's tail: the daemon makes a before-image visible (written to
//! the index file) before it writes the replica, so if the replica's
//! bytes are already newer than the point, the entry that undoes them is
//! there by the time the read looks.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockdev::{Backend, Caps};

use super::format::{Entry, Kind, ENTRY_LEN, HEADER_LEN};
use super::lease::Lease;
use super::segment::{self, Segment};
use super::Pos;
use crate::error::{Error, Result};

/// What a read-only export of a replica offers (the latest state, and
/// every point): reads from any number of connections, nothing else.
pub const READ_ONLY: Caps = Caps {
    read_only: true,
    trim: false,
    fast_zero: false,
    extents: false,
    multi_conn: true,
    inline_writes: false,
};

/// One mapped range: read from a segment's payloads, or zeroes.
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: u64,
    /// Index into `Map::segs`.
    seg: usize,
    /// Payload position of the range's first byte; None: zeroes.
    src: Option<u64>,
}

#[derive(Debug)]
struct Map {
    dir: PathBuf,
    segs: Vec<Segment>,
    /// The newest segment's entries read so far.
    tail_next: u64,
    pieces: BTreeMap<u64, Piece>,
    entries: u64,
    scratch: Vec<Entry>,
    /// The index file of the segment after the newest one read (checked
    /// for at every read that maps nothing new).
    next_idx: PathBuf,
}

/// The disk at one point.
pub struct PointView {
    replica: Box<dyn Backend>,
    size: u64,
    point: Pos,
    map: Mutex<Map>,
    _lease: Lease,
}

impl std::fmt::Debug for PointView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointView")
            .field("point", &self.point)
            .field("size", &self.size)
            .finish()
    }
}

impl PointView {
    /// Open the view of `point` over `replica` (the disk's `size` bytes)
    /// with the journal in `dir`, holding a lease for `what`.
    pub fn open(
        dir: &Path,
        replica: Box<dyn Backend>,
        size: u64,
        point: Pos,
        what: &str,
    ) -> Result<PointView> {
        // The lease first: once it is there, pruning keeps what the point
        // needs; the segment files opened below stay readable anyway.
        let lease = Lease::take(dir, point, what)?;
        let mut map = Map {
            dir: dir.to_path_buf(),
            segs: Vec::new(),
            tail_next: 0,
            pieces: BTreeMap::new(),
            entries: 0,
            scratch: Vec::new(),
            next_idx: PathBuf::new(),
        };
        let list = segment::list(dir)?;
        let mut opened = Vec::new();
        for &n in &list {
            if let Some(s) = Segment::open(dir, n)? {
                opened.push(s);
            }
        }
        // Pruning removes the oldest segments first, but one may vanish
        // between the listing and its opening: keep only the unbroken run
        // of segments that ends at the newest.
        let mut start = opened.len().saturating_sub(1);
        while start > 0 && opened[start - 1].n + 1 == opened[start].n {
            start -= 1;
        }
        let mut opened = opened.split_off(start);
        let Some(first) = opened.first() else {
            return Err(Error::Invalid(format!("{}: no journal", dir.display())));
        };
        if first.header.base > point {
            return Err(Error::Invalid(format!(
                "point {point} is older than the oldest kept ({})",
                first.header.base
            )));
        }
        // Segment k holds nothing after the base of segment k+1.
        let skip = opened
            .windows(2)
            .take_while(|w| w[1].header.base <= point)
            .count();
        map.segs = opened.split_off(skip);
        let last = map.segs.len() - 1;
        map.next_idx = segment::idx_path(dir, map.segs[last].n + 1);
        for i in 0..=last {
            let n = map.read_from(i, 0, point)?;
            if i == last {
                map.tail_next = n;
            }
        }
        Ok(PointView {
            replica,
            size,
            point,
            map: Mutex::new(map),
            _lease: lease,
        })
    }

    /// The point.
    pub fn point(&self) -> Pos {
        self.point
    }

    /// The byte ranges `(offset, len)` where the disk at this point
    /// differs from the replica as the journal says (changed since the
    /// point), in order, adjacent ranges merged: what a rollback of the
    /// replica in place to the point must rewrite.
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        let m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, p) in &m.pieces {
            let end = p.end.min(self.size);
            if s >= end {
                continue;
            }
            match out.last_mut() {
                Some((o, l)) if *o + *l == s => *l += end - s,
                _ => out.push((s, end - s)),
            }
        }
        out
    }

    /// Disk ranges this view reads from the journal, and the entries
    /// behind them.
    pub fn mapped(&self) -> (u64, u64) {
        let m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (m.pieces.values().count() as u64, m.entries)
    }
}

impl Map {
    /// Map the entries of segment `i` from entry `from`; the entry number
    /// after the last read.
    fn read_from(&mut self, i: usize, from: u64, point: Pos) -> Result<u64> {
        let mut es = std::mem::take(&mut self.scratch);
        es.clear();
        let next = self.segs[i].read_entries(from, &mut es, false)?;
        for e in &es {
            if e.is_undo() && e.pos > point {
                self.entries += 1;
                self.insert(e, i);
            }
        }
        self.scratch = es;
        Ok(next)
    }

    /// Map the uncovered parts of `e`'s range to it.
    fn insert(&mut self, e: &Entry, seg: usize) {
        let (a, b) = (e.offset, e.end());
        let src_of = |s: u64| (e.kind == Kind::Undo).then(|| e.dat_pos + (s - e.offset));
        let mut cursor = a;
        if let Some((_, p)) = self.pieces.range(..=a).next_back() {
            cursor = cursor.max(p.end);
        }
        let mut add = Vec::new();
        for (&s, p) in self.pieces.range(a..b) {
            if s > cursor {
                add.push((cursor, s));
            }
            cursor = cursor.max(p.end);
        }
        if cursor < b {
            add.push((cursor, b));
        }
        for (s, t) in add {
            self.pieces.insert(
                s,
                Piece {
                    end: t,
                    seg,
                    src: src_of(s),
                },
            );
        }
    }

    /// Every byte of `a..b` is mapped.
    fn covers(&self, a: u64, b: u64) -> bool {
        let mut at = a;
        if let Some((_, p)) = self.pieces.range(..=a).next_back() {
            at = at.max(p.end);
        }
        for (&s, p) in self.pieces.range(a..b) {
            if at >= b {
                break;
            }
            if s > at {
                return false;
            }
            at = at.max(p.end);
        }
        at >= b
    }

    /// Take in what the daemon appended since the last look.
    fn tail(&mut self, point: Pos) -> Result<()> {
        loop {
            let i = self.segs.len() - 1;
            // Only when the index grew is it read (an fstat otherwise).
            let have = HEADER_LEN as u64 + self.tail_next * ENTRY_LEN as u64;
            let len = self.segs[i]
                .idx
                .metadata()
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if len >= have + ENTRY_LEN as u64 {
                self.tail_next = self.read_from(i, self.tail_next, point)?;
            }
            let n = self.segs[i].n + 1;
            if !self.next_idx.exists() {
                return Ok(());
            }
            let Some(s) = Segment::open(&self.dir, n)? else {
                return Ok(());
            };
            // The old segment is complete once the next exists: read its
            // last entries, then go on in the new one.
            self.tail_next = self.read_from(i, self.tail_next, point)?;
            self.segs.push(s);
            self.tail_next = 0;
            self.next_idx = segment::idx_path(&self.dir, n + 1);
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl Backend for PointView {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        READ_ONLY
    }

    fn describe(&self) -> String {
        format!("{} at point {}", self.replica.describe(), self.point)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(einval)?;
        // A range the map covers whole already is read from the journal
        // only (pieces never shrink while the view lives). Otherwise the
        // replica first, the journal's tail after (see the module doc).
        let covered = {
            let m = self
                .map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            m.covers(offset, end)
        };
        if !covered {
            self.replica.read_at(offset, buf)?;
        }
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !covered {
            m.tail(self.point)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        let before = m
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(_, p)| p.end > offset)
            .map(|(&s, p)| (s, *p));
        let m = &*m;
        for (s, p) in before
            .into_iter()
            .chain(m.pieces.range(offset..end).map(|(&s, p)| (s, *p)))
        {
            let a = s.max(offset);
            let b = p.end.min(end);
            if a >= b {
                continue;
            }
            let dst = &mut buf[usize::try_from(a - offset).map_err(|_| einval())?..]
                [..usize::try_from(b - a).map_err(|_| einval())?];
            match p.src {
                None => dst.fill(0),
                Some(src) => m.segs[p.seg].read_payload(src + (a - s), dst)?,
            }
        }
        Ok(())
    }

    fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(eperm())
    }

    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(eperm())
    }

    fn zero(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(eperm())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn read_source(&self, offset: u64, len: u32) -> Option<(std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        // A range inside one before-image: those bytes never change, and
        // the segment's file stays open while the view lives.
        let end = offset.checked_add(u64::from(len))?;
        let m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (&s, p) = m.pieces.range(..=offset).next_back()?;
        if p.end < end {
            return None;
        }
        let src = p.src?;
        Some((m.segs[p.seg].dat.as_raw_fd(), src + (offset - s)))
    }
}
