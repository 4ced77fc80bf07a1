//! The shipper: drains a ring to a recovery site.
//!
//! Reads validated records from the ring in batches bounded by bytes and by
//! time, encodes each batch and seals it on a small pool of threads
//! (checksummed; zstd-compressed or stored, as the adaptive policy judges
//! the link and the CPU, or at a fixed `--zstd-level`), sends it over TLS 1.3 with mutual authentication to an
//! nbd-target, keeps several batches in flight, and releases ring space only
//! for sequences the target acknowledged durable. A lost connection is
//! retried with backoff and resumes from the applied sequence the target
//! answers in its hello.
//!
//! One code path serves both ways to run it: a thread inside
//! `splitter serve --ship-to`, or the `shipper run` daemon attached to a
//! ring a running splitter fills.
//!
//! It is *not* the I/O path (writes never wait for it: the ring and its
//! overflow bitmap decouple them) and it does not apply anything: the target
//! does.
//!
//! # Layout
//! - [`Shipper`] (`ship.rs`): configuration, the reconnect loop, the stop flag.
//! - `session.rs`: one connection: hello, the send/ack loop, heartbeats.
//! - `batch.rs`: a ring batch into plain wire records, payloads in place.
//! - [`compress`]: the adaptive choice of compression, zstd, the threads.
//! - `pipeline.rs`: batches sealed in parallel, sent in sequence order.
//! - [`resync`]: full passes and dirty-extent resends, in the ordered stream.
//! - [`verify`]: online verify (compare by hashes under writes, report, repair).
//! - `pace.rs`: the `--max-rate` limiter.
//! - [`cli`]: the shipping flags both binaries take.
//! - [`stats`]: counters, the ring's published progress, Prometheus text.

mod batch;
pub mod cli;
pub mod compress;
mod error;
mod pace;
mod pipeline;
pub mod resync;
mod session;
mod ship;
pub mod stats;
pub mod verify;

pub use error::{Error, Result};
pub use ship::{ShipConfig, Shipper};
pub use stats::Stats;
