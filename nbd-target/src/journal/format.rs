//! The journal's two files per segment, byte for byte: the index
//! (`NNNNNNNN.idx`: a 128-byte header, then 64-byte entries) and the
//! payloads (`NNNNNNNN.dat`: before-images and mark names, back to back,
//! no header). Specified for people in `docs/journal-format.md`, with the
//! golden vectors the tests below check.
//!
//! Every field is little-endian. Every header and entry carries a crc32c
//! of its other bytes, and every entry the crc32c of its payload, so a
//! torn tail is found by reading forward until the first entry that does
//! not check.

use super::Pos;

/// Magic at the start of an index file.
pub const IDX_MAGIC: [u8; 8] = *b"BSHPJIDX";
/// Format version of both files.
pub const VERSION: u32 = 1;
/// Bytes of the index header.
pub const HEADER_LEN: usize = 128;
/// Bytes of one index entry.
pub const ENTRY_LEN: usize = 64;

// Format: journal index header (128 bytes at offset 0 of NNNNNNNN.idx)
//   off  size  field
//   0    8     magic "BSHPJIDX"
//   8    4     version (1)
//   12   4     flags: 1 GAP_OPEN (a gap is open at the segment's start),
//              2 GAP_FROM_START (that gap has no valid point before it)
//   16   8     segment number (= the file name's number)
//   24   8     created, ns since the Unix epoch
//   32   16    base point (Pos): the oldest point this segment can present
//              when it is the oldest one kept (the last position of the
//              segment before it, or the replica's state when the
//              journal began)
//   48   16    last good point (Pos): the newest consistent position
//              before the segment's start
//   64   16    open gap's "from" point (Pos; 0 when no gap is open)
//   80   4     open gap's reason (the state file's Reason code)
//   84   4     reserved (0)
//   88   8     open gap's since time, ns since the epoch
//   96   28    reserved (0)
//   124  4     crc32c of bytes 0..124
//
// Format: Pos (16 bytes): 0 epoch u32, 4 sub u32 (0: after ring record
// seq; 1: after the resync items that follow it), 8 seq u64.
//
// Format: journal index entry (64 bytes, from offset 128, in stream order)
//   off  size  field
//   0    1     kind: 1 UNDO (payload = the before-image), 2 UNDO_ZERO (the
//              before-image was all zeroes: no payload), 3 NOOP (a record
//              that changed nothing: kept for the time index), 4 MARK
//              (payload = the name), 5 GAP_OPEN, 6 GAP_CLOSE
//   1    1     flags: 1 APP (MARK: application-consistent)
//   2    2     reserved (0)
//   4    4     epoch
//   8    4     sub (0 ring record, 1 resync item)
//   12   4     crc32c of the payload (0 when there is none)
//   16   8     seq
//   24   8     capture time, ns since the epoch (resync items and gaps:
//              when the target applied them)
//   32   8     disk offset (GAP_OPEN: the Reason code; else 0)
//   40   8     disk bytes covered (MARK: name length)
//   48   8     payload position in NNNNNNNN.dat
//   56   4     payload length
//   60   4     crc32c of bytes 0..60
//
// GAP_OPEN's position is the gap's "from" point (the newest consistent
// point before it), GAP_CLOSE's the first consistent point after it.

/// Header flag: a gap is open at the segment's start.
pub const HDR_GAP_OPEN: u32 = 1;
/// Header flag: the open gap has no valid point before it.
pub const HDR_GAP_FROM_START: u32 = 2;
/// Entry flag: an application-consistent mark.
pub const ENTRY_APP: u8 = 1;
/// Entry flag (GAP_OPEN): no valid point before the gap.
pub const ENTRY_FROM_START: u8 = 2;

/// What an index entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A before-image in the payload file.
    Undo = 1,
    /// The before-image was all zeroes.
    UndoZero = 2,
    /// A record that changed nothing (time index only).
    Noop = 3,
    /// A mark: its name in the payload file.
    Mark = 4,
    /// The replica stopped being consistent after this point.
    GapOpen = 5,
    /// The replica is consistent again from this point.
    GapClose = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Undo,
            2 => Kind::UndoZero,
            3 => Kind::Noop,
            4 => Kind::Mark,
            5 => Kind::GapOpen,
            6 => Kind::GapClose,
            _ => return None,
        })
    }
}

/// A segment's index header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Segment number.
    pub segment: u64,
    /// Created, ns since the epoch.
    pub created_ns: u64,
    /// Oldest point this segment can present.
    pub base: Pos,
    /// Newest consistent position before the segment.
    pub last_good: Pos,
    /// The gap open at the segment's start, if any.
    pub gap: Option<OpenGap>,
}

/// A gap in the timeline that has not closed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenGap {
    /// The newest consistent point before it (None: none in the journal).
    pub from: Option<Pos>,
    /// Why (state file Reason code).
    pub reason: u32,
    /// When it opened, ns since the epoch.
    pub since_ns: u64,
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// ENTRY_* flags.
    pub flags: u8,
    /// Stream position.
    pub pos: Pos,
    /// Capture time.
    pub time_ns: u64,
    /// Disk offset (GAP_OPEN: reason).
    pub offset: u64,
    /// Disk bytes (MARK: name length).
    pub len: u64,
    /// Payload position in the .dat file.
    pub dat_pos: u64,
    /// Payload length.
    pub dat_len: u32,
    /// crc32c of the payload (0: none).
    pub dat_crc: u32,
}

fn put_pos(b: &mut [u8], p: Pos) {
    b[0..4].copy_from_slice(&p.epoch.to_le_bytes());
    b[4..8].copy_from_slice(&u32::from(p.sub).to_le_bytes());
    b[8..16].copy_from_slice(&p.seq.to_le_bytes());
}

fn get_pos(b: &[u8]) -> Pos {
    Pos {
        epoch: u32_at(b, 0),
        seq: u64_at(b, 8),
        sub: u32_at(b, 4) != 0,
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// The 128 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&IDX_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = 0u32;
        if let Some(g) = self.gap {
            flags |= HDR_GAP_OPEN;
            match g.from {
                Some(p) => put_pos(&mut b[64..80], p),
                None => flags |= HDR_GAP_FROM_START,
            }
            b[80..84].copy_from_slice(&g.reason.to_le_bytes());
            b[88..96].copy_from_slice(&g.since_ns.to_le_bytes());
        }
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ns.to_le_bytes());
        put_pos(&mut b[32..48], self.base);
        put_pos(&mut b[48..64], self.last_good);
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "index header is {} bytes, not {HEADER_LEN}",
                b.len()
            ));
        }
        if b[0..8] != IDX_MAGIC {
            return Err("not a blockship journal index (bad magic)".into());
        }
        if crc32c::crc32c(&b[..124]) != u32_at(b, 124) {
            return Err("index header checksum mismatch".into());
        }
        let v = u32_at(b, 8);
        if v != VERSION {
            return Err(format!(
                "journal format version {v}; this build reads version {VERSION}"
            ));
        }
        let flags = u32_at(b, 12);
        let gap = (flags & HDR_GAP_OPEN != 0).then(|| OpenGap {
            from: (flags & HDR_GAP_FROM_START == 0).then(|| get_pos(&b[64..80])),
            reason: u32_at(b, 80),
            since_ns: u64_at(b, 88),
        });
        Ok(Header {
            segment: u64_at(b, 16),
            created_ns: u64_at(b, 24),
            base: get_pos(&b[32..48]),
            last_good: get_pos(&b[48..64]),
            gap,
        })
    }
}

impl Entry {
    /// The 64 bytes.
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.pos.epoch.to_le_bytes());
        b[8..12].copy_from_slice(&u32::from(self.pos.sub).to_le_bytes());
        b[12..16].copy_from_slice(&self.dat_crc.to_le_bytes());
        b[16..24].copy_from_slice(&self.pos.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.time_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.dat_pos.to_le_bytes());
        b[56..60].copy_from_slice(&self.dat_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check the entry's own crc (not the payload's: see
    /// [`Entry::payload_ok`]); None when it does not check.
    pub fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() < ENTRY_LEN || crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return None;
        }
        Some(Entry {
            kind: Kind::from_u8(b[0])?,
            flags: b[1],
            pos: Pos {
                epoch: u32_at(b, 4),
                sub: u32_at(b, 8) != 0,
                seq: u64_at(b, 16),
            },
            time_ns: u64_at(b, 24),
            offset: u64_at(b, 32),
            len: u64_at(b, 40),
            dat_pos: u64_at(b, 48),
            dat_len: u32_at(b, 56),
            dat_crc: u32_at(b, 12),
        })
    }

    /// Whether `payload` is this entry's payload, intact.
    pub fn payload_ok(&self, payload: &[u8]) -> bool {
        payload.len() == self.dat_len as usize && crc32c::crc32c(payload) == self.dat_crc
    }

    /// Disk extent end (offset + len), for undo entries.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// An UNDO or UNDO_ZERO entry.
    pub fn is_undo(&self) -> bool {
        matches!(self.kind, Kind::Undo | Kind::UndoZero)
    }

    /// An entry for a ring record (its capture time names a point).
    pub fn is_ring_record(&self) -> bool {
        !self.pos.sub
            && matches!(
                self.kind,
                Kind::Undo | Kind::UndoZero | Kind::Noop | Kind::Mark
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The golden vectors printed in docs/journal-format.md.
    pub(crate) fn golden() -> (Header, Entry, &'static [u8]) {
        let p = Pos {
            epoch: 0,
            seq: 41,
            sub: true,
        };
        let h = Header {
            segment: 3,
            created_ns: 1_700_000_000_000_000_000,
            base: p,
            last_good: p,
            gap: Some(OpenGap {
                from: Some(p),
                reason: 5,
                since_ns: 1_700_000_000_500_000_000,
            }),
        };
        let e = Entry {
            kind: Kind::Undo,
            flags: 0,
            pos: Pos {
                epoch: 0,
                seq: 42,
                sub: false,
            },
            time_ns: 1_700_000_001_000_000_000,
            offset: 8192,
            len: 8,
            dat_pos: 4096,
            dat_len: 8,
            dat_crc: crc32c::crc32c(b"before!!"),
        };
        (h, e, b"before!!")
    }

    const GOLDEN_HEADER: &str = "425348504a4944580100000001000000030000000000000000002a36fe9c971700000000010000002900000000000000000000000100000029000000000000000000000001000000290000000000000005000000000000000065f753fe9c9717000000000000000000000000000000000000000000000000000000000b414662";
    const GOLDEN_ENTRY: &str = "0100000000000000000000009e69ffa92a0000000000000000cac471fe9c9717002000000000000008000000000000000010000000000000080000003c21feb0";

    #[test]
    fn golden_vectors() {
        let (h, e, payload) = golden();
        let hb = h.encode();
        let eb = e.encode();
        assert_eq!(hex(&hb), GOLDEN_HEADER);
        assert_eq!(hex(&eb), GOLDEN_ENTRY);
        assert_eq!(Header::decode(&hb).unwrap(), h);
        assert_eq!(Entry::decode(&eb).unwrap(), e);
        assert!(e.payload_ok(payload));
        assert!(!e.payload_ok(b"before!?"));
    }

    #[test]
    fn damage_is_found() {
        let (h, e, payload) = golden();
        let mut hb = h.encode();
        hb[20] ^= 1;
        assert!(Header::decode(&hb).unwrap_err().contains("checksum"));
        let mut hb = h.encode();
        hb[0] = b'X';
        assert!(Header::decode(&hb).unwrap_err().contains("magic"));
        let mut eb = e.encode();
        eb[33] ^= 1;
        assert!(Entry::decode(&eb).is_none());
        assert!(!e.payload_ok(&payload[1..]));
        assert!(Entry::decode(&[0u8; 64]).is_none(), "zeroes are no entry");
        let no_gap = Header { gap: None, ..h };
        assert_eq!(Header::decode(&no_gap.encode()).unwrap(), no_gap);
        let from_start = Header {
            gap: Some(OpenGap {
                from: None,
                reason: 1,
                since_ns: 7,
            }),
            ..h
        };
        assert_eq!(Header::decode(&from_start.encode()).unwrap(), from_start);
    }

    proptest::proptest! {
        #[test]
        fn entries_round_trip(kind in 1u8..=6, flags in 0u8..4, epoch: u32, seq: u64, sub: bool,
                              t: u64, off: u64, len: u64, dp: u64, dl: u32, pcrc: u32, flip in 0usize..64) {
            let e = Entry { kind: Kind::from_u8(kind).unwrap(), flags, pos: Pos { epoch, seq, sub },
                            time_ns: t, offset: off, len, dat_pos: dp, dat_len: dl, dat_crc: pcrc };
            let mut b = e.encode();
            proptest::prop_assert_eq!(Entry::decode(&b), Some(e));
            b[flip] ^= 0x10;
            proptest::prop_assert_eq!(Entry::decode(&b), None);
        }
    }
}
