//! The write ring: a memory-mapped file in which the splitter records every
//! change to a protected disk, in order, for the shipper to drain.
//!
//! It is the journal ASR keeps on its process server, done as a shared
//! mapping: the producer (the splitter, all its connections in one total
//! order) appends checksummed records; the consumer (the shipper, another
//! process) reads them and releases them once the recovery site holds them
//! durably. When the ring is full, changes are marked in a persistent dirty
//! bitmap instead (contract 4), to be resynchronised later.
//!
//! This crate is *not* a network component and owns no threads: it is the
//! format and the two sides' rules. Durability is the caller's: the producer
//! says which byte ranges a sync must cover ([`Producer::sync_plan`]); the
//! splitter syncs them with io_uring alongside the disk.
//!
//! # Layout
//! - `format`: every constant and byte offset, record encode/decode, golden vectors.
//! - `shm`: the shared mapping and the few syscalls the ring makes: all of the crate's `unsafe`.
//! - `file`: creating/opening/validating a ring file, role locks, reading records.
//! - [`Producer`]: append, overflow to the bitmap, sync plans, crash recovery.
//! - [`Consumer`]: read validated records in order, release them.
//! - [`control`]: the consumer page's control plane (the shipper's progress,
//!   the online-verify handshake, the resync phase), typed.
//! - `bitmap`: the dirty bitmap.
//! - `inspect`: [`status`] and [`dump`] without taking a role.

mod bitmap;
mod consumer;
pub mod control;
mod error;
mod file;
pub mod format;
mod inspect;
mod producer;
mod shm;

pub use bitmap::Extent;
pub use consumer::{Batch, Consumer, Record};
pub use control::{LinkState, ShipProgress, ShipperStatus, SyncPhase, VerifyRequest, VerifyStatus};
pub use error::{Error, Result};
pub use file::{uuid_string, wall_clock_ns, CreateOptions, DiskIdentity, Layout};
pub use format::Kind;
pub use inspect::{dump, request_verify, status, verify_state, DumpEntry, Status};
pub use producer::{Appended, Change, FullPolicy, Lane, Producer, Recovery, SyncPlan};
