//! `nbd-target`: the recovery site daemon, its status, and its small PKI.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nbd_target::replica::ReplicaSpec;
use nbd_target::{Target, TargetConfig};

/// blockship nbd-target: the recovery site.
///
/// Accepts shippers over TLS 1.3 with mutual certificate authentication,
/// applies their records in sequence order to one replica per protected disk,
/// keeps a journal of recovery points beside each, and serves every replica
/// read-only over NBD (export name = disk id; `ID@POINT` for a point).
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the recovery site until SIGINT or SIGTERM.
    ///
    /// Each replica lives in DATA_DIR/<disk id>/ (replica.img, state,
    /// live.json) unless --backend puts its bytes on an upstream NBD server.
    /// A batch is acknowledged only once applied, synced, and its sequence
    /// recorded durably.
    #[command(after_help = "Examples:
  nbd-target pki init --dir /etc/blockship/pki --san dr.example.com
  nbd-target serve --listen 0.0.0.0:10811 --data-dir /var/lib/blockship --tls /etc/blockship/pki/target
  nbd-target serve --listen 127.0.0.1:10811 --data-dir dr --tls pki/target --backend db=nbd://127.0.0.1:10900/db
  nbdinfo nbd://127.0.0.1:10810/db")]
    Serve(ServeArgs),
    /// Show every replica: applied sequence, consistency, RPO lag, waiting
    /// bytes, compression, throughput, connection.
    Status {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register an image carried to the recovery site (on other media) as
    /// the starting replica of a disk: the first full pass then compares it
    /// with the source by hashes and sends only what differs.
    #[command(after_help = "Example:
  nbd-target seed --data-dir /var/lib/blockship --disk-id db --from /mnt/usb/db.img
  nbd-target seed --data-dir /var/lib/blockship-dr2 --disk-id db --from /srv/disks/db.img --in-place")]
    Seed {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The disk id the shipper will use.
        #[arg(long, value_name = "ID")]
        disk_id: String,
        /// The image (a copy of the disk, however old).
        #[arg(long, value_name = "IMAGE")]
        from: PathBuf,
        /// Use the file itself as the replica, no copy: the original disk
        /// when a failed-over disk is protected back toward its original
        /// site. It must carry the marker of this disk id (a splitter that
        /// protected it wrote it) and not be in use.
        #[arg(long)]
        in_place: bool,
        /// Seed from a disk whose identity is not known to be this disk's
        /// (no marker, another disk id), and skip the split-brain check.
        #[arg(long)]
        force: bool,
    },
    /// List a disk's recovery points: the oldest and newest point kept,
    /// every mark (sequence, capture time, crash/app, name, tested-at),
    /// and the gaps where the replica was not consistent (no command
    /// offers a point inside one).
    ///
    /// Points are named in every command as `latest` (the newest
    /// consistent point), a sequence number (`123456`), a time
    /// (`2026-11-24T10:15:00Z`: the last record captured at or before it)
    /// or a mark's name (`mark:NAME` when the name looks like a number).
    #[command(after_help = "Examples:
  nbd-target points --data-dir /var/lib/blockship --disk-id db
  nbd-target points --data-dir /var/lib/blockship --disk-id db --json | jq '.marks[] | .name'")]
    Points {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The disk.
        #[arg(long, value_name = "ID")]
        disk_id: String,
        /// Print JSON (keys in docs/OPERATIONS.md).
        #[arg(long)]
        json: bool,
    },
    /// Serve a disk at a recovery point as a writable NBD export, while
    /// replication goes on (a rehearsal: nothing reaches the replica).
    ///
    /// Writes go to a copy-on-write overlay that is discarded on SIGINT or
    /// SIGTERM (exit 0). Runs in the foreground and prints `listening on
    /// ADDR` when ready. Several may run at once, of the same or of
    /// different points; the point is tagged "tested at" in `points`.
    #[command(
        name = "test-failover",
        after_help = "Examples:
  nbd-target test-failover --data-dir /var/lib/blockship --disk-id db --point before-upgrade --listen 127.0.0.1:10900
  nbd-target test-failover --data-dir dr --disk-id db --point 2026-11-24T10:15:00Z --listen 127.0.0.1:10901 --overlay-max 2G
  nbdfuse /mnt/tf/disk nbd://127.0.0.1:10900/db   # or qemu, nbdcopy, ..."
    )]
    TestFailover {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The disk.
        #[arg(long, value_name = "ID")]
        disk_id: String,
        /// The point: latest, a sequence number, an RFC 3339 time or a mark.
        #[arg(long, value_name = "P")]
        point: String,
        /// Serve here: HOST:PORT or a unix socket path.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Most bytes the overlay may hold; writes beyond get ENOSPC
        /// (reads keep working). Default: unlimited (the disk's size).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        overlay_max: Option<u64>,
        /// Folder for the overlay's (unnamed) file. Default: the disk's folder.
        #[arg(long, value_name = "DIR")]
        overlay_dir: Option<PathBuf>,
        /// The replica lives on an upstream NBD server (as given to `serve --backend`).
        #[arg(long, value_name = "URI")]
        backend: Option<String>,
    },
    /// Fail a disk over: present it at a recovery point as the disk itself.
    ///
    /// The disk's shipper is refused from now on (it keeps its ring:
    /// nothing at the source is released) and the running `serve` offers
    /// the disk at point P as the writable NBD export ID; writes go to a
    /// durable overlay, so until --commit the replica is untouched:
    /// --rollback returns to replicating exactly where it stopped (no
    /// resync), --point P2 moves to another point (writes made at P are
    /// discarded). --commit makes it final: the replica becomes the disk
    /// at P with the writes made since, its path is printed (a plain
    /// image: serve it with `splitter serve --disk PATH`, protect it back
    /// with `--ship-to`), and the old timeline's points go. Move, rollback
    /// and commit need the failed-over export's clients disconnected.
    #[command(after_help = "Examples:
  nbd-target failover --data-dir /var/lib/blockship --disk-id db --point before-upgrade
  nbdfuse /mnt/db/disk nbd://127.0.0.1:10810/db        # use it (or qemu, nbd-client)
  nbd-target failover --data-dir /var/lib/blockship --disk-id db --point 2026-11-24T10:15:00Z   # move
  nbd-target failover --data-dir /var/lib/blockship --disk-id db --rollback
  IMG=$(nbd-target failover --data-dir /var/lib/blockship --disk-id db --commit)
  nbd-target failover --data-dir /var/lib/blockship --disk-id db --point latest --commit")]
    Failover {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The disk.
        #[arg(long, value_name = "ID")]
        disk_id: String,
        /// The point: latest, a sequence number, an RFC 3339 time or a mark.
        #[arg(long, value_name = "P", required_unless_present_any = ["rollback", "commit"])]
        point: Option<String>,
        /// Undo an uncommitted failover: replicate again from where it stopped.
        #[arg(long, conflicts_with_all = ["commit", "point"])]
        rollback: bool,
        /// Make the failover final and print the disk image's path.
        #[arg(long)]
        commit: bool,
        /// The replica lives on an upstream NBD server (as given to `serve --backend`).
        #[arg(long, value_name = "URI")]
        backend: Option<String>,
        /// Print JSON (the failover record; keys in docs/OPERATIONS.md).
        #[arg(long)]
        json: bool,
    },
    /// Write a disk at a recovery point to an image file in the format the
    /// recovery platform boots: raw (sparse), vhd (a fixed VHD, as Azure
    /// takes it) or qcow2 (through qemu-img, from the qemu-utils package).
    ///
    /// Reads the point while replication goes on (a lease keeps pruning
    /// off what it reads); the daemon need not run. The image is written
    /// to OUT.partial, synced, then renamed to OUT; an existing OUT is
    /// kept unless --force. A VHD of a disk that is not a whole number of
    /// MiB is padded with zeroes to the next MiB (Azure requires it; the
    /// output says so). Prints `exported disk ID at point POS (P) to OUT:
    /// FORMAT, SIZE bytes, N bytes of data` at the end.
    #[command(
        name = "export-image",
        after_help = "Examples:
  nbd-target export-image --data-dir /var/lib/blockship --disk-id db --point before-upgrade --format vhd /srv/export/db.vhd
  nbd-target export-image --data-dir dr --disk-id db --point 2026-11-24T10:15:00Z --format qcow2 db-1015.qcow2
  nbd-target export-image --data-dir dr --disk-id db --point latest --format raw --force --json db.img
  qemu-img info -f vpc /srv/export/db.vhd   # a fixed VHD probes as raw: name the format"
    )]
    ExportImage {
        /// The data folder the daemon uses.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The disk.
        #[arg(long, value_name = "ID")]
        disk_id: String,
        /// The point: latest, a sequence number, an RFC 3339 time or a mark.
        #[arg(long, value_name = "P")]
        point: String,
        /// The image format.
        #[arg(long, value_name = "FORMAT", value_parser = clap::builder::PossibleValuesParser::new(["raw", "vhd", "qcow2"]))]
        format: String,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// The replica lives on an upstream NBD server (as given to `serve --backend`).
        #[arg(long, value_name = "URI")]
        backend: Option<String>,
        /// Print the result as JSON (disk_id, point, point_name, out,
        /// format, size, disk_size, padding_bytes, data_bytes).
        #[arg(long)]
        json: bool,
        /// The image file to write.
        #[arg(value_name = "OUT")]
        out: PathBuf,
    },
    /// Make and issue certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCmd,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to accept shippers on.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Folder of the replicas and their state.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// TLS folder with ca.pem, cert.pem, key.pem (as `pki init` writes to PKI/target).
    #[arg(long, value_name = "DIR")]
    tls: PathBuf,
    /// Serve the replicas read-only over NBD here ("off" to disable).
    /// Keep it on loopback or a trusted network: NBD is not encrypted.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10810")]
    nbd_listen: String,
    /// Keep disk ID's replica on an upstream NBD server: ID=nbd://HOST:PORT/EXPORT.
    /// Repeat for several disks.
    #[arg(long, value_name = "ID=URI")]
    backend: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Keep a recovery-point journal (an undo log of before-images) beside
    /// each replica, so any point in the retention window can be presented.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    journal: OnOff,
    /// Keep points this far back (units ms, s, m, h, d).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    retention: std::time::Duration,
    /// Keep at most this many journal bytes per disk (K, M, G, T);
    /// whichever of this and --retention binds first. Points an open
    /// export or test failover needs are kept beyond it.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    journal_max: u64,
    /// Journal segment size: pruning frees whole segments.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, hide = true)]
    journal_segment: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

fn parse_size(s: &str) -> Result<u64, String> {
    nbd_target::journal::parse_size(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    nbd_target::journal::parse_duration(s)
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Make a certificate authority in DIR and the target's TLS folder in DIR/target.
    Init {
        /// Where to put the CA (ca.pem, ca-key.pem) and target/.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Extra names (DNS or IP) shippers will use to reach the target;
        /// localhost, 127.0.0.1 and ::1 are always included.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
    /// Make a shipper's TLS folder, enrolled for the given disks only.
    Issue {
        /// The CA folder made by `pki init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The shipper's name (certificate common name, shown in logs).
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A disk id this shipper may write. Repeat for several.
        #[arg(long = "disk", value_name = "ID", required = true)]
        disks: Vec<String>,
        /// Output folder (ca.pem, cert.pem, key.pem) for the shipper's --tls.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = nbd_target::pki::DEFAULT_DAYS)]
        days: u32,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match Cli::parse().command {
        Cmd::Serve(a) => serve(a),
        Cmd::Status { data_dir, json } => {
            let v = nbd_target::status::collect(&data_dir)
                .with_context(|| format!("cannot read {}", data_dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", nbd_target::status::render_text(&v));
            }
            Ok(())
        }
        Cmd::Seed {
            data_dir,
            disk_id,
            from,
            in_place: true,
            force,
        } => {
            let r = nbd_target::seed::seed_in_place(&data_dir, &disk_id, &from, force)
                .with_context(|| {
                    format!(
                        "cannot seed disk {disk_id:?} in place from {}",
                        from.display()
                    )
                })?;
            println!(
                "disk {disk_id:?} seeded in place: its replica is {} itself ({} bytes, no copy){}; the first full pass compares it with the source by hashes and sends only the differences",
                r.path.display(),
                r.size,
                match (&r.marker, r.in_place.head_seq) {
                    (None, _) => " (no disk marker: accepted with --force)".to_string(),
                    (Some(_), 0) => String::new(),
                    (Some(_), h) => format!("; its ring was at seq {h}"),
                }
            );
            Ok(())
        }
        Cmd::Seed {
            data_dir,
            disk_id,
            from,
            in_place: false,
            force,
        } => {
            if !force {
                if let Ok(Some(m)) = blockdev::marker::read(&from) {
                    if m.disk_id.as_deref().is_some_and(|d| d != disk_id) {
                        bail!(
                            "{} is a copy of disk {:?} (its marker), not {disk_id:?}: refused (--force to use it anyway)",
                            from.display(),
                            m.disk_id.unwrap_or_default()
                        );
                    }
                }
            }
            let (size, written) = nbd_target::seed::seed(&data_dir, &disk_id, &from)
                .with_context(|| format!("cannot seed disk {disk_id:?} from {}", from.display()))?;
            println!(
                "disk {disk_id:?} seeded from {} ({size} bytes, {written} bytes of data); the first full pass will compare and send only the differences",
                from.display()
            );
            Ok(())
        }
        Cmd::Points {
            data_dir,
            disk_id,
            json,
        } => {
            let dp = nbd_target::points::DiskPoints::load(&data_dir, &disk_id)
                .with_context(|| format!("cannot read the points of disk {disk_id:?}"))?;
            let v = dp.to_json();
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", nbd_target::points::render_text(&v));
            }
            Ok(())
        }
        Cmd::TestFailover {
            data_dir,
            disk_id,
            point,
            listen,
            overlay_max,
            overlay_dir,
            backend,
        } => {
            let cfg = nbd_target::test_failover::TestFailoverConfig {
                data_dir,
                disk_id: disk_id.clone(),
                point: point.clone(),
                listen: nbd_target::test_failover::parse_listen(&listen)?,
                overlay_max,
                overlay_dir,
                backend,
            };
            let tf = nbd_target::test_failover::TestFailover::start(&cfg)
                .with_context(|| format!("cannot test-fail-over disk {disk_id:?} at {point:?}"))?;
            tf.shutdown_handle()
                .on_signals()
                .context("cannot install signal handlers")?;
            for a in tf.local_addrs() {
                log::info!(
                    "test failover of {disk_id:?} at point {} ({point}): writable, writes go to an overlay discarded at exit",
                    tf.point
                );
                log::info!("listening on {a}");
                println!("listening on {a}");
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            let used = tf.run().context("the test failover failed")?;
            log::info!("stopped; discarded the overlay ({used} bytes written by the test)");
            Ok(())
        }
        Cmd::Failover {
            data_dir,
            disk_id,
            point,
            rollback,
            commit,
            backend,
            json,
        } => {
            use nbd_target::failover::{self, Action};
            let action = if rollback {
                Action::Rollback
            } else if commit {
                Action::Commit(point)
            } else {
                Action::Failover(point.unwrap_or_default())
            };
            let t = failover::Target {
                data_dir,
                disk_id: disk_id.clone(),
                backend,
            };
            let o = failover::run(&t, &action)
                .with_context(|| format!("cannot fail over disk {disk_id:?}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&o.to_json())?);
            } else if commit {
                // The plain path, for scripts: IMG=$(nbd-target failover ... --commit).
                println!("{}", o.message);
                if let Some(r) = &o.record {
                    eprintln!("disk {disk_id:?} {}", r.describe());
                }
            } else {
                println!("{}", o.message);
            }
            Ok(())
        }
        Cmd::ExportImage {
            data_dir,
            disk_id,
            point,
            format,
            force,
            backend,
            json,
            out,
        } => export_image(
            nbd_target::export_image::ExportConfig {
                data_dir,
                disk_id,
                point,
                format: format.parse()?,
                out,
                force,
                backend,
                cancel: Arc::default(),
            },
            json,
        ),
        Cmd::Pki { command } => match command {
            PkiCmd::Init { dir, san } => {
                nbd_target::pki::init(&dir, &san)
                    .with_context(|| format!("cannot make the CA in {}", dir.display()))?;
                println!(
                    "CA in {0}; the target's TLS folder is {0}/target",
                    dir.display()
                );
                println!("issue shipper folders with: nbd-target pki issue --dir {} --name NAME --disk ID --out DIR", dir.display());
                Ok(())
            }
            PkiCmd::Issue {
                dir,
                name,
                disks,
                out,
                days,
            } => {
                nbd_target::pki::issue(&dir, &name, &disks, &out, days)
                    .with_context(|| format!("cannot issue a certificate for {name}"))?;
                println!(
                    "shipper TLS folder {} for {name}, disks {disks:?}",
                    out.display()
                );
                Ok(())
            }
        },
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut backends = HashMap::new();
    for b in &a.backend {
        let Some((id, uri)) = b.split_once('=') else {
            bail!("--backend {b:?}: expected ID=nbd://HOST:PORT/EXPORT");
        };
        wire::identity::validate_disk_id(id).with_context(|| format!("--backend {b:?}"))?;
        backends.insert(id.to_string(), ReplicaSpec::parse_nbd_uri(uri)?);
    }
    let nbd_listen = if a.nbd_listen == "off" {
        None
    } else {
        Some(
            a.nbd_listen
                .parse()
                .with_context(|| format!("--nbd-listen {:?} is not an address", a.nbd_listen))?,
        )
    };
    let cfg = TargetConfig {
        listen: a.listen,
        data_dir: a.data_dir.clone(),
        tls_dir: a.tls.clone(),
        nbd_listen,
        backends,
        journal: (a.journal == OnOff::On).then_some(nbd_target::journal::JournalConfig {
            retention: a.retention,
            max_bytes: a.journal_max,
            segment_bytes: a.journal_segment,
        }),
    };
    let target = Target::bind(&cfg).context("cannot start the target")?;
    nbd_target::points::write_config(&a.data_dir, cfg.journal.as_ref())
        .context("cannot write to the data folder")?;
    let stop = target.stop_flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    if let Some(m) = a.metrics {
        let reg = target.registry();
        metrics::serve(m, Arc::new(move || nbd_target::status::metrics_text(&reg)))
            .with_context(|| format!("cannot serve metrics on {m}"))?;
    }
    if let Some(addr) = target.local_addr() {
        log::info!("accepting shippers on {addr} (TLS 1.3, client certificates required)");
    }
    if let Some(addr) = target.nbd_addr() {
        log::info!("replicas served read-only over NBD on {addr} (export names: ID for the latest state, ID@POINT for a recovery point)");
    }
    log::info!("data folder {}", a.data_dir.display());
    match &cfg.journal {
        Some(j) => log::info!(
            "recovery-point journal on: retention {} s, at most {} bytes per disk (points: nbd-target points --data-dir {} --disk-id ID; exports ID@POINT)",
            j.retention.as_secs(),
            j.max_bytes,
            a.data_dir.display()
        ),
        None => log::info!("recovery-point journal off: only the latest state is kept"),
    }
    target.run().context("the target failed")?;
    log::info!("stopped cleanly");
    Ok(())
}

fn export_image(cfg: nbd_target::export_image::ExportConfig, json: bool) -> anyhow::Result<()> {
    use nbd_target::export_image::Step;
    // The first signal stops the export (its temporary files removed), a
    // second one exits at once.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, cfg.cancel.clone())
            .and_then(|_| signal_hook::flag::register(sig, cfg.cancel.clone()))
            .context("cannot install signal handlers")?;
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |s: Step| {
        if !tty {
            return;
        }
        match s {
            Step::Reading { done, total } => {
                let b = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(total);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "export {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b
                });
                b.set_position(done);
            }
            Step::Converting => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let b = indicatif::ProgressBar::new_spinner();
                b.set_message("converting to qcow2 (qemu-img convert)");
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                bar = Some(b);
            }
        }
    };
    let r = nbd_target::export_image::export(&cfg, &mut progress);
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    let r = r.with_context(|| {
        format!(
            "cannot export disk {:?} at {:?} to {}",
            cfg.disk_id,
            cfg.point,
            cfg.out.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r.to_json())?);
    } else {
        if let Some(n) = r.padding_note() {
            println!("note: {n}");
        }
        println!("{}", r.line());
    }
    Ok(())
}
