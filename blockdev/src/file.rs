//! A disk that is a regular file or a block device: its size, its lock,
//! its identity (the fingerprint the ring checks, computed here only), its
//! allocation map (SEEK_DATA / SEEK_HOLE: [`FileDisk::extents`],
//! [`FileDisk::data_from`]), and the [`Backend`] operations.
//! The NBD server submits on its descriptor with io_uring (the hot path);
//! the recovery site, `ring drain` and the shipper's resync and verify
//! reads call the methods.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nbd::protocol::{STATE_HOLE, STATE_ZERO};
use nbd::reply::Extent;

use crate::backend::{Backend, Caps};
use crate::error::{Error, Result};

/// What kind of thing the disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file (holes are reported and punched).
    File,
    /// A block device (size from BLKGETSIZE64).
    BlockDevice,
}

/// An open disk. One `FileDisk` is shared by every connection: they all write
/// through the same inode, so one fdatasync covers writes completed on any
/// of them (what makes `NBD_FLAG_CAN_MULTI_CONN` true).
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    size: u64,
    kind: DiskKind,
    read_only: bool,
    /// Aligned writes around the page cache ([`FileDisk::use_direct_writes`]).
    direct: Option<crate::direct::DirectWriter>,
}

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which
    // points at a live, aligned local for the duration of the call.
    let r = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn lock(fd: RawFd, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock takes a file descriptor the caller keeps open and no pointers.
    if unsafe { libc::flock(fd, op) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long opening a disk waits for its lock before it says the disk is
/// in use. A splitter killed a moment ago can still hold it: its io_uring
/// requests keep the file open until the kernel has finished them, after
/// the process itself is gone (a restart right after a crash).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// [`lock`], retried every 20 ms while another holder has it, for `wait`.
fn lock_within(fd: RawFd, exclusive: bool, wait: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match lock(fd, exclusive) {
            Err(e)
                if e.raw_os_error() == Some(libc::EWOULDBLOCK)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek takes no pointers; the descriptor is owned by the Disk.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(u64::try_from(r).ok())
}

impl FileDisk {
    /// Open `path` for serving. Takes a lock (exclusive unless read-only)
    /// so that two splitters never serve the same disk.
    pub fn open(path: &Path, read_only: bool) -> Result<FileDisk> {
        FileDisk::open_with(path, read_only, true)
    }

    /// Open `path` without taking its lock: for a reader beside the
    /// process that holds it (the shipper reading the splitter's disk, an
    /// export reading the replica its session writes).
    pub fn open_unlocked(path: &Path, read_only: bool) -> Result<FileDisk> {
        FileDisk::open_with(path, read_only, false)
    }

    fn open_with(path: &Path, read_only: bool, take_lock: bool) -> Result<FileDisk> {
        let err = |what| {
            let path = path.to_path_buf();
            move |source| Error::Disk { path, what, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(err("opening"))?;
        let meta = file.metadata().map_err(err("reading metadata"))?;
        let ft = meta.file_type();
        let (kind, size) = if ft.is_file() {
            (DiskKind::File, meta.len())
        } else if ft.is_block_device() {
            let size = block_device_size(file.as_raw_fd()).map_err(err("BLKGETSIZE64"))?;
            (DiskKind::BlockDevice, size)
        } else {
            return Err(Error::DiskKind {
                path: path.to_path_buf(),
                reason: "not a regular file or a block device".into(),
            });
        };
        if size == 0 {
            return Err(Error::DiskKind {
                path: path.to_path_buf(),
                reason: "the disk is empty (size 0); create it first, e.g. `truncate -s 1G DISK`"
                    .into(),
            });
        }
        match if take_lock {
            lock_within(file.as_raw_fd(), !read_only, LOCK_WAIT)
        } else {
            Ok(())
        } {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(Error::DiskBusy {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(err("locking")(e)),
        }
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            size,
            kind,
            read_only,
            direct: None,
        })
    }

    /// Write aligned extents around the page cache from now on
    /// ([`crate::direct`]): for a disk written once and read rarely (a
    /// replica). Err (and nothing changes) when the file system does not
    /// take direct I/O, saying why.
    pub fn use_direct_writes(&mut self) -> std::result::Result<(), String> {
        if self.read_only {
            return Err("opened read-only".into());
        }
        self.direct = Some(crate::direct::DirectWriter::open(&self.path)?);
        Ok(())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The descriptor the I/O engine submits against.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Who this disk is, for the ring: its size and a stable fingerprint
    /// ((st_dev, st_ino) of a file, (st_rdev, 0) of a block device).
    pub fn identity(&self) -> io::Result<ring::DiskIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        let fingerprint = match self.kind {
            DiskKind::File => [m.dev(), m.ino()],
            DiskKind::BlockDevice => [m.rdev(), 0],
        };
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        Ok(ring::DiskIdentity {
            size: self.size,
            fingerprint,
            path: path.display().to_string(),
        })
    }

    /// Whether the disk may hold data (a replica of it then needs a full
    /// copy first). A sparse file with no data says no; a block device, or
    /// a file system that cannot tell, says yes.
    pub fn may_hold_data(&self) -> bool {
        match self.kind {
            DiskKind::BlockDevice => true,
            DiskKind::File => !matches!(seek(self.fd(), 0, libc::SEEK_DATA), Ok(None)),
        }
    }

    /// The first offset at or after `offset` that may hold data
    /// (SEEK_DATA), or None when everything from `offset` to the end of the
    /// disk is a hole (reads as zeroes). Where the disk cannot tell (a block
    /// device, a file system without SEEK_DATA, any error), `Some(offset)`:
    /// assume data. The shipper's resync skips reading a range below it.
    pub fn data_from(&self, offset: u64) -> Option<u64> {
        if self.kind != DiskKind::File {
            return Some(offset);
        }
        match seek(self.fd(), offset, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(_) => Some(offset),
        }
    }

    /// Whether `offset..offset+len` is all hole (no data to read):
    /// [`FileDisk::data_from`] says the next data, if any, is at or after
    /// its end.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.data_from(offset)
            .is_none_or(|d| d >= offset.saturating_add(len))
    }

    /// fdatasync the disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Describe `offset..offset+len` as at most `max` extents of data and
    /// holes (holes read as zeroes). Where the disk cannot tell (a block
    /// device, a file system without SEEK_DATA), everything is data, which
    /// the protocol allows.
    pub fn extents(&self, offset: u64, len: u32, max: usize, out: &mut Vec<Extent>) {
        out.clear();
        let end = offset.saturating_add(u64::from(len)).min(self.size);
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (next, flags) = match self.next_boundary(pos, end) {
                Some(v) => v,
                None => (end, 0),
            };
            let next = next.clamp(pos + 1, end);
            // next - pos <= len, which is a u32.
            let length = u32::try_from(next - pos).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some(last) if last.flags == flags => {
                    last.length = last.length.saturating_add(length)
                }
                _ => out.push(Extent { length, flags }),
            }
            pos = next;
        }
        if out.is_empty() {
            out.push(Extent {
                length: len,
                flags: 0,
            });
        }
    }

    /// The end of the run that starts at `pos` and whether it is a hole;
    /// None when the disk cannot tell.
    fn next_boundary(&self, pos: u64, end: u64) -> Option<(u64, u32)> {
        if self.kind != DiskKind::File {
            return None;
        }
        let fd = self.fd();
        match seek(fd, pos, libc::SEEK_DATA) {
            Ok(Some(d)) if d == pos => {
                let hole = seek(fd, pos, libc::SEEK_HOLE).ok().flatten().unwrap_or(end);
                Some((hole.min(end), 0))
            }
            Ok(Some(d)) => Some((d.min(end), STATE_HOLE | STATE_ZERO)),
            Ok(None) => Some((end, STATE_HOLE | STATE_ZERO)),
            Err(_) => None,
        }
    }
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// fallocate(2) on `fd`.
pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (off_t(offset)?, off_t(len)?);
    // SAFETY: fallocate takes a descriptor the caller keeps open and no pointers.
    if unsafe { libc::fallocate(fd, mode, off, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// pwritev2(2) of one buffer with `flags` (RWF_DSYNC for FUA).
pub(crate) fn pwritev2(
    fd: RawFd,
    buf: &[u8],
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let off = off_t(offset)?;
    // SAFETY: the iovec points at `buf`, a live borrow the kernel only reads
    // during the call; fd is the caller's open descriptor.
    let n = unsafe { libc::pwritev2(fd, &iov, 1, off, flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL))
}

impl Backend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            trim: self.kind == DiskKind::File,
            fast_zero: self.kind == DiskKind::File,
            extents: self.kind == DiskKind::File,
            multi_conn: true,
            inline_writes: self.kind == DiskKind::File,
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if let Some(d) = &self.direct {
            if d.write(offset, data, fua)? {
                return Ok(());
            }
        }
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0usize;
        while done < data.len() {
            let n = pwritev2(self.fd(), &data[done..], offset + done as u64, flags)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(self.fd(), mode, offset, len).map_err(|e| {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                io::Error::from(io::ErrorKind::Unsupported)
            } else {
                e
            }
        })
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> io::Result<()> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if may_trim {
            match fallocate(self.fd(), libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match fallocate(self.fd(), libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        if fast_only {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        crate::backend::write_zeroes(offset, len, |at, z| self.write_at(at, z, false))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn extents(&self, offset: u64, len: u32, max: usize, out: &mut Vec<Extent>) {
        FileDisk::extents(self, offset, len, max, out);
    }

    fn uring_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn extents_of_a_sparse_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.flush().unwrap();
        let d = FileDisk::open(f.path(), true).unwrap();
        let mut ex = Vec::new();
        d.extents(0, 4 << 20, 16, &mut ex);
        let total: u64 = ex.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(total, 4 << 20);
        assert_eq!(ex[0].flags, STATE_HOLE | STATE_ZERO);
        assert!(ex.iter().any(|e| e.flags == 0));
        d.extents(0, 4 << 20, 1, &mut ex);
        assert_eq!(ex.len(), 1);
    }

    #[test]
    fn data_from_and_holes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start(2 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.flush().unwrap();
        let d = FileDisk::open_unlocked(f.path(), true).unwrap();
        assert!(d.read_only());
        if d.data_from(0) == Some(0) {
            // A file system that cannot tell: everything is data.
            assert!(!d.is_hole(0, 4096));
            return;
        }
        assert_eq!(d.data_from(0), Some(2 << 20));
        assert_eq!(d.data_from((2 << 20) + 5), Some((2 << 20) + 5));
        assert_eq!(d.data_from(3 << 20), None);
        assert!(d.is_hole(0, 1 << 20));
        assert!(d.is_hole(0, 2 << 20));
        assert!(!d.is_hole(0, (2 << 20) + 1));
        assert!(!d.is_hole(2 << 20, 4096));
        assert!(d.is_hole(3 << 20, 1 << 20));
        let mut buf = vec![0u8; 8];
        d.read_at((2 << 20) - 4, &mut buf).unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn empty_and_locked_disks_are_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            FileDisk::open(f.path(), false),
            Err(Error::DiskKind { .. })
        ));
        f.as_file().set_len(1 << 20).unwrap();
        let _a = FileDisk::open(f.path(), false).unwrap();
        assert!(matches!(
            FileDisk::open(f.path(), false),
            Err(Error::DiskBusy { .. })
        ));
    }
}
