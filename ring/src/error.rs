//! The ring crate's one error type.

use std::io;
use std::path::PathBuf;

/// What went wrong with a ring file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be created, opened, sized, mapped or synced.
    #[error("ring {path}: {what}: {source}")]
    Io {
        /// The ring file.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a ring this version can use.
    #[error("ring {path}: {reason}")]
    NotARing {
        /// The file.
        path: PathBuf,
        /// Why (bad magic, version, checksum, sizes).
        reason: String,
    },
    /// Another process holds the role.
    #[error("ring {path} already has a {role} (another process holds its lock); stop it first")]
    Busy {
        /// The ring file.
        path: PathBuf,
        /// "producer" or "consumer".
        role: &'static str,
    },
    /// The ring belongs to another disk, or the disk changed size.
    #[error("ring {path} belongs to {ring_disk}, not to {given}: {advice}")]
    WrongDisk {
        /// The ring file.
        path: PathBuf,
        /// The disk the ring was made for.
        ring_disk: String,
        /// The disk given now.
        given: String,
        /// What to do about it.
        advice: &'static str,
    },
    /// A record before the durable point is damaged; never skipped.
    #[error("ring {path}: corrupt record at file offset {file_offset} (expected seq {expected_seq}): {reason}; the ring cannot be trusted past it: resynchronise the replica (verify) and recreate the ring")]
    Corrupt {
        /// The ring file.
        path: PathBuf,
        /// Byte offset of the bad record in the file.
        file_offset: u64,
        /// The sequence number that should have been there.
        expected_seq: u64,
        /// What was wrong.
        reason: String,
    },
    /// A request the ring cannot satisfy (bad options, bad arguments).
    #[error("ring {path}: {reason}")]
    Invalid {
        /// The ring file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
