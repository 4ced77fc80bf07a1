//! The shipper library's one error type.

/// What stopped the shipper, or one connection of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ring failed (damage, I/O, locks).
    #[error(transparent)]
    Ring(#[from] ring::Error),
    /// The TLS folder is unusable.
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
    /// The connection failed: socket, TLS, a bad frame.
    #[error("connection to {target}: {source}")]
    Link {
        /// The target.
        target: String,
        /// What failed.
        #[source]
        source: transport::link::LinkError,
    },
    /// The target refused or closed with a reason.
    #[error("target {target} refused: {message}")]
    Refused {
        /// The target.
        target: String,
        /// Its error code.
        code: Option<wire::ErrorCode>,
        /// Its message.
        message: String,
    },
    /// Bad configuration.
    #[error("{0}")]
    Invalid(String),
    /// Compression failed.
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
