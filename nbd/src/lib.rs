//! The NBD protocol, as `doc/proto.md` of the NetworkBlockDevice/nbd
//! repository defines it: the fixed newstyle handshake, options, requests,
//! simple and structured replies, on both the server and the client side.
//!
//! This crate is *not* a server: it owns no sockets, threads or files and has
//! no I/O policy. The splitter and the recovery site's target build their
//! servers on it; the target also uses [`Client`] against upstream NBD
//! servers.
//!
//! # Layout
//! - [`protocol`]: every magic, flag, option, reply type and error value.
//! - [`request`]: the request header, encode/decode.
//! - `validate`: judging a request against an export, in one function ([`validate()`]).
//! - [`reply`]: simple replies and structured chunks.
//! - [`handshake`]: the server's side of option negotiation.
//! - [`client`]: the client's handshake and synchronous transmission.
#![forbid(unsafe_code)]

pub mod client;
mod error;
pub mod handshake;
pub mod protocol;
pub mod reply;
pub mod request;
mod validate;

pub use client::Client;
pub use error::{Error, Result};
pub use handshake::{
    serve_handshake, serve_handshake_with, Export, ExportLookup, Negotiated, Outcome,
};
pub use protocol::Errno;
pub use request::RequestHeader;
pub use validate::{validate, Command, ExportLimits, Rejected};
