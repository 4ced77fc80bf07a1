//! The disk-backend abstraction: what every front end, the capture engine
//! and the recovery site read and write through.
//!
//! A backend is shared by every connection of a disk (`&self` methods, its
//! own locking). Operations are synchronous; a backend that is a file or a
//! block device also hands out its descriptor ([`Backend::uring_fd`]), and
//! the NBD server then submits reads, writes, syncs and fallocates on it
//! with io_uring instead of calling the methods (the hot path). A filter
//! (copy-on-write overlay, point-in-time view) implements this trait over
//! another backend and has no descriptor, so the server calls it.

use std::io;
use std::os::fd::RawFd;

use nbd::reply::Extent;

/// What a backend can do natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Writes are refused.
    pub read_only: bool,
    /// `trim` deallocates (otherwise it does nothing and says so).
    pub trim: bool,
    /// `zero` is cheaper than writing zeroes.
    pub fast_zero: bool,
    /// `extents` knows holes (otherwise everything is data).
    pub extents: bool,
    /// One `flush` covers writes completed through any handle of the
    /// backend (what makes NBD multi-conn safe).
    pub multi_conn: bool,
    /// Small writes are cheaper through [`Backend::write_at`] on the
    /// calling thread than submitted to io_uring: buffered writes to a file
    /// system that cannot do them without blocking (ext4) are handed by
    /// io_uring to a worker thread, a thread hop per write.
    pub inline_writes: bool,
}

/// A disk: size, read, write, trim, zero, flush, extents.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What it can do natively.
    fn caps(&self) -> Caps;
    /// For logs and NBD export descriptions.
    fn describe(&self) -> String;
    /// Fill `buf` from `offset` (the range is inside the disk).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`; durable before returning when `fua`.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Discard `len` bytes at `offset` (they read as zeroes afterwards);
    /// `Unsupported` when the backend cannot, which changed nothing.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make `len` bytes at `offset` read as zeroes. `may_trim`: they may be
    /// deallocated; `fast_only`: fail with `Unsupported` rather than write
    /// zeroes.
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Describe `offset..offset+len` as at most `max` extents of data and
    /// holes (`nbd::protocol::STATE_*` flags). The default: all data.
    fn extents(&self, offset: u64, len: u32, max: usize, out: &mut Vec<Extent>) {
        let _ = (offset, max);
        out.clear();
        out.push(Extent {
            length: len,
            flags: 0,
        });
    }
    /// The descriptor to submit io_uring reads, writes, fsyncs and
    /// fallocates against, when the backend is a file or a block device.
    fn uring_fd(&self) -> Option<RawFd> {
        None
    }
    /// For a backend without [`Backend::uring_fd`]: a descriptor and file
    /// offset that `offset..offset+len` can be read from as they are (so
    /// the server reads it through io_uring, several at once, instead of
    /// calling [`Backend::read_at`] inline). The descriptor must stay open
    /// and those bytes unchanged while the backend lives. The default: none.
    fn read_source(&self, offset: u64, len: u32) -> Option<(RawFd, u64)> {
        let _ = (offset, len);
        None
    }
}

/// Zeroes for backends that write them.
pub(crate) static ZEROES: [u8; ZEROES_LEN] = [0u8; ZEROES_LEN];
/// Length of [`ZEROES`].
pub(crate) const ZEROES_LEN: usize = 1 << 20;

/// Write zeroes over `offset..offset+len` with `write`, 1 MiB at a time.
pub(crate) fn write_zeroes(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut at = 0u64;
    while at < len {
        // At most ZEROES_LEN.
        let n = usize::try_from(len - at)
            .unwrap_or(ZEROES_LEN)
            .min(ZEROES_LEN);
        write(offset + at, &ZEROES[..n])?;
        at += n as u64;
    }
    Ok(())
}
