#![allow(clippy::unwrap_used)]
//! The proxy on loopback, in front of an echo server: a round trip takes at
//! least twice the delay, bytes arrive intact and in order, the end of the
//! stream is forwarded, many chunks are in flight at once (the delay does
//! not cap the rate), and the counters add up.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use delay_proxy::{Config, Proxy, Totals};

/// An echo server on 127.0.0.1: each connection gets back what it sends,
/// and an end of stream once it sent one.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let mut c = c.unwrap();
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = c.read(&mut buf).unwrap();
                    if n == 0 {
                        c.shutdown(Shutdown::Write).unwrap();
                        return;
                    }
                    c.write_all(&buf[..n]).unwrap();
                }
            });
        }
    });
    addr
}

/// A proxy on 127.0.0.1 in front of `upstream`.
fn proxy(upstream: &str, delay: Duration, chunk: usize) -> (SocketAddr, Arc<Totals>) {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), upstream, delay);
    cfg.chunk = chunk;
    let p = Proxy::bind(cfg).unwrap();
    let (addr, totals) = (p.local_addr().unwrap(), p.totals());
    p.spawn();
    (addr, totals)
}

/// Deterministic bytes that differ at every offset (a position mix).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[test]
fn a_round_trip_takes_at_least_twice_the_delay() {
    let delay = Duration::from_millis(50);
    let (addr, _) = proxy(&echo_server().to_string(), delay, 256 << 10);
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    for i in 0..3u8 {
        let msg = [i, 1, 2, 3];
        let t = Instant::now();
        c.write_all(&msg).unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).unwrap();
        let rtt = t.elapsed();
        assert_eq!(back, msg);
        assert!(rtt >= 2 * delay, "round trip {rtt:?} < 2 x {delay:?}");
        assert!(
            rtt < 2 * delay + Duration::from_secs(2),
            "round trip {rtt:?}"
        );
    }
}

#[test]
fn bytes_arrive_intact_and_in_order_and_the_delay_does_not_cap_the_rate() {
    const LEN: usize = 8 << 20;
    let delay = Duration::from_millis(50);
    // 64 KiB chunks: a proxy that waited out the delay chunk by chunk would
    // need at least 128 x 50 ms = 6.4 s per direction for 8 MiB.
    let (addr, totals) = proxy(&echo_server().to_string(), delay, 64 << 10);
    let data = Arc::new(pattern(LEN));
    let c = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let mut w = c.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || {
        // Pieces of varying sizes, then the end of the stream.
        let (mut at, mut step) = (0usize, 1usize);
        while at < d.len() {
            let n = step.min(d.len() - at);
            w.write_all(&d[at..at + n]).unwrap();
            at += n;
            step = step * 7 % 300_007 + 1;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(LEN);
    (&c).read_to_end(&mut got).unwrap();
    let took = t.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), LEN, "the echo came back short or long");
    let first_bad = got.iter().zip(data.iter()).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "bytes differ from offset {first_bad:?}");
    assert!(took >= 2 * delay, "{took:?}");
    assert!(
        took < Duration::from_secs(3),
        "8 MiB took {took:?}: is the delay applied chunk by chunk?"
    );
    // The counters are final once the connection closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while totals.snapshot().active > 0 {
        assert!(Instant::now() < deadline, "{:?}", totals.snapshot());
        thread::sleep(Duration::from_millis(10));
    }
    let s = totals.snapshot();
    assert_eq!(
        (s.connections, s.bytes_up, s.bytes_down),
        (1, LEN as u64, LEN as u64),
        "{s:?}"
    );
}

#[test]
fn an_upstream_that_refuses_closes_the_client() {
    // A port nothing listens on: bind, note it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (addr, totals) = proxy(&dead.to_string(), Duration::from_millis(1), 256 << 10);
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while totals.snapshot().failed_connects == 0 {
        assert!(Instant::now() < deadline, "{:?}", totals.snapshot());
        thread::sleep(Duration::from_millis(10));
    }
}
