//! The splitter: serves a protected disk over NBD and, with a ring,
//! duplicates every write, trim and zero into it before the client hears it
//! succeeded (FLUSH and FUA: durable in both).
//!
//! The splitter is in the I/O path of the disk it protects: its job is to be
//! correct with every NBD client and fast. It is *not* the replication: it
//! never talks to the network beyond its NBD clients; the shipper does that.
//!
//! # Layout
//! - [`disk`]: the protected disk (file or block device), size, lock, allocation map.
//! - [`capture`]: the write-capture filter shared by every front end (tee to ring).
//! - [`server`]: listeners, accept loop, handshake, shutdown.
//! - [`drain`]: a stand-in consumer of the ring for tests, benchmarks and debugging.
//! - `connection`: one connection's request loop over io_uring (the hot path).
//! - `overlap`: overlapping changes reach the disk and the ring in one order.
//! - `uring`, `buffers`: the io_uring owner and the request buffer pool.

mod buffers;
pub mod capture;
mod connection;
pub mod disk;
pub mod drain;
mod error;
mod overlap;
pub mod server;
mod uring;

pub use capture::{CaptureSession, CaptureSync, NoCapture, RingCapture, WriteCapture};
pub use connection::{MAX_INFLIGHT_BYTES, MAX_OPS};
pub use disk::{Disk, DiskKind};
pub use error::{Error, Result};
pub use server::{ListenAddr, ServeConfig, Server, ShutdownHandle, MAX_PAYLOAD};
