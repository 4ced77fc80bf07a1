//! A thin owner of one io_uring: pushing entries, waiting, and reaping
//! completions. All of the splitter's io_uring unsafety is here and in the
//! `SAFETY` arguments of the callers of [`Uring::push`].

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
