//! Advisory locks (`flock`) on small files in a disk's folder: how the
//! daemon's sessions and exports and the one-shot commands (`failover`,
//! `seed`) keep out of each other's way, in one process or several. A
//! lock is held as long as its [`Locked`] lives, and the kernel drops it
//! when the process dies (a crash never leaves a disk locked).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{io, Result};

/// A held lock.
#[derive(Debug)]
pub struct Locked {
    _file: File,
    path: PathBuf,
}

impl Locked {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn flock_nb(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock takes a descriptor `f` keeps open and no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Take the exclusive lock on `path` (created when missing) if nobody
/// holds it: `None` when somebody does.
pub fn try_lock(path: &Path) -> Result<Option<Locked>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path, "opening a lock file"))?;
    Ok(flock_nb(&f).map_err(io(path, "locking"))?.then(|| Locked {
        _file: f,
        path: path.to_path_buf(),
    }))
}

/// Take the exclusive lock on `path`, waiting at most `within` for its
/// holder to let go: `None` when it did not.
pub fn lock_within(path: &Path, within: Duration) -> Result<Option<Locked>> {
    let until = Instant::now() + within;
    loop {
        if let Some(l) = try_lock(path)? {
            return Ok(Some(l));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a file (a disk image) is locked by another process now, the
/// way a splitter serving it or a target applying to it locks it
/// (`flock` exclusive): tried without waiting, let go at once.
pub fn in_use(path: &Path) -> Result<bool> {
    let f = File::open(path).map_err(io(path, "opening"))?;
    let free = flock_nb(&f).map_err(io(path, "locking"))?;
    Ok(!free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("x.lock");
        let a = try_lock(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.is_some());
        // flock locks belong to the open file: a second open is refused.
        assert!(try_lock(&p).unwrap_or_else(|e| panic!("{e}")).is_none());
        assert!(in_use(&p).unwrap_or_else(|e| panic!("{e}")));
        let t = Instant::now();
        assert!(lock_within(&p, Duration::from_millis(100))
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(100));
        drop(a);
        assert!(!in_use(&p).unwrap_or_else(|e| panic!("{e}")));
        assert!(lock_within(&p, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some());
    }
}
