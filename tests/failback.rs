#![allow(clippy::unwrap_used)]
//! The disaster-recovery round trip end to end, every step the command
//! `docs/OPERATIONS.md` gives: protect A → B; A dies; fail over at B and
//! change 2% of the disk there; commit; protect B's image back toward A,
//! whose original disk file is seeded in place; fail back at A with the
//! bytes on the wire counted by a proxy (under 4% of the disk); protect A
//! again toward B, whose old image is the seed. And the split brain: both
//! sides written after the failover, the reverse protection refused with
//! both sides' last sequence.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{bin, have_tool, kill9, make_disk, pattern, Rng, Splitter};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const DISK: &str = "db";

/// One site's folder: its PKI, its target.
struct SiteDir {
    dir: PathBuf,
    pki: Pki,
}

impl SiteDir {
    fn new(root: &Path, name: &str) -> SiteDir {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::init(&dir.join("pki"));
        SiteDir { dir, pki }
    }

    fn shipper_tls(&self, name: &str) -> PathBuf {
        self.pki.issue(name, &[DISK], &self.dir.join(name), 30)
    }
}

fn splitter(dir: &Path, disk: &Path, ring: &Path, to: &str, tls: &Path) -> Splitter {
    std::fs::create_dir_all(dir).unwrap();
    let a: Vec<String> = vec![
        "--ring".into(),
        ring.display().to_string(),
        "--ring-size".into(),
        "64M".into(),
        "--ship-to".into(),
        to.into(),
        "--disk-id".into(),
        DISK.into(),
        "--tls".into(),
        tls.display().to_string(),
    ];
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Splitter::start(dir, disk, &a)
}

/// `n` writes of `len` bytes at random 64 KiB-aligned places, flushed.
fn scribble(
    c: &mut nbd::Client<impl std::io::Read + std::io::Write>,
    seed: u64,
    n: usize,
    len: usize,
) {
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let off = rng.range(0, (SIZE - len as u64) / 65536) * 65536;
        let mut buf = vec![0u8; len];
        pattern(&mut buf, seed * 10_000 + i as u64);
        c.write(off, &buf, false).unwrap();
    }
    c.flush().unwrap();
}

fn nbd_target(args: &[&str], data_dir: &Path) -> std::process::Output {
    Command::new(bin("nbd-target"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Wait until `target` holds disk DISK consistent with nothing waiting.
fn wait_in_sync(ring: &Path, target: &Target, secs: u64) {
    wait_converged(ring, target, DISK, secs);
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = target.disk_status(DISK).unwrap();
        if st["consistent"] == true && st["full_pass_needed"] == false {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not consistent: {st}\n{}",
            target.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct World {
    root: tempfile::TempDir,
    a: SiteDir,
    b: SiteDir,
    disk_a: PathBuf,
    ring_a: PathBuf,
    target_b: Target,
}

/// A protects disk A toward B; the disk is filled and replicated.
fn protected() -> Option<(World, Splitter)> {
    if !have_tool("nbdcopy") {
        eprintln!("skipped: nbdcopy missing");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    let a = SiteDir::new(root.path(), "site-a");
    let b = SiteDir::new(root.path(), "site-b");
    let disk_a = a.dir.join("disk.img");
    let ring_a = a.dir.join("disk.ring");
    make_disk(&disk_a, SIZE);
    let target_b = Target::start(&b.dir, &b.pki.target_tls(), &[]);
    let tls = b.shipper_tls("shipper-a");
    let sp = splitter(&a.dir.join("sp"), &disk_a, &ring_a, &target_b.addr, &tls);
    {
        let mut c = sp.client();
        // Fill the disk (incompressible), then some overwrites.
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..SIZE / MIB {
            pattern(&mut buf, 77 + i);
            c.write(i * MIB, &buf, false).unwrap();
        }
        scribble(&mut c, 1, 50, 65536);
    }
    wait_in_sync(&ring_a, &target_b, 120);
    Some((
        World {
            root,
            a,
            b,
            disk_a,
            ring_a,
            target_b,
        },
        sp,
    ))
}

impl World {
    /// B: fail over at latest, write 2% of the disk, commit: the image.
    fn fail_over_and_write(&self) -> PathBuf {
        let dr = &self.target_b.data_dir;
        ok(
            nbd_target(&["failover", "--disk-id", DISK, "--point", "latest"], dr),
            "failover",
        );
        {
            let sock = TcpStream::connect(&self.target_b.nbd_addr).unwrap();
            let mut c = nbd::Client::connect(sock, DISK).unwrap();
            // 2% of 64 MiB in 64 KiB writes (some overlap: at most 2%).
            scribble(&mut c, 2, 20, 65536);
        }
        let out = ok(
            nbd_target(&["failover", "--disk-id", DISK, "--commit"], dr),
            "commit",
        );
        let image = PathBuf::from(out.trim());
        assert!(image.is_file(), "{image:?}");
        image
    }

    /// A: seed the original disk in place into DR2 and serve DR2, with a
    /// counting proxy in front of its replication port.
    fn reverse_site(&self) -> (Target, Proc, PathBuf) {
        let dr2 = self.a.dir.join("dr");
        let out = ok(
            Command::new(bin("nbd-target"))
                .args(["seed", "--disk-id", DISK, "--in-place", "--data-dir"])
                .arg(&dr2)
                .arg("--from")
                .arg(&self.disk_a)
                .output()
                .unwrap(),
            "seed --in-place",
        );
        assert!(out.contains("in place"), "{out}");
        let target_a = Target::start(&self.a.dir, &self.a.pki.target_tls(), &[]);
        let port = free_port();
        let stats = self.root.path().join("proxy-stats.json");
        let mut proxy = Proc::spawn(
            "delay-proxy",
            &[
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--connect".into(),
                target_a.addr.clone(),
                "--delay".into(),
                "0".into(),
                "--stats-file".into(),
                stats.display().to_string(),
            ],
            &self.root.path().join("proxy.log"),
        );
        proxy.wait_log("listening on", 20);
        (target_a, proxy, stats)
    }
}

/// The address a delay-proxy logged it listens on.
fn listening_on(proxy: &Proc) -> String {
    let log = proxy.log_text();
    log.split("listening on ")
        .nth(1)
        .and_then(|r| r.split([',', ' ']).next())
        .unwrap()
        .to_string()
}

/// The planned failback at the original site: `failover --point latest
/// --commit` in DR2; what it printed.
fn failback_commit(target_a: &Target) -> String {
    ok(
        nbd_target(
            &[
                "failover",
                "--disk-id",
                DISK,
                "--point",
                "latest",
                "--commit",
            ],
            &target_a.data_dir,
        ),
        "failback commit",
    )
}

fn proxy_bytes(mut proxy: Proc, stats: &Path) -> u64 {
    assert!(proxy.terminate());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
    // Both directions: data one way, hashes and acknowledgements the other.
    let total = v["bytes_total"].as_u64().unwrap_or(0);
    assert!(total > 0, "proxy stats: {v}");
    total
}

#[test]
fn round_trip_failover_reverse_protection_failback_sends_only_the_delta() {
    let Some((mut w, sp_a)) = protected() else {
        return;
    };
    // The disaster: site A's splitter (and its shipper) die.
    kill9(sp_a.pid());
    drop(sp_a);
    let image_b = w.fail_over_and_write();
    let st = w.target_b.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "failed-over-committed", "{st}");

    // Reverse protection: B's image → A, whose original disk is the seed.
    let (target_a, proxy, stats) = w.reverse_site();
    let ring_b = w.b.dir.join("disk.ring");
    let tls_b = w.a.shipper_tls("shipper-b");
    let proxy_addr = listening_on(&proxy);
    let mut sp_b = splitter(&w.b.dir.join("sp"), &image_b, &ring_b, &proxy_addr, &tls_b);
    wait_in_sync(&ring_b, &target_a, 120);
    assert_eq!(
        target_a.disk_status(DISK).unwrap()["role"],
        "replica-in-place"
    );

    // Planned failback: writers at B stopped, zero lag, commit at A.
    let lag = target_a.disk_status(DISK).unwrap();
    assert_eq!(lag["records_waiting"], 0, "{lag}");
    let out = failback_commit(&target_a);
    assert_eq!(
        std::fs::canonicalize(out.trim()).unwrap(),
        std::fs::canonicalize(&w.disk_a).unwrap(),
        "the failback leaves the disk in the original file"
    );
    assert!(sp_b.terminate().success());
    drop(sp_b);
    let wire = proxy_bytes(proxy, &stats);
    assert_same(&w.disk_a, &image_b);
    eprintln!(
        "failback: {wire} bytes on the wire for a {SIZE}-byte disk ({:.2}%)",
        wire as f64 * 100.0 / SIZE as f64
    );
    assert!(
        wire * 100 < 4 * SIZE,
        "{wire} bytes on the wire: not under 4% of {SIZE}"
    );

    // A protects the disk again toward B: B's old image is the seed (a
    // delta again), the stale ring A had is started again.
    w.target_b.restart();
    let tls = w.b.shipper_tls("shipper-a2");
    let sp_a = splitter(
        &w.a.dir.join("sp2"),
        &w.disk_a,
        &w.ring_a,
        &w.target_b.addr,
        &tls,
    );
    assert!(
        sp_a.log_text().contains("no longer describes"),
        "{}",
        sp_a.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.target_b.disk_status(DISK).unwrap()["role"] != "replica" {
        assert!(
            Instant::now() < deadline,
            "B never took the failback: {}\n{}",
            w.target_b.disk_status(DISK).unwrap(),
            sp_a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_in_sync(&w.ring_a, &w.target_b, 120);
    let st = w.target_b.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "replica", "{st}");
    let wire = st["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire * 100 < 4 * SIZE,
        "re-protection sent {wire} bytes: {st}"
    );
    assert_same(&w.disk_a, &w.target_b.replica(DISK));
    drop(target_a);
    drop(sp_a);
}

#[test]
fn split_brain_both_sides_written_refuses_the_reverse_protection() {
    let Some((w, mut sp_a)) = protected() else {
        return;
    };
    // No disaster: B fails over while A keeps running and writing.
    let image_b = w.fail_over_and_write();
    {
        let mut c = sp_a.client();
        scribble(&mut c, 3, 10, 65536);
    }
    let head_a = ring_status(&w.ring_a)["head_seq"].as_u64().unwrap();
    assert!(sp_a.terminate().success());
    drop(sp_a);
    let before = blockship::read(&w.disk_a);

    let (target_a, proxy, _stats) = w.reverse_site();
    let ring_b = w.b.dir.join("disk.ring");
    let tls_b = w.a.shipper_tls("shipper-b");
    let addr = listening_on(&proxy);
    // The copy is written again under its ring, too.
    let sp_b = splitter(&w.b.dir.join("sp"), &image_b, &ring_b, &addr, &tls_b);
    {
        let mut c = sp_b.client();
        scribble(&mut c, 4, 5, 65536);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    // The shipper retries every 5 s; once its ring holds the 5 writes, the
    // refusal names seq 5.
    let m = loop {
        let log = sp_b.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("split brain") && l.contains("at seq 5"))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no split brain reported:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        m.contains(&format!("at seq {head_a}")),
        "names A's last seq: {m}"
    );
    assert!(m.contains("at seq 5"), "names B's last seq: {m}");
    // The target's status says it too (its live file is rewritten twice a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = target_a.disk_status(DISK).unwrap();
        if st["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("split brain")
        {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["applied_seq"], 0, "{st}");
    // Nothing was resolved silently: the original disk is untouched.
    drop(sp_b);
    drop(target_a);
    drop(proxy);
    assert!(
        blockship::read(&w.disk_a) == before,
        "the original disk changed"
    );
}

#[test]
fn seed_in_place_refuses_a_disk_of_another_identity_unless_forced() {
    let Some((w, mut sp_a)) = protected() else {
        return;
    };
    let seed = |id: &str, from: &Path, dr: &str, force: bool| {
        let mut c = Command::new(bin("nbd-target"));
        c.args(["seed", "--in-place", "--disk-id", id, "--data-dir"])
            .arg(w.root.path().join(dr))
            .arg("--from")
            .arg(from);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    // In use by its splitter: refused (the target would write to it).
    let o = seed(DISK, &w.disk_a, "dr-busy", false);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{o:?}"
    );
    assert!(sp_a.terminate().success());
    // Disk A carries the marker of disk "db": not "web".
    let o = seed("web", &w.disk_a, "dr-web", false);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(e.contains("is disk \"db\""), "{e}");
    // A file with no marker: not known to be the disk.
    let plain = w.root.path().join("plain.img");
    make_disk(&plain, SIZE);
    let o = seed(DISK, &plain, "dr-plain", false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no blockship disk marker"));
    // --force takes either.
    assert!(seed(DISK, &plain, "dr-plain", true).status.success());
    assert!(seed("web", &w.disk_a, "dr-web", true).status.success());
    // The right disk: accepted, no copy (the replica is the file itself).
    let o = seed(DISK, &w.disk_a, "dr-db", false);
    assert!(o.status.success(), "{o:?}");
    let link = w.root.path().join("dr-db").join(DISK).join("replica.img");
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        std::fs::canonicalize(&w.disk_a).unwrap()
    );
}

#[test]
fn writes_at_the_recovery_site_after_the_failback_point_are_a_split_brain() {
    let Some((w, sp_a)) = protected() else {
        return;
    };
    kill9(sp_a.pid());
    drop(sp_a);
    let image_b = w.fail_over_and_write();
    let (target_a, _proxy, _stats) = w.reverse_site();
    let ring_b = w.b.dir.join("disk.ring");
    let tls_b = w.a.shipper_tls("shipper-b");
    let mut sp_b = splitter(
        &w.b.dir.join("sp"),
        &image_b,
        &ring_b,
        &target_a.addr,
        &tls_b,
    );
    wait_in_sync(&ring_b, &target_a, 120);
    failback_commit(&target_a);
    // The recovery site keeps writing after the failback point.
    {
        let mut c = sp_b.client();
        scribble(&mut c, 9, 4, 65536);
    }
    assert!(sp_b.terminate().success());
    drop(sp_b);
    let before = blockship::read(&image_b);
    let tls = w.b.shipper_tls("shipper-a2");
    let sp_a = splitter(
        &w.a.dir.join("sp2"),
        &w.disk_a,
        &w.ring_a,
        &w.target_b.addr,
        &tls,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = sp_a.log_text();
        if log.contains("split brain") && log.contains("written after it") {
            break;
        }
        assert!(Instant::now() < deadline, "no split brain reported:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        w.target_b.disk_status(DISK).unwrap()["role"],
        "failed-over-committed"
    );
    assert!(
        blockship::read(&image_b) == before,
        "the recovery site's image changed"
    );
}
