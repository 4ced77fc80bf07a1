//! delay-proxy: a TCP forwarding proxy that delays every byte it forwards by
//! a fixed time, in each direction, without limiting throughput. blockship's
//! benchmarks put it on an emulated WAN link (`scripts/bench/wan-link`) to
//! add a round-trip time where the kernel's `netem` is not available.
//!
//! **What it is.** It accepts TCP connections on one address and, for each,
//! opens a connection to another address and copies bytes both ways. Per
//! direction a reader thread reads whatever has arrived (at most `chunk`
//! bytes at a time), stamps it with "due = now + delay" and appends it to a
//! queue; a writer thread takes the chunks in order, waits until each is due
//! and writes it. Many chunks are in flight at once (up to `max_buffer`
//! bytes per direction), so the delay adds latency, not a rate limit: a
//! chunk read at time t is written at t + delay whatever came before it. An
//! end of stream (a half-close) is forwarded after the same delay, and the
//! proxy counts the bytes it delivered each way.
//!
//! **What it is not.** Not a network emulator: no loss, jitter, reordering
//! or bandwidth limit (shape the link with `tc qdisc ... tbf` for that). It
//! terminates TCP on both sides: each side's TCP sees the round-trip time of
//! its own hop, not the emulated one, so slow start, window growth and
//! loss recovery over a long path are not reproduced; what the delay does
//! reproduce is the time every request, reply and acknowledgement of the
//! application protocol takes to cross, which is what limits protocols that
//! wait for answers. `max_buffer` stands for the bytes a long fat pipe holds
//! in flight; when it is full the reader stops reading, and the sender is
//! pushed back by TCP as it would be by a full window. It forwards bytes
//! opaquely (TLS passes through untouched), does no authentication, and is
//! meant for test benches, not production.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Default most bytes read (and queued as one chunk) at a time.
pub const DEFAULT_CHUNK: usize = 256 << 10;
/// Default most bytes held per direction of a connection.
pub const DEFAULT_MAX_BUFFER: usize = 32 << 20;
/// How long connecting to the upstream address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to listen on, where to forward, and how late.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to accept connections on.
    pub listen: SocketAddr,
    /// Where to forward each connection (HOST:PORT, resolved per connection).
    pub connect: String,
    /// Delay added to every byte, in each direction.
    pub delay: Duration,
    /// Most bytes read at a time (one chunk of the queue).
    pub chunk: usize,
    /// Most bytes held (read and not yet written) per direction.
    pub max_buffer: usize,
}

impl Config {
    /// A configuration with the default chunk and buffer sizes.
    pub fn new(listen: SocketAddr, connect: impl Into<String>, delay: Duration) -> Config {
        Config {
            listen,
            connect: connect.into(),
            delay,
            chunk: DEFAULT_CHUNK,
            max_buffer: DEFAULT_MAX_BUFFER,
        }
    }
}

/// Counters over the proxy's life, updated as bytes are delivered.
#[derive(Debug, Default)]
pub struct Totals {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections dropped because the upstream address did not answer.
    pub failed_connects: AtomicU64,
    /// Bytes delivered from clients to the upstream side.
    pub bytes_up: AtomicU64,
    /// Bytes delivered from the upstream side to clients.
    pub bytes_down: AtomicU64,
}

impl Totals {
    /// The counters' values now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.connections.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            failed_connects: self.failed_connects.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
        }
    }
}

/// The values of [`Totals`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open.
    pub active: u64,
    /// Connections dropped because the upstream address did not answer.
    pub failed_connects: u64,
    /// Bytes delivered from clients to the upstream side.
    pub bytes_up: u64,
    /// Bytes delivered from the upstream side to clients.
    pub bytes_down: u64,
}

impl Snapshot {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"connections\": {}, \"active\": {}, \"failed_connects\": {}, \"bytes_up\": {}, \"bytes_down\": {}, \"bytes_total\": {}}}",
            self.connections,
            self.active,
            self.failed_connects,
            self.bytes_up,
            self.bytes_down,
            self.bytes_up + self.bytes_down
        )
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections ({} open, {} failed to connect), {} bytes up (client to upstream), {} bytes down, {} bytes in all",
            self.connections,
            self.active,
            self.failed_connects,
            self.bytes_up,
            self.bytes_down,
            self.bytes_up + self.bytes_down
        )
    }
}

/// A bound proxy, ready to run.
pub struct Proxy {
    listener: TcpListener,
    cfg: Arc<Config>,
    totals: Arc<Totals>,
    on_close: Option<OnClose>,
}

/// A callback run with the counters each time a connection ends.
type OnClose = Arc<dyn Fn(&Snapshot) + Send + Sync>;

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("listener", &self.listener)
            .field("cfg", &self.cfg)
            .field("totals", &self.totals)
            .field("on_close", &self.on_close.is_some())
            .finish()
    }
}

impl Proxy {
    /// Bind the listening socket.
    pub fn bind(cfg: Config) -> io::Result<Proxy> {
        if cfg.chunk == 0 || cfg.max_buffer < cfg.chunk {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk must be positive and max_buffer at least one chunk",
            ));
        }
        let listener = TcpListener::bind(cfg.listen)?;
        Ok(Proxy {
            listener,
            cfg: Arc::new(cfg),
            totals: Arc::new(Totals::default()),
            on_close: None,
        })
    }

    /// The address it accepts connections on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Its counters (shared: they keep changing while it runs).
    pub fn totals(&self) -> Arc<Totals> {
        self.totals.clone()
    }

    /// Call `f` with the counters each time a connection ends.
    pub fn on_close(&mut self, f: impl Fn(&Snapshot) + Send + Sync + 'static) {
        self.on_close = Some(Arc::new(f));
    }

    /// Accept and forward connections until the process ends. Fails only if
    /// accepting fails for good.
    pub fn run(self) -> io::Result<()> {
        let mut errors = 0u32;
        for conn in self.listener.incoming() {
            let client = match conn {
                Ok(c) => {
                    errors = 0;
                    c
                }
                Err(e) => {
                    // EMFILE and friends: back off and go on, up to a point.
                    errors += 1;
                    log::warn!("accept failed: {e}");
                    if errors > 100 {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let n = self.totals.connections.fetch_add(1, Ordering::Relaxed) + 1;
            let (cfg, totals, on_close) =
                (self.cfg.clone(), self.totals.clone(), self.on_close.clone());
            let spawned = thread::Builder::new()
                .name(format!("conn-{n}"))
                .spawn(move || {
                    totals.active.fetch_add(1, Ordering::Relaxed);
                    connection(n, client, &cfg, &totals);
                    totals.active.fetch_sub(1, Ordering::Relaxed);
                    if let Some(f) = on_close {
                        f(&totals.snapshot());
                    }
                });
            if let Err(e) = spawned {
                log::warn!("connection {n}: cannot start a thread: {e}");
            }
        }
        Ok(())
    }

    /// Run in a background thread (for tests and embedding).
    pub fn spawn(self) -> thread::JoinHandle<io::Result<()>> {
        thread::spawn(move || self.run())
    }
}

/// Connect to `addr` (HOST:PORT), trying each address it resolves to.
fn connect(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to no address"),
    );
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Forward one connection both ways until both directions ended.
fn connection(n: u64, client: TcpStream, cfg: &Config, totals: &Totals) {
    let peer = client
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let upstream = match connect(&cfg.connect) {
        Ok(s) => s,
        Err(e) => {
            totals.failed_connects.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "connection {n} from {peer}: cannot connect to {}: {e}",
                cfg.connect
            );
            return;
        }
    };
    // Every chunk goes out as soon as it is due: no Nagle on top of the delay.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    log::debug!("connection {n} from {peer} forwarded to {}", cfg.connect);
    let started = Instant::now();
    let link = Link {
        client,
        upstream,
        up: Pipe::default(),
        down: Pipe::default(),
        aborted: AtomicBool::new(false),
    };
    let (mut up, mut down) = (0u64, 0u64);
    thread::scope(|s| {
        let l = &link;
        let readers = [
            s.spawn(move || l.read_side(&l.client, &l.up, cfg)),
            s.spawn(move || l.read_side(&l.upstream, &l.down, cfg)),
        ];
        let up_writer = s.spawn(move || l.write_side(n, &l.upstream, &l.up, &totals.bytes_up));
        let down_writer = s.spawn(move || l.write_side(n, &l.client, &l.down, &totals.bytes_down));
        for r in readers {
            if let Ok(Err(e)) = r.join() {
                log::debug!("connection {n}: read: {e}");
            }
        }
        up = joined(n, up_writer.join());
        down = joined(n, down_writer.join());
    });
    log::info!(
        "connection {n} from {peer} closed after {:.3} s: {up} bytes up, {down} bytes down{}",
        started.elapsed().as_secs_f64(),
        if link.aborted.load(Ordering::Relaxed) {
            " (ended by an error or reset)"
        } else {
            ""
        }
    );
}

/// The byte count of a writer thread.
fn joined(n: u64, r: thread::Result<u64>) -> u64 {
    r.unwrap_or_else(|_| {
        log::warn!("connection {n}: a writer thread panicked");
        0
    })
}

/// One direction's queue of timestamped chunks.
#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes read and not yet written (queued, or being written).
    held: usize,
    /// The reader saw the end of the stream.
    eof: bool,
    /// The connection is being torn down.
    abort: bool,
}

#[derive(Debug, Default)]
struct Pipe {
    q: Mutex<Queue>,
    cv: Condvar,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.cv
            .wait(g)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Both sockets of a connection and its two directions.
#[derive(Debug)]
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    /// Client to upstream.
    up: Pipe,
    /// Upstream to client.
    down: Pipe,
    aborted: AtomicBool,
}

impl Link {
    /// Tear everything down: wake every thread, close both sockets.
    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        for p in [&self.up, &self.down] {
            p.lock().abort = true;
            p.cv.notify_all();
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }

    /// Read from `src` into `pipe`, stamping each chunk with its due time.
    fn read_side(&self, mut src: &TcpStream, pipe: &Pipe, cfg: &Config) -> io::Result<()> {
        let mut buf = vec![0u8; cfg.chunk];
        loop {
            {
                let mut q = pipe.lock();
                while q.held >= cfg.max_buffer && !q.abort {
                    q = pipe.wait(q);
                }
                if q.abort {
                    return Ok(());
                }
            }
            let n = match src.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            };
            let due = Instant::now() + cfg.delay;
            let mut q = pipe.lock();
            if n == 0 {
                q.eof = true;
                pipe.cv.notify_all();
                return Ok(());
            }
            q.chunks.push_back((due, buf[..n].to_vec()));
            q.held += n;
            pipe.cv.notify_all();
        }
    }

    /// Write the chunks of `pipe` to `dst`, each when it is due; forward the
    /// end of the stream. Returns the bytes written (also when an error or
    /// a reset ended the connection).
    fn write_side(&self, n: u64, mut dst: &TcpStream, pipe: &Pipe, counter: &AtomicU64) -> u64 {
        let mut total = 0u64;
        loop {
            let (due, data) = {
                let mut q = pipe.lock();
                loop {
                    if q.abort {
                        return total;
                    }
                    if let Some(c) = q.chunks.pop_front() {
                        break c;
                    }
                    if q.eof {
                        drop(q);
                        let _ = dst.shutdown(Shutdown::Write);
                        return total;
                    }
                    q = pipe.wait(q);
                }
            };
            // Chunks are due in the order they were read: waiting for this
            // one never delays a later one past its own due time.
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if let Err(e) = dst.write_all(&data) {
                log::debug!("connection {n}: write: {e}");
                self.abort();
                return total;
            }
            total += data.len() as u64;
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            let mut q = pipe.lock();
            q.held -= data.len();
            pipe.cv.notify_all();
        }
    }
}

/// Parse a duration like `10ms`, `0.5s`, `250us`, `1500ns` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10ms, 0.5s or 250us"))?;
    let scale = match unit.trim() {
        "" if v == 0.0 => 1.0,
        "" => return Err(format!("{s:?}: give a unit (ns, us, ms or s)")),
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ns, us, ms or s)"
            ))
        }
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 1 hour)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a size like `256K`, `32M`, `1G` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256K or 32M"))?;
    let mult: u64 = match unit.to_ascii_uppercase().trim_end_matches("IB") {
        "" | "B" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        other => return Err(format!("unknown size suffix {other:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10m").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
    }
}
