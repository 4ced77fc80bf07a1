//! The persistent dirty bitmap: one bit per `granularity` bytes of disk,
//! set when a change could not be recorded in the ring (overflow), cleared
//! only by a resync once the replica holds the region durably. It lives in
//! the ring file, after the data area, as little-endian u64 words updated
//! atomically, so any process that maps the ring sees the same bits.

use std::sync::atomic::Ordering;

use crate::file::RingFile;

/// A dirty extent: `len` bytes from `offset`, aligned to the granularity
/// (the last one is cut at the end of the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

fn word_offset(rf: &RingFile, word: u64) -> usize {
    // Words are inside the bitmap, which is inside the mapped file.
    usize::try_from(rf.layout.bitmap_offset + word * 8).unwrap_or(usize::MAX)
}

fn bit_range(rf: &RingFile, offset: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 || offset >= rf.layout.disk_size {
        return None;
    }
    let g = rf.layout.granularity;
    let end = offset.saturating_add(len).min(rf.layout.disk_size);
    Some((offset / g, (end - 1) / g))
}

/// Mark `offset..offset+len` dirty. Returns how many bits were newly set.
pub(crate) fn mark(rf: &RingFile, offset: u64, len: u64) -> u64 {
    let Some((first, last)) = bit_range(rf, offset, len) else {
        return 0;
    };
    // Counted before the bits are set: a resync that clears bits and then
    // sees the count unchanged knows no mark raced its clear.
    rf.shm
        .atomic(crate::format::live::DIRTY_MARKS)
        .fetch_add(1, Ordering::SeqCst);
    let mut newly = 0;
    let mut bit = first;
    while bit <= last {
        let word = bit / 64;
        let lo = bit % 64;
        let hi = (last - word * 64).min(63);
        let mask = if hi - lo == 63 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo + 1)) - 1) << lo
        };
        let old = rf
            .shm
            .atomic(word_offset(rf, word))
            .fetch_or(mask, Ordering::SeqCst);
        newly += u64::from((mask & !old).count_ones());
        bit = word * 64 + hi + 1;
    }
    newly
}

/// Clear `offset..offset+len` (whole granules only: a granule partly outside
/// the range stays dirty).
pub(crate) fn clear(rf: &RingFile, offset: u64, len: u64) {
    let g = rf.layout.granularity;
    let end = offset.saturating_add(len).min(rf.layout.disk_size);
    let first = offset.div_ceil(g);
    // A last granule cut by the end of the disk counts as whole.
    let last_excl = if end == rf.layout.disk_size {
        end.div_ceil(g)
    } else {
        end / g
    };
    for bit in first..last_excl {
        let mask = !(1u64 << (bit % 64));
        rf.shm
            .atomic(word_offset(rf, bit / 64))
            .fetch_and(mask, Ordering::SeqCst);
    }
}

/// The dirty extents, merged, in disk order.
pub(crate) fn extents(rf: &RingFile) -> Vec<Extent> {
    let g = rf.layout.granularity;
    let bits = rf.layout.disk_size.div_ceil(g);
    let mut out: Vec<Extent> = Vec::new();
    for word in 0..bits.div_ceil(64) {
        let w = rf.shm.atomic(word_offset(rf, word)).load(Ordering::Acquire);
        if w == 0 {
            continue;
        }
        for b in 0..64 {
            if w & (1 << b) == 0 {
                continue;
            }
            let bit = word * 64 + b;
            if bit >= bits {
                break;
            }
            let offset = bit * g;
            let len = g.min(rf.layout.disk_size - offset);
            match out.last_mut() {
                Some(last) if last.offset + last.len == offset => last.len += len,
                _ => out.push(Extent { offset, len }),
            }
        }
    }
    out
}

/// Dirty bytes (granules times granularity, the last cut at the disk's end).
pub(crate) fn dirty_bytes(rf: &RingFile) -> u64 {
    extents(rf).iter().map(|e| e.len).sum()
}
