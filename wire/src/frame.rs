//! Frames: a fixed 24-byte header (with its own checksum, so a damaged
//! length is caught before the body is read) and a body whose layout the
//! frame type names. All integers are little endian.

use crate::error::WireError;

/// Frame magic, "BSWF".
pub const FRAME_MAGIC: [u8; 4] = *b"BSWF";
/// Frame header length.
pub const FRAME_HEADER_LEN: usize = 24;
/// Protocol version this code speaks. The hello carries a range; the target
/// picks the highest version both sides speak.
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version this code speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest plain (decoded) size of a batch's records: one record of the
/// ring's largest payload (64 MiB) with its header fits.
pub const MAX_PLAIN: u32 = (64 << 20) + 4096;
/// Largest body of any frame: a batch of MAX_PLAIN bytes sent stored, plus
/// its header. Anything larger is rejected before a byte of it is buffered.
pub const MAX_BODY: u32 = MAX_PLAIN + 4096;
/// Longest error message carried.
pub const MAX_MESSAGE: usize = 4096;
/// The block size a replica is addressed in (hello field).
pub const BLOCK_SIZE: u32 = 4096;

// Format: frame header (24 bytes)
//   off  size  field
//   0    4     magic "BSWF"
//   4    1     type (FrameType)
//   5    1     flags (0)
//   6    2     reserved (0)
//   8    4     body length (<= MAX_BODY)
//   12   4     crc32c of the body
//   16   4     crc32c of header bytes 0..16
//   20   4     reserved (0)
mod hdr {
    pub const MAGIC: usize = 0;
    pub const TYPE: usize = 4;
    pub const FLAGS: usize = 5;
    pub const RESERVED: usize = 6;
    pub const LEN: usize = 8;
    pub const BODY_CRC: usize = 12;
    pub const HEADER_CRC: usize = 16;
    pub const RESERVED2: usize = 20;
}

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Shipper → target, first frame: who I am, which disk.
    Hello = 1,
    /// Target → shipper, answer to the hello: where to resume.
    HelloReply = 2,
    /// Shipper → target: records.
    Batch = 3,
    /// Target → shipper: everything up to a sequence is durable.
    Ack = 4,
    /// Either way: alive, with the sender's view of progress.
    Heartbeat = 5,
    /// Either way: why the sender is closing the connection.
    Error = 6,
    /// Target → shipper: per-block hashes of a replica chunk that differs.
    BlockHashes = 7,
}

impl FrameType {
    /// Decode a type byte.
    pub fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::HelloReply,
            3 => FrameType::Batch,
            4 => FrameType::Ack,
            5 => FrameType::Heartbeat,
            6 => FrameType::Error,
            7 => FrameType::BlockHashes,
            _ => return None,
        })
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::HelloReply => "HELLO_REPLY",
            FrameType::Batch => "BATCH",
            FrameType::Ack => "ACK",
            FrameType::Heartbeat => "HEARTBEAT",
            FrameType::Error => "ERROR",
            FrameType::BlockHashes => "BLOCK_HASHES",
        }
    }

    /// Largest body this type may have.
    // The fixed lengths are constants far below 4 GiB.
    #[allow(clippy::cast_possible_truncation)]
    pub fn max_body(self) -> u32 {
        match self {
            FrameType::Hello => (HELLO_FIXED + MAX_DISK_ID_LEN + LINEAGE_LEN) as u32,
            FrameType::HelloReply => HELLO_REPLY_LEN as u32,
            FrameType::Batch => MAX_BODY,
            FrameType::Ack => ACK_LEN as u32,
            FrameType::Heartbeat => HEARTBEAT_LEN as u32,
            FrameType::Error => (ERROR_FIXED + MAX_MESSAGE) as u32,
            FrameType::BlockHashes => (BLOCK_HASHES_FIXED + MAX_BLOCK_HASHES * 32) as u32,
        }
    }
}

use crate::identity::MAX_DISK_ID_LEN;

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Type of the body.
    pub ftype: FrameType,
    /// Body length.
    pub len: u32,
    /// crc32c of the body.
    pub body_crc: u32,
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        return Err(WireError::Truncated {
            what,
            got: b.len(),
            need: n,
        });
    }
    Ok(())
}

impl FrameHeader {
    /// The header for `body` of type `ftype`.
    pub fn for_body(ftype: FrameType, body: &[u8]) -> FrameHeader {
        FrameHeader {
            ftype,
            // Bodies are built by this crate's encoders, all below MAX_BODY;
            // a larger one is refused by the peer's decoder.
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            body_crc: crc32c::crc32c(body),
        }
    }

    /// Encode.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[hdr::MAGIC..hdr::MAGIC + 4].copy_from_slice(&FRAME_MAGIC);
        b[hdr::TYPE] = self.ftype as u8;
        b[hdr::LEN..hdr::LEN + 4].copy_from_slice(&self.len.to_le_bytes());
        b[hdr::BODY_CRC..hdr::BODY_CRC + 4].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..hdr::HEADER_CRC]);
        b[hdr::HEADER_CRC..hdr::HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate: magic, header checksum, type, flags, reserved
    /// bytes, and the body length against the type's limit.
    pub fn decode(b: &[u8]) -> Result<FrameHeader, WireError> {
        need("frame header", b, FRAME_HEADER_LEN)?;
        if b[..4] != FRAME_MAGIC {
            return Err(WireError::BadMagic(u32::from_be_bytes([
                b[0], b[1], b[2], b[3],
            ])));
        }
        let stored = le32(b, hdr::HEADER_CRC);
        let computed = crc32c::crc32c(&b[..hdr::HEADER_CRC]);
        if stored != computed {
            return Err(WireError::HeaderChecksum { stored, computed });
        }
        let ftype = FrameType::from_u8(b[hdr::TYPE]).ok_or(WireError::UnknownType(b[hdr::TYPE]))?;
        if b[hdr::FLAGS] != 0 || le16(b, hdr::RESERVED) != 0 || le32(b, hdr::RESERVED2) != 0 {
            return Err(WireError::invalid(
                "frame header",
                "flags or reserved bytes are not zero (a newer protocol?)",
            ));
        }
        let len = le32(b, hdr::LEN);
        if len > ftype.max_body() {
            return Err(WireError::Oversized {
                frame: ftype.name(),
                len: u64::from(len),
                max: u64::from(ftype.max_body()),
            });
        }
        Ok(FrameHeader {
            ftype,
            len,
            body_crc: le32(b, hdr::BODY_CRC),
        })
    }

    /// Check `body` against the header's checksum.
    pub fn check_body(&self, body: &[u8]) -> Result<(), WireError> {
        if body.len() != self.len as usize {
            return Err(WireError::Truncated {
                what: self.ftype.name(),
                got: body.len(),
                need: self.len as usize,
            });
        }
        let computed = crc32c::crc32c(body);
        if computed != self.body_crc {
            return Err(WireError::BodyChecksum {
                frame: self.ftype.name(),
                stored: self.body_crc,
                computed,
            });
        }
        Ok(())
    }
}

// Format: HELLO body (shipper → target)
//   off  size  field
//   0    2     lowest protocol version the shipper speaks
//   2    2     highest protocol version the shipper speaks
//   4    4     flags (HELLO_*)
//   8    16    source ring id (the ring's disk UUID)
//   24   8     disk size in bytes
//   32   4     block size (4096)
//   36   4     reserved (0)
//   40   8     oldest sequence still in the ring (the consumer's tail)
//   48   8     next sequence the ring will assign
//   56   2     disk id length N (1..=128)
//   58   N     disk id (ASCII: letters, digits, '.', '_', '-')
//   then, optionally (a body of exactly 58+N+56 bytes), the lineage:
//   +0   16    disk identity (UUID stable across failover and failback)
//   +16  4     lineage flags (LINEAGE_*)
//   +20  4     reserved (0)
//   +24  16    failed over from ring: the ring whose point this disk began as
//   +40  8     at sequence
//   +48  8     failed over at, ns since the Unix epoch
const HELLO_FIXED: usize = 58;
/// Bytes of the optional lineage block at the end of a HELLO.
pub const LINEAGE_LEN: usize = 56;

/// Lineage flag: the disk is a failed-over copy (the failover fields hold).
pub const LINEAGE_FAILED_OVER: u32 = 1 << 0;
/// Lineage flag: the failed-over copy was written after its failover,
/// before its current ring captured it.
pub const LINEAGE_WRITTEN: u32 = 1 << 1;
/// Lineage flag: the identity comes from a disk marker (not the ring's id).
pub const LINEAGE_MARKED: u32 = 1 << 2;
const LINEAGE_KNOWN: u32 = LINEAGE_FAILED_OVER | LINEAGE_WRITTEN | LINEAGE_MARKED;

/// Where a protected disk comes from: its stable identity and, for a
/// failed-over copy protected back toward the original site, the point it
/// began as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lineage {
    /// The disk's identity.
    pub disk_uuid: [u8; 16],
    /// LINEAGE_* flags.
    pub flags: u32,
    /// The ring it was failed over from.
    pub from_ring: [u8; 16],
    /// The point's sequence in that ring.
    pub from_seq: u64,
    /// When it was failed over.
    pub failed_over_ns: u64,
}

impl Lineage {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.disk_uuid);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.from_ring);
        out.extend_from_slice(&self.from_seq.to_le_bytes());
        out.extend_from_slice(&self.failed_over_ns.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Result<Lineage, WireError> {
        let flags = le32(b, 16);
        if flags & !LINEAGE_KNOWN != 0 {
            return Err(WireError::invalid(
                "HELLO lineage flags",
                format!("unknown flags {flags:#x}"),
            ));
        }
        let mut disk_uuid = [0u8; 16];
        disk_uuid.copy_from_slice(&b[0..16]);
        let mut from_ring = [0u8; 16];
        from_ring.copy_from_slice(&b[24..40]);
        Ok(Lineage {
            disk_uuid,
            flags,
            from_ring,
            from_seq: le64(b, 40),
            failed_over_ns: le64(b, 48),
        })
    }

    /// A failed-over copy?
    pub fn failed_over(&self) -> bool {
        self.flags & LINEAGE_FAILED_OVER != 0
    }
}

/// Hello flag: the disk held data before its ring existed; the ring alone
/// cannot make a replica exact (an initial sync is needed).
pub const HELLO_NEEDS_INITIAL_SYNC: u32 = 1 << 0;
/// Hello flag: the ring overflowed into its dirty bitmap; regions must be resent.
pub const HELLO_OVERFLOW: u32 = 1 << 1;
/// Hello flag: the ring lost records to a torn tail; compare source and replica.
pub const HELLO_NEEDS_VERIFY: u32 = 1 << 2;
const HELLO_KNOWN_FLAGS: u32 = HELLO_NEEDS_INITIAL_SYNC | HELLO_OVERFLOW | HELLO_NEEDS_VERIFY;

/// The shipper's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version spoken.
    pub min_version: u16,
    /// Highest protocol version spoken.
    pub max_version: u16,
    /// HELLO_* flags.
    pub flags: u32,
    /// The source ring's id.
    pub ring_id: [u8; 16],
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Oldest sequence still in the ring.
    pub tail_seq: u64,
    /// Next sequence the ring will assign.
    pub next_seq: u64,
    /// The disk id this shipper replicates.
    pub disk_id: String,
    /// Where the disk comes from (None: an older shipper, or unknown).
    pub lineage: Option<Lineage>,
}

impl Hello {
    /// Encode into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.min_version.to_le_bytes());
        out.extend_from_slice(&self.max_version.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.ring_id);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.tail_seq.to_le_bytes());
        out.extend_from_slice(&self.next_seq.to_le_bytes());
        let id = self.disk_id.as_bytes();
        // Disk ids are validated at the command line to be <= 128 bytes.
        out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(id);
        if let Some(l) = &self.lineage {
            l.encode(out);
        }
    }

    /// Decode and validate.
    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        need("HELLO", b, HELLO_FIXED)?;
        let n = usize::from(le16(b, 56));
        let lineage = if b.len() == HELLO_FIXED + n + LINEAGE_LEN {
            Some(Lineage::decode(&b[HELLO_FIXED + n..])?)
        } else {
            None
        };
        let b = if lineage.is_some() {
            &b[..HELLO_FIXED + n]
        } else {
            b
        };
        if b.len() != HELLO_FIXED + n {
            return Err(WireError::invalid(
                "HELLO",
                format!(
                    "disk id length {n} does not match a body of {} bytes",
                    b.len()
                ),
            ));
        }
        let disk_id = std::str::from_utf8(&b[HELLO_FIXED..])
            .map_err(|_| WireError::invalid("disk id", "not UTF-8"))?
            .to_string();
        crate::identity::validate_disk_id(&disk_id)?;
        let flags = le32(b, 4);
        if flags & !HELLO_KNOWN_FLAGS != 0 {
            return Err(WireError::invalid(
                "HELLO flags",
                format!("unknown flags {flags:#x}"),
            ));
        }
        let mut ring_id = [0u8; 16];
        ring_id.copy_from_slice(&b[8..24]);
        let h = Hello {
            min_version: le16(b, 0),
            max_version: le16(b, 2),
            flags,
            ring_id,
            disk_size: le64(b, 24),
            block_size: le32(b, 32),
            tail_seq: le64(b, 40),
            next_seq: le64(b, 48),
            disk_id,
            lineage,
        };
        if h.min_version > h.max_version {
            return Err(WireError::invalid("HELLO", "lowest version above highest"));
        }
        if h.block_size == 0 || !h.block_size.is_power_of_two() {
            return Err(WireError::invalid(
                "HELLO block size",
                h.block_size.to_string(),
            ));
        }
        if h.disk_size == 0 || !h.disk_size.is_multiple_of(u64::from(h.block_size)) {
            return Err(WireError::invalid(
                "HELLO disk size",
                format!(
                    "{} is not a positive multiple of the block size",
                    h.disk_size
                ),
            ));
        }
        if h.tail_seq == 0 || h.tail_seq > h.next_seq {
            return Err(WireError::invalid(
                "HELLO sequences",
                format!("tail {} and next {}", h.tail_seq, h.next_seq),
            ));
        }
        Ok(h)
    }
}

// Format: HELLO_REPLY body (target → shipper), 32 bytes
//   off  size  field
//   0    2     protocol version chosen
//   2    2     reserved (0)
//   4    4     flags (REPLY_*)
//   8    8     applied sequence: every record up to it is durable in the replica (0: none)
//   16   4     largest frame body the target accepts
//   20   4     reserved (0)
//   24   8     full pass cursor: bytes from the start of the disk a full pass has covered durably

const HELLO_REPLY_LEN: usize = 32;

/// Reply flag: the replica is consistent (a crash-consistent image of the
/// source at the applied sequence).
pub const REPLY_CONSISTENT: u32 = 1 << 0;
/// Reply flag: the replica needs a full pass over the disk (it was never
/// complete, or its history is unknown); resume it at the cursor.
pub const REPLY_FULL_SYNC: u32 = 1 << 1;
/// Reply flag: the replica holds data worth comparing (a seed, an earlier
/// replica): run the full pass by hashes, sending only what differs.
pub const REPLY_COMPARE: u32 = 1 << 2;
/// Reply flag: the replica waits for the end of a dirty-extent resend
/// (SYNC_END with SYNC_END_DIRTY), even if the source's bitmap is empty now.
pub const REPLY_DIRTY_PENDING: u32 = 1 << 3;

/// The target's answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// Version chosen.
    pub version: u16,
    /// REPLY_* flags.
    pub flags: u32,
    /// Durably applied sequence; the shipper resumes after it.
    pub applied_seq: u64,
    /// Largest frame body accepted.
    pub max_body: u32,
    /// How far a full pass got (bytes from the start of the disk).
    pub sync_cursor: u64,
}

impl HelloReply {
    /// Encode.
    pub fn encode(&self) -> [u8; HELLO_REPLY_LEN] {
        let mut b = [0u8; HELLO_REPLY_LEN];
        b[0..2].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.applied_seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_body.to_le_bytes());
        b[24..32].copy_from_slice(&self.sync_cursor.to_le_bytes());
        b
    }

    /// Decode and validate.
    pub fn decode(b: &[u8]) -> Result<HelloReply, WireError> {
        exact("HELLO_REPLY", b, HELLO_REPLY_LEN)?;
        let r = HelloReply {
            version: le16(b, 0),
            flags: le32(b, 4),
            applied_seq: le64(b, 8),
            max_body: le32(b, 16),
            sync_cursor: le64(b, 24),
        };
        if r.flags & !(REPLY_CONSISTENT | REPLY_FULL_SYNC | REPLY_COMPARE | REPLY_DIRTY_PENDING)
            != 0
        {
            return Err(WireError::invalid(
                "HELLO_REPLY flags",
                format!("{:#x}", r.flags),
            ));
        }
        if r.max_body < 1 << 16 {
            return Err(WireError::invalid(
                "HELLO_REPLY max body",
                r.max_body.to_string(),
            ));
        }
        Ok(r)
    }
}

fn exact(what: &'static str, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() != n {
        return Err(WireError::invalid(
            what,
            format!("body of {} bytes, expected {n}", b.len()),
        ));
    }
    Ok(())
}

// Format: BATCH body
//   off  size  field
//   0    8     first sequence in the batch
//   8    8     last sequence in the batch
//   16   4     record count
//   20   1     codec (0 stored, 1 zstd)
//   21   3     reserved (0)
//   24   4     plain length: bytes of the encoded records (<= MAX_PLAIN)
//   28   4     crc32c of the plain records
//   32   n     payload: the plain records (stored) or their zstd frame
/// Length of the batch header inside a BATCH body.
pub const BATCH_HEADER_LEN: usize = 32;

/// How a batch's records are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// The plain records as they are (data that does not compress).
    Stored = 0,
    /// One zstd frame of the plain records.
    Zstd = 1,
}

/// A batch's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// First sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// Records in the batch.
    pub count: u32,
    /// Payload codec.
    pub codec: Codec,
    /// Plain length.
    pub plain_len: u32,
    /// crc32c of the plain records.
    pub plain_crc: u32,
}

impl BatchHeader {
    /// Encode.
    pub fn encode(&self) -> [u8; BATCH_HEADER_LEN] {
        let mut b = [0u8; BATCH_HEADER_LEN];
        b[0..8].copy_from_slice(&self.first_seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.last_seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        b[20] = self.codec as u8;
        b[24..28].copy_from_slice(&self.plain_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.plain_crc.to_le_bytes());
        b
    }

    /// Decode the header at the start of a BATCH body; the payload follows.
    pub fn decode(b: &[u8]) -> Result<BatchHeader, WireError> {
        need("BATCH header", b, BATCH_HEADER_LEN)?;
        let codec = match b[20] {
            0 => Codec::Stored,
            1 => Codec::Zstd,
            c => {
                return Err(WireError::invalid(
                    "BATCH codec",
                    format!("unknown codec {c}"),
                ))
            }
        };
        if b[21..24] != [0, 0, 0] {
            return Err(WireError::invalid(
                "BATCH header",
                "reserved bytes not zero",
            ));
        }
        let h = BatchHeader {
            first_seq: le64(b, 0),
            last_seq: le64(b, 8),
            count: le32(b, 16),
            codec,
            plain_len: le32(b, 24),
            plain_crc: le32(b, 28),
        };
        if h.count == 0 || h.first_seq == 0 || h.last_seq < h.first_seq {
            return Err(WireError::invalid(
                "BATCH sequences",
                format!("{} records, {}..={}", h.count, h.first_seq, h.last_seq),
            ));
        }
        if h.plain_len > MAX_PLAIN {
            return Err(WireError::Oversized {
                frame: "BATCH (plain)",
                len: u64::from(h.plain_len),
                max: u64::from(MAX_PLAIN),
            });
        }
        let payload = b.len() - BATCH_HEADER_LEN;
        if codec == Codec::Stored && payload != h.plain_len as usize {
            return Err(WireError::invalid(
                "BATCH",
                format!(
                    "stored payload of {payload} bytes, plain length {}",
                    h.plain_len
                ),
            ));
        }
        Ok(h)
    }

    /// Check decoded records against the header's checksum.
    pub fn check_plain(&self, plain: &[u8]) -> Result<(), WireError> {
        let computed = crc32c::crc32c(plain);
        if plain.len() != self.plain_len as usize || computed != self.plain_crc {
            return Err(WireError::RecordsChecksum {
                first_seq: self.first_seq,
                last_seq: self.last_seq,
                stored: self.plain_crc,
                computed,
            });
        }
        Ok(())
    }
}

// Format: ACK body (target → shipper), 16 bytes
//   0    8     applied sequence, durable in the replica
//   8    8     BATCH frames of this connection applied durably (resync
//              batches take no sequence numbers: this says which are durable)
const ACK_LEN: usize = 16;

/// Everything up to `applied_seq`, and the first `batches` batches of the
/// connection, are durable at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Durably applied sequence.
    pub applied_seq: u64,
    /// Batches of this connection durably applied.
    pub batches: u64,
}

impl Ack {
    /// Encode.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[0..8].copy_from_slice(&self.applied_seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.batches.to_le_bytes());
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Ack, WireError> {
        exact("ACK", b, ACK_LEN)?;
        Ok(Ack {
            applied_seq: le64(b, 0),
            batches: le64(b, 8),
        })
    }
}

// Format: HEARTBEAT body, 48 bytes
//   0    8     sender's wall clock, ns since the Unix epoch
//   8    8     shipper: newest sequence in the ring; target: applied sequence
//   16   8     shipper: capture time (ns) of the oldest unacknowledged record, 0 if none
//   24   8     shipper: records waiting (read or not, unacknowledged)
//   32   8     shipper: bytes waiting
//   40   4     shipper: source flags now (HELLO_* values: overflow, verify, initial sync)
//   44   4     reserved (0)
const HEARTBEAT_LEN: usize = 48;

/// Liveness and progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// Sender's clock.
    pub now_ns: u64,
    /// Newest sequence (shipper) or applied sequence (target).
    pub seq: u64,
    /// Oldest unacknowledged capture time (shipper).
    pub oldest_pending_ns: u64,
    /// Records waiting (shipper).
    pub records_waiting: u64,
    /// Bytes waiting (shipper).
    pub bytes_waiting: u64,
    /// The source's state now (HELLO_* flags; shipper).
    pub source_flags: u32,
}

impl Heartbeat {
    /// Encode.
    pub fn encode(&self) -> [u8; HEARTBEAT_LEN] {
        let mut b = [0u8; HEARTBEAT_LEN];
        for (i, v) in [
            self.now_ns,
            self.seq,
            self.oldest_pending_ns,
            self.records_waiting,
            self.bytes_waiting,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[40..44].copy_from_slice(&self.source_flags.to_le_bytes());
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Heartbeat, WireError> {
        exact("HEARTBEAT", b, HEARTBEAT_LEN)?;
        Ok(Heartbeat {
            now_ns: le64(b, 0),
            seq: le64(b, 8),
            oldest_pending_ns: le64(b, 16),
            records_waiting: le64(b, 24),
            bytes_waiting: le64(b, 32),
            source_flags: le32(b, 40),
        })
    }
}

// Format: ERROR body
//   0    2     code (ErrorCode)
//   2    2     message length N (<= 4096)
//   4    N     message (UTF-8), for the peer's log
const ERROR_FIXED: usize = 4;

/// Why a peer is closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame broke the protocol.
    Protocol = 1,
    /// No common protocol version.
    Version = 2,
    /// The certificate does not allow writing this disk.
    Forbidden = 3,
    /// The disk does not match the replica (size, ring).
    Mismatch = 4,
    /// The replica could not be written or synced (disk full, I/O error):
    /// retry later.
    ReplicaIo = 5,
    /// The batch does not follow the applied sequence.
    Sequence = 6,
    /// Another shipper is connected for this disk.
    Busy = 7,
    /// Anything else.
    Internal = 8,
    /// The disk is failed over at the recovery site: nothing is accepted
    /// until the failover is rolled back there (keep the ring: nothing is
    /// released), or, once committed, until the disk is protected again.
    FailedOver = 9,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Version,
            3 => ErrorCode::Forbidden,
            4 => ErrorCode::Mismatch,
            5 => ErrorCode::ReplicaIo,
            6 => ErrorCode::Sequence,
            7 => ErrorCode::Busy,
            8 => ErrorCode::Internal,
            9 => ErrorCode::FailedOver,
            _ => return None,
        })
    }
}

/// An error frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// What kind.
    pub code: ErrorCode,
    /// For the peer's log.
    pub message: String,
}

impl ErrorMsg {
    /// Encode into `out` (cleared first); the message is cut at MAX_MESSAGE bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let mut end = self.message.len().min(MAX_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let m = &self.message.as_bytes()[..end];
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        // end <= MAX_MESSAGE (4096).
        out.extend_from_slice(&u16::try_from(m.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(m);
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<ErrorMsg, WireError> {
        need("ERROR", b, ERROR_FIXED)?;
        let code = ErrorCode::from_u16(le16(b, 0))
            .ok_or_else(|| WireError::invalid("ERROR code", le16(b, 0).to_string()))?;
        let n = usize::from(le16(b, 2));
        exact("ERROR", b, ERROR_FIXED + n)?;
        let message = String::from_utf8_lossy(&b[ERROR_FIXED..]).into_owned();
        Ok(ErrorMsg { code, message })
    }
}

// Format: BLOCK_HASHES body (target → shipper)
//   0    8     chunk offset (as in the SYNC_HASH it answers)
//   8    4     chunk length
//   12   4     block size (4096)
//   16   4     block count N = ceil(length / block size) (<= MAX_BLOCK_HASHES)
//   20   4     reserved (0)
//   24   32*N  blake3 hash of each block of the replica, at the SYNC_HASH's position
const BLOCK_HASHES_FIXED: usize = 24;
/// Most blocks a BLOCK_HASHES frame lists.
pub const MAX_BLOCK_HASHES: usize = 4096;
/// Most BLOCK_HASHES bytes (whole frames) the SYNC_HASH records of one
/// batch may ask for, counting every chunk as differing
/// ([`block_hashes_frame_len`]). The target refuses a batch that asks for
/// more before applying any of it, so one batch of 72-byte SYNC_HASH
/// records cannot make it queue gigabytes of answers.
pub const MAX_BATCH_HASH_REPLY: u64 = 4 << 20;

/// Bytes of the BLOCK_HASHES frame (frame header included) that answers a
/// SYNC_HASH over `len` bytes whose chunk differs.
pub fn block_hashes_frame_len(len: u32) -> u64 {
    (FRAME_HEADER_LEN + BLOCK_HASHES_FIXED) as u64 + 32 * u64::from(len.div_ceil(BLOCK_SIZE))
}

/// The replica's per-block hashes of a chunk that differs from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    /// Chunk offset.
    pub offset: u64,
    /// Chunk length.
    pub len: u32,
    /// Block size.
    pub block_size: u32,
    /// One blake3 hash per block.
    pub hashes: Vec<[u8; 32]>,
}

impl BlockHashes {
    /// Encode into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        // At most MAX_BLOCK_HASHES, checked by the builder and the decoder.
        out.extend_from_slice(&u32::try_from(self.hashes.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
    }

    /// Decode and validate.
    pub fn decode(b: &[u8]) -> Result<BlockHashes, WireError> {
        need("BLOCK_HASHES", b, BLOCK_HASHES_FIXED)?;
        let (offset, len, block_size, n) =
            (le64(b, 0), le32(b, 8), le32(b, 12), le32(b, 16) as usize);
        if block_size == 0 || !block_size.is_power_of_two() || len == 0 {
            return Err(WireError::invalid(
                "BLOCK_HASHES",
                format!("block size {block_size}, length {len}"),
            ));
        }
        if n > MAX_BLOCK_HASHES || n != len.div_ceil(block_size) as usize {
            return Err(WireError::invalid(
                "BLOCK_HASHES",
                format!("{n} hashes for {len} bytes in blocks of {block_size}"),
            ));
        }
        exact("BLOCK_HASHES", b, BLOCK_HASHES_FIXED + n * 32)?;
        let hashes = b[BLOCK_HASHES_FIXED..]
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(BlockHashes {
            offset,
            len,
            block_size,
            hashes,
        })
    }
}
