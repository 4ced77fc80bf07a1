//! [`Shipper`]: configuration, the reconnect loop with backoff, and the
//! stop flag shared with signal handlers or the splitter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::FileDisk;
use ring::{Batch, Consumer, LinkState};
use rustls::pki_types::ServerName;

use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::stats::Stats;

/// How a shipper runs.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// The ring to drain.
    pub ring: PathBuf,
    /// The protected disk (checked against the ring's identity).
    pub disk: Option<PathBuf>,
    /// The target, HOST:PORT.
    pub target: String,
    /// The disk's id at the recovery site.
    pub disk_id: String,
    /// TLS folder (ca.pem, cert.pem, key.pem).
    pub tls_dir: PathBuf,
    /// A fixed zstd level (0: never compress); None: adaptive
    /// ([`crate::compress::policy`]).
    pub zstd_level: Option<i32>,
    /// Threads compressing batches (0: on the shipper's thread).
    pub compress_threads: usize,
    /// Most record bytes per batch.
    pub batch_bytes: usize,
    /// How long a partial batch may wait for more records while others are in flight.
    pub batch_delay: Duration,
    /// Most record bytes sent and not yet acknowledged.
    pub window_bytes: u64,
    /// Bytes per second on the wire (None: unlimited).
    pub max_rate: Option<u64>,
    /// On stop, how long to keep shipping what is already in the ring.
    pub drain_timeout: Duration,
    /// Disk bytes per resync chunk (read, hashed and sent as one).
    pub sync_chunk: u64,
}

impl ShipConfig {
    /// Defaults for everything but the four things that must be given.
    pub fn new(ring: PathBuf, target: String, disk_id: String, tls_dir: PathBuf) -> ShipConfig {
        ShipConfig {
            ring,
            disk: None,
            target,
            disk_id,
            tls_dir,
            zstd_level: None,
            compress_threads: default_compress_threads(),
            batch_bytes: 4 << 20,
            batch_delay: Duration::from_millis(2),
            window_bytes: 256 << 20,
            max_rate: None,
            drain_timeout: Duration::from_secs(10),
            sync_chunk: crate::resync::CHUNK,
        }
    }
}

/// Compression threads by default: one per core the process may use, at
/// most four (a batch stream does not feed more).
pub fn default_compress_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// A shipper attached to a ring, ready to run.
pub struct Shipper {
    pub(crate) cfg: ShipConfig,
    pub(crate) consumer: Consumer,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) pipe: Pipeline,
    pub(crate) batch: Batch,
    pub(crate) resync: Option<crate::resync::Resync>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("cfg", &self.cfg).finish()
    }
}

/// Open the protected disk for the resync and verify reads: read-only and
/// without its lock (the splitter serving it holds that).
fn open_disk(d: &Path) -> Result<FileDisk> {
    FileDisk::open_unlocked(d, true).map_err(|e| match e {
        blockdev::Error::Disk { source, .. } => {
            Error::Invalid(format!("cannot open disk {}: {source}", d.display()))
        }
        e => Error::Invalid(format!("cannot open disk {}: {e}", d.display())),
    })
}

impl Shipper {
    /// Open the ring as its consumer, check the disk, load TLS.
    pub fn new(cfg: ShipConfig) -> Result<Shipper> {
        wire::identity::validate_disk_id(&cfg.disk_id)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let host = match cfg.target.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => {
                h.trim_start_matches('[').trim_end_matches(']').to_string()
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "target {:?} is not HOST:PORT",
                    cfg.target
                )))
            }
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| Error::Invalid(format!("{host:?} is not a host name or address")))?;
        let tls = transport::TlsDir::load(&cfg.tls_dir)?.client_config()?;
        let consumer = Consumer::open(&cfg.ring)?;
        let disk = match &cfg.disk {
            Some(d) => {
                let disk = open_disk(d)?;
                let id = disk.identity().map_err(|e| {
                    Error::Invalid(format!("cannot open disk {}: {e}", d.display()))
                })?;
                consumer.check_disk(&id)?;
                Some(Arc::new(disk))
            }
            None => None,
        };
        let pipe = Pipeline::new(cfg.zstd_level, cfg.compress_threads)?;
        let resync = match disk {
            Some(disk) => Some(crate::resync::Resync::open(
                disk,
                consumer.disk_size(),
                &cfg.ring,
                ring::verify_state(&cfg.ring)?.done,
                cfg.sync_chunk,
            )?),
            None => None,
        };
        Ok(Shipper {
            cfg,
            consumer,
            tls,
            server_name,
            stats: Arc::new(Stats::default()),
            stop: Arc::new(AtomicBool::new(false)),
            pipe,
            batch: crate::batch::ring_batch(),
            resync,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Set to stop (after shipping what is in the ring, up to the drain timeout).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &ShipConfig {
        &self.cfg
    }

    /// Ship until stopped. Connection failures are retried with backoff; only
    /// a damaged ring ends the loop with an error.
    pub fn run(mut self) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        self.stats.set_state(LinkState::Connecting);
        self.consumer.publish(&self.stats.progress());
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let started = Instant::now();
            match crate::session::run(&mut self) {
                Ok(()) => break,
                Err(e @ Error::Ring(_)) => {
                    log::error!("shipping stopped: {e}");
                    self.stats.set_error(&e.to_string());
                    self.stats.set_state(LinkState::Retrying);
                    self.consumer.publish(&self.stats.progress());
                    return Err(e);
                }
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    let msg = e.to_string();
                    if first || self.stats.last_error() != msg {
                        log::warn!("{msg}; retrying in {:.1} s", backoff.as_secs_f64());
                    } else {
                        log::debug!("{msg}; retrying in {:.1} s", backoff.as_secs_f64());
                    }
                    first = false;
                    let fatal_ish = matches!(
                        &e,
                        Error::Refused {
                            code: Some(
                                wire::ErrorCode::Forbidden
                                    | wire::ErrorCode::Version
                                    | wire::ErrorCode::Mismatch
                            ),
                            ..
                        }
                    );
                    let failed_over = matches!(
                        &e,
                        Error::Refused {
                            code: Some(wire::ErrorCode::FailedOver),
                            ..
                        }
                    );
                    self.stats.set_error(&msg);
                    self.stats.set_state(LinkState::Retrying);
                    self.consumer.rewind();
                    self.consumer.publish(&self.stats.progress());
                    // Failed over: nothing is released (the ring keeps every
                    // record); retried every 5 s so that a rollback at the
                    // recovery site resumes replication promptly.
                    let until = Instant::now()
                        + if fatal_ish {
                            Duration::from_secs(30)
                        } else if failed_over {
                            Duration::from_secs(5)
                        } else {
                            backoff
                        };
                    while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.consumer.sync()?;
        self.consumer.publish(&self.stats.progress());
        Ok(())
    }
}
