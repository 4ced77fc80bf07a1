//! The block path: what every front end (the splitter's NBD server today,
//! ublk next) and the recovery site (replicas, exports) share.
//!
//! - [`Backend`] — one disk abstraction with the operations a block device
//!   has: size, read, write (FUA), trim, zero, flush, extents, and what it
//!   can do natively ([`Caps`]). Implemented by [`FileDisk`] (a file or a
//!   block device; its descriptor is the io_uring path) and [`NbdDisk`] (an
//!   export of an upstream NBD server). A filter wraps another backend,
//!   like an nbdkit filter: [`Overlay`] is one.
//! - [`overlay`] — a copy-on-write [`Overlay`] over a base backend that is
//!   never written (test failover: a writable export of a disk at a
//!   recovery point): 4 KiB blocks in an unnamed sparse file, discarded on
//!   drop, with an optional cap (ENOSPC when full); or durable (failover:
//!   a named file and its [`overlay_map`], flushed like a disk).
//! - [`direct`] — writes around the page cache (a second `O_DIRECT`
//!   descriptor, a staging buffer): [`FileDisk::use_direct_writes`].
//! - [`marker`] — the disk marker (an xattr): a protected disk's stable
//!   identity, its ring, and where a failed-over copy began.
//! - [`server`] — the one NBD transmission server: listeners, a bounded
//!   handshake, one thread and one io_uring per connection, pipelining,
//!   structured replies, block status, multi-conn, bounded memory, graceful
//!   stop. It serves any [`server::ExportSet`]: the splitter's one disk, or
//!   the recovery site's replicas.
//! - `ublk` (feature `ublk`) — the ublk front end: `/dev/ublkbN` through
//!   libublk, one thread per queue, user recovery and the hand-over of a
//!   live device to an upgraded splitter.
//! - [`capture`] — the write-capture engine, front-end neutral: begin (the
//!   in-flight mark) → disk operation → capture → reply, keyed by a
//!   front-end tag below [`MAX_TAGS`]; FLUSH/FUA durability plans.
//!
//! This crate is *not* the replication (no network beyond NBD clients and
//! upstream NBD servers), and it does not know the ring's format: it calls
//! `ring::Producer`.

pub mod backend;
pub mod capture;
pub mod direct;
mod error;
pub mod file;
pub mod marker;
pub mod nbd_backend;
pub mod overlay;
pub mod overlay_map;
pub mod server;
#[cfg(feature = "ublk")]
pub mod ublk;

pub use backend::{Backend, Caps};
pub use capture::{CaptureSession, CaptureSync, NoCapture, RingCapture, WriteCapture};
pub use error::{Error, Result};
pub use file::{DiskKind, FileDisk};
pub use nbd_backend::NbdDisk;
pub use overlay::{Overlay, OverlayError, OVERLAY_BLOCK};
pub use server::{
    ExportSet, ListenAddr, OpenExport, ServeConfig, Server, ShutdownHandle, SingleExport,
    MAX_INFLIGHT_BYTES, MAX_OPS, MAX_PAYLOAD,
};

/// Front-end tags: a request in flight on one connection (or ublk queue)
/// is known to the capture by a tag below this, which is also the number
/// of entries of its in-flight lane in the ring.
pub const MAX_TAGS: usize = MAX_OPS;
