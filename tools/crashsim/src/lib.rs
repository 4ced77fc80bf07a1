//! Test support for the power-cut model: what of a file is still only in the
//! page cache, and what the device holds. Not used in production code.
//!
//! Two views of one file:
//!
//! * [`dirty_pages`] (and [`cache_state`], [`dirty_pages_in`]): the 4 KiB
//!   pages of the file whose page-cache copy is dirty or under writeback, that
//!   is, not yet durable. Read from `/proc/self/pagemap` and
//!   `/proc/kpageflags`, so it needs root (`CAP_SYS_ADMIN`).
//! * [`device_image`] (and [`device_image_to`]): the file's bytes as the block
//!   device holds them now, read past the page cache with `O_DIRECT` at the
//!   physical extents `FS_IOC_FIEMAP` reports: what a power cut would leave if
//!   nothing more were written back. Needs read access to the block device
//!   (root).
//!
//! # Caveats
//!
//! * **Background writeback.** The kernel writes dirty pages back on its own:
//!   once they are older than `vm.dirty_expire_centisecs` (30 s by default,
//!   checked every `vm.dirty_writeback_centisecs`, 5 s), and at any time when
//!   the system's dirty memory passes `vm.dirty_background_ratio`/`_bytes`
//!   (other processes' writes count). A test that needs a page to *stay*
//!   dirty must look right after writing it, and should tolerate (retry) the
//!   rare case where the flusher got there first.
//! * **Folio granularity.** The kernel tracks dirtiness per folio, which can
//!   span several pages (large folios: XFS, ext4 since Linux 6.16, ...). A
//!   4 KiB write into a large folio makes every page of that folio report
//!   dirty. The report is therefore a superset of the pages actually written;
//!   rewriting a whole folio back is harmless, the bytes are the same.
//! * **Only data is modelled, not metadata.** [`device_image`] reads the data
//!   blocks the file system's *in-memory* extent map points at, truncated to
//!   the *in-memory* inode size. Neither is necessarily durable: an extent
//!   allocated, or converted from unwritten, or a size extended since the last
//!   journal commit may be gone after a power cut. The model is exact for
//!   in-place overwrites of blocks that were allocated, written and committed
//!   before (a preallocated, once-synced file such as the ring), and
//!   approximate otherwise.
//! * **The device's own volatile cache** is not modelled: what `O_DIRECT`
//!   reads back is what was submitted to the device, which a drive with a
//!   volatile write cache might still lose without a flush (fsync sends one;
//!   writeback alone does not).
//! * **File systems.** It needs a file system on one block device that
//!   overwrites data in place and reports device offsets in FIEMAP (ext4,
//!   XFS). tmpfs, overlayfs, FUSE and network file systems have no block
//!   device ([`Error::NoBlockDevice`]); btrfs (copy-on-write, FIEMAP reports
//!   btrfs-logical addresses), compressed, encrypted or inline extents are
//!   refused ([`Error::Unsupported`]). Reflinked (shared) XFS extents are
//!   copied on write, so the metadata caveat above applies to them.
//! * A file truncated while [`cache_state`] runs makes it fault (SIGBUS), as
//!   any reader of a shared mapping would: use it on files you control.

mod cache;
mod device;
mod sys;

use std::io;
use std::path::{Path, PathBuf};

pub use cache::{cache_state, dirty_pages, dirty_pages_in, pages_overlapping, CacheState};
pub use device::{block_device, device_image, device_image_to, extents, Extent};

/// The page size the page indices are in (bytes). [`cache_state`] refuses to
/// run on a system whose page size differs.
pub const PAGE: u64 = 4096;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on a file failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file (the one examined, or /proc/..., or the block device).
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Permission denied: the caller is not root.
    #[error(
        "{path}: {what}: permission denied (crashsim needs root: /proc/kpageflags, \
         page frame numbers and the raw block device are root-only)"
    )]
    NotPermitted {
        /// The file we could not use.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
    },
    /// `/proc/self/pagemap` showed a resident page with frame number 0: the
    /// kernel hides frame numbers from callers without `CAP_SYS_ADMIN`.
    #[error(
        "/proc/self/pagemap hides page frame numbers (they read as 0): \
         dirty-page inspection needs CAP_SYS_ADMIN (run as root)"
    )]
    PfnHidden,
    /// A page of the file would not stay mapped long enough to inspect it
    /// (memory pressure evicting it as fast as it is touched).
    #[error("{path}: page {page} would not stay resident while inspected")]
    NotResident {
        /// The file.
        path: PathBuf,
        /// The page index.
        page: u64,
    },
    /// The file system is not on a block device (tmpfs, overlayfs, FUSE,
    /// network, or btrfs with its anonymous device numbers).
    #[error(
        "{path}: its file system (device {major}:{minor}) is not backed by a block device; \
         the power-cut model needs one (use a file under an ext4 or XFS mount, not tmpfs)"
    )]
    NoBlockDevice {
        /// The file.
        path: PathBuf,
        /// Major number of `st_dev`.
        major: u32,
        /// Minor number of `st_dev`.
        minor: u32,
    },
    /// The model does not apply to this file or file system.
    #[error("{path}: the power-cut model does not apply: {why}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The system page size is not [`PAGE`].
    #[error("page size is {0} bytes; crashsim assumes 4096")]
    PageSize(u64),
}

/// Map an I/O error on `path` to [`Error`], telling "not root" apart.
fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => Error::NotPermitted {
            path: path.to_path_buf(),
            what,
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            what,
            source,
        },
    }
}
