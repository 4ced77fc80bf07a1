//! `nbd-target export-image`: a disk at a recovery point written to an
//! image file in the format a recovery platform boots (Azure Site
//! Recovery's disk conversion at failover). The point is read through its
//! view ([`crate::journal::PointView`], under a lease, so pruning keeps
//! what it reads) while replication goes on.
//!
//! - `raw`: a sparse file, the disk's size; only the 64 KiB pieces that
//!   hold a non-zero byte are written, the rest stay holes.
//! - `vhd`: a fixed VHD, written natively ([`crate::vhd`]): the raw bytes
//!   (sparse too), rounded up to a whole MiB with zeroes when the disk is
//!   not (Azure's rule), then the 512-byte footer.
//! - `qcow2`: the raw image in a temporary sparse file beside the output,
//!   converted by `qemu-img convert -O qcow2`, then removed.
//!
//! The image is written to `OUT.partial` (the temporary raw file of qcow2
//! is `OUT.partial.raw`), synced, and only then given its name; an
//! existing OUT is replaced only when asked (`force`). Every temporary
//! file is removed when the export fails or is interrupted.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockdev::Backend;
use serde_json::{json, Value};

use crate::error::{io, Error, Result};
use crate::journal::Pos;
use crate::points::{point_json, DiskPoints};
use crate::vhd;

/// Bytes read from the point at a time.
pub const CHUNK: usize = 1 << 20;
/// The unit of sparseness: a piece of this many bytes that is all zeroes
/// is not written (a hole in the image).
pub const GRAIN: usize = 64 << 10;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The disk's bytes, sparse.
    Raw,
    /// A fixed VHD (raw bytes and a footer).
    Vhd,
    /// QEMU's copy-on-write format, through `qemu-img`.
    Qcow2,
}

impl Format {
    /// Every format, by name.
    pub const ALL: [Format; 3] = [Format::Raw, Format::Vhd, Format::Qcow2];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::Invalid(format!("format {s:?}: expected raw, vhd or qcow2")))
    }
}

/// What to export, and where.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The target's data folder.
    pub data_dir: PathBuf,
    /// The disk.
    pub disk_id: String,
    /// The point's name (as every command takes it).
    pub point: String,
    /// The image's format.
    pub format: Format,
    /// The image to write.
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub force: bool,
    /// The replica on an upstream NBD server (as `serve --backend` gives it).
    pub backend: Option<String>,
    /// Set (by a signal handler) to stop; the temporary files are removed.
    pub cancel: Arc<AtomicBool>,
}

/// How far an export is, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The point is being read: `done` of `total` bytes.
    Reading {
        /// Bytes read so far.
        done: u64,
        /// Bytes to read.
        total: u64,
    },
    /// `qemu-img convert` runs.
    Converting,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The disk.
    pub disk_id: String,
    /// The point exported.
    pub point: Pos,
    /// The name it was asked by.
    pub point_name: String,
    /// The image.
    pub out: PathBuf,
    /// Its format.
    pub format: Format,
    /// The image's virtual size: the disk's size, rounded up to a whole
    /// MiB for a VHD.
    pub size: u64,
    /// The disk's size.
    pub disk_size: u64,
    /// Zeroes added at the end (a VHD of a disk that is not a whole
    /// number of MiB).
    pub padding: u64,
    /// Bytes of the point that are not zero (to [`GRAIN`]): what the
    /// image holds as data.
    pub data_bytes: u64,
}

impl ExportReport {
    /// The line printed at the end.
    pub fn line(&self) -> String {
        format!(
            "exported disk {} at point {} ({}) to {}: {}, {} bytes, {} bytes of data",
            self.disk_id,
            self.point,
            self.point_name,
            self.out.display(),
            self.format,
            self.size,
            self.data_bytes
        )
    }

    /// Why the image is bigger than the disk, when it is.
    pub fn padding_note(&self) -> Option<String> {
        (self.padding > 0).then(|| {
            format!(
                "the disk's {} bytes are not a whole number of MiB, which Azure requires of a VHD: {} bytes of zeroes added at the end ({} bytes)",
                self.disk_size, self.padding, self.size
            )
        })
    }

    /// `export-image --json`.
    pub fn to_json(&self) -> Value {
        json!({
            "disk_id": self.disk_id,
            "point": point_json(self.point),
            "point_name": self.point_name,
            "out": self.out.display().to_string(),
            "format": self.format.name(),
            "size": self.size,
            "disk_size": self.disk_size,
            "padding_bytes": self.padding,
            "data_bytes": self.data_bytes,
        })
    }
}

/// Files removed when dropped, unless disarmed: the temporary files of an
/// export that failed or was interrupted.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `out` with `suffix` appended to its file name.
fn beside(out: &Path, suffix: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", out.display())))?;
    let mut n = name.to_os_string();
    n.push(suffix);
    Ok(out.with_file_name(n))
}

/// Create `path` for writing; it must not exist (another export to the
/// same image may be running) unless `force`.
fn create_new(path: &Path, force: bool) -> Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && force => {
            std::fs::remove_file(path).map_err(io(path, "removing an old temporary file"))?;
            open().map_err(io(path, "creating the image"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Invalid(format!(
            "{} exists: another export to the same image is running, or one was killed; remove it (or pass --force)",
            path.display()
        ))),
        r => r.map_err(io(path, "creating the image")),
    }
}

/// Whether `b` is all zeroes (64 bytes at a time, which vectorises).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Write the pieces of `buf` (the disk's bytes at `at`) that hold a
/// non-zero byte, in [`GRAIN`]s, runs coalesced; the bytes written.
fn write_sparse(f: &File, path: &Path, buf: &[u8], at: u64) -> Result<u64> {
    let grain = |i: usize| &buf[i..buf.len().min(i + GRAIN)];
    let (mut i, mut written) = (0usize, 0u64);
    while i < buf.len() {
        if is_zero(grain(i)) {
            i += grain(i).len();
            continue;
        }
        let start = i;
        while i < buf.len() && !is_zero(grain(i)) {
            i += grain(i).len();
        }
        f.write_all_at(&buf[start..i], at + start as u64)
            .map_err(io(path, "writing the image"))?;
        written += (i - start) as u64;
    }
    Ok(written)
}

/// Copy the first `size` bytes of `src` to `f`, sparsely; the bytes of data.
fn copy_sparse(
    src: &dyn Backend,
    size: u64,
    f: &File,
    path: &Path,
    source: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Step),
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let (mut at, mut data) = (0u64, 0u64);
    progress(Step::Reading {
        done: 0,
        total: size,
    });
    while at < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Invalid("interrupted".into()));
        }
        // At most CHUNK, which is a usize.
        let n = usize::try_from((size - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        src.read_at(at, &mut buf[..n])
            .map_err(io(source, "reading the disk at the point"))?;
        data += write_sparse(f, path, &buf[..n], at)?;
        at += n as u64;
        progress(Step::Reading {
            done: at,
            total: size,
        });
    }
    Ok(data)
}

/// Fail early, with what to install, when `qemu-img` is missing.
fn check_qemu_img() -> Result<()> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(Error::Invalid(format!(
            "qemu-img --version failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Invalid(
            "qcow2 images are made by qemu-img, which is not installed: install qemu-utils (apt-get install qemu-utils; qemu-img on Fedora/RHEL), or export raw or vhd".into(),
        )),
        Err(e) => Err(Error::Invalid(format!("cannot run qemu-img: {e}"))),
    }
}

/// Give the synced `partial` the name `out`: over an existing one only
/// when `force` (without it, an `out` that appeared meanwhile is kept),
/// then sync the folder.
fn install(partial: &Path, out: &Path, force: bool) -> Result<()> {
    let exists = || {
        Error::Invalid(format!(
            "{} was created while the export ran: not overwritten (pass --force to)",
            out.display()
        ))
    };
    if force {
        std::fs::rename(partial, out).map_err(io(out, "renaming the image into place"))?;
    } else {
        // A hard link fails if `out` exists, atomically.
        match std::fs::hard_link(partial, out) {
            Ok(()) => {
                std::fs::remove_file(partial).map_err(io(partial, "removing the temporary name"))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
            // A file system without hard links.
            Err(_) => {
                if std::fs::symlink_metadata(out).is_ok() {
                    return Err(exists());
                }
                std::fs::rename(partial, out).map_err(io(out, "renaming the image into place"))?;
            }
        }
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the image's folder"))
}

/// Export the disk at the point as `cfg` says, reporting progress.
pub fn export(cfg: &ExportConfig, progress: &mut dyn FnMut(Step)) -> Result<ExportReport> {
    let out = &cfg.out;
    match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => {
            return Err(Error::Invalid(format!(
                "{} is a folder: give the image's file name",
                out.display()
            )))
        }
        Ok(_) if !cfg.force => {
            return Err(Error::Invalid(format!(
                "{} exists: not overwritten (pass --force to replace it)",
                out.display()
            )))
        }
        _ => {}
    }
    let partial = beside(out, ".partial")?;
    let dp = DiskPoints::load(&cfg.data_dir, &cfg.disk_id)?;
    let point = dp.resolve(&cfg.point)?;
    let spec = dp.replica_spec(cfg.backend.as_deref())?;
    if cfg.format == Format::Qcow2 {
        check_qemu_img()?;
    }
    let what = format!(
        "export-image of {}@{} to {} (pid {})",
        cfg.disk_id,
        cfg.point,
        out.display(),
        std::process::id()
    );
    let view = dp.open_view(&spec, point, &what)?;
    let (ranges, entries) = view.mapped();
    log::info!(
        "disk {:?} at point {point} ({}): {ranges} range(s) from {entries} journal entries",
        cfg.disk_id,
        cfg.point
    );
    let disk_size = view.size();
    let size = match cfg.format {
        Format::Vhd => vhd::virtual_size(disk_size),
        Format::Raw | Format::Qcow2 => disk_size,
    };
    let mut cleanup = Cleanup(Vec::new());
    let f = create_new(&partial, cfg.force)?;
    cleanup.0.push(partial.clone());
    let (raw, raw_path) = if cfg.format == Format::Qcow2 {
        let p = beside(out, ".partial.raw")?;
        let f = create_new(&p, cfg.force)?;
        cleanup.0.push(p.clone());
        (f, p)
    } else {
        (f, partial.clone())
    };
    let data_bytes = copy_sparse(
        &view,
        disk_size,
        &raw,
        &raw_path,
        &dp.dir,
        &cfg.cancel,
        progress,
    )?;
    drop(view);
    raw.set_len(size)
        .map_err(io(&raw_path, "sizing the image"))?;
    if cfg.format == Format::Vhd {
        let t = vhd::timestamp(std::time::SystemTime::now());
        let uuid = vhd::random_uuid().map_err(io(Path::new("/dev/urandom"), "reading"))?;
        raw.write_all_at(&vhd::Footer::fixed(size, t, uuid).encode(), size)
            .map_err(io(&raw_path, "writing the VHD footer"))?;
    }
    raw.sync_all().map_err(io(&raw_path, "syncing the image"))?;
    drop(raw);
    if cfg.format == Format::Qcow2 {
        progress(Step::Converting);
        let o = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_path)
            .arg(&partial)
            .output()
            .map_err(|e| Error::Invalid(format!("cannot run qemu-img: {e}")))?;
        if cfg.cancel.load(Ordering::Relaxed) {
            return Err(Error::Invalid("interrupted".into()));
        }
        if !o.status.success() {
            return Err(Error::Invalid(format!(
                "qemu-img convert to qcow2 failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        std::fs::remove_file(&raw_path).map_err(io(&raw_path, "removing the temporary image"))?;
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(io(&partial, "syncing the image"))?;
    }
    install(&partial, out, cfg.force)?;
    cleanup.0.clear();
    Ok(ExportReport {
        disk_id: cfg.disk_id.clone(),
        point,
        point_name: cfg.point.clone(),
        out: out.clone(),
        format: cfg.format,
        size,
        disk_size,
        padding: size - disk_size,
        data_bytes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sparse_writes_skip_zero_grains() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = create_new(&p, false).unwrap();
        let mut buf = vec![0u8; CHUNK];
        buf[5] = 1; // grain 0
        buf[GRAIN + 7] = 2; // grain 1: one run with grain 0
        buf[4 * GRAIN] = 3; // grain 4
        buf[CHUNK - 1] = 4; // the last grain
        assert_eq!(write_sparse(&f, &p, &buf, 0).unwrap(), 4 * GRAIN as u64);
        f.set_len(CHUNK as u64).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), buf);
        assert!(is_zero(&[0u8; 100]) && !is_zero(&[0, 0, 1]) && is_zero(&[]));
        // Refused unless forced; forced, it starts again.
        assert!(create_new(&p, false)
            .unwrap_err()
            .to_string()
            .contains("exists"));
        let f = create_new(&p, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        assert_eq!(
            beside(&p, ".partial").unwrap(),
            dir.path().join("img.partial")
        );
        assert!(beside(Path::new("/"), ".partial").is_err());
    }

    #[test]
    fn install_keeps_an_image_that_appeared() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.partial"), dir.path().join("a"));
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "old").unwrap();
        assert!(install(&a, &b, false).is_err());
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "old");
        install(&a, &b, true).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new");
        assert!(!a.exists());
        std::fs::write(&a, "newer").unwrap();
        std::fs::remove_file(&b).unwrap();
        install(&a, &b, false).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "newer");
        assert!(!a.exists());
    }

    #[test]
    fn formats_by_name() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert!("vmdk".parse::<Format>().is_err());
    }
}
