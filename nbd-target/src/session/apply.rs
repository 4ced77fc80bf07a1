//! The apply pipeline: a BATCH body in, verified whole (frame, zstd, plain
//! checksum, every record, every extent inside the disk, the BLOCK_HASHES
//! it may ask for), then its records applied in stream order to a
//! [`RecordSink`], and a commit that makes them durable (the sink's
//! commit, then the state file) before the driver acknowledges them.
//!
//! ```text
//!  BATCH body ─► verify whole ─► records in order ─┬─► RecordSink (write / zero / read / commit)
//!                                                  │     today: the replica (ReplicaWriter)
//!                                                  └─► Consistency (gaps, the full pass, SYNC_END)
//! ```
//!
//! [`RecordSink`] is the seam between decoded records and the replica.
//! Its one implementation today is [`ReplicaWriter`]. A journal
//! (recovery points, the next issue) is another implementation, a layer
//! between the decoded records and the replica: it keeps what it is given
//! (and the commits, the points a recovery point may name) and passes it
//! on to the replica it wraps, so the pipeline, its verification, its
//! ordering and its commit grouping stay as they are.
//!
//! Commit grouping is as before: the driver commits when no further frame
//! has already arrived, or when [`Apply::must_commit`] says so (the oldest
//! uncommitted batch is [`COMMIT_AGE`] old, or [`COMMIT_BYTES`] of extents
//! were applied since the last commit, when [`Apply::full`] also stops the
//! driver taking frames). So one sink commit, one state write and one ACK
//! may cover several batches.

use std::time::{Duration, Instant};

use wire::frame::{
    block_hashes_frame_len, Ack, BatchHeader, BlockHashes, Codec, ErrorCode, BATCH_HEADER_LEN,
    BLOCK_SIZE, FRAME_HEADER_LEN, MAX_BATCH_HASH_REPLY,
};
use wire::{RecordIter, RecordKind, WireError, WireRecord};

use super::Refusal;
use crate::consistency::Consistency;
use crate::replica::ReplicaWriter;
use crate::state::{Reason, StateFile};

/// Applied bytes after which the target makes them durable and acknowledges
/// even if more batches are already waiting.
pub const COMMIT_BYTES: u64 = 64 << 20;
/// Age of the oldest unacknowledged batch after which the target commits.
pub const COMMIT_AGE: Duration = Duration::from_millis(50);

/// Where decoded, verified records go, in stream order: the seam where a
/// journal will sit between the records and the replica.
pub trait RecordSink {
    /// Write `data` at `offset` (WRITE, SYNC_DATA).
    fn write(&mut self, offset: u64, data: &[u8]) -> crate::Result<()>;
    /// Make `offset..offset+len` read as zeroes (TRIM, ZERO, SYNC_ZERO).
    fn zero(&mut self, offset: u64, len: u64) -> crate::Result<()>;
    /// Read what the replica holds at `offset`, as it is after everything
    /// written before (SYNC_HASH compares it).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
    /// Make everything written so far durable. The state file (the applied
    /// seq) is written after it returns, and the ACK sent after that.
    fn commit(&mut self) -> crate::Result<()>;
    /// The next record or resync item: ring record `seq` (captured at
    /// `time_ns`), or (`sync`) a resync item tagged `seq + 1`, placed right
    /// after ring record `seq`; `consistent`: the replica is consistent as
    /// the record begins. The journal's positions come from here.
    fn position(&mut self, seq: u64, sync: bool, time_ns: u64, consistent: bool) {
        let _ = (seq, sync, time_ns, consistent);
    }
    /// A MARK record (at the last position given): its name and flags
    /// (the record's offset field: bit 0 application-consistent).
    fn mark(&mut self, name: &[u8], flags: u64) -> crate::Result<()> {
        let _ = (name, flags);
        Ok(())
    }
    /// The replica's consistency changed outside a record (a SYNC_END, a
    /// HEARTBEAT, the HELLO).
    fn consistency(&mut self, consistent: bool, reason: crate::state::Reason) {
        let _ = (consistent, reason);
    }
}

impl RecordSink for ReplicaWriter {
    fn write(&mut self, offset: u64, data: &[u8]) -> crate::Result<()> {
        ReplicaWriter::write(self, offset, data)
    }

    fn zero(&mut self, offset: u64, len: u64) -> crate::Result<()> {
        ReplicaWriter::zero(self, offset, len)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        ReplicaWriter::read(self, offset, buf)
    }

    fn commit(&mut self) -> crate::Result<()> {
        self.sync()
    }
}

/// What a handled batch adds to the live numbers.
#[derive(Debug, Clone, Copy)]
pub struct BatchDone {
    /// Its frame's bytes.
    pub wire_bytes: u64,
    /// Its records' bytes before compression.
    pub plain_bytes: u64,
}

/// One connection's apply side: the sink, the state file, the replica's
/// consistency and what is applied but not yet committed.
pub struct Apply<S: RecordSink> {
    sink: S,
    file: StateFile,
    consistency: Consistency,
    /// For messages.
    disk_id: String,
    disk_size: u64,
    /// Highest sequence applied (durable once committed).
    pending: u64,
    uncommitted: u64,
    uncommitted_since: Option<Instant>,
    plain: Vec<u8>,
    dec: zstd::bulk::Decompressor<'static>,
    /// Batch frames of this connection handled (applied or skipped).
    batches: u64,
    /// Batch frames acknowledged.
    batches_acked: u64,
    /// Frames to send once the current batch is handled (BLOCK_HASHES).
    outbox: Vec<Vec<u8>>,
    hash_buf: Vec<u8>,
    /// Bytes a compare found equal (not sent), this connection.
    same_bytes: u64,
}

impl<S: RecordSink> Apply<S> {
    /// The pipeline over `sink`, with the state in `file` as `consistency`
    /// holds it; ring records at or below `pending` are replays.
    pub fn new(
        sink: S,
        file: StateFile,
        consistency: Consistency,
        disk_id: &str,
        disk_size: u64,
        pending: u64,
    ) -> Result<Apply<S>, Refusal> {
        let dec = zstd::bulk::Decompressor::new()
            .map_err(|err| Refusal::new(ErrorCode::Internal, format!("zstd: {err}")))?;
        let mut sink = sink;
        let reason = consistency.reason();
        sink.consistency(reason == Reason::None, reason);
        Ok(Apply {
            sink,
            file,
            consistency,
            disk_id: disk_id.to_string(),
            disk_size,
            pending,
            uncommitted: 0,
            uncommitted_since: None,
            plain: Vec::new(),
            dec,
            batches: 0,
            batches_acked: 0,
            outbox: Vec::new(),
            hash_buf: Vec::new(),
            same_bytes: 0,
        })
    }

    /// The replica's consistency.
    pub fn consistency(&self) -> &Consistency {
        &self.consistency
    }

    /// The durably applied sequence.
    pub fn applied_seq(&self) -> u64 {
        self.consistency.state().applied_seq
    }

    /// A HEARTBEAT's source flags.
    pub fn heartbeat(&mut self, source_flags: u32) {
        self.consistency.heartbeat(source_flags, self.pending);
        let reason = self.consistency.reason();
        self.sink.consistency(reason == Reason::None, reason);
    }

    /// The BLOCK_HASHES bodies the last batch asked for, to send before
    /// anything else.
    pub fn outbox(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.outbox.drain(..)
    }

    /// Something applied, handled or changed is not committed yet.
    pub fn uncommitted(&self) -> bool {
        self.pending > self.consistency.state().applied_seq
            || self.batches > self.batches_acked
            || self.consistency.changed()
    }

    /// So much is applied and not committed ([`COMMIT_BYTES`]) that no
    /// more frames are taken until it is.
    pub fn full(&self) -> bool {
        self.uncommitted >= COMMIT_BYTES
    }

    /// Commit even if further frames have already arrived: the oldest
    /// uncommitted batch is [`COMMIT_AGE`] old, or the pipeline is
    /// [`full`](Apply::full). (Otherwise the driver commits when no
    /// further frame is waiting.)
    pub fn must_commit(&self) -> bool {
        let old = self
            .uncommitted_since
            .is_some_and(|t| t.elapsed() >= COMMIT_AGE);
        old || self.full()
    }

    /// Verify a whole batch, then apply its records above the applied sequence.
    pub fn batch(&mut self, body: &[u8]) -> Result<BatchDone, Refusal> {
        let proto = |e: WireError| {
            Refusal::new(
                ErrorCode::Protocol,
                format!("rejected batch, nothing applied: {e}"),
            )
        };
        let h = BatchHeader::decode(body).map_err(proto)?;
        let payload = &body[BATCH_HEADER_LEN..];
        // Taken out of self while its records are applied (put back at the
        // end; an error ends the session anyway).
        let mut buf = std::mem::take(&mut self.plain);
        let plain: &[u8] = match h.codec {
            Codec::Stored => payload,
            Codec::Zstd => {
                buf.clear();
                buf.reserve(h.plain_len as usize);
                let n = self
                    .dec
                    .decompress_to_buffer(payload, &mut buf)
                    .map_err(|e| {
                        Refusal::new(
                            ErrorCode::Protocol,
                            format!(
                                "rejected batch {}..={}, nothing applied: zstd payload does not decode: {e}",
                                h.first_seq, h.last_seq
                            ),
                        )
                    })?;
                &buf[..n]
            }
        };
        h.check_plain(plain).map_err(proto)?;
        let mut first_gap = false;
        // The BLOCK_HASHES answers the batch may ask for, all differing.
        let mut hash_reply = 0u64;
        for (i, r) in RecordIter::new(h, plain).enumerate() {
            let r = r.map_err(proto)?;
            if i == 0 {
                first_gap = r.after_gap;
            }
            if r.kind == RecordKind::SyncHash {
                hash_reply += block_hashes_frame_len(r.len);
                if hash_reply > MAX_BATCH_HASH_REPLY {
                    return Err(proto(WireError::Invalid {
                        what: "batch",
                        detail: format!(
                            "its SYNC_HASH records (up to seq {}) may ask for more than {} bytes of BLOCK_HASHES answers, the most one batch may",
                            r.seq, MAX_BATCH_HASH_REPLY
                        ),
                    }));
                }
            }
            if !matches!(r.kind, RecordKind::Mark | RecordKind::SyncEnd)
                && r.end().is_none_or(|e| e > self.disk_size)
            {
                return Err(proto(WireError::Invalid {
                    what: "record extent",
                    detail: format!(
                        "seq {}: {}+{} is outside the {}-byte disk",
                        r.seq, r.offset, r.len, self.disk_size
                    ),
                }));
            }
        }
        self.batches += 1;
        if h.first_seq > self.pending + 1 && !first_gap {
            return Err(Refusal::new(
                ErrorCode::Sequence,
                format!(
                    "batch starts at seq {} but the replica has applied up to {}: records in between are missing",
                    h.first_seq, self.pending
                ),
            ));
        }
        if self.uncommitted_since.is_none() {
            self.uncommitted_since = Some(Instant::now());
        }
        let mut applied_bytes = 0u64;
        for r in RecordIter::new(h, plain).flatten() {
            if r.kind.is_sync() {
                // Resync records are never a replay: their data was read from
                // the source after every ring record before them in the
                // stream was captured, so applying them here is correct.
                let reason = self.consistency.reason();
                self.sink.position(
                    self.pending.max(r.seq.saturating_sub(1)),
                    true,
                    r.time_ns,
                    reason == Reason::None,
                );
                self.apply_sync(&r)?;
                applied_bytes += u64::from(r.len);
                continue;
            }
            if r.seq <= self.pending {
                continue; // a replay: already applied
            }
            log::trace!("record {} {:?} at {}+{}", r.seq, r.kind, r.offset, r.len);
            self.consistency.ring_record(r.seq, self.pending);
            let reason = self.consistency.reason();
            self.sink
                .position(r.seq, false, r.time_ns, reason == Reason::None);
            let res = match r.kind {
                RecordKind::Write => self.sink.write(r.offset, r.payload),
                RecordKind::Trim | RecordKind::Zero => self.sink.zero(r.offset, u64::from(r.len)),
                RecordKind::Mark => self.sink.mark(r.payload, r.offset),
                // Resync records were handled above.
                _ => Ok(()),
            };
            res.map_err(|e| {
                Refusal::new(
                    ErrorCode::ReplicaIo,
                    format!(
                        "disk {:?}: applying seq {}: {e}; will retry when the shipper reconnects",
                        self.disk_id, r.seq
                    ),
                )
            })?;
            self.pending = r.seq;
            applied_bytes += u64::from(r.len);
        }
        self.uncommitted += applied_bytes;
        let done = BatchDone {
            wire_bytes: (body.len() + FRAME_HEADER_LEN) as u64,
            plain_bytes: plain.len() as u64,
        };
        self.plain = buf;
        Ok(done)
    }

    /// Apply one resync record: data or zeroes read from the source, or the
    /// end of a pass (which may make the replica consistent again).
    fn apply_sync(&mut self, r: &WireRecord<'_>) -> Result<(), Refusal> {
        let disk_id = &self.disk_id;
        let io = |e: crate::Error| {
            Refusal::new(
                ErrorCode::ReplicaIo,
                format!(
                    "disk {:?}: resync at offset {}: {e}; will retry when the shipper reconnects",
                    disk_id, r.offset
                ),
            )
        };
        log::debug!(
            "resync {:?} at {}+{} tag {} (applied {})",
            r.kind,
            r.offset,
            r.len,
            r.seq,
            self.pending
        );
        match r.kind {
            RecordKind::SyncData => self.sink.write(r.offset, r.payload).map_err(io)?,
            RecordKind::SyncZero => self.sink.zero(r.offset, u64::from(r.len)).map_err(io)?,
            RecordKind::SyncHash => {
                // Compare at this position of the stream: the replica as it is
                // after every record before the hash's tag.
                let n = r.len as usize;
                self.hash_buf.resize(n, 0);
                self.sink.read(r.offset, &mut self.hash_buf).map_err(io)?;
                if blake3::hash(&self.hash_buf).as_bytes()[..] == r.payload[..] {
                    self.same_bytes += u64::from(r.len);
                } else {
                    let hashes = self
                        .hash_buf
                        .chunks(BLOCK_SIZE as usize)
                        .map(|b| *blake3::hash(b).as_bytes())
                        .collect();
                    let mut body = Vec::new();
                    BlockHashes {
                        offset: r.offset,
                        len: r.len,
                        block_size: BLOCK_SIZE,
                        hashes,
                    }
                    .encode(&mut body);
                    self.outbox.push(body);
                    // Done once the shipper sent the differing blocks.
                    return Ok(());
                }
            }
            _ => {}
        }
        match r.kind {
            RecordKind::SyncData
            | RecordKind::SyncZero
            | RecordKind::SyncHash
            | RecordKind::SyncChunkDone
                if r.full_pass =>
            {
                self.consistency.chunk_done(r.offset, r.len);
            }
            RecordKind::SyncEnd if r.offset == wire::records::SYNC_END_FULL_PASS => {
                self.consistency.full_pass_ended();
            }
            RecordKind::SyncEnd => self.consistency.dirty_pass_ended(),
            _ => {}
        }
        if r.kind == RecordKind::SyncEnd {
            let reason = self.consistency.reason();
            self.sink.consistency(reason == Reason::None, reason);
        }
        Ok(())
    }

    /// Make what was applied durable and record the applied sequence and
    /// the resync progress: the sink's commit, then the state written and
    /// synced. Returns the ACK to send (`None`: nothing to commit). On a
    /// failure the applied sequence is reread from the state file (the
    /// shipper resends from there).
    pub fn commit(&mut self) -> Result<Option<Ack>, Refusal> {
        if !self.uncommitted() {
            return Ok(None);
        }
        self.consistency.take_changed();
        let r = self.sink.commit().and_then(|()| {
            self.consistency.set_applied_seq(self.pending);
            self.file.state = *self.consistency.state();
            self.file.save()
        });
        if let Err(e) = r {
            // The state keeps the last durable sequence; the shipper resends.
            let durable = crate::state::read(self.file.path())
                .ok()
                .flatten()
                .map_or(0, |s| s.applied_seq);
            self.consistency.set_applied_seq(durable);
            let m = format!(
                "disk {:?}: {e}; will retry when the shipper reconnects",
                self.disk_id
            );
            return Err(Refusal::new(ErrorCode::ReplicaIo, m));
        }
        self.uncommitted = 0;
        self.uncommitted_since = None;
        self.batches_acked = self.batches;
        Ok(Some(Ack {
            applied_seq: self.pending,
            batches: self.batches,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ReplicaState;
    use std::path::PathBuf;
    use wire::records::{SYNC_END_DIRTY, SYNC_END_FULL_PASS};

    const SIZE: u64 = 64 << 10;

    /// A sink over memory that logs what it is asked, and what the state
    /// file says when it is asked to commit.
    struct Mem {
        disk: Vec<u8>,
        log: Vec<String>,
        state: PathBuf,
    }

    impl RecordSink for Mem {
        fn write(&mut self, offset: u64, data: &[u8]) -> crate::Result<()> {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            self.disk[o..o + data.len()].copy_from_slice(data);
            self.log.push(format!("write {offset}+{}", data.len()));
            Ok(())
        }

        fn zero(&mut self, offset: u64, len: u64) -> crate::Result<()> {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            let n = usize::try_from(len).unwrap_or(usize::MAX);
            self.disk[o..o + n].fill(0);
            self.log.push(format!("zero {offset}+{len}"));
            Ok(())
        }

        fn read(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            buf.copy_from_slice(&self.disk[o..o + buf.len()]);
            self.log.push(format!("read {offset}+{}", buf.len()));
            Ok(())
        }

        fn commit(&mut self) -> crate::Result<()> {
            let durable = crate::state::read(&self.state)?.map(|s| s.applied_seq);
            self.log.push(format!("commit (state says {durable:?})"));
            Ok(())
        }
    }

    fn rec(seq: u64, kind: RecordKind, offset: u64, len: u32, payload: &[u8]) -> WireRecord<'_> {
        WireRecord {
            seq,
            kind,
            offset,
            len,
            after_gap: false,
            full_pass: false,
            time_ns: 0,
            payload,
        }
    }

    /// A stored BATCH body of `records`.
    fn batch(records: &[WireRecord<'_>]) -> Vec<u8> {
        let mut plain = Vec::new();
        for r in records {
            r.encode(&mut plain);
        }
        let h = BatchHeader {
            first_seq: records[0].seq,
            last_seq: records[records.len() - 1].seq,
            count: u32::try_from(records.len()).unwrap_or(u32::MAX),
            codec: Codec::Stored,
            plain_len: u32::try_from(plain.len()).unwrap_or(u32::MAX),
            plain_crc: crc32c::crc32c(&plain),
        };
        let mut body = h.encode().to_vec();
        body.extend_from_slice(&plain);
        body
    }

    fn pipeline(dir: &std::path::Path, reason: Reason) -> Apply<Mem> {
        let path = dir.join("state");
        let st = ReplicaState {
            applied_seq: 0,
            ring_id: [1; 16],
            disk_size: SIZE,
            reason,
            since_seq: 0,
            updated_ns: 0,
            sync_cursor: 0,
        };
        let file = StateFile::open_or_create(&path, st).unwrap();
        let sink = Mem {
            disk: vec![0; usize::try_from(SIZE).unwrap()],
            log: Vec::new(),
            state: path,
        };
        Apply::new(sink, file, Consistency::new(st, "d", 0), "d", SIZE, 0).unwrap()
    }

    #[test]
    fn records_in_order_replays_skipped_then_sink_commit_before_the_state() {
        let d = tempfile::tempdir().unwrap();
        let mut a = pipeline(d.path(), Reason::None);
        let data = [0xaa; 4096];
        let zeroes = *blake3::hash(&[0; 4096]).as_bytes();
        let body = batch(&[
            rec(1, RecordKind::Write, 0, 4096, &data),
            rec(2, RecordKind::Zero, 4096, 4096, &[]),
            // Compared after the write: differs, a BLOCK_HASHES answer.
            rec(3, RecordKind::SyncHash, 0, 4096, &zeroes),
            // Equal: nothing to answer.
            rec(3, RecordKind::SyncHash, 8192, 4096, &zeroes),
        ]);
        let done = a.batch(&body).unwrap();
        assert_eq!(
            done.plain_bytes + 32 + FRAME_HEADER_LEN as u64,
            done.wire_bytes
        );
        let answers: Vec<_> = a.outbox().collect();
        assert_eq!(answers.len(), 1);
        let bh = BlockHashes::decode(&answers[0]).unwrap();
        assert_eq!((bh.offset, bh.len), (0, 4096));
        assert_eq!(bh.hashes, vec![*blake3::hash(&data).as_bytes()]);
        // A replay of seq 1 is skipped.
        a.batch(&batch(&[rec(1, RecordKind::Write, 0, 4096, &[0xbb; 4096])]))
            .unwrap();
        assert_eq!(a.sink.disk[0], 0xaa);
        assert!(a.uncommitted());
        let ack = a.commit().unwrap().unwrap();
        assert_eq!((ack.applied_seq, ack.batches), (2, 2));
        assert_eq!(
            a.sink.log,
            [
                "write 0+4096",
                "zero 4096+4096",
                "read 0+4096",
                "read 8192+4096",
                "commit (state says Some(0))",
            ]
        );
        assert_eq!(
            crate::state::read(&d.path().join("state"))
                .unwrap()
                .unwrap()
                .applied_seq,
            2
        );
        assert_eq!(a.applied_seq(), 2);
        assert!(!a.uncommitted());
        assert!(a.commit().unwrap().is_none());
    }

    #[test]
    fn gaps_and_passes_reach_the_consistency_and_the_state() {
        let d = tempfile::tempdir().unwrap();
        let mut a = pipeline(d.path(), Reason::None);
        a.batch(&batch(&[rec(1, RecordKind::Write, 0, 4096, &[1; 4096])]))
            .unwrap();
        // Records lost at the source: a jump with AFTER_GAP.
        let mut r = rec(5, RecordKind::Write, 0, 4096, &[2; 4096]);
        r.after_gap = true;
        a.batch(&batch(&[r])).unwrap();
        assert_eq!(a.consistency().reason(), Reason::SourceGap);
        a.commit().unwrap().unwrap();
        let st = crate::state::read(&d.path().join("state"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (st.applied_seq, st.reason, st.since_seq),
            (5, Reason::SourceGap, 5)
        );
        // A full pass over the whole disk cures it.
        let mut chunk = rec(
            6,
            RecordKind::SyncZero,
            0,
            u32::try_from(SIZE).unwrap(),
            &[],
        );
        chunk.full_pass = true;
        let end = rec(6, RecordKind::SyncEnd, SYNC_END_FULL_PASS, 0, &[]);
        a.batch(&batch(&[
            chunk,
            end,
            rec(6, RecordKind::Zero, 0, 4096, &[]),
        ]))
        .unwrap();
        assert_eq!(a.consistency().reason(), Reason::None);
        a.commit().unwrap().unwrap();
        let st = crate::state::read(&d.path().join("state"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (st.applied_seq, st.reason, st.sync_cursor),
            (6, Reason::None, 0)
        );
        // An overflow reported by a heartbeat, cured by the dirty pass.
        a.heartbeat(wire::frame::HELLO_OVERFLOW);
        assert_eq!(a.consistency().reason(), Reason::SourceOverflow);
        assert!(a.uncommitted());
        a.batch(&batch(&[
            rec(7, RecordKind::SyncEnd, SYNC_END_DIRTY, 0, &[]),
            rec(7, RecordKind::Write, 0, 1, &[3]),
        ]))
        .unwrap();
        assert_eq!(a.consistency().reason(), Reason::None);
    }

    #[test]
    fn refusals() {
        let d = tempfile::tempdir().unwrap();
        let mut a = pipeline(d.path(), Reason::None);
        let code = |a: &mut Apply<Mem>, body: &[u8]| a.batch(body).map(|_| ()).map_err(|r| r.code);
        // Records missing before the batch.
        let body = batch(&[rec(3, RecordKind::Write, 0, 1, &[1])]);
        assert_eq!(code(&mut a, &body), Err(ErrorCode::Sequence));
        // An extent outside the disk: nothing of the batch applied.
        let body = batch(&[
            rec(1, RecordKind::Write, 0, 1, &[1]),
            rec(2, RecordKind::Zero, SIZE - 4096, 8192, &[]),
        ]);
        assert_eq!(code(&mut a, &body), Err(ErrorCode::Protocol));
        // More BLOCK_HASHES than a batch may ask for (each chunk inside the
        // disk): refused before anything of it is read or applied. (The
        // disk is all zeroes: they compare equal when taken.)
        let h = *blake3::hash(&a.sink.disk).as_bytes();
        let len = u32::try_from(SIZE).unwrap();
        let n = MAX_BATCH_HASH_REPLY / block_hashes_frame_len(len) + 1;
        let mut many: Vec<_> = (0..n)
            .map(|_| rec(1, RecordKind::SyncHash, 0, len, &h))
            .collect();
        many.push(rec(1, RecordKind::Write, 0, 1, &[1]));
        let r = a.batch(&batch(&many)).map(|_| ()).unwrap_err();
        assert_eq!(r.code, ErrorCode::Protocol);
        assert!(r.message.contains("BLOCK_HASHES"), "{}", r.message);
        // One fewer is taken.
        many.remove(0);
        a.batch(&batch(&many)).unwrap();
        assert_eq!(a.outbox().count(), 0);
        a.sink.log.clear();
        a.sink.disk[0] = 0;
        assert!(a.sink.log.is_empty());
        assert_eq!(a.sink.disk[0], 0);
    }
}
