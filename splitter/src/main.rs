//! `splitter`: serve a protected disk over NBD and capture its writes into
//! the ring; inspect and drain rings; mark recovery points.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use splitter::control::GatedCapture;
use splitter::{
    FileDisk, ListenAddr, NoCapture, RingCapture, ServeConfig, Server, SingleExport, WriteCapture,
};

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
    /// Serve a disk over NBD, or as /dev/ublkbN with --ublk, until SIGINT or
    /// SIGTERM.
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
  nbdinfo nbd://127.0.0.1:10809
  # a kernel block device (modprobe ublk_drv): /dev/ublkb0
  splitter serve --disk /var/lib/disks/db.img --ring /var/lib/blockship/db.ring --ublk --ublk-id 0
  # after a crash, or to upgrade the running one: the device never goes away
  splitter serve --disk /var/lib/disks/db.img --ring /var/lib/blockship/db.ring --ublk --recover 0")]
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
    /// Put a named point (a recovery point) in a ring: crash-consistent, or
    /// application-consistent with --freeze / --pre / --post.
    ///
    /// Appends a MARK record to the ring: every change captured before it
    /// has a lower sequence number, so the replica at that sequence is the
    /// disk as it was at the mark. The mark is durable (synced like an
    /// acknowledged FLUSH) before the command prints
    /// `mark "NAME" at seq 1234 (crash-consistent)` and exits 0.
    ///
    /// Who appends it: the `splitter serve` that owns the ring, asked over
    /// its control socket RING.ctl (a unix socket next to the ring, made by
    /// `splitter serve --ring RING` and removed when it stops; one request
    /// line `mark crash|app NAME`, one reply line). When no process owns the
    /// ring, this command opens the ring itself, appends, syncs and closes
    /// it. A ring owned by a process that does not answer on RING.ctl is an
    /// error that says what to do; so is a full (overflowed) ring.
    ///
    /// A plain mark is crash-consistent: the disk as a power cut at that
    /// moment would have left it. --freeze MOUNTPOINT makes it
    /// application-consistent (kind "app", bit 0 of the record's offset
    /// field): `fsfreeze -f MOUNTPOINT` (the file system flushes and holds
    /// every writer), the mark, `fsfreeze -u MOUNTPOINT`; the time the file
    /// system was frozen is reported. The thaw always happens: when the mark
    /// fails, on SIGINT or SIGTERM (it runs before the command exits, within
    /// about 2 s), and at the latest after --freeze-timeout, when the
    /// command fails without a mark.
    ///
    /// Hooks (also application-consistent): --pre CMD runs with `sh -c`
    /// before freezing; if it fails, nothing is frozen, no mark is taken and
    /// the command exits 1. --post CMD runs after thawing whenever --pre (if
    /// any) succeeded, also when the mark failed. Both see
    /// BLOCKSHIP_MARK_NAME and BLOCKSHIP_MARK_RING; --post also
    /// BLOCKSHIP_MARK_RESULT (ok or failed) and BLOCKSHIP_MARK_SEQ. Their
    /// output goes to stderr. A failing --post fails the command, after the
    /// mark it did record has been printed.
    #[command(after_help = "Examples:
  # a crash-consistent point
  splitter mark --ring /var/lib/blockship/db.ring nightly-2026-05-01
  # application-consistent: /srv/db frozen while the mark is appended
  splitter mark --ring /var/lib/blockship/db.ring --freeze /srv/db before-upgrade
  # with hooks around the freeze, JSON output for scripts
  splitter mark --ring db.ring --freeze /srv/db --freeze-timeout 5s \\
      --pre 'psql -c \"CHECKPOINT\"' --post 'logger mark done' --json pre-migration
  # names that start with '-' follow --
  splitter mark --ring db.ring -- -odd-name")]
    Mark(MarkArgs),
    /// Attach the kernel's NBD client (/dev/nbdN) to an NBD server and keep
    /// it attached across restarts of the server (the splitter's upgrade or
    /// crash), in the foreground until SIGINT/SIGTERM.
    ///
    /// Configures the device over the kernel's netlink interface (as
    /// nbd-client does) with a dead-connection timeout: while no connection
    /// is alive, requests wait up to --dead-conn-timeout seconds instead of
    /// failing, and a request a dead connection never answered is sent again
    /// after --timeout. When the kernel reports a connection dead, this
    /// connects again and hands the new socket over (NBD_CMD_RECONFIGURE), so
    /// a file system on the device stays mounted. Debian 12's nbd-client
    /// 3.24 sets no dead-connection timeout and does not reconnect: there, a
    /// restart of the splitter fails the requests in flight.
    ///
    /// Stopping this command leaves the device attached (it no longer
    /// reconnects); --detach disconnects it.
    #[command(after_help = "Examples:
  modprobe nbd
  splitter nbd-attach --device /dev/nbd0 --connect 127.0.0.1:10809 --export disk &
  mount /dev/nbd0 /mnt
  splitter nbd-attach --device /dev/nbd0 --detach")]
    NbdAttach(NbdAttachArgs),
}

#[derive(clap::Args, Debug)]
struct NbdAttachArgs {
    /// The device: /dev/nbdN.
    #[arg(long, value_name = "DEV")]
    device: PathBuf,
    /// HOST:PORT of the NBD server (the splitter's --listen).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "detach")]
    connect: Option<String>,
    /// The export name.
    #[arg(long, value_name = "NAME", default_value = "disk")]
    export: String,
    /// Connections (more than one needs an export with multi-conn).
    #[arg(long, value_name = "N", default_value_t = 1)]
    connections: u32,
    /// Seconds before a request without an answer is sent again (its
    /// connection is then declared dead).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Seconds requests wait for a live connection before they fail.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    dead_conn_timeout: u64,
    /// Disconnect the device instead (NBD_CMD_DISCONNECT) and exit.
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args, Debug)]
struct MarkArgs {
    /// The ring file to mark (the `--ring` of `splitter serve`).
    #[arg(long, value_name = "PATH")]
    ring: PathBuf,
    /// The mark's name: 1 to 4096 bytes of UTF-8, no control characters.
    #[arg(value_name = "NAME")]
    name: String,
    /// Print {"name":..,"seq":..,"kind":"crash"|"app","time_ns":..,"frozen_ms":..}
    /// (frozen_ms is null without --freeze).
    #[arg(long)]
    json: bool,
    /// Freeze the file system mounted here (`fsfreeze -f`) while the mark
    /// is appended, then thaw it: an application-consistent mark. The ring
    /// must not be on that file system.
    #[arg(long, value_name = "MOUNTPOINT")]
    freeze: Option<PathBuf>,
    /// Longest time the file system stays frozen (ms, s or m suffix): the
    /// thaw comes then at the latest and the command fails without a mark.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = splitter::mark::parse_duration)]
    freeze_timeout: Duration,
    /// Run this with `sh -c` first (before freezing); if it fails, nothing
    /// is frozen and no mark is taken. Makes the mark application-consistent.
    #[arg(long, value_name = "CMD")]
    pre: Option<String>,
    /// Run this with `sh -c` last (after thawing), whenever --pre (if
    /// given) succeeded, also when the mark failed. Makes the mark
    /// application-consistent.
    #[arg(long, value_name = "CMD")]
    post: Option<String>,
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
    /// Serve the disk as the kernel block device /dev/ublkbN (ublk, Linux
    /// 6.0+, `modprobe ublk_drv`) instead of over NBD. Every write, discard
    /// and write-zeroes is captured exactly as over NBD; FLUSH and FUA make
    /// the disk and the ring durable. SIGINT/SIGTERM remove the device
    /// cleanly. The device is made with user recovery: if this process dies,
    /// /dev/ublkbN stays, its I/O waits, and `--recover N` re-attaches.
    #[arg(long)]
    ublk: bool,
    /// With --ublk: the device number N of /dev/ublkbN (default: the kernel
    /// picks). If device N exists and is quiesced (its splitter died), it is
    /// recovered.
    #[arg(long, value_name = "N", requires = "ublk")]
    ublk_id: Option<u32>,
    /// With --ublk: re-attach to existing device N (user recovery) without
    /// it going away. If a splitter still serves it (an upgrade), that one
    /// is asked to hand it over (SIGUSR2): it answers what it has, makes the
    /// ring durable and exits; I/O issued meanwhile waits and then completes.
    #[arg(long, value_name = "N", requires = "ublk")]
    recover: Option<u32>,
    /// With --ublk: hardware queues, one thread each.
    #[arg(long, value_name = "Q", default_value_t = 1, requires = "ublk")]
    queues: u16,
    /// With --ublk: requests in flight per queue (1 to 128).
    #[arg(long, value_name = "DEPTH", default_value_t = blockdev::ublk::DEFAULT_DEPTH, requires = "ublk")]
    depth: u16,
}

/// The front end that serves the disk.
enum Front {
    /// The NBD server.
    Nbd(Server),
    /// /dev/ublkbN.
    Ublk(blockdev::ublk::Plan, Arc<FileDisk>, Arc<dyn WriteCapture>),
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
        Cmd::Mark(a) => mark(a),
        Cmd::NbdAttach(a) => nbd_attach(a),
    }
}

fn nbd_attach(a: NbdAttachArgs) -> anyhow::Result<()> {
    use splitter::nbd_attach;
    let index = nbd_attach::device_index(&a.device)?;
    if a.detach {
        nbd_attach::detach(index)?;
        log::info!("disconnected {}", a.device.display());
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let opts = nbd_attach::AttachOptions {
        index,
        server: a.connect.unwrap_or_default(),
        export: a.export,
        connections: a.connections,
        timeout: a.timeout,
        dead_conn_timeout: a.dead_conn_timeout,
    };
    nbd_attach::attach(&opts, &stop)?;
    Ok(())
}

fn mark(a: MarkArgs) -> anyhow::Result<()> {
    let opts = splitter::mark::MarkOptions {
        ring: a.ring,
        name: a.name,
        freeze: a.freeze,
        freeze_timeout: a.freeze_timeout,
        pre: a.pre,
        post: a.post,
    };
    let stop = Arc::new(AtomicBool::new(false));
    if opts.app() {
        // While hooks run or a file system is frozen, SIGINT and SIGTERM
        // only set the flag: the thaw (and --post) run before the exit.
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone())
                .context("cannot install signal handlers")?;
        }
    }
    let print = |r: &splitter::mark::MarkReport| -> anyhow::Result<()> {
        if a.json {
            println!("{}", serde_json::to_string(&r.json())?);
        } else {
            println!("{}", r.text());
        }
        Ok(())
    };
    match splitter::mark::take(&opts, &stop) {
        Ok(r) => print(&r),
        Err(f) => {
            if let Some(r) = &f.recorded {
                print(r)?;
            }
            Err(anyhow::Error::new(f))
        }
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    // ublk: decided first, because recovering a live device means waiting
    // for the splitter that serves it to let go of the disk and the ring.
    let ublk = if a.ublk {
        if !a.listen.is_empty() || a.socket.is_some() {
            bail!("--ublk with --listen/--socket: one splitter serves a disk through one front end. NBD clients beside /dev/ublkbN would bypass the kernel's page cache of it (stale reads, and a file system mounted on it would be corrupted): use /dev/ublkbN only, or serve over NBD only");
        }
        let opts = blockdev::ublk::UblkOptions {
            id: a.ublk_id,
            recover: a.recover,
            queues: a.queues,
            depth: a.depth,
            io_buf_bytes: blockdev::ublk::DEFAULT_IO_BUF_BYTES,
            disk_path: a.disk.clone(),
            ring_path: a.ring.clone(),
        };
        Some(blockdev::ublk::prepare(opts).context("cannot serve the disk with ublk")?)
    } else {
        None
    };
    let disk = FileDisk::open(&a.disk, a.read_only)
        .with_context(|| format!("cannot serve {}", a.disk.display()))?;
    let mut listen: Vec<ListenAddr> = a.listen.iter().copied().map(ListenAddr::Tcp).collect();
    if let Some(p) = &a.socket {
        listen.push(ListenAddr::Unix(p.clone()));
    }
    if listen.is_empty() {
        listen.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))));
    }
    let cfg = ServeConfig::new(listen);
    let mut shipper = None;
    // Dropped (socket removed) when serve returns, also on an error.
    let mut control = None;
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
            let marked = splitter::identity::before_ring(&a.disk, path)
                .with_context(|| format!("cannot use ring {}", path.display()))?;
            let (producer, _) = ring::Producer::open_or_create(path, &opts, &identity, policy)
                .with_context(|| format!("cannot use ring {}", path.display()))?;
            splitter::identity::after_ring(
                &a.disk,
                path,
                producer.disk_id(),
                a.ship.disk_id.as_deref(),
                marked,
            )
            .context("cannot record the disk's identity")?;
            let producer = Arc::new(producer);
            let marker = Arc::new(splitter::mark::Marker::new(producer.clone()));
            match splitter::control::ControlServer::start(path, marker.clone()) {
                Ok(c) => {
                    log::info!(
                        "marks: `splitter mark --ring {}` (control socket {})",
                        path.display(),
                        c.path().display()
                    );
                    control = Some(c);
                }
                Err(e) => log::error!(
                    "{e}: `splitter mark` cannot reach this splitter (the ring is captured all the same)"
                ),
            }
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
            Arc::new(GatedCapture::new(
                RingCapture::new(producer, shares_disk_device),
                marker,
            ))
        }
    };
    let size = disk.size();
    let kind = disk.kind();
    let front = match ublk {
        Some(plan) => Front::Ublk(plan, Arc::new(disk), capture),
        None => {
            let exports = Arc::new(SingleExport::new(disk, capture, &a.export, a.read_only));
            let server = Server::bind(exports, &cfg).context("cannot start the NBD server")?;
            server
                .shutdown_handle()
                .on_signals()
                .context("cannot install the SIGINT/SIGTERM handlers")?;
            Front::Nbd(server)
        }
    };
    let stats = shipper.as_ref().map(|s| s.stats());
    if let Some(m) = a.metrics {
        let (ring_path, disk_id) = (a.ring.clone(), a.ship.disk_id.clone().unwrap_or_default());
        metrics::serve(
            m,
            Arc::new(move || {
                splitter::status::metrics_text(ring_path.as_deref(), &disk_id, stats.as_deref())
            }),
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
    let how = match &front {
        Front::Nbd(_) => format!("as export {:?}", a.export),
        Front::Ublk(plan, ..) => match plan.recovering() {
            Some(n) => format!("with ublk (recovering /dev/ublkb{n})"),
            None => "with ublk".to_string(),
        },
    };
    log::info!(
        "serving {} ({:?}, {} bytes{}) {how}",
        a.disk.display(),
        kind,
        size,
        if a.read_only { ", read-only" } else { "" },
    );
    let served = match front {
        Front::Nbd(server) => {
            for addr in server.local_addrs() {
                log::info!("listening on {addr}");
            }
            server.run().context("the NBD server failed")
        }
        Front::Ublk(plan, disk, capture) => {
            blockdev::ublk::serve(plan, disk, capture, |_| {}).context("the ublk front end failed")
        }
    };
    if let Some((stop, h)) = shipping {
        log::info!("stopping the shipper (it ships what is in the ring for up to 10 s)");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("the shipper failed: {e}"),
            Err(_) => log::error!("the shipper thread panicked"),
        }
    }
    if let Some(mut c) = control.take() {
        c.stop();
    }
    served?;
    log::info!("stopped cleanly");
    Ok(())
}

fn ring_cmd(cmd: RingCmd) -> anyhow::Result<()> {
    match cmd {
        RingCmd::Status { ring: path, json } => {
            let st = ring::status(&path)
                .with_context(|| format!("cannot read ring {}", path.display()))?;
            let now = ring::wall_clock_ns();
            if json {
                let v = splitter::status::status_json(&path, &st, now);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", splitter::status::status_text(&path, &st, now));
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
                let mark = e
                    .mark
                    .map(|m| {
                        let kind = if e.offset & ring::format::MARK_APP != 0 {
                            "app"
                        } else {
                            "crash"
                        };
                        format!(" name={m:?} point={kind}")
                    })
                    .unwrap_or_default();
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
