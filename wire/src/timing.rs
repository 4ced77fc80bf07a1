//! Timing both ends of the replication link agree on. Each is defined
//! once, here, and used by the shipper and the target alike.

use std::time::Duration;

/// How often a side sends a HEARTBEAT when it has sent nothing else.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A peer silent this long (nothing read from it) is dropped. Many
/// heartbeat periods, so a few lost or delayed ones never end a session.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP connect timeout of the shipper.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole opening of a connection, TLS handshake and HELLO (target
/// side), or TLS handshake and then the wait for HELLO_REPLY (each, shipper
/// side), must fit in this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
