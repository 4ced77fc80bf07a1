//! The daemon: accepts shippers on the replication port (one thread per
//! connection), serves the replicas read-only over NBD, and writes each
//! replica's live numbers to its folder every second for `status`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::registry::{Registry, LIVE_FILE};
use crate::replica::ReplicaSpec;
use crate::session::{self, SessionContext};
use crate::status;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Replication listener.
    pub listen: SocketAddr,
    /// Where replicas and their state live.
    pub data_dir: PathBuf,
    /// TLS folder (ca.pem, cert.pem, key.pem).
    pub tls_dir: PathBuf,
    /// Read-only NBD exports of the replicas (None: off).
    pub nbd_listen: Option<SocketAddr>,
    /// Disks kept on upstream NBD servers.
    pub backends: HashMap<String, ReplicaSpec>,
    /// The recovery-point journal's limits (None: no journal).
    pub journal: Option<crate::journal::JournalConfig>,
}

/// A bound, ready target.
#[derive(Debug)]
pub struct Target {
    listener: TcpListener,
    nbd: Option<blockdev::Server>,
    ctx: SessionContext,
    lock: std::fs::File,
}

impl Target {
    /// Load TLS, lock the data folder, bind both listeners.
    pub fn bind(cfg: &TargetConfig) -> Result<Target> {
        let tls = transport::TlsDir::load(&cfg.tls_dir)?.server_config()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| Error::Io {
            path: cfg.data_dir.clone(),
            what: "creating the data folder",
            source,
        })?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| Error::Io {
            path: PathBuf::from(cfg.listen.to_string()),
            what: "listening for shippers",
            source,
        })?;
        let registry = Arc::new(Registry::new(&cfg.data_dir, cfg.backends.clone()));
        for id in cfg.backends.keys() {
            registry.entry(id);
        }
        let nbd = match cfg.nbd_listen {
            Some(a) => {
                let exports = Arc::new(crate::export::ReplicaExports::new(registry.clone()));
                let scfg = blockdev::ServeConfig::new(vec![blockdev::ListenAddr::Tcp(a)]);
                Some(
                    blockdev::Server::bind(exports, &scfg).map_err(|e| Error::Io {
                        path: PathBuf::from(a.to_string()),
                        what: "listening for NBD clients of the replicas",
                        source: std::io::Error::other(e.to_string()),
                    })?,
                )
            }
            None => None,
        };
        Ok(Target {
            listener,
            nbd,
            ctx: SessionContext {
                registry,
                tls,
                stop: Arc::new(AtomicBool::new(false)),
                admission: Arc::default(),
                journal: cfg.journal,
            },
            lock,
        })
    }

    /// The replication address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The NBD export address.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd.as_ref().and_then(|l| {
            l.local_addrs().into_iter().find_map(|a| match a {
                blockdev::ListenAddr::Tcp(t) => Some(t),
                blockdev::ListenAddr::Unix(_) => None,
            })
        })
    }

    /// The stop flag (set it, e.g. from a signal handler, to stop).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.ctx.stop.clone()
    }

    /// The replicas.
    pub fn registry(&self) -> Arc<Registry> {
        self.ctx.registry.clone()
    }

    /// Serve until the stop flag is set.
    pub fn run(self) -> Result<()> {
        let _lock = self.lock;
        let stop = self.ctx.stop.clone();
        if let Some(server) = self.nbd {
            let handle = server.shutdown_handle();
            let stop2 = stop.clone();
            let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(f)
                    .map_err(|source| Error::Io {
                        path: PathBuf::from(name),
                        what: "starting a thread",
                        source,
                    })
            };
            spawn(
                "nbd-exports",
                Box::new(move || {
                    if let Err(e) = server.run() {
                        log::error!("NBD exports: {e}");
                    }
                }),
            )?;
            spawn(
                "nbd-exports-stop",
                Box::new(move || {
                    while !stop2.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    handle.shutdown();
                }),
            )?;
        }
        {
            let (reg, stop) = (self.ctx.registry.clone(), stop.clone());
            let _ = std::thread::Builder::new()
                .name("live-status".into())
                .spawn(move || live_writer(&reg, &stop));
        }
        if let Some(cfg) = self.ctx.journal {
            // Retention for disks whose shipper is away (a connected one
            // prunes after its commits).
            let (reg, stop) = (self.ctx.registry.clone(), stop.clone());
            let _ = std::thread::Builder::new()
                .name("journal-prune".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for e in reg.all() {
                            // Not while a session applies (it prunes after its
                            // commits) or a failover command holds the disk; a
                            // failed-over disk's points are the failover's:
                            // kept whole until it is rolled back or committed.
                            let lock = e.dir.join(crate::failover::APPLY_LOCK);
                            let Ok(Some(_held)) = crate::lockfile::try_lock(&lock) else {
                                continue;
                            };
                            if crate::failover::record::path(&e.dir).exists() {
                                continue;
                            }
                            let dir = crate::journal::dir_of(&e.dir);
                            if let Err(err) = crate::journal::prune::prune(&dir, &cfg, &e.id) {
                                log::warn!("disk {:?}: pruning the journal: {err}", e.id);
                            }
                        }
                        for _ in 0..50 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                });
        }
        self.listener
            .set_nonblocking(true)
            .map_err(|source| Error::Io {
                path: PathBuf::from("listener"),
                what: "configuring",
                source,
            })?;
        let mut sessions = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((s, peer)) => {
                    // Over a cap: closed here, without a thread.
                    let Some(permit) = self.ctx.admission.admit(peer) else {
                        drop(s);
                        continue;
                    };
                    log::info!("connection from {peer}");
                    let ctx = self.ctx.clone();
                    match std::thread::Builder::new()
                        .name(format!("shipper-{peer}"))
                        .spawn(move || session::serve(s, &ctx, permit))
                    {
                        Ok(h) => sessions.push(h),
                        Err(e) => log::warn!("cannot start a thread for {peer}: {e}"),
                    }
                    sessions.retain(|h| !h.is_finished());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    log::warn!("accepting a shipper: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        log::info!("stopping: finishing the sessions (each commits what it applied)");
        for h in sessions {
            let _ = h.join();
        }
        write_live(&self.ctx.registry);
        Ok(())
    }
}

fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let p = dir.join("target.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|source| Error::Io {
            path: p.clone(),
            what: "opening the lock file",
            source,
        })?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a descriptor `f` keeps open and no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Invalid(format!(
            "data folder {} is in use by another nbd-target (lock {})",
            dir.display(),
            p.display()
        )));
    }
    Ok(f)
}

fn live_writer(reg: &Registry, stop: &AtomicBool) {
    let mut last: HashMap<String, (Instant, u64)> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        for e in reg.all() {
            let mut l = e.live();
            let (t, b) = last
                .get(&e.id)
                .copied()
                .unwrap_or((Instant::now(), l.plain_bytes));
            let dt = t.elapsed().as_secs_f64();
            if dt >= 0.9 {
                l.rate = (l.plain_bytes - b.min(l.plain_bytes)) as f64 / dt;
                last.insert(e.id.clone(), (Instant::now(), l.plain_bytes));
            } else if !last.contains_key(&e.id) {
                last.insert(e.id.clone(), (t, b));
            }
        }
        write_live(reg);
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn write_live(reg: &Registry) {
    for e in reg.all() {
        if !e.dir.is_dir() {
            continue;
        }
        let v = status::live_json(&e.live());
        let tmp = e.dir.join(format!("{LIVE_FILE}.tmp"));
        if std::fs::write(&tmp, v.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, e.dir.join(LIVE_FILE));
        }
    }
}
