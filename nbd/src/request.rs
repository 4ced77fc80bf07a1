//! Transmission requests: the 28-byte header, encode and decode.

use crate::protocol::{REQUEST_HEADER_LEN, REQUEST_MAGIC};
use crate::Error;

// Format: NBD request header, compact form (28 bytes, big endian).
//   offset  size  field
//   0       4     magic 0x25609513 (NBD_REQUEST_MAGIC)
//   4       2     command flags (NBD_CMD_FLAG_*)
//   6       2     command type (NBD_CMD_*)
//   8       8     cookie (opaque, echoed in the reply)
//   16      8     offset
//   24      4     length
//   28      -     `length` bytes of payload for NBD_CMD_WRITE only
/// A request header as it travels, not yet validated against an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` value.
    pub command: u16,
    /// Opaque cookie (the spec's "handle").
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl RequestHeader {
    /// Decode a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when fewer than 28 bytes are available (need more
    /// bytes is not malformed), and an error when the magic is wrong, after
    /// which the stream cannot be re-synchronised.
    pub fn decode(buf: &[u8]) -> Result<Option<RequestHeader>, Error> {
        let Some(b) = buf.first_chunk::<REQUEST_HEADER_LEN>() else {
            return Ok(None);
        };
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(Error::BadMagic {
                context: "request header",
                expected: u64::from(REQUEST_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Some(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        }))
    }

    /// Encode into the 28 bytes the wire carries.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Golden vector: a 4 KiB WRITE with FUA at offset 1 MiB, cookie 0x0102030405060708.
    const GOLDEN_WRITE: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
        0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // offset
        0x00, 0x00, 0x10, 0x00, // length
    ];

    #[test]
    fn golden_write_header() {
        let h = RequestHeader {
            flags: crate::protocol::CMD_FLAG_FUA,
            command: crate::protocol::CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 20,
            length: 4096,
        };
        assert_eq!(h.encode(), GOLDEN_WRITE);
        assert_eq!(RequestHeader::decode(&GOLDEN_WRITE).unwrap(), Some(h));
    }

    #[test]
    fn short_input_needs_more_bytes() {
        for n in 0..28 {
            assert_eq!(RequestHeader::decode(&GOLDEN_WRITE[..n]).unwrap(), None);
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut b = GOLDEN_WRITE;
        b[0] = 0;
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(Error::BadMagic { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RequestHeader::decode(&bytes);
        }

        #[test]
        fn round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, command, cookie, offset, length };
            let bytes = h.encode();
            prop_assert_eq!(RequestHeader::decode(&bytes).unwrap(), Some(h));
        }
    }
}
