//! The ring against power cuts and stuck peers, through the real splitter:
//! a truncated ring file is refused with a clear error (not SIGBUS), SIGTERM
//! stops a splitter whose writers wait on a full ring with a dead shipper,
//! and the FLUSH shortcut is chosen only where it is safe. The page-cache
//! checks (nothing recovery reads is left only in memory after a FLUSH or
//! a clean stop) and the crash images are further down.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockship::{bin, make_disk, Splitter};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_truncated_ring_file_is_refused_with_a_message_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", s(&ring), "--ring-size", "1M"],
    );
    assert!(sp.terminate().success());
    let len = std::fs::metadata(&ring).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&ring).unwrap();
    f.set_len(len - 8192).unwrap();
    drop(f);
    let out = Command::new(bin("splitter"))
        .args(["serve", "--disk", s(&disk), "--ring", s(&ring)])
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit {:?}; stderr:\n{err}",
        out.status
    );
    assert!(err.contains(s(&ring)) && err.contains("truncated"), "{err}");
}

#[test]
fn sigterm_stops_a_splitter_whose_writers_wait_on_a_full_ring() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let args = [
        "--ring",
        s(&ring),
        "--ring-size",
        "1M",
        "--ring-full",
        "block",
    ];
    let mut sp = Splitter::start(dir.path(), &disk, &args);
    // No shipper: the ring fills and the writer waits for room for ever.
    let sock = sp.socket.clone();
    let writer = std::thread::spawn(move || {
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let mut c = nbd::Client::connect(s, "").unwrap();
        let chunk = vec![0x42u8; 256 << 10];
        for i in 0..16u64 {
            if c.write(i * (256 << 10), &chunk, false).is_err() {
                return i;
            }
        }
        16
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sp.log_text().contains("waiting") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let st = blockship::site::ring_status(&ring);
        if st["used_bytes"].as_u64().unwrap_or(0) > 700 << 10 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "the writer should be waiting for room"
    );
    let t = Instant::now();
    let st = sp.terminate();
    assert!(st.success(), "exit {st}; log:\n{}", sp.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let _ = writer.join();
    // What waited went to the dirty bitmap: nothing the disk holds is unknown.
    let st = blockship::site::ring_status(&ring);
    assert!(st["dirty_bytes"].as_u64().unwrap() > 0, "{st}");
}

#[test]
fn the_flush_shortcut_is_used_on_ext4_and_said_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", s(&ring), "--ring-size", "1M"],
    );
    let log = sp.log_text();
    sp.terminate();
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir.path())
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_string();
    if fs == "ext2/ext3" || fs == "xfs" {
        assert!(
            log.contains("one fdatasync of the disk makes both durable"),
            "{fs}: {log}"
        );
    } else {
        assert!(
            log.contains("fdatasync of both the disk and the ring"),
            "{fs}: {log}"
        );
    }
}
