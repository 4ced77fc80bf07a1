//! `delay-proxy`: forward TCP connections, delaying every byte by a fixed
//! time in each direction without limiting throughput. See the library's
//! documentation for what it is and is not.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use delay_proxy::{parse_duration, parse_size, Config, Proxy, Snapshot};

/// delay-proxy: a TCP forwarding proxy that adds a fixed delay.
///
/// Accepts connections on --listen and forwards each to --connect. Every
/// chunk of bytes read at time t is written at t + --delay, in both
/// directions, with many chunks in flight: the delay adds latency, not a
/// rate limit (a round trip through it takes 2 x --delay more). On SIGINT or
/// SIGTERM it logs the bytes it forwarded each way (and writes them to
/// --stats-file) and exits 0. For test benches only: no loss, jitter or
/// bandwidth limit (use `tc qdisc ... tbf` for that), no authentication.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:
  delay-proxy --listen 10.77.0.1:10811 --connect 10.77.0.2:10811 --delay 10ms
  delay-proxy --listen 127.0.0.1:5201 --connect 127.0.0.1:5202 --delay 10ms --stats-file stats.json"
)]
struct Args {
    /// Address to accept connections on.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Where to forward each connection (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    connect: String,
    /// Delay added in each direction (one way), e.g. 10ms, 0.5s, 250us, 0.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    delay: Duration,
    /// Most bytes read at a time (one queued chunk).
    #[arg(long, value_name = "SIZE", default_value = "256K", value_parser = parse_size)]
    chunk: usize,
    /// Most bytes held in flight per direction of a connection; when full,
    /// the proxy stops reading and TCP pushes the sender back.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    max_buffer: usize,
    /// Write the counters as JSON to this file each time a connection ends,
    /// and at exit.
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
}

/// Write `s` to `path` as JSON, through a temporary file and a rename.
fn write_stats(path: &Path, s: &Snapshot) {
    let tmp = path.with_extension("tmp");
    let r = std::fs::write(&tmp, s.to_json() + "\n").and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        log::warn!("cannot write {}: {e}", path.display());
    }
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let a = Args::parse();
    let cfg = Config {
        listen: a.listen,
        connect: a.connect.clone(),
        delay: a.delay,
        chunk: a.chunk,
        max_buffer: a.max_buffer,
    };
    let mut proxy = Proxy::bind(cfg).with_context(|| format!("cannot listen on {}", a.listen))?;
    let totals = proxy.totals();
    if let Some(p) = a.stats_file.clone() {
        write_stats(&p, &totals.snapshot());
        proxy.on_close(move |s| write_stats(&p, s));
    }

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let stats_file = a.stats_file.clone();
    let on_signal = totals.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let s = on_signal.snapshot();
                if let Some(p) = &stats_file {
                    write_stats(p, &s);
                }
                log::info!("signal {sig}: exiting; totals: {s}");
                std::process::exit(0);
            }
        })
        .context("cannot start the signal thread")?;

    log::info!(
        "listening on {}, forwarding to {} with {:?} of delay each way (chunk {} bytes, up to {} bytes in flight per direction)",
        proxy.local_addr()?,
        a.connect,
        a.delay,
        a.chunk,
        a.max_buffer
    );
    proxy.run().context("accepting connections failed")?;
    Ok(())
}
