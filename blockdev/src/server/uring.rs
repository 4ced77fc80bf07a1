//! A thin owner of one io_uring: pushing entries, waiting, and reaping
//! completions. All of the server's io_uring unsafety is here and in the
//! `SAFETY` arguments of the callers of [`Uring::push`]; the entries that
//! point at no memory (polls, cancels, syncs, fallocates) have a safe
//! wrapper, [`Uring::push_no_buffer`].
//!
//! Dropping a `Uring` cancels every entry still submitted and waits for
//! all of them to complete, so a buffer an entry points at is never freed
//! while the kernel may still write into it, whatever path dropped it.

use std::io;
use std::time::Duration;

use io_uring::{squeue, types, IoUring};

/// One io_uring with a count of submitted, not yet completed entries.
pub(crate) struct Uring {
    ring: IoUring,
    pending: usize,
}

impl Uring {
    /// A ring for one thread: completions are processed only when that
    /// thread waits (single issuer, deferred task work, kernel 6.1+), which
    /// saves the interrupts of the default mode. Older kernels get a plain ring.
    pub(crate) fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        Ok(Uring { ring, pending: 0 })
    }

    /// Entries submitted whose completion has not been reaped.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Queue one entry, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points at must stay allocated, unmoved and
    /// otherwise unused until the completion carrying the entry's user_data
    /// has been reaped by [`Uring::reap`].
    pub(crate) unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive its
            // completion (this function's contract).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.pending += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Queue an entry that points at no memory (poll, cancel, fsync,
    /// sync_file_range, fallocate, fadvise, nop). The caller vouches for
    /// that by building the entry with one of [`NoBuffer`]'s constructors.
    pub(crate) fn push_no_buffer(&mut self, entry: NoBuffer) -> io::Result<()> {
        // SAFETY: a NoBuffer entry points at no memory (its constructors
        // only build such opcodes), so nothing must outlive it.
        unsafe { self.push(&entry.0) }
    }

    /// Submit queued entries and wait for at least one completion, or until
    /// `timeout` passes.
    pub(crate) fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Move every available completion into `out` as (user_data, result).
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.clear();
        for cqe in self.ring.completion() {
            out.push((cqe.user_data(), cqe.result()));
        }
        self.pending -= out.len();
    }
}

/// An entry that points at no memory, so it is safe to submit.
pub(crate) struct NoBuffer(squeue::Entry);

impl NoBuffer {
    /// Wait for `events` on `fd`.
    pub(crate) fn poll(fd: std::os::fd::RawFd, events: i16, user_data: u64) -> NoBuffer {
        // poll flags are small positive constants.
        let ev = u32::try_from(events).unwrap_or(0);
        NoBuffer(
            io_uring::opcode::PollAdd::new(types::Fd(fd), ev)
                .build()
                .user_data(user_data),
        )
    }

    /// Cancel the entry carrying `target`.
    pub(crate) fn cancel(target: u64, user_data: u64) -> NoBuffer {
        NoBuffer(
            io_uring::opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data),
        )
    }
}

/// user_data of the cancels a drop submits.
const UD_DROP_CANCEL: u64 = u64::MAX;

impl Drop for Uring {
    fn drop(&mut self) {
        let mut rounds = 0u32;
        let mut sink = Vec::new();
        while self.pending > 0 {
            // Cancel everything still in flight (kernel 5.19+: ASYNC_CANCEL_ANY);
            // disk I/O that cannot be cancelled completes on its own.
            let e = io_uring::opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(UD_DROP_CANCEL);
            // SAFETY: a cancel entry points at no memory.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.pending += 1;
            }
            let _ = self.submit_and_wait(Some(Duration::from_millis(100)));
            self.reap(&mut sink);
            rounds += 1;
            if rounds.is_multiple_of(100) {
                log::warn!(
                    "io_uring: still waiting for {} operation(s) to complete before freeing their buffers",
                    self.pending
                );
            }
        }
    }
}
