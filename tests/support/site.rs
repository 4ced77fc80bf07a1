//! Helpers for replication tests: a PKI, an `nbd-target` process, a
//! `shipper run` process, waiting for convergence, comparing images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin;

/// A background process killed (SIGKILL) when dropped, logging to a file.
pub struct Proc {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Start `bin(name) args...`, stderr to `log` (appended).
    pub fn spawn(name: &str, args: &[String], log: &Path) -> Proc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let child = Command::new(bin(name))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("BS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (up to 30 s, then SIGKILL); true when it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        crate::kill_term(c.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{} did not stop within 30 s of SIGTERM; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the log contains `needle` (panics after `secs`).
    pub fn wait_log(&mut self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.log_text();
            if t.contains(needle) {
                return t;
            }
            if !self.alive() {
                panic!("{} exited before logging {needle:?}; log:\n{t}", self.name);
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not log {needle:?} within {secs} s; log:\n{t}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A certificate authority with the target's folder and shipper folders.
pub struct Pki {
    /// The CA folder (`target/` inside).
    pub dir: PathBuf,
}

impl Pki {
    /// `nbd-target pki init` in `dir`.
    pub fn init(dir: &Path) -> Pki {
        crate::run(
            Command::new(bin("nbd-target"))
                .args(["pki", "init", "--dir"])
                .arg(dir),
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// The target's TLS folder.
    pub fn target_tls(&self) -> PathBuf {
        self.dir.join("target")
    }

    /// Issue a shipper folder `out` for `disks`, valid `days`.
    pub fn issue(&self, name: &str, disks: &[&str], out: &Path, days: u32) -> PathBuf {
        let mut c = Command::new(bin("nbd-target"));
        c.args(["pki", "issue", "--dir"])
            .arg(&self.dir)
            .args(["--name", name]);
        for d in disks {
            c.args(["--disk", d]);
        }
        c.arg("--out").arg(out).args(["--days", &days.to_string()]);
        crate::run(&mut c);
        out.to_path_buf()
    }
}

/// A running `nbd-target serve`.
pub struct Target {
    /// The process.
    pub proc: Proc,
    /// Replication address.
    pub addr: String,
    /// NBD export address.
    pub nbd_addr: String,
    /// Data folder.
    pub data_dir: PathBuf,
    tls: PathBuf,
    extra: Vec<String>,
}

fn logged_addr(log: &str, prefix: &str) -> String {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in log:\n{log}"));
    let rest = &line[line.find(prefix).unwrap_or(0) + prefix.len()..];
    rest.split_whitespace().next().unwrap_or("").to_string()
}

impl Target {
    /// Start a target on ephemeral ports.
    pub fn start(dir: &Path, tls: &Path, extra: &[&str]) -> Target {
        let data_dir = dir.join("dr");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Target::launch(dir, &data_dir, tls, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    fn launch(
        dir: &Path,
        data_dir: &Path,
        tls: &Path,
        listen: &str,
        nbd: &str,
        extra: Vec<String>,
    ) -> Target {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--tls".into(),
            tls.display().to_string(),
            "--nbd-listen".into(),
            nbd.into(),
        ];
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn("nbd-target", &args, &dir.join("target.log"));
        let log = proc.wait_log("data folder", 20);
        let addr = logged_addr(&log, "accepting shippers on ");
        let nbd_addr = logged_addr(&log, "read-only over NBD on ");
        Target {
            proc,
            addr,
            nbd_addr,
            data_dir: data_dir.to_path_buf(),
            tls: tls.to_path_buf(),
            extra,
        }
    }

    /// Start again on the same addresses (after a kill).
    pub fn restart(&mut self) {
        let dir = self
            .proc
            .log
            .parent()
            .expect("log in a folder")
            .to_path_buf();
        self.proc.kill9();
        let t = Target::launch(
            &dir,
            &self.data_dir,
            &self.tls,
            &self.addr.clone(),
            &self.nbd_addr.clone(),
            self.extra.clone(),
        );
        *self = t;
    }

    /// The replica file of `disk_id`.
    pub fn replica(&self, disk_id: &str) -> PathBuf {
        self.data_dir.join(disk_id).join("replica.img")
    }

    /// `nbd-target status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = crate::run(
            Command::new(bin("nbd-target"))
                .arg("status")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--json"),
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The status entry of `disk_id`, if any.
    pub fn disk_status(&self, disk_id: &str) -> Option<serde_json::Value> {
        self.status()["disks"]
            .as_array()?
            .iter()
            .find(|d| d["disk_id"] == disk_id)
            .cloned()
    }
}

/// `splitter ring status --json` of `ring`.
pub fn ring_status(ring: &Path) -> serde_json::Value {
    let out = crate::run(
        Command::new(bin("splitter"))
            .args(["ring", "status", "--json", "--ring"])
            .arg(ring),
    );
    serde_json::from_slice(&out.stdout).expect("ring status JSON")
}

/// Wait until the target has applied everything the ring holds (the ring's
/// head sequence), or panic after `secs` with both sides' state.
pub fn wait_converged(ring: &Path, target: &Target, disk_id: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let rs = ring_status(ring);
        let head = rs["head_seq"].as_u64().unwrap_or(0);
        let applied = target
            .disk_status(disk_id)
            .and_then(|d| d["applied_seq"].as_u64())
            .unwrap_or(0);
        if applied >= head && rs["records_waiting"].as_u64() == Some(0) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "no convergence within {secs} s: ring head {head}, applied {applied}\nring: {rs}\ntarget log:\n{}",
                target.proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Panic unless files `a` and `b` hold the same bytes; names the first difference.
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (crate::read(a), crate::read(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} (block {})",
            a.display(),
            b.display(),
            i / 4096
        );
    }
}

/// Arguments for `shipper run`.
pub fn shipper_args(
    ring: &Path,
    disk: &Path,
    target: &str,
    disk_id: &str,
    tls: &Path,
) -> Vec<String> {
    vec![
        "run".into(),
        "--ring".into(),
        ring.display().to_string(),
        "--disk".into(),
        disk.display().to_string(),
        "--target".into(),
        target.into(),
        "--disk-id".into(),
        disk_id.into(),
        "--tls".into(),
        tls.display().to_string(),
    ]
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A protected disk: a disk file served by `splitter serve --ring
/// --ship-to` (the shipper in its process) toward a running `nbd-target
/// serve`, each with its PKI, in one temporary folder.
pub struct Protected {
    /// The folder (everything is in it).
    pub dir: tempfile::TempDir,
    /// The disk id.
    pub disk_id: String,
    /// The disk file.
    pub disk: PathBuf,
    /// The ring.
    pub ring: PathBuf,
    /// The shipper's TLS folder.
    pub shp: PathBuf,
    /// The recovery site.
    pub target: Target,
    /// The splitter, while it runs.
    pub splitter: Option<crate::Splitter>,
}

impl Protected {
    /// A fresh disk of `size` bytes protected as `disk_id`; `target_extra`
    /// and `ring_extra` go to `nbd-target serve` and `splitter serve`.
    pub fn start(
        disk_id: &str,
        size: u64,
        target_extra: &[&str],
        ring_extra: &[&str],
    ) -> Protected {
        let dir = tempfile::tempdir().expect("temporary folder");
        let disk = dir.path().join("disk.img");
        let ring = dir.path().join("disk.ring");
        crate::make_disk(&disk, size);
        let pki = Pki::init(&dir.path().join("pki"));
        let shp = pki.issue("source-1", &[disk_id], &dir.path().join("shp"), 30);
        let target = Target::start(dir.path(), &pki.target_tls(), target_extra);
        let mut s = Protected {
            dir,
            disk_id: disk_id.to_string(),
            disk,
            ring,
            shp,
            target,
            splitter: None,
        };
        s.start_splitter(ring_extra);
        s
    }

    /// (Re)start the splitter, shipping to the target.
    pub fn start_splitter(&mut self, ring_extra: &[&str]) {
        let mut a: Vec<String> = vec![
            "--ring".into(),
            self.ring.display().to_string(),
            "--ship-to".into(),
            self.target.addr.clone(),
            "--disk-id".into(),
            self.disk_id.clone(),
            "--tls".into(),
            self.shp.display().to_string(),
        ];
        a.extend(ring_extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.splitter = Some(crate::Splitter::start(self.dir.path(), &self.disk, &a));
    }

    /// The running splitter.
    pub fn sp(&self) -> &crate::Splitter {
        self.splitter.as_ref().expect("the splitter runs")
    }

    /// Wait until the target has applied everything the ring holds.
    pub fn converge(&self) {
        wait_converged(&self.ring, &self.target, &self.disk_id, 120);
    }

    /// Random 4-64 KiB writes in `lo..hi` through the splitter, flushed.
    pub fn scribble(&self, seed: u64, n: usize, lo: u64, hi: u64) {
        let mut c = self.sp().client();
        let mut rng = crate::Rng::new(seed);
        for i in 0..n {
            let len = rng.range(1, 17) * 4096;
            let off = rng.range(lo / 4096, (hi - len) / 4096) * 4096;
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(4096)];
            crate::pattern(&mut buf, seed * 1000 + i as u64);
            c.write(off, &buf, false)
                .expect("write through the splitter");
        }
        c.flush().expect("flush through the splitter");
    }

    /// `nbdcopy URI` to a file in the folder.
    pub fn copy_of(&self, uri: &str, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.nbd"));
        let _ = std::fs::remove_file(&p);
        crate::run(Command::new("nbdcopy").arg(uri).arg(&p));
        p
    }
}
