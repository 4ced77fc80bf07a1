//! The recovery-point journal: an undo log of before-images beside each
//! replica, so the disk can be presented as it was at any stream position
//! in the retention window while the replica itself always holds the
//! latest state.
//!
//! It is the [`crate::session::apply::RecordSink`] layer between the
//! decoded records and the replica ([`Journaled`]): before a record
//! changes the replica, what it overwrites is appended to the journal and
//! made durable, then the replica is written. A point-in-time view
//! ([`PointView`], a `blockdev::Backend`) reads the replica and, for every
//! block changed after its point, the oldest before-image kept after the
//! point. Why an undo log and what it costs is in `docs/ARCHITECTURE.md`
//! ("Recovery points"); the bytes are in `docs/journal-format.md`.
//!
//! It is *not* the replica (the latest state stays a plain image), nor
//! the consistency state machine ([`crate::consistency`]): it records the
//! gaps that machine reports so no command offers a point inside one.
//!
//! # Layout
//! - [`format`]: index header and entry bytes.
//! - [`segment`]: listing, reading and repairing segment files.
//! - [`payload`]: appending payloads (staged, direct writes).
//! - [`writer`]: the apply side ([`Journaled`]).
//! - [`timeline`]: points, marks, gaps; resolving a point's name.
//! - [`view`]: the point-in-time `Backend`.
//! - [`lease`]: what an open view holds so pruning keeps its segments.
//! - [`prune`]: retention, whichever of age and size binds first.

pub mod format;
pub mod lease;
pub mod payload;
pub mod prune;
pub mod segment;
pub mod timeline;
pub mod view;
pub mod writer;

#[cfg(test)]
mod model_tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use timeline::{PointName, Timeline};
pub use view::PointView;
pub use writer::{JournalWriter, Journaled};

/// The journal's folder inside a disk's folder.
pub const JOURNAL_DIR: &str = "journal";

/// A position in a disk's replication stream: a recovery point. Ordered
/// as the stream is: by epoch (counted up when the source's sequence
/// numbers start again), then sequence, then `sub` (false: right after
/// ring record `seq`; true: after the resync items that follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Sequence-number epoch.
    pub epoch: u32,
    /// Ring sequence number.
    pub seq: u64,
    /// After the resync items that follow ring record `seq`.
    pub sub: bool,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.seq)?;
        if self.sub {
            write!(f, "+sync")?;
        }
        if self.epoch > 0 {
            write!(f, " (epoch {})", self.epoch)?;
        }
        Ok(())
    }
}

/// How much history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalConfig {
    /// Keep points this far back.
    pub retention: Duration,
    /// Keep at most this many journal bytes (whichever binds first).
    pub max_bytes: u64,
    /// Start a new segment file after this many payload bytes.
    pub segment_bytes: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            retention: Duration::from_secs(24 * 3600),
            max_bytes: 10 << 30,
            segment_bytes: 64 << 20,
        }
    }
}

/// The journal folder of the disk folder `disk_dir`.
pub fn dir_of(disk_dir: &Path) -> PathBuf {
    disk_dir.join(JOURNAL_DIR)
}

/// Parse a duration like `24h`, `90m`, `30s`, `7d`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit (ms, s, m, h, d), e.g. 24h"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 24h"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// Parse a size like `10G`, `512M`, `64K`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (K, M, G, T)")),
            };
            (&s[..i], mul)
        }
        _ => (s, 1),
    };
    let n: u64 = n
        .trim_end_matches(['i', 'I'])
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 10G"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_as_the_stream() {
        let p = |epoch, seq, sub| Pos { epoch, seq, sub };
        assert!(p(0, 5, false) < p(0, 5, true));
        assert!(p(0, 5, true) < p(0, 6, false));
        assert!(p(0, 900, true) < p(1, 1, false));
        assert_eq!(p(0, 7, false).to_string(), "7");
        assert_eq!(p(1, 7, true).to_string(), "7+sync (epoch 1)");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("1y").is_err());
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1GiB").is_err());
        assert!(parse_size("x").is_err());
    }
}
