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
use crate::state::StateFile;

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
                self.apply_sync(&r)?;
                applied_bytes += u64::from(r.len);
                continue;
            }
            if r.seq <= self.pending {
                continue; // a replay: already applied
            }
            log::trace!("record {} {:?} at {}+{}", r.seq, r.kind, r.offset, r.len);
            self.consistency.ring_record(r.seq, self.pending);
            let res = match r.kind {
                RecordKind::Write => self.sink.write(r.offset, r.payload),
                RecordKind::Trim | RecordKind::Zero => self.sink.zero(r.offset, u64::from(r.len)),
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

