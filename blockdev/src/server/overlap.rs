//! Ordering of overlapping changes across connections.
//!
//! The ring must record overlapping changes in the order they reached the
//! disk, or the replica would end with another version of the overlap than
//! the source. Two overlapping writes in flight at once (on two
//! connections, or on a block device where io_uring may run them in
//! parallel) could reach the disk in one order and be captured in the other.
//! So a change *claims* its extent before it is submitted to the disk and
//! releases it once it is captured; a change whose extent overlaps a claim
//! waits (its connection parks it and is woken through its eventfd), as DRBD
//! does with conflicting requests. Non-overlapping changes never wait.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The claims of every connection of one disk (opaque outside this crate:
/// create one per disk with `Claims::default()` and share it).
#[derive(Debug, Default)]
pub struct Claims {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (start, end, connection, slot) of changes between submission and capture.
    held: Vec<(u64, u64, u64, usize)>,
    /// Eventfds of connections with a parked change, woken on any release.
    waiters: Vec<RawFd>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data stays consistent whatever panicked: each update is one push or remove.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claim `offset..offset+len` for (conn, slot). On overlap, register
    /// `waker` to be woken at the next release and return false.
    pub(crate) fn try_claim(
        &self,
        conn: u64,
        slot: usize,
        offset: u64,
        len: u64,
        waker: RawFd,
    ) -> bool {
        let (start, end) = (offset, offset.saturating_add(len));
        let mut g = self.lock();
        if g.held.iter().any(|&(s, e, _, _)| s < end && start < e) {
            if !g.waiters.contains(&waker) {
                g.waiters.push(waker);
            }
            return false;
        }
        g.held.push((start, end, conn, slot));
        true
    }

    /// Release the claim of (conn, slot), if any, and wake every waiter.
    pub(crate) fn release(&self, conn: u64, slot: usize) {
        let mut g = self.lock();
        let Some(i) = g
            .held
            .iter()
            .position(|&(_, _, c, s)| c == conn && s == slot)
        else {
            return;
        };
        g.held.swap_remove(i);
        for fd in g.waiters.drain(..) {
            wake(fd);
        }
    }

    /// A connection goes away: forget its waker.
    pub(crate) fn forget_waker(&self, waker: RawFd) {
        self.lock().waiters.retain(|&fd| fd != waker);
    }
}

/// A connection's wake-up eventfd (non-blocking).
pub(crate) fn waker() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wake(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer; a full counter
    // (EAGAIN) means the connection is already due to wake.
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
}

/// Reset a waker after it fired.
pub(crate) fn drain_waker(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer; EAGAIN is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_wait_and_are_woken() {
        let c = Claims::default();
        let w = waker().unwrap();
        assert!(c.try_claim(1, 0, 0, 4096, w.as_raw_fd()));
        assert!(
            c.try_claim(2, 0, 4096, 4096, w.as_raw_fd()),
            "adjacent is not overlapping"
        );
        assert!(!c.try_claim(2, 1, 4095, 2, w.as_raw_fd()));
        c.release(1, 0);
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer.
        let n = unsafe { libc::read(w.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "the waiter was woken");
        assert!(
            !c.try_claim(2, 1, 4095, 2, w.as_raw_fd()),
            "still overlaps conn 2's claim"
        );
        c.release(2, 0);
        assert!(c.try_claim(2, 1, 4095, 2, w.as_raw_fd()));
    }
}
