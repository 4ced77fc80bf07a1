//! Support for blockship's end-to-end tests (the `tests/` folder of the
//! workspace root): find the real binaries, start them, wait until they
//! answer, and clean up every process, mount and loop device they made, also
//! when a test fails.
//!
//! This crate is not part of the product; it exists so the end-to-end tests
//! share one way of starting servers and one teardown.

pub mod site;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running test
/// (`target/<profile>/<name>`). Panics with what to do when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which scripts/test does)",
        p.display()
    );
    p
}

/// Whether `tool` is on PATH. When it is not, the test is skipped with a
/// clear line, unless BLOCKSHIP_REQUIRE_TOOLS=1 (as scripts/test sets), in
/// which case a missing tool fails the test.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("BLOCKSHIP_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{tool} is required (BLOCKSHIP_REQUIRE_TOOLS=1) but not installed: run scripts/test, which installs it"
        );
        eprintln!("SKIP: {tool} is not installed (scripts/test installs it)");
    }
    found
}

/// Whether the test runs as root (mounts, loop devices and FUSE need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Run a command to completion; panic with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Create a sparse disk image of `size` bytes.
pub fn make_disk(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create disk image");
    f.set_len(size).expect("size disk image");
}

/// A running `splitter serve`, killed when dropped.
pub struct Splitter {
    child: Option<Child>,
    /// The unix socket it listens on.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Splitter {
    /// Start `splitter serve --disk DISK --socket <dir>/nbd.sock` plus `extra`
    /// arguments, and wait until it completes an NBD handshake.
    pub fn start(dir: &Path, disk: &Path, extra: &[&str]) -> Splitter {
        let socket = dir.join("nbd.sock");
        let log = dir.join("splitter.log");
        let logf = std::fs::File::create(&log).expect("create log");
        let child = Command::new(bin("splitter"))
            .arg("serve")
            .arg("--disk")
            .arg(disk)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start splitter");
        let mut s = Splitter {
            child: Some(child),
            socket,
            log,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("splitter exited early with {st}; log:\n{}", self.log_text());
                }
            }
            if let Ok(s) = UnixStream::connect(&self.socket) {
                if nbd::Client::connect(s, "").is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "splitter did not answer within 20 s; log:\n{}",
            self.log_text()
        );
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// A fresh client connection to the export.
    pub fn client(&self) -> nbd::Client<UnixStream> {
        let s = UnixStream::connect(&self.socket).expect("connect to splitter");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        nbd::Client::connect(s, "").expect("NBD handshake with splitter")
    }

    /// A raw connection, before any handshake.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect to splitter");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s
    }

    /// Everything the splitter logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Send SIGTERM and wait (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("splitter already stopped");
        let pid = libc::pid_t::try_from(c.id()).expect("pid fits pid_t");
        // SAFETY: kill takes no pointers; pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "splitter did not exit within 30 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An ext4 (or any) file system mounted from an NBD export through
/// `nbdfuse` + a loop device; everything is undone on drop, in reverse order.
pub struct FuseLoopMount {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    /// The loop device (e.g. /dev/loop3).
    pub loop_dev: Option<String>,
    /// Where the file system is mounted, when it is.
    pub mount_dir: PathBuf,
    mounted: bool,
}

impl FuseLoopMount {
    /// Expose `uri` as `<dir>/fuse/nbd` with nbdfuse and attach a loop device to it.
    pub fn attach(dir: &Path, uri: &str) -> FuseLoopMount {
        let fuse_dir = dir.join("fuse");
        let mount_dir = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).expect("mkdir fuse");
        std::fs::create_dir_all(&mount_dir).expect("mkdir mnt");
        let child = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        let mut m = FuseLoopMount {
            fuse_dir,
            nbdfuse: Some(child),
            loop_dev: None,
            mount_dir,
            mounted: false,
        };
        let file = m.fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run(Command::new("losetup").arg("-f").arg("--show").arg(&file));
        m.loop_dev = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        m
    }

    /// The loop device path.
    pub fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap_or_default()
    }

    /// Mount the loop device at `mount_dir`.
    pub fn mount(&mut self) {
        run(Command::new("mount").arg(self.dev()).arg(&self.mount_dir));
        self.mounted = true;
    }

    /// Mount the loop device at `mount_dir` with mount options `opts`.
    pub fn mount_with(&mut self, opts: &str) {
        run(Command::new("mount")
            .args(["-o", opts])
            .arg(self.dev())
            .arg(&self.mount_dir));
        self.mounted = true;
    }

    /// Unmount the file system (keeps the loop device).
    pub fn umount(&mut self) {
        if self.mounted {
            run(Command::new("umount").arg(&self.mount_dir));
            self.mounted = false;
        }
    }
}

impl Drop for FuseLoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_dir)
                .status();
        }
        if let Some(d) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Read a whole file, panicking with its path on failure.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Fill `buf` with a deterministic pattern derived from `seed`.
pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[0];
    }
}

/// Run `splitter` with `args` to completion and return its output.
pub fn splitter_cmd(args: &[&str]) -> Output {
    Command::new(bin("splitter"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run splitter {args:?}: {e}"))
}

/// A small deterministic random generator for tests (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// Send SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Send SIGTERM to `pid`.
pub fn kill_term(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}
