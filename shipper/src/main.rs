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
    /// Compare the disk with its replica while writes go on (online verify),
    /// report the extents that differ and, with --repair, resend them.
    ///
    /// The shipper that drains the ring runs the verify (in the splitter
    /// with --ship-to, or `shipper run`): this command asks it through the
    /// ring and waits. When no shipper drains the ring, give --disk,
    /// --target, --disk-id and --tls and this command ships and verifies
    /// itself until the verify ends. Exit status 0: no differences (or all
    /// repaired); 1: differences found and not repaired.
    #[command(after_help = "Examples:
  shipper verify --ring /var/lib/blockship/db.ring
  shipper verify --ring db.ring --repair --json
  shipper verify --ring db.ring --disk db.img --target 127.0.0.1:10811 --disk-id db --tls pki/shipper")]
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    /// The ring of the protected disk.
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
    /// Resend the extents that differ.
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds (default: wait for the end).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The protected disk (only when no shipper drains the ring).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// The recovery site (only when no shipper drains the ring).
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    #[command(flatten)]
    ship: ShipArgs,
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
    let a = match Cli::parse().command {
        Cmd::Run(a) => a,
        Cmd::Verify(v) => return verify(v),
    };
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
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        resync_progress_bar(sh.stats());
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

fn verify(v: VerifyArgs) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let status =
        ring::status(&v.ring).with_context(|| format!("cannot read ring {}", v.ring.display()))?;
    // Run here when no shipper drains the ring.
    let local = match ring::Consumer::open(&v.ring) {
        Ok(c) => {
            drop(c);
            true
        }
        Err(ring::Error::Busy { .. }) => false,
        Err(e) => return Err(e).with_context(|| format!("cannot use ring {}", v.ring.display())),
    };
    let id = ring::request_verify(&v.ring, v.repair)
        .with_context(|| format!("cannot ask for a verify in ring {}", v.ring.display()))?;
    let mut worker = None;
    if local {
        let (Some(disk), Some(target)) = (v.disk.clone(), v.target.clone()) else {
            anyhow::bail!(
                "no shipper drains {}: give --disk, --target, --disk-id and --tls to verify from here",
                v.ring.display()
            );
        };
        let mut cfg = v
            .ship
            .config(v.ring.clone(), target)
            .map_err(anyhow::Error::msg)?;
        cfg.disk = Some(disk);
        let sh = Shipper::new(cfg).context("cannot start a shipper for the verify")?;
        let stop = sh.stop_flag();
        worker = Some((stop, std::thread::spawn(move || sh.run())));
    }
    let started = Instant::now();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(status.disk_size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "verify {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut last_log = Instant::now();
    loop {
        let ring::VerifyStatus {
            done,
            compared_bytes: progress,
            ..
        } = ring::verify_state(&v.ring)?;
        if done >= id {
            break;
        }
        if let Some(b) = &bar {
            b.set_position(progress);
        } else if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            log::info!(
                "verify {id}: {progress} of {} bytes compared ({:.1}%)",
                status.disk_size,
                progress as f64 * 100.0 / status.disk_size.max(1) as f64
            );
        }
        if v.timeout
            .is_some_and(|t| started.elapsed() >= Duration::from_secs(t))
        {
            anyhow::bail!(
                "verify {id} did not finish within {} s",
                v.timeout.unwrap_or(0)
            );
        }
        if let Some((_, h)) = &worker {
            if h.is_finished() {
                anyhow::bail!("the shipper stopped before the verify ended (see the log above)");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some((stop, h)) = worker {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match h.join() {
            Ok(r) => r.context("the shipper failed")?,
            Err(_) => anyhow::bail!("the shipper thread panicked"),
        }
    }
    let path = shipper::verify::report_path(&v.ring);
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("cannot read the verify report {}", path.display()))?,
    )
    .with_context(|| format!("the verify report {} is not JSON", path.display()))?;
    let differing = report["differing"].as_array().cloned().unwrap_or_default();
    if v.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "verify {id}: {} bytes compared in {:.1} s, {} extents differ ({} bytes){}",
            report["compared_bytes"],
            report["seconds"].as_f64().unwrap_or(0.0),
            differing.len(),
            report["differing_bytes"],
            if v.repair && !differing.is_empty() {
                ", resent"
            } else {
                ""
            }
        );
        for e in &differing {
            println!("  differs: offset {} length {}", e["offset"], e["len"]);
        }
    }
    if !differing.is_empty() && !v.repair {
        std::process::exit(1);
    }
    Ok(())
}

/// On a terminal: a progress bar for each resync pass (full pass or dirty
/// extents) while it runs. Otherwise the shipper logs progress every 5 s.
fn resync_progress_bar(stats: Arc<shipper::Stats>) {
    let _ = std::thread::Builder::new().name("progress".into()).spawn(move || {
        let mut bar: Option<(ring::SyncPhase, indicatif::ProgressBar)> = None;
        loop {
            let p = stats.progress();
            match (&bar, p.sync_phase) {
                (Some((phase, b)), now) if *phase != now => {
                    b.finish_and_clear();
                    bar = None;
                }
                (None, now) if now.is_running() => {
                    let b = indicatif::ProgressBar::new(p.sync_total.max(1));
                    let what = match now {
                        ring::SyncPhase::FullCopy => "full pass (copy)",
                        ring::SyncPhase::FullCompare => "full pass (compare)",
                        ring::SyncPhase::DirtyExtents | ring::SyncPhase::None => "dirty extents",
                    };
                    b.set_style(
                        indicatif::ProgressStyle::with_template(&format!(
                            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
                        ))
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar = Some((now, b));
                }
                _ => {}
            }
            if let Some((_, b)) = &bar {
                b.set_length(p.sync_total.max(1));
                b.set_position(p.sync_done);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
}
