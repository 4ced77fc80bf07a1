//! End-to-end with the real Linux kernel NBD client (`/dev/nbd0`). The hosts
//! blockship is developed on have no `nbd` module, so this test boots a small
//! Linux guest under QEMU (software emulation) that has one, through the
//! scripts in `scripts/vmtest/`:
//!
//! 1. `fetch.sh` installs QEMU and friends and downloads the guest kernel,
//!    busybox and nbd-client (nothing to do when `scripts/test` ran it);
//! 2. `build-initramfs.sh` packs the guest (with `guest-test.sh` as its test);
//! 3. `run.sh` serves a fresh disk file with the splitter over TCP, boots the
//!    guest, which connects with `nbd-client` (one connection, then several),
//!    checks patterns at several offsets including the last sector, zeroes
//!    and discards ranges, makes ext4, writes, remounts and verifies files,
//!    runs e2fsck and fstrim; then the splitter must stop with status 0 on
//!    SIGTERM, and the disk file must hold a clean ext4 with the guest's files.
//!
//! It needs root (the fetch installs packages with apt-get) and skips with a
//! SKIP line when it is not root, or when the prerequisites cannot be fetched
//! and BLOCKSHIP_REQUIRE_TOOLS is not 1. One run takes about 20 s.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockship::is_root;

/// The time limit for the guest, in seconds (run.sh kills QEMU after it).
const GUEST_TIMEOUT_SECS: u32 = 150;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_tools() -> bool {
    std::env::var("BLOCKSHIP_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// Run one of the scripts in scripts/vmtest with `envs`; its output.
fn script(name: &str, envs: &[(&str, &OsStr)]) -> Output {
    let path = repo().join("scripts/vmtest").join(name);
    let mut cmd = Command::new("bash");
    cmd.arg(&path).current_dir(repo());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.replace('\r', ""))
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[test]
fn kernel_nbd_client_in_a_vm() {
    if !is_root() {
        eprintln!("SKIP: the kernel NBD client VM test needs root (scripts/vmtest/fetch.sh installs QEMU)");
        return;
    }

    let fetch = script("fetch.sh", &[]);
    if !fetch.status.success() {
        let out = text(&fetch);
        assert!(
            !require_tools(),
            "scripts/vmtest/fetch.sh failed ({}) and BLOCKSHIP_REQUIRE_TOOLS=1:\n{out}",
            fetch.status
        );
        let tail: Vec<&str> = out.lines().rev().take(5).collect();
        eprintln!(
            "SKIP: the VM test's prerequisites could not be fetched (scripts/vmtest/fetch.sh: {}): {}",
            fetch.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initramfs.cpio.gz");
    let logs = dir.path().join("logs");
    let build = script("build-initramfs.sh", &[("OUT", initrd.as_os_str())]);
    assert!(
        build.status.success(),
        "scripts/vmtest/build-initramfs.sh failed ({}):\n{}",
        build.status,
        text(&build)
    );

    let splitter = blockship::bin("splitter");
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let run = script(
        "run.sh",
        &[
            ("SPLITTER", splitter.as_os_str()),
            ("VMTEST_INITRD", initrd.as_os_str()),
            ("VMTEST_LOGS", logs.as_os_str()),
            ("VMTEST_TIMEOUT", OsStr::new(&timeout)),
            ("VMTEST_QUIET", OsStr::new("1")),
        ],
    );
    let out = text(&run);
    assert!(
        run.status.success(),
        "scripts/vmtest/run.sh failed ({}):\n{out}\n--- guest console ---\n{}\n--- splitter log ---\n{}",
        run.status,
        read_log(&logs.join("console.log")),
        read_log(&logs.join("splitter.log"))
    );
    let console = read_log(&logs.join("console.log"));
    assert!(
        console.lines().any(|l| l == "VMTEST RESULT: PASS"),
        "run.sh passed but the console has no PASS line:\n{console}"
    );
    // Shown with --nocapture: what was checked, and how long it took.
    eprintln!("{out}");
}
