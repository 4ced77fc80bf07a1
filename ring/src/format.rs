//! The ring file format: every constant and byte offset of the record
//! journal (header, cursors, state flags, records, bitmap, in-flight table),
//! the record header encode/decode and its checksum. Specified for humans in
//! `docs/ring-format.md`; this module is the one place the code knows it.
//! The consumer page's control fields (the shipper's progress, the verify
//! handshake, the resync phase) are laid out in `control`.
//!
//! All integers are little endian. Positions in the data area are
//! free-running byte counts (`u64`); a position's offset in the data area is
//! `position % capacity`.

/// Magic at the start of a ring file.
pub const FILE_MAGIC: [u8; 8] = *b"BSHPRING";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header: page 0 (static part and the producer's cursors) and
/// page 1 (the consumer's cursors, kept apart so that syncing them never
/// waits behind the writeback of the page the producer dirties on every
/// record). The data area starts here.
pub const HEADER_LEN: u64 = 8192;
/// File offset of the consumer's page.
pub const CONSUMER_PAGE: u64 = 4096;
/// Alignment of the data area capacity and of the bitmap.
pub const PAGE: u64 = 4096;
/// Alignment of every record in the data area.
pub const RECORD_ALIGN: u64 = 8;
/// Smallest ring data area.
pub const MIN_CAPACITY: u64 = 64 * 1024;
/// Largest record payload. Larger changes go to the dirty bitmap; a reader
/// never allocates more than this for one record, whatever the file says.
pub const MAX_PAYLOAD: u32 = 64 << 20;

// Format: ring file header, static part (bytes 0..512 of page 0), written once
// at creation and protected by a crc32c.
//   off  size  field
//   0    8     magic "BSHPRING"
//   8    4     version (1)
//   12   4     header length (8192)
//   16   8     capacity: bytes in the data area (multiple of 4096)
//   24   8     data area offset (8192)
//   32   8     bitmap offset (data offset + capacity)
//   40   8     bitmap length in bytes (multiple of 4096)
//   48   4     bitmap granularity: disk bytes per bit (power of two >= 4096)
//   52   4     reserved (0)
//   56   16    disk id (UUID, random at ring creation)
//   72   8     disk size in bytes
//   80   8     disk fingerprint A (st_dev of a file; st_rdev of a block device)
//   88   8     disk fingerprint B (st_ino of a file; 0 for a block device)
//   96   8     created, ns since the Unix epoch
//   104  256   disk path at creation (UTF-8, NUL padded; informational)
//   360  8     in-flight table offset (bitmap offset + bitmap length)
//   368  8     in-flight table entries (lanes x LANE_ENTRIES)
//   376  132   reserved (0)
//   508  4     crc32c of bytes 0..508
pub(crate) mod hdr {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 12;
    pub const CAPACITY: usize = 16;
    pub const DATA_OFFSET: usize = 24;
    pub const BITMAP_OFFSET: usize = 32;
    pub const BITMAP_LEN: usize = 40;
    pub const GRANULARITY: usize = 48;
    pub const DISK_ID: usize = 56;
    pub const DISK_SIZE: usize = 72;
    pub const FINGERPRINT_A: usize = 80;
    pub const FINGERPRINT_B: usize = 88;
    pub const CREATED: usize = 96;
    pub const DISK_PATH: usize = 104;
    pub const DISK_PATH_LEN: usize = 256;
    pub const INFLIGHT_OFFSET: usize = 360;
    pub const INFLIGHT_ENTRIES: usize = 368;
    pub const STATIC_CRC: usize = 508;
    pub const STATIC_LEN: usize = 512;
}

// Format: ring file header, live part: little-endian u64 atomics, each on its
// own 64-byte line, changed while the ring is in use.
//   512   head          producer: position after the last published record
//   576   next_seq      producer: sequence number the next record gets
//   832   synced_head   producer: every record before it was durable at a sync
//   896   state         flags (STATE_*)
//   960   overflow_since  ns since the Unix epoch of the first overflow (0: none)
//   1024  producer_pid  informational
//   1088  records_lost  records cut from a torn tail at recovery (cumulative)
//   1152  boot_id       16 bytes: /proc/sys/kernel/random/boot_id of the producer's boot
//   1280  dirty_marks   times the dirty bitmap was marked, cumulative (counted before the bits are set)
// and on page 1 (the consumer's page):
//   4096  tail          consumer: position of the first unreleased record
//   4160  tail_seq      consumer: sequence of the first unreleased record
//   4224  durable_tail  consumer: a tail known durable; space below it is reusable
// and, after the cursors, the consumer page's control fields (the shipper's
// progress, the verify handshake, the resync phase): not part of the
// journal, laid out in `control` (4288..5320).
/// Byte offsets of the live header fields.
pub(crate) mod live {
    pub const HEAD: usize = 512;
    pub const NEXT_SEQ: usize = 576;
    pub const TAIL: usize = 4096;
    pub const TAIL_SEQ: usize = 4160;
    pub const DURABLE_TAIL: usize = 4224;
    pub const SYNCED_HEAD: usize = 832;
    pub const STATE: usize = 896;
    pub const OVERFLOW_SINCE: usize = 960;
    pub const PRODUCER_PID: usize = 1024;
    pub const RECORDS_LOST: usize = 1088;
    pub const BOOT_ID: usize = 1152;
    pub const DIRTY_MARKS: usize = 1280;
}

// Format: in-flight table (after the bitmap). Entries of two little-endian
// u64 atomics: disk offset, then length (0 = free). A front end marks a change
// here before it touches the disk and clears it once the change is in the
// ring: after a crash, what is still marked may be on the disk without being
// in the ring, and goes to the dirty bitmap. Lanes of LANE_ENTRIES entries
// belong to one connection each.
/// Entries per lane (one lane per front-end connection).
pub const LANE_ENTRIES: u64 = 128;
/// Lanes in a ring file.
pub const LANES: u64 = 256;
/// Bytes per in-flight entry.
pub const INFLIGHT_ENTRY_LEN: u64 = 16;

/// State flag: records did not fit; the dirty bitmap holds their extents.
pub const STATE_OVERFLOW: u64 = 1 << 0;
/// State flag: the disk held data when the ring was created, so a replica
/// needs an initial full copy before the ring alone can keep it exact.
pub const STATE_NEEDS_INITIAL_SYNC: u64 = 1 << 1;
/// State flag: recovery cut records from a torn tail, or the machine
/// restarted without a clean shutdown; changes may be missing whose extents
/// are unknown, so source and replica must be compared (verify).
pub const STATE_NEEDS_VERIFY: u64 = 1 << 2;
/// State flag: the producer closed cleanly (nothing was in flight).
pub const STATE_CLEAN: u64 = 1 << 3;
/// State flag: a crash left changes on the disk that may not be in the
/// ring; their extents were moved to the dirty bitmap.
pub const STATE_CRASH_DIRTY: u64 = 1 << 4;

// Format: record header (48 bytes), at an 8-byte aligned data-area offset;
// a record never wraps: when it does not fit before the end of the data
// area, a PAD record (or, when fewer than 48 bytes remain, nothing) fills
// the rest and the record starts at offset 0.
//   off  size  field
//   0    4     magic 0x52435342 ("BSCR" little endian)
//   4    2     kind (KIND_*)
//   6    2     flags (FLAG_*)
//   8    8     seq (PAD: the seq the next record will carry)
//   16   8     disk offset
//   24   4     extent length: disk bytes covered (PAD: bytes of padding, header included)
//   28   4     payload length: WRITE = extent length, MARK = name length, else 0
//   32   8     capture time, ns since the Unix epoch
//   40   4     crc32c of bytes 0..40 then the payload
//   44   4     reserved (0)
//   48   n     payload, zero-padded to 8 bytes
/// Record magic.
pub const RECORD_MAGIC: u32 = 0x5243_5342;
/// Record header length.
pub const RECORD_HEADER_LEN: usize = 48;

/// A data write: the payload is the data.
pub const KIND_WRITE: u16 = 1;
/// A discard: the extent now reads as zeroes.
pub const KIND_TRIM: u16 = 2;
/// Zeroes written: the extent reads as zeroes.
pub const KIND_ZERO: u16 = 3;
/// A named point in the stream (a recovery point); the payload is its name.
pub const KIND_MARK: u16 = 4;
/// Padding to the end of the data area; not a change, carries no sequence.
pub const KIND_PAD: u16 = 5;

// Format: a MARK record's disk offset field holds the mark's flags (a mark
// covers no extent): bit 0 = MARK_APP; every other bit is reserved, written
// 0 and ignored by readers (a reader that does not know a bit still reads
// the mark as a crash-consistent point).
/// MARK flag (in the record's `offset` field): an application-consistent
/// point, taken with the file system frozen (`fsfreeze`) and/or between
/// application hooks. Without it a mark is crash-consistent.
pub const MARK_APP: u64 = 1 << 0;

/// Record flag: the sequence continues after a gap that recovery left (the
/// records of a torn tail were lost); allowed to skip numbers.
pub const FLAG_AFTER_GAP: u16 = 1 << 0;

/// What a record says happened to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Data written.
    Write,
    /// Range discarded (reads as zeroes).
    Trim,
    /// Range zeroed.
    Zero,
    /// A named mark.
    Mark,
    /// Padding (internal; consumers never see it).
    Pad,
}

impl Kind {
    /// The wire value.
    pub const fn code(self) -> u16 {
        match self {
            Kind::Write => KIND_WRITE,
            Kind::Trim => KIND_TRIM,
            Kind::Zero => KIND_ZERO,
            Kind::Mark => KIND_MARK,
            Kind::Pad => KIND_PAD,
        }
    }

    /// Decode a wire value.
    pub const fn from_code(c: u16) -> Option<Kind> {
        match c {
            KIND_WRITE => Some(Kind::Write),
            KIND_TRIM => Some(Kind::Trim),
            KIND_ZERO => Some(Kind::Zero),
            KIND_MARK => Some(Kind::Mark),
            KIND_PAD => Some(Kind::Pad),
            _ => None,
        }
    }

    /// Short name for logs and dumps.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Write => "WRITE",
            Kind::Trim => "TRIM",
            Kind::Zero => "ZERO",
            Kind::Mark => "MARK",
            Kind::Pad => "PAD",
        }
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What happened.
    pub kind: Kind,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Sequence number.
    pub seq: u64,
    /// Disk offset.
    pub offset: u64,
    /// Disk bytes covered (PAD: padding bytes).
    pub len: u32,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
    /// Capture time, ns since the Unix epoch.
    pub time_ns: u64,
    /// Stored checksum.
    pub crc: u32,
}

/// Bytes a record with `payload_len` payload bytes takes in the data area.
pub const fn record_size(payload_len: u32) -> u64 {
    let n = RECORD_HEADER_LEN as u64 + payload_len as u64;
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

impl RecordHeader {
    /// Encode with the checksum computed over the header and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.kind.code().to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.time_ns.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..40]), payload);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode a header; `None` when the magic or kind is wrong. The
    /// checksum is checked separately, once the payload is at hand.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Option<RecordHeader> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != RECORD_MAGIC {
            return None;
        }
        let kind = Kind::from_code(u16::from_le_bytes([b[4], b[5]]))?;
        Some(RecordHeader {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            seq: u64_at(8),
            offset: u64_at(16),
            len: u32_at(24),
            payload_len: u32_at(28),
            time_ns: u64_at(32),
            crc: u32_at(40),
        })
    }

    /// Whether `raw` (this header's bytes) and `payload` match the stored checksum.
    pub fn checksum_ok(raw: &[u8; RECORD_HEADER_LEN], payload: &[u8]) -> bool {
        let stored = u32::from_le_bytes([raw[40], raw[41], raw[42], raw[43]]);
        crc32c::crc32c_append(crc32c::crc32c(&raw[..40]), payload) == stored
    }

    /// Bytes this record takes in the data area.
    pub fn size(&self) -> u64 {
        if self.kind == Kind::Pad {
            u64::from(self.len)
        } else {
            record_size(self.payload_len)
        }
    }
}

/// Data-area offset of a free-running position.
pub const fn offset_of(pos: u64, capacity: u64) -> u64 {
    pos % capacity
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vector: a 4-byte WRITE of "abcd" at offset 4096, seq 7.
    #[test]
    fn golden_write_record() {
        let h = RecordHeader {
            kind: Kind::Write,
            flags: 0,
            seq: 7,
            offset: 4096,
            len: 4,
            payload_len: 4,
            time_ns: 1_000_000_000,
            crc: 0,
        };
        let b = h.encode(b"abcd");
        let want: [u8; 40] = [
            0x42, 0x53, 0x43, 0x52, // magic
            1, 0, // kind WRITE
            0, 0, // flags
            7, 0, 0, 0, 0, 0, 0, 0, // seq
            0, 0x10, 0, 0, 0, 0, 0, 0, // offset 4096
            4, 0, 0, 0, // len
            4, 0, 0, 0, // payload len
            0, 0xca, 0x9a, 0x3b, 0, 0, 0, 0, // time 1e9 ns
        ];
        assert_eq!(&b[..40], &want);
        assert_eq!(&b[44..], &[0, 0, 0, 0]);
        assert!(RecordHeader::checksum_ok(&b, b"abcd"));
        assert!(!RecordHeader::checksum_ok(&b, b"abce"));
        let d = RecordHeader::decode(&b).unwrap();
        assert_eq!((d.kind, d.seq, d.offset, d.len), (Kind::Write, 7, 4096, 4));
        assert_eq!(d.size(), 56);
    }

    #[test]
    fn bad_magic_or_kind_does_not_decode() {
        let mut b = RecordHeader {
            kind: Kind::Trim,
            flags: 0,
            seq: 1,
            offset: 0,
            len: 1,
            payload_len: 0,
            time_ns: 0,
            crc: 0,
        }
        .encode(&[]);
        assert!(RecordHeader::decode(&b).is_some());
        b[4] = 9;
        assert!(RecordHeader::decode(&b).is_none());
        b[4] = 2;
        b[0] ^= 1;
        assert!(RecordHeader::decode(&b).is_none());
    }

    #[test]
    fn sizes_are_aligned() {
        assert_eq!(record_size(0), 48);
        assert_eq!(record_size(1), 56);
        assert_eq!(record_size(8), 56);
        assert_eq!(record_size(4096), 4144);
    }
}
