//! The target library's one error type.

use std::path::PathBuf;

/// What went wrong at the recovery site.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or device operation failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// What it was done on.
        path: PathBuf,
        /// What was tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A state file cannot be trusted.
    #[error("{path}: {reason}; restore it from a backup or remove the replica's folder to start it again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A request that cannot be satisfied (bad options, a wrong size).
    #[error("{0}")]
    Invalid(String),
    /// Certificate generation failed.
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The upstream NBD server of a replica failed.
    #[error("NBD backend {backend}: {source}")]
    Nbd {
        /// The backend.
        backend: String,
        /// Why.
        #[source]
        source: nbd::Error,
    },
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Map an I/O error on `path` while doing `what`.
pub(crate) fn io<'a>(
    path: &'a std::path::Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}
