//! Resync: sending source data read from the disk, in the ordered stream.
//!
//! Two kinds of pass. A **full pass** sends the whole disk, chunk by chunk
//! in offset order (when the target says its replica needs one: a disk that
//! held data before its ring, a recreated ring, lost records); the target
//! records how far it got, so a killed pass resumes near where it stopped.
//! A **dirty pass** resends the extents of the ring's dirty bitmap (changes
//! that overflowed the ring, or were in flight at a crash); their bits are
//! cleared only once the target acknowledged the batch durable, and only if
//! no new mark raced the clear.
//!
//! Why the order is right (see docs/ARCHITECTURE.md, "Resync order"): a
//! chunk is tagged with the ring's next sequence number T, read from the
//! disk afterwards, and enters the stream right after ring record T-1. Every
//! record below T was captured before the read, and the splitter captures a
//! change only once it is on the disk, so the chunk holds their effect or
//! newer data; every record from T on is captured after the tag was taken
//! and applied after the chunk, in the disk's order for overlapping writes.
//! A change that overflowed meanwhile is marked dirty after the mark count
//! was read, so its bits survive the clear and it is sent again. The chunk
//! carries T as its position; it takes no sequence number.
//! Unallocated and all-zero regions travel as SYNC_ZERO extents, without data.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use blockdev::{Backend, FileDisk};

use ring::format::{
    STATE_CRASH_DIRTY, STATE_NEEDS_INITIAL_SYNC, STATE_NEEDS_VERIFY, STATE_OVERFLOW,
};
use ring::{Consumer, Extent, SyncPhase};
use wire::frame::{
    block_hashes_frame_len, BlockHashes, HelloReply, MAX_BATCH_HASH_REPLY, REPLY_COMPARE,
    REPLY_DIRTY_PENDING, REPLY_FULL_SYNC,
};
use wire::records::{SYNC_END_DIRTY, SYNC_END_FULL_PASS};
use wire::{RecordKind, WireRecord};

use crate::error::{Error, Result};
use crate::stats::Stats;

/// Disk bytes per chunk by default (the unit read, tagged, hashed and sent).
pub const CHUNK: u64 = 1 << 20;
/// Largest chunk (a compare answer lists at most 4096 blocks).
pub const MAX_CHUNK: u64 = wire::records::MAX_HASHED_CHUNK as u64;

/// What a resync batch carried, kept until the target acknowledges it.
#[derive(Debug)]
struct Sent {
    /// Batch number in this connection.
    batch: u64,
    /// Dirty extents it resent (to clear once durable).
    dirty: Vec<Extent>,
    /// The ring's dirty-mark count read before the disk was read.
    marks: u64,
}

/// One resync batch ready to send.
#[derive(Debug)]
pub struct SyncBatch {
    /// Records in it.
    pub count: u32,
    /// Its position (the sequence of the next ring record).
    pub seq: u64,
}

/// The resync state of one shipper (kept across connections).
#[derive(Debug)]
pub struct Resync {
    /// The protected disk, read-only and unlocked (the splitter holds its lock).
    disk: Arc<FileDisk>,
    disk_size: u64,
    /// Next offset of the full pass, if one runs.
    full: Option<u64>,
    /// Extents of the current dirty pass not yet sent.
    dirty: VecDeque<Extent>,
    /// A dirty pass runs (its end is sent once everything was acknowledged).
    dirty_active: bool,
    inflight: VecDeque<Sent>,
    /// A prepared batch waiting for the stream to reach its tag: the batch,
    /// the dirty extents in it, the mark count read before the disk was.
    ready: Option<(SyncBatch, Vec<Extent>, u64)>,
    ready_plain: Vec<u8>,
    /// The full pass compares by hashes (the replica holds data).
    compare: bool,
    /// Chunks the target found different, with its block hashes.
    differing: VecDeque<BlockHashes>,
    /// The target still waits for a SYNC_END(DIRTY) (the connection that
    /// carried the last one dropped first).
    dirty_end_owed: bool,
    /// The dirty-mark count when the bitmap was last found empty.
    marks_clean: u64,
    /// The running online verify.
    verify: Option<crate::verify::Verify>,
    /// The newest verify id taken up (or done before this shipper started).
    verify_seen: u64,
    report_path: std::path::PathBuf,
    /// Disk bytes per chunk.
    chunk: u64,
    buf: Vec<u8>,
    last_log: Instant,
}

impl Resync {
    /// Read the source from `disk` (the protected disk itself, opened with
    /// [`FileDisk::open_unlocked`] read-only).
    pub fn open(
        disk: Arc<FileDisk>,
        disk_size: u64,
        ring: &Path,
        verify_done: u64,
        chunk: u64,
    ) -> Result<Resync> {
        if !(4096..=MAX_CHUNK).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "sync chunk {chunk} must be a power of two from 4K to {}M",
                MAX_CHUNK >> 20
            )));
        }
        Ok(Resync {
            disk,
            disk_size,
            full: None,
            dirty: VecDeque::new(),
            dirty_active: false,
            inflight: VecDeque::new(),
            ready: None,
            ready_plain: Vec::new(),
            compare: false,
            differing: VecDeque::new(),
            dirty_end_owed: false,
            marks_clean: u64::MAX,
            verify: None,
            verify_seen: verify_done,
            report_path: crate::verify::report_path(ring),
            chunk,
            // chunk <= 16 MiB, checked above; dirty pieces take up to 1 MiB.
            buf: vec![0u8; usize::try_from(chunk.max(1 << 20)).unwrap_or(1 << 20)],
            last_log: Instant::now(),
        })
    }

    /// Start a verify the ring asks for, when no pass that also compares
    /// by hashes is running (their answers would mix).
    fn maybe_start_verify(&mut self, c: &Consumer) {
        let ring::VerifyRequest { id, repair } = c.verify_request();
        if id <= self.verify_seen
            || self.verify.is_some()
            || self.full.is_some()
            || !self.differing.is_empty()
            || !self.inflight.is_empty()
        {
            return;
        }
        self.verify_seen = id;
        log::info!(
            "online verify {id} starting{}: comparing the disk with the replica by hashes",
            if repair { " (with repair)" } else { "" }
        );
        self.verify = Some(crate::verify::Verify::new(
            id,
            repair,
            self.disk.clone(),
            self.disk_size,
        ));
    }

    /// Finish a verify whose answers are all in: write its report.
    fn maybe_finish_verify(&mut self, c: &Consumer) {
        let quiet = self.inflight.is_empty() && self.ready.is_none();
        let Some(v) = self.verify.as_ref().filter(|v| v.finished(quiet)) else {
            return;
        };
        let r = v.report();
        let bytes: u64 = r.differing.iter().map(|e| e.len).sum();
        if r.differing.is_empty() {
            log::info!(
                "online verify {}: {} bytes compared, no differences ({:.1} s)",
                r.id,
                r.compared_bytes,
                r.seconds
            );
        } else {
            log::warn!(
                "online verify {}: {} bytes in {} extents differ{} ({:.1} s)",
                r.id,
                bytes,
                r.differing.len(),
                if r.repair {
                    ", resent"
                } else {
                    "; run `shipper verify --repair` to resend them"
                },
                r.seconds
            );
        }
        let tmp = self.report_path.with_extension("json.tmp");
        if std::fs::write(&tmp, r.to_json().to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.report_path))
            .is_err()
        {
            log::warn!(
                "cannot write the verify report {}",
                self.report_path.display()
            );
        }
        c.verify_progress(r.compared_bytes);
        c.verify_done(r.id);
        self.verify = None;
    }

    /// A new connection: decide what to send from the target's answer and
    /// the ring's state. Unacknowledged work of the last connection is
    /// simply done again (bits stay dirty until acknowledged).
    pub fn start(&mut self, reply: &HelloReply, c: &Consumer, stats: &Stats) {
        self.inflight.clear();
        self.ready = None;
        self.differing.clear();
        self.compare = reply.flags & REPLY_COMPARE != 0;
        self.dirty_end_owed = reply.flags & REPLY_DIRTY_PENDING != 0;
        if let Some(v) = self.verify.take() {
            // Its answers are lost with the connection: run it again.
            log::info!("online verify {} restarts on the new connection", v.id);
            self.verify_seen = v.id - 1;
        }
        self.dirty.clear();
        self.dirty_active = false;
        self.full = (reply.flags & REPLY_FULL_SYNC != 0).then(|| {
            let at = (reply.sync_cursor / self.chunk * self.chunk).min(self.disk_size);
            log::info!(
                "the replica needs a full pass over the disk{}: {} at {:.1}% ({} of {} bytes)",
                if reply.flags & REPLY_COMPARE != 0 {
                    ", comparing by hashes (it holds data)"
                } else {
                    ""
                },
                if at == 0 { "starting" } else { "resuming" },
                at as f64 * 100.0 / self.disk_size as f64,
                at,
                self.disk_size
            );
            at
        });
        stats.sync_full_total.store(
            if self.full.is_some() {
                self.disk_size
            } else {
                0
            },
            Ordering::Relaxed,
        );
        stats
            .sync_full_done
            .store(self.full.unwrap_or(0), Ordering::Relaxed);
        if self.full.is_some() {
            stats.set_sync_phase(if self.compare {
                SyncPhase::FullCompare
            } else {
                SyncPhase::FullCopy
            });
            stats
                .sync_started_ns
                .store(ring::wall_clock_ns(), Ordering::Relaxed);
        } else {
            stats.set_sync_phase(SyncPhase::None);
        }
        self.maybe_start_dirty(c, stats);
    }

    fn maybe_start_dirty(&mut self, c: &Consumer, stats: &Stats) {
        if self.dirty_active {
            return;
        }
        let overflowed = c.state() & (STATE_OVERFLOW | STATE_CRASH_DIRTY) != 0;
        let extents = c.dirty_extents();
        if extents.is_empty() && !overflowed && !self.dirty_end_owed {
            return;
        }
        // An empty pass still ends with SYNC_END(DIRTY) for a target that
        // never received the last one.
        self.dirty_end_owed = false;
        let bytes: u64 = extents.iter().map(|e| e.len).sum();
        log::info!(
            "resending {} dirty bytes in {} extents (changes that overflowed the ring or were in flight at a crash)",
            bytes,
            extents.len()
        );
        stats.sync_dirty_total.fetch_add(bytes, Ordering::Relaxed);
        if self.full.is_none() {
            stats.set_sync_phase(SyncPhase::DirtyExtents);
            stats
                .sync_started_ns
                .store(ring::wall_clock_ns(), Ordering::Relaxed);
        }
        self.dirty = extents.into();
        self.dirty_active = true;
    }

    /// Work to send now.
    pub fn has_work(&mut self, c: &Consumer) -> bool {
        self.ready.is_none() && self.has_more(c)
    }

    /// The dirty bitmap may hold bits: scanned only when the mark count
    /// moved since it was last found clean (a scan reads the whole bitmap).
    fn bitmap_may_be_dirty(&mut self, c: &Consumer) -> bool {
        let marks = c.dirty_marks();
        if marks == self.marks_clean {
            return false;
        }
        if c.dirty_bytes() > 0 {
            return true;
        }
        self.marks_clean = marks;
        false
    }

    fn has_more(&mut self, c: &Consumer) -> bool {
        self.verify.is_some()
            || c.verify_request().id > self.verify_seen
            || !self.differing.is_empty()
            || self.full.is_some()
            || !self.dirty.is_empty()
            || (self.dirty_active && self.inflight.is_empty())
            || c.state() & STATE_OVERFLOW != 0
            || self.dirty_end_owed
            || self.bitmap_may_be_dirty(c)
    }

    /// Encode the next resync batch into `plain` (cleared by the caller),
    /// at most about `max_bytes` of disk data, positioned at `seq`.
    pub fn prepare(&mut self, c: &Consumer, max_bytes: u64, stats: &Stats) -> Result<()> {
        if self.ready.is_some() {
            return Ok(());
        }
        self.maybe_start_dirty(c, stats);
        self.maybe_finish_verify(c);
        self.maybe_start_verify(c);
        // The dirty-mark count first, then the tag: a change marked after
        // the count keeps its bits; one marked before it was on the disk
        // before the tag was taken, so every ring record it overwrote is
        // below the tag (overlapping writes are captured in disk order).
        let marks = c.dirty_marks();
        // The tag: every ring record below it was captured before the disk
        // is read below, so the chunk goes into the stream after them.
        let seq = c.head_next_seq().max(1);
        let mut plain = std::mem::take(&mut self.ready_plain);
        plain.clear();
        let plain = &mut plain;
        let mut count = 0u32;
        let mut covered = 0u64;
        // What this batch's SYNC_HASH records may ask the target to answer
        // (wire::frame::MAX_BATCH_HASH_REPLY at most).
        let mut hash_reply = 0u64;
        let mut sent_dirty = Vec::new();
        while covered < max_bytes {
            // Blocks of compared chunks that differ come first: the target
            // is waiting for them to count the chunks done.
            if let Some(bh) = self.differing.pop_front() {
                count += self.send_differing(plain, seq, &bh, stats)?;
                covered += u64::from(bh.len);
                continue;
            }
            // Then the full pass (it is what makes a replica usable at all).
            if let Some(at) = self.full {
                if at >= self.disk_size {
                    if self.compare && (!self.inflight.is_empty() || count > 0) {
                        // Every BLOCK_HASHES answer must be in before the end.
                        break;
                    }
                    self.record(
                        plain,
                        seq,
                        RecordKind::SyncEnd,
                        SYNC_END_FULL_PASS,
                        0,
                        false,
                    );
                    count += 1;
                    self.full = None;
                    stats.set_sync_phase(if self.dirty_active {
                        SyncPhase::DirtyExtents
                    } else {
                        SyncPhase::None
                    });
                    // The pass is in the stream: the ring's flags have done
                    // their job (the target keeps its own state).
                    c.clear_state(STATE_NEEDS_INITIAL_SYNC | STATE_NEEDS_VERIFY);
                    log::info!("full pass sent ({} bytes)", self.disk_size);
                    break;
                }
                let n = self.chunk.min(self.disk_size - at);
                if self.compare {
                    // n <= the chunk, at most 16 MiB.
                    let answer = block_hashes_frame_len(u32::try_from(n).unwrap_or(u32::MAX));
                    if hash_reply + answer > MAX_BATCH_HASH_REPLY {
                        break;
                    }
                    hash_reply += answer;
                    count += self.hash_chunk(plain, seq, at, n, stats)?;
                    // Hashes are small: a batch covers more disk.
                    covered += n / 16;
                    self.full = Some(at + n);
                    stats.sync_full_done.store(at + n, Ordering::Relaxed);
                    continue;
                }
                count += self.chunk(plain, seq, at, n, true, stats)?;
                covered += n;
                self.full = Some(at + n);
                stats.sync_full_done.store(at + n, Ordering::Relaxed);
                continue;
            }
            if let Some(e) = self.dirty.pop_front() {
                // Whole bitmap granules (at most 1 MiB) per piece, so that
                // acknowledged pieces clear their bits.
                let n = e.len.min(self.chunk.max(1 << 20));
                if n < e.len {
                    self.dirty.push_front(Extent {
                        offset: e.offset + n,
                        len: e.len - n,
                    });
                }
                count += self.chunk(plain, seq, e.offset, n, false, stats)?;
                sent_dirty.push(Extent {
                    offset: e.offset,
                    len: n,
                });
                stats.sync_dirty_done.fetch_add(n, Ordering::Relaxed);
                covered += n;
                continue;
            }
            if self.dirty_active && self.inflight.is_empty() && self.ready.is_none() && count == 0 {
                // Everything of this pass is acknowledged; the bitmap says
                // whether marks came in meanwhile.
                if c.dirty_bytes() > 0 {
                    self.dirty_active = false;
                    self.maybe_start_dirty(c, stats);
                    continue;
                }
                let before = c.dirty_marks();
                c.clear_state(STATE_OVERFLOW | STATE_CRASH_DIRTY);
                if c.dirty_marks() != before || c.dirty_bytes() > 0 {
                    // A change overflowed meanwhile: keep going.
                    c.set_state(STATE_OVERFLOW);
                    self.dirty_active = false;
                    self.maybe_start_dirty(c, stats);
                    continue;
                }
                self.record(plain, seq, RecordKind::SyncEnd, SYNC_END_DIRTY, 0, false);
                count += 1;
                self.dirty_active = false;
                if self.full.is_none() {
                    stats.set_sync_phase(SyncPhase::None);
                }
                log::info!(
                    "dirty extents resent and acknowledged; the ring's overflow is resolved"
                );
            }
            break;
        }
        if self.last_log.elapsed().as_secs() >= 5
            && stats.sync_full_total.load(Ordering::Relaxed) > 0
        {
            self.last_log = Instant::now();
            let done = stats.sync_full_done.load(Ordering::Relaxed);
            log::info!(
                "full pass: {:.1}% ({done} of {} bytes)",
                done as f64 * 100.0 / self.disk_size as f64,
                self.disk_size
            );
        }
        if let Some(v) = &mut self.verify {
            if covered < max_bytes {
                count += v.fill(plain, seq, max_bytes - covered, &mut hash_reply)?;
                c.verify_progress(v.compared());
            }
        }
        self.ready_plain = std::mem::take(plain);
        log::debug!("resync batch prepared: {count} records at tag {seq}");
        if count > 0 {
            self.ready = Some((SyncBatch { count, seq }, sent_dirty, marks));
        }
        Ok(())
    }

    /// The tag of the prepared batch: it may enter the stream once every
    /// ring record below it was sent.
    pub fn ready_tag(&self) -> Option<u64> {
        self.ready.as_ref().map(|(b, _, _)| b.seq)
    }

    /// Hand over the prepared batch: its plain records are swapped into
    /// `plain` (whose buffer the next batch is prepared in); it is batch
    /// `batch_no` of the connection.
    pub fn take_ready(&mut self, plain: &mut Vec<u8>, batch_no: u64) -> Option<SyncBatch> {
        let (b, dirty, marks) = self.ready.take()?;
        std::mem::swap(plain, &mut self.ready_plain);
        self.inflight.push_back(Sent {
            batch: batch_no,
            dirty,
            marks,
        });
        Some(b)
    }

    fn record(
        &self,
        plain: &mut Vec<u8>,
        seq: u64,
        kind: RecordKind,
        offset: u64,
        len: u32,
        full: bool,
    ) {
        let payload: &[u8] = if kind == RecordKind::SyncData {
            &self.buf[..len as usize]
        } else {
            &[]
        };
        WireRecord {
            seq,
            kind,
            offset,
            len,
            after_gap: false,
            full_pass: full,
            time_ns: ring::wall_clock_ns(),
            payload,
        }
        .encode(plain);
    }

    /// Read `len` bytes at `offset` and encode them: SYNC_ZERO for holes and
    /// zeroes, SYNC_DATA otherwise.
    fn chunk(
        &mut self,
        plain: &mut Vec<u8>,
        seq: u64,
        offset: u64,
        len: u64,
        full: bool,
        stats: &Stats,
    ) -> Result<u32> {
        // len <= the chunk (at most 16 MiB).
        let n = usize::try_from(len).unwrap_or(0);
        let small = u32::try_from(len).unwrap_or(0);
        if self.is_hole(offset, len) {
            self.record(plain, seq, RecordKind::SyncZero, offset, small, full);
            stats.sync_zero_bytes.fetch_add(len, Ordering::Relaxed);
            return Ok(1);
        }
        self.disk
            .read_at(offset, &mut self.buf[..n])
            .map_err(|e| Error::Invalid(format!("reading the disk at {offset} for resync: {e}")))?;
        if all_zero(&self.buf[..n]) {
            self.record(plain, seq, RecordKind::SyncZero, offset, small, full);
            stats.sync_zero_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            self.record(plain, seq, RecordKind::SyncData, offset, small, full);
            stats.sync_data_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(1)
    }

    /// The whole range is unallocated (files only; block devices say no).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.disk.is_hole(offset, len)
    }

    /// Hash a chunk of a compared full pass: SYNC_ZERO when it reads as
    /// zeroes (no compare needed), else SYNC_HASH with its blake3 hash.
    fn hash_chunk(
        &mut self,
        plain: &mut Vec<u8>,
        seq: u64,
        offset: u64,
        len: u64,
        stats: &Stats,
    ) -> Result<u32> {
        let n = usize::try_from(len).unwrap_or(0);
        let small = u32::try_from(len).unwrap_or(0);
        if !self.is_hole(offset, len) {
            self.disk.read_at(offset, &mut self.buf[..n]).map_err(|e| {
                Error::Invalid(format!("reading the disk at {offset} for resync: {e}"))
            })?;
            stats.sync_compared_bytes.fetch_add(len, Ordering::Relaxed);
            if !all_zero(&self.buf[..n]) {
                let h = blake3::hash(&self.buf[..n]);
                WireRecord {
                    seq,
                    kind: RecordKind::SyncHash,
                    offset,
                    len: small,
                    after_gap: false,
                    full_pass: true,
                    time_ns: ring::wall_clock_ns(),
                    payload: h.as_bytes(),
                }
                .encode(plain);
                return Ok(1);
            }
        }
        self.record(plain, seq, RecordKind::SyncZero, offset, small, true);
        stats.sync_zero_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(1)
    }

    /// The target's block hashes of a chunk that differs: read the chunk
    /// again (after the new tag), send the blocks that differ, then mark
    /// the chunk done.
    fn send_differing(
        &mut self,
        plain: &mut Vec<u8>,
        seq: u64,
        bh: &BlockHashes,
        stats: &Stats,
    ) -> Result<u32> {
        let len = u64::from(bh.len);
        let n = bh.len as usize;
        if bh
            .offset
            .checked_add(len)
            .is_none_or(|e| e > self.disk_size)
            || n > self.buf.len()
        {
            return Err(Error::Invalid(format!(
                "the target sent block hashes for {}+{len}, outside the disk",
                bh.offset
            )));
        }
        self.disk
            .read_at(bh.offset, &mut self.buf[..n])
            .map_err(|e| {
                Error::Invalid(format!("reading the disk at {} for resync: {e}", bh.offset))
            })?;
        let mut count = 0;
        for (at, from, to) in crate::verify::differing_runs(&self.buf[..n], bh.offset, bh) {
            let rec_len = u32::try_from(to - from).unwrap_or(0);
            WireRecord {
                seq,
                kind: RecordKind::SyncData,
                offset: at,
                len: rec_len,
                after_gap: false,
                full_pass: false,
                time_ns: ring::wall_clock_ns(),
                payload: &self.buf[from..to],
            }
            .encode(plain);
            stats
                .sync_data_bytes
                .fetch_add(u64::from(rec_len), Ordering::Relaxed);
            count += 1;
        }
        WireRecord {
            seq,
            kind: RecordKind::SyncChunkDone,
            offset: bh.offset,
            len: bh.len,
            after_gap: false,
            full_pass: true,
            time_ns: ring::wall_clock_ns(),
            payload: &[],
        }
        .encode(plain);
        Ok(count + 1)
    }

    /// The target's answer to a SYNC_HASH whose chunk differs.
    pub fn block_hashes(&mut self, bh: BlockHashes) {
        match &mut self.verify {
            Some(v) => v.answer(bh),
            None => self.differing.push_back(bh),
        }
    }

    /// The target acknowledged the first `batches` batches of this connection.
    pub fn acked(&mut self, batches: u64, c: &Consumer) {
        while self.inflight.front().is_some_and(|s| s.batch <= batches) {
            if let Some(s) = self.inflight.pop_front() {
                if !s.dirty.is_empty() && !c.clear_resent(&s.dirty, s.marks) {
                    log::debug!(
                        "a change was marked dirty while its extent was resent; it goes again"
                    );
                }
            }
        }
    }
}

fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words.all(|w| w.iter().fold(0u8, |a, &x| a | x) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}
