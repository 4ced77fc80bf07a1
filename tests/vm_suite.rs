//! End-to-end against the real Linux kernel: its NBD client (`/dev/nbd0`)
//! and its ublk driver (`/dev/ublkb0`). The hosts blockship is developed on
//! have neither, so this test boots a small Linux guest under QEMU
//! (software emulation) that has both, through the scripts in
//! `scripts/vmtest/`:
//!
//! 1. `fetch.sh` installs QEMU and friends and downloads the guest kernel,
//!    busybox and nbd-client (nothing to do when `scripts/test` ran it);
//! 2. `build-initramfs.sh` packs the guest with its scenarios;
//! 3. `suite.sh` runs every scenario, each reporting PASS or FAIL with the
//!    guest's log: `nbd` (the kernel NBD client against the splitter on the
//!    host: patterns, zeroing, discard, multi-conn, ext4), `ublk` (the
//!    splitter with `--ublk` in the guest shipping to an nbd-target on the
//!    host: ext4 files and fio `verify=crc32c`; the replica read from the
//!    target's NBD export equals the guest's disk file and holds the files),
//!    `ublk-recovery` (kill -9 and upgrade of the splitter under a mounted
//!    ext4, re-attached with user recovery: the file system stays mounted,
//!    every fsynced file intact, the replica converges), `nbd-restart` (the
//!    kernel NBD client, attached with `splitter nbd-attach`, across kill -9
//!    and restart of the replicating splitter on the host: ext4 stays
//!    mounted, every fsynced file intact) and `power-cut`
//!    (QEMU and the volatile write cache in front of its disk killed at
//!    random moments under a flushing load: every acknowledged write is on
//!    the disk in order, the ring lost nothing, the replica converges).
//!
//! `VMTEST_CUTS` sets the number of power cuts (this test: 5; a long run:
//! `VMTEST_CUTS=20 scripts/vmtest/suite.sh power-cut`).
//!
//! It needs root (the fetch installs packages with apt-get) and skips with a
//! SKIP line when it is not root, or when the prerequisites cannot be fetched
//! and BLOCKSHIP_REQUIRE_TOOLS is not 1. One run takes about 5 minutes.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use blockship::is_root;

/// Power cuts in one CI run.
const CUTS: &str = "5";

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

#[test]
fn kernel_nbd_client_and_ublk_in_a_vm() {
    if !is_root() {
        eprintln!("SKIP: the VM suite needs root (scripts/vmtest/fetch.sh installs QEMU)");
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
            "SKIP: the VM suite's prerequisites could not be fetched (scripts/vmtest/fetch.sh: {}): {}",
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
    let target = blockship::bin("nbd-target");
    let run = script(
        "suite.sh",
        &[
            ("SPLITTER", splitter.as_os_str()),
            ("NBD_TARGET", target.as_os_str()),
            ("VMTEST_INITRD", initrd.as_os_str()),
            ("VMTEST_LOGS", logs.as_os_str()),
            ("VMTEST_CUTS", OsStr::new(CUTS)),
            ("VMTEST_QUIET", OsStr::new("1")),
        ],
    );
    let out = text(&run);
    // suite.sh prints each failing scenario's guest console and logs.
    assert!(
        run.status.success(),
        "scripts/vmtest/suite.sh failed ({}):\n{out}",
        run.status
    );
    for s in ["nbd", "ublk", "ublk-recovery", "nbd-restart", "power-cut"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("SCENARIO {s}: PASS"))),
            "suite.sh passed without scenario {s} passing:\n{out}"
        );
    }
    // Shown with --nocapture: what was checked, and how long it took.
    eprintln!("{out}");
}
