//! End-to-end: a real ext4 file system on the splitter's export, through
//! `nbdfuse` + a loop device (this host has no kernel NBD client). Files are
//! checked after a remount and after a restart of the splitter, and
//! `fsck -fn` must find the file system clean.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::process::Command;

use blockship::{have_tool, is_root, make_disk, pattern, read, run, FuseLoopMount, Splitter};

#[test]
fn ext4_through_nbdfuse_and_loop() {
    if !is_root() {
        eprintln!("SKIP: mounting needs root");
        return;
    }
    if !(have_tool("nbdfuse") && have_tool("losetup") && have_tool("mkfs.ext4")) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 256 << 20);
    let mut big = vec![0u8; 5 << 20];
    pattern(&mut big, 42);

    {
        let s = Splitter::start(dir.path(), &disk, &[]);
        let mut m = FuseLoopMount::attach(dir.path(), &s.uri());
        run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(m.dev()));
        m.mount();
        std::fs::write(m.mount_dir.join("hello.txt"), b"hello from blockship\n").unwrap();
        std::fs::write(m.mount_dir.join("big.bin"), &big).unwrap();
        std::fs::create_dir(m.mount_dir.join("sub")).unwrap();
        for i in 0..50 {
            std::fs::write(
                m.mount_dir.join("sub").join(format!("f{i}")),
                format!("{i}"),
            )
            .unwrap();
        }
        run(&mut Command::new("sync"));
        m.umount();
        m.mount();
        assert_eq!(
            read(&m.mount_dir.join("hello.txt")),
            b"hello from blockship\n"
        );
        assert!(read(&m.mount_dir.join("big.bin")) == big);
        m.umount();
        run(Command::new("fsck.ext4").arg("-fn").arg(m.dev()));
    }

    // A restarted splitter serves the same file system.
    let s = Splitter::start(dir.path(), &disk, &[]);
    let mut m = FuseLoopMount::attach(dir.path(), &s.uri());
    run(Command::new("fsck.ext4").arg("-fn").arg(m.dev()));
    m.mount();
    assert!(read(&m.mount_dir.join("big.bin")) == big);
    assert_eq!(read(&m.mount_dir.join("sub/f49")), b"49");
    m.umount();
}
