//! `shipper`: the shipper as a daemon over a ring that a running splitter fills.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shipper::cli::ShipArgs;
use shipper::Shipper;

/// blockship shipper: drains a ring to a recovery site.
///
/// Reads the changes a splitter captured in its ring, compresses them (zstd),
/// and sends them over TLS 1.3 with mutual certificate authentication to an
/// nbd-target, releasing ring space only once the target has them durably.
/// The same shipper runs inside `splitter serve --ship-to`; use one or the
/// other for a ring (a ring has one consumer at a time).
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Ship until SIGINT or SIGTERM (then ship what is in the ring for up to
    /// 10 s more, and stop; the rest stays in the ring for the next run).
    #[command(after_help = "Examples:
  shipper run --ring /var/lib/blockship/db.ring --disk /dev/vdb \\
      --target dr.example.com:10811 --disk-id db --tls /etc/blockship/shipper
  shipper run --ring db.ring --disk db.img --target 127.0.0.1:10811 --disk-id db \\
      --tls pki/shipper --max-rate 10M --metrics 127.0.0.1:9101")]
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The ring to drain (made by `splitter serve --ring`).
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
    /// The protected disk; checked to be the disk the ring was made for.
    #[arg(long, value_name = "PATH")]
    disk: PathBuf,
    /// The recovery site: HOST:PORT of `nbd-target serve --listen`.
    #[arg(long, value_name = "HOST:PORT")]
    target: String,
    #[command(flatten)]
    ship: ShipArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let Cmd::Run(a) = Cli::parse().command;
    let mut cfg = a
        .ship
        .config(a.ring.clone(), a.target.clone())
        .map_err(anyhow::Error::msg)?;
    cfg.disk = Some(a.disk.clone());
    let disk_id = cfg.disk_id.clone();
    let sh = Shipper::new(cfg).with_context(|| format!("cannot ship ring {}", a.ring.display()))?;
    let stop = sh.stop_flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    if let Some(m) = a.metrics {
        let stats = sh.stats();
        metrics::serve(
            m,
            Arc::new(move || {
                let mut t = metrics::Text::new();
                stats.metrics(&disk_id, ring::wall_clock_ns(), &mut t);
                t.finish()
            }),
        )
        .with_context(|| format!("cannot serve metrics on {m}"))?;
    }
    log::info!(
        "shipping ring {} (disk {}) to {}",
        a.ring.display(),
        a.disk.display(),
        a.target
    );
    sh.run().context("the shipper stopped")?;
    log::info!("stopped cleanly");
    Ok(())
}
