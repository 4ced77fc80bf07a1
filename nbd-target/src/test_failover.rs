//! Test failover: the disk at a recovery point as a writable NBD export,
//! while replication goes on. Reads come from the point's view (the
//! replica and the journal, never written); writes go to a copy-on-write
//! overlay (`blockdev::Overlay`, an unnamed file discarded when this
//! ends). The export is the shared NBD server's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::{Backend, ListenAddr, Overlay, ServeConfig, Server};

use crate::error::{Error, Result};
use crate::export::OneExport;
use crate::journal::Pos;
use crate::points::DiskPoints;

/// What to test-fail-over.
#[derive(Debug, Clone)]
pub struct TestFailoverConfig {
    /// The target's data folder.
    pub data_dir: PathBuf,
    /// The disk.
    pub disk_id: String,
    /// The point's name.
    pub point: String,
    /// Where to serve.
    pub listen: ListenAddr,
    /// Cap on the overlay's bytes (None: the disk's size).
    pub overlay_max: Option<u64>,
    /// Folder for the overlay file (default: the disk's folder).
    pub overlay_dir: Option<PathBuf>,
    /// The replica on an upstream NBD server (as `serve --backend` gives it).
    pub backend: Option<String>,
}

/// A running test failover.
pub struct TestFailover {
    server: Server,
    overlay: Arc<Overlay>,
    /// The point served.
    pub point: Pos,
    /// The name it was asked by.
    pub name: String,
}

impl std::fmt::Debug for TestFailover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestFailover")
            .field("point", &self.point)
            .finish()
    }
}

impl TestFailover {
    /// Resolve the point, open its view (with a lease), the overlay, and
    /// bind the NBD listener.
    pub fn start(cfg: &TestFailoverConfig) -> Result<TestFailover> {
        let dp = DiskPoints::load(&cfg.data_dir, &cfg.disk_id)?;
        let point = dp.resolve(&cfg.point)?;
        let spec = dp.replica_spec(cfg.backend.as_deref())?;
        let what = format!(
            "test failover of {}@{} (pid {})",
            cfg.disk_id,
            cfg.point,
            std::process::id()
        );
        let t0 = std::time::Instant::now();
        let view = dp.open_view(&spec, point, &what)?;
        let (ranges, entries) = view.mapped();
        log::info!(
            "disk {:?} at point {point} ({}): {ranges} range(s) from {entries} journal entries, opened in {:.0} ms",
            cfg.disk_id,
            cfg.point,
            t0.elapsed().as_secs_f64() * 1000.0
        );
        let dir = cfg.overlay_dir.clone().unwrap_or_else(|| dp.dir.clone());
        let base: Arc<dyn Backend> = Arc::new(view);
        let overlay = Arc::new(Overlay::create(base, &dir, cfg.overlay_max).map_err(|e| {
            Error::Invalid(format!("test-failover overlay in {}: {e}", dir.display()))
        })?);
        let exports = Arc::new(OneExport::new(
            overlay.clone(),
            &cfg.disk_id,
            format!(
                "blockship test failover of {} at point {} ({}); writes are discarded at the end",
                cfg.disk_id, point.seq, cfg.point
            ),
        ));
        let scfg = ServeConfig::new(vec![cfg.listen.clone()]);
        let server = Server::bind(exports, &scfg)
            .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", cfg.listen)))?;
        dp.tag_tested(point, &what)?;
        Ok(TestFailover {
            server,
            overlay,
            point,
            name: cfg.point.clone(),
        })
    }

    /// Where it listens.
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.server.local_addrs()
    }

    /// Stops `run` (from a signal too).
    pub fn shutdown_handle(&self) -> blockdev::ShutdownHandle {
        self.server.shutdown_handle()
    }

    /// Serve until shut down; the overlay is discarded then. Returns the
    /// overlay's bytes at the end.
    pub fn run(self) -> Result<u64> {
        let overlay = self.overlay;
        self.server
            .run()
            .map_err(|e| Error::Invalid(format!("test-failover server: {e}")))?;
        let used = overlay.bytes_used();
        drop(overlay);
        Ok(used)
    }
}

/// Parse `--listen`: `HOST:PORT`, or a unix socket path.
pub fn parse_listen(s: &str) -> Result<ListenAddr> {
    if s.contains('/') {
        return Ok(ListenAddr::Unix(Path::new(s).to_path_buf()));
    }
    s.parse().map(ListenAddr::Tcp).map_err(|_| {
        Error::Invalid(format!(
            "--listen {s:?}: expected HOST:PORT or a unix socket path"
        ))
    })
}
