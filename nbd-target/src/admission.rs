//! How many shipper connections the daemon holds at once.
//!
//! Every accepted TCP connection gets a thread, so both counts are capped:
//! connections still in their opening (TLS handshake and HELLO, which
//! anyone who can reach the port can start) at [`MAX_HANDSHAKES`], and all
//! shipper connections at [`MAX_CONNECTIONS`]. A connection beyond either
//! cap is closed at once, before a thread or a TLS state is made for it,
//! and a log line (at most one per [`REFUSAL_LOG_EVERY`]) says how many
//! were refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections in their opening (TLS handshake, HELLO) at most.
pub const MAX_HANDSHAKES: usize = 64;
/// Shipper connections at most (opening or replicating).
pub const MAX_CONNECTIONS: usize = 256;
/// Refusals are logged at most this often (with a count).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

/// The daemon's connection counts and caps.
#[derive(Debug)]
pub struct Admission {
    max_handshakes: usize,
    max_connections: usize,
    handshakes: AtomicUsize,
    connections: AtomicUsize,
    /// Refusals not logged yet, and when the last line was.
    refused: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(MAX_HANDSHAKES, MAX_CONNECTIONS)
    }
}

impl Admission {
    /// Caps of `max_handshakes` openings and `max_connections` in all.
    pub fn new(max_handshakes: usize, max_connections: usize) -> Admission {
        Admission {
            max_handshakes,
            max_connections,
            handshakes: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            last_log: Mutex::new(None),
        }
    }

    /// A permit for a connection from `peer` that starts its opening, or
    /// None (and a rate-limited log line) when a cap is reached: close it.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Permit> {
        // One thread (the accept loop) admits; sessions only release, so a
        // check then an increment cannot overshoot.
        let (h, c) = (
            self.handshakes.load(Ordering::Acquire),
            self.connections.load(Ordering::Acquire),
        );
        if h >= self.max_handshakes || c >= self.max_connections {
            self.refused(peer, h, c);
            return None;
        }
        self.handshakes.fetch_add(1, Ordering::AcqRel);
        self.connections.fetch_add(1, Ordering::AcqRel);
        Some(Permit {
            adm: self.clone(),
            opening: true,
        })
    }

    /// Connections in their opening now.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Acquire)
    }

    /// Connections now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    fn refused(&self, peer: SocketAddr, h: usize, c: usize) {
        let n = self.refused.fetch_add(1, Ordering::AcqRel) + 1;
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        self.refused.fetch_sub(n, Ordering::AcqRel);
        log::warn!(
            "refused {n} shipper connection(s) (the last from {peer}): {h} in their opening (at most {}), {c} in all (at most {}); closed without a thread",
            self.max_handshakes,
            self.max_connections
        );
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Permit {
    adm: Arc<Admission>,
    opening: bool,
}

impl Permit {
    /// The opening is over (the HELLO was read): free the opening's place,
    /// keep the connection's.
    pub fn opened(&mut self) {
        if std::mem::replace(&mut self.opening, false) {
            self.adm.handshakes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.opened();
        self.adm.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn openings_and_connections_are_capped_and_freed() {
        let a = Arc::new(Admission::new(2, 3));
        let mut p1 = a.admit(peer()).expect("first of 2 openings");
        let p2 = a.admit(peer()).expect("second of 2 openings");
        assert!(a.admit(peer()).is_none(), "a third opening is refused");
        p1.opened();
        assert_eq!((a.handshakes(), a.connections()), (1, 2));
        let mut p3 = a.admit(peer()).expect("an opening's place was freed");
        p3.opened();
        let mut p2 = p2;
        p2.opened();
        assert_eq!((a.handshakes(), a.connections()), (0, 3));
        assert!(a.admit(peer()).is_none(), "3 connections is the cap");
        drop(p1);
        let p4 = a.admit(peer()).expect("a connection's place was freed");
        drop((p2, p3, p4));
        assert_eq!((a.handshakes(), a.connections()), (0, 0));
    }
}
