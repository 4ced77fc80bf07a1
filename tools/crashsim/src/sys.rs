//! The few raw system calls and memory accesses crashsim makes: the one
//! module with `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use memmap2::MmapRaw;

/// The system page size in bytes.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers and only reads system configuration.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(0)
}

/// Read the byte at `off` of `map` so the page holding it is faulted in and
/// mapped. A read fault on a shared file mapping maps the page-cache page
/// itself and does not dirty it.
pub(crate) fn touch(map: &MmapRaw, off: usize) {
    assert!(
        off < map.len(),
        "touch {off} past mapping of {} (bug)",
        map.len()
    );
    // SAFETY: `off` is inside the live mapping (checked), which `map` keeps
    // mapped for the duration of the borrow. The read is volatile so it is not
    // optimised away, and through a raw pointer so no reference is formed to
    // bytes another process may be changing; a u8 has no alignment or
    // validity requirement. The caller maps no more than the file's size
    // rounded up to a page, so the byte lies in a page backed by the file.
    unsafe {
        std::ptr::read_volatile(map.as_ptr().add(off));
    }
}

/// `struct fiemap_extent` of `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FiemapExtent {
    pub(crate) fe_logical: u64,
    pub(crate) fe_physical: u64,
    pub(crate) fe_length: u64,
    fe_reserved64: [u64; 2],
    pub(crate) fe_flags: u32,
    fe_reserved: [u32; 3],
}

impl FiemapExtent {
    const ZERO: FiemapExtent = FiemapExtent {
        fe_logical: 0,
        fe_physical: 0,
        fe_length: 0,
        fe_reserved64: [0; 2],
        fe_flags: 0,
        fe_reserved: [0; 3],
    };
}

/// How many extents one FIEMAP call returns at most.
pub(crate) const FIEMAP_BATCH: usize = 128;
/// The same, as the kernel's `fm_extent_count` type.
const FIEMAP_BATCH_U32: u32 = 128;
const _: () = assert!(FIEMAP_BATCH_U32 as usize == FIEMAP_BATCH);

/// `struct fiemap` of `<linux/fiemap.h>` followed by room for
/// [`FIEMAP_BATCH`] extents (the kernel's flexible array member).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Fiemap {
    pub(crate) fm_start: u64,
    pub(crate) fm_length: u64,
    pub(crate) fm_flags: u32,
    pub(crate) fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    pub(crate) fm_extents: [FiemapExtent; FIEMAP_BATCH],
}

/// The header the kernel reads before the extent array.
const FIEMAP_HEADER: usize = 32;
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(Fiemap, fm_extents) == FIEMAP_HEADER);

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)` (0xC020660B).
const FS_IOC_FIEMAP: libc::Ioctl = nix::request_code_readwrite!(b'f', 11, FIEMAP_HEADER);

impl Fiemap {
    /// A request for the extents of `start..start+length`, with no flags (in
    /// particular not `FIEMAP_FLAG_SYNC`, which would write the file back).
    pub(crate) fn new(start: u64, length: u64) -> Box<Fiemap> {
        Box::new(Fiemap {
            fm_start: start,
            fm_length: length,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_BATCH_U32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::ZERO; FIEMAP_BATCH],
        })
    }

    /// The extents the last call filled in.
    pub(crate) fn mapped(&self) -> &[FiemapExtent] {
        let n = usize::try_from(self.fm_mapped_extents).unwrap_or(usize::MAX);
        &self.fm_extents[..n.min(FIEMAP_BATCH)]
    }
}

/// Run FS_IOC_FIEMAP on `file` with `req`.
pub(crate) fn fiemap(file: &File, req: &mut Fiemap) -> io::Result<()> {
    // SAFETY: `req` is a live, exclusively borrowed `struct fiemap` whose
    // `fm_extent_count` (set by `Fiemap::new` and never changed) matches the
    // extent array that follows the header, so the kernel writes only inside
    // it; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, std::ptr::from_mut(req)) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
