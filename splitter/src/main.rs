//! `splitter`: serve a protected disk over NBD and capture its writes into
//! the ring; inspect and drain rings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use splitter::{Disk, ListenAddr, NoCapture, RingCapture, ServeConfig, Server, WriteCapture};

/// blockship splitter: the I/O path of a protected disk.
///
/// Serves a disk (a regular file or a block device) over the NBD protocol so
/// that any NBD client (the kernel's nbd-client, qemu, libnbd tools such as
/// nbdfuse and nbdcopy, fio) can use it as its own disk, and with --ring
/// records every change in a memory-mapped ring that the shipper drains.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve a disk over NBD until SIGINT or SIGTERM.
    ///
    /// Many clients may connect at once (the export advertises multi-conn: a
    /// flush on one connection covers writes completed on all). With --ring,
    /// each write, trim and zero is on the disk and in the ring before the
    /// client hears it succeeded, and a FLUSH (or FUA) makes both durable.
    /// On SIGINT or SIGTERM the server stops accepting, finishes in-flight
    /// requests, flushes the disk and the ring, and exits 0.
    #[command(after_help = "Examples:
  splitter serve --disk /var/lib/disks/db.img --ring /var/lib/blockship/db.ring
  splitter serve --disk /dev/vdb --socket /run/blockship/vdb.sock
  nbdinfo nbd://127.0.0.1:10809")]
    Serve(Box<ServeArgs>),
    /// Look at or drain a ring (works while the splitter runs).
    #[command(after_help = "Examples:
  splitter ring status --ring /var/lib/blockship/db.ring --json
  splitter ring dump --ring /var/lib/blockship/db.ring --from 1000 --limit 20
  splitter ring drain --ring db.ring --apply-to copy.img --exit-when-idle 500")]
    Ring {
        #[command(subcommand)]
        command: RingCmd,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The disk to serve: a regular file or a block device. It is locked
    /// while served, so two splitters never serve the same disk.
    #[arg(long, value_name = "PATH")]
    disk: PathBuf,
    /// TCP address to listen on. Default 127.0.0.1:10809 unless only
    /// --socket is given. Repeat to listen on several addresses. Exports are
    /// not encrypted: keep them on loopback or a trusted network.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Unix socket to listen on (e.g. for nbd+unix:///?socket=PATH).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Export name. Clients asking for the empty name get this export too.
    #[arg(long, value_name = "NAME", default_value = "disk")]
    export: String,
    /// Serve read-only: writes, trims and zeroes fail with EPERM.
    #[arg(long)]
    read_only: bool,
    /// Capture every change into this ring file (created when missing, and
    /// then bound to this disk). Without it nothing is captured.
    #[arg(long, value_name = "PATH")]
    ring: Option<PathBuf>,
    /// Size of the ring's record area when it is created (K, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = shipper::cli::parse_size)]
    ring_size: u64,
    /// What to do when a change does not fit in the ring: record its extent
    /// in the dirty bitmap and go on (writes never wait), or block the
    /// writer until the shipper releases room.
    #[arg(long, value_enum, default_value_t = RingFull::Bitmap)]
    ring_full: RingFull,
    /// Disk bytes per bit of the ring's dirty bitmap, when it is created.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = shipper::cli::parse_size)]
    bitmap_granularity: u64,
    /// Ship the ring to this recovery site (HOST:PORT of `nbd-target serve
    /// --listen`) from a thread of this process; needs --ring, --disk-id and
    /// --tls. Without it, run `shipper run` on the ring instead.
    #[arg(long, value_name = "HOST:PORT", requires = "ring")]
    ship_to: Option<String>,
    #[command(flatten)]
    ship: shipper::cli::ShipArgs,
    /// Serve Prometheus metrics (ring and shipper) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RingFull {
    /// Mark the dirty bitmap and keep serving (default).
    Bitmap,
    /// Make writers wait for room.
    Block,
}

#[derive(Subcommand, Debug)]
enum RingCmd {
    /// Show a ring's state: capacity, use, sequences, overflow, dirty bytes.
    Status {
        /// The ring file.
        #[arg(long, value_name = "PATH")]
        ring: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print one line per record waiting in the ring, for debugging.
    Dump {
        /// The ring file.
        #[arg(long, value_name = "PATH")]
        ring: PathBuf,
        /// Start at this sequence number.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Print at most this many records.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
    },
    /// Consume the ring: check every record and release it, optionally
    /// applying it to a copy of the disk. A stand-in for the shipper in tests
    /// and benchmarks; it holds the ring's consumer lock while it runs.
    Drain {
        /// The ring file.
        #[arg(long, value_name = "PATH")]
        ring: PathBuf,
        /// Apply every record to this file (a copy of the disk) before releasing it.
        #[arg(long, value_name = "PATH")]
        apply_to: Option<PathBuf>,
        /// Exit after this many milliseconds without new records (default: run until SIGTERM).
        #[arg(long, value_name = "MS")]
        exit_when_idle: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(a) => serve(*a),
        Cmd::Ring { command } => ring_cmd(command),
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let disk = Disk::open(&a.disk, a.read_only)
        .with_context(|| format!("cannot serve {}", a.disk.display()))?;
    let mut listen: Vec<ListenAddr> = a.listen.iter().copied().map(ListenAddr::Tcp).collect();
    if let Some(p) = &a.socket {
        listen.push(ListenAddr::Unix(p.clone()));
    }
    if listen.is_empty() {
        listen.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))));
    }
    let cfg = ServeConfig {
        export_name: a.export,
        read_only: a.read_only,
        listen,
    };
    let mut shipper = None;
    let capture: Arc<dyn WriteCapture> = match &a.ring {
        None => Arc::new(NoCapture),
        Some(path) => {
            if a.read_only {
                bail!("--ring with --read-only makes no sense: a read-only export changes nothing");
            }
            let identity = disk
                .identity()
                .with_context(|| format!("cannot identify disk {}", a.disk.display()))?;
            if a.bitmap_granularity > 1 << 20 {
                bail!(
                    "--bitmap-granularity {} is above 1M: the resync resends dirty extents in 1 MiB chunks and clears whole granules only",
                    a.bitmap_granularity
                );
            }
            let opts = ring::CreateOptions {
                capacity: a.ring_size,
                granularity: a.bitmap_granularity,
                disk_holds_data: disk.may_hold_data(),
            };
            let policy = match a.ring_full {
                RingFull::Bitmap => ring::FullPolicy::Bitmap,
                RingFull::Block => ring::FullPolicy::Block,
            };
            let (producer, _) = ring::Producer::open_or_create(path, &opts, &identity, policy)
                .with_context(|| format!("cannot use ring {}", path.display()))?;
            let st = ring::status(path)
                .with_context(|| format!("cannot read ring {}", path.display()))?;
            log::info!(
                "capturing into ring {} (disk id {}, {} records waiting, next seq {}{})",
                path.display(),
                st.disk_id,
                st.records_waiting,
                st.head_seq + 1,
                if st.needs_initial_sync {
                    "; the disk held data before the ring: a replica needs an initial copy"
                } else {
                    ""
                }
            );
            let shares_disk_device = match producer.flush_shortcut(disk.file()) {
                Ok(()) => {
                    log::info!("FLUSH: the ring's new ranges are written back, then one fdatasync of the disk makes both durable (same file system, overwritten in place)");
                    true
                }
                Err(why) => {
                    log::info!("FLUSH: fdatasync of both the disk and the ring ({why})");
                    false
                }
            };
            if let Some(target) = &a.ship_to {
                let mut cfg = a
                    .ship
                    .config(path.clone(), target.clone())
                    .map_err(anyhow::Error::msg)?;
                cfg.disk = Some(a.disk.clone());
                let sh = shipper::Shipper::new(cfg)
                    .with_context(|| format!("cannot ship ring {} to {target}", path.display()))?;
                shipper = Some(sh);
            }
            Arc::new(RingCapture::new(Arc::new(producer), shares_disk_device))
        }
    };
    let size = disk.size();
    let kind = disk.kind();
    let server = Server::bind(disk, capture, &cfg).context("cannot start the NBD server")?;
    server
        .shutdown_handle()
        .on_signals()
        .context("cannot install the SIGINT/SIGTERM handlers")?;
    let stats = shipper.as_ref().map(|s| s.stats());
    if let Some(m) = a.metrics {
        let (ring_path, disk_id) = (a.ring.clone(), a.ship.disk_id.clone().unwrap_or_default());
        metrics::serve(
            m,
            Arc::new(move || metrics_text(ring_path.as_deref(), &disk_id, stats.as_deref())),
        )
        .with_context(|| format!("cannot serve metrics on {m}"))?;
    }
    let shipping = match shipper {
        Some(sh) => {
            let stop = sh.stop_flag();
            log::info!(
                "shipping the ring to {} as disk {:?}",
                sh.config().target,
                sh.config().disk_id
            );
            let h = std::thread::Builder::new()
                .name("shipper".into())
                .spawn(move || sh.run())
                .context("cannot start the shipper thread")?;
            Some((stop, h))
        }
        None => None,
    };
    log::info!(
        "serving {} ({:?}, {} bytes{}) as export {:?}",
        a.disk.display(),
        kind,
        size,
        if cfg.read_only { ", read-only" } else { "" },
        cfg.export_name
    );
    for addr in server.local_addrs() {
        log::info!("listening on {addr}");
    }
    let served = server.run().context("the NBD server failed");
    if let Some((stop, h)) = shipping {
        log::info!("stopping the shipper (it ships what is in the ring for up to 10 s)");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("the shipper failed: {e}"),
            Err(_) => log::error!("the shipper thread panicked"),
        }
    }
    served?;
    log::info!("stopped cleanly");
    Ok(())
}

const PHASES: [&str; 4] = [
    "none",
    "full pass (copying the disk)",
    "full pass (comparing by hashes)",
    "resending dirty extents",
];

/// Rate (bytes/s) and ETA (s) of the running resync pass.
fn resync_rate(p: &ring::ShipProgress, now: u64) -> (f64, Option<f64>) {
    let secs = now.saturating_sub(p.sync_started_ns) as f64 / 1e9;
    let rate = if secs > 0.0 {
        p.sync_done as f64 / secs
    } else {
        0.0
    };
    let left = p.sync_total.saturating_sub(p.sync_done) as f64;
    (rate, (rate > 0.0).then(|| left / rate))
}

fn resync_json(p: &ring::ShipProgress, now: u64) -> serde_json::Value {
    let (rate, eta) = resync_rate(p, now);
    serde_json::json!({
        "phase": PHASES.get(usize::try_from(p.sync_phase).unwrap_or(0)).copied().unwrap_or("none"),
        "done_bytes": p.sync_done,
        "total_bytes": p.sync_total,
        "rate_bytes_per_second": rate,
        "eta_seconds": eta,
        "data_bytes_sent": p.sync_data_bytes,
    })
}

fn resync_line(p: &ring::ShipProgress, now: u64) -> Option<String> {
    if p.sync_phase == 0 {
        return None;
    }
    let (rate, eta) = resync_rate(p, now);
    let phase = PHASES
        .get(usize::try_from(p.sync_phase).unwrap_or(0))
        .copied()
        .unwrap_or("?");
    Some(format!(
        "{phase}: {:.1}% ({} of {} bytes), {:.1} MB/s, ETA {}; the replica is not crash-consistent until it ends",
        p.sync_done as f64 * 100.0 / p.sync_total.max(1) as f64,
        p.sync_done,
        p.sync_total,
        rate / 1e6,
        eta.map_or("?".into(), |e| format!("{e:.0} s"))
    ))
}

/// Prometheus text: the ring's state and, when shipping in-process, the shipper's.
fn metrics_text(
    ring_path: Option<&std::path::Path>,
    disk_id: &str,
    stats: Option<&shipper::Stats>,
) -> String {
    let mut t = metrics::Text::new();
    let now = ring::wall_clock_ns();
    if let Some(st) = ring_path.and_then(|p| ring::status(p).ok()) {
        let l = [("disk", st.disk_id.as_str())];
        t.sample(
            "blockship_ring_capacity_bytes",
            "gauge",
            "Bytes in the ring's record area.",
            &l,
            st.capacity as f64,
        );
        t.sample(
            "blockship_ring_used_bytes",
            "gauge",
            "Ring bytes holding unreleased records.",
            &l,
            st.used_bytes as f64,
        );
        t.sample(
            "blockship_ring_head_seq",
            "gauge",
            "Sequence of the newest record.",
            &l,
            st.head_seq as f64,
        );
        t.sample(
            "blockship_ring_records_waiting",
            "gauge",
            "Records not yet released by the shipper.",
            &l,
            st.records_waiting as f64,
        );
        t.sample(
            "blockship_ring_oldest_waiting_seconds",
            "gauge",
            "Age of the oldest unreleased record.",
            &l,
            st.oldest_waiting_ns
                .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e9),
        );
        t.sample(
            "blockship_ring_overflow",
            "gauge",
            "1 when changes overflowed into the dirty bitmap.",
            &l,
            f64::from(u8::from(st.overflow)),
        );
        t.sample(
            "blockship_ring_dirty_bytes",
            "gauge",
            "Disk bytes marked in the dirty bitmap.",
            &l,
            st.dirty_bytes as f64,
        );
    }
    if let Some(s) = stats {
        s.metrics(disk_id, now, &mut t);
    }
    t.finish()
}

/// Whether the ring file lives on the same file system as a file disk (then
/// one fdatasync of the disk flushes the device cache for both).
fn ring_cmd(cmd: RingCmd) -> anyhow::Result<()> {
    match cmd {
        RingCmd::Status { ring: path, json } => {
            let st = ring::status(&path)
                .with_context(|| format!("cannot read ring {}", path.display()))?;
            let now = ring::wall_clock_ns();
            let lag = st
                .oldest_waiting_ns
                .map(|t| now.saturating_sub(t) as f64 / 1e9);
            if json {
                let v = serde_json::json!({
                    "ring": path.display().to_string(),
                    "disk_id": st.disk_id,
                    "disk_path": st.disk_path,
                    "disk_size": st.disk_size,
                    "capacity": st.capacity,
                    "used_bytes": st.used_bytes,
                    "head_seq": st.head_seq,
                    "tail_seq": st.tail_seq,
                    "records_waiting": st.records_waiting,
                    "oldest_waiting_age_seconds": lag,
                    "overflow": st.overflow,
                    "overflow_since_ns": st.overflow_since_ns,
                    "dirty_bytes": st.dirty_bytes,
                    "bitmap_granularity": st.granularity,
                    "crash_dirty": st.crash_dirty,
                    "needs_initial_sync": st.needs_initial_sync,
                    "needs_verify": st.needs_verify,
                    "records_lost": st.records_lost,
                    "clean": st.clean,
                    "producer_pid": st.producer_pid,
                    "rpo_lag_seconds": lag.unwrap_or(0.0),
                    "shipper": st.shipper.as_ref().map(|sh| serde_json::json!({
                        "state": sh.progress.state.name(),
                        "acked_seq": sh.progress.acked_seq,
                        "bytes_before_compression": sh.progress.plain_bytes,
                        "bytes_on_wire": sh.progress.wire_bytes,
                        "compression_ratio": if sh.progress.wire_bytes > 0 { sh.progress.plain_bytes as f64 / sh.progress.wire_bytes as f64 } else { 1.0 },
                        "throughput_bytes_per_second": sh.progress.rate,
                        "updated_seconds_ago": now.saturating_sub(sh.updated_ns) as f64 / 1e9,
                        "pid": sh.pid,
                        "resync": resync_json(&sh.progress, now),
                    })),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("ring:             {}", path.display());
                println!(
                    "disk:             {} ({}, {} bytes)",
                    st.disk_id, st.disk_path, st.disk_size
                );
                println!(
                    "capacity:         {} bytes, {} used ({:.1}%)",
                    st.capacity,
                    st.used_bytes,
                    st.used_bytes as f64 * 100.0 / st.capacity as f64
                );
                println!(
                    "sequences:        tail {} .. head {}",
                    st.tail_seq, st.head_seq
                );
                println!("records waiting:  {}", st.records_waiting);
                println!(
                    "RPO lag:          {:.3} s (age of the oldest record not yet acknowledged)",
                    lag.unwrap_or(0.0)
                );
                if let Some(sh) = &st.shipper {
                    let p = &sh.progress;
                    println!(
                        "shipper:          {} (pid {}, updated {:.1} s ago), acknowledged up to seq {}",
                        p.state.name(),
                        sh.pid,
                        now.saturating_sub(sh.updated_ns) as f64 / 1e9,
                        p.acked_seq
                    );
                    println!(
                        "shipped:          {} bytes of records as {} bytes on the wire ({:.2}x), {:.1} MB/s",
                        p.plain_bytes,
                        p.wire_bytes,
                        if p.wire_bytes > 0 { p.plain_bytes as f64 / p.wire_bytes as f64 } else { 1.0 },
                        p.rate as f64 / 1e6
                    );
                    if let Some(line) = resync_line(p, now) {
                        println!("resync:           {line}");
                    }
                } else {
                    println!("shipper:          none has run on this ring");
                }
                println!(
                    "overflow:         {}{}",
                    if st.overflow { "yes" } else { "no" },
                    st.overflow_since_ns
                        .map(|t| format!(
                            " (since {:.0} s ago)",
                            now.saturating_sub(t) as f64 / 1e9
                        ))
                        .unwrap_or_default()
                );
                println!(
                    "dirty:            {} bytes ({} bytes per bit)",
                    st.dirty_bytes, st.granularity
                );
                let mut notes = Vec::new();
                if st.needs_initial_sync {
                    notes.push(
                        "the disk held data before the ring: a replica needs an initial copy",
                    );
                }
                if st.crash_dirty {
                    notes.push("a crash or failed write left extents in the dirty bitmap");
                }
                if st.needs_verify {
                    notes.push("changes may be missing (torn tail or reboot): verify the replica");
                }
                for n in notes {
                    println!("note:             {n}");
                }
            }
        }
        RingCmd::Dump {
            ring: path,
            from,
            limit,
        } => {
            let (entries, damage) = ring::dump(&path, from, limit)
                .with_context(|| format!("cannot read ring {}", path.display()))?;
            for e in entries {
                let mark = e.mark.map(|m| format!(" name={m:?}")).unwrap_or_default();
                println!(
                    "seq={} kind={} offset={} len={} time_ns={} at={} crc={:08x}{}",
                    e.seq,
                    e.kind.name(),
                    e.offset,
                    e.len,
                    e.time_ns,
                    e.file_offset,
                    e.payload_crc,
                    mark
                );
            }
            if let Some(d) = damage {
                bail!("{d}");
            }
        }
        RingCmd::Drain {
            ring: path,
            apply_to,
            exit_when_idle,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())
                    .context("cannot install signal handlers")?;
            }
            let opts = splitter::drain::DrainOptions {
                apply_to,
                exit_when_idle: exit_when_idle.map(Duration::from_millis),
                batch: 256,
            };
            let s = splitter::drain::drain(&path, &opts, &stop)
                .with_context(|| format!("draining ring {} failed", path.display()))?;
            log::info!(
                "drained {} records ({} payload bytes), last seq {}, {} gap(s)",
                s.records,
                s.bytes,
                s.last_seq,
                s.gaps
            );
        }
    }
    Ok(())
}
