//! The power-cut model against the real kernel: pages written and not yet
//! synced show as dirty, and the device image still holds their old bytes;
//! after a sync both agree with the file.
//!
//! These need root (page frame numbers, /proc/kpageflags, the raw block
//! device) and a file system on a block device: they print a `skip:` line and
//! pass otherwise. They run under `$CRASHSIM_TEST_DIR` if set (to try another
//! file system, e.g. an XFS loop mount), else under /var/tmp if its block
//! device can be opened, else on a private 64 MiB ext4 loop mount made for the
//! test (needs mkfs.ext4, losetup, mount; some sandboxes deny even root
//! access to the root file system's disk). A killed test can leave such a
//! mount behind under /var/tmp/crashsim-loop-*.
//!
//! Before each unsynced write the file's clean pages are dropped from the
//! page cache, so the write gets a one-page folio of its own and exactly that
//! page reports dirty (a write into a cached large folio dirties the whole
//! folio). A scenario is retried a few times, in case background writeback
//! cleans a page between the write and the checks.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crashsim::{
    cache_state, device_image, device_image_to, dirty_pages, dirty_pages_in, Error, PAGE,
};
use memmap2::{Advice, MmapOptions, MmapRaw};
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};

const PAGES: u64 = 16;
const ATTEMPTS: usize = 3;

/// Where a test runs: a temp dir on a block-device file system whose device
/// this process can read, and the loop mount holding it if we made one.
struct TestDir {
    path: PathBuf,
    // Drop order: the temp dir's files go before the mount is taken down.
    _tmp: tempfile::TempDir,
    _mount: Option<LoopFs>,
}

/// A private ext4 file system on a loop device, mounted on a temp dir;
/// unmounted and detached on drop (a killed test leaves it behind).
struct LoopFs {
    mnt: PathBuf,
    dev: String,
    _dir: tempfile::TempDir,
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl LoopFs {
    /// A 64 MiB ext4 (4 KiB blocks) on a loop device over a sparse file under
    /// `base`.
    fn new(base: &Path) -> Result<LoopFs, String> {
        let dir = tempfile::Builder::new()
            .prefix("crashsim-loop-")
            .tempdir_in(base)
            .map_err(|e| e.to_string())?;
        let img = dir.path().join("fs.img");
        File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img))?;
        let dev = run(Command::new("losetup").args(["--find", "--show"]).arg(&img))?;
        let mnt = dir.path().join("mnt");
        let fs = LoopFs {
            mnt,
            dev,
            _dir: dir,
        };
        std::fs::create_dir(&fs.mnt).map_err(|e| e.to_string())?;
        run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt))?;
        Ok(fs)
    }
}

/// Root, and a kernel with /proc/kpageflags; else a skip line.
fn privileged(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skip: {test}: needs root (page frame numbers, /proc/kpageflags, raw block device)"
        );
        return false;
    }
    if !Path::new("/proc/kpageflags").exists() {
        eprintln!("skip: {test}: no /proc/kpageflags (kernel without CONFIG_PROC_PAGE_MONITOR)");
        return false;
    }
    true
}

/// Whether `dir` is on a block device this process may read; why not if not.
fn usable(dir: &Path) -> Result<PathBuf, String> {
    let dev = crashsim::block_device(dir).map_err(|e| e.to_string())?;
    File::open(&dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    Ok(dev)
}

/// A temp dir to test in, or None (with a skip line) if the model cannot be
/// checked here. `$CRASHSIM_TEST_DIR` if set, else /var/tmp if its device
/// can be read, else a private ext4 loop mount (some sandboxes deny even root
/// access to the root file system's disk).
fn test_dir(test: &str) -> Option<TestDir> {
    if !privileged(test) {
        return None;
    }
    let (base, mount) = match std::env::var_os("CRASHSIM_TEST_DIR") {
        Some(d) => (PathBuf::from(d), None),
        None => {
            let var_tmp = PathBuf::from("/var/tmp");
            match usable(&var_tmp) {
                Ok(_) => (var_tmp, None),
                Err(why) => match LoopFs::new(&var_tmp) {
                    Ok(fs) => {
                        eprintln!("{test}: /var/tmp unusable ({why}); using an ext4 loop mount");
                        (fs.mnt.clone(), Some(fs))
                    }
                    Err(e) => {
                        eprintln!(
                            "skip: {test}: /var/tmp unusable ({why}) and no loop mount ({e})"
                        );
                        return None;
                    }
                },
            }
        }
    };
    match usable(&base) {
        Ok(dev) => eprintln!(
            "{test}: testing under {} on {}",
            base.display(),
            dev.display()
        ),
        Err(why) => {
            eprintln!("skip: {test}: {why}");
            return None;
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("crashsim-")
        .tempdir_in(&base)
        .expect("temp dir");
    Some(TestDir {
        path: tmp.path().to_path_buf(),
        _tmp: tmp,
        _mount: mount,
    })
}

/// Deterministic, seed-dependent bytes.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn range(page: u64) -> std::ops::Range<usize> {
    let lo = usize::try_from(page * PAGE).expect("fits");
    lo..lo + usize::try_from(PAGE).expect("fits")
}

/// Drop the file's (clean) pages from the page cache.
fn drop_cache(file: &File) {
    posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("fadvise");
}

fn create(path: &Path, contents: &[u8]) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create");
    file.write_all_at(contents, 0).expect("pwrite");
    file.sync_all().expect("fsync");
    file
}

fn read_all(file: &File) -> Vec<u8> {
    let len = usize::try_from(file.metadata().expect("stat").len()).expect("fits");
    let mut v = vec![0u8; len];
    file.read_exact_at(&mut v, 0).expect("pread");
    v
}

/// Copy `src` into the shared mapping at `off`.
fn write_mapped(map: &MmapRaw, off: usize, src: &[u8]) {
    assert!(off + src.len() <= map.len());
    // SAFETY: the destination is inside the live mapping (checked) and does
    // not overlap `src`, ordinary memory of this process; nothing else writes
    // the test's private file.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), map.as_mut_ptr().add(off), src.len()) }
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Run `scenario` until it passes, at most [`ATTEMPTS`] times.
fn retry(test: &str, mut scenario: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match scenario() {
            Ok(()) => return,
            Err(e) => {
                eprintln!("{test}: attempt {attempt} failed (background writeback?): {e}");
                last = e;
            }
        }
    }
    panic!("{test}: failed {ATTEMPTS} times, last: {last}");
}

fn dirty(path: &Path) -> Result<Vec<u64>, String> {
    dirty_pages(path).map_err(|e| e.to_string())
}

fn image(path: &Path) -> Result<Vec<u8>, String> {
    device_image(path).map_err(|e| e.to_string())
}

/// pwrite a page without syncing: it is dirty and the device has its old
/// bytes; fdatasync: nothing dirty, the device has the file.
#[test]
fn pwrite_then_fdatasync() {
    let Some(dir) = test_dir("pwrite_then_fdatasync") else {
        return;
    };
    let path = dir.path.join("pwrite.img");
    // Not a whole number of pages: the image is cut to the inode size.
    let size = PAGES * PAGE + 123;
    retry("pwrite_then_fdatasync", || {
        let old = pattern(1, size);
        let file = create(&path, &old);
        check!(
            dirty(&path)?.is_empty(),
            "dirty right after fsync: {:?}",
            dirty(&path)?
        );
        check!(
            image(&path)? == old,
            "device image after fsync differs from the file"
        );

        drop_cache(&file);
        let new3 = pattern(2, PAGE);
        file.write_all_at(&new3, 3 * PAGE).expect("pwrite");
        let d = dirty(&path)?;
        let img = image(&path)?;
        let state = cache_state(&path).map_err(|e| e.to_string())?;
        let mut now = old.clone();
        now[range(3)].copy_from_slice(&new3);
        check!(
            read_all(&file) == now,
            "file does not read back what was written"
        );
        check!(d == [3], "dirty pages {d:?}, want [3] (state {state:?})");
        check!(
            img.len() == now.len(),
            "image is {} bytes, file {}",
            img.len(),
            now.len()
        );
        check!(
            img[range(3)] == old[range(3)],
            "device image page 3 is not the old bytes"
        );
        check!(
            img[..range(3).start] == now[..range(3).start],
            "device image before page 3 differs"
        );
        check!(
            img[range(3).end..] == now[range(3).end..],
            "device image after page 3 differs"
        );
        let within = dirty_pages_in(&path, &[(3 * PAGE + 10, 1), (0, 3 * PAGE)])
            .map_err(|e| e.to_string())?;
        check!(within == [3], "dirty_pages_in {within:?}");
        let outside =
            dirty_pages_in(&path, &[(0, 3 * PAGE), (4 * PAGE, size)]).map_err(|e| e.to_string())?;
        check!(
            outside.is_empty(),
            "dirty_pages_in outside page 3: {outside:?}"
        );

        file.sync_data().expect("fdatasync");
        check!(
            dirty(&path)?.is_empty(),
            "dirty after fdatasync: {:?}",
            dirty(&path)?
        );
        check!(
            image(&path)? == now,
            "device image after fdatasync differs from the file"
        );

        let out = dir.path.join("pwrite.image");
        let n = device_image_to(&path, &out).map_err(|e| e.to_string())?;
        check!(n == size, "device_image_to wrote {n} bytes");
        check!(
            std::fs::read(&out).expect("read image") == now,
            "device_image_to differs"
        );
        Ok(())
    });
}

/// Write through a shared writable mapping: the page is dirty and the device
/// has its old bytes; msync(MS_SYNC) of the page: clean, on the device.
#[test]
fn mmap_write_then_msync() {
    let Some(dir) = test_dir("mmap_write_then_msync") else {
        return;
    };
    let path = dir.path.join("mmap.img");
    let size = PAGES * PAGE;
    retry("mmap_write_then_msync", || {
        let old = pattern(3, size);
        let file = create(&path, &old);
        drop_cache(&file);
        let map = MmapOptions::new()
            .len(usize::try_from(size).expect("fits"))
            .map_raw(&file)
            .expect("mmap");
        // No read-around: the write fault reads page 3 alone, a one-page folio.
        map.advise(Advice::Random).expect("madvise");
        let bytes = b"written through the mapping";
        let at = range(3).start + 100;
        write_mapped(&map, at, bytes);
        let d = dirty(&path)?;
        let img = image(&path)?;
        let mut now = old.clone();
        now[at..at + bytes.len()].copy_from_slice(bytes);
        check!(
            read_all(&file) == now,
            "file does not read back the mapped write"
        );
        check!(d == [3], "dirty pages {d:?}, want [3]");
        check!(img == old, "device image is not the old bytes");

        map.flush_range(range(3).start, range(3).len())
            .expect("msync");
        check!(
            dirty(&path)?.is_empty(),
            "dirty after msync: {:?}",
            dirty(&path)?
        );
        check!(
            image(&path)? == now,
            "device image after msync differs from the file"
        );
        Ok(())
    });
}

/// Holes, unwritten (preallocated) extents and delayed allocations are not on
/// the device: they read as zeroes until synced.
#[test]
fn holes_unwritten_and_delalloc_read_as_zeroes() {
    let Some(dir) = test_dir("holes_unwritten_and_delalloc_read_as_zeroes") else {
        return;
    };
    let path = dir.path.join("sparse.img");
    let size = 8 * PAGE;
    retry("holes_unwritten_and_delalloc_read_as_zeroes", || {
        let file = create(&path, &[]);
        file.set_len(size).expect("truncate");
        let p0 = pattern(4, PAGE);
        file.write_all_at(&p0, 0).expect("pwrite");
        // Pages 4 and 5: allocated, unwritten.
        fallocate(
            file.as_raw_fd(),
            FallocateFlags::empty(),
            4 * 4096,
            2 * 4096,
        )
        .expect("fallocate");
        file.sync_all().expect("fsync");
        let mut before = vec![0u8; usize::try_from(size).expect("fits")];
        before[range(0)].copy_from_slice(&p0);
        check!(image(&path)? == before, "device image after fsync");
        let ext = crashsim::extents(&path).map_err(|e| e.to_string())?;
        let unwritten = ext
            .iter()
            .find(|e| e.logical <= 4 * PAGE && 4 * PAGE < e.logical + e.length)
            .ok_or_else(|| format!("no extent at page 4: {ext:?}"))?;
        check!(
            !unwritten.on_device(),
            "fallocated extent is on the device: {unwritten:?}"
        );

        drop_cache(&file);
        let p5 = pattern(5, PAGE);
        let p7 = pattern(7, PAGE);
        file.write_all_at(&p5, 5 * PAGE).expect("pwrite");
        file.write_all_at(&p7, 7 * PAGE).expect("pwrite");
        let d = dirty(&path)?;
        let img = image(&path)?;
        check!(d == [5, 7], "dirty pages {d:?}, want [5, 7]");
        check!(
            img == before,
            "device image shows unsynced data of unwritten or unallocated pages"
        );
        let ext = crashsim::extents(&path).map_err(|e| e.to_string())?;
        check!(
            ext.iter()
                .filter(|e| e.logical <= 7 * PAGE && 7 * PAGE < e.logical + e.length)
                .all(|e| !e.on_device()),
            "page 7 (written into a hole, not synced) has an extent on the device: {ext:?}"
        );

        file.sync_data().expect("fdatasync");
        let mut now = before.clone();
        now[range(5)].copy_from_slice(&p5);
        now[range(7)].copy_from_slice(&p7);
        check!(read_all(&file) == now, "file contents");
        check!(
            dirty(&path)?.is_empty(),
            "dirty after fdatasync: {:?}",
            dirty(&path)?
        );
        check!(
            image(&path)? == now,
            "device image after fdatasync differs from the file"
        );
        Ok(())
    });
}

/// tmpfs has no block device: a clear error, not garbage.
#[test]
fn tmpfs_is_refused() {
    if !privileged("tmpfs_is_refused") {
        return;
    }
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        eprintln!("skip: tmpfs_is_refused: no /dev/shm");
        return;
    }
    let f = tempfile::NamedTempFile::new_in(dir).expect("temp file");
    std::fs::write(f.path(), b"x").expect("write");
    match device_image(f.path()) {
        Err(Error::NoBlockDevice { .. }) => {}
        other => panic!("device_image on tmpfs: {other:?}"),
    }
    // Dirty-page inspection itself works on tmpfs (its pages are always
    // "dirty": they exist nowhere else), it just says nothing about a device.
    assert!(dirty_pages(f.path()).is_ok());
}
