//! End-to-end: the splitter capturing into a ring. Real processes: the
//! splitter under load, a consumer in another process (or this one)
//! rebuilding a copy of the disk from the records; `kill -9` at random
//! moments; damaged ring files; overflow into the dirty bitmap; a ring
//! given the wrong disk.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blockship::{have_tool, kill9, make_disk, read, run, splitter_cmd, Rng, Splitter};

const MIB: u64 = 1 << 20;

fn ring_status(ring: &Path) -> String {
    let out = splitter_cmd(&["ring", "status", "--json", "--ring", ring.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_u64(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} missing in {json}"));
    json[at + key.len() + 4..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Apply every waiting record to `copy` (in this process) and release them.
fn drain_into(ring: &Path, copy: &mut [u8]) -> u64 {
    let mut c = ring::Consumer::open(ring).unwrap();
    let mut n = 0;
    loop {
        let mut got = ring::Batch::new();
        if c.read(1024, 64 << 20, &mut got).unwrap() == 0 {
            break;
        }
        for r in got.iter() {
            let at = usize::try_from(r.offset).unwrap();
            let len = r.len as usize;
            match r.kind {
                ring::Kind::Write => copy[at..at + len].copy_from_slice(r.payload),
                ring::Kind::Trim | ring::Kind::Zero => copy[at..at + len].fill(0),
                _ => {}
            }
            n += 1;
        }
        c.release(got.last_seq().unwrap()).unwrap();
    }
    n
}

#[test]
fn a_consumer_process_rebuilds_the_disk_under_fio_load() {
    if !have_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    let copy = dir.path().join("copy.img");
    make_disk(&disk, 128 * MIB);
    make_disk(&copy, 128 * MIB);
    // A 16 MiB ring wraps many times under 128 MiB of writes; blocking mode
    // keeps every change in the ring so the copy can be checked whole.
    let mut s = Splitter::start(
        dir.path(),
        &disk,
        &[
            "--ring",
            ring.to_str().unwrap(),
            "--ring-size",
            "16M",
            "--ring-full",
            "block",
        ],
    );
    let drain = Command::new(blockship::bin("splitter"))
        .args([
            "ring",
            "drain",
            "--ring",
            ring.to_str().unwrap(),
            "--apply-to",
            copy.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run(Command::new("fio")
        .current_dir(dir.path())
        .arg("--name=ring")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", s.uri()))
        .args([
            "--numjobs=2",
            "--size=64M",
            "--offset_increment=64M",
            "--rw=randwrite",
        ])
        .args([
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--fsync=32",
            "--verify=crc32c",
            "--verify_fatal=1",
        ])
        .arg("--group_reporting"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ring"));
    let st = s.terminate();
    assert!(st.success(), "{}", s.log_text());
    // Wait for the drain to take the last records, then stop it.
    for _ in 0..200 {
        if json_u64(&ring_status(&ring), "records_waiting") == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    blockship::kill_term(drain.id());
    let out = drain.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = ring_status(&ring);
    assert_eq!(json_u64(&status, "records_waiting"), 0, "{status}");
    assert_eq!(json_u64(&status, "dirty_bytes"), 0, "{status}");
    assert!(status.contains("\"clean\": true"), "{status}");
    assert!(
        read(&copy) == read(&disk),
        "the copy rebuilt from the ring differs from the disk"
    );
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    let size = 16 * MIB;
    make_disk(&disk, size);
    let n = usize::try_from(size).unwrap();
    let mut model = vec![0u8; n]; // what acknowledged writes put on the disk
    let mut copy = vec![0u8; n]; // rebuilt from the ring
    let mut rng = Rng::new(2026);
    let mut kills = 0;
    let mut writes = 0;
    let mut dirty_rounds = 0;
    for round in 0..24u64 {
        let s = Splitter::start(
            dir.path(),
            &disk,
            &["--ring", ring.to_str().unwrap(), "--ring-size", "32M"],
        );
        let pid = s.pid();
        let delay = rng.range(20, 150);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            kill9(pid);
        });
        let mut c = s.client();
        let mut in_flight: Option<(usize, usize)>;
        let mut i = 0u64;
        loop {
            let len = usize::try_from(rng.range(1, 129) * 512).unwrap();
            let at = usize::try_from(rng.range(0, (size / 512) - 128) * 512).unwrap();
            let mut data = vec![0u8; len];
            blockship::pattern(&mut data, round * 100_000 + i);
            in_flight = Some((at, len));
            let fua = rng.range(0, 10) == 0;
            if c.write(at as u64, &data, fua).is_err() {
                break;
            }
            model[at..at + len].copy_from_slice(&data);
            in_flight = None;
            i += 1;
            if i.is_multiple_of(8) && c.flush().is_err() {
                break;
            }
        }
        killer.join().unwrap();
        writes += i;
        drop(c);
        drop(s);
        kills += 1;
        // Restart the producer (recovery), then drain what the ring holds.
        let s = Splitter::start(dir.path(), &disk, &["--ring", ring.to_str().unwrap()]);
        drain_into(&ring, &mut copy);
        let on_disk = read(&disk);
        let status = ring_status(&ring);
        let (skip_from, skip_to) = in_flight.map_or((0, 0), |(a, l)| (a, a + l));
        for (what, v) in [("copy rebuilt from the ring", &copy), ("disk", &on_disk)] {
            assert!(
                v[..skip_from] == model[..skip_from] && v[skip_to..] == model[skip_to..],
                "round {round}: the {what} lost an acknowledged write"
            );
        }
        if copy[skip_from..skip_to] != on_disk[skip_from..skip_to] {
            // The write in flight reached the disk but not the ring: the
            // in-flight table must have put it in the dirty bitmap.
            assert!(
                json_u64(&status, "dirty_bytes") > 0,
                "round {round}: in-flight write neither in the ring nor dirty: {status}"
            );
            assert!(status.contains("\"crash_dirty\": true"), "{status}");
            dirty_rounds += 1;
        }
        // Bring the copy to the disk's state (what a resync would do) and
        // carry on from the disk's content.
        copy[skip_from..skip_to].copy_from_slice(&on_disk[skip_from..skip_to]);
        model[skip_from..skip_to].copy_from_slice(&on_disk[skip_from..skip_to]);
        assert!(
            copy == on_disk,
            "round {round}: copy and disk differ outside the in-flight write"
        );
        drop(s);
    }
    eprintln!("{kills} kills, {writes} acknowledged writes, {dirty_rounds} rounds with a write on the disk but not in the ring");
    assert!(kills >= 20);
    assert!(writes > kills * 10, "the load barely ran");
}

#[test]
fn damaged_ring_tail_is_cut_and_damage_in_the_middle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 16 * MIB);
    let ring_arg = ["--ring", ring.to_str().unwrap()];
    {
        let s = Splitter::start(dir.path(), &disk, &ring_arg);
        let mut c = s.client();
        for i in 0..10u64 {
            c.write(i * 65536, &[u8::try_from(i).unwrap() + 1; 4096], false)
                .unwrap();
        }
        c.flush().unwrap(); // records 1..=10 durable
        for i in 10..14u64 {
            c.write(i * 65536, &[7; 4096], false).unwrap();
        }
        kill9(s.pid());
    }
    let dump = splitter_cmd(&["ring", "dump", "--ring", ring.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&dump.stdout).into_owned();
    let offset_of = |seq: u64| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("seq={seq} ")))
            .unwrap();
        let at = line
            .split_whitespace()
            .find(|w| w.starts_with("at="))
            .unwrap();
        at[3..].parse().unwrap()
    };
    let flip = |at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ring)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    };
    // Damage in the tail (after the last flush): cut, with a log line.
    let middle = offset_of(5);
    flip(offset_of(13) + 100);
    {
        let s = Splitter::start(dir.path(), &disk, &ring_arg);
        let log = s.log_text();
        assert!(log.contains("cut a torn tail"), "{log}");
        let status = ring_status(&ring);
        assert_eq!(json_u64(&status, "head_seq"), 14, "{status}");
        assert!(status.contains("\"needs_verify\": true"), "{status}");
        kill9(s.pid());
    }
    // Damage before the durable point: refused, naming the record.
    flip(middle + 60);
    let out = Command::new(blockship::bin("splitter"))
        .args(["serve", "--disk", disk.to_str().unwrap(), "--socket"])
        .arg(dir.path().join("x.sock"))
        .args(ring_arg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("corrupt record at file offset {middle}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The dump shows it too, and says where it stopped.
    let dump = splitter_cmd(&["ring", "dump", "--ring", ring.to_str().unwrap()]);
    assert!(!dump.status.success());
    assert!(String::from_utf8_lossy(&dump.stderr).contains(&format!("file offset {middle}")));
}

#[test]
fn overflow_goes_to_the_dirty_bitmap_without_failing_or_blocking_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 64 * MIB);
    let args = ["--ring", ring.to_str().unwrap(), "--ring-size", "1M"];
    let s = Splitter::start(dir.path(), &disk, &args);
    let mut c = s.client();
    let chunk = vec![0x42u8; 65536];
    let start = std::time::Instant::now();
    for i in 0..256u64 {
        c.write(i * 65536, &chunk, false).unwrap();
    }
    c.flush().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "writes were held up"
    );
    let status = ring_status(&ring);
    let recorded = json_u64(&status, "head_seq");
    assert!(recorded > 0 && recorded < 256, "{status}");
    assert!(status.contains("\"overflow\": true"), "{status}");
    // Exactly the writes after the overflow are dirty (64 KiB granules).
    assert_eq!(
        json_u64(&status, "dirty_bytes"),
        (256 - recorded) * 65536,
        "{status}"
    );
    drop(c);
    drop(s);
    let s = Splitter::start(dir.path(), &disk, &args);
    let after = ring_status(&ring);
    assert_eq!(
        json_u64(&after, "dirty_bytes"),
        (256 - recorded) * 65536,
        "{after}"
    );
    drop(s);
}

#[test]
fn a_ring_refuses_another_disk_and_a_resized_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let ring = dir.path().join("a.ring");
    make_disk(&a, 8 * MIB);
    make_disk(&b, 8 * MIB);
    drop(Splitter::start(
        dir.path(),
        &a,
        &["--ring", ring.to_str().unwrap()],
    ));
    let serve = |disk: &Path| {
        Command::new(blockship::bin("splitter"))
            .args(["serve", "--disk", disk.to_str().unwrap(), "--socket"])
            .arg(dir.path().join("y.sock"))
            .args(["--ring", ring.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = serve(&b);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to") && err.contains("a.img"), "{err}");
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let out = serve(&a);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("size changed"));
}

#[test]
fn overlapping_writes_on_many_connections_reach_disk_and_ring_in_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 4 * MIB);
    let mut s = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", ring.to_str().unwrap(), "--ring-size", "64M"],
    );
    // Four connections hammer the same 256 KiB, each with several requests
    // in flight (raw pipelined requests), so overlapping changes race.
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let sock = s.raw();
            std::thread::spawn(move || {
                let mut c = nbd::Client::connect(sock.try_clone().unwrap(), "").unwrap();
                let mut rng = Rng::new(w + 7);
                for round in 0..120u64 {
                    let n = 8;
                    for k in 0..n {
                        let len = u32::try_from(rng.range(1, 65) * 512).unwrap();
                        let off = rng.range(0, (256 * 1024 - u64::from(len)) / 512) * 512;
                        let cookie = round * 100 + k;
                        if rng.range(0, 8) == 0 {
                            let h = nbd::RequestHeader {
                                flags: 0,
                                command: nbd::protocol::CMD_TRIM,
                                cookie,
                                offset: off,
                                length: len,
                            };
                            c.raw_request(&h, &[]).unwrap();
                        } else {
                            let mut data = vec![0u8; len as usize];
                            blockship::pattern(&mut data, w * 1_000_000 + cookie);
                            let h = nbd::RequestHeader {
                                flags: 0,
                                command: nbd::protocol::CMD_WRITE,
                                cookie,
                                offset: off,
                                length: len,
                            };
                            c.raw_request(&h, &data).unwrap();
                        }
                    }
                    for _ in 0..n {
                        match c.raw_reply(None) {
                            Ok((_, None)) => {}
                            other => {
                                return Err(format!("connection {w}, round {round}: {other:?}"))
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        if let Err(e) = w.join().unwrap() {
            panic!("{e}; splitter log:\n{}", s.log_text());
        }
    }
    let st = s.terminate();
    assert!(st.success(), "{}", s.log_text());
    let mut copy = vec![0u8; usize::try_from(4 * MIB).unwrap()];
    let records = drain_into(&ring, &mut copy);
    assert!(records >= 4 * 120 * 8, "{records} records");
    assert!(
        copy == read(&disk),
        "the ring's order of overlapping changes differs from the disk's"
    );
}

#[test]
fn pipelined_flushes_are_all_answered_and_cover_the_writes_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let ring = dir.path().join("disk.ring");
    make_disk(&disk, 4 * MIB);
    let s = Splitter::start(
        dir.path(),
        &disk,
        &["--ring", ring.to_str().unwrap(), "--ring-size", "16M"],
    );
    let sock = s.raw();
    let mut c = nbd::Client::connect(sock.try_clone().unwrap(), "").unwrap();
    // Writes and FLUSHes sent back to back, without waiting: FLUSHes that
    // arrive while one is syncing share the next sync (group commit).
    let mut expected = 0;
    for k in 0..64u64 {
        let data = vec![u8::try_from(k).unwrap(); 4096];
        let w = nbd::RequestHeader {
            flags: 0,
            command: nbd::protocol::CMD_WRITE,
            cookie: 2 * k,
            offset: k * 4096,
            length: 4096,
        };
        c.raw_request(&w, &data).unwrap();
        let f = nbd::RequestHeader {
            flags: 0,
            command: nbd::protocol::CMD_FLUSH,
            cookie: 2 * k + 1,
            offset: 0,
            length: 0,
        };
        c.raw_request(&f, &[]).unwrap();
        expected += 2;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..expected {
        let (cookie, err) = c.raw_reply(None).unwrap();
        assert_eq!(err, None, "request {cookie} failed");
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert!(
        s.log_text().contains("one sync serves"),
        "no FLUSHes were grouped:\n{}",
        s.log_text()
    );
    kill9(s.pid());
    drop(s);
    // Every write was answered before the last FLUSH was: all in the ring.
    let mut copy = vec![0u8; usize::try_from(4 * MIB).unwrap()];
    let n = drain_into(&ring, &mut copy);
    assert_eq!(n, 64);
    assert!(copy[..64 * 4096] == read(&disk)[..64 * 4096]);
}
