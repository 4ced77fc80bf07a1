//! Writes around the page cache: a disk file opened a second time with
//! `O_DIRECT`, and a page-aligned staging buffer.
//!
//! Why: a write through the page cache copies the data into page-cache
//! pages, and on a virtual machine whose free memory goes back to the host
//! (a balloon, free page reporting) every *new* page-cache page costs a
//! fault in the host as well: here, 450 MB/s into a new file against 1.6
//! GB/s rewriting cached pages and 1.9 GB/s of direct writes. The recovery
//! site writes a replica in large extents and reads them rarely: there
//! the page cache only costs. Writes of at least [`MIN_DIRECT`] whose
//! offset and length are multiples of [`ALIGN`] go direct (copied into the
//! staging buffer first unless their memory is aligned already); any
//! other write, and every write once the file system refused a direct one,
//! goes through the page cache as before. The kernel keeps the two
//! coherent (a direct write writes back and drops cached pages of its
//! range); `fdatasync` on either descriptor covers both, since it syncs the
//! inode, and it still flushes the device's volatile cache when the direct
//! writes left no dirty page behind (the target's commit is that
//! `fdatasync`; `tests/points.rs` checks no replica page is left only in
//! memory after an acknowledged commit, large direct writes included).
//!
//! Not for the protected disk under the splitter: its readers expect the
//! page cache there (and ublk opens its own direct descriptor, [`open`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Alignment of direct writes: offset, length and memory.
pub const ALIGN: usize = 4096;
/// Smallest write sent direct. Smaller ones go through the page cache:
/// there the kernel merges them into large device writes and keeps them
/// for the next read of the same blocks (the journal reads each block's
/// before-image), where one direct write per record costs one device
/// request (a VM exit on virtio) for every 4 KiB.
pub const MIN_DIRECT: usize = 128 << 10;
/// Bytes staged and written per call.
const STAGE: usize = 4 << 20;

/// `path` opened again with `O_DIRECT`, if a 512-byte aligned direct read
/// of its first sector works (else why not).
pub fn open(path: &Path, read_only: bool) -> Result<File, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("opening it with O_DIRECT: {e}"))?;
    let mut probe = memmap2::MmapMut::map_anon(ALIGN)
        .map_err(|e| format!("a buffer for a direct read: {e}"))?;
    f.read_at(&mut probe[..512], 0)
        .map_err(|e| format!("a 512-byte direct read: {e}"))?;
    Ok(f)
}

/// A direct descriptor and its staging buffer.
pub struct DirectWriter {
    file: File,
    stage: Mutex<memmap2::MmapMut>,
    refused: AtomicBool,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("refused", &self.refused.load(Ordering::Relaxed))
            .finish()
    }
}

fn aligned(x: usize) -> bool {
    x.is_multiple_of(ALIGN)
}

impl DirectWriter {
    /// Open `path` for direct writes (see [`open`]).
    pub fn open(path: &Path) -> Result<DirectWriter, String> {
        let file = open(path, false)?;
        let stage = memmap2::MmapMut::map_anon(STAGE)
            .map_err(|e| format!("a {STAGE}-byte staging buffer: {e}"))?;
        Ok(DirectWriter {
            file,
            stage: Mutex::new(stage),
            refused: AtomicBool::new(false),
        })
    }

    /// Write `data` at `offset` around the page cache (with `RWF_DSYNC`
    /// for `fua`). `Ok(false)`: not done, write it buffered (not aligned,
    /// or the file system refuses direct writes).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<bool> {
        let Ok(off) = usize::try_from(offset) else {
            return Ok(false);
        };
        if self.refused.load(Ordering::Relaxed)
            || data.len() < MIN_DIRECT
            || !aligned(off)
            || !aligned(data.len())
        {
            return Ok(false);
        }
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let r = if aligned(data.as_ptr() as usize) {
            write_all(self.file.as_raw_fd(), data, offset, flags)
        } else {
            // A poisoned lock only means a panic elsewhere mid-copy: the
            // buffer holds no state beyond the call that fills it.
            let mut stage = self
                .stage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut done = 0;
            let mut r = Ok(true);
            while done < data.len() && matches!(r, Ok(true)) {
                let n = (data.len() - done).min(STAGE);
                stage[..n].copy_from_slice(&data[done..done + n]);
                r = write_all(
                    self.file.as_raw_fd(),
                    &stage[..n],
                    offset + done as u64,
                    flags,
                );
                done += n;
            }
            r
        };
        match r {
            Ok(whole) => Ok(whole),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Opened O_DIRECT, but the file system will not take these.
                if !self.refused.swap(true, Ordering::Relaxed) {
                    log::info!("direct writes refused ({e}); writing through the page cache");
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Write all of `buf`; false when a short write left the rest unaligned
/// (the caller then writes the whole extent through the page cache, which
/// is safe: writing the same bytes again).
fn write_all(
    fd: std::os::fd::RawFd,
    buf: &[u8],
    offset: u64,
    flags: libc::c_int,
) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        if !aligned(done) {
            return Ok(false);
        }
        let n = crate::file::pwritev2(fd, &buf[done..], offset + done as u64, flags)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_writes_go_direct_others_are_left_to_the_caller() {
        // /var/tmp: usually a disk file system (tmpfs refuses O_DIRECT).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("disk");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
        let Ok(w) = DirectWriter::open(&p) else {
            return; // no direct I/O here: nothing to test
        };
        let n = MIN_DIRECT;
        let data: Vec<u8> = (0..n).map(|i| u8::try_from(i % 253).unwrap_or(0)).collect();
        let ok = |r: io::Result<bool>| r.unwrap_or_else(|e| panic!("{e}"));
        // Unaligned memory (offset 1 in the vector): staged.
        let mut v = vec![0u8; n + 1];
        v[1..].copy_from_slice(&data);
        assert!(ok(w.write(4096, &v[1..], false)));
        assert!(ok(w.write(2 * n as u64, &data, true)));
        // Unaligned, or small: the caller writes it.
        assert!(!ok(w.write(100, &data, false)));
        assert!(!ok(w.write(4096, &data[..4096], false)));
        let back = std::fs::read(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&back[4096..4096 + n], &data[..]);
        assert_eq!(&back[2 * n..3 * n], &data[..]);
        assert!(back[..4096].iter().all(|&b| b == 0));
    }
}
