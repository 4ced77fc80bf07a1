//! End-to-end: `splitter mark`, recovery points in the ring. Real
//! processes: a mark on a ring owned by a running `splitter serve` while an
//! NBD client writes (through its control socket `RING.ctl`), a mark on a
//! ring no splitter owns, `--freeze` of a mounted ext4 (nbdfuse + loop
//! device on the splitter's export), a failing `--pre` hook, a freeze that
//! outlives `--freeze-timeout` or is interrupted by SIGTERM, and hostile
//! clients on the control socket.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship::{
    have_tool, is_root, kill_term, make_disk, run, splitter_cmd, FuseLoopMount, Splitter,
};

const MIB: u64 = 1 << 20;

fn ctl(ring: &Path) -> PathBuf {
    let mut s = ring.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `splitter mark ARGS`, expect success, return the seq it printed.
fn mark_ok(args: &[&str]) -> u64 {
    let mut a = vec!["mark"];
    a.extend_from_slice(args);
    let out = splitter_cmd(&a);
    assert!(out.status.success(), "splitter {a:?}: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let at = line
        .find(" at seq ")
        .unwrap_or_else(|| panic!("no seq in {line:?}"));
    line[at + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Run `splitter mark --json ARGS`, expect success, return the JSON.
fn mark_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["mark", "--json"];
    a.extend_from_slice(args);
    let out = splitter_cmd(&a);
    assert!(out.status.success(), "splitter {a:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// The `ring dump` line of `seq`.
fn dump_line(ring: &Path, seq: u64) -> String {
    let from = seq.to_string();
    let out = splitter_cmd(&[
        "ring",
        "dump",
        "--ring",
        s(ring),
        "--from",
        &from,
        "--limit",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every record of the ring, through the consumer API (not released).
fn records(ring: &Path, mut each: impl FnMut(&ring::Record<'_>)) {
    let mut c = ring::Consumer::open(ring).unwrap();
    let mut got = ring::Batch::new();
    loop {
        got.clear();
        if c.read(4096, 64 << 20, &mut got).unwrap() == 0 {
            break;
        }
        for r in got.iter() {
            each(&r);
        }
    }
}

#[test]
fn a_mark_on_a_served_ring_comes_after_every_write_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", s(&ring), "--ring-size", "128M"],
    );
    assert!(
        ctl(&ring).exists(),
        "serve creates {}",
        ctl(&ring).display()
    );

    // A client writes 4 KiB blocks, each carrying its index, without pause.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut c = sp.client();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut block = [0u8; 4096];
                block[..8].copy_from_slice(&i.to_le_bytes());
                c.write((i % 4096) * 4096, &block, false).unwrap();
                i += 1;
                acked.store(i, Ordering::Release);
                // Below the ring's size over the test's second or two.
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    // And qemu-io, a client of its own, when installed.
    let qemu = have_tool("qemu-io").then(|| {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 32M 16M", "-c", "flush"])
            .arg(sp.uri())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = acked.load(Ordering::Acquire);
    let seq = mark_ok(&["--ring", s(&ring), "during writes"]);
    let after = acked.load(Ordering::Acquire);
    let json = mark_json(&["--ring", s(&ring), "second"]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    if let Some(mut q) = qemu {
        assert!(q.wait().unwrap().success());
    }
    assert!(before > 0, "the writer must have been writing");

    assert_eq!(json["name"], "second");
    assert_eq!(json["kind"], "crash");
    assert!(json["seq"].as_u64().unwrap() > seq);
    assert!(json["time_ns"].as_u64().unwrap() > 0);
    assert!(json["frozen_ms"].is_null());

    let line = dump_line(&ring, seq);
    assert!(
        line.starts_with(&format!("seq={seq} kind=MARK "))
            && line.ends_with("name=\"during writes\" point=crash"),
        "{line}"
    );

    // Every write acknowledged before the command started is before the
    // mark; writes went on after it.
    let (mut found, mut later, mut earlier) = (false, 0, 0);
    records(&ring, |r| match r.kind {
        ring::Kind::Mark if r.seq == seq => {
            assert_eq!(r.payload, b"during writes");
            assert!(!r.is_app_mark());
            found = true;
        }
        ring::Kind::Write if r.len == 4096 && r.offset < 16 * MIB => {
            let i = u64::from_le_bytes(r.payload[..8].try_into().unwrap());
            if i < before {
                assert!(
                    r.seq < seq,
                    "write {i} (seq {}) acknowledged before the mark at seq {seq}",
                    r.seq
                );
                earlier += 1;
            }
            if i >= after {
                assert!(r.seq > seq);
                later += 1;
            }
        }
        _ => {}
    });
    assert!(found, "mark seq {seq} not in the ring");
    assert_eq!(earlier, before);
    assert!(later > 0, "no write after the mark");

    let st = sp.terminate();
    assert!(st.success(), "{}", sp.log_text());
    assert!(!ctl(&ring).exists(), "serve removes its control socket");
    assert!(sp.log_text().contains("asked over the control socket"));
}

#[test]
fn a_mark_on_a_ring_no_splitter_owns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    {
        let mut sp = Splitter::start(
            dir.path(),
            &disk,
            &["--ring", s(&ring), "--ring-size", "4M"],
        );
        sp.client().write(0, &[1u8; 4096], true).unwrap();
        assert!(sp.terminate().success());
    }
    // A stale socket, as a killed splitter leaves it: nobody answers.
    drop(UnixListener::bind(ctl(&ring)).unwrap());
    let seq = mark_ok(&["--ring", s(&ring), "offline"]);
    assert_eq!(seq, 2);
    assert!(dump_line(&ring, 2).ends_with("name=\"offline\" point=crash"));
    let status = splitter_cmd(&["ring", "status", "--json", "--ring", s(&ring)]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("\"clean\": true"),
        "{}",
        text(&status)
    );

    // Hooks alone make it application-consistent, also without a splitter.
    let j = mark_json(&[
        "--ring",
        s(&ring),
        "--pre",
        "true",
        "--post",
        "true",
        "hooked",
    ]);
    assert_eq!(
        (j["seq"].as_u64(), j["kind"].as_str()),
        (Some(3), Some("app"))
    );
    assert!(dump_line(&ring, 3).ends_with("name=\"hooked\" point=app"));

    // The splitter takes the ring back (replacing the stale socket) and
    // goes on after the marks.
    let mut sp = Splitter::start(dir.path(), &disk, &["--ring", s(&ring)]);
    sp.client().write(4096, &[2u8; 4096], true).unwrap();
    assert!(dump_line(&ring, 4).starts_with("seq=4 kind=WRITE"));
    assert_eq!(mark_ok(&["--ring", s(&ring), "served"]), 5);
    assert!(sp.terminate().success());

    // A ring that does not exist: a clear error naming it.
    let missing = dir.path().join("missing.ring");
    let out = splitter_cmd(&["mark", "--ring", s(&missing), "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.ring") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn hostile_control_clients_do_not_block_a_mark() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", s(&ring), "--ring-size", "4M"],
    );
    let sock = ctl(&ring);
    // Clients that say nothing, one that sends half a line, one garbage.
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"mark crash never-fini").unwrap();
    let mut garbage = UnixStream::connect(&sock).unwrap();
    garbage.write_all(&[0x00, 0xff, 0x13, 0x37]).unwrap();
    garbage.write_all(b"\nmore\n").unwrap();
    let t = Instant::now();
    let seq = mark_ok(&["--ring", s(&ring), "despite them"]);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(seq, 1);
    let mut reply = String::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = garbage.read_to_string(&mut reply);
    assert!(reply.starts_with("error "), "{reply:?}");
    // The silent ones are dropped after their time; serve still serves.
    reply.clear();
    half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    half.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("no request line"), "{reply:?}");
    drop(silent);
    sp.client().write(0, &[3u8; 4096], true).unwrap();
    assert_eq!(mark_ok(&["--ring", s(&ring), "again"]), 3);
    assert!(sp.alive());
    assert!(sp.terminate().success());
}

/// Thaws the mount point when dropped, so a failed test never leaves a
/// frozen file system behind (dropped before the mount).
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// A write (with fsync) in `mnt` completes within a few seconds.
fn assert_writable(mnt: &Path, what: &str) {
    let probe = mnt.join(format!("probe-{what}"));
    let mut child = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", probe.display()))
        .args(["bs=4k", "count=4", "conv=fsync", "status=none"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{what}: write failed");
            return;
        }
        if Instant::now() > deadline {
            let _ = Command::new("fsfreeze").arg("-u").arg(mnt).status();
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: a write to {} did not complete within 10 s: the file system was left frozen", mnt.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn marks_in(ring: &Path) -> Vec<String> {
    let out = splitter_cmd(&["ring", "dump", "--ring", s(ring), "--limit", "1000000"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("kind=MARK"))
        .map(str::to_string)
        .collect()
}

/// A control socket that accepts and never answers (a splitter that
/// hangs), until `done`; the request lines it got.
struct Hanging {
    done: Arc<AtomicBool>,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hanging {
    fn start(ring: &Path) -> Hanging {
        let l = UnixListener::bind(ctl(ring)).unwrap();
        l.set_nonblocking(true).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (done, lines) = (done.clone(), lines.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !done.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            let mut buf = [0u8; 256];
                            let n = c.read(&mut buf).unwrap_or(0);
                            lines
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                            held.push(c); // never answered
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Hanging {
            done,
            lines,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn freeze_a_mounted_ext4_for_an_application_consistent_mark() {
    if !is_root() {
        eprintln!("SKIP: mounting needs root");
        return;
    }
    if !(have_tool("nbdfuse")
        && have_tool("losetup")
        && have_tool("mkfs.ext4")
        && have_tool("fsfreeze"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 128 * MIB);
    let mut sp = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", s(&ring), "--ring-size", "256M"],
    );
    let mut m = FuseLoopMount::attach(dir.path(), &sp.uri());
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(m.dev()));
    m.mount();
    let mnt = m.mount_dir.clone();
    let _thaw = ThawOnDrop(mnt.clone());

    // (3) Data written but not synced before the mark reaches the ring
    // before it: the freeze flushes the file system.
    let mut data = vec![0u8; 64 << 10];
    blockship::pattern(&mut data, 0x5eed);
    std::fs::write(mnt.join("before.bin"), &data).unwrap();
    let j = mark_json(&["--ring", s(&ring), "--freeze", s(&mnt), "app point"]);
    assert_eq!(j["kind"], "app", "{j}");
    assert_eq!(j["name"], "app point");
    let frozen_ms = j["frozen_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("frozen_ms: {j}"));
    assert!(frozen_ms < 10_000, "{j}");
    let seq = j["seq"].as_u64().unwrap();
    assert_writable(&mnt, "after a freeze");
    assert!(dump_line(&ring, seq).ends_with("name=\"app point\" point=app"));
    let needle = &data[8192..8192 + 64];
    let (mut in_ring_before, mut app) = (false, false);
    records(&ring, |r| {
        if r.kind == ring::Kind::Write && r.seq < seq {
            let skip = usize::try_from((512 - r.offset % 512) % 512).unwrap();
            in_ring_before |= (skip..r.payload.len().saturating_sub(63))
                .step_by(512)
                .any(|k| &r.payload[k..k + 64] == needle);
        }
        if r.seq == seq {
            app = r.is_app_mark();
        }
    });
    assert!(
        in_ring_before,
        "the file's data is not in the ring before the mark"
    );
    assert!(app);

    // The text form, with hooks around the freeze (and their order).
    let log = dir.path().join("hooks.log");
    let pre = format!("echo pre >> {}", log.display());
    let post = format!("echo post $BLOCKSHIP_MARK_RESULT >> {}", log.display());
    let out = splitter_cmd(&[
        "mark",
        "--ring",
        s(&ring),
        "--freeze",
        s(&mnt),
        "--pre",
        &pre,
        "--post",
        &post,
        "hooks",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("(application-consistent; file system frozen for "),
        "{line}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost ok\n");
    assert_writable(&mnt, "after hooks");

    // (4) A failing --pre: no freeze left behind, no mark, non-zero exit.
    let marks = marks_in(&ring).len();
    let out = splitter_cmd(&[
        "mark",
        "--ring",
        s(&ring),
        "--freeze",
        s(&mnt),
        "--pre",
        "false",
        "--post",
        &post,
        "refused",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pre hook `false` failed") && err.contains("no mark"),
        "{err}"
    );
    assert_writable(&mnt, "after a failing --pre");
    assert_eq!(
        marks_in(&ring).len(),
        marks,
        "a failing --pre must not mark"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost ok\n",
        "no --post after a failing --pre"
    );

    // The ring must not be on the file system to freeze.
    let inside = mnt.join("inside.ring");
    std::fs::write(&inside, b"x").unwrap();
    let out = splitter_cmd(&["mark", "--ring", s(&inside), "--freeze", s(&mnt), "x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is on that file system"),
        "{}",
        text(&out)
    );
    assert_writable(&mnt, "after a refused freeze");

    // A splitter that never answers: the freeze ends at --freeze-timeout,
    // the command fails, --post still runs, no mark.
    let hung = dir.path().join("hung.ring");
    std::fs::write(&hung, b"").unwrap(); // never opened: the socket answers first
    let fake = Hanging::start(&hung);
    let t = Instant::now();
    let out = splitter_cmd(&[
        "mark",
        "--ring",
        s(&hung),
        "--freeze",
        s(&mnt),
        "--freeze-timeout",
        "1500ms",
        "--post",
        &post,
        "slow",
    ]);
    let took = t.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not complete within"), "{err}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_writable(&mnt, "after --freeze-timeout");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost ok\npost failed\n"
    );

    // SIGTERM while frozen: thawed before the exit, which comes soon.
    let mut child = Command::new(blockship::bin("splitter"))
        .args([
            "mark",
            "--ring",
            s(&hung),
            "--freeze",
            s(&mnt),
            "--freeze-timeout",
            "60s",
            "signalled",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    kill_term(child.id());
    let t = Instant::now();
    let st = wait_exit(&mut child, Duration::from_secs(10));
    let Some(st) = st else {
        let _ = child.kill();
        panic!("splitter mark did not exit within 10 s of SIGTERM");
    };
    assert!(!st.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("interrupted"), "{err}");
    assert_writable(&mnt, "after SIGTERM");
    let asked = fake.lines();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(
        asked.iter().all(|l| l.starts_with("mark app,by=")),
        "{asked:?}"
    );

    assert_eq!(marks_in(&ring).len(), marks);
    m.umount();
    run(Command::new("fsck.ext4").arg("-fn").arg(m.dev()));
    drop(m);
    assert!(sp.terminate().success(), "{}", sp.log_text());
}
