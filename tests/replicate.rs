#![allow(clippy::unwrap_used)]
//! Replication end to end: splitter (with an in-process shipper, or the
//! `shipper run` daemon) → TLS → nbd-target, driven by fio, with processes
//! killed, connections cut, stalled and corrupted, the target's disk full,
//! and certificates that must be refused. Every test ends by comparing the
//! replica with the source byte for byte.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{have_tool, make_disk, run, Rng, Splitter};

const MIB: u64 = 1 << 20;
const DISK: &str = "db";

/// fio random writes with verification through `uri` for `secs` seconds.
fn fio(uri: &str, dir: &Path, secs: u64, rate: &str) {
    let out = run(Command::new("fio")
        .current_dir(dir)
        .arg("--name=rep")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--numjobs=2",
            "--size=48M",
            "--offset_increment=48M",
            "--rw=randwrite",
        ])
        .args(["--bsrange=4k-64k", "--iodepth=8", "--time_based"])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--rate={rate}"))
        .args(["--buffer_compress_percentage=50", "--refill_buffers"])
        .args([
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
        ])
        .arg("--group_reporting"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rep"));
}

struct Setup {
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    ring: std::path::PathBuf,
    pki: Pki,
    shp: std::path::PathBuf,
    target: Target,
}

fn setup(target_extra: &[&str]) -> Option<Setup> {
    if !have_tool("fio") || !have_tool("nbdcopy") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 96 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("source-1", &[DISK], &dir.path().join("shp"), 30);
    let target = Target::start(dir.path(), &pki.target_tls(), target_extra);
    Some(Setup {
        dir,
        disk,
        ring,
        pki,
        shp,
        target,
    })
}

fn ring_args(s: &Setup) -> Vec<String> {
    vec![
        "--ring".into(),
        s.ring.display().to_string(),
        "--ring-size".into(),
        "256M".into(),
        "--ring-full".into(),
        "block".into(),
    ]
}

fn ship_args(s: &Setup) -> Vec<String> {
    let mut a = ring_args(s);
    a.extend([
        "--ship-to".into(),
        s.target.addr.clone(),
        "--disk-id".into(),
        DISK.into(),
        "--tls".into(),
        s.shp.display().to_string(),
    ]);
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The replica equals the disk: as a file, and read through the target's NBD export.
fn check_replica(s: &Setup) {
    assert_same(&s.disk, &s.target.replica(DISK));
    let copy = s.dir.path().join("export-copy.img");
    let _ = std::fs::remove_file(&copy);
    run(Command::new("nbdcopy")
        .arg(format!("nbd://{}/{DISK}", s.target.nbd_addr))
        .arg(&copy));
    assert_same(&s.disk, &copy);
    let st = s.target.disk_status(DISK).unwrap();
    assert_eq!(st["consistent"], true, "{st}");
}

#[test]
fn converges_with_the_in_process_shipper_under_fio_verify() {
    let Some(s) = setup(&[]) else { return };
    // A fixed level: the adaptive choice may send a loaded machine's
    // batches stored, and this test checks that compressed ones arrive.
    let mut args = ship_args(&s);
    args.extend(["--zstd-level".into(), "1".into()]);
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&args));
    fio(&sp.uri(), s.dir.path(), 30, "12m");
    wait_converged(&s.ring, &s.target, DISK, 60);
    assert!(sp.terminate().success(), "{}", sp.log_text());
    check_replica(&s);
    // Status on both sides says what happened.
    let rs = ring_status(&s.ring);
    assert_eq!(rs["shipper"]["acked_seq"], rs["head_seq"], "{rs}");
    let st = s.target.disk_status(DISK).unwrap();
    assert!(
        st["bytes_on_wire"].as_u64().unwrap() < st["bytes_before_compression"].as_u64().unwrap(),
        "{st}"
    );
}

#[test]
fn converges_with_the_shipper_daemon() {
    let Some(s) = setup(&[]) else { return };
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ring_args(&s)));
    let mut args = shipper_args(&s.ring, &s.disk, &s.target.addr, DISK, &s.shp);
    // Sealed on the shipper's own thread, at a stronger level.
    args.extend(["--compress-threads", "0", "--zstd-level", "3"].map(String::from));
    let mut sh = Proc::spawn("shipper", &args, &s.dir.path().join("shipper.log"));
    fio(&sp.uri(), s.dir.path(), 15, "12m");
    // The largest write the splitter takes travels as one record.
    let mut big = vec![0u8; 32 << 20];
    blockship::pattern(&mut big, 9);
    let mut c = sp.client();
    c.write(8 * MIB, &big, false).unwrap();
    c.flush().unwrap();
    wait_converged(&s.ring, &s.target, DISK, 60);
    assert!(sh.terminate(), "{}", sh.log_text());
    assert!(sp.terminate().success());
    check_replica(&s);
}

#[test]
fn converges_into_nbdkit_backends() {
    if !have_tool("nbdkit") {
        return;
    }
    for plugin in ["memory", "file"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let backing = dir.path().join("backing.img");
        make_disk(&backing, 96 * MIB);
        let mut nk = std::process::Command::new("nbdkit");
        nk.args([
            "-f",
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            "--exportname",
            "rep",
        ]);
        if plugin == "memory" {
            nk.args(["memory", "size=96M"]);
        } else {
            nk.arg("file").arg(format!("file={}", backing.display()));
        }
        let _nbdkit = KillOnDrop(nk.spawn().unwrap());
        let backend = format!("{DISK}=nbd://127.0.0.1:{port}/rep");
        std::thread::sleep(Duration::from_millis(300));
        let Some(s) = setup(&["--backend", &backend]) else {
            return;
        };
        let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ship_args(&s)));
        fio(&sp.uri(), s.dir.path(), 10, "12m");
        wait_converged(&s.ring, &s.target, DISK, 60);
        assert!(sp.terminate().success());
        let copy = s.dir.path().join("from-nbdkit.img");
        run(Command::new("nbdcopy")
            .arg(format!("nbd://127.0.0.1:{port}/rep"))
            .arg(&copy));
        assert_same(&s.disk, &copy);
        let copy2 = s.dir.path().join("from-export.img");
        run(Command::new("nbdcopy")
            .arg(format!("nbd://{}/{DISK}", s.target.nbd_addr))
            .arg(&copy2));
        assert_same(&s.disk, &copy2);
        assert!(
            !s.target.replica(DISK).exists(),
            "an NBD-backed replica keeps no file"
        );
    }
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// fio in a thread while `chaos` runs; returns when both are done.
fn under_load(uri: String, dir: &Path, secs: u64, chaos: impl FnOnce()) {
    let d = dir.to_path_buf();
    let h = std::thread::spawn(move || fio(&uri, &d, secs, "8m"));
    chaos();
    h.join().expect("fio");
}

#[test]
fn converges_after_the_shipper_is_killed_ten_times() {
    let Some(s) = setup(&[]) else { return };
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ring_args(&s)));
    let args = shipper_args(&s.ring, &s.disk, &s.target.addr, DISK, &s.shp);
    let log = s.dir.path().join("shipper.log");
    let mut rng = Rng::new(4);
    under_load(sp.uri(), s.dir.path(), 25, || {
        for _ in 0..10 {
            let mut sh = Proc::spawn("shipper", &args, &log);
            std::thread::sleep(Duration::from_millis(rng.range(300, 2000)));
            sh.kill9();
        }
    });
    let mut sh = Proc::spawn("shipper", &args, &log);
    wait_converged(&s.ring, &s.target, DISK, 90);
    assert!(sh.terminate());
    assert!(sp.terminate().success());
    check_replica(&s);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.matches("connected to").count() >= 5, "{text}");
}

#[test]
fn converges_after_the_target_is_killed_ten_times() {
    let Some(mut s) = setup(&[]) else { return };
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ship_args(&s)));
    let mut rng = Rng::new(5);
    let uri = sp.uri();
    let dir = s.dir.path().to_path_buf();
    let h = std::thread::spawn(move || fio(&uri, &dir, 25, "8m"));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.range(300, 2000)));
        blockship::kill9(s.target.proc.pid());
        s.target.restart();
    }
    h.join().unwrap();
    wait_converged(&s.ring, &s.target, DISK, 90);
    assert!(sp.terminate().success());
    check_replica(&s);
    assert!(
        sp.log_text().contains("retrying"),
        "the shipper should have seen the target go"
    );
}

/// A TCP proxy between shipper and target that can cut, stall, half-close
/// or corrupt the connection on command.
struct Proxy {
    addr: String,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
}

const PASS: u8 = 0;
const DROP: u8 = 1;
const STALL: u8 = 2;
const HALF_CLOSE: u8 = 3;
const FLIP: u8 = 4;

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(PASS));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, st) = (mode.clone(), stop.clone());
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (a, b, to_target) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap(), true),
                    (up.try_clone().unwrap(), down.try_clone().unwrap(), false),
                ] {
                    let m = m.clone();
                    std::thread::spawn(move || pump(a, b, &m, to_target));
                }
            }
        });
        Proxy { addr, mode, stop }
    }

    fn set(&self, m: u8) {
        self.mode.store(m, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8, to_target: bool) {
    let mut buf = vec![0u8; 64 << 10];
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut rng = Rng::new(u64::from(to_target));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if mode.load(Ordering::SeqCst) == DROP {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        match mode.load(Ordering::SeqCst) {
            DROP => break,
            STALL => {
                // Hold the bytes (the connection looks alive but nothing moves).
                while mode.load(Ordering::SeqCst) == STALL {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if mode.load(Ordering::SeqCst) == DROP {
                    break;
                }
            }
            HALF_CLOSE if !to_target => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            FLIP if to_target && n > 100 => {
                let i = usize::try_from(rng.range(0, n as u64)).unwrap();
                buf[i] ^= 0x10;
                mode.store(PASS, Ordering::SeqCst);
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn converges_through_cut_stalled_half_closed_and_corrupted_connections() {
    let Some(s) = setup(&[]) else { return };
    let proxy = Proxy::start(s.target.addr.clone());
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ring_args(&s)));
    let args = shipper_args(&s.ring, &s.disk, &proxy.addr, DISK, &s.shp);
    let mut sh = Proc::spawn("shipper", &args, &s.dir.path().join("shipper.log"));
    under_load(sp.uri(), s.dir.path(), 30, || {
        for m in [DROP, FLIP, HALF_CLOSE, FLIP, DROP] {
            std::thread::sleep(Duration::from_millis(1500));
            proxy.set(m);
            std::thread::sleep(Duration::from_millis(300));
            if m != FLIP {
                proxy.set(PASS);
            }
        }
        // A stall longer than the peers' 15 s silence limit.
        proxy.set(STALL);
        std::thread::sleep(Duration::from_secs(17));
        proxy.set(DROP);
        std::thread::sleep(Duration::from_millis(300));
        proxy.set(PASS);
    });
    wait_converged(&s.ring, &s.target, DISK, 90);
    assert!(sh.terminate(), "{}", sh.log_text());
    assert!(sp.terminate().success());
    check_replica(&s);
    let shl = sh.log_text();
    assert!(shl.matches("connected to").count() >= 4, "{shl}");
    // The flipped bytes were caught by TLS (or the frame checksum), never applied.
    let tl = s.target.proc.log_text();
    assert!(
        tl.contains("TLS") || tl.contains("checksum") || tl.contains("bad frame"),
        "the target should log the damaged record:\n{tl}"
    );
}

#[test]
fn resumes_when_the_target_disk_has_room_again() {
    if !blockship::is_root() || !have_tool("fio") || !have_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt));
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("source-1", &[DISK], &dir.path().join("shp"), 30);
    // The target's data folder on a 24 MiB file system.
    let data = mnt.join("dr");
    std::fs::create_dir(&data).unwrap();
    let mut args: Vec<String> = vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()];
    args.extend([
        "--data-dir".into(),
        data.display().to_string(),
        "--tls".into(),
    ]);
    args.extend([
        pki.target_tls().display().to_string(),
        "--nbd-listen".into(),
        "off".into(),
    ]);
    let mut t = Proc::spawn("nbd-target", &args, &dir.path().join("target.log"));
    let log = t.wait_log("data folder", 20);
    let line = log
        .lines()
        .find(|l| l.contains("accepting shippers on "))
        .unwrap();
    let addr = line
        .split("accepting shippers on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let sp = Splitter::start(
        dir.path(),
        &disk,
        &[
            "--ring",
            ring.to_str().unwrap(),
            "--ring-size",
            "128M",
            "--ring-full",
            "block",
            "--ship-to",
            &addr,
            "--disk-id",
            DISK,
            "--tls",
            shp.to_str().unwrap(),
        ],
    );
    // 48 MiB of data cannot fit in 24 MiB.
    run(Command::new("fio")
        .current_dir(dir.path())
        .arg("--name=fill")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", sp.uri()))
        .args([
            "--rw=write",
            "--bs=1M",
            "--size=48M",
            "--iodepth=4",
            "--refill_buffers",
        ]));
    t.wait_log("No space left on device", 30);
    // The shipper keeps the changes and retries; give the file system room.
    run(Command::new("mount")
        .args(["-o", "remount,size=128m"])
        .arg(&mnt));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rs = ring_status(&ring);
        if rs["records_waiting"] == 0 && rs["shipper"]["acked_seq"] == rs["head_seq"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not resume: {rs}\n{}",
            t.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(sp);
    assert_same(&disk, &data.join(DISK).join("replica.img"));
    let spl = std::fs::read_to_string(dir.path().join("splitter.log")).unwrap_or_default();
    assert!(
        spl.contains("No space left on device"),
        "the shipper should log the target's error:\n{spl}\ntarget:\n{}",
        t.log_text()
    );
    t.kill9();
}

/// Try to replicate with `tls` as the shipper's folder; expect a refusal
/// logged by both sides with `target_says` / `shipper_says`, and nothing
/// written at the target.
fn refused(s: &Setup, tls: &Path, disk_id: &str, target_says: &str, shipper_says: &str) {
    let log = s.dir.path().join(format!(
        "shipper-{}.log",
        tls.file_name().unwrap().to_string_lossy()
    ));
    let args = shipper_args(&s.ring, &s.disk, &s.target.addr, disk_id, tls);
    let mut sh = Proc::spawn("shipper", &args, &log);
    sh.wait_log(shipper_says, 20);
    let tl = s.target.proc.log_text();
    assert!(
        tl.contains(target_says),
        "target log lacks {target_says:?}:\n{tl}"
    );
    sh.kill9();
    assert!(
        !s.target.data_dir.join(disk_id).exists(),
        "nothing may be written for a refused shipper"
    );
}

#[test]
fn refuses_wrong_ca_expired_certificate_other_disk_and_plain_tcp() {
    let Some(s) = setup(&[]) else { return };
    // Something to ship.
    let sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ring_args(&s)));
    let mut c = sp.client();
    c.write(0, &[7u8; 4096], false).unwrap();
    c.flush().unwrap();

    let other_ca = Pki::init(&s.dir.path().join("other-pki"));
    let rogue = other_ca.issue("rogue", &[DISK], &s.dir.path().join("rogue"), 30);
    refused(&s, &rogue, DISK, "TLS handshake failed", "connection to");

    let expired = s
        .pki
        .issue("old", &[DISK], &s.dir.path().join("expired"), 0);
    std::thread::sleep(Duration::from_millis(1100));
    refused(&s, &expired, DISK, "TLS handshake failed", "connection to");

    let other = s
        .pki
        .issue("other", &["logs"], &s.dir.path().join("other-disk"), 30);
    refused(
        &s,
        &other,
        DISK,
        "may write disks [\"logs\"], not \"db\"",
        "may write disks",
    );

    // Plain TCP speaking the protocol without TLS.
    let mut plain = TcpStream::connect(&s.target.addr).unwrap();
    let mut hello = Vec::new();
    wire::Hello {
        min_version: 1,
        max_version: 1,
        flags: 0,
        ring_id: [1; 16],
        disk_size: 96 * MIB,
        block_size: 4096,
        tail_seq: 1,
        next_seq: 2,
        disk_id: DISK.into(),
        lineage: None,
    }
    .encode(&mut hello);
    let mut frame = Vec::new();
    wire::io::write_frame(&mut frame, wire::FrameType::Hello, &hello).unwrap();
    let _ = plain.write_all(&frame);
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut b = [0u8; 64];
    let n = plain.read(&mut b).unwrap_or(0);
    assert!(
        n == 0 || b[..n].starts_with(&[0x15]),
        "plain TCP must get a TLS alert or a close, got {:?}",
        &b[..n]
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.target
            .proc
            .log_text()
            .matches("TLS handshake failed")
            .count()
            >= 3
    );
    assert!(!s.target.data_dir.join(DISK).exists());
    drop(sp);
}

/// An HTTP GET of `path` on `addr`, returning the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

fn metrics_addr(log: &str) -> String {
    let l = log
        .lines()
        .find(|l| l.contains("Prometheus metrics on http://"))
        .unwrap();
    l.split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .trim()
        .to_string()
}

#[test]
fn one_target_serves_two_disks_from_two_shippers_with_status_and_metrics() {
    if !have_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("host-a", &["db", "logs"], &dir.path().join("shp"), 30);
    let target = Target::start(dir.path(), &pki.target_tls(), &["--metrics", "127.0.0.1:0"]);
    let mut splitters = Vec::new();
    for (i, id) in ["db", "logs"].iter().enumerate() {
        let sub = dir.path().join(id);
        std::fs::create_dir(&sub).unwrap();
        let disk = sub.join("disk.img");
        let ring = sub.join("disk.ring");
        make_disk(&disk, 32 * MIB);
        let sp = Splitter::start(
            &sub,
            &disk,
            &[
                "--ring",
                ring.to_str().unwrap(),
                "--ring-size",
                "64M",
                "--ship-to",
                &target.addr,
                "--disk-id",
                id,
                "--tls",
                shp.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
            ],
        );
        let mut c = sp.client();
        let mut buf = vec![0u8; 1 << 20];
        for k in 0..8u64 {
            blockship::pattern(&mut buf, k * 10 + i as u64);
            c.write(k * 3 * MIB, &buf, false).unwrap();
        }
        c.trim(MIB, 65536).unwrap();
        c.flush().unwrap();
        splitters.push((sp, disk, ring, id.to_string()));
    }
    for (sp, disk, ring, id) in &splitters {
        wait_converged(ring, &target, id, 60);
        assert_same(disk, &target.replica(id));
        let copy = dir.path().join(format!("{id}.copy"));
        run(Command::new("nbdcopy")
            .arg(format!("nbd://{}/{id}", target.nbd_addr))
            .arg(&copy));
        assert_same(disk, &copy);
        let m = http_get(&metrics_addr(&sp.log_text()), "/metrics");
        assert!(m.contains("blockship_shipper_acked_seq{disk=\""), "{m}");
        assert!(m.contains("blockship_ring_records_waiting"), "{m}");
    }
    let st = target.status();
    let disks = st["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{st}");
    for d in disks {
        assert_eq!(d["consistent"], true, "{d}");
        assert_eq!(d["connection"], "connected", "{d}");
        assert!(
            d["bytes_before_compression"].as_u64().unwrap() > 8 * MIB,
            "{d}"
        );
    }
    let m = http_get(&metrics_addr(&target.proc.log_text()), "/metrics");
    assert!(
        m.contains("blockship_target_applied_seq{disk=\"db\"}"),
        "{m}"
    );
    assert!(
        m.contains("blockship_target_applied_seq{disk=\"logs\"}"),
        "{m}"
    );
    assert!(m.contains("blockship_target_rpo_lag_seconds"), "{m}");
    let text = run(Command::new(blockship::bin("nbd-target"))
        .args(["status", "--data-dir"])
        .arg(&target.data_dir));
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("disk db")
            && text.contains("disk logs")
            && text.contains("consistent:     yes"),
        "{text}"
    );
}

#[test]
fn max_rate_limits_the_bandwidth_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 32 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let target = Target::start(dir.path(), &pki.target_tls(), &[]);
    let ring = dir.path().join("disk.ring");
    let sp = Splitter::start(
        dir.path(),
        &disk,
        &[
            "--ring",
            ring.to_str().unwrap(),
            "--ring-size",
            "64M",
            "--ship-to",
            &target.addr,
            "--disk-id",
            DISK,
            "--tls",
            shp.to_str().unwrap(),
            "--max-rate",
            "4M",
        ],
    );
    wait_converged(&ring, &target, DISK, 30);
    // 12 MiB that does not compress, written at once.
    let mut c = sp.client();
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    for k in 0..12u64 {
        blockship::pattern(&mut buf, k);
        c.write(k * MIB, &buf, false).unwrap();
    }
    c.flush().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "writes must not wait for the shipper"
    );
    wait_converged(&ring, &target, DISK, 30);
    let took = start.elapsed();
    // The first 4 MiB batch goes at once, the next two a second apart each.
    assert!(
        took >= Duration::from_millis(1800),
        "12 MiB at 4 MiB/s took only {took:?}"
    );
    assert_same(&disk, &target.replica(DISK));
}

/// Write `n` MiB of half-compressible data at `at` and flush.
fn write_mixed(sp: &Splitter, at: u64, n: u64, seed: u64) {
    let mut c = sp.client();
    let mut buf = vec![0u8; 1 << 20];
    for k in 0..n {
        blockship::pattern(&mut buf[..1 << 19], seed + k);
        c.write(at + k * MIB, &buf, false).unwrap();
    }
    c.flush().unwrap();
}

#[test]
fn the_compression_in_force_and_its_reason_are_in_status_and_metrics() {
    let Some(s) = setup(&[]) else { return };
    // Fixed by --zstd-level 0: stored, and said so.
    let mut args = ship_args(&s);
    args.extend(
        [
            "--zstd-level",
            "0",
            "--compress-threads",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&args));
    write_mixed(&sp, 0, 16, 1);
    wait_converged(&s.ring, &s.target, DISK, 60);
    let rs = ring_status(&s.ring);
    assert_eq!(rs["shipper"]["compression"]["codec"], "stored", "{rs}");
    assert_eq!(rs["shipper"]["compression"]["reason"], "fixed", "{rs}");
    let m = http_get(&metrics_addr(&sp.log_text()), "/metrics");
    assert!(
        m.contains("blockship_shipper_compression_level{disk=\"db\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("blockship_shipper_compression_reason{disk=\"db\",reason=\"fixed\"} 1"),
        "{m}"
    );
    let text = run(Command::new(blockship::bin("splitter"))
        .args(["ring", "status", "--ring"])
        .arg(&s.ring));
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.contains("compression:      stored (fixed)"), "{text}");
    assert!(sp.terminate().success(), "{}", sp.log_text());
    let st = s.target.disk_status(DISK).unwrap();
    let (wire, plain) = (
        st["bytes_on_wire"].as_u64().unwrap(),
        st["bytes_before_compression"].as_u64().unwrap(),
    );
    assert!(wire >= plain, "stored batches: {st}");
    // Adaptive (no --zstd-level): a choice with a reason that is not
    // "fixed", whatever this machine's load makes it.
    let mut sp = Splitter::start(s.dir.path(), &s.disk, &strs(&ship_args(&s)));
    write_mixed(&sp, 32 * MIB, 32, 2);
    wait_converged(&s.ring, &s.target, DISK, 60);
    let rs = ring_status(&s.ring);
    let c = &rs["shipper"]["compression"];
    let codec = c["codec"].as_str().unwrap_or_default();
    assert!(codec == "stored" || codec.starts_with("zstd-"), "{rs}");
    let reasons = [
        "starting",
        "cpu-bound",
        "cpu-idle",
        "link-bound",
        "link-bound-cpu-spare",
        "incompressible",
        "link-faster-than-zstd",
    ];
    assert!(
        reasons.contains(&c["reason"].as_str().unwrap_or_default()),
        "{rs}"
    );
    assert!(sp.terminate().success(), "{}", sp.log_text());
    check_replica(&s);
}
