//! The client against a real upstream server: nbdkit's `memory` and `file`
//! plugins (as the recovery site will use it for NBD-backed replicas).

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd::protocol::{STATE_HOLE, STATE_ZERO};
use nbd::Client;

struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit(sock: &Path, args: &[&str]) -> Option<Nbdkit> {
    let found = Command::new("sh")
        .args(["-c", "command -v nbdkit"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("BLOCKSHIP_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "nbdkit is required but not installed: run scripts/test"
        );
        eprintln!("SKIP: nbdkit is not installed");
        return None;
    }
    let child = Command::new("nbdkit")
        .arg("--foreground")
        .arg("--exit-with-parent")
        .arg("-U")
        .arg(sock)
        .args(args)
        .spawn()
        .expect("start nbdkit");
    let k = Nbdkit(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(k)
}

fn connect(sock: &Path) -> Client<UnixStream> {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Client::connect(s, "").unwrap()
}

#[test]
fn client_against_nbdkit_memory() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let Some(_k) = nbdkit(&sock, &["memory", "16M"]) else {
        return;
    };
    let mut c = connect(&sock);
    assert_eq!(c.size(), 16 << 20);
    assert!(c.structured_replies());
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i % 251).to_le_bytes()[0])
        .collect();
    c.write(12345, &data, true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(12345, &mut back).unwrap();
    assert_eq!(back, data);

    c.write_zeroes(12345, 1000, false).unwrap();
    let mut z = vec![1u8; 1000];
    c.read(12345, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));

    c.trim(8 << 20, 1 << 20).unwrap();
    let ex = c.block_status(8 << 20, 1 << 20).unwrap();
    assert!(!ex.is_empty());
    assert_eq!(ex[0].flags, STATE_HOLE | STATE_ZERO, "{ex:?}");

    // nbdkit refuses a read past the end with EINVAL.
    let mut b = [0u8; 16];
    let err = c.read((16 << 20) - 8, &mut b).unwrap_err();
    assert!(
        matches!(
            err,
            nbd::Error::Request {
                errno: nbd::Errno::Inval,
                ..
            }
        ),
        "{err}"
    );
    // The connection is still usable after an error.
    c.read(0, &mut b).unwrap();
    c.disconnect().unwrap();

    let names = nbd::client::list_exports(UnixStream::connect(&sock).unwrap()).unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn client_against_nbdkit_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let Some(_k) = nbdkit(&sock, &["file", img.to_str().unwrap()]) else {
        return;
    };
    let mut c = connect(&sock);
    assert_eq!(c.size(), 1 << 20);
    c.write(1000, b"blockship", false).unwrap();
    c.flush().unwrap();
    drop(c);
    let f = std::fs::read(&img).unwrap();
    assert_eq!(&f[1000..1009], b"blockship");
    assert_eq!(f[999], 0x5a);
}
