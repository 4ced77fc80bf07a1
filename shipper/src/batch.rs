//! A ring batch into a batch's plain wire records (then sealed by
//! [`crate::compress`]).
//!
//! The consumer reads each payload out of the ring's shared mapping into a
//! [`Batch`] that leaves a wire record header's room before it
//! ([`Batch::with_header_room`]); the headers are written into that room and
//! the buffer is taken out as the batch's plain bytes. So a payload is
//! copied once between the ring and TLS, not twice. Only when some records
//! must be skipped (already applied at the target, after a reconnect) are
//! the others copied into a new buffer.

use ring::{Batch, Kind};
use wire::records::RECORD_HEADER_LEN;
use wire::{RecordKind, WireRecord};

/// A ring batch for [`encode`]: payloads read with a wire header's room.
pub fn ring_batch() -> Batch {
    Batch::with_header_room(RECORD_HEADER_LEN)
}

/// A batch's records as plain wire records.
#[derive(Debug)]
pub struct Plain {
    /// The records, back to back.
    pub bytes: Vec<u8>,
    /// First and last sequence.
    pub first: u64,
    /// Last sequence.
    pub last: u64,
    /// Records.
    pub count: u32,
    /// Capture time of the first record.
    pub first_time_ns: u64,
}

/// What [`encode`] made.
#[derive(Debug)]
pub enum Encoded {
    /// Records to send.
    Plain(Plain),
    /// Every record was already applied; the spare buffer back.
    Empty(Vec<u8>),
}

fn wire_kind(k: Kind) -> Option<RecordKind> {
    match k {
        Kind::Write => Some(RecordKind::Write),
        Kind::Trim => Some(RecordKind::Trim),
        Kind::Zero => Some(RecordKind::Zero),
        Kind::Mark => Some(RecordKind::Mark),
        Kind::Pad => None,
    }
}

fn wire_record<'a>(r: &ring::Record<'a>, kind: RecordKind) -> WireRecord<'a> {
    WireRecord {
        seq: r.seq,
        kind,
        offset: r.offset,
        len: r.len,
        // The first record sent after a skip may follow a gap only if the
        // ring says so; the target checks against its applied seq.
        after_gap: r.after_gap,
        full_pass: false,
        time_ns: r.time_ns,
        payload: r.payload,
    }
}

/// Encode the records of `batch` (read into a [`ring_batch`]) above
/// `skip_through` as wire records. `spare` becomes the batch's buffer for
/// its next read (in place) or holds the copies (when records are skipped).
pub fn encode(batch: &mut Batch, skip_through: u64, mut spare: Vec<u8>) -> Encoded {
    let Some(first) = batch.get(0) else {
        return Encoded::Empty(spare);
    };
    let first_time_ns = first.time_ns;
    if first.seq > skip_through {
        // In place: every record goes.
        let (first, mut last, mut count) = (first.seq, first.seq, 0u32);
        for i in 0..batch.len() {
            let (Some(r), Some(at)) = (batch.get(i), batch.room_at(i)) else {
                break;
            };
            let mut h = [0u8; RECORD_HEADER_LEN];
            // The ring never hands out padding as a record.
            if let Some(kind) = wire_kind(r.kind) {
                wire_record(&r, kind).encode_header(&mut h);
            }
            last = r.seq;
            count += 1;
            batch.bytes_mut()[at..at + RECORD_HEADER_LEN].copy_from_slice(&h);
        }
        return Encoded::Plain(Plain {
            bytes: batch.take_bytes(spare),
            first,
            last,
            count,
            first_time_ns,
        });
    }
    spare.clear();
    let (mut first, mut last, mut count, mut first_time) = (0, 0, 0u32, 0);
    for r in batch.iter() {
        let Some(kind) = wire_kind(r.kind) else {
            continue;
        };
        if r.seq <= skip_through {
            continue;
        }
        if count == 0 {
            first = r.seq;
            first_time = r.time_ns;
        }
        wire_record(&r, kind).encode(&mut spare);
        last = r.seq;
        count += 1;
    }
    batch.clear();
    if count == 0 {
        return Encoded::Empty(spare);
    }
    Encoded::Plain(Plain {
        bytes: spare,
        first,
        last,
        count,
        first_time_ns: first_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::frame::BatchHeader;
    use wire::RecordIter;

    fn ring_with(data: &[u8]) -> (tempfile::TempDir, ring::Consumer) {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let disk = ring::DiskIdentity {
            size: 64 << 20,
            fingerprint: [1, 2],
            path: "disk".into(),
        };
        let opts = ring::CreateOptions {
            capacity: 16 << 20,
            granularity: 65536,
            disk_holds_data: false,
        };
        let (p, _) = ring::Producer::open_or_create(
            &d.path().join("r"),
            &opts,
            &disk,
            ring::FullPolicy::Bitmap,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (i, chunk) in data.chunks(65536).enumerate() {
            p.append(ring::Change::Write {
                offset: i as u64 * 65536,
                data: chunk,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
        p.append(ring::Change::Mark {
            name: "m",
            app: false,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let c = ring::Consumer::open(&d.path().join("r")).unwrap_or_else(|e| panic!("{e}"));
        (d, c)
    }

    fn payloads(p: &Plain) -> (Vec<u64>, Vec<u8>) {
        let h = BatchHeader {
            first_seq: p.first,
            last_seq: p.last,
            count: p.count,
            codec: wire::frame::Codec::Stored,
            plain_len: u32::try_from(p.bytes.len()).unwrap_or(0),
            plain_crc: crc32c::crc32c(&p.bytes),
        };
        let (mut seqs, mut data) = (Vec::new(), Vec::new());
        for r in RecordIter::new(h, &p.bytes) {
            let r = r.unwrap_or_else(|e| panic!("{e}"));
            seqs.push(r.seq);
            if r.kind == RecordKind::Write {
                data.extend_from_slice(r.payload);
            }
        }
        (seqs, data)
    }

    #[test]
    fn in_place_and_copied_encodings_are_the_same_records() {
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (_d, mut c) = ring_with(&data);
        let mut b = ring_batch();
        c.read(1 << 16, 64 << 20, &mut b)
            .unwrap_or_else(|e| panic!("{e}"));
        let Encoded::Plain(p) = encode(&mut b, 0, Vec::new()) else {
            panic!("empty")
        };
        assert_eq!((p.first, p.last, p.count), (1, 17, 17));
        let (seqs, got) = payloads(&p);
        assert_eq!(seqs, (1..=17).collect::<Vec<_>>());
        assert_eq!(got, data);
        // The same records, some already applied: copied, the rest only.
        c.rewind();
        c.read(1 << 16, 64 << 20, &mut b)
            .unwrap_or_else(|e| panic!("{e}"));
        let Encoded::Plain(q) = encode(&mut b, 10, p.bytes) else {
            panic!("empty")
        };
        assert_eq!((q.first, q.last, q.count), (11, 17, 7));
        let (seqs, got) = payloads(&q);
        assert_eq!(seqs, (11..=17).collect::<Vec<_>>());
        assert_eq!(got, data[10 * 65536..]);
        c.rewind();
        c.read(1 << 16, 64 << 20, &mut b)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(encode(&mut b, 17, q.bytes), Encoded::Empty(_)));
    }
}
