//! Whole frames on byte streams: a blocking reader/writer for `Read`/`Write`
//! and a parser for bytes already buffered (non-blocking loops).

use std::io::{Read, Write};

use crate::error::WireError;
use crate::frame::{FrameHeader, FrameType, FRAME_HEADER_LEN};

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed or ended.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame.
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
}

/// Write one frame (header, then body).
pub fn write_frame(w: &mut impl Write, ftype: FrameType, body: &[u8]) -> std::io::Result<()> {
    let h = FrameHeader::for_body(ftype, body);
    w.write_all(&h.encode())?;
    w.write_all(body)
}

/// Read one frame into `body` (resized to the body length), checking the
/// header and the body checksum. The length is checked against the type's
/// limit before anything is allocated.
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> Result<FrameHeader, ReadError> {
    let mut hb = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut hb)?;
    let h = FrameHeader::decode(&hb)?;
    body.resize(h.len as usize, 0);
    r.read_exact(body)?;
    h.check_body(body)?;
    Ok(h)
}

/// Parse one frame at the start of `buf`. `Ok(None)`: not all of it is
/// there yet. `Ok(Some((header, total)))`: the body is
/// `buf[FRAME_HEADER_LEN..total]`, checked.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let h = FrameHeader::decode(&buf[..FRAME_HEADER_LEN])?;
    let total = FRAME_HEADER_LEN + h.len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    h.check_body(&buf[FRAME_HEADER_LEN..total])?;
    Ok(Some((h, total)))
}
