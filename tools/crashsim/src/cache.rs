//! Which pages of a file are dirty or under writeback in the page cache.
//!
//! The file is mapped shared and read-only in this process and every page is
//! touched (read), so each one is in the page cache and mapped: a read fault
//! neither dirties a page nor cleans it, and a page that was not cached is read
//! from the device, clean. `/proc/self/pagemap` then gives each page's frame
//! number and `/proc/kpageflags` that frame's flags (see the kernel's
//! Documentation/admin-guide/mm/pagemap.rst).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};

use crate::{io_err, sys, Error, PAGE};

/// pagemap entry: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap entry: page frame number, bits 0-54.
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_DIRTY: u64 = 1 << 4;
const KPF_WRITEBACK: u64 = 1 << 8;
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
/// Largest folio we look back across for a tail page's head (a PMD: 2 MiB).
const MAX_FOLIO_PAGES: u64 = 512;
/// Pages examined per round (touch, pagemap, kpageflags).
const CHUNK: u64 = 4096;
/// Rounds of re-touching pages that got unmapped before we read pagemap.
const ROUNDS: usize = 4;

const PAGEMAP: &str = "/proc/self/pagemap";
const KPAGEFLAGS: &str = "/proc/kpageflags";

/// The pages of a file that are not yet durable, by page-cache state. Page
/// indices are in [`PAGE`] units from the start of the file, ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheState {
    /// Pages whose folio is dirty (PG_dirty): changed, not yet written back.
    pub dirty: Vec<u64>,
    /// Pages whose folio is under writeback (PG_writeback): submitted to the
    /// device but not completed, so not durable either. A page can be in
    /// both lists (redirtied while its writeback runs).
    pub writeback: Vec<u64>,
    /// How many pages the file has (its size rounded up to [`PAGE`]).
    pub pages: u64,
}

impl CacheState {
    /// Dirty or under writeback: every page a power cut now could lose.
    pub fn not_durable(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.dirty.iter().chain(&self.writeback).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The page-cache state of every page of the file at `path`. Needs root.
/// See the crate documentation for the caveats (background writeback, folio
/// granularity).
pub fn cache_state(path: &Path) -> Result<CacheState, Error> {
    let ps = sys::page_size();
    if ps != PAGE {
        return Err(Error::PageSize(ps));
    }
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let size = file.metadata().map_err(io_err(path, "stat"))?.len();
    let pages = size.div_ceil(PAGE);
    let mut state = CacheState {
        pages,
        ..CacheState::default()
    };
    if pages == 0 {
        return Ok(state);
    }
    let len = usize::try_from(size).map_err(|_| Error::Unsupported {
        path: path.to_path_buf(),
        why: "file too large to map".into(),
    })?;
    let map = MmapOptions::new()
        .len(len)
        .map_raw_read_only(&file)
        .map_err(io_err(path, "mmap"))?;
    let pagemap_path = Path::new(PAGEMAP);
    let pagemap = File::open(pagemap_path).map_err(io_err(pagemap_path, "open"))?;
    let kflags_path = Path::new(KPAGEFLAGS);
    let kflags = File::open(kflags_path).map_err(io_err(kflags_path, "open"))?;
    // Virtual page number of the mapping's first page (mappings are page aligned).
    let base_vpn = map.as_ptr().addr() as u64 / PAGE;

    let mut start = 0;
    while start < pages {
        let n = CHUNK.min(pages - start);
        let entries = resident_entries(path, &map, &pagemap, base_vpn, start, n)?;
        let mut pfns = Vec::with_capacity(entries.len());
        for e in entries {
            let pfn = e & PM_PFN_MASK;
            if pfn == 0 {
                return Err(Error::PfnHidden);
            }
            pfns.push(pfn);
        }
        let flags = page_flags(&kflags, &pfns)?;
        for (i, f) in (start..).zip(flags) {
            if f & KPF_DIRTY != 0 {
                state.dirty.push(i);
            }
            if f & KPF_WRITEBACK != 0 {
                state.writeback.push(i);
            }
        }
        start += n;
    }
    Ok(state)
}

/// The pages of the file at `path` that are dirty or under writeback (see
/// [`cache_state`] and [`CacheState::not_durable`]). Needs root.
pub fn dirty_pages(path: &Path) -> Result<Vec<u64>, Error> {
    Ok(cache_state(path)?.not_durable())
}

/// [`dirty_pages`], restricted to the pages overlapping the byte ranges
/// `(offset, len)` of `ranges`.
pub fn dirty_pages_in(path: &Path, ranges: &[(u64, u64)]) -> Result<Vec<u64>, Error> {
    Ok(pages_overlapping(&dirty_pages(path)?, ranges))
}

/// The pages of `pages` (indices in [`PAGE`] units) that overlap any of the
/// byte ranges `(offset, len)` of `ranges`; empty ranges overlap nothing.
pub fn pages_overlapping(pages: &[u64], ranges: &[(u64, u64)]) -> Vec<u64> {
    pages
        .iter()
        .copied()
        .filter(|&p| {
            let (lo, hi) = (
                p.saturating_mul(PAGE),
                p.saturating_add(1).saturating_mul(PAGE),
            );
            ranges
                .iter()
                .any(|&(off, len)| len > 0 && off < hi && off.saturating_add(len) > lo)
        })
        .collect()
}

/// The pagemap entries of pages `start..start+n` of `map`, every one present:
/// touch each page, read its entry, and re-touch the ones reclaim unmapped in
/// between (a few rounds).
fn resident_entries(
    path: &Path,
    map: &MmapRaw,
    pagemap: &File,
    base_vpn: u64,
    start: u64,
    n: u64,
) -> Result<Vec<u64>, Error> {
    let count = usize::try_from(n).unwrap_or(usize::MAX);
    let mut entries = vec![0u64; count];
    let mut missing: Vec<u64> = (start..start + n).collect();
    for _ in 0..ROUNDS {
        for &p in &missing {
            // p < pages, so p * PAGE < size = map.len(), which fits usize.
            sys::touch(map, usize::try_from(p * PAGE).unwrap_or(usize::MAX));
        }
        read_u64s(
            pagemap,
            Path::new(PAGEMAP),
            (base_vpn + start) * 8,
            &mut entries,
        )?;
        missing = (start..)
            .zip(&entries)
            .filter(|(_, &e)| e & PM_PRESENT == 0)
            .map(|(p, _)| p)
            .collect();
        if missing.is_empty() {
            return Ok(entries);
        }
    }
    Err(Error::NotResident {
        path: path.to_path_buf(),
        page: missing[0],
    })
}

/// The kpageflags of each frame in `pfns`, read in runs of consecutive
/// frames. For a tail page of a large folio whose own entry shows neither
/// dirty nor writeback, the folio head's flags are used: kernels before
/// folio-based kpageflags kept those bits on the head page only.
fn page_flags(kflags: &File, pfns: &[u64]) -> Result<Vec<u64>, Error> {
    let mut out = Vec::with_capacity(pfns.len());
    let mut i = 0;
    while i < pfns.len() {
        let mut j = i + 1;
        while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
            j += 1;
        }
        let mut run = vec![0u64; j - i];
        read_u64s(kflags, Path::new(KPAGEFLAGS), pfns[i] * 8, &mut run)?;
        out.extend(run);
        i = j;
    }
    for (f, &pfn) in out.iter_mut().zip(pfns) {
        if *f & KPF_COMPOUND_TAIL != 0 && *f & (KPF_DIRTY | KPF_WRITEBACK) == 0 {
            if let Some(head) = head_flags(kflags, pfn)? {
                *f |= head & (KPF_DIRTY | KPF_WRITEBACK);
            }
        }
    }
    Ok(out)
}

/// The flags of the compound head before tail frame `pfn`, if one is found
/// within [`MAX_FOLIO_PAGES`].
fn head_flags(kflags: &File, pfn: u64) -> Result<Option<u64>, Error> {
    let first = pfn.saturating_sub(MAX_FOLIO_PAGES - 1);
    let mut run = vec![0u64; usize::try_from(pfn - first).unwrap_or(0)];
    read_u64s(kflags, Path::new(KPAGEFLAGS), first * 8, &mut run)?;
    Ok(run
        .iter()
        .rev()
        .copied()
        .find(|f| f & KPF_COMPOUND_HEAD != 0))
}

/// Fill `out` with native-endian u64s read from `file` at byte `at`.
fn read_u64s(file: &File, path: &Path, at: u64, out: &mut [u64]) -> Result<(), Error> {
    let mut bytes = vec![0u8; out.len() * 8];
    file.read_exact_at(&mut bytes, at)
        .map_err(io_err(path, "read"))?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *o = u64::from_ne_bytes(a);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_pages() {
        let pages = [0, 1, 2, 3, 7];
        assert_eq!(pages_overlapping(&pages, &[]), Vec::<u64>::new());
        assert_eq!(pages_overlapping(&pages, &[(0, 1)]), vec![0]);
        assert_eq!(pages_overlapping(&pages, &[(4095, 2)]), vec![0, 1]);
        assert_eq!(pages_overlapping(&pages, &[(4096, 4096)]), vec![1]);
        assert_eq!(pages_overlapping(&pages, &[(8192, 0)]), Vec::<u64>::new());
        assert_eq!(
            pages_overlapping(&pages, &[(3 * 4096 + 5, 1), (7 * 4096, 1 << 40)]),
            vec![3, 7]
        );
    }

    #[test]
    fn not_durable_is_sorted_union() {
        let s = CacheState {
            dirty: vec![1, 5],
            writeback: vec![0, 5, 9],
            pages: 10,
        };
        assert_eq!(s.not_durable(), vec![0, 1, 5, 9]);
    }
}
