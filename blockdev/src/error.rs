//! The splitter library's one error type.

use std::io;
use std::path::PathBuf;

/// What failed while opening or serving a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The disk could not be opened or inspected.
    #[error("disk {path}: {what}: {source}")]
    Disk {
        /// The disk's path.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the disk.
    #[error("disk {path} is in use by another process (another splitter?): stop it first, or serve a different disk")]
    DiskBusy {
        /// The disk's path.
        path: PathBuf,
    },
    /// The disk is not something we can serve.
    #[error("disk {path}: {reason}")]
    DiskKind {
        /// The disk's path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// A listener could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// io_uring could not be set up.
    #[error("io_uring setup failed (kernel 5.11 or newer is required, and io_uring must not be disabled by sysctl kernel.io_uring_disabled): {0}")]
    Uring(#[source] io::Error),
    /// The ring failed.
    #[error(transparent)]
    Ring(#[from] ring::Error),
    /// Any other I/O failure of the server itself.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
