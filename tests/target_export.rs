//! The recovery site's exports through the shared NBD server, driven by
//! the same real clients as the splitter's: nbdinfo, qemu-io, nbdcopy,
//! fio's nbd engine (verify), and nbdfuse + a loop device + ext4 mounted
//! read-only. The replicas are registered with `nbd-target seed`.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::path::Path;
use std::process::Command;

use blockship::site::{Pki, Target};
use blockship::{bin, have_tool, is_root, read, run, FuseLoopMount};

const MIB: u64 = 1 << 20;

fn seed(data_dir: &Path, id: &str, image: &Path) {
    run(Command::new(bin("nbd-target"))
        .args(["seed", "--data-dir"])
        .arg(data_dir)
        .args(["--disk-id", id, "--from"])
        .arg(image));
}

fn fio_job(dir: &Path, target: &[&str], verify_only: bool) -> String {
    let mut c = Command::new("fio");
    c.current_dir(dir)
        .arg("--name=pattern")
        .args(target)
        .args(["--size=32M", "--rw=write", "--bs=64k", "--verify=crc32c"])
        .arg("--verify_fatal=1");
    if verify_only {
        c.arg("--verify_only=1");
    } else {
        c.arg("--do_verify=0");
    }
    String::from_utf8_lossy(&run(&mut c).stdout).into_owned()
}

#[test]
fn the_replica_export_serves_real_clients_read_only() {
    for t in [
        "nbdinfo",
        "nbdcopy",
        "qemu-io",
        "fio",
        "mkfs.ext4",
        "nbdfuse",
    ] {
        if !have_tool(t) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::init(&d.join("pki"));
    let data_dir = d.join("dr");
    // A raw image written by fio with verify headers, and an ext4 image
    // holding files.
    let raw = d.join("raw.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let fio_file = format!("--filename={}", raw.display());
    fio_job(d, &["--ioengine=psync", &fio_file], false);
    let files = d.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut content = vec![0u8; 3 << 20];
    blockship::pattern(&mut content, 99);
    std::fs::write(files.join("data.bin"), &content).unwrap();
    let fs = d.join("fs.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(&fs)
        .arg("64M"));
    seed(&data_dir, "raw", &raw);
    seed(&data_dir, "fs", &fs);
    let t = Target::start(d, &pki.target_tls(), &[]);
    let uri = |id: &str| format!("nbd://{}/{id}", t.nbd_addr);

    // nbdinfo: both exports listed, sizes, read-only, multi-conn.
    let list = run(Command::new("nbdinfo").arg("--list").arg(uri("raw")));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("raw") && text.contains("fs"), "{text}");
    let info = run(Command::new("nbdinfo").arg("--json").arg(uri("raw")));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(32 * MIB), "{v}");
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{v}");
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true), "{v}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(64 * MIB), "{v}");

    // nbdcopy (multi-connection, pipelined) gets the image back exactly.
    let back = d.join("back.img");
    run(Command::new("nbdcopy").arg(uri("raw")).arg(&back));
    assert!(
        read(&back) == read(&raw),
        "nbdcopy out differs from the seeded image"
    );

    // fio's nbd engine verifies every block written by the first job.
    let fio_uri = format!("--uri={}", uri("raw"));
    let out = fio_job(d, &["--ioengine=nbd", &fio_uri], true);
    assert!(
        !out.contains("verify: bad") && !out.contains("bad magic"),
        "{out}"
    );

    // qemu-io reads a pattern-checked range and cannot write.
    let q = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 1M", "-c", "read 31M 1M"])
        .arg(uri("raw")));
    assert!(String::from_utf8_lossy(&q.stdout).contains("read 1048576/1048576"));
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(uri("raw"))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !all.contains("wrote 4096/4096"),
        "a write to the replica succeeded: {all}"
    );
    assert!(read(&t.replica("raw")) == read(&raw), "the replica changed");

    // ext4 through nbdfuse + a loop device, mounted read-only.
    if is_root() {
        let mut m = FuseLoopMount::attach(d, &uri("fs"));
        m.mount_with("ro,noload");
        let got = std::fs::read(m.mount_dir.join("data.bin")).unwrap();
        assert!(
            got == content,
            "the file read from the mounted replica differs"
        );
        m.umount();
    }
}
