//! The splitter: serves a protected disk over NBD and, with a ring,
//! duplicates every write, trim and zero into it before the client hears it
//! succeeded (FLUSH and FUA: durable in both).
//!
//! The splitter is in the I/O path of the disk it protects. It is a thin
//! assembly of shared pieces: the disk backend, the NBD server and the
//! write-capture engine all live in the `blockdev` crate (the recovery
//! site's exports use the same ones); this crate adds what only the
//! protected site does. It is *not* the replication: the shipper is.
//!
//! # Layout
//! - [`drain`]: a stand-in consumer of the ring for tests, benchmarks and debugging.
//! - [`identity`]: the disk marker: a stale ring started again, the
//!   disk's identity and ring recorded for the other site.
//! - [`mark`]: `splitter mark`: named points (recovery points) in the ring,
//!   crash- or application-consistent (`--freeze`, `--pre`, `--post`).
//! - [`control`]: the control socket (`RING.ctl`) through which a running
//!   `splitter serve` takes marks from other processes.
//! - [`status`]: `splitter ring status` as text and JSON, and the ring's Prometheus text.
//! - [`nbd_attach`]: `splitter nbd-attach`: the kernel's NBD client attached
//!   over netlink with a dead-connection timeout, reconnected when the
//!   splitter restarts. (The ublk front end is `blockdev::ublk`.)

pub mod control;
pub mod drain;
pub mod identity;
pub mod mark;
pub mod nbd_attach;
pub mod status;

pub use blockdev::{
    CaptureSession, CaptureSync, DiskKind, Error, FileDisk, ListenAddr, NoCapture, Result,
    RingCapture, ServeConfig, Server, ShutdownHandle, SingleExport, WriteCapture,
    MAX_INFLIGHT_BYTES, MAX_OPS, MAX_PAYLOAD,
};
