//! The replication protocol between a shipper and an nbd-target.
//!
//! What crosses the (TLS-protected) connection: a versioned hello in both
//! directions, batches of ring records (optionally zstd-compressed, with a
//! checksum over the plain records), acknowledgements of durable apply,
//! heartbeats and error messages. Specified for people in
//! `docs/wire-protocol.md`; [`frame`] and [`records`] are the one place the
//! code knows the byte layouts.
//!
//! This crate is *not* a network component: it owns no sockets, threads or
//! files, and it does not compress (it names the codec; the ends run zstd).
//! It encodes into caller-owned buffers and decodes from byte slices, and
//! every decoder returns a [`WireError`] naming what was wrong instead of
//! panicking on any input.
//!
//! # Layout
//! - [`frame`]: the frame header, frame types, and the fixed message bodies.
//! - [`records`]: the plain encoding of ring records inside a batch.
//! - [`identity`]: disk ids, and how a certificate names the disks its holder may write.
//! - [`io`]: reading and writing whole frames on any `Read`/`Write`.
//! - [`timing`]: heartbeat period, peer and hello timeouts, shared by both ends.

#![forbid(unsafe_code)]

mod error;
pub mod frame;
pub mod identity;
pub mod io;
pub mod records;
pub mod timing;

pub use error::WireError;
pub use frame::{
    Ack, BatchHeader, BlockHashes, Codec, ErrorCode, ErrorMsg, FrameHeader, FrameType, Heartbeat,
    Hello, HelloReply,
};
pub use records::{RecordIter, RecordKind, WireRecord, MARK_APP};
