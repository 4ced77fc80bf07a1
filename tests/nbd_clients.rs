//! End-to-end: `splitter serve` driven by real NBD clients (nbdinfo,
//! qemu-io, nbdcopy, fio's nbd engine) and by the `nbd` crate's client; every
//! check compares the disk file itself.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::process::Command;

use blockship::{have_tool, make_disk, pattern, read, run, Splitter};

const MIB: u64 = 1 << 20;
const MIB_U: usize = 1 << 20;
const MIB_32: u32 = 1 << 20;

fn setup(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, size);
    (dir, disk)
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    if !have_tool("nbdinfo") {
        return;
    }
    let (dir, disk) = setup(64 * MIB + 512);
    let s = Splitter::start(dir.path(), &disk, &[]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(s.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "\"export-size\": 67109376",
        "\"can_multi_conn\": true",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"can_cache\": true",
        "\"can_df\": true",
        "\"is_read_only\": false",
        "\"block_size_maximum\": 67108864",
        "base:allocation",
    ] {
        assert!(text.contains(want), "nbdinfo lacks {want}:\n{text}");
    }
    drop(s);

    let s = Splitter::start(dir.path(), &disk, &["--read-only", "--export", "ro"]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(s.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"is_read_only\": true"), "{text}");
    assert!(text.contains("\"can_trim\": false"), "{text}");
    let out = run(Command::new("nbdinfo").arg("--list").arg(s.uri()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("export=\"ro\""));
}

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    if !have_tool("qemu-io") {
        return;
    }
    let size = 32 * MIB;
    let (dir, disk) = setup(size);
    let s = Splitter::start(dir.path(), &disk, &[]);
    let last = size - 1;
    let cmds = [
        "write -P 0xaa 0 64k".to_string(),
        "write -P 0xbb 1000 3333".to_string(),
        "write -P 0xcc -f 1048575 4097".to_string(), // unaligned, with FUA
        format!("write -P 0xdd {last} 1"),
        "write -P 0xee 8M 2M".to_string(),
        "write -z 8M 512k".to_string(),    // write zeroes, may punch
        "write -z -u 9M 512k".to_string(), // zeroes, unmap explicitly
        "discard 16M 1M".to_string(),
        "flush".to_string(),
        "read -P 0xaa 0 1000".to_string(),
        "read -P 0xbb 1000 3333".to_string(),
        "read -P 0xcc 1048575 4097".to_string(),
        format!("read -P 0xdd {last} 1"),
        "read -P 0 8M 512k".to_string(),
        "read -P 0xee 8704k 512k".to_string(),
        "read -P 0 9M 512k".to_string(),
        "read -P 0xee 9728k 512k".to_string(),
    ];
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for x in &cmds {
        c.arg("-c").arg(x);
    }
    c.arg(s.uri());
    let out = run(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed"), "{text}");

    // The file itself holds what the client wrote.
    let f = read(&disk);
    assert!(f[..1000].iter().all(|&b| b == 0xaa));
    assert!(f[1000..4333].iter().all(|&b| b == 0xbb));
    assert!(f[4333..65536].iter().all(|&b| b == 0xaa));
    assert!(f[1048575..1048575 + 4097].iter().all(|&b| b == 0xcc));
    assert_eq!(f[usize::try_from(size - 1).unwrap()], 0xdd);
    assert!(f[8 << 20..(8 << 20) + (512 << 10)].iter().all(|&b| b == 0));
    assert!(f[(8 << 20) + (512 << 10)..9 << 20]
        .iter()
        .all(|&b| b == 0xee));
    assert!(f[9 << 20..(9 << 20) + (512 << 10)].iter().all(|&b| b == 0));
    assert!(f[(9 << 20) + (512 << 10)..10 << 20]
        .iter()
        .all(|&b| b == 0xee));
    assert!(f[16 << 20..17 << 20].iter().all(|&b| b == 0));
}

#[test]
fn block_status_reports_holes_and_data() {
    let (dir, disk) = setup(8 * MIB);
    let s = Splitter::start(dir.path(), &disk, &[]);
    let mut c = s.client();
    let data = vec![7u8; MIB_U];
    c.write(2 * MIB, &data, false).unwrap();
    c.flush().unwrap();
    let ex = c.block_status(0, 8 * MIB_32).unwrap();
    let total: u64 = ex.iter().map(|e| u64::from(e.length)).sum();
    assert!(total > 0 && total <= 8 * MIB);
    assert_eq!(
        ex[0].flags, 3,
        "start of a sparse disk is a hole that reads as zeroes: {ex:?}"
    );
    // Walk to offset 2 MiB and check it is reported as data.
    let mut at = 0u64;
    let mut found_data = false;
    for e in &ex {
        if at <= 2 * MIB && 2 * MIB < at + u64::from(e.length) {
            found_data = e.flags == 0;
        }
        at += u64::from(e.length);
    }
    assert!(found_data, "written range not reported as data: {ex:?}");
    // Trim makes it a hole again.
    c.trim(2 * MIB, MIB_32).unwrap();
    let ex = c.block_status(2 * MIB, MIB_32).unwrap();
    assert_eq!(ex[0].flags, 3, "{ex:?}");
    let mut back = vec![1u8; MIB_U];
    c.read(2 * MIB, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    c.disconnect().unwrap();
}

#[test]
fn nbdcopy_both_ways() {
    if !have_tool("nbdcopy") {
        return;
    }
    let size = 48 * MIB;
    let (dir, disk) = setup(size);
    let src = dir.path().join("src.img");
    let mut content = vec![0u8; usize::try_from(size).unwrap()];
    pattern(&mut content[..20 << 20], 1);
    pattern(&mut content[30 << 20..], 2); // a zero gap in the middle
    std::fs::write(&src, &content).unwrap();

    let s = Splitter::start(dir.path(), &disk, &[]);
    run(Command::new("nbdcopy").arg(&src).arg(s.uri()));
    assert!(
        read(&disk) == content,
        "export differs from the source after nbdcopy in"
    );

    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(s.uri()).arg(&back));
    assert!(read(&back) == content, "nbdcopy out differs from the disk");
}

#[test]
fn fio_verify_on_two_connections() {
    if !have_tool("fio") {
        return;
    }
    let (dir, disk) = setup(128 * MIB);
    let s = Splitter::start(dir.path(), &disk, &[]);
    // fio writes its verify state files into the working directory.
    let out = run(Command::new("fio")
        .current_dir(dir.path())
        .arg("--name=verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", s.uri()))
        .arg("--numjobs=2")
        .arg("--size=64M")
        .arg("--offset_increment=64M")
        .arg("--rw=randwrite")
        .arg("--bsrange=4k-128k")
        .arg("--iodepth=16")
        .arg("--verify=crc32c")
        .arg("--verify_fatal=1")
        .arg("--do_verify=1")
        .arg("--group_reporting"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verify"), "{text}");
    assert!(
        !text.contains("bad magic") && !text.contains("verify: bad"),
        "{text}"
    );
    let log = s.log_text();
    // Two connections each carried one job's 64 MiB of writes at once.
    assert_eq!(log.matches("67108864 written").count(), 2, "{log}");
}

#[test]
fn tcp_listener_serves_too() {
    let (dir, disk) = setup(4 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _s = Splitter::start(dir.path(), &disk, &["--listen", &addr]);
    let tcp = std::net::TcpStream::connect(&addr).expect("TCP listener");
    let mut c = nbd::Client::connect(tcp, "disk").unwrap();
    assert_eq!(c.size(), 4 * MIB);
    c.write(4 * MIB - 3, b"end", true).unwrap();
    let mut b = [0u8; 3];
    c.read(4 * MIB - 3, &mut b).unwrap();
    assert_eq!(&b, b"end");
}

#[test]
fn sigterm_finishes_flushes_and_exits_zero() {
    let (dir, disk) = setup(16 * MIB);
    let mut s = Splitter::start(dir.path(), &disk, &[]);
    let mut c = s.client();
    let mut data = vec![0u8; MIB_U];
    pattern(&mut data, 9);
    c.write(MIB, &data, false).unwrap();
    let st = s.terminate();
    assert!(st.success(), "exit status {st}; log:\n{}", s.log_text());
    assert!(s.log_text().contains("stopped cleanly"));
    assert!(read(&disk)[MIB_U..2 * MIB_U] == data[..]);
    assert!(!s.socket.exists(), "unix socket left behind");
}

#[test]
fn many_connections_at_once() {
    let (dir, disk) = setup(64 * MIB);
    let s = Splitter::start(dir.path(), &disk, &[]);
    let chunk = 4 * MIB_U;
    let handles: Vec<_> = (0..16u64)
        .map(|i| {
            let mut c = s.client();
            std::thread::spawn(move || {
                let mut data = vec![0u8; chunk];
                pattern(&mut data, i + 100);
                for (k, piece) in data.chunks(64 << 10).enumerate() {
                    let off = i * 4 * MIB + (k as u64) * (64 << 10);
                    c.write(off, piece, false).unwrap();
                }
                let mut back = vec![0u8; chunk];
                c.read(i * 4 * MIB, &mut back).unwrap();
                assert!(back == data, "connection {i} reads back other data");
                c.disconnect().unwrap();
                data
            })
        })
        .collect();
    let written: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // One flush on yet another connection covers them all (multi-conn).
    let mut c = s.client();
    c.flush().unwrap();
    let f = read(&disk);
    for (i, data) in written.iter().enumerate() {
        assert!(
            f[i * chunk..(i + 1) * chunk] == data[..],
            "region {i} differs in the file"
        );
    }
}
