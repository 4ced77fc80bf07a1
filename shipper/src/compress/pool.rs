//! Compression threads (`--compress-threads`): batches go in numbered, come
//! back sealed in any order; the session sends them in number order.
//!
//! Bounded by its user: the session keeps at most threads + 1 batches in
//! the pipeline, so the queue, and the buffers it holds, stay that small.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Choice, Sealed, Zstd};
use crate::error::{Error, Result};

/// A batch to seal.
#[derive(Debug)]
pub struct Job {
    /// The caller's number for it.
    pub id: u64,
    /// Its plain records.
    pub plain: Vec<u8>,
    /// A buffer for the packed bytes (reused).
    pub packed: Vec<u8>,
    /// What to do.
    pub choice: Choice,
    /// Probe how it compresses (see [`Zstd::seal`]).
    pub probe: bool,
}

/// A sealed batch, with its buffers back.
#[derive(Debug)]
pub struct Done {
    /// The job's number.
    pub id: u64,
    /// Its plain records.
    pub plain: Vec<u8>,
    /// The packed bytes (the payload when sealed as zstd).
    pub packed: Vec<u8>,
    /// The outcome.
    pub sealed: Result<Sealed>,
}

/// Run `job` with `z`.
pub fn run(z: &mut Zstd, mut job: Job) -> Done {
    let sealed = z.seal(&job.plain, job.choice, job.probe, &mut job.packed);
    Done {
        id: job.id,
        plain: job.plain,
        packed: job.packed,
        sealed,
    }
}

/// A fixed set of compression threads.
#[derive(Debug)]
pub struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Start `n` threads (at least one).
    pub fn new(n: usize) -> Result<Pool> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let queue = Arc::clone(&queue);
            let done_tx = done_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("zstd-{i}"))
                .spawn(move || {
                    let mut z = Zstd::default();
                    loop {
                        // The lock only guards taking the next job.
                        let job = queue
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        let Ok(job) = job else { return };
                        if done_tx.send(run(&mut z, job)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Invalid(format!("cannot start a compression thread: {e}")))?;
            threads.push(t);
        }
        Ok(Pool {
            jobs: Some(jobs),
            done,
            threads,
        })
    }

    /// Queue a job.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| Error::Invalid("the compression threads are gone".into()))
    }

    /// A finished job, if one is ready.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// A finished job, waiting at most `d`.
    pub fn done_within(&self, d: std::time::Duration) -> Option<Done> {
        self.done.recv_timeout(d).ok()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the queue ends every thread after its current job.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_come_back_sealed_with_their_buffers() {
        let pool = Pool::new(2).unwrap_or_else(|e| panic!("{e}"));
        let text: Vec<u8> = (0..(1 << 18)).map(|i| b"abcabd"[i % 6]).collect();
        for id in 0..6 {
            pool.submit(Job {
                id,
                plain: text.clone(),
                packed: Vec::new(),
                choice: if id.is_multiple_of(2) {
                    Choice::Zstd(1)
                } else {
                    Choice::Stored
                },
                probe: false,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut ids = Vec::new();
        while ids.len() < 6 {
            let d = pool
                .done_within(std::time::Duration::from_secs(10))
                .unwrap_or_else(|| panic!("a job did not come back"));
            let s = d.sealed.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.plain_crc, crc32c::crc32c(&text));
            assert_eq!(d.plain, text);
            let want = if d.id.is_multiple_of(2) {
                wire::frame::Codec::Zstd
            } else {
                wire::frame::Codec::Stored
            };
            assert_eq!(s.codec, want);
            ids.push(d.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..6).collect::<Vec<_>>());
        drop(pool); // joins the threads
    }
}
