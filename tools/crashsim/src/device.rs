//! What the block device holds of a file, read past the page cache.
//!
//! `FS_IOC_FIEMAP` (without `FIEMAP_FLAG_SYNC`, which would write the file
//! back first) gives the file's extents and their device offsets; the file
//! system's block device, opened `O_DIRECT`, is read at those offsets. Holes
//! and extents not (yet) on the device read as zeroes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::statfs;

use crate::{io_err, sys, Error};

/// Last extent of the file.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Data location unknown.
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
/// Location still pending (delayed allocation; sets UNKNOWN).
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
/// Data cannot be read while the fs is unmounted (compressed, ...).
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
/// Data is encrypted by the fs (sets ENCODED).
const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x80;
/// Extent offsets may not be block aligned.
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
/// Data mixed with metadata.
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
/// Multiple files in one block (sets NOT_ALIGNED).
const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
/// Space allocated, but no data (preallocated: reads as zeroes).
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// Flags meaning the extent's bytes are not on the device (yet).
const NOT_ON_DEVICE: u32 = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNWRITTEN;
/// Flags meaning the device bytes are not the file's bytes.
const NOT_PLAIN: u32 = FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL;

/// Alignment of O_DIRECT offsets, lengths and buffers (a multiple of every
/// common logical block size: 512 and 4096).
const ALIGN: u64 = 4096;
/// Bytes read from the device per call.
const READ_CHUNK: u64 = 1 << 20;

/// One extent of a file, as `FS_IOC_FIEMAP` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the file.
    pub logical: u64,
    /// Byte offset on the block device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

impl Extent {
    /// Whether the extent's bytes are on the device: not a delayed
    /// allocation, not of unknown location, not unwritten (preallocated).
    pub fn on_device(&self) -> bool {
        self.flags & NOT_ON_DEVICE == 0
    }
}

/// The extents of the file at `path` covering `0..size` (its size as stat
/// reports it), from the file system's current, in-memory view. Does not
/// write anything back.
pub fn extents(path: &Path) -> Result<Vec<Extent>, Error> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let size = file.metadata().map_err(io_err(path, "stat"))?.len();
    extents_of(path, &file, size)
}

fn extents_of(path: &Path, file: &File, size: u64) -> Result<Vec<Extent>, Error> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < size {
        let mut req = sys::Fiemap::new(start, size - start);
        sys::fiemap(file, &mut req).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOTTY) => Error::Unsupported {
                path: path.to_path_buf(),
                why: "the file system does not support FIEMAP".into(),
            },
            _ => io_err(path, "FS_IOC_FIEMAP")(e),
        })?;
        let got = req.mapped();
        let Some(last) = got.last() else { break };
        let next = last.fe_logical.saturating_add(last.fe_length);
        let done = last.fe_flags & FIEMAP_EXTENT_LAST != 0 || next <= start;
        out.extend(got.iter().map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags,
        }));
        if done {
            break;
        }
        start = next;
    }
    Ok(out)
}

/// The block device holding the file system of `path` (a file or directory):
/// `st_dev` looked up in `/sys/dev/block/MAJOR:MINOR/uevent`, checked against
/// the device node in `/dev`. [`Error::NoBlockDevice`] for file systems
/// without one (tmpfs, overlayfs, FUSE, NFS, btrfs); [`Error::Unsupported`]
/// for btrfs in any case.
pub fn block_device(path: &Path) -> Result<PathBuf, Error> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    block_device_of(path, &file)
}

fn block_device_of(path: &Path, file: &File) -> Result<PathBuf, Error> {
    let fs = statfs::fstatfs(file).map_err(|e| io_err(path, "fstatfs")(e.into()))?;
    if fs.filesystem_type() == statfs::BTRFS_SUPER_MAGIC {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            why: "btrfs is copy-on-write and its FIEMAP offsets are btrfs-logical, not device, \
                  addresses"
                .into(),
        });
    }
    let dev = file.metadata().map_err(io_err(path, "stat"))?.st_dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let uevent = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/uevent"));
    let text = match std::fs::read_to_string(&uevent) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NoBlockDevice {
                path: path.to_path_buf(),
                major,
                minor,
            })
        }
        Err(e) => return Err(io_err(&uevent, "read")(e)),
    };
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            why: format!("{} names no DEVNAME", uevent.display()),
        })?;
    let node = Path::new("/dev").join(name);
    let meta = std::fs::metadata(&node).map_err(io_err(&node, "stat"))?;
    if !meta.file_type().is_block_device() || meta.st_rdev() != dev {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            why: format!("{} is not block device {major}:{minor}", node.display()),
        });
    }
    Ok(node)
}

/// The bytes of the file at `path` as its block device holds them now: what
/// a power cut would leave if nothing more were written back. As long as the
/// file's size (stat); holes and extents not on the device read as zeroes.
/// Needs root. See the crate documentation for what is not modelled (the
/// extent map and the size themselves may not be durable).
pub fn device_image(path: &Path) -> Result<Vec<u8>, Error> {
    let src = Source::open(path)?;
    let len = usize::try_from(src.size).map_err(|_| Error::Unsupported {
        path: path.to_path_buf(),
        why: "file too large for memory; use device_image_to".into(),
    })?;
    let mut image = vec![0u8; len];
    src.copy(|at, bytes| {
        // at + len <= size = image.len(): the extents are clipped to the size.
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        image[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    })?;
    Ok(image)
}

/// [`device_image`], written to a new file `out` (created or truncated;
/// holes and extents not on the device are left sparse). Returns the image
/// size in bytes. For images too large to hold in memory.
pub fn device_image_to(path: &Path, out: &Path) -> Result<u64, Error> {
    let src = Source::open(path)?;
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io_err(out, "create"))?;
    dst.set_len(src.size).map_err(io_err(out, "truncate"))?;
    src.copy(|at, bytes| dst.write_all_at(bytes, at).map_err(io_err(out, "write")))?;
    Ok(src.size)
}

/// A file to image: its size, extents and block device.
struct Source {
    path: PathBuf,
    size: u64,
    extents: Vec<Extent>,
    dev_path: PathBuf,
    dev: File,
}

impl Source {
    fn open(path: &Path) -> Result<Source, Error> {
        let file = File::open(path).map_err(io_err(path, "open"))?;
        let dev_path = block_device_of(path, &file)?;
        let size = file.metadata().map_err(io_err(path, "stat"))?.len();
        let extents = extents_of(path, &file, size)?;
        if let Some(e) = extents.iter().find(|e| e.flags & NOT_PLAIN != 0) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                why: format!(
                    "extent at {} has flags {:#x} (encoded, encrypted, inline or unaligned data: \
                     the device does not hold the file's bytes as such)",
                    e.logical, e.flags
                ),
            });
        }
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev_path)
            .map_err(io_err(&dev_path, "open O_DIRECT"))?;
        Ok(Source {
            path: path.to_path_buf(),
            size,
            extents,
            dev_path,
            dev,
        })
    }

    /// Hand `sink` each piece `(file offset, bytes)` of the file that is on
    /// the device, clipped to the file size, read with O_DIRECT.
    fn copy(&self, mut sink: impl FnMut(u64, &[u8]) -> Result<(), Error>) -> Result<(), Error> {
        let cap = usize::try_from(READ_CHUNK + 2 * ALIGN).unwrap_or(usize::MAX);
        let mut raw = vec![0u8; cap];
        let align = usize::try_from(ALIGN).unwrap_or(usize::MAX);
        let skip = raw.as_ptr().align_offset(align);
        if skip >= align {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                why: "cannot align an O_DIRECT buffer".into(),
            });
        }
        let buf = &mut raw[skip..skip + cap - align];
        for e in self.extents.iter().filter(|e| e.on_device()) {
            let end = e.logical.saturating_add(e.length).min(self.size);
            let mut at = e.logical;
            while at < end {
                let want = READ_CHUNK.min(end - at);
                let phys = e.physical + (at - e.logical);
                let start = phys - phys % ALIGN;
                let lead = phys - start;
                let span = (lead + want).div_ceil(ALIGN) * ALIGN;
                // span <= READ_CHUNK + 2 * ALIGN - ALIGN = buf.len().
                let span = usize::try_from(span).unwrap_or(usize::MAX);
                let got = read_full_at(&self.dev, &mut buf[..span], start)
                    .map_err(io_err(&self.dev_path, "read O_DIRECT"))?;
                let (lo, hi) = (
                    usize::try_from(lead).unwrap_or(usize::MAX),
                    usize::try_from(lead + want).unwrap_or(usize::MAX),
                );
                if got < hi {
                    return Err(Error::Unsupported {
                        path: self.path.clone(),
                        why: format!(
                            "extent at {} maps past the end of {}",
                            e.logical,
                            self.dev_path.display()
                        ),
                    });
                }
                sink(at, &buf[lo..hi])?;
                at += want;
            }
        }
        Ok(())
    }
}

/// Read into `buf` at `at` until it is full or the device ends; the bytes read.
fn read_full_at(dev: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match dev.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
