//! End-to-end: hostile and broken clients. After each, the splitter must
//! still serve other clients; it must never panic, hang, or allocate memory
//! sized by what a client claims.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blockship::{make_disk, Splitter};
use nbd::protocol::*;
use nbd::{Errno, RequestHeader};

const SIZE: u64 = 8 << 20;

fn start(extra: &[&str]) -> (tempfile::TempDir, Splitter) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, SIZE);
    let s = Splitter::start(dir.path(), &disk, extra);
    (dir, s)
}

/// Another client can still write and read back.
fn still_serves(s: &mut Splitter) {
    assert!(s.alive(), "splitter died; log:\n{}", s.log_text());
    let mut c = s.client();
    c.write(4096, b"still here", true).unwrap();
    let mut b = [0u8; 10];
    c.read(4096, &mut b).unwrap();
    assert_eq!(&b, b"still here");
    c.disconnect().unwrap();
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

/// The server closes `sock` within a few seconds (reads reach EOF).
fn closed_by_server(mut sock: UnixStream) {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server did not close the connection: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server kept the connection open"
        );
    }
}

fn read_greeting(sock: &mut UnixStream) {
    let mut g = [0u8; 18];
    sock.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
}

fn req(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

#[test]
fn junk_instead_of_a_handshake() {
    let (_d, mut s) = start(&[]);
    let mut sock = s.raw();
    read_greeting(&mut sock);
    let mut junk = vec![0u8; 4096];
    blockship::pattern(&mut junk, 5);
    let _ = sock.write_all(&junk);
    closed_by_server(sock);
    // Junk before even reading the greeting, then a silent client.
    let mut sock = s.raw();
    let _ = sock.write_all(b"GET / HTTP/1.1\r\n\r\n");
    closed_by_server(sock);
    let _idle = s.raw(); // says nothing: must not block anyone else
    still_serves(&mut s);
}

#[test]
fn option_with_absurd_length() {
    let (_d, mut s) = start(&[]);
    let mut sock = s.raw();
    read_greeting(&mut sock);
    sock.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    sock.write_all(&o).unwrap();
    let mut r = [0u8; 20];
    sock.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes([r[12], r[13], r[14], r[15]]),
        REP_ERR_TOO_BIG
    );
    closed_by_server(sock);
    assert!(s.log_text().contains("more than the"), "{}", s.log_text());
    still_serves(&mut s);
}

#[test]
fn unknown_command_bad_flags_and_out_of_range() {
    let (_d, mut s) = start(&[]);
    let mut c = s.client();
    let cases = [
        (req(99, 0, 1, 0, 512), Errno::Inval),
        (req(CMD_READ, CMD_FLAG_FUA, 2, 0, 512), Errno::Inval),
        (req(CMD_READ, 0, 3, SIZE - 511, 512), Errno::Inval),
        (req(CMD_READ, 0, 4, u64::MAX - 10, 512), Errno::Inval),
        (req(CMD_TRIM, 0, 5, SIZE, 1), Errno::Inval),
        (req(CMD_FLUSH, 0, 6, 1, 0), Errno::Inval),
        (req(CMD_WRITE_ZEROES, 0, 7, SIZE - 1, 2), Errno::NoSpc),
    ];
    for (h, want) in cases {
        c.raw_request(&h, &[]).unwrap();
        assert_eq!(c.raw_reply(None).unwrap().1, Some(want), "{h:?}");
    }
    // A write beyond the end: its payload is consumed, the stream stays in step.
    let h = req(CMD_WRITE, 0, 8, SIZE - 100, 4096);
    c.raw_request(&h, &[0x55; 4096]).unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::NoSpc));
    // The same connection still works.
    let mut b = [1u8; 16];
    c.read(SIZE - 16, &mut b).unwrap();
    assert_eq!(b, [0u8; 16], "refused write must not touch the disk");
    still_serves(&mut s);
}

#[test]
fn write_to_a_read_only_export() {
    let (_d, mut s) = start(&["--read-only"]);
    let mut c = s.client();
    c.raw_request(&req(CMD_WRITE, 0, 1, 0, 4096), &[0xaa; 4096])
        .unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::Perm));
    c.raw_request(&req(CMD_TRIM, 0, 2, 0, 4096), &[]).unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::Perm));
    c.raw_request(&req(CMD_WRITE_ZEROES, 0, 3, 0, 4096), &[])
        .unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::Perm));
    let mut b = [1u8; 16];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [0u8; 16]);
    assert!(s.alive());
}

/// A connection past its handshake, and a second handle on its socket for
/// writing raw bytes.
fn transmission(s: &Splitter) -> (nbd::Client<UnixStream>, UnixStream) {
    let sock = s.raw();
    let c = nbd::Client::connect(sock.try_clone().unwrap(), "").unwrap();
    (c, sock)
}

#[test]
fn client_disconnects_in_the_middle_of_a_request() {
    let (_d, mut s) = start(&[]);
    let mut bytes = req(CMD_WRITE, 0, 1, 0, 1 << 20).encode().to_vec();
    bytes.extend(std::iter::repeat_n(0x77u8, 1 << 20));
    // Cut inside the header, right after it, and inside the payload.
    for cut in [10usize, 28, 28 + 1000, 28 + (1 << 19)] {
        let (_c, mut w) = transmission(&s);
        w.write_all(&bytes[..cut]).unwrap();
    }
    // A client that sends reads and leaves before the replies.
    let (_c, mut w) = transmission(&s);
    for i in 0..16 {
        w.write_all(&req(CMD_READ, 0, i, 0, 1 << 20).encode())
            .unwrap();
    }
    drop((_c, w));
    std::thread::sleep(Duration::from_millis(200));
    still_serves(&mut s);
    // The half-sent writes never reached the disk.
    let mut c = s.client();
    let mut b = vec![0u8; 1 << 20];
    c.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x != 0x77));
}

#[test]
fn requests_larger_than_the_maximum() {
    let (_d, mut s) = start(&[]);
    let mut c = s.client();
    // A READ larger than the advertised maximum.
    c.raw_request(&req(CMD_READ, 0, 1, 0, (64 << 20) + 4096), &[])
        .unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::Overflow));
    // A WRITE larger than the maximum: refused, its payload skipped.
    let big = 72 << 20;
    c.raw_request(&req(CMD_WRITE, 0, 2, 0, big), &vec![0x33; big as usize])
        .unwrap();
    assert_eq!(c.raw_reply(None).unwrap().1, Some(Errno::Inval));
    let mut b = [1u8; 8];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [0u8; 8]);
    // A client that claims a 4 GiB write and sends nothing: no allocation
    // of that size, nothing blocked.
    let mut liar = s.client();
    liar.raw_request(&req(CMD_WRITE, 0, 3, 0, u32::MAX), &[])
        .unwrap();
    let mut liar2 = s.client();
    liar2
        .raw_request(&req(CMD_WRITE, 0, 3, 0, 32 << 20), &[1, 2, 3])
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    still_serves(&mut s);
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        rss_kb < 200 * 1024,
        "splitter uses {rss_kb} KiB after hostile claims"
    );
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_d, mut s) = start(&[]);
    let mut other = s.client();
    let (mut c, mut w) = transmission(&s);
    let mut bytes = req(CMD_READ, 0, 1, 0, 512).encode();
    bytes[0] ^= 0xff;
    w.write_all(&bytes).unwrap();
    closed_by_server(w);
    let mut b = [0u8; 4];
    assert!(c.read(0, &mut b).is_err());
    other.read(0, &mut b).unwrap();
    assert!(s.log_text().contains("bad magic"), "{}", s.log_text());
    still_serves(&mut s);
}

#[test]
fn pipelined_burst_without_reading_replies() {
    let (_d, mut s) = start(&[]);
    let sock = s.raw();
    let mut c = nbd::Client::connect(sock.try_clone().unwrap(), "").unwrap();
    let mut w = sock;
    // 2000 reads of 64 KiB sent without reading a reply: more than the
    // per-connection in-flight budget; the server must pause, not grow.
    let writer = std::thread::spawn(move || {
        for i in 0..2000u64 {
            if w.write_all(&req(CMD_READ, 0, i, 0, 65536).encode())
                .is_err()
            {
                return false;
            }
        }
        true
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut sink = vec![0u8; 65536];
    let mut seen = vec![false; 2000];
    for _ in 0..2000u64 {
        let (cookie, err) = c
            .raw_reply(Some(&mut sink))
            .unwrap_or_else(|e| panic!("{e}; splitter log:\n{}", s.log_text()));
        assert_eq!(err, None, "read {cookie} failed");
        seen[usize::try_from(cookie).unwrap()] = true;
    }
    assert!(writer.join().unwrap());
    assert!(seen.iter().all(|&x| x), "every request answered once");
    still_serves(&mut s);
}

/// Threads of a process (from /proc).
fn threads(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    st.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn silent_and_trickling_clients_cannot_lock_others_out() {
    let (_d, mut s) = start(&[]);
    // 300 connections that never say a word (more than the 256 connections
    // a splitter serves): they hold only handshake places, 16 at most.
    let silent: Vec<UnixStream> = (0..300).map(|_| s.raw()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = threads(s.pid());
    assert!(t < 40, "{t} threads for silent connections");
    // A real client is served at once, again and again.
    for _ in 0..5 {
        let start = Instant::now();
        still_serves(&mut s);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
    }
    drop(silent);
    // A client that trickles its handshake a byte at a time loses it after
    // the overall deadline (10 s), not one read timeout after each byte.
    let mut trickle = s.raw();
    let mut greeting = [0u8; 18];
    trickle.read_exact(&mut greeting).unwrap();
    // Valid bytes: client flags, then an NBD_OPT_GO header announcing
    // 2000 bytes of option data, then the data, one byte every 500 ms.
    let mut valid = Vec::new();
    valid.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    valid.extend_from_slice(&IHAVEOPT.to_be_bytes());
    valid.extend_from_slice(&OPT_GO.to_be_bytes());
    valid.extend_from_slice(&2000u32.to_be_bytes());
    valid.resize(60, 0);
    let start = Instant::now();
    let mut closed = false;
    for &byte in &valid {
        std::thread::sleep(Duration::from_millis(500));
        let byte = [byte];
        if trickle.write_all(&byte).is_err() {
            closed = true;
            break;
        }
        trickle
            .set_read_timeout(Some(Duration::from_millis(1)))
            .ok();
        let mut b = [0u8; 1];
        if matches!(trickle.read(&mut b), Ok(0)) {
            closed = true;
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "a trickling handshake was kept for {took:?}");
    assert!(took < Duration::from_secs(14), "closed only after {took:?}");
    still_serves(&mut s);
}
