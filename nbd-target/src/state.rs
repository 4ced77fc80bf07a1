//! The replica's state file: the applied sequence and what the replica is,
//! kept durably and replaced atomically.
//!
//! Two 512-byte slots, each with a generation number and a crc32c; a write
//! goes to the slot not holding the newest valid state, then is synced, so a
//! crash during the write leaves the previous state readable. Specified for
//! people in `docs/target-state.md`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{io, Error, Result};

/// Magic at the start of each slot.
pub const STATE_MAGIC: [u8; 8] = *b"BSHPSTAT";
/// Format version.
pub const STATE_VERSION: u32 = 1;
/// Bytes per slot.
pub const SLOT_LEN: usize = 512;

// Format: replica state slot (512 bytes; slots at file offsets 0 and 512)
//   off  size  field
//   0    8     magic "BSHPSTAT"
//   8    4     version (1)
//   12   4     flags (STATE_CONSISTENT)
//   16   8     generation (the valid slot with the higher one wins)
//   24   8     applied sequence: every record up to it is durable in the replica
//   32   16    source ring id (the ring whose sequence numbers these are)
//   48   8     disk size in bytes
//   56   4     reason (Reason) the replica is not consistent, 0 when it is
//   60   4     reserved (0)
//   64   8     updated, ns since the Unix epoch
//   72   8     sequence at which the replica became inconsistent (0: n/a)
//   80   8     full pass cursor: bytes from the start a full pass covered durably
//   88   420   reserved (0)
//   508  4     crc32c of bytes 0..508

/// Flag: the replica is a crash-consistent image of the source at the
/// applied sequence.
pub const STATE_CONSISTENT: u32 = 1;

/// Why a replica is not consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    /// It is consistent.
    None = 0,
    /// The disk held data before its ring existed: an initial sync is needed.
    NeedsInitialSync = 1,
    /// The ring released records this replica never received (it joined late).
    MissedRecords = 2,
    /// The source's ring was recreated: its sequence numbers restarted.
    RingReplaced = 3,
    /// The source lost changes whose extents are unknown (a torn ring
    /// tail, a reboot without a clean stop): a full pass is needed.
    SourceGap = 4,
    /// The source's ring overflowed: its dirty extents must be resent.
    SourceOverflow = 5,
    /// Seeded from an image carried to the site: a full pass compares it
    /// with the source by hashes and sends what differs.
    Seeded = 6,
}

impl Reason {
    /// The reason stored as `v` (unknown codes read as None).
    pub fn from_code(v: u32) -> Reason {
        Reason::from_u32(v)
    }

    fn from_u32(v: u32) -> Reason {
        match v {
            1 => Reason::NeedsInitialSync,
            2 => Reason::MissedRecords,
            3 => Reason::RingReplaced,
            4 => Reason::SourceGap,
            5 => Reason::SourceOverflow,
            6 => Reason::Seeded,
            _ => Reason::None,
        }
    }

    /// Explanation for status output.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::None => "consistent",
            Reason::NeedsInitialSync => {
                "the disk held data before protection began: the replica is incomplete until an initial sync"
            }
            Reason::MissedRecords => {
                "the source released changes before this replica received them: a full sync is needed"
            }
            Reason::RingReplaced => {
                "the source's ring was recreated: changes before it are unknown, a full sync is needed"
            }
            Reason::SourceGap => {
                "the source lost changes whose extents are unknown (torn ring tail or unclean reboot): a full pass is needed"
            }
            Reason::SourceOverflow => {
                "the source's ring overflowed: the dirty extents are being resent"
            }
            Reason::Seeded => {
                "seeded from an image: a full pass compares it with the source and sends the differences"
            }
        }
    }

    /// Cured by a full pass over the disk (the others: by a dirty resync).
    pub fn needs_full_pass(self) -> bool {
        matches!(
            self,
            Reason::NeedsInitialSync
                | Reason::MissedRecords
                | Reason::RingReplaced
                | Reason::SourceGap
                | Reason::Seeded
        )
    }

    /// The replica holds data worth comparing by hashes (not an empty copy).
    pub fn worth_comparing(self) -> bool {
        matches!(
            self,
            Reason::MissedRecords | Reason::RingReplaced | Reason::SourceGap | Reason::Seeded
        )
    }

    /// Short name for JSON.
    pub fn name(self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::NeedsInitialSync => "needs-initial-sync",
            Reason::MissedRecords => "missed-records",
            Reason::RingReplaced => "ring-replaced",
            Reason::SourceGap => "source-gap",
            Reason::SourceOverflow => "source-overflow",
            Reason::Seeded => "seeded",
        }
    }
}

/// What the state file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    /// Durably applied sequence.
    pub applied_seq: u64,
    /// The source ring's id.
    pub ring_id: [u8; 16],
    /// Disk size.
    pub disk_size: u64,
    /// Why not consistent (None: consistent).
    pub reason: Reason,
    /// Sequence at which it became inconsistent.
    pub since_seq: u64,
    /// Last update, ns since the epoch.
    pub updated_ns: u64,
    /// How far the current full pass got (bytes from the start).
    pub sync_cursor: u64,
}

impl ReplicaState {
    /// Consistent?
    pub fn consistent(&self) -> bool {
        self.reason == Reason::None
    }

    /// Encode one slot.
    pub fn encode(&self, generation: u64) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&STATE_MAGIC);
        b[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        let flags = if self.consistent() {
            STATE_CONSISTENT
        } else {
            0
        };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.applied_seq.to_le_bytes());
        b[32..48].copy_from_slice(&self.ring_id);
        b[48..56].copy_from_slice(&self.disk_size.to_le_bytes());
        b[56..60].copy_from_slice(&(self.reason as u32).to_le_bytes());
        b[64..72].copy_from_slice(&self.updated_ns.to_le_bytes());
        b[72..80].copy_from_slice(&self.since_seq.to_le_bytes());
        b[80..88].copy_from_slice(&self.sync_cursor.to_le_bytes());
        let crc = crc32c::crc32c(&b[..508]);
        b[508..512].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode one slot: `None` when it is empty, torn or of another version.
    pub fn decode(b: &[u8]) -> Option<(u64, ReplicaState)> {
        if b.len() < SLOT_LEN || b[0..8] != STATE_MAGIC {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(8) != STATE_VERSION || u32_at(508) != crc32c::crc32c(&b[..508]) {
            return None;
        }
        let mut ring_id = [0u8; 16];
        ring_id.copy_from_slice(&b[32..48]);
        let reason = Reason::from_u32(u32_at(56));
        // The flag and the reason say the same thing; trust the safer one.
        let reason = if u32_at(12) & STATE_CONSISTENT == 0 && reason == Reason::None {
            Reason::SourceGap
        } else {
            reason
        };
        Some((
            u64_at(16),
            ReplicaState {
                applied_seq: u64_at(24),
                ring_id,
                disk_size: u64_at(48),
                reason,
                since_seq: u64_at(72),
                updated_ns: u64_at(64),
                sync_cursor: u64_at(80),
            },
        ))
    }
}

/// The state file of one replica, open for updates.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    file: File,
    generation: u64,
    /// The current state.
    pub state: ReplicaState,
}

/// Read the newest valid state in `path`, if any.
pub fn read(path: &Path) -> Result<Option<ReplicaState>> {
    match std::fs::read(path) {
        Ok(b) => newest(path, &b).map(|o| o.map(|(_, s)| s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, "reading the replica state")(e)),
    }
}

fn newest(path: &Path, b: &[u8]) -> Result<Option<(u64, ReplicaState)>> {
    let a = b.get(..SLOT_LEN).and_then(ReplicaState::decode);
    let c = b.get(SLOT_LEN..2 * SLOT_LEN).and_then(ReplicaState::decode);
    let best = match (a, c) {
        (Some(x), Some(y)) => Some(if x.0 >= y.0 { x } else { y }),
        (x, y) => x.or(y),
    };
    if best.is_none() && b.iter().any(|&x| x != 0) {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: "neither state slot is valid".into(),
        });
    }
    Ok(best)
}

impl StateFile {
    /// Open the state at `path`, or create it holding `initial`.
    pub fn open_or_create(path: &Path, initial: ReplicaState) -> Result<StateFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io(path, "opening the replica state"))?;
        let mut b = vec![0u8; 2 * SLOT_LEN];
        let n = file
            .read_at(&mut b, 0)
            .map_err(io(path, "reading the replica state"))?;
        b.truncate(n);
        let mut sf = match newest(path, &b)? {
            Some((generation, state)) => StateFile {
                path: path.to_path_buf(),
                file,
                generation,
                state,
            },
            None => StateFile {
                path: path.to_path_buf(),
                file,
                generation: 0,
                state: initial,
            },
        };
        if sf.generation == 0 {
            sf.save()?;
        }
        Ok(sf)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the current state durably (the other slot, then fdatasync).
    pub fn save(&mut self) -> Result<()> {
        self.state.updated_ns = now_ns();
        let generation = self.generation + 1;
        let slot = (generation % 2) * SLOT_LEN as u64;
        self.file
            .write_all_at(&self.state.encode(generation), slot)
            .map_err(io(&self.path, "writing the replica state"))?;
        self.file
            .sync_data()
            .map_err(io(&self.path, "syncing the replica state"))?;
        self.generation = generation;
        Ok(())
    }
}

/// Wall clock, ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(seq: u64) -> ReplicaState {
        ReplicaState {
            applied_seq: seq,
            ring_id: [7; 16],
            disk_size: 1 << 20,
            reason: Reason::None,
            since_seq: 0,
            updated_ns: 5,
            sync_cursor: 0,
        }
    }

    #[test]
    fn golden_slot() {
        let b = st(0x0102).encode(3);
        let hex: String = b[..80].iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "4253485053544154",
                "01000000",
                "01000000",
                "0300000000000000",
                "0201000000000000",
                "07070707070707070707070707070707",
                "0000100000000000",
                "00000000",
                "00000000",
                "0500000000000000",
                "0000000000000000"
            )
        );
        assert_eq!(ReplicaState::decode(&b), Some((3, st(0x0102))));
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_is_ignored() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("state");
        let mut f = StateFile::open_or_create(&p, st(0)).unwrap_or_else(|e| panic!("{e}"));
        for s in 1..=5 {
            f.state.applied_seq = s;
            f.save().unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            read(&p)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|s| s.applied_seq),
            Some(5)
        );
        // Tear the newest slot (generation 6 lives in slot 0).
        let file = OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("{e}"));
        file.write_all_at(&[0xff; 16], 100)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read(&p)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|s| s.applied_seq),
            Some(4)
        );
        // Both torn: an error, never a silent fresh start.
        file.write_all_at(&[0xff; 16], 600)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(read(&p).is_err());
    }
}
