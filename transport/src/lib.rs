//! The replication link's transport: TLS 1.3 with mutual certificate
//! authentication (rustls), built from a TLS folder, and a non-blocking
//! framed link over a TCP socket that both the shipper and the target drive
//! from one thread each.
//!
//! It is *not* the protocol (that is `wire`: what the frames mean) and it
//! holds no policy about retries, windows or applying data: the shipper and
//! the target decide those.
//!
//! # Layout
//! - [`tls`]: the TLS folder (`ca.pem`, `cert.pem`, `key.pem`), client and
//!   server configurations, and the disk ids a peer's certificate enrolls.
//! - [`link`]: [`Link`], frames over a non-blocking TLS connection.

#![forbid(unsafe_code)]

pub mod link;
pub mod tls;

pub use link::Link;
pub use tls::{TlsDir, TlsError};
