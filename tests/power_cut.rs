//! The ring against power cuts and stuck peers, through the real splitter:
//! a truncated ring file is refused with a clear error (not SIGBUS), SIGTERM
//! stops a splitter whose writers wait on a full ring with a dead shipper,
//! and the FLUSH shortcut is chosen only where it is safe. The page-cache
//! checks (nothing recovery reads is left only in memory after a FLUSH or
//! a clean stop) and the crash images are further down.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error
#![allow(clippy::cast_possible_truncation)] // offsets inside a 4 MiB ring

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockship::{bin, make_disk, Splitter};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 16 MiB disk and a splitter capturing it into a 1 MiB ring in `dir`.
fn start_small(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Splitter) {
    let disk = dir.join("disk.img");
    let ring = dir.join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let sp = Splitter::start(dir, &disk, &["--ring", s(&ring), "--ring-size", "1M"]);
    (disk, ring, sp)
}

#[test]
fn a_truncated_ring_file_is_refused_with_a_message_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, ring, mut sp) = start_small(dir.path());
    assert!(sp.terminate().success());
    let len = std::fs::metadata(&ring).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&ring).unwrap();
    f.set_len(len - 8192).unwrap();
    drop(f);
    let errf = dir.path().join("other.err");
    let mut child = Command::new(bin("splitter"))
        .args(["serve", "--disk", s(&disk), "--ring", s(&ring)])
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    // A splitter that accepted the ring would serve it for ever: bound the wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&errf).unwrap_or_default();
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(1),
        "exit {status:?} (None: still serving after 20 s); stderr:\n{err}"
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
    let (_disk, _ring, mut sp) = start_small(dir.path());
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

/// The ring file's pages that are still only in the page cache (dirty or
/// under writeback): what a power cut now would lose.
fn not_durable(ring: &Path) -> Vec<u64> {
    crashsim::dirty_pages(ring)
        .unwrap_or_else(|e| panic!("page-cache check of {}: {e}", ring.display()))
}

#[test]
fn after_each_flush_and_a_clean_stop_nothing_recovery_reads_is_only_in_memory() {
    if !blockship::is_root() {
        assert!(
            std::env::var("BLOCKSHIP_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "the page-cache check needs root (/proc/kpageflags)"
        );
        eprintln!("SKIP: the page-cache check needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let args = ["--ring", s(&ring), "--ring-size", "4M"];
    let mut sp = Splitter::start(dir.path(), &disk, &args);
    // Opening the ring made its "open, not clean" state durable before the
    // first request was served.
    assert_eq!(not_durable(&ring), Vec::<u64>::new(), "after open");
    let mut c = sp.client();
    let mut block = vec![0u8; 4096];
    for i in 0..64u64 {
        blockship::pattern(&mut block, i);
        c.write(i * 4096, &block, false).unwrap();
    }
    c.flush().unwrap();
    // (After a FLUSH the header's page is dirty again on purpose: the
    // synced head is advanced after the sync, conservatively. What a FLUSH
    // makes durable is checked on crash images below.)
    drop(c);
    assert!(sp.terminate().success());
    assert_eq!(not_durable(&ring), Vec::<u64>::new(), "after a clean stop");
    assert!(blockship::site::ring_status(&ring)["clean"]
        .as_bool()
        .unwrap());
}

/// An ext4 file system on a loop device over a file, so its blocks can be
/// read back as the device holds them (crash images); undone on drop.
struct LoopFs {
    dev: String,
    mnt: std::path::PathBuf,
}

impl LoopFs {
    fn new(dir: &Path) -> LoopFs {
        let img = dir.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 * MIB)
            .unwrap();
        blockship::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let out = blockship::run(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let fs = LoopFs { dev, mnt };
        blockship::run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt));
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The ring as a power cut now would leave it, in `out`.
fn crash_image(ring: &Path, out: &Path) -> serde_json::Value {
    let _ = std::fs::remove_file(out);
    crashsim::device_image_to(ring, out).unwrap();
    blockship::site::ring_status(out)
}

#[test]
fn crash_images_of_the_ring_hold_what_recovery_needs() {
    if !blockship::is_root() || !blockship::have_tool("mkfs.ext4") {
        assert!(
            std::env::var("BLOCKSHIP_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "crash images need root, loop devices and mkfs.ext4"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path());
    let disk = fs.mnt.join("disk.img");
    let ring = fs.mnt.join("disk.ring");
    let image = dir.path().join("crash.ring");
    make_disk(&disk, 64 * MIB);
    let args = ["--ring", s(&ring), "--ring-size", "4M"];
    let mut sp = Splitter::start(dir.path(), &disk, &args);
    let mut c = sp.client();
    c.write(0, &[1u8; 4096], false).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(sp.terminate().success());
    assert!(
        crash_image(&ring, &image)["clean"].as_bool().unwrap(),
        "a clean stop must be durable"
    );

    // Restarted: before any request, a power cut must not find the old
    // CLEAN (it would trust a stale in-flight table and sequence).
    let mut sp = Splitter::start(dir.path(), &disk, &args);
    let st = crash_image(&ring, &image);
    assert_eq!(
        st["clean"].as_bool(),
        Some(false),
        "the open state is not durable: {st}"
    );
    let pid = st["producer_pid"].as_u64().unwrap();
    assert_eq!(pid, u64::from(sp.pid()), "{st}");

    // After each acknowledged FLUSH, the crash image holds every record, the
    // bitmap and the in-flight table exactly as the live file does.
    let mut c = sp.client();
    let ring_len = std::fs::metadata(&ring).unwrap().len();
    let data_end = 8192 + 4 * MIB;
    for round in 0..4u64 {
        for i in 0..32u64 {
            let b = u8::try_from((round * 32 + i) % 251).unwrap();
            c.write((round * 32 + i) * 8192, &[b; 4096], round == 3 && i == 31)
                .unwrap();
        }
        c.flush().unwrap();
        let st = crash_image(&ring, &image);
        assert_eq!(st["clean"].as_bool(), Some(false), "{st}");
        let (live, crashed) = (blockship::read(&ring), blockship::read(&image));
        assert_eq!(crashed.len() as u64, ring_len);
        let head = 8192 + (round + 1) * 32 * (48 + 4096);
        assert!(
            live[8192..head as usize] == crashed[8192..head as usize],
            "round {round}: flushed records are not durable"
        );
        // One bitmap page (64 MiB at 64 KiB a bit), then the in-flight table:
        // entries of (offset, length); a free entry (length 0) keeps a stale
        // offset, which recovery ignores.
        let (bm, inflight) = (data_end as usize, data_end as usize + 4096);
        assert!(
            live[bm..inflight] == crashed[bm..inflight],
            "round {round}: the bitmap is not durable"
        );
        for (e, (l, k)) in live[inflight..]
            .chunks(16)
            .zip(crashed[inflight..].chunks(16))
            .enumerate()
        {
            let used = |x: &[u8]| x[8..16] != [0u8; 8];
            assert_eq!(
                used(l),
                used(k),
                "round {round}: in-flight entry {e} is not durable"
            );
            assert!(
                !used(l) || l == k,
                "round {round}: in-flight entry {e} differs"
            );
        }
        let last = 1 + (round + 1) * 32;
        let out = blockship::run(
            Command::new(bin("splitter"))
                .args([
                    "ring",
                    "dump",
                    "--ring",
                    s(&image),
                    "--limit",
                    "1",
                    "--from",
                ])
                .arg(last.to_string()),
        );
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(
            dump.contains(&format!("seq={last} ")),
            "round {round}: the flushed records must survive: {dump}"
        );
    }
    drop(c);
    assert!(sp.terminate().success());
}
