#![allow(clippy::unwrap_used)]
//! Resync end to end: a full pass over a disk that held data before it was
//! protected (under writes, killed and resumed), the dirty extents of an
//! overflowed ring, and writes hammering the very chunks a pass reads. Every
//! test ends with the replica byte-identical to the disk and consistent.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{have_tool, make_disk, pattern, run, Rng, Splitter};

const MIB: u64 = 1 << 20;
const DISK: &str = "db";

/// Fill `len` bytes at `offset` of the file `disk` with data that does not
/// compress: 8 MiB of pattern, each 4 KiB block stamped with its offset.
fn fill(disk: &Path, offset: u64, len: u64, seed: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let mut base = vec![0u8; 8 << 20];
    pattern(&mut base, seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..len / MIB {
        let from = usize::try_from(i % 8).unwrap() << 20;
        buf.copy_from_slice(&base[from..from + (1 << 20)]);
        for (b, block) in buf.chunks_mut(4096).enumerate() {
            let at = offset + i * MIB + b as u64 * 4096;
            block[..8].copy_from_slice(&(at ^ seed).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn consistent(t: &Target) -> bool {
    t.disk_status(DISK).is_some_and(|d| d["consistent"] == true)
}

/// Wait until the ring is drained and the replica consistent.
fn wait_consistent(ring: &Path, t: &Target, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let rs = ring_status(ring);
        let head = rs["head_seq"].as_u64().unwrap_or(0);
        let d = t.disk_status(DISK);
        let applied = d
            .as_ref()
            .and_then(|d| d["applied_seq"].as_u64())
            .unwrap_or(0);
        if applied >= head && rs["records_waiting"] == 0 && consistent(t) && rs["dirty_bytes"] == 0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not consistent within {secs} s\nring: {rs}\ntarget: {d:?}\nlog:\n{}",
            t.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ship(ring: &Path, t: &Target, tls: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--ring".into(),
        ring.display().to_string(),
        "--ship-to".into(),
        t.addr.clone(),
        "--disk-id".into(),
        DISK.into(),
        "--tls".into(),
        tls.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_disk_holding_data_is_copied_whole_under_fio_and_zeroes_cost_nothing() {
    if !have_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 1024 * MIB);
    fill(&disk, 0, 512 * MIB, 1); // half data, half zero
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let t = Target::start(dir.path(), &pki.target_tls(), &[]);
    let args = ship(&ring, &t, &shp, &["--ring-size", "128M"]);
    let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
    assert!(!consistent(&t) || t.disk_status(DISK).is_none());
    let out = run(Command::new("fio")
        .current_dir(dir.path())
        .args(["--name=sync", "--ioengine=nbd"])
        .arg(format!("--uri={}", sp.uri()))
        .args([
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--size=200M",
        ])
        .args(["--time_based", "--runtime=10", "--rate=4m"])
        .args(["--buffer_compress_percentage=50", "--refill_buffers"])
        .args([
            "--verify=crc32c",
            "--verify_backlog=128",
            "--verify_fatal=1",
        ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sync"));
    wait_consistent(&ring, &t, 120);
    assert!(sp.terminate().success());
    assert_same(&disk, &t.replica(DISK));
    let st = t.disk_status(DISK).unwrap();
    let wire = st["bytes_on_wire"].as_u64().unwrap();
    // 512 MiB of data (it does not compress) plus at most 40 MiB of fio
    // writes (half compressible); the zero half must cost next to nothing.
    assert!(
        wire < 512 * MIB + 44 * MIB,
        "{wire} bytes on the wire: {st}"
    );
    assert!(
        sp.log_text().contains("full pass sent"),
        "{}",
        sp.log_text()
    );
}

#[test]
fn a_killed_initial_sync_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 96 * MIB);
    fill(&disk, 0, 96 * MIB, 7);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let mut t = Target::start(dir.path(), &pki.target_tls(), &[]);
    // The splitter fills the ring; the shipper daemon ships at 24 MiB/s.
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", ring.to_str().unwrap(), "--ring-size", "64M"],
    );
    let mut c = sp.client();
    let log = dir.path().join("shipper.log");
    let mut args = shipper_args(&ring, &disk, &t.addr, DISK, &shp);
    args.extend(["--max-rate".into(), "24M".into()]);
    let mut sh = Proc::spawn("shipper", &args, &log);
    let cursor = |t: &Target| {
        t.disk_status(DISK)
            .and_then(|d| d["full_pass_cursor"].as_u64())
            .unwrap_or(0)
    };
    // Kill the shipper a third of the way in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cursor(&t) < 24 * MIB {
        assert!(Instant::now() < deadline, "no progress: {}", sh.log_text());
        c.write(cursor(&t), &[9u8; 4096], false).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    sh.kill9();
    let at = cursor(&t);
    let mut sh = Proc::spawn("shipper", &args, &log);
    sh.wait_log("resuming at", 20);
    assert!(at >= 24 * MIB, "cursor {at}");
    // And the target, two thirds in.
    while cursor(&t) < 60 * MIB {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "no progress: {}",
            sh.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    blockship::kill9(t.proc.pid());
    t.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sh.log_text().matches("resuming at").count() < 2 {
        assert!(Instant::now() < deadline, "{}", sh.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.write(0, &[8u8; 65536], false).unwrap();
    c.flush().unwrap();
    wait_consistent(&ring, &t, 60);
    assert!(sh.terminate());
    assert!(sp.terminate().success());
    if std::env::var_os("BS_KEEP").is_some() {
        let _ = dir.keep();
    }
    assert_same(&disk, &t.replica(DISK));
    // Started once, resumed twice (after the shipper, then the target, died).
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("starting at 0.0%").count(), 1, "{text}");
    assert!(text.matches("resuming at").count() >= 2, "{text}");
}

#[test]
fn an_overflowed_ring_resends_only_its_dirty_extents() {
    if !have_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 512 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let mut t = Target::start(dir.path(), &pki.target_tls(), &[]);
    let args = ship(&ring, &t, &shp, &["--ring-size", "16M"]);
    let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
    wait_consistent(&ring, &t, 30);
    // The target goes away; 300 MiB are written, the splitter is killed
    // and restarted halfway.
    t.proc.kill9();
    let fio = |seed: &str| {
        run(Command::new("fio")
            .current_dir(dir.path())
            .args([
                "--name=ovf",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
            ])
            .arg(format!("--uri={}", sp_uri(dir.path())))
            .args([
                "--size=512M",
                "--io_size=150M",
                "--refill_buffers",
                "--randseed",
            ])
            .arg(seed));
    };
    fio("1");
    blockship::kill9(sp.pid());
    let _ = sp.terminate();
    let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
    fio("2");
    let rs = ring_status(&ring);
    assert_eq!(rs["overflow"], true, "{rs}");
    let dirty = rs["dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 16 * MIB && dirty < 480 * MIB, "{rs}");
    t.restart();
    wait_consistent(&ring, &t, 120);
    assert!(sp.terminate().success());
    assert_same(&disk, &t.replica(DISK));
    let log = sp.log_text();
    assert!(
        log.contains("dirty extents resent and acknowledged"),
        "{log}"
    );
    assert!(
        !log.contains("needs a full pass"),
        "only dirty extents, not the whole disk: {log}"
    );
    // Dirty extents and the ring's records, not the 512 MiB disk.
    let st = t.disk_status(DISK).unwrap();
    let wire = st["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire < dirty + 32 * MIB,
        "{wire} bytes on the wire for {dirty} dirty bytes: {st}"
    );
}

fn sp_uri(dir: &Path) -> String {
    format!("nbd+unix:///?socket={}", dir.join("nbd.sock").display())
}

#[test]
fn writes_hammering_the_chunks_being_synced_still_converge() {
    for round in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let ring = dir.path().join("disk.ring");
        make_disk(&disk, 8 * MIB);
        fill(&disk, 0, 8 * MIB, round);
        let pki = Pki::init(&dir.path().join("pki"));
        let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
        let t = Target::start(dir.path(), &pki.target_tls(), &[]);
        let args = ship(&ring, &t, &shp, &["--ring-size", "64M", "--max-rate", "8M"]);
        let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
        // Two connections write the same 64 blocks (8 per chunk) over and
        // over while the pass reads them, and stop at a random moment of it.
        let hot: Vec<u64> = {
            let mut r = Rng::new(round + 100);
            (0..64)
                .map(|_| r.range(0, 8) * MIB + r.range(0, 256) * 4096)
                .collect()
        };
        let stop_after = Duration::from_millis(Rng::new(round + 7).range(300, 900));
        let hammer = |seed: u64| {
            let mut c = sp.client();
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; 4096];
            let end = Instant::now() + stop_after;
            while Instant::now() < end {
                let off = hot[usize::try_from(rng.range(0, 64)).unwrap()];
                pattern(&mut buf, rng.next_u64());
                c.write(off, &buf, false).unwrap();
            }
            c.flush().unwrap();
        };
        std::thread::scope(|s| {
            s.spawn(|| hammer(round * 2 + 1));
            s.spawn(|| hammer(round * 2 + 2));
        });
        wait_consistent(&ring, &t, 60);
        assert!(sp.terminate().success());
        assert_same(&disk, &t.replica(DISK));
    }
}

#[test]
fn a_seed_differing_in_one_percent_of_chunks_costs_under_half_a_percent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let seed = dir.path().join("seed.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 256 * MIB);
    fill(&disk, 0, 256 * MIB, 3);
    std::fs::copy(&disk, &seed).unwrap();
    // Scattered 4 KiB writes in 1% of the chunks (3 of 256), after the seed
    // was taken.
    let mut rng = Rng::new(11);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        let chunk = rng.range(0, 256);
        for _ in 0..2 {
            pattern(&mut buf, rng.next_u64());
            use std::os::unix::fs::FileExt;
            f.write_all_at(&buf, chunk * MIB + rng.range(0, 256) * 4096)
                .unwrap();
        }
    }
    f.sync_all().unwrap();
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let data = dir.path().join("dr");
    // An image of another size is refused at the first hello, clearly.
    let small = dir.path().join("small.img");
    make_disk(&small, 8 * MIB);
    std::fs::write(&small, vec![1u8; 8 << 20]).unwrap();
    run(Command::new(blockship::bin("nbd-target"))
        .args(["seed", "--disk-id", "other", "--data-dir"])
        .arg(&data)
        .arg("--from")
        .arg(&small));
    let out = run(Command::new(blockship::bin("nbd-target"))
        .args(["seed", "--disk-id", DISK, "--data-dir"])
        .arg(&data)
        .arg("--from")
        .arg(&seed));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seeded"));
    let again = Command::new(blockship::bin("nbd-target"))
        .args(["seed", "--disk-id", DISK, "--data-dir"])
        .arg(&data)
        .arg("--from")
        .arg(&seed)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "seeding a disk twice must be refused"
    );
    let t = Target::start(dir.path(), &pki.target_tls(), &[]);
    let args = ship(&ring, &t, &shp, &["--ring-size", "16M"]);
    let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
    wait_consistent(&ring, &t, 60);
    std::thread::sleep(Duration::from_millis(1200)); // a fresh live file
    assert_same(&disk, &t.replica(DISK));
    let st = t.disk_status(DISK).unwrap();
    let wire = st["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire < 256 * MIB / 200,
        "{wire} bytes on the wire for a 256 MiB disk: {st}"
    );
    assert!(sp.terminate().success());
    // The wrong-size seed: its shipper is refused with the sizes named.
    let ring2 = dir.path().join("other.ring");
    let disk2 = dir.path().join("other.img");
    make_disk(&disk2, 16 * MIB);
    let shp2 = pki.issue("o", &["other"], &dir.path().join("shp2"), 30);
    let log = dir.path().join("other.log");
    let a = shipper_args(&ring2, &disk2, &t.addr, "other", &shp2);
    let sub = dir.path().join("o");
    std::fs::create_dir(&sub).unwrap();
    let _sp2 = Splitter::start(
        &sub,
        &disk2,
        &["--ring", ring2.to_str().unwrap(), "--ring-size", "1M"],
    );
    let mut sh = Proc::spawn("shipper", &a, &log);
    sh.wait_log("but its replica was made for", 20);
}

/// Run `shipper verify` with `args`; returns (exit code, stdout).
fn verify(ring: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(blockship::bin("shipper"))
        .args(["verify", "--ring"])
        .arg(ring)
        .args(args)
        .args(["--timeout", "120"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn online_verify_under_writes_names_exactly_the_flipped_blocks_and_repairs_them() {
    if !have_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let t = Target::start(dir.path(), &pki.target_tls(), &[]);
    let args = ship(&ring, &t, &shp, &["--ring-size", "64M"]);
    let mut sp = Splitter::start(dir.path(), &disk, &strs(&args));
    let mut c = sp.client();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..64 {
        pattern(&mut buf, i);
        c.write(i * MIB, &buf, false).unwrap();
    }
    c.flush().unwrap();
    wait_consistent(&ring, &t, 60);
    // Writes go on in the second half of the disk during every verify.
    let uri = sp.uri();
    let d = dir.path().to_path_buf();
    let fio = std::thread::spawn(move || {
        run(Command::new("fio")
            .current_dir(&d)
            .args([
                "--name=bg",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=4",
            ])
            .arg(format!("--uri={uri}"))
            .args([
                "--offset=32M",
                "--size=32M",
                "--time_based",
                "--runtime=12",
                "--rate=2m",
            ]));
    });
    std::thread::sleep(Duration::from_millis(500));
    let (code, out) = verify(&ring, &[]);
    if code != 0 && std::env::var_os("BS_KEEP").is_some() {
        let _ = dir.keep();
    }
    assert_eq!(code, 0, "a correct replica under writes: {out}");
    assert!(out.contains("0 extents differ"), "{out}");
    // Three bytes flipped behind the target's back.
    let flips = [5 * MIB + 17, 20 * MIB + 4095, 31 * MIB + 8192];
    for &f in &flips {
        flip(&t.replica(DISK), f);
    }
    let (code, out) = verify(&ring, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(
        out.lines()
            .take_while(|l| !l.starts_with('['))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap_or_else(|e| panic!("{e}: {out}"));
    let found: Vec<(u64, u64)> = json["differing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["len"].as_u64().unwrap()))
        .collect();
    let want: Vec<(u64, u64)> = flips.iter().map(|f| (f / 4096 * 4096, 4096)).collect();
    assert_eq!(found, want, "{out}");
    let (code, out) = verify(&ring, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    fio.join().unwrap();
    let (code, out) = verify(&ring, &[]);
    assert_eq!(code, 0, "{out}");
    wait_consistent(&ring, &t, 60);
    assert!(sp.terminate().success());
    assert_same(&disk, &t.replica(DISK));
}

#[test]
fn verify_runs_its_own_shipper_when_none_drains_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let pki = Pki::init(&dir.path().join("pki"));
    let shp = pki.issue("s", &[DISK], &dir.path().join("shp"), 30);
    let t = Target::start(dir.path(), &pki.target_tls(), &[]);
    let sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", ring.to_str().unwrap(), "--ring-size", "16M"],
    );
    let mut c = sp.client();
    c.write(MIB, &[3u8; 65536], false).unwrap();
    c.flush().unwrap();
    // Without the shipper's flags: a clear error.
    let (code, out) = verify(&ring, &[]);
    assert_ne!(code, 0);
    assert!(out.contains("no shipper drains"), "{out}");
    let (code, out) = verify(
        &ring,
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--target",
            &t.addr,
            "--disk-id",
            DISK,
            "--tls",
            shp.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 extents differ"), "{out}");
    assert_same(&disk, &t.replica(DISK));
}
