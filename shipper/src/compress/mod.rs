//! How a batch's plain records are compressed: what to do
//! ([`policy::Policy`] chooses stored, a fast zstd level or a stronger one
//! from what is scarce, the link or the CPU), and doing it ([`Zstd`] on the
//! shipper's thread, or [`pool::Pool`] threads).
//!
//! A batch is sent zstd-compressed only when that makes it at least 3%
//! smaller; a large batch of data that does not compress (random,
//! encrypted, already compressed) is recognised from a 64 KiB sample, so it
//! does not cost a full zstd pass. Either way the plain bytes' CRC32C goes
//! in the batch header, for the target to check after decompressing.

pub mod policy;
pub mod pool;

use std::time::Instant;

use wire::frame::Codec;

use crate::error::{Error, Result};

/// Bytes of a large batch compressed first to see whether it compresses
/// (and the size of the probes the policy takes while sending stored).
pub const SAMPLE: usize = 64 << 10;

/// `packed` bytes are at least 3% fewer than `plain`.
fn shrinks(packed: usize, plain: usize) -> bool {
    packed < plain - plain / 32
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Send the plain records.
    Stored,
    /// zstd at this level (1 or more), when it shrinks the batch.
    Zstd(i32),
}

impl Choice {
    /// From a `--zstd-level` value (0: never compress).
    pub fn from_level(level: i32) -> Choice {
        if level <= 0 {
            Choice::Stored
        } else {
            Choice::Zstd(level)
        }
    }

    /// The value published in the ring file (`ship_codec`; 0 is "not
    /// reported", what a shipper before this field leaves).
    pub fn code(self) -> u64 {
        match self {
            Choice::Stored => 1,
            Choice::Zstd(l) => 2 + u64::try_from(l.max(1)).unwrap_or(1),
        }
    }

    /// From the published value; None for 0 (not reported) or nonsense.
    pub fn from_code(c: u64) -> Option<Choice> {
        match c {
            1 => Some(Choice::Stored),
            // Levels 1..=19 (`--zstd-level`'s range).
            3..=21 => i32::try_from(c - 2).ok().map(Choice::Zstd),
            _ => None,
        }
    }

    /// Name for status and logs: `stored`, `zstd-1`.
    pub fn name(self) -> String {
        match self {
            Choice::Stored => "stored".into(),
            Choice::Zstd(l) => format!("zstd-{l}"),
        }
    }

    /// The zstd level, 0 for stored (the metric's value).
    pub fn level(self) -> i32 {
        match self {
            Choice::Stored => 0,
            Choice::Zstd(l) => l,
        }
    }
}

/// Why the policy chose what it did (`ship_codec_reason`; status, metrics
/// and the log say it by [`Reason::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `--zstd-level` fixes it.
    Fixed,
    /// Nothing measured yet: zstd-1, the old default.
    Starting,
    /// The link has room and the CPU is busy: stored saves the CPU the
    /// writer needs.
    CpuBound,
    /// The link has room and the CPU is idle: zstd-1 saves bandwidth for
    /// nothing.
    CpuIdle,
    /// The link is the bottleneck and zstd-1 moves more through it.
    LinkBound,
    /// The link is the bottleneck and the CPU has room: a stronger level.
    LinkBoundCpuSpare,
    /// Recent batches do not compress.
    Incompressible,
    /// The link is the bottleneck but faster than compression could feed
    /// it: stored moves more.
    LinkFasterThanZstd,
}

impl Reason {
    /// Every reason, for the metrics.
    pub const ALL: [Reason; 8] = [
        Reason::Fixed,
        Reason::Starting,
        Reason::CpuBound,
        Reason::CpuIdle,
        Reason::LinkBound,
        Reason::LinkBoundCpuSpare,
        Reason::Incompressible,
        Reason::LinkFasterThanZstd,
    ];

    /// The value published in the ring file (0: not reported).
    pub fn code(self) -> u64 {
        match self {
            Reason::Fixed => 1,
            Reason::Starting => 2,
            Reason::CpuBound => 3,
            Reason::CpuIdle => 4,
            Reason::LinkBound => 5,
            Reason::LinkBoundCpuSpare => 6,
            Reason::Incompressible => 7,
            Reason::LinkFasterThanZstd => 8,
        }
    }

    /// From the published value; None for 0 or an unknown value.
    pub fn from_code(c: u64) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == c)
    }

    /// The word in status, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Fixed => "fixed",
            Reason::Starting => "starting",
            Reason::CpuBound => "cpu-bound",
            Reason::CpuIdle => "cpu-idle",
            Reason::LinkBound => "link-bound",
            Reason::LinkBoundCpuSpare => "link-bound-cpu-spare",
            Reason::Incompressible => "incompressible",
            Reason::LinkFasterThanZstd => "link-faster-than-zstd",
        }
    }

    /// What it means, for the log line of a change.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::Fixed => "--zstd-level fixes it",
            Reason::Starting => "nothing measured yet",
            Reason::CpuBound => {
                "the link has room and the CPU is busy: sending stored leaves the CPU to the writer"
            }
            Reason::CpuIdle => {
                "the link has room and the CPU is idle: compressing saves bandwidth at no cost"
            }
            Reason::LinkBound => {
                "the link is the bottleneck: compressed batches move more data through it"
            }
            Reason::LinkBoundCpuSpare => {
                "the link is the bottleneck and the CPU has room: a stronger level"
            }
            Reason::Incompressible => "recent batches do not compress",
            Reason::LinkFasterThanZstd => {
                "the link takes more than compression could feed it: stored moves more"
            }
        }
    }
}

/// A sealed batch: how its payload is coded, the plain bytes' checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Stored or zstd.
    pub codec: Codec,
    /// CRC32C of the plain bytes.
    pub plain_crc: u32,
    /// Bytes zstd made (the payload when `codec` is zstd).
    pub packed_len: usize,
    /// Nanoseconds spent in zstd.
    pub zstd_ns: u64,
    /// Plain bytes zstd was run over (the whole batch, a sample, or 0).
    pub zstd_in: usize,
    /// Bytes zstd made of them.
    pub zstd_out: usize,
}

/// One thread's zstd context (the level is changed in place).
#[derive(Default)]
pub struct Zstd {
    ctx: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl std::fmt::Debug for Zstd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zstd")
            .field("level", &self.ctx.as_ref().map(|c| c.0))
            .finish()
    }
}

impl Zstd {
    fn at(&mut self, level: i32) -> Result<&mut zstd::bulk::Compressor<'static>> {
        match &mut self.ctx {
            Some((l, c)) if *l == level => {}
            Some((l, c)) => {
                c.set_compression_level(level).map_err(Error::Zstd)?;
                *l = level;
            }
            None => {
                self.ctx = Some((
                    level,
                    zstd::bulk::Compressor::new(level).map_err(Error::Zstd)?,
                ))
            }
        }
        match &mut self.ctx {
            Some((_, c)) => Ok(c),
            // Set just above.
            None => Err(Error::Invalid("zstd context missing".into())),
        }
    }

    /// Checksum `plain` and, when `choice` says so and it pays, compress
    /// it into `packed`. With `probe` and a stored choice, compress a
    /// sample at level 1 anyway, to measure how well (and how fast) the
    /// data compresses for the policy.
    pub fn seal(
        &mut self,
        plain: &[u8],
        choice: Choice,
        probe: bool,
        packed: &mut Vec<u8>,
    ) -> Result<Sealed> {
        let plain_crc = crc32c::crc32c(plain);
        let mut s = Sealed {
            codec: Codec::Stored,
            plain_crc,
            packed_len: 0,
            zstd_ns: 0,
            zstd_in: 0,
            zstd_out: 0,
        };
        let level = match choice {
            Choice::Zstd(l) => l,
            Choice::Stored if probe && !plain.is_empty() => {
                let sample = &plain[..plain.len().min(SAMPLE)];
                let t = Instant::now();
                let n = self.compress(1, sample, packed)?;
                s.zstd_ns = elapsed_ns(t);
                (s.zstd_in, s.zstd_out) = (sample.len(), n.unwrap_or(sample.len()));
                return Ok(s);
            }
            Choice::Stored => return Ok(s),
        };
        let t = Instant::now();
        if plain.len() >= 4 * SAMPLE {
            let n = self.compress(level, &plain[..SAMPLE], packed)?;
            if !n.is_some_and(|n| shrinks(n, SAMPLE)) {
                s.zstd_ns = elapsed_ns(t);
                (s.zstd_in, s.zstd_out) = (SAMPLE, n.unwrap_or(SAMPLE));
                return Ok(s);
            }
        }
        let n = self.compress(level, plain, packed)?;
        s.zstd_ns = elapsed_ns(t);
        (s.zstd_in, s.zstd_out) = (plain.len(), n.unwrap_or(plain.len()));
        if let Some(n) = n.filter(|&n| shrinks(n, plain.len())) {
            s.codec = Codec::Zstd;
            s.packed_len = n;
        }
        Ok(s)
    }

    /// Compress `src` into `dst` (its length set to the bound first);
    /// None when zstd fails on it (sent stored).
    fn compress(&mut self, level: i32, src: &[u8], dst: &mut Vec<u8>) -> Result<Option<usize>> {
        let bound = zstd::zstd_safe::compress_bound(src.len());
        if dst.len() < bound {
            dst.resize(bound, 0);
        }
        let z = self.at(level)?;
        Ok(z.compress_to_buffer(src, &mut dst[..bound]).ok())
    }
}

fn elapsed_ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn codes_round_trip_and_zero_is_not_reported() {
        for c in [
            Choice::Stored,
            Choice::Zstd(1),
            Choice::Zstd(3),
            Choice::Zstd(19),
        ] {
            assert_eq!(Choice::from_code(c.code()), Some(c));
        }
        assert_eq!(Choice::from_code(0), None);
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        assert_eq!(Reason::from_code(0), None);
        assert_eq!(Choice::Zstd(3).name(), "zstd-3");
    }

    #[test]
    fn compressible_data_is_packed_random_data_is_stored_after_a_sample() {
        let text: Vec<u8> = (0..(1 << 20))
            .map(|i| b"blockship replicates "[i % 21])
            .collect();
        let mut z = Zstd::default();
        let mut packed = Vec::new();
        let s = z
            .seal(&text, Choice::Zstd(1), false, &mut packed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.codec, Codec::Zstd);
        assert_eq!(s.plain_crc, crc32c::crc32c(&text));
        let back = zstd::bulk::decompress(&packed[..s.packed_len], text.len())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, text);
        // A stronger level reuses the context.
        let s3 = z
            .seal(&text, Choice::Zstd(3), false, &mut packed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s3.codec, Codec::Zstd);
        let r = random(1 << 20);
        let s = z
            .seal(&r, Choice::Zstd(1), false, &mut packed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.codec, s.zstd_in), (Codec::Stored, SAMPLE));
        // Stored: no zstd at all, unless probing.
        let s = z
            .seal(&text, Choice::Stored, false, &mut packed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.codec, s.zstd_in), (Codec::Stored, 0));
        let s = z
            .seal(&text, Choice::Stored, true, &mut packed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.codec, s.zstd_in), (Codec::Stored, SAMPLE));
        assert!(s.zstd_out < SAMPLE / 10, "{s:?}");
    }
}
