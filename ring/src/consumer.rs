//! The consumer side: the shipper (or any drain) reads validated records in
//! order and releases them once the receiver holds them durably. One
//! consumer per ring at a time (enforced with a lock).

use std::collections::VecDeque;
use std::path::Path;

use crate::bitmap::{self, Extent};
use crate::control::{ControlPage, ShipProgress, VerifyRequest};
use crate::error::{Error, Result};
use crate::file::{RingFile, Role, Scanned};
use crate::format::*;

/// A record read from the ring; its payload lives in the [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Sequence number.
    pub seq: u64,
    /// What happened.
    pub kind: Kind,
    /// Disk offset (MARK: its flags, [`MARK_APP`]).
    pub offset: u64,
    /// Disk bytes covered (MARK: name length).
    pub len: u32,
    /// Capture time, ns since the Unix epoch.
    pub time_ns: u64,
    /// The sequence jumped here (records were lost to a torn tail).
    pub after_gap: bool,
    /// WRITE data, or a MARK's name (copied out of the shared mapping).
    pub payload: &'a [u8],
}

impl Record<'_> {
    /// A MARK taken application-consistent (bit 0 of its offset field,
    /// [`MARK_APP`]); false for a crash-consistent mark and for any other
    /// kind. Other bits of a mark's offset are reserved and ignored.
    pub fn is_app_mark(&self) -> bool {
        self.kind == Kind::Mark && self.offset & MARK_APP != 0
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    seq: u64,
    kind: Kind,
    offset: u64,
    len: u32,
    time_ns: u64,
    after_gap: bool,
    start: usize,
    end: usize,
}

/// Records read by [`Consumer::read`], with their payloads in one buffer.
/// Reuse one batch for every read: its memory is kept, so draining does not
/// allocate per record.
#[derive(Debug, Default)]
pub struct Batch {
    metas: Vec<Meta>,
    /// Payload bytes; only `..used` belong to this batch (the rest is kept
    /// allocated and initialised for the next read).
    data: Vec<u8>,
    used: usize,
    /// Bytes left before each record's payload in `data` (see
    /// [`Batch::with_header_room`]).
    room: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// An empty batch that leaves `room` bytes before each record's payload
    /// in its buffer, for a caller that writes its own header for each
    /// record there and then uses the buffer as it is ([`Batch::bytes_mut`]):
    /// the shipper's wire records, so that a payload is copied once, out of
    /// the shared mapping, on its way from the ring to the socket.
    pub fn with_header_room(room: usize) -> Batch {
        Batch {
            room,
            ..Batch::default()
        }
    }

    /// The batch's bytes: for each record, the header room then its payload,
    /// back to back.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.used]
    }

    /// Where record `i`'s header room starts in [`Batch::bytes_mut`].
    pub fn room_at(&self, i: usize) -> Option<usize> {
        self.metas.get(i).map(|m| m.start - self.room)
    }

    /// Take the batch's bytes out (their length is what
    /// [`Batch::bytes_mut`] covers), leaving `replacement` as the buffer for
    /// the next read; the batch is empty afterwards. A replacement that was
    /// such a buffer before keeps its initialised bytes, so reading into it
    /// again does not clear it first.
    pub fn take_bytes(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        let mut bytes = std::mem::replace(&mut self.data, replacement);
        bytes.truncate(self.used);
        self.clear();
        bytes
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// No records.
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Record `i`.
    pub fn get(&self, i: usize) -> Option<Record<'_>> {
        self.metas.get(i).map(|m| Record {
            seq: m.seq,
            kind: m.kind,
            offset: m.offset,
            len: m.len,
            time_ns: m.time_ns,
            after_gap: m.after_gap,
            payload: &self.data[m.start..m.end],
        })
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        (0..self.metas.len()).filter_map(|i| self.get(i))
    }

    /// The last record's sequence number.
    pub fn last_seq(&self) -> Option<u64> {
        self.metas.last().map(|m| m.seq)
    }

    /// Forget the records, keep the memory.
    pub fn clear(&mut self) {
        self.metas.clear();
        self.used = 0;
    }
}

/// The reading side of a ring.
pub struct Consumer {
    rf: RingFile,
    read_pos: u64,
    read_seq: u64,
    /// When the released tail was last made durable.
    last_durable: std::time::Instant,
    /// (seq, position after it) of records read and not yet released.
    unreleased: VecDeque<(u64, u64)>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("path", &self.rf.path)
            .field("read_seq", &self.read_seq)
            .finish()
    }
}

impl Consumer {
    /// Open the ring at `path` as its one consumer.
    pub fn open(path: &Path) -> Result<Consumer> {
        let rf = RingFile::open(path)?;
        rf.lock(Role::Consumer)?;
        let read_pos = rf.get(live::TAIL);
        let read_seq = rf.get(live::TAIL_SEQ);
        Ok(Consumer {
            rf,
            read_pos,
            read_seq,
            last_durable: std::time::Instant::now(),
            unreleased: VecDeque::new(),
        })
    }

    /// The disk id of the ring.
    pub fn disk_id(&self) -> [u8; 16] {
        self.rf.disk_id
    }

    /// The disk size the ring was made for.
    pub fn disk_size(&self) -> u64 {
        self.rf.layout.disk_size
    }

    /// Sequence number of the next record [`Consumer::read`] returns.
    pub fn next_seq(&self) -> u64 {
        self.read_seq
    }

    /// Replace the contents of `out` with the published records after the
    /// last one read: at most `max_records`, and about `max_bytes` of
    /// payload. Returns how many (0: nothing new). A damaged record is an
    /// error naming its offset; it is never skipped.
    pub fn read(&mut self, max_records: usize, max_bytes: usize, out: &mut Batch) -> Result<usize> {
        self.read_below(max_records, max_bytes, u64::MAX, out)
    }

    /// Like [`Consumer::read`], but stop before the first record whose
    /// sequence is `stop_seq` or more (it stays unread).
    pub fn read_below(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        stop_seq: u64,
        out: &mut Batch,
    ) -> Result<usize> {
        out.clear();
        let head = self.rf.get(live::HEAD);
        let mut n = 0;
        while self.read_pos < head && n < max_records && (n == 0 || out.used < max_bytes) {
            let start = out.used + out.room;
            if out.room > 0 && out.data.len() < start {
                out.data.resize(start, 0);
            }
            match self
                .rf
                .read_record(self.read_pos, self.read_seq, &mut out.data, start)
            {
                Scanned::Skip(size) => self.read_pos += size,
                Scanned::Record(h, _) if h.seq >= stop_seq => break,
                Scanned::Record(h, size) => {
                    self.read_pos += size;
                    self.read_seq = h.seq + 1;
                    self.unreleased.push_back((h.seq, self.read_pos));
                    out.metas.push(Meta {
                        seq: h.seq,
                        kind: h.kind,
                        offset: h.offset,
                        len: h.len,
                        time_ns: h.time_ns,
                        after_gap: h.flags & FLAG_AFTER_GAP != 0,
                        start,
                        end: start + h.payload_len as usize,
                    });
                    out.used = start + h.payload_len as usize;
                    n += 1;
                }
                Scanned::Invalid(reason) => {
                    return Err(Error::Corrupt {
                        path: self.rf.path.clone(),
                        file_offset: self.rf.file_offset(self.read_pos),
                        expected_seq: self.read_seq,
                        reason,
                    })
                }
            }
        }
        Ok(n)
    }

    /// Release every record up to and including `seq`: the receiver holds
    /// them durably, so their space may be reused. The space becomes
    /// reusable for the producer only once the new tail is durable itself
    /// (so a power cut can never bring back a tail pointing at overwritten
    /// records); that sync is batched (it costs a device cache flush): it
    /// happens when an eighth of the ring was released since the last one,
    /// after 100 ms, when the producer is short of room (more than a quarter
    /// of the ring not yet reusable), or on [`Consumer::sync`].
    pub fn release(&mut self, seq: u64) -> Result<()> {
        let mut new_tail = None;
        while let Some(&(s, end)) = self.unreleased.front() {
            if s > seq {
                break;
            }
            new_tail = Some((end, s + 1));
            self.unreleased.pop_front();
        }
        let Some((tail, tail_seq)) = new_tail else {
            return Ok(());
        };
        self.rf.set(live::TAIL_SEQ, tail_seq);
        self.rf.set(live::TAIL, tail);
        let pending = tail - self.rf.get(live::DURABLE_TAIL);
        let head = self.rf.get(live::HEAD);
        // Sync now when the producer may be short of room, or in a while.
        let producer_short = head - self.rf.get(live::DURABLE_TAIL) > self.rf.layout.capacity / 4;
        if producer_short
            || pending >= self.rf.layout.capacity / 8
            || self.last_durable.elapsed() >= std::time::Duration::from_millis(100)
        {
            self.sync()?;
        }
        Ok(())
    }

    /// Make the released tail durable now and let the producer reuse the space.
    pub fn sync(&mut self) -> Result<()> {
        let tail = self.rf.get(live::TAIL);
        if tail == self.rf.get(live::DURABLE_TAIL) {
            return Ok(());
        }
        self.rf.sync_consumer_page().map_err(|source| Error::Io {
            path: self.rf.path.clone(),
            what: "syncing the released tail",
            source,
        })?;
        self.rf.set(live::DURABLE_TAIL, tail);
        self.last_durable = std::time::Instant::now();
        Ok(())
    }

    /// Forget what was read and not released: the next [`Consumer::read`]
    /// starts again at the oldest unreleased record. A shipper calls this
    /// after losing its connection, to resend what was not acknowledged.
    pub fn rewind(&mut self) {
        self.read_pos = self.rf.get(live::TAIL);
        self.read_seq = self.rf.get(live::TAIL_SEQ);
        self.unreleased.clear();
    }

    /// Check that `disk` is the disk this ring was made for.
    pub fn check_disk(&self, disk: &crate::DiskIdentity) -> Result<()> {
        self.rf.check_disk(disk)
    }

    /// Sequence of the next published record not yet read (None: all read).
    /// Every record below a NEXT_SEQ value read earlier is published
    /// (the producer stores HEAD before NEXT_SEQ).
    pub fn peek_seq(&self) -> Option<u64> {
        let head = self.rf.get(live::HEAD);
        let mut pos = self.read_pos;
        while pos < head {
            match self.rf.peek_seq(pos) {
                Err(skip) => pos += skip,
                Ok(Some(seq)) => return Some(seq),
                // Not a record header: the next read reports the damage.
                Ok(None) => return Some(self.read_seq),
            }
        }
        None
    }

    /// Bytes published but not yet read.
    pub fn unread_bytes(&self) -> u64 {
        self.rf.get(live::HEAD).saturating_sub(self.read_pos)
    }

    /// Capture time of the oldest unreleased record, if any.
    pub fn oldest_unreleased_ns(&self) -> Option<u64> {
        let head = self.rf.get(live::HEAD);
        let mut pos = self.rf.get(live::TAIL);
        let seq = self.rf.get(live::TAIL_SEQ);
        let mut scratch = Vec::new();
        while pos < head {
            match self.rf.read_record(pos, seq, &mut scratch, 0) {
                Scanned::Skip(n) => pos += n,
                Scanned::Record(h, _) => return Some(h.time_ns),
                Scanned::Invalid(_) => return None,
            }
        }
        None
    }

    /// Sequence of the oldest unreleased record.
    pub fn tail_seq(&self) -> u64 {
        self.rf.get(live::TAIL_SEQ)
    }

    /// Sequence the producer gives its next record.
    pub fn head_next_seq(&self) -> u64 {
        self.rf.get(live::NEXT_SEQ)
    }

    /// Bytes of the ring holding unreleased records.
    pub fn used_bytes(&self) -> u64 {
        self.rf
            .get(live::HEAD)
            .saturating_sub(self.rf.get(live::TAIL))
    }

    /// The ring's state flags (`format::STATE_*`).
    pub fn state(&self) -> u64 {
        self.rf.get(live::STATE)
    }

    /// Publish the shipper's progress in the ring file's control page,
    /// where `ring status` and the splitter's metrics read it.
    pub fn publish(&self, p: &ShipProgress) {
        ControlPage::new(&self.rf).publish(
            p,
            u64::from(std::process::id()),
            crate::file::wall_clock_ns(),
        );
    }

    /// The dirty extents (changes that overflowed the ring).
    pub fn dirty_extents(&self) -> Vec<Extent> {
        bitmap::extents(&self.rf)
    }

    /// Clear dirty extents once the receiver holds them durably (resync).
    /// Prefer [`Consumer::clear_resent`], which handles marks racing the clear.
    pub fn clear_dirty(&self, offset: u64, len: u64) {
        bitmap::clear(&self.rf, offset, len);
    }

    /// How many times the dirty bitmap was marked (cumulative). Read it
    /// before reading the disk for a resync.
    pub fn dirty_marks(&self) -> u64 {
        self.rf
            .shm
            .atomic(live::DIRTY_MARKS)
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The receiver holds `extents` durably, as read from the disk after
    /// [`Consumer::dirty_marks`] returned `marks_before`: clear their bits,
    /// unless a mark may have raced (then they stay dirty and are resent).
    /// Returns whether they were cleared.
    pub fn clear_resent(&self, extents: &[Extent], marks_before: u64) -> bool {
        if self.dirty_marks() != marks_before {
            return false;
        }
        for e in extents {
            bitmap::clear(&self.rf, e.offset, e.len);
        }
        if self.dirty_marks() != marks_before {
            // A change was marked between our check and our clear: its bit
            // may be one we just cleared.
            for e in extents {
                bitmap::mark(&self.rf, e.offset, e.len);
            }
            return false;
        }
        true
    }

    /// Bytes of the disk marked dirty.
    pub fn dirty_bytes(&self) -> u64 {
        bitmap::dirty_bytes(&self.rf)
    }

    /// The newest online verify asked for (id 0: none).
    pub fn verify_request(&self) -> VerifyRequest {
        ControlPage::new(&self.rf).verify_request()
    }

    /// Verify `id` finished (its report is written).
    pub fn verify_done(&self, id: u64) {
        ControlPage::new(&self.rf).set_verify_done(id);
    }

    /// Bytes the running verify has compared.
    pub fn verify_progress(&self, bytes: u64) {
        ControlPage::new(&self.rf).set_verify_progress(bytes);
    }

    /// Set state flags (`format::STATE_*`).
    pub fn set_state(&self, bits: u64) {
        self.rf.set_bits(live::STATE, bits);
    }

    /// Clear state flags (`format::STATE_*`) once what they stand for is
    /// resolved (the replica received the dirty extents, the initial sync
    /// ended).
    pub fn clear_state(&self, bits: u64) {
        self.rf
            .shm
            .atomic(live::STATE)
            .fetch_and(!bits, std::sync::atomic::Ordering::SeqCst);
        if bits & STATE_OVERFLOW != 0 {
            self.rf.set(live::OVERFLOW_SINCE, 0);
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Best effort: a failure only delays reuse until the next consumer.
        let _ = self.sync();
    }
}
