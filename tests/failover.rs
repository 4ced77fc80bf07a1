#![allow(clippy::unwrap_used)]
//! Failover end to end: splitter (in-process shipper) → TLS → nbd-target;
//! `nbd-target failover` fences the shipper (which keeps its ring), the
//! daemon serves the disk at the point as a writable export, a rollback
//! resumes replication without a resync, a commit leaves a plain image;
//! after kill -9 of every source-side process in the middle of a write
//! load the failed-over ext4 disk mounts at `latest` and at a mark; a
//! flushed write on the failed-over disk and a commit are on the device, not
//! only in the page cache.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{bin, have_tool, is_root, kill9, pattern, run, FuseLoopMount};

const MIB: u64 = 1 << 20;
const DISK: &str = "db";

/// A protected disk, and what these tests ask of it.
struct Site(Protected);

impl std::ops::Deref for Site {
    type Target = Protected;
    fn deref(&self) -> &Protected {
        &self.0
    }
}

impl std::ops::DerefMut for Site {
    fn deref_mut(&mut self) -> &mut Protected {
        &mut self.0
    }
}

fn site(size: u64) -> Option<Site> {
    if !have_tool("nbdcopy") {
        eprintln!("skipped: nbdcopy missing");
        return None;
    }
    Some(Site(Protected::start(DISK, size, &[], &[])))
}

impl Site {
    fn failover(&self, args: &[&str]) -> Output {
        Command::new(bin("nbd-target"))
            .args(["failover", "--disk-id", DISK, "--data-dir"])
            .arg(&self.target.data_dir)
            .args(args)
            .output()
            .unwrap()
    }

    fn failover_ok(&self, args: &[&str]) -> String {
        let o = self.failover(args);
        assert!(
            o.status.success(),
            "failover {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn export_uri(&self) -> String {
        format!("nbd://{}/{DISK}", self.target.nbd_addr)
    }

    fn status_text(&self) -> String {
        let out = run(Command::new(bin("nbd-target"))
            .args(["status", "--data-dir"])
            .arg(&self.target.data_dir));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn failover_fences_the_shipper_and_rollback_resumes_without_a_resync() {
    let Some(s) = site(32 * MIB) else {
        return;
    };
    s.scribble(1, 200, 0, 32 * MIB);
    wait_converged(&s.ring, &s.target, DISK, 60);
    let at_failover = s.dir.path().join("at-failover.copy");
    std::fs::copy(&s.disk, &at_failover).unwrap();
    let applied = s.target.disk_status(DISK).unwrap()["applied_seq"]
        .as_u64()
        .unwrap();

    // Bad input first: clear errors, nothing changes.
    let o = s.failover(&["--commit"]);
    assert!(
        !o.status.success() && stderr(&o).contains("not failed over"),
        "{}",
        stderr(&o)
    );
    let o = s.failover(&["--rollback"]);
    assert!(
        !o.status.success() && stderr(&o).contains("not failed over"),
        "{}",
        stderr(&o)
    );
    let o = s.failover(&["--point", "no-such-mark"]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert_eq!(s.target.disk_status(DISK).unwrap()["role"], "replica");

    let t = Instant::now();
    let out = s.failover_ok(&["--point", "latest"]);
    assert!(out.contains("failed over at point"), "{out}");
    eprintln!("failover took {:?}", t.elapsed());
    let st = s.target.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "failed-over-uncommitted", "{st}");
    assert!(
        s.status_text().contains("failed over at"),
        "{}",
        s.status_text()
    );
    // Failing over again at the same point: a clear error.
    let o = s.failover(&["--point", "latest"]);
    assert!(
        !o.status.success() && stderr(&o).contains("already"),
        "{}",
        stderr(&o)
    );

    // The source keeps writing: nothing is applied, nothing released.
    let head_before = ring_status(&s.ring)["head_seq"].as_u64().unwrap();
    s.scribble(2, 100, 0, 32 * MIB);
    std::thread::sleep(Duration::from_secs(3));
    let rs = ring_status(&s.ring);
    assert!(rs["head_seq"].as_u64().unwrap() > head_before);
    assert!(rs["records_waiting"].as_u64().unwrap() >= 100, "{rs}");
    assert_eq!(
        s.target.disk_status(DISK).unwrap()["applied_seq"].as_u64(),
        Some(applied)
    );
    let log = s.sp().log_text();
    assert!(log.contains("failed over"), "the shipper says why:\n{log}");

    // The failed-over disk is the disk at the point, and writable.
    assert_same(&s.copy_of(&s.export_uri(), "fo"), &at_failover);
    {
        let sock = TcpStream::connect(&s.target.nbd_addr).unwrap();
        let mut c = nbd::Client::connect(sock, DISK).unwrap();
        c.write(MIB, &vec![0xab; 1 << 20], false).unwrap();
        c.flush().unwrap();
        let mut b = vec![0u8; 4096];
        c.read(MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        // While a client has it open, a rollback is refused.
        let o = s.failover(&["--rollback"]);
        assert!(
            !o.status.success() && stderr(&o).contains("in use"),
            "{}",
            stderr(&o)
        );
    }
    // The replica itself is untouched.
    assert_same(&s.target.replica(DISK), &at_failover);

    let out = s.failover_ok(&["--rollback"]);
    assert!(out.contains("rolled back"), "{out}");
    wait_converged(&s.ring, &s.target, DISK, 60);
    assert_same(&s.disk, &s.target.replica(DISK));
    let st = s.target.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "replica");
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["full_pass_needed"], false, "{st}");
    let log = s.sp().log_text();
    assert!(
        !log.contains("full pass") && !log.contains("resync"),
        "no resync after a rollback:\n{log}"
    );
    assert!(s.status_text().contains("last failover"));
}

/// Files of `round` in a mounted file system.
fn content(round: usize, i: usize) -> String {
    format!("round {round} file {i} ").repeat(1500 + round * 100 + i)
}

fn fsck_clean(dev: &str, what: &str) {
    let fsck = Command::new("fsck.ext4")
        .args(["-fn", dev])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck {what}: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

fn check_rounds(mount: &Path, upto: usize, exact: bool, what: &str) {
    for r in 0..6 {
        for i in 0..4 {
            let f = mount.join(format!("r{r}-{i}.txt"));
            if r <= upto {
                assert_eq!(
                    std::fs::read_to_string(&f).unwrap_or_default(),
                    content(r, i),
                    "{what}: {}",
                    f.display()
                );
            } else if exact {
                assert!(!f.exists(), "{what}: {} is from later", f.display());
            }
        }
    }
}

#[test]
fn failover_after_kill9_mid_load_mounts_at_latest_and_at_the_mark_then_commits() {
    if !is_root() || !have_tool("nbdfuse") || !have_tool("mkfs.ext4") || !have_tool("fio") {
        eprintln!("skipped: needs root, nbdfuse, mkfs.ext4, fio");
        return;
    }
    let Some(mut s) = site(128 * MIB) else {
        return;
    };
    let mut m = FuseLoopMount::attach(&s.dir.path().join("src"), &s.sp().uri());
    run(Command::new("mkfs.ext4").args(["-q", "-F", m.dev(), "80M"]));
    m.mount();
    // A write load beyond the file system, running when everything dies.
    let fio = Command::new("fio")
        .current_dir(s.dir.path())
        .args(["--name=load", "--ioengine=nbd", "--thread"])
        .arg(format!("--uri={}", s.sp().uri()))
        .args(["--offset=96M", "--size=30M", "--rw=randwrite", "--bs=16k"])
        .args(["--iodepth=4", "--time_based", "--runtime=600", "--rate=3m"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _fio = Kill(fio);
    let mark_round = 2;
    for round in 0..4 {
        for i in 0..4 {
            std::fs::write(
                m.mount_dir.join(format!("r{round}-{i}.txt")),
                content(round, i),
            )
            .unwrap();
        }
        run(&mut Command::new("sync"));
        if round == mark_round {
            let out = run(Command::new(bin("splitter"))
                .args(["mark", "--ring"])
                .arg(&s.ring)
                .arg("before-disaster"));
            assert!(String::from_utf8_lossy(&out.stdout).contains("seq"));
        }
    }
    // Round 3 was synced at the source; wait until the target acknowledged
    // it (the ring's head at that moment is applied), then the disaster:
    // every source-side process dies mid-load (the splitter with its
    // shipper thread, and fio).
    let head = ring_status(&s.ring)["head_seq"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.target.disk_status(DISK).unwrap()["applied_seq"]
        .as_u64()
        .unwrap()
        < head
    {
        assert!(Instant::now() < deadline, "round 3 never acknowledged");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(m.mount_dir.join("unsynced.txt"), "maybe").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill9(s.sp().pid());
    drop(_fio);
    drop(m);
    s.splitter = None;

    let t = Instant::now();
    s.failover_ok(&["--point", "latest"]);
    let took = t.elapsed();
    let mut f = FuseLoopMount::attach(&s.dir.path().join("fo-latest"), &s.export_uri());
    eprintln!(
        "failover to an attached export: {took:?} + {:?}",
        t.elapsed() - took
    );
    f.mount();
    check_rounds(&f.mount_dir, 3, false, "at latest");
    f.umount();
    fsck_clean(f.dev(), "at latest");
    drop(f);

    // Move to the mark: exactly the files of the mark.
    let out = s.failover_ok(&["--point", "before-disaster"]);
    assert!(out.contains("moved"), "{out}");
    let mut f = FuseLoopMount::attach(&s.dir.path().join("fo-mark"), &s.export_uri());
    f.mount();
    f.umount();
    fsck_clean(f.dev(), "at the mark");
    f.mount();
    check_rounds(&f.mount_dir, mark_round, true, "at the mark");
    std::fs::write(
        f.mount_dir.join("after-failover.txt"),
        "written at the recovery site",
    )
    .unwrap();
    run(&mut Command::new("sync"));
    f.umount();
    drop(f);

    // A target crash here loses nothing flushed on the failed-over disk.
    s.target.restart();
    let image = s.failover_ok(&["--commit"]);
    let image = PathBuf::from(image.trim());
    assert!(image.is_file(), "commit prints the image path: {image:?}");
    let st = s.target.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "failed-over-committed", "{st}");
    assert!(s.status_text().contains("failed over at"));
    let o = s.failover(&["--point", "latest"]);
    assert!(
        !o.status.success() && stderr(&o).contains("committed"),
        "{}",
        stderr(&o)
    );
    let o = s.failover(&["--rollback"]);
    assert!(!o.status.success(), "{}", stderr(&o));

    // The image is the disk: at the mark, with the write made after it.
    let loopdev = String::from_utf8_lossy(
        &run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image))
        .stdout,
    )
    .trim()
    .to_string();
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let lo = Loop(loopdev);
    fsck_clean(&lo.0, "the committed image");
    let mnt = s.dir.path().join("img-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "ro"])
        .arg(&lo.0)
        .arg(&mnt));
    let text = std::fs::read_to_string(mnt.join("after-failover.txt"));
    let ok = std::panic::catch_unwind(|| check_rounds(&mnt, mark_round, true, "committed"));
    let _ = Command::new("umount").arg(&mnt).status();
    drop(lo);
    assert_eq!(text.unwrap(), "written at the recovery site");
    assert!(ok.is_ok());
}

/// Pages of `f` that only the page cache holds (a power cut loses them).
fn only_in_memory(f: &Path) -> Vec<u64> {
    crashsim::dirty_pages(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
}

#[test]
fn a_flushed_failover_write_and_a_commit_are_on_the_device_not_only_in_memory() {
    if !is_root() {
        eprintln!("SKIP: the page-cache check needs root (/proc/kpageflags)");
        return;
    }
    let Some(s) = site(16 * MIB) else {
        return;
    };
    s.scribble(5, 100, 0, 16 * MIB);
    wait_converged(&s.ring, &s.target, DISK, 60);
    s.failover_ok(&["--point", "latest"]);
    let dir = s.target.data_dir.join(DISK);
    let record = dir.join("failover.json");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let od = dir.join("failover").join(rec["overlay"].as_str().unwrap());
    let overlay = od.join("overlay.img");
    let map = od.join("overlay.img.map");
    for f in [&record, &overlay, &map] {
        assert_eq!(
            only_in_memory(f),
            Vec::<u64>::new(),
            "{} after failover",
            f.display()
        );
    }
    let sock = TcpStream::connect(&s.target.nbd_addr).unwrap();
    let mut c = nbd::Client::connect(sock, DISK).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..8u64 {
        pattern(&mut buf, 900 + i);
        c.write(i * 2 * MIB, &buf, false).unwrap();
    }
    // Before the flush the writes may be in memory only; once it is
    // acknowledged, neither the data nor the map that finds it is.
    c.flush().unwrap();
    for f in [&overlay, &map] {
        assert_eq!(
            only_in_memory(f),
            Vec::<u64>::new(),
            "{} after FLUSH",
            f.display()
        );
    }
    drop(c);
    let image = PathBuf::from(s.failover_ok(&["--commit"]).trim());
    for f in [&image, &record, &dir.join("failover-history.jsonl")] {
        assert_eq!(
            only_in_memory(f),
            Vec::<u64>::new(),
            "{} after commit",
            f.display()
        );
    }
}

#[test]
fn two_failover_commands_at_once_make_one_failover() {
    let Some(s) = site(16 * MIB) else {
        return;
    };
    s.scribble(7, 50, 0, 16 * MIB);
    wait_converged(&s.ring, &s.target, DISK, 60);
    let spawn = || {
        Command::new(bin("nbd-target"))
            .args([
                "failover",
                "--disk-id",
                DISK,
                "--point",
                "latest",
                "--data-dir",
            ])
            .arg(&s.target.data_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let oks = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(
        oks,
        1,
        "exactly one fails over:\n{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    assert!(stderr(loser).contains("already"), "{}", stderr(loser));
    let st = s.target.disk_status(DISK).unwrap();
    assert_eq!(st["role"], "failed-over-uncommitted", "{st}");
    // The fence holds: the shipper stays refused.
    std::thread::sleep(Duration::from_secs(1));
    s.scribble(8, 10, 0, 16 * MIB);
    std::thread::sleep(Duration::from_secs(2));
    assert!(ring_status(&s.ring)["records_waiting"].as_u64().unwrap() >= 10);
    s.failover_ok(&["--rollback"]);
    wait_converged(&s.ring, &s.target, DISK, 60);
    assert_same(&s.disk, &s.target.replica(DISK));
}

#[test]
fn without_a_journal_only_latest_fails_over_and_commits() {
    if !have_tool("nbdcopy") {
        return;
    }
    let s = Site(Protected::start(DISK, 16 * MIB, &["--journal", "off"], &[]));
    s.scribble(11, 60, 0, 16 * MIB);
    wait_converged(&s.ring, &s.target, DISK, 60);
    let at = s.dir.path().join("at.copy");
    std::fs::copy(&s.disk, &at).unwrap();
    let o = s.failover(&["--point", "1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("no journal"),
        "{}",
        stderr(&o)
    );
    s.failover_ok(&["--point", "latest"]);
    assert_same(&s.copy_of(&s.export_uri(), "fo"), &at);
    {
        let sock = TcpStream::connect(&s.target.nbd_addr).unwrap();
        let mut c = nbd::Client::connect(sock, DISK).unwrap();
        c.write(0, &[0x5a; 8192], false).unwrap();
        c.flush().unwrap();
    }
    let image = PathBuf::from(s.failover_ok(&["--commit"]).trim());
    let mut want = std::fs::read(&at).unwrap();
    want[..8192].fill(0x5a);
    assert!(
        std::fs::read(&image).unwrap() == want,
        "the image is the disk at latest plus the write"
    );
}
