//! Transmission replies: simple replies and structured reply chunks.
//!
//! Encoders write into fixed-size arrays so the server's hot path does not
//! allocate; decoders are for the client side.

use crate::protocol::*;
use crate::request::be_u64;
use crate::Error;

// Format: simple reply (16 bytes, big endian).
//   0   4  magic 0x67446698 (NBD_SIMPLE_REPLY_MAGIC)
//   4   4  error (0 = success, else an NBD error value)
//   8   8  cookie of the request
//   16  -  READ data (`length` bytes) on success, nothing otherwise
/// Encode a simple reply header.
pub fn simple(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

// Format: structured reply chunk header (20 bytes, big endian).
//   0   4  magic 0x668e33ef (NBD_STRUCTURED_REPLY_MAGIC)
//   4   2  flags (NBD_REPLY_FLAG_DONE on the last chunk)
//   6   2  type (NBD_REPLY_TYPE_*)
//   8   8  cookie of the request
//   16  4  length of the chunk payload that follows
/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Payload bytes that follow.
    pub length: u32,
}

impl ChunkHeader {
    /// Encode the 20-byte header.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut out = [0u8; STRUCTURED_REPLY_LEN];
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..20].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The header of a reply as a client reads it: simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: error and cookie.
    Simple {
        /// Error value, 0 for success.
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// One structured chunk.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Bytes to read before [`ReplyHeader::decode`] can tell which kind it is.
    pub const PREFIX_LEN: usize = 4;

    /// Length of the header whose first four bytes are `prefix`.
    pub fn len_from_prefix(prefix: [u8; 4]) -> Result<usize, Error> {
        match u32::from_be_bytes(prefix) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            got => Err(Error::BadMagic {
                context: "reply header",
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                got: u64::from(got),
            }),
        }
    }

    /// Decode a whole header (16 or 20 bytes as the magic says).
    pub fn decode(b: &[u8]) -> Result<Option<ReplyHeader>, Error> {
        let Some(prefix) = b.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = Self::len_from_prefix(*prefix)?;
        if b.len() < len {
            return Ok(None);
        }
        Ok(Some(if len == SIMPLE_REPLY_LEN {
            ReplyHeader::Simple {
                error: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                cookie: be_u64(&b[8..16]),
            }
        } else {
            ReplyHeader::Chunk(ChunkHeader {
                flags: u16::from_be_bytes([b[4], b[5]]),
                kind: u16::from_be_bytes([b[6], b[7]]),
                cookie: be_u64(&b[8..16]),
                length: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
            })
        }))
    }
}

/// Header of an `OFFSET_DATA` chunk (chunk header + 8-byte offset), the last
/// chunk of a successful READ; `data_len` bytes of data follow it.
pub fn offset_data(cookie: u64, offset: u64, data_len: u32) -> [u8; STRUCTURED_REPLY_LEN + 8] {
    let mut out = [0u8; STRUCTURED_REPLY_LEN + 8];
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    };
    out[..STRUCTURED_REPLY_LEN].copy_from_slice(&h.encode());
    out[STRUCTURED_REPLY_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A `NONE` chunk with the DONE flag: success without data.
pub fn none_done(cookie: u64) -> [u8; STRUCTURED_REPLY_LEN] {
    ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_NONE,
        cookie,
        length: 0,
    }
    .encode()
}

/// Longest error message put in an `ERROR` chunk.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// Largest encoded `ERROR` chunk.
pub const ERROR_CHUNK_MAX: usize = STRUCTURED_REPLY_LEN + 6 + MAX_ERROR_MESSAGE;

// Format: ERROR chunk payload: error u32, message length u16, message bytes.
/// Encode a final `ERROR` chunk into `out`, returning the bytes used. The
/// message is cut to [`MAX_ERROR_MESSAGE`] bytes at a character boundary.
pub fn error_done(
    cookie: u64,
    errno: Errno,
    message: &str,
    out: &mut [u8; ERROR_CHUNK_MAX],
) -> usize {
    let mut cut = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    // `cut` is at most MAX_ERROR_MESSAGE (256), so both fit their fields.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_ERROR,
        cookie,
        length: 6 + u32::from(msg_len),
    };
    out[..20].copy_from_slice(&h.encode());
    out[20..24].copy_from_slice(&errno.code().to_be_bytes());
    out[24..26].copy_from_slice(&msg_len.to_be_bytes());
    out[26..26 + msg.len()].copy_from_slice(msg);
    26 + msg.len()
}

/// One `base:allocation` descriptor: a run of `length` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered.
    pub length: u32,
    /// `STATE_HOLE` / `STATE_ZERO` bits.
    pub flags: u32,
}

// Format: BLOCK_STATUS chunk payload: context id u32, then per extent
// (length u32, status flags u32).
/// Encode a final `BLOCK_STATUS` chunk for `extents` into `out` (cleared first).
pub fn block_status_done(cookie: u64, context_id: u32, extents: &[Extent], out: &mut Vec<u8>) {
    out.clear();
    // The caller bounds the number of extents, so the payload fits in u32.
    let payload = u32::try_from(4 + extents.len() * 8).unwrap_or(u32::MAX);
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length: payload,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_simple_reply() {
        let b = simple(0x1122_3344_5566_7788, Errno::Perm.code());
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        assert_eq!(
            ReplyHeader::decode(&b).unwrap(),
            Some(ReplyHeader::Simple {
                error: 1,
                cookie: 0x1122_3344_5566_7788
            })
        );
    }

    #[test]
    fn golden_offset_data_chunk() {
        let b = offset_data(9, 512, 4096);
        assert_eq!(
            b,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0x10, 0x08, 0, 0,
                0, 0, 0, 0, 2, 0
            ]
        );
    }

    #[test]
    fn golden_error_chunk() {
        let mut out = [0u8; ERROR_CHUNK_MAX];
        let n = error_done(1, Errno::Inval, "no", &mut out);
        assert_eq!(
            &out[..n],
            &[
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0,
                22, 0, 2, b'n', b'o'
            ]
        );
        let long = "é".repeat(200);
        let n = error_done(1, Errno::Inval, &long, &mut out);
        assert!(n <= ERROR_CHUNK_MAX);
    }

    #[test]
    fn golden_block_status_chunk() {
        let mut out = Vec::new();
        let ext = [Extent {
            length: 4096,
            flags: STATE_HOLE | STATE_ZERO,
        }];
        block_status_done(2, 1, &ext, &mut out);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 12, 0, 0, 0,
                1, 0, 0, 0x10, 0, 0, 0, 0, 3
            ]
        );
    }

    #[test]
    fn reply_decoder_needs_more_bytes_and_rejects_bad_magic() {
        let b = none_done(5);
        for n in 0..b.len() {
            assert_eq!(ReplyHeader::decode(&b[..n]).unwrap(), None);
        }
        assert!(ReplyHeader::decode(&[0, 0, 0, 0, 0]).is_err());
    }
}
