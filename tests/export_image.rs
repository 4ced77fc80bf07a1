#![allow(clippy::unwrap_used)]
//! `nbd-target export-image` end to end: splitter (in-process shipper) →
//! TLS → nbd-target with its journal; writes, a mark, more writes; the
//! disk exported at the mark (a past point) as raw, a fixed VHD and
//! qcow2, each checked by qemu-img against a copy of the source saved at
//! the mark and against the daemon's own export of the point, and shown
//! to differ from the latest state; the VHD's footer decoded and its
//! checksum verified; bad input (an unknown point, an existing image
//! without --force, qcow2 without qemu-img) refused with a clear error
//! and nothing left behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockship::site::*;
use blockship::{bin, have_tool, run};

const MIB: u64 = 1 << 20;
const DISK: &str = "db";
/// Not a whole number of MiB: the VHD is padded to 41 MiB.
const SIZE: u64 = 40 * MIB + 192 * 1024;

/// A protected disk, and what these tests ask of it.
struct Site(Protected);

impl std::ops::Deref for Site {
    type Target = Protected;
    fn deref(&self) -> &Protected {
        &self.0
    }
}

fn site() -> Site {
    Site(Protected::start(DISK, SIZE, &[], &[]))
}

impl Site {
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    /// `nbd-target export-image ... OUT` (not checked).
    fn export(&self, point: &str, format: &str, out: &Path, extra: &[&str]) -> Output {
        self.export_cmd(point, format, out, extra).output().unwrap()
    }

    fn export_cmd(&self, point: &str, format: &str, out: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("nbd-target"));
        c.arg("export-image")
            .arg("--data-dir")
            .arg(&self.target.data_dir)
            .args(["--disk-id", DISK, "--point", point, "--format", format])
            .args(extra)
            .arg(out);
        c
    }

    fn point_uri(&self, point: &str) -> String {
        format!("nbd://{}/{DISK}@{point}", self.target.nbd_addr)
    }
}

/// `qemu-img compare -f FMT -F raw A B`: Some(true) identical, Some(false)
/// different, None an error.
fn compare(fmt: &str, a: &Path, b: &str) -> Option<bool> {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => {
            eprintln!(
                "qemu-img compare {} {b}: {}{}",
                a.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
    }
}

fn info(fmt: &str, p: &Path) -> serde_json::Value {
    let o = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(p));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn refused(o: &Output, needle: &str) {
    let t = text(o);
    assert!(!o.status.success(), "expected a failure: {t}");
    assert_eq!(o.status.code(), Some(1), "an error, not a crash: {t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(t.contains(needle), "expected {needle:?} in: {t}");
}

/// Files in `dir` named like an export's temporary files.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial"))
        .collect()
}

#[test]
fn a_past_point_exported_as_raw_vhd_and_qcow2_matches_the_source_then() {
    if !have_tool("qemu-img") {
        return;
    }
    let s = site();
    std::fs::create_dir(s.dir.path().join("out")).unwrap();
    // Data in the first 16 MiB and in 24..32 MiB; the rest stays zero.
    s.scribble(1, 150, 0, 16 * MIB);
    s.scribble(2, 50, 24 * MIB, 32 * MIB);
    s.converge();
    let then = s.dir.path().join("then.copy");
    std::fs::copy(&s.disk, &then).unwrap();
    let out = run(Command::new(bin("splitter"))
        .args(["mark", "--ring"])
        .arg(&s.ring)
        .arg("before-change"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq"));
    // More writes after the mark, also where the mark had zeroes.
    s.scribble(3, 150, 0, SIZE);
    s.converge();
    let points = run(Command::new(bin("nbd-target"))
        .args(["points", "--json", "--disk-id", DISK, "--data-dir"])
        .arg(&s.target.data_dir));
    let points: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    let mark_seq = points["marks"][0]["seq"].as_u64().unwrap();
    assert!(
        points["latest"]["seq"].as_u64().unwrap() > mark_seq,
        "{points}"
    );

    for (format, qfmt, name) in [
        ("raw", "raw", "db.img"),
        ("vhd", "vpc", "db.vhd"),
        ("qcow2", "qcow2", "db.qcow2"),
    ] {
        let img = s.out(name);
        let o = run(&mut s.export_cmd("before-change", format, &img, &["--json"]));
        let r: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        assert_eq!(r["point"]["seq"].as_u64(), Some(mark_seq), "{r}");
        assert_eq!(r["format"], format, "{r}");
        assert_eq!(r["disk_size"].as_u64(), Some(SIZE), "{r}");
        let data = r["data_bytes"].as_u64().unwrap();
        assert!(data > 0 && data <= 24 * MIB, "{r}");
        let vsize = if format == "vhd" { 41 * MIB } else { SIZE };
        assert_eq!(r["size"].as_u64(), Some(vsize), "{r}");
        assert_eq!(r["padding_bytes"].as_u64(), Some(vsize - SIZE), "{r}");
        // qemu-img reads it as that format and size ...
        let i = info(qfmt, &img);
        assert_eq!(i["format"], qfmt, "{i}");
        assert_eq!(i["virtual-size"].as_u64(), Some(vsize), "{i}");
        // ... holding the source as it was at the mark (the VHD's padding
        // is zeroes, which compare allows), as the daemon serves the point,
        // and not the latest state.
        assert_eq!(
            compare(qfmt, &img, then.to_str().unwrap()),
            Some(true),
            "{format}"
        );
        assert_eq!(
            compare(qfmt, &img, &s.point_uri("before-change")),
            Some(true),
            "{format}"
        );
        assert_eq!(
            compare(qfmt, &img, &s.point_uri("latest")),
            Some(false),
            "{format}: the past point differs from the latest"
        );
        // Sparse: the zero MiBs are holes.
        let m = std::fs::metadata(&img).unwrap();
        assert!(
            m.blocks() * 512 < 28 * MIB,
            "{format}: {} bytes allocated",
            m.blocks() * 512
        );
        if format == "vhd" {
            // Data, zero padding, then the footer, its checksum right.
            let b = std::fs::read(&img).unwrap();
            assert_eq!(b.len() as u64, vsize + 512);
            let f = nbd_target::vhd::Footer::decode(&b[b.len() - 512..]).unwrap();
            assert_eq!(f.disk_type, nbd_target::vhd::DISK_TYPE_FIXED);
            assert_eq!((f.current_size, f.original_size), (vsize, vsize));
            assert_eq!(f.geometry, nbd_target::vhd::geometry(vsize));
            let want = std::fs::read(&then).unwrap();
            let size = usize::try_from(SIZE).unwrap();
            assert!(b[..size] == want[..], "the VHD's data is the disk's");
            assert!(b[size..b.len() - 512].iter().all(|&x| x == 0));
            // The text output says it was padded.
            let o = run(&mut s.export_cmd("before-change", "vhd", &img, &["--force"]));
            let t = String::from_utf8_lossy(&o.stdout);
            assert!(t.contains("not a whole number of MiB"), "{t}");
            assert!(
                t.lines().last().unwrap().starts_with(&format!(
                    "exported disk {DISK} at point {mark_seq} (before-change) to {}: vhd, {vsize} bytes, ",
                    img.display()
                )),
                "{t}"
            );
        }
    }

    // The latest point, exported the same way, is the source now.
    let latest = s.out("latest.img");
    let o = run(&mut s.export_cmd("latest", "raw", &latest, &[]));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains(&format!("exported disk {DISK} at point ")),
        "{t}"
    );
    assert_eq!(
        compare("raw", &latest, s.disk.to_str().unwrap()),
        Some(true)
    );
    assert_eq!(
        compare("raw", &latest, s.out("db.img").to_str().unwrap()),
        Some(false)
    );

    // Bad input: an unknown point; nothing is written.
    let none = s.out("none.img");
    refused(
        &s.export("no-such-mark", "raw", &none, &[]),
        "no mark of that name",
    );
    assert!(!none.exists());
    // An existing image is kept without --force ...
    let before = std::fs::read(s.out("db.img")).unwrap();
    let o = s.export("latest", "raw", &s.out("db.img"), &[]);
    refused(&o, "exists");
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert!(std::fs::read(s.out("db.img")).unwrap() == before);
    // ... and replaced with it.
    run(&mut s.export_cmd("latest", "raw", &s.out("db.img"), &["--force"]));
    assert_eq!(
        compare("raw", &s.out("db.img"), s.disk.to_str().unwrap()),
        Some(true)
    );
    // qcow2 without qemu-img: what to install.
    let empty = s.dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let o = s
        .export_cmd("before-change", "qcow2", &s.out("no-qemu.qcow2"), &[])
        .env("PATH", &empty)
        .output()
        .unwrap();
    refused(&o, "install qemu-utils");
    // A format that does not exist: clap's usage error.
    let o = s.export("latest", "vmdk", &s.out("x.vmdk"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("possible values"), "{}", text(&o));
    assert_eq!(
        leftovers(&s.dir.path().join("out")),
        Vec::<String>::new(),
        "temporary files left"
    );
    // Every lease the exports took was released.
    let st = s.target.disk_status(DISK).unwrap();
    let leases = st["journal"]["open_point_exports_detail"]
        .as_array()
        .unwrap();
    assert!(
        !leases
            .iter()
            .any(|l| l["what"].as_str().unwrap_or("").contains("export-image")),
        "{st}"
    );
}
