//! End-to-end: the splitter serving a real block device (a loop device over a
//! file), with its size from BLKGETSIZE64, TRIM and WRITE_ZEROES through
//! fallocate on the device, and the data checked in the backing file.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::process::Command;

use blockship::{have_tool, is_root, make_disk, pattern, read, run, Splitter};

/// A loop device detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn serves_a_loop_block_device() {
    if !is_root() {
        eprintln!("SKIP: loop devices need root");
        return;
    }
    if !have_tool("losetup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    let size: u64 = 48 << 20;
    make_disk(&backing, size);
    let out = run(Command::new("losetup")
        .arg("-f")
        .arg("--show")
        .arg(&backing));
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());

    let s = Splitter::start(dir.path(), std::path::Path::new(&dev.0), &[]);
    assert!(s.log_text().contains("BlockDevice"), "{}", s.log_text());
    let mut c = s.client();
    assert_eq!(c.size(), size, "size from BLKGETSIZE64");

    let mut data = vec![0u8; 3 << 20];
    pattern(&mut data, 77);
    c.write(1 << 20, &data, false).unwrap();
    c.write(size - 512, &data[..512], true).unwrap();
    c.write_zeroes(2 << 20, 4096, true).unwrap();
    c.write_zeroes(3 << 20, 1 << 20, false).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 3 << 20];
    c.read(1 << 20, &mut back).unwrap();
    // A block device cannot tell holes: everything is data.
    let ex = c.block_status(0, 1 << 20).unwrap();
    assert_eq!(ex[0].flags, 0, "{ex:?}");
    c.trim(40 << 20, 1 << 20).unwrap();
    c.disconnect().unwrap();
    drop(s);

    let mut want = data.clone();
    want[(1 << 20)..(1 << 20) + 4096].fill(0);
    want[2 << 20..3 << 20].fill(0);
    assert!(back == want, "read back through the device differs");
    let f = read(&backing);
    assert!(f[1 << 20..4 << 20] == want[..], "backing file differs");
    assert!(f[f.len() - 512..] == data[..512]);

    if have_tool("qemu-io") {
        let s = Splitter::start(dir.path(), std::path::Path::new(&dev.0), &["--read-only"]);
        let out = run(Command::new("qemu-io")
            .args(["-f", "raw", "-r", "-c"])
            .arg(format!("read -P 0 {} 4096", 2 << 20))
            .arg(s.uri()));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    }
}
