//! `splitter serve --ublk` and `splitter nbd-attach` where the host kernel
//! has neither driver (the machines blockship is developed on): every
//! refusal is a clear message and a non-zero exit, never a hang or a panic.
//! The drivers themselves are exercised in the VM suite (tests/vm_suite.rs).

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockship::{bin, make_disk};

/// Run the splitter with `args`, at most 20 s; its output.
fn splitter(args: &[&str]) -> Output {
    let mut child = Command::new(bin("splitter"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("splitter {args:?} still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(args: &[&str], says: &str) {
    let out = splitter(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "splitter {args:?} succeeded:\n{err}");
    assert!(
        err.contains(says),
        "splitter {args:?}: the message does not say {says:?}:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "splitter {args:?} panicked:\n{err}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ublk_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16 << 20);
    let d = s(&disk);
    refused(
        &["serve", "--disk", d, "--ublk", "--listen", "127.0.0.1:0"],
        "one splitter serves a disk through one front end",
    );
    refused(
        &[
            "serve",
            "--disk",
            d,
            "--ublk",
            "--socket",
            s(&dir.path().join("x.sock")),
        ],
        "one splitter serves a disk through one front end",
    );
    refused(
        &["serve", "--disk", d, "--ublk", "--depth", "0"],
        "--depth 0 is out of range",
    );
    refused(
        &["serve", "--disk", d, "--ublk", "--depth", "129"],
        "--depth 129 is out of range",
    );
    refused(
        &["serve", "--disk", d, "--ublk", "--queues", "0"],
        "--queues 0 is out of range",
    );
    refused(
        &[
            "serve",
            "--disk",
            d,
            "--ublk",
            "--ublk-id",
            "1",
            "--recover",
            "2",
        ],
        "name different devices",
    );
    refused(&["serve", "--disk", d, "--recover", "0"], "--ublk");
    if !Path::new("/dev/ublk-control").exists() {
        refused(&["serve", "--disk", d, "--ublk"], "no ublk driver");
        refused(
            &["serve", "--disk", d, "--ublk", "--recover", "0"],
            "modprobe ublk_drv",
        );
    }
    // Nothing was created beside the disk.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("disk.img")]);
}

#[test]
fn nbd_attach_refusals_are_clear() {
    refused(
        &[
            "nbd-attach",
            "--device",
            "/dev/sda",
            "--connect",
            "127.0.0.1:1",
        ],
        "not an NBD device",
    );
    refused(&["nbd-attach", "--device", "/dev/nbd0"], "--connect");
    let has_nbd = Path::new("/sys/module/nbd").exists();
    if !has_nbd {
        refused(
            &[
                "nbd-attach",
                "--device",
                "/dev/nbd0",
                "--connect",
                "127.0.0.1:1",
            ],
            "modprobe nbd",
        );
        refused(
            &["nbd-attach", "--device", "/dev/nbd0", "--detach"],
            "modprobe nbd",
        );
    }
}
