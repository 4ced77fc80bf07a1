//! The shared mapping of a ring file, and the few system calls the ring
//! makes: the one module where the ring uses `unsafe`. Another process maps the same bytes, so nothing here hands out
//! `&[u8]` or `&mut [u8]` over the mapping: bytes are copied in and out with
//! raw pointers, and the cursors are atomics (`AtomicU64` is sound over
//! shared memory: it only ever accesses the bytes atomically).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};

/// A read-write shared mapping of a whole ring file.
#[derive(Debug)]
pub(crate) struct Shm {
    map: MmapRaw,
}

impl Shm {
    /// Map the first `len` bytes of `file` shared, read-write.
    pub(crate) fn map(file: &File, len: u64) -> io::Result<Shm> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let map = MmapOptions::new().len(len).map_raw(file)?;
        Ok(Shm { map })
    }

    /// Panics unless `off..off+n` is inside the mapping. Every caller derives
    /// offsets from a header validated against the file size at open, so a
    /// failure here is a bug in this crate, not bad input.
    fn check(&self, off: usize, n: usize) {
        let end = off.checked_add(n).expect("ring offset overflow (bug)");
        assert!(
            end <= self.map.len(),
            "ring access {off}+{n} past mapping of {} (bug)",
            self.map.len()
        );
    }

    /// The u64 atomic at `off` (8-byte aligned, inside the header).
    pub(crate) fn atomic(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert!(
            off.is_multiple_of(8),
            "unaligned ring atomic at {off} (bug)"
        );
        // SAFETY: the range is inside the mapping (checked) and 8-byte
        // aligned (the mapping is page aligned, `off` is a multiple of 8);
        // the mapping lives as long as `self`, which the returned reference
        // borrows. Every access to these bytes, in any process, is atomic.
        unsafe { &*(self.map.as_mut_ptr().add(off).cast::<AtomicU64>()) }
    }

    /// Copy `src` into the mapping at `off`.
    pub(crate) fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: the destination range is inside the mapping (checked) and
        // cannot overlap `src`, which is ordinary memory of this process.
        // The ring protocol gives the producer exclusive use of unpublished
        // bytes, so no other party reads them concurrently by design.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len());
        }
    }

    /// Copy bytes at `off` out of the mapping into `dst`.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: the source range is inside the mapping (checked); `dst` is
        // ordinary memory of this process and cannot overlap it. Bytes the
        // other side may be changing are only read into our copy, which is
        // validated (checksum) before use.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
    }

    /// Write back `off..off+len` to the file and wait (msync MS_SYNC).
    pub(crate) fn sync(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len);
        self.map.flush_range(off, len)
    }
}

/// Fill `buf` from the kernel's random source; false if it could not.
pub(crate) fn getrandom(buf: &mut [u8]) -> bool {
    // SAFETY: getrandom writes at most buf.len() bytes into the live buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).ok() == Some(buf.len())
}

/// fallocate(2) of `0..len` with `mode`.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate takes a descriptor the caller keeps open and no pointers.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take an exclusive open-file-description lock on byte `byte` of `file`
/// (held until the file is closed; works across processes and within one).
pub(crate) fn lock_byte(file: &File, byte: u64) -> io::Result<()> {
    // SAFETY: flock is plain data; all-zero is a valid value to fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // F_WRLCK (1) and SEEK_SET (0) are small constants that fit c_short.
    fl.l_type = libc::c_short::try_from(libc::F_WRLCK).unwrap_or(1);
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK reads the flock struct, which lives on our stack
    // for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// pwritev(2): write `bufs` at file offset `at`; returns the bytes written.
pub(crate) fn pwritev(file: &File, bufs: &[io::IoSlice<'_>], at: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let cnt = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: IoSlice is ABI-compatible with iovec; the slices and the
    // buffers they point at are live, unmodified borrows for the call.
    let n = unsafe { libc::pwritev(file.as_raw_fd(), bufs.as_ptr().cast(), cnt, off) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The file system type of `file` (`statfs.f_type`).
pub(crate) fn fs_magic(file: &File) -> io::Result<u64> {
    // SAFETY: statfs is plain data; all-zero is a valid value to fill in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into the live local it points at.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a small magic number; its C type differs by architecture.
    #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
    Ok(st.f_type as u64)
}

/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Extents asked for per FIEMAP call.
const FIEMAP_BATCH: usize = 64;
/// `FIEMAP_EXTENT_LAST`.
const FIEMAP_EXTENT_LAST: u32 = 0x1;

/// `struct fiemap` followed by room for FIEMAP_BATCH extents, as u64 words
/// (8-byte aligned): header 32 bytes, each extent 56 bytes.
const FIEMAP_WORDS: usize = (32 + 56 * FIEMAP_BATCH) / 8;

/// The union of the FIEMAP flags of every extent of `0..len` of `file`
/// (`FIEMAP_EXTENT_*`), without syncing it first.
pub(crate) fn fiemap_flags(file: &File, len: u64) -> io::Result<u32> {
    let mut all = 0u32;
    let mut start = 0u64;
    while start < len {
        let mut buf = [0u64; FIEMAP_WORDS];
        buf[0] = start; // fm_start
        buf[1] = len - start; // fm_length
                              // fm_flags = 0 (no sync), fm_mapped_extents = 0 (word 2);
                              // fm_extent_count (low half of word 3), fm_reserved = 0.
        buf[3] = FIEMAP_BATCH as u64;
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // fm_extent_count (FIEMAP_BATCH) extents after it, all inside `buf`,
        // which lives on our stack for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // fm_mapped_extents: the high half of word 2 (little endian).
        let mapped = usize::try_from(buf[2] >> 32).unwrap_or(0).min(FIEMAP_BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped {
            // Extent i starts at word 4 + 7 i: logical, physical, length,
            // two reserved, then fe_flags (low half of the next word).
            let w = 4 + 7 * i;
            let (logical, length) = (buf[w], buf[w + 2]);
            // The low 32 bits of the word hold fe_flags.
            let flags = u32::try_from(buf[w + 5] & 0xffff_ffff).unwrap_or(0);
            all |= flags;
            start = logical.saturating_add(length.max(1));
            last |= flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Ok(all)
}
