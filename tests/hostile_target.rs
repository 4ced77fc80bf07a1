#![allow(clippy::unwrap_used)] // tests fail loudly on any error
//! End-to-end: hostile peers of `nbd-target serve`, authenticated ones
//! included (contract 6). Each test has a peer try to make the daemon hold
//! memory or threads without limit, measures the daemon
//! (`/proc/PID/status`), and then checks that a well-behaved shipper is
//! still served.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{make_disk, Splitter};
use transport::Link;
use wire::frame::*;
use wire::{RecordKind, WireRecord};

const MIB: u64 = 1 << 20;
/// The disk a well-behaved shipper replicates afterwards.
const GOOD: &str = "db";
/// The disk the hostile peers name.
const EVIL: &str = "evil";
const EVIL_SIZE: u64 = 64 * MIB;

struct Site {
    dir: tempfile::TempDir,
    _pki: Pki,
    shp: PathBuf,
    target: Target,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("source-1", &[GOOD, EVIL], &dir.path().join("shp"), 30);
    let target = Target::start(dir.path(), &pki.target_tls(), &[]);
    Site {
        dir,
        _pki: pki,
        shp,
        target,
    }
}

/// A field of `/proc/PID/status` (the number before any unit).
fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss_mib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:") / 1024
}

fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

fn addr(t: &Target) -> SocketAddr {
    t.addr.parse().unwrap()
}

/// A TLS link to the target with the shipper's certificate, handshake done.
fn connect(s: &Site) -> Link {
    let tls = transport::TlsDir::load(&s.shp)
        .unwrap()
        .client_config()
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let sock = TcpStream::connect(addr(&s.target)).unwrap();
    let mut link = Link::new(conn, sock).unwrap();
    link.handshake(Duration::from_secs(10)).unwrap();
    link
}

fn hello_body(disk_id: &str, disk_size: u64) -> Vec<u8> {
    let mut b = Vec::new();
    Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        flags: 0,
        ring_id: [0x5a; 16],
        disk_size,
        block_size: BLOCK_SIZE,
        tail_seq: 1,
        next_seq: 1,
        disk_id: disk_id.into(),
        lineage: None,
    }
    .encode(&mut b);
    b
}

/// The next frame within `secs` (type and body), None when the target closed.
fn recv(link: &mut Link, secs: u64) -> Option<(FrameType, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if link.pump().is_err() {
            return None;
        }
        if let Some(rx) = link.next_frame().unwrap() {
            let body = link.body(&rx).to_vec();
            link.consume(&rx);
            return Some((rx.header.ftype, body));
        }
        if link.eof() {
            return None;
        }
        assert!(Instant::now() < deadline, "no frame within {secs} s");
        link.wait(Duration::from_millis(50)).unwrap();
    }
}

/// Queue `body` as a `ftype` frame and write it all (the peer reads).
fn send(link: &mut Link, ftype: FrameType, body: &[u8]) {
    link.send(ftype, body).unwrap();
    link.flush(Duration::from_secs(10)).unwrap();
}

/// A hello for `disk_id` answered with HELLO_REPLY.
fn hello(link: &mut Link, disk_id: &str, disk_size: u64) -> HelloReply {
    send(link, FrameType::Hello, &hello_body(disk_id, disk_size));
    let (t, b) = recv(link, 10).expect("an answer to the hello");
    assert_eq!(t, FrameType::HelloReply, "{:?}", ErrorMsg::decode(&b));
    HelloReply::decode(&b).unwrap()
}

/// A stored batch of resync records, all at tag `seq`.
fn sync_batch(seq: u64, records: &[WireRecord<'_>]) -> Vec<u8> {
    let mut plain = Vec::new();
    for r in records {
        r.encode(&mut plain);
    }
    let h = BatchHeader {
        first_seq: seq,
        last_seq: seq,
        count: u32::try_from(records.len()).unwrap(),
        codec: Codec::Stored,
        plain_len: u32::try_from(plain.len()).unwrap(),
        plain_crc: crc32c::crc32c(&plain),
    };
    let mut body = h.encode().to_vec();
    body.extend_from_slice(&plain);
    body
}

/// SYNC_HASH records over `n` chunks of `chunk` bytes from `at`, each with
/// a hash no replica chunk has (so each asks for a BLOCK_HASHES answer).
fn wrong_hashes(at: u64, n: u64, chunk: u32) -> Vec<WireRecord<'static>> {
    (0..n)
        .map(|i| WireRecord {
            seq: 1,
            kind: RecordKind::SyncHash,
            offset: (at + i * u64::from(chunk)) % (EVIL_SIZE - u64::from(chunk)),
            len: chunk,
            after_gap: false,
            full_pass: false,
            time_ns: 0,
            payload: &[0xee; 32],
        })
        .collect()
}

/// A real splitter and its in-process shipper replicate a write of GOOD to
/// the target, which ends up holding the same bytes.
fn well_behaved_shipper_is_served(s: &Site) {
    let dir = s.dir.path().join("good");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let ring = dir.join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let ring_s = ring.display().to_string();
    let shp = s.shp.display().to_string();
    let args = [
        "--ring",
        &ring_s,
        "--ring-size",
        "64M",
        "--ship-to",
        &s.target.addr,
        "--disk-id",
        GOOD,
        "--tls",
        &shp,
    ];
    let mut sp = Splitter::start(&dir, &disk, &args);
    let mut data = vec![0u8; 1 << 20];
    blockship::pattern(&mut data, 77);
    let mut c = sp.client();
    c.write(3 * MIB, &data, false).unwrap();
    c.flush().unwrap();
    wait_converged(&ring, &s.target, GOOD, 30);
    assert!(sp.terminate().success(), "{}", sp.log_text());
    assert_same(&disk, &s.target.replica(GOOD));
    let log = s.target.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// Sample `f(pid)` every 50 ms while `busy` says the hostile peer is at
/// work (at most `secs`); the largest value seen.
fn peak_while(pid: u32, busy: &AtomicBool, secs: u64, f: fn(u32) -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut peak = 0;
    while busy.load(Ordering::Relaxed) && Instant::now() < deadline {
        peak = peak.max(f(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak.max(f(pid))
}

/// An authenticated shipper sends SYNC_HASH records for chunks that differ
/// and never reads: the target stops reading from it once 8 MiB of answers
/// wait, so its memory stays bounded; a batch asking for more than
/// MAX_BATCH_HASH_REPLY is refused.
#[test]
fn a_shipper_that_never_reads_block_hashes_is_not_read_from() {
    let s = site();
    let pid = s.target.proc.pid();
    let base = rss_mib(pid);
    // One batch asking for more than the cap is refused, nothing applied.
    let mut link = connect(&s);
    hello(&mut link, EVIL, EVIL_SIZE);
    let n = MAX_BATCH_HASH_REPLY / block_hashes_frame_len(1 << 20) + 1;
    send(
        &mut link,
        FrameType::Batch,
        &sync_batch(1, &wrong_hashes(0, n, 1 << 20)),
    );
    let (t, b) = recv(&mut link, 10).expect("an answer");
    assert_eq!(t, FrameType::Error);
    let e = ErrorMsg::decode(&b).unwrap();
    assert_eq!(e.code, ErrorCode::Protocol, "{e:?}");
    assert!(e.message.contains("BLOCK_HASHES"), "{e:?}");
    drop(link);

    // Batches within the cap, as fast as the target takes them, never a
    // byte read: 4 KiB chunks, 80 bytes of answer per 72 bytes sent.
    let mut link = connect(&s);
    // The previous connection's claim goes when its session ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        send(&mut link, FrameType::Hello, &hello_body(EVIL, EVIL_SIZE));
        let (t, _) = recv(&mut link, 10).expect("an answer to the hello");
        if t == FrameType::HelloReply {
            break;
        }
        assert!(Instant::now() < deadline, "EVIL stays claimed");
        std::thread::sleep(Duration::from_millis(200));
        link = connect(&s);
    }
    let per_batch = MAX_BATCH_HASH_REPLY / block_hashes_frame_len(4096);
    let busy = Arc::new(AtomicBool::new(true));
    let busy2 = busy.clone();
    let sender = std::thread::spawn(move || {
        // 60 batches ask for 60 x 4 MiB of answers.
        let mut sent = 0u64;
        for i in 0..60 {
            let body = sync_batch(1, &wrong_hashes(i * per_batch * 4096, per_batch, 4096));
            link.send(FrameType::Batch, &body).unwrap();
            // Write what the socket takes; never read.
            let t = Instant::now();
            while link.wants_write() && t.elapsed() < Duration::from_secs(3) {
                if link.pump_out().is_err() {
                    break;
                }
                let _ = link.wait_writable(Duration::from_millis(20));
            }
            if link.wants_write() {
                break; // the target stopped reading
            }
            sent += 1;
        }
        busy2.store(false, Ordering::Relaxed);
        (link, sent)
    });
    let peak = peak_while(pid, &busy, 18, rss_mib);
    let (link, sent) = sender.join().unwrap();
    eprintln!("target: {base} MiB before, {peak} MiB at most; {sent} of 60 batches taken");
    assert!(
        peak < base + 48,
        "target grew from {base} to {peak} MiB while a shipper did not read ({sent} batches taken)"
    );
    assert!(
        sent < 60,
        "the target took every batch from a shipper that reads nothing"
    );
    drop(link);
    well_behaved_shipper_is_served(&s);
}

/// Before its HELLO, a connection may only send a HELLO: eight that send
/// a 64 MiB BATCH instead are answered ERROR Protocol at its header, and
/// the target never buffers their bodies.
#[test]
fn only_a_hello_is_read_before_the_hello() {
    let s = site();
    let pid = s.target.proc.pid();
    let base = rss_mib(pid);
    let busy = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let mut link = connect(&s);
            std::thread::spawn(move || {
                let body = vec![0x42u8; 64 << 20];
                // Queue it all; write while the target takes it.
                link.send(FrameType::Batch, &body).unwrap();
                let t = Instant::now();
                loop {
                    if link.pump().is_err() {
                        return None;
                    }
                    if let Some(rx) = link.next_frame().unwrap() {
                        let b = link.body(&rx).to_vec();
                        return Some((rx.header.ftype, b, t.elapsed()));
                    }
                    if link.eof() || t.elapsed() > Duration::from_secs(15) {
                        return None;
                    }
                    let _ = link.wait(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let busy2 = busy.clone();
    let watcher = std::thread::spawn(move || peak_while(pid, &busy2, 18, rss_mib));
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    busy.store(false, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    eprintln!(
        "target: {base} MiB before, {peak} MiB at most; {} answers",
        answers.len()
    );
    assert!(
        peak < base + 40,
        "target grew from {base} to {peak} MiB on bodies sent before a hello"
    );
    for a in &answers {
        let (t, b, after) = a.as_ref().expect("an ERROR, not a silent close");
        assert_eq!(*t, FrameType::Error);
        let e = ErrorMsg::decode(b).unwrap();
        assert_eq!(e.code, ErrorCode::Protocol);
        assert!(e.message.contains("expected HELLO"), "{e:?}");
        assert!(*after < Duration::from_secs(5), "answered after {after:?}");
    }
    let log = s.target.proc.log_text();
    assert!(log.contains("before the hello"), "{log}");
    well_behaved_shipper_is_served(&s);
}

/// 300 idle TCP connections: at most 64 are in their opening (each on a
/// thread), the rest are closed at once with a log line; after they go, a
/// shipper is served.
#[test]
fn idle_connections_are_capped_without_a_thread_each() {
    let s = site();
    let pid = s.target.proc.pid();
    let base = threads(pid);
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr(&s.target)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let now = threads(pid);
    eprintln!("target: {base} threads before, {now} with 300 idle connections");
    assert!(
        now <= base + 64 + 2,
        "{now} threads for 300 idle connections (from {base})"
    );
    let log = s.target.proc.log_text();
    assert!(log.contains("refused"), "{log}");
    drop(idle);
    well_behaved_shipper_is_served(&s);
}

/// The TLS handshake and the HELLO share one deadline (10 s): a client
/// that drags its handshake out to 8 s and then sends no HELLO is closed
/// about 10 s after it connected, not 10 s after the handshake.
#[test]
fn the_opening_has_one_deadline() {
    let s = site();
    let tls = transport::TlsDir::load(&s.shp)
        .unwrap()
        .client_config()
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut sock = TcpStream::connect(addr(&s.target)).unwrap();
    let t = Instant::now();
    let mut first = Vec::new();
    conn.write_tls(&mut first).unwrap();
    // All of the ClientHello but its last byte now, that byte at 8 s.
    use std::io::Write;
    sock.write_all(&first[..first.len() - 1]).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    sock.write_all(&first[first.len() - 1..]).unwrap();
    let mut link = Link::new(conn, sock).unwrap();
    link.handshake(Duration::from_secs(5)).unwrap();
    // No HELLO: the target ends the connection by the shared deadline.
    let closed = loop {
        if link.pump().is_err() || link.eof() {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(16),
            "still open {:?} after connecting",
            t.elapsed()
        );
        let _ = link.wait(Duration::from_millis(50));
    };
    eprintln!("closed {closed:?} after connecting");
    assert!(
        closed < Duration::from_secs(12),
        "closed {closed:?} after connecting"
    );
    // The session logs how it ended just after it closed the socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = s.target.proc.log_text();
        if log.contains("no hello within 10 s of connecting") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(log.contains("no hello within 10 s of connecting"), "{log}");
}
