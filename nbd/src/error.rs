//! The crate's one error type.

use std::io;

/// What went wrong while speaking NBD.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer's socket failed or closed.
    #[error("NBD {context}: {source}")]
    Io {
        /// What we were doing (e.g. "reading option header").
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A magic number was not the one the protocol requires.
    #[error("NBD {context}: bad magic {got:#x}, expected {expected:#x} (is the peer an NBD fixed-newstyle endpoint?)")]
    BadMagic {
        /// Where the magic was read.
        context: &'static str,
        /// What the protocol requires.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The client sent flags the server does not know; the spec says to close.
    #[error("NBD handshake: unknown client flags {0:#x}; closing as the protocol requires")]
    UnknownClientFlags(u32),
    /// An option's data was longer than we accept.
    #[error(
        "NBD handshake: option {option} carries {len} bytes, more than the {max} accepted; closing"
    )]
    OptionTooLarge {
        /// The option's name.
        option: &'static str,
        /// The length the client announced.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// NBD_OPT_EXPORT_NAME named an export that does not exist.
    #[error("NBD handshake: no export named {0:?}; closing")]
    UnknownExport(String),
    /// The peer violated the protocol in another way.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option or request (client side).
    #[error("NBD server refused {what}: {reason}")]
    Refused {
        /// What was asked.
        what: String,
        /// The server's reason.
        reason: String,
    },
    /// A transmission request failed on the server (client side).
    #[error("NBD {command} at offset {offset} failed on the server: {errno}{message}")]
    Request {
        /// The command's name.
        command: &'static str,
        /// The request's cookie.
        cookie: u64,
        /// The request's offset.
        offset: u64,
        /// The error value the server replied.
        errno: crate::Errno,
        /// The server's message, if it sent one (prefixed with ": ").
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
