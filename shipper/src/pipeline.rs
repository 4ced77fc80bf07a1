//! The batches between the ring and the link: encoded in sequence order,
//! sealed (checksummed, compressed per the [`Policy`]) on the shipper's
//! thread or the compression [`Pool`], and handed back for sending in the
//! order they went in, whatever order the threads finish them in.
//!
//! At most `threads + 1` batches are in it (each holds its plain bytes and
//! a packed buffer, at most two batch sizes), and its buffers are reused.

use std::collections::VecDeque;

use wire::frame::{BatchHeader, Codec};

use crate::compress::policy::Policy;
use crate::compress::pool::{self, Done, Job, Pool};
use crate::compress::{Choice, Sealed, Zstd};
use crate::error::{Error, Result};

/// Where a batch's records come from.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// First sequence (a resync batch: its tag).
    pub first: u64,
    /// Last sequence.
    pub last: u64,
    /// Records in it.
    pub count: u32,
    /// Capture time of its first ring record; 0 for a resync batch.
    pub first_time_ns: u64,
}

struct Entry {
    id: u64,
    meta: Meta,
    choice: Choice,
    done: Option<(Vec<u8>, Vec<u8>, Sealed)>,
}

/// A batch ready to send, in order.
#[derive(Debug)]
pub struct Ready {
    /// Its header.
    pub header: BatchHeader,
    /// Where it came from.
    pub meta: Meta,
    /// What the policy had chosen when it was pushed.
    pub choice: Choice,
    plain: Vec<u8>,
    packed: Vec<u8>,
    packed_len: usize,
}

impl Ready {
    /// The bytes after the header.
    pub fn payload(&self) -> &[u8] {
        match self.header.codec {
            Codec::Zstd => &self.packed[..self.packed_len],
            Codec::Stored => &self.plain,
        }
    }
}

/// The pipeline.
pub struct Pipeline {
    pool: Option<Pool>,
    zstd: Zstd,
    /// The choice of compression (public for the session's accounting).
    pub policy: Policy,
    queue: VecDeque<Entry>,
    free: Vec<Vec<u8>>,
    next_id: u64,
    depth: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("queued", &self.queue.len())
            .field("depth", &self.depth)
            .finish()
    }
}

impl Pipeline {
    /// `threads` compression threads (0: seal on the caller's thread);
    /// `fixed`: `--zstd-level` when given (otherwise adaptive).
    pub fn new(fixed: Option<i32>, threads: usize) -> Result<Pipeline> {
        Ok(Pipeline {
            pool: if threads > 0 {
                Some(Pool::new(threads)?)
            } else {
                None
            },
            zstd: Zstd::default(),
            policy: Policy::new(fixed, threads),
            queue: VecDeque::new(),
            free: Vec::new(),
            next_id: 0,
            depth: threads + 1,
        })
    }

    /// Batches in it.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing in it.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// No room for another batch.
    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.depth
    }

    /// Batches not yet sealed (the loop should poll soon).
    pub fn sealing(&self) -> bool {
        self.queue.iter().any(|e| e.done.is_none())
    }

    /// Forget every batch (a new connection resends from the ring); jobs
    /// still on the threads are dropped when they come back.
    pub fn reset(&mut self) {
        self.queue.clear();
    }

    /// A buffer to encode the next batch into.
    pub fn spare(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    /// Return a buffer [`Pipeline::spare`] gave that was not used.
    pub fn give_back(&mut self, b: Vec<u8>) {
        self.recycle_buf(b);
    }

    fn recycle_buf(&mut self, b: Vec<u8>) {
        if self.free.len() < 2 * self.depth + 2 && b.capacity() > 0 {
            self.free.push(b);
        }
    }

    /// Add a batch: `plain` records from `meta`.
    pub fn push(&mut self, plain: Vec<u8>, meta: Meta) -> Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let (choice, _) = self.policy.current();
        let probe = self.policy.wants_probe();
        let job = Job {
            id,
            plain,
            packed: self.spare(),
            choice,
            probe,
        };
        self.queue.push_back(Entry {
            id,
            meta,
            choice,
            done: None,
        });
        match &self.pool {
            // Stored costs a checksum: not worth a thread hop.
            Some(p) if choice != Choice::Stored => p.submit(job),
            _ => {
                let d = pool::run(&mut self.zstd, job);
                self.finished(d)
            }
        }
    }

    fn finished(&mut self, d: Done) -> Result<()> {
        let Some(i) = self.queue.iter().position(|e| e.id == d.id) else {
            // A job of an earlier connection (reset since): whatever came
            // of it, it is not this connection's.
            self.recycle_buf(d.plain);
            self.recycle_buf(d.packed);
            return Ok(());
        };
        let sealed = d.sealed?;
        self.policy
            .zstd(sealed.zstd_in, sealed.zstd_out, sealed.zstd_ns);
        if let Some(e) = self.queue.get_mut(i) {
            e.done = Some((d.plain, d.packed, sealed));
        }
        Ok(())
    }

    /// Capture time of the oldest ring record in the pipeline (read from
    /// the ring, not yet sent), for the lag.
    pub fn oldest_time_ns(&self) -> Option<u64> {
        self.queue
            .iter()
            .map(|e| e.meta.first_time_ns)
            .find(|&t| t != 0)
    }

    /// Take in what the threads finished, waiting at most `wait` for the
    /// next one when the front batch is still being sealed.
    pub fn poll(&mut self, wait: std::time::Duration) -> Result<()> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let mut got = Vec::new();
        while let Some(d) = pool.try_done() {
            got.push(d);
        }
        let front_waits = self.queue.front().is_some_and(|e| e.done.is_none());
        if got.is_empty() && front_waits && !wait.is_zero() {
            if let Some(d) = pool.done_within(wait) {
                got.push(d);
            }
        }
        for d in got {
            self.finished(d)?;
        }
        Ok(())
    }

    /// The next batch in order, when it is sealed.
    pub fn pop_ready(&mut self) -> Result<Option<Ready>> {
        if self.queue.front().is_none_or(|e| e.done.is_none()) {
            return Ok(None);
        }
        let Some(Entry {
            meta,
            choice,
            done: Some((plain, packed, s)),
            ..
        }) = self.queue.pop_front()
        else {
            return Ok(None);
        };
        let plain_len = u32::try_from(plain.len())
            .map_err(|_| Error::Invalid("batch larger than 4 GiB".into()))?;
        Ok(Some(Ready {
            header: BatchHeader {
                first_seq: meta.first,
                last_seq: meta.last,
                count: meta.count,
                codec: s.codec,
                plain_len,
                plain_crc: s.plain_crc,
            },
            meta,
            choice,
            plain,
            packed,
            packed_len: s.packed_len,
        }))
    }

    /// Give a sent batch's buffers back.
    pub fn recycle(&mut self, r: Ready) {
        self.recycle_buf(r.plain);
        self.recycle_buf(r.packed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_leave_in_the_order_they_came_whatever_the_threads_do() {
        for threads in [0, 2] {
            let mut p = Pipeline::new(Some(1), threads).unwrap_or_else(|e| panic!("{e}"));
            let mut sent = Vec::new();
            for n in 0..20u64 {
                // Big and small batches, so later ones finish first.
                let len = if n % 3 == 0 { 1 << 20 } else { 4096 };
                let plain: Vec<u8> = (0..len).map(|i: u64| ((i * (n + 1)) % 7) as u8).collect();
                while p.is_full() {
                    p.poll(std::time::Duration::from_millis(100))
                        .unwrap_or_else(|e| panic!("{e}"));
                    while let Some(r) = p.pop_ready().unwrap_or_else(|e| panic!("{e}")) {
                        sent.push(r.header.first_seq);
                        p.recycle(r);
                    }
                }
                p.push(
                    plain,
                    Meta {
                        first: n,
                        last: n,
                        count: 1,
                        first_time_ns: 0,
                    },
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
            while !p.is_empty() {
                p.poll(std::time::Duration::from_millis(100))
                    .unwrap_or_else(|e| panic!("{e}"));
                while let Some(r) = p.pop_ready().unwrap_or_else(|e| panic!("{e}")) {
                    assert_eq!(r.header.codec, Codec::Zstd);
                    let back = zstd::bulk::decompress(r.payload(), r.header.plain_len as usize)
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(crc32c::crc32c(&back), r.header.plain_crc);
                    sent.push(r.header.first_seq);
                    p.recycle(r);
                }
            }
            assert_eq!(sent, (0..20).collect::<Vec<_>>(), "{threads} threads");
        }
    }

    #[test]
    fn after_a_reset_jobs_of_the_old_connection_are_never_sent() {
        let mut p = Pipeline::new(Some(1), 2).unwrap_or_else(|e| panic!("{e}"));
        let meta = |n| Meta {
            first: n,
            last: n,
            count: 1,
            first_time_ns: n,
        };
        let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 7) as u8).collect();
        p.push(big.clone(), meta(1))
            .unwrap_or_else(|e| panic!("{e}"));
        p.push(big, meta(2)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.oldest_time_ns(), Some(1));
        p.reset();
        assert!(p.is_empty() && p.oldest_time_ns().is_none());
        p.push(vec![3u8; 4096], meta(3))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut sent = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !p.is_empty() && std::time::Instant::now() < deadline {
            p.poll(std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| panic!("{e}"));
            while let Some(r) = p.pop_ready().unwrap_or_else(|e| panic!("{e}")) {
                sent.push(r.header.first_seq);
                p.recycle(r);
            }
        }
        // Let the old jobs come back too: they are dropped, not queued.
        std::thread::sleep(std::time::Duration::from_millis(200));
        p.poll(std::time::Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, vec![3]);
        assert!(p.pop_ready().unwrap_or_else(|e| panic!("{e}")).is_none());
    }
}
