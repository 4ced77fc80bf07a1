//! The recovery site: accepts shippers over mutual TLS, applies their
//! records to replicas in sequence order, and serves each replica read-only
//! over NBD.
//!
//! Per protected disk (its disk id) the target keeps a replica (a sparse
//! file in the data folder, or an export of an upstream NBD server) and a
//! state file with the applied sequence. A batch is verified whole, applied
//! in order, made durable, the applied sequence recorded atomically, and
//! only then acknowledged; a replayed batch is skipped record by record.
//!
//! It is *not* the shipper's retry logic nor the ring: a connection that
//! fails is simply dropped, and the shipper reconnects and resumes from the
//! applied sequence the hello reply gives it.
//!
//! # Layout
//! - [`server`]: the daemon (listeners, threads, live status).
//! - [`admission`]: the caps on shipper connections and their openings.
//! - [`session`]: one shipper's connection: the driver loop; `session::hello`
//!   (TLS, hello, enrolment, opening the state) and [`session::apply`] (the
//!   apply pipeline and its [`session::apply::RecordSink`] seam).
//! - [`consistency`]: the state machine owning why a replica is not
//!   consistent and the full pass that cures it.
//! - [`state`]: the state file format (applied sequence, consistency).
//! - [`replica`]: file and NBD-backed replicas.
//! - [`registry`]: the replicas, claims, live numbers.
//! - [`journal`]: the recovery-point journal (an undo log beside each
//!   replica), point-in-time views, marks, gaps, retention.
//! - [`export`]: NBD exports of the replicas: latest (`ID`) and points
//!   (`ID@POINT`).
//! - [`status`]: `status` output and Prometheus metrics.
//! - [`points`]: recovery points as commands see them (naming, listing, tags).
//! - [`test_failover`]: a writable copy-on-write export of a point.
//! - [`failover`]: failing a disk over at a point (fencing its shipper,
//!   a durable overlay), moving, rolling back, committing.
//! - [`identity`]: which disk a replica belongs to (the HELLO's lineage),
//!   split-brain detection for a disk seeded in place.
//! - [`lockfile`]: the flock files that keep sessions, exports and
//!   commands out of each other's way.
//! - [`export_image`]: a point written to an image file (raw, a fixed VHD,
//!   qcow2 through `qemu-img`) for the recovery platform to boot.
//! - [`vhd`]: the fixed VHD's footer (format, geometry, checksum).
//! - [`pki`]: the site's certificate authority.
//! - [`seed`]: registering an image carried to the site as a starting replica.

pub mod admission;
pub mod consistency;
pub mod error;
pub mod export;
pub mod export_image;
pub mod failover;
pub mod identity;
pub mod journal;
pub mod lockfile;
pub mod pki;
pub mod points;
pub mod registry;
pub mod replica;
pub mod seed;
pub mod server;
pub mod session;
pub mod state;
pub mod status;
pub mod test_failover;
pub mod vhd;

pub use error::{Error, Result};
pub use server::{Target, TargetConfig};
