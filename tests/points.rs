#![allow(clippy::unwrap_used)]
//! Recovery points and test failover end to end: splitter (in-process
//! shipper) → TLS → nbd-target with its journal; points named by sequence
//! number, time and mark checked against copies of the source saved at
//! that moment; ext4 rounds with marks, each test-failed-over and mounted;
//! a resync that keeps the last consistent point; retention with an open
//! test failover; kill -9 during apply and pruning; the overlay cap; two
//! test failovers at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockship::site::*;
use blockship::{bin, have_tool, is_root, run, FuseLoopMount};

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

fn site(size: u64, target_extra: &[&str], ring_extra: &[&str]) -> Option<Site> {
    if !have_tool("nbdcopy") {
        eprintln!("skipped: nbdcopy missing");
        return None;
    }
    Some(Site(Protected::start(DISK, size, target_extra, ring_extra)))
}

impl Site {
    /// A copy of the source as it is now (nothing is writing).
    fn save(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.copy"));
        std::fs::copy(&self.disk, &p).unwrap();
        p
    }

    fn head_seq(&self) -> u64 {
        ring_status(&self.ring)["head_seq"].as_u64().unwrap()
    }

    fn points(&self) -> serde_json::Value {
        let out = run(Command::new(bin("nbd-target"))
            .args(["points", "--json", "--disk-id", DISK, "--data-dir"])
            .arg(&self.target.data_dir));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn mark(&self, name: &str, extra: &[&str]) -> String {
        let out = run(Command::new(bin("splitter"))
            .args(["mark", "--ring"])
            .arg(&self.ring)
            .args(extra)
            .arg(name));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `test-failover` of `point` on a fresh port.
    fn test_failover(&self, point: &str, extra: &[&str]) -> TestFailover {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "test-failover".into(),
            "--data-dir".into(),
            self.target.data_dir.display().to_string(),
            "--disk-id".into(),
            DISK.into(),
            "--point".into(),
            point.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.dir.path().join(format!("tf-{port}.log"));
        let mut proc = Proc::spawn("nbd-target", &args, &log);
        proc.wait_log("listening on", 30);
        TestFailover {
            proc,
            uri: format!("nbd://127.0.0.1:{port}/{DISK}"),
        }
    }
}

struct TestFailover {
    proc: Proc,
    uri: String,
}

impl Drop for TestFailover {
    fn drop(&mut self) {
        let _ = self.proc.terminate();
    }
}

fn now_rfc3339() -> String {
    let out = run(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn points_by_sequence_time_and_mark_equal_copies_saved_then() {
    let Some(s) = site(64 * MIB, &[], &[]) else {
        return;
    };
    let mut saved = Vec::new();
    for round in 0..4u64 {
        s.scribble(round + 1, 200, 0, 64 * MIB);
        s.converge();
        let copy = s.save(&format!("round{round}"));
        let seq = s.head_seq();
        std::thread::sleep(Duration::from_millis(20));
        let t = now_rfc3339();
        std::thread::sleep(Duration::from_millis(20));
        let mark = s.mark(&format!("round-{round}"), &[]);
        assert!(mark.contains("seq"), "{mark}");
        saved.push((copy, seq, t));
    }
    s.scribble(99, 300, 0, 64 * MIB);
    s.converge();
    let p = s.points();
    assert_eq!(p["marks"].as_array().unwrap().len(), 4, "{p}");
    for (i, (copy, seq, t)) in saved.iter().enumerate() {
        let by_seq = s.copy_of(&format!("nbd://{}/{DISK}@{seq}", s.target.nbd_addr), "seq");
        assert_same(copy, &by_seq);
        // Block by block too: reads inside one before-image go straight to
        // the journal's file through io_uring.
        let want = std::fs::read(copy).unwrap();
        let t_ = std::net::TcpStream::connect(&s.target.nbd_addr).unwrap();
        let mut c = nbd::Client::connect(t_, &format!("{DISK}@{seq}")).unwrap();
        let mut blk = vec![0u8; 4096];
        for b in 0..(16 * MIB / 4096) {
            c.read(b * 4096, &mut blk).unwrap();
            let o = usize::try_from(b * 4096).unwrap();
            assert!(
                blk[..] == want[o..o + 4096],
                "point {seq}: block {b} differs"
            );
        }
        let tf = s.test_failover(t, &[]);
        let by_time = s.copy_of(&tf.uri, "time");
        assert_same(copy, &by_time);
        drop(tf);
        let by_mark = s.copy_of(
            &format!("nbd://{}/{DISK}@round-{i}", s.target.nbd_addr),
            "mark",
        );
        assert_same(copy, &by_mark);
    }
    // Tagged, and the latest untouched.
    let p = s.points();
    assert!(p["tested"].as_array().unwrap().len() >= 4, "{p}");
    assert_same(&s.disk, &s.target.replica(DISK));
    // A point outside the journal: a clear error, not a hang.
    let out = Command::new(bin("nbd-target"))
        .args([
            "test-failover",
            "--disk-id",
            DISK,
            "--point",
            "no-such-mark",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&s.target.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no mark of that name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext4_rounds_with_marks_each_test_failed_over_and_mounted() {
    if !is_root() || !have_tool("nbdfuse") || !have_tool("mkfs.ext4") || !have_tool("fio") {
        eprintln!("skipped: needs root, nbdfuse, mkfs.ext4, fio");
        return;
    }
    let Some(s) = site(160 * MIB, &[], &[]) else {
        return;
    };
    let mut m = FuseLoopMount::attach(&s.dir.path().join("src"), &s.sp().uri());
    // The file system takes the first 96 MiB; fio writes beyond it.
    run(Command::new("mkfs.ext4").args(["-q", "-F", m.dev(), "96M"]));
    m.mount();
    let fio = Command::new("fio")
        .current_dir(s.dir.path())
        .args(["--name=other", "--ioengine=nbd", "--thread"])
        .arg(format!("--uri={}", s.sp().uri()))
        .args([
            "--offset=112M",
            "--size=40M",
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=4",
        ])
        .args(["--time_based", "--runtime=600", "--rate=2m"])
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
    let fio = Kill(fio);
    let content =
        |round: usize, i: usize| format!("round {round} file {i} ").repeat(2000 + round * 100 + i);
    for round in 0..5 {
        for i in 0..4 {
            std::fs::write(
                m.mount_dir.join(format!("r{round}-{i}.txt")),
                content(round, i),
            )
            .unwrap();
        }
        run(&mut Command::new("sync"));
        let out = s.mark(&format!("round-{round}"), &[]);
        assert!(out.contains("seq"), "{out}");
    }
    drop(fio);
    m.umount();
    drop(m);
    s.converge();
    for round in 0..5 {
        let tf = s.test_failover(&format!("round-{round}"), &[]);
        let mut t = FuseLoopMount::attach(&s.dir.path().join(format!("tf{round}")), &tf.uri);
        // A crash-consistent point: mounting replays the ext4 journal
        // (into the overlay); after that fsck finds nothing to fix.
        t.mount();
        t.umount();
        let fsck = Command::new("fsck.ext4")
            .args(["-fn", t.dev()])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "fsck at round {round}: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        t.mount();
        for r in 0..5 {
            for i in 0..4 {
                let f = t.mount_dir.join(format!("r{r}-{i}.txt"));
                if r <= round {
                    assert_eq!(
                        std::fs::read_to_string(&f).unwrap(),
                        content(r, i),
                        "round {round}: {}",
                        f.display()
                    );
                } else {
                    assert!(!f.exists(), "round {round}: {} is from later", f.display());
                }
            }
        }
        // The test export is writable; the writes go nowhere near the replica.
        std::fs::write(t.mount_dir.join("test-write.txt"), "rehearsal").unwrap();
        run(&mut Command::new("sync"));
        t.umount();
        drop(t);
        drop(tf);
    }
    s.converge();
    assert_same(&s.disk, &s.target.replica(DISK));
}

#[test]
fn a_resync_keeps_the_last_consistent_point_and_reports_the_gap() {
    let Some(mut s) = site(96 * MIB, &[], &["--ring-size", "4M"]) else {
        return;
    };
    s.scribble(1, 100, 0, 96 * MIB);
    s.converge();
    let before = s.save("before");
    let seq = s.head_seq();
    // The target goes away; the ring overflows into the dirty bitmap.
    s.target.proc.kill9();
    s.scribble(2, 1500, 0, 96 * MIB);
    let after = s.save("after");
    s.target.restart();
    // While the dirty extents are resent, the last consistent point stays
    // exportable, the gap is reported, and no command offers a point in it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = s.points();
        let gaps = p["gaps"].as_array().cloned().unwrap_or_default();
        if let Some(g) = gaps.iter().find(|g| g["reason"] == "source-overflow") {
            assert!(g["from_seq"].as_u64().unwrap() <= seq, "{p}");
            if g["open"] == true {
                assert_eq!(p["latest"]["seq"].as_u64(), g["from_seq"].as_u64(), "{p}");
                let st = s.target.disk_status(DISK).unwrap();
                let sg = &st["journal"]["gap"];
                // status says so too (unless the gap closed in between).
                assert!(
                    sg["reason"] == "source-overflow" && sg["from_seq"] == g["from_seq"],
                    "{st}"
                );
                let c = s.copy_of(
                    &format!("nbd://{}/{DISK}@latest", s.target.nbd_addr),
                    "during",
                );
                assert_same(&before, &c);
            } else {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the gap did not close: {p}");
        std::thread::sleep(Duration::from_millis(300));
    }
    s.converge();
    // After it completes the timeline continues: new points, the old one kept.
    s.scribble(3, 20, 0, 96 * MIB);
    s.converge();
    let p = s.points();
    assert!(p["latest"]["seq"].as_u64().unwrap() > seq, "{p}");
    let c = s.copy_of(&format!("nbd://{}/{DISK}@{seq}", s.target.nbd_addr), "old");
    assert_same(&before, &c);
    let _ = after;
    assert_same(&s.disk, &s.target.replica(DISK));
    s.splitter.take();
}

#[test]
fn retention_prunes_while_an_old_test_failover_keeps_working_and_kill9_keeps_points() {
    let Some(mut s) = site(
        64 * MIB,
        &["--retention", "2s", "--journal-segment", "256K"],
        &[],
    ) else {
        return;
    };
    s.scribble(1, 100, 0, 64 * MIB);
    s.converge();
    let old = s.save("old");
    let old_seq = s.head_seq();
    let tf = s.test_failover(&old_seq.to_string(), &[]);
    for round in 0..6 {
        s.scribble(10 + round, 100, 0, 64 * MIB);
        if round == 2 {
            // kill -9 during apply: every acknowledged point stays.
            s.target.restart();
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    s.converge();
    let mid = s.save("mid");
    let mid_seq = s.head_seq();
    std::thread::sleep(Duration::from_millis(2500));
    s.scribble(30, 50, 0, 64 * MIB);
    s.converge();
    let p = s.points();
    let oldest = p["oldest"]["seq"].as_u64().unwrap();
    // Everything the open test failover needs is kept past the retention.
    assert!(
        oldest <= old_seq,
        "oldest {oldest}, old point {old_seq}: {p}\n{}",
        s.target
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("journal") || l.contains("lease"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The test failover opened on the old point reads it whole still.
    assert_same(&old, &s.copy_of(&tf.uri, "old"));
    drop(tf);
    std::thread::sleep(Duration::from_millis(1500));
    s.scribble(32, 20, 0, 64 * MIB);
    s.converge();
    let p = s.points();
    let oldest = p["oldest"]["seq"].as_u64().unwrap();
    assert!(
        oldest > old_seq,
        "once it ended, pruning went past it: oldest {oldest}: {p}"
    );
    // A kill -9 while pruning and applying: the journal reopens.
    s.scribble(31, 100, 0, 64 * MIB);
    s.target.restart();
    s.converge();
    let p = s.points();
    let oldest = p["oldest"]["seq"].as_u64().unwrap();
    if oldest <= mid_seq {
        let c = s.copy_of(
            &format!("nbd://{}/{DISK}@{mid_seq}", s.target.nbd_addr),
            "mid",
        );
        assert_same(&mid, &c);
    }
    let st = s.target.disk_status(DISK).unwrap();
    assert!(st["journal"]["journal_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["journal"]["retention_seconds"], 2, "{st}");
    assert_same(&s.disk, &s.target.replica(DISK));
    s.splitter.take();
}

#[test]
fn overlay_cap_and_two_test_failovers_at_once() {
    if !have_tool("qemu-io") {
        eprintln!("skipped: qemu-io missing");
        return;
    }
    let Some(s) = site(32 * MIB, &[], &[]) else {
        return;
    };
    s.scribble(1, 50, 0, 32 * MIB);
    s.converge();
    let a = s.save("a");
    let a_seq = s.head_seq();
    s.scribble(2, 50, 0, 32 * MIB);
    s.converge();
    let b = s.save("b");
    let b_seq = s.head_seq();
    let ta = s.test_failover(&a_seq.to_string(), &["--overlay-max", "1M"]);
    let tb = s.test_failover(&b_seq.to_string(), &[]);
    let tb2 = s.test_failover(&b_seq.to_string(), &[]);
    // Replication goes on meanwhile.
    s.scribble(3, 50, 0, 32 * MIB);
    let qio = |uri: &str, cmd: &str| {
        Command::new("qemu-io")
            .args(["--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={DISK}",
                uri.rsplit(':').next().unwrap().split('/').next().unwrap()
            ))
            .args(["-c", cmd])
            .output()
            .unwrap()
    };
    // Within the cap: fine. Beyond: ENOSPC, reads still work.
    let ok = qio(&ta.uri, "write -P 0x5a 0 512k");
    assert!(
        ok.status.success() && !String::from_utf8_lossy(&ok.stdout).contains("error"),
        "{ok:?}"
    );
    let full = qio(&ta.uri, "write -P 0x5b 4M 2M");
    let text =
        String::from_utf8_lossy(&full.stdout).to_string() + &String::from_utf8_lossy(&full.stderr);
    assert!(text.contains("No space left"), "{text}");
    let read = qio(&ta.uri, "read -P 0x5a 0 512k");
    assert!(
        String::from_utf8_lossy(&read.stdout).contains("read 524288/524288"),
        "{read:?}"
    );
    assert!(
        ta.proc.log_text().contains("overlay full"),
        "{}",
        ta.proc.log_text()
    );
    // Both points read as saved (beyond the test's own writes).
    let cb = s.copy_of(&tb.uri, "b1");
    assert_same(&b, &cb);
    assert_same(&b, &s.copy_of(&tb2.uri, "b2"));
    let ca = s.copy_of(&ta.uri, "a");
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&ca).unwrap());
    assert!(y[..512 << 10].iter().all(|&v| v == 0x5a));
    assert!(
        x[512 << 10..] == y[512 << 10..],
        "beyond the test's write, point {a_seq}"
    );
    // SIGTERM discards the overlay and exits 0.
    let (mut ta, mut tb, mut tb2) = (ta, tb, tb2);
    for t in [&mut ta, &mut tb, &mut tb2] {
        assert!(
            t.proc.terminate(),
            "test-failover exits 0 on SIGTERM: {}",
            t.proc.log_text()
        );
    }
    assert!(
        ta.proc.log_text().contains("discarded the overlay"),
        "{}",
        ta.proc.log_text()
    );
    drop((ta, tb, tb2));
    s.converge();
    assert_same(&s.disk, &s.target.replica(DISK));
    let p = s.points();
    let _ = Path::new("");
    assert!(p["open_point_exports"] == 0, "leases released: {p}");
}

#[test]
fn after_an_acknowledged_commit_nothing_the_journal_recovers_from_is_only_in_memory() {
    if !is_root() {
        eprintln!("SKIP: the page-cache check needs root (/proc/kpageflags)");
        return;
    }
    let Some(s) = site(32 * MIB, &["--journal-segment", "1M"], &[]) else {
        return;
    };
    for round in 0..3 {
        s.scribble(40 + round, 150, 0, 32 * MIB);
        // And one large write: the replica takes it O_DIRECT
        // (blockdev::direct), beside the small ones in its page cache.
        let mut big = vec![0u8; 1 << 20];
        blockship::pattern(&mut big, 90 + round);
        let mut c = s.sp().client();
        c.write(8 * MIB, &big, false).unwrap();
        c.flush().unwrap();
        s.converge();
        // Everything is acknowledged: a power cut now must lose nothing the
        // journal, the replica or the state need.
        let dir = s.target.data_dir.join(DISK);
        let mut files = vec![dir.join("replica.img"), dir.join("state")];
        for e in std::fs::read_dir(dir.join("journal")).unwrap().flatten() {
            let p = e.path();
            if matches!(p.extension().and_then(|x| x.to_str()), Some("idx" | "dat")) {
                files.push(p);
            }
        }
        assert!(round < 2 || files.len() > 4, "segments rolled: {files:?}");
        for f in &files {
            let dirty = crashsim::dirty_pages(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(
                dirty.is_empty(),
                "round {round}: {} has pages only in memory: {dirty:?}",
                f.display()
            );
        }
    }
}

#[test]
fn point_exports_are_capped_per_daemon_and_say_why() {
    let Some(s) = site(16 * MIB, &[], &[]) else {
        return;
    };
    s.scribble(1, 20, 0, 16 * MIB);
    s.converge();
    let connect = |name: &str| {
        let t = std::net::TcpStream::connect(&s.target.nbd_addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(20))).ok();
        nbd::Client::connect(t, name)
    };
    // A point that does not exist: the client is told why.
    let Err(e) = connect("db@no-such-mark") else {
        panic!("refused")
    };
    let e = e.to_string();
    assert!(e.contains("no mark of that name"), "{e}");
    let mut open = Vec::new();
    for _ in 0..32 {
        open.push(connect("db@latest").expect("within the cap"));
    }
    let Err(e) = connect("db@latest") else {
        panic!("over the cap")
    };
    let e = e.to_string();
    assert!(e.contains("point exports are open"), "{e}");
    // The latest export is not a point view: still served.
    let mut c = connect(DISK).unwrap();
    let mut b = vec![0u8; 4096];
    c.read(0, &mut b).unwrap();
    drop(open);
    std::thread::sleep(Duration::from_millis(500));
    let mut again = connect("db@latest").expect("room again once they closed");
    again.read(0, &mut b).unwrap();
}
