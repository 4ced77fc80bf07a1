//! The plain encoding of ring records inside a batch, before compression.
//!
//! A batch's plain bytes are records back to back, each a 40-byte header
//! followed by its payload. The decoder checks every record against the
//! batch header (count, first and last sequence, order) before the caller
//! applies any of them.

use crate::error::WireError;
use crate::frame::{le32, le64, BatchHeader};

// Format: record inside a batch (40-byte header, then the payload)
//   off  size  field
//   0    8     sequence
//   8    8     disk offset (MARK: flags, bit 0 MARK_APP; other bits reserved, ignored)
//   16   4     disk bytes covered (MARK: name length)
//   20   1     kind: 1 WRITE, 2 TRIM, 3 ZERO, 4 MARK (ring records);
//                    5 SYNC_DATA, 6 SYNC_ZERO, 7 SYNC_END, 8 SYNC_HASH,
//                    9 SYNC_CHUNK_DONE (resync records)
//   21   1     flags: bit 0 AFTER_GAP (ring records: the sequence may jump here),
//                     bit 1 FULL_PASS (SYNC_DATA/SYNC_ZERO: part of a full pass)
//   22   2     reserved (0)
//   24   8     capture time, ns since the Unix epoch
//   32   4     payload length (WRITE: = disk bytes; MARK: name length; else 0)
//   36   4     reserved (0)
//   40   n     payload
/// Length of a record header inside a batch.
pub const RECORD_HEADER_LEN: usize = 40;
/// Record flag: the sequence may jump to this record (records lost to a torn tail).
pub const RECORD_AFTER_GAP: u8 = 1;
/// Record flag: a SYNC_DATA or SYNC_ZERO of a full pass over the disk, sent
/// in offset order; the target counts how far the pass got.
pub const RECORD_FULL_PASS: u8 = 2;
/// Largest chunk a SYNC_HASH covers (its BLOCK_HASHES answer stays small).
pub const MAX_HASHED_CHUNK: u32 = 16 << 20;
/// SYNC_END offset value: a full pass over the disk ended.
pub const SYNC_END_FULL_PASS: u64 = 1;
/// SYNC_END offset value: every extent of the source's dirty bitmap was resent.
pub const SYNC_END_DIRTY: u64 = 2;
/// Longest MARK name.
pub const MAX_MARK_NAME: u32 = 4096;
/// MARK flag, in the record's offset field (a mark covers no extent): the
/// point is application-consistent (taken with the file system frozen or
/// between application hooks); without it, crash-consistent. The ring's
/// `MARK_APP`, copied as is. Other bits are reserved: senders write 0,
/// receivers ignore them.
pub const MARK_APP: u64 = 1;

/// What a record does to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Write the payload at the offset.
    Write = 1,
    /// Discard the extent (reads as zeroes afterwards).
    Trim = 2,
    /// Zero the extent.
    Zero = 3,
    /// A named point in the stream; changes nothing.
    Mark = 4,
    /// Resync: source data read at this position of the stream (its `seq`
    /// is the sequence of the next ring record; it does not take one).
    SyncData = 5,
    /// Resync: an extent of the source that reads as zeroes.
    SyncZero = 6,
    /// Resync: a pass ended (`offset`: SYNC_END_FULL_PASS or SYNC_END_DIRTY).
    SyncEnd = 7,
    /// Resync compare: the blake3 hash (payload, 32 bytes) of the source
    /// chunk at `offset..offset+len`; the target answers BLOCK_HASHES when
    /// its replica differs there, and counts the chunk done when it does not.
    SyncHash = 8,
    /// Resync compare: the differing blocks of the chunk were sent; the
    /// chunk is done.
    SyncChunkDone = 9,
}

impl RecordKind {
    /// A resync record (not a ring record: it takes no sequence number).
    pub fn is_sync(self) -> bool {
        matches!(
            self,
            RecordKind::SyncData
                | RecordKind::SyncZero
                | RecordKind::SyncEnd
                | RecordKind::SyncHash
                | RecordKind::SyncChunkDone
        )
    }
}

/// A record decoded from a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRecord<'a> {
    /// Sequence.
    pub seq: u64,
    /// What it does.
    pub kind: RecordKind,
    /// Disk offset.
    pub offset: u64,
    /// Disk bytes covered (MARK: name length).
    pub len: u32,
    /// The sequence may jump to this record.
    pub after_gap: bool,
    /// Part of a full pass (SYNC_DATA, SYNC_ZERO).
    pub full_pass: bool,
    /// Capture time, ns since the epoch.
    pub time_ns: u64,
    /// WRITE data, MARK name.
    pub payload: &'a [u8],
}

impl WireRecord<'_> {
    /// Append the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; RECORD_HEADER_LEN];
        self.encode_header(&mut h);
        out.extend_from_slice(&h);
        out.extend_from_slice(self.payload);
    }

    /// The record's 40-byte header alone, for a caller whose buffer already
    /// holds the payload right after it (the shipper reads ring payloads
    /// into place; see `ring::Batch::with_header_room`).
    pub fn encode_header(&self, h: &mut [u8; RECORD_HEADER_LEN]) {
        let mut flags = 0;
        if self.after_gap {
            flags |= RECORD_AFTER_GAP;
        }
        if self.full_pass {
            flags |= RECORD_FULL_PASS;
        }
        h[0..8].copy_from_slice(&self.seq.to_le_bytes());
        h[8..16].copy_from_slice(&self.offset.to_le_bytes());
        h[16..20].copy_from_slice(&self.len.to_le_bytes());
        h[20] = self.kind as u8;
        h[21] = flags;
        h[22..24].copy_from_slice(&[0, 0]);
        h[24..32].copy_from_slice(&self.time_ns.to_le_bytes());
        // Payloads come from ring records, at most 64 MiB.
        h[32..36].copy_from_slice(
            &u32::try_from(self.payload.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        h[36..40].copy_from_slice(&[0, 0, 0, 0]);
    }

    /// Bytes this record takes in a batch.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload.len()
    }

    /// A MARK taken application-consistent ([`MARK_APP`] in its offset);
    /// false for a crash-consistent mark and for any other kind.
    pub fn is_app_mark(&self) -> bool {
        self.kind == RecordKind::Mark && self.offset & MARK_APP != 0
    }

    /// First disk byte after the extent.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// Iterates over a batch's plain records, checking each one and, at the
/// end, the count and the last sequence against the batch header. Stops
/// after the first error.
#[derive(Debug)]
pub struct RecordIter<'a> {
    plain: &'a [u8],
    header: BatchHeader,
    at: usize,
    seen: u32,
    prev_seq: u64,
    /// Sequence the next ring record must carry.
    next_pos: u64,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    /// Records of a batch whose plain bytes passed [`BatchHeader::check_plain`].
    pub fn new(header: BatchHeader, plain: &'a [u8]) -> RecordIter<'a> {
        RecordIter {
            plain,
            header,
            at: 0,
            seen: 0,
            prev_seq: 0,
            next_pos: header.first_seq,
            failed: false,
        }
    }

    fn bad(&mut self, detail: String) -> Option<Result<WireRecord<'a>, WireError>> {
        self.failed = true;
        Some(Err(WireError::Invalid {
            what: "batch record",
            detail: format!(
                "batch {}..={}, record {}: {detail}",
                self.header.first_seq, self.header.last_seq, self.seen
            ),
        }))
    }

    fn next_record(&mut self) -> Option<Result<WireRecord<'a>, WireError>> {
        let rest = &self.plain[self.at..];
        if rest.is_empty() {
            if self.seen != self.header.count || self.prev_seq != self.header.last_seq {
                let (seen, last) = (self.seen, self.prev_seq);
                return self.bad(format!(
                    "batch ended after {seen} records at seq {last}; header says {} ending at {}",
                    self.header.count, self.header.last_seq
                ));
            }
            return None;
        }
        if rest.len() < RECORD_HEADER_LEN {
            return self.bad(format!(
                "{} bytes left, less than a record header",
                rest.len()
            ));
        }
        if self.seen == self.header.count {
            return self.bad("more records than the header's count".into());
        }
        let seq = le64(rest, 0);
        let offset = le64(rest, 8);
        let len = le32(rest, 16);
        let kind = match rest[20] {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::Zero,
            4 => RecordKind::Mark,
            5 => RecordKind::SyncData,
            6 => RecordKind::SyncZero,
            7 => RecordKind::SyncEnd,
            8 => RecordKind::SyncHash,
            9 => RecordKind::SyncChunkDone,
            k => return self.bad(format!("unknown kind {k}")),
        };
        let flags = rest[21];
        let allowed = match kind {
            RecordKind::SyncData
            | RecordKind::SyncZero
            | RecordKind::SyncHash
            | RecordKind::SyncChunkDone => RECORD_FULL_PASS,
            RecordKind::SyncEnd => 0,
            _ => RECORD_AFTER_GAP,
        };
        if flags & !allowed != 0 || rest[22] != 0 || rest[23] != 0 || le32(rest, 36) != 0 {
            return self.bad("unknown flags or reserved bytes set".into());
        }
        let after_gap = flags & RECORD_AFTER_GAP != 0;
        let full_pass = flags & RECORD_FULL_PASS != 0;
        let time_ns = le64(rest, 24);
        let plen = le32(rest, 32);
        let ok_len = match kind {
            RecordKind::Write => plen == len && len > 0,
            RecordKind::Trim | RecordKind::Zero => plen == 0 && len > 0,
            // A mark's offset holds its flags (MARK_APP, reserved bits
            // ignored), not an extent.
            RecordKind::Mark => plen == len && len <= MAX_MARK_NAME,
            RecordKind::SyncData => plen == len && len > 0,
            RecordKind::SyncZero => plen == 0 && len > 0,
            RecordKind::SyncEnd => {
                plen == 0 && len == 0 && matches!(offset, SYNC_END_FULL_PASS | SYNC_END_DIRTY)
            }
            RecordKind::SyncHash => plen == 32 && len > 0 && len <= MAX_HASHED_CHUNK,
            RecordKind::SyncChunkDone => plen == 0 && len > 0,
        };
        if !ok_len {
            return self.bad(format!("{kind:?} with length {len} and payload {plen}"));
        }
        if kind != RecordKind::Mark && offset.checked_add(u64::from(len)).is_none() {
            return self.bad("extent wraps around".into());
        }
        let total = RECORD_HEADER_LEN + plen as usize;
        if rest.len() < total {
            return self.bad(format!("payload of {plen} bytes runs past the batch"));
        }
        // Ring records take consecutive sequence numbers (a jump only with
        // AFTER_GAP); a resync record sits before the next ring record and
        // carries that record's sequence without taking it.
        let ordered = if self.seen == 0 {
            seq == self.header.first_seq
        } else if kind.is_sync() {
            seq == self.next_pos
        } else {
            seq == self.next_pos || (after_gap && seq > self.next_pos)
        };
        if !ordered {
            let prev = self.prev_seq;
            return self.bad(format!(
                "sequence {seq} after {prev} (first {})",
                self.header.first_seq
            ));
        }
        self.prev_seq = seq;
        self.next_pos = if kind.is_sync() { seq } else { seq + 1 };
        self.seen += 1;
        self.at += total;
        Some(Ok(WireRecord {
            seq,
            kind,
            offset,
            len,
            after_gap,
            full_pass,
            time_ns,
            payload: &rest[RECORD_HEADER_LEN..total],
        }))
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<WireRecord<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        self.next_record()
    }
}
