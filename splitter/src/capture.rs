//! The write-capture filter: where every acknowledged change to the disk is
//! duplicated before the client hears about it.
//!
//! The front ends (NBD today, ublk later) call a [`WriteCapture`] after a
//! change reached the disk and *before* they acknowledge it, and after a
//! disk flush *before* they acknowledge the flush. This is the "tee to ring"
//! filter of the architecture: the ring (a later piece of work) implements
//! this trait, and a front end never needs to know whether a ring is there.
//! Without `--ring`, [`NoCapture`] is used: the disk is served as is, which is
//! also the baseline for benchmarks.

use std::io;

/// Receives every change, in the order the front end acknowledges them.
///
/// Implementations must be cheap and must never wait on the network
/// (contract 4): an error here fails the client's request with `EIO`.
pub trait WriteCapture: Send + Sync {
    /// `data` was written at `offset` and is about to be acknowledged.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `len` bytes at `offset` were discarded (they now read as zeroes).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `len` bytes at `offset` were zeroed.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The disk was flushed; make everything captured so far durable too.
    fn flush(&self) -> io::Result<()>;
}

/// No capture: serve the disk without recording its writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCapture;

impl WriteCapture for NoCapture {
    fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn zero(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
