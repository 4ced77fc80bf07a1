//! A ring batch into a wire batch: records encoded back to back, then one
//! zstd frame of them, or the plain bytes when zstd does not shrink them by
//! at least 3% (random or already compressed data is sent stored).

use ring::{Batch, Kind};
use wire::frame::{BatchHeader, Codec};
use wire::{RecordKind, WireRecord};

use crate::error::{Error, Result};

/// Bytes of a large batch compressed first to see whether it compresses.
const SAMPLE: usize = 64 << 10;

/// `packed` bytes are at least 3% fewer than `plain`.
fn shrinks(packed: usize, plain: usize) -> bool {
    packed < plain - plain / 32
}

/// Reusable buffers and compressor for building batches.
pub struct Encoder {
    plain: Vec<u8>,
    packed: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish()
    }
}

/// A built batch, borrowed from the encoder.
#[derive(Debug)]
pub struct Built<'a> {
    /// The batch header.
    pub header: BatchHeader,
    /// The payload after the header.
    pub payload: &'a [u8],
    /// Capture time of the first record.
    pub first_time_ns: u64,
}

impl Encoder {
    /// An encoder compressing at `level` (0: never compress).
    pub fn new(level: i32) -> Result<Encoder> {
        let zstd = if level == 0 {
            None
        } else {
            Some(zstd::bulk::Compressor::new(level).map_err(Error::Zstd)?)
        };
        Ok(Encoder {
            plain: Vec::new(),
            packed: Vec::new(),
            zstd,
        })
    }

    /// Encode the records of `batch` (not empty), skipping those at or below
    /// `skip_through` (already applied at the target). `None` when every
    /// record was skipped.
    pub fn build(&mut self, batch: &Batch, skip_through: u64) -> Result<Option<Built<'_>>> {
        self.plain.clear();
        let (mut first, mut last, mut count, mut first_time) = (0, 0, 0u32, 0);
        for r in batch.iter() {
            if r.seq <= skip_through {
                continue;
            }
            let kind = match r.kind {
                Kind::Write => RecordKind::Write,
                Kind::Trim => RecordKind::Trim,
                Kind::Zero => RecordKind::Zero,
                Kind::Mark => RecordKind::Mark,
                Kind::Pad => continue,
            };
            if count == 0 {
                first = r.seq;
                first_time = r.time_ns;
            }
            WireRecord {
                seq: r.seq,
                kind,
                offset: r.offset,
                len: r.len,
                // The first record sent after a skip may follow a gap only
                // if the ring says so; the target checks against its applied seq.
                after_gap: r.after_gap,
                full_pass: false,
                time_ns: r.time_ns,
                payload: r.payload,
            }
            .encode(&mut self.plain);
            last = r.seq;
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        self.finish(first, last, count, first_time).map(Some)
    }

    /// The plain-records buffer, cleared, for a caller that encodes its own
    /// records (the resync) before [`Encoder::finish`].
    pub fn plain_mut(&mut self) -> &mut Vec<u8> {
        self.plain.clear();
        &mut self.plain
    }

    /// Compress the plain records (when worth it) and make the batch header.
    pub fn finish(
        &mut self,
        first: u64,
        last: u64,
        count: u32,
        first_time: u64,
    ) -> Result<Built<'_>> {
        // The batch reader bounds plain bytes well below 4 GiB.
        let plain_len = u32::try_from(self.plain.len())
            .map_err(|_| Error::Invalid("batch larger than 4 GiB".into()))?;
        let plain_crc = crc32c::crc32c(&self.plain);
        let mut codec = Codec::Stored;
        if let Some(z) = &mut self.zstd {
            let bound = zstd::zstd_safe::compress_bound(self.plain.len());
            self.packed.clear();
            self.packed.reserve(bound);
            // A large batch of data that does not compress (random,
            // encrypted, already compressed) is recognised from a sample,
            // so it does not cost a full zstd pass.
            let worth_it = self.plain.len() < 4 * SAMPLE
                || z.compress_to_buffer(&self.plain[..SAMPLE], &mut self.packed)
                    .is_ok_and(|n| shrinks(n, SAMPLE));
            self.packed.clear();
            if worth_it {
                if let Ok(n) = z.compress_to_buffer(&self.plain, &mut self.packed) {
                    if shrinks(n, self.plain.len()) {
                        codec = Codec::Zstd;
                    }
                }
            }
        }
        let payload: &[u8] = if codec == Codec::Zstd {
            &self.packed
        } else {
            &self.plain
        };
        Ok(Built {
            header: BatchHeader {
                first_seq: first,
                last_seq: last,
                count,
                codec,
                plain_len,
                plain_crc,
            },
            payload,
            first_time_ns: first_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::RecordIter;

    fn ring_batch(data: &[u8]) -> (tempfile::TempDir, Batch) {
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
        let mut c = ring::Consumer::open(&d.path().join("r")).unwrap_or_else(|e| panic!("{e}"));
        let mut b = Batch::new();
        c.read(1 << 16, 64 << 20, &mut b)
            .unwrap_or_else(|e| panic!("{e}"));
        (d, b)
    }

    fn decode(built: &Built<'_>) -> Vec<u8> {
        match built.header.codec {
            Codec::Stored => built.payload.to_vec(),
            Codec::Zstd => zstd::bulk::decompress(built.payload, built.header.plain_len as usize)
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    #[test]
    fn compressible_batches_shrink_random_ones_go_stored_and_both_round_trip() {
        let text: Vec<u8> = (0..(1 << 20))
            .map(|i| b"blockship replicates "[i % 21])
            .collect();
        let mut random = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        for (data, want) in [(&text, Codec::Zstd), (&random, Codec::Stored)] {
            let (_d, batch) = ring_batch(data);
            let mut e = Encoder::new(1).unwrap_or_else(|e| panic!("{e}"));
            let built = e
                .build(&batch, 0)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("empty"));
            assert_eq!(built.header.codec, want);
            let plain = decode(&built);
            built
                .header
                .check_plain(&plain)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut got = Vec::new();
            for r in RecordIter::new(built.header, &plain) {
                got.extend_from_slice(r.unwrap_or_else(|e| panic!("{e}")).payload);
            }
            assert_eq!(&got, data);
            // Records at or below the applied sequence are not sent again.
            let built = e
                .build(&batch, 10)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("empty"));
            assert_eq!(built.header.first_seq, 11);
            assert!(e
                .build(&batch, 16)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none());
        }
    }
}
