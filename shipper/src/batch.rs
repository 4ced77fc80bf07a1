//! A ring batch into a wire batch: records encoded back to back, then one
//! zstd frame of them, or the plain bytes when zstd does not shrink them by
//! at least 3% (random or already compressed data is sent stored).

use ring::{Batch, Kind};
use wire::frame::{BatchHeader, Codec};
use wire::{RecordKind, WireRecord};

use crate::error::{Error, Result};

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
        // The batch reader bounds plain bytes well below 4 GiB.
        let plain_len = u32::try_from(self.plain.len())
            .map_err(|_| Error::Invalid("batch larger than 4 GiB".into()))?;
        let plain_crc = crc32c::crc32c(&self.plain);
        let mut codec = Codec::Stored;
        if let Some(z) = &mut self.zstd {
            let bound = zstd::zstd_safe::compress_bound(self.plain.len());
            self.packed.clear();
            self.packed.reserve(bound);
            if let Ok(n) = z.compress_to_buffer(&self.plain, &mut self.packed) {
                if n < self.plain.len() - self.plain.len() / 32 {
                    codec = Codec::Zstd;
                }
            }
        }
        let payload: &[u8] = if codec == Codec::Zstd {
            &self.packed
        } else {
            &self.plain
        };
        Ok(Some(Built {
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
        }))
    }
}
