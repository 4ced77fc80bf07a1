//! `splitter`: serve a protected disk over NBD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use splitter::{Disk, ListenAddr, NoCapture, ServeConfig, Server};

/// blockship splitter: the I/O path of a protected disk.
///
/// Serves a disk (a regular file or a block device) over the NBD protocol so
/// that any NBD client (the kernel's nbd-client, qemu, libnbd tools such as
/// nbdfuse and nbdcopy, fio) can use it as its own disk.
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
    /// flush on one connection covers writes completed on all). On SIGINT or
    /// SIGTERM the server stops accepting, finishes in-flight requests,
    /// flushes the disk and exits 0.
    ///
    /// Examples:
    ///   splitter serve --disk /var/lib/disks/db.img
    ///   splitter serve --disk /dev/vdb --socket /run/blockship/vdb.sock
    ///   nbdinfo nbd://127.0.0.1:10809
    Serve(ServeArgs),
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
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(a) => serve(a),
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
    let size = disk.size();
    let kind = disk.kind();
    let server =
        Server::bind(disk, Arc::new(NoCapture), &cfg).context("cannot start the NBD server")?;
    server
        .shutdown_handle()
        .on_signals()
        .context("cannot install the SIGINT/SIGTERM handlers")?;
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
    server.run().context("the NBD server failed")?;
    log::info!("stopped cleanly");
    Ok(())
}
