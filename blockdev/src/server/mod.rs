//! The NBD transmission server shared by the splitter and the recovery
//! site's exports: listeners (TCP and unix socket), the accept loop, a
//! bounded handshake, one thread per connection, and an orderly shutdown.
//!
//! What it serves is an [`ExportSet`]: the names offered in the handshake,
//! and for the one a client picks, a [`Backend`], a [`WriteCapture`] and
//! the overlap claims shared by every connection of that disk. The
//! splitter serves a [`SingleExport`]; the recovery site serves its
//! replicas.
//!
//! Bounds (contract 6): at most `max_connections` connections past their
//! handshake and, apart from those, at most `max_handshakes` in their
//! handshake (a client that connects and stays silent holds only a
//! handshake place, loses it after `handshake_timeout` however slowly it
//! trickles bytes, and sooner when a new client needs the place: the
//! oldest handshake is closed then); option data is bounded by the
//! handshake itself (64 KiB); in transmission, [`MAX_OPS`] requests and
//! [`MAX_INFLIGHT_BYTES`] per connection.

mod buffers;
mod connection;
pub(crate) mod overlap;
mod uring;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd::protocol::{
    FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH,
    FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES,
};
use nbd::{Export, ExportLimits, Outcome};

use crate::backend::{Backend, Caps};
use crate::capture::WriteCapture;
use crate::error::{Error, Result};
use crate::file::FileDisk;
use connection::{ConnConfig, Connection};
pub use connection::{MAX_INFLIGHT_BYTES, MAX_OPS};
pub use overlap::Claims;

/// Largest READ or WRITE accepted (advertised in NBD_INFO_BLOCK_SIZE; a
/// client that did not ask for block sizes may send this much too, as
/// nbdkit allows).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Preferred I/O size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;

/// The transmission flags for an export of a backend with `caps`.
pub fn export_flags(caps: Caps, read_only: bool) -> u16 {
    let mut flags = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if caps.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if read_only || caps.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    flags
}

/// An export's handshake description: name, size, flags, block sizes.
pub fn describe_export(
    name: &str,
    description: String,
    size: u64,
    caps: Caps,
    read_only: bool,
) -> Export {
    Export {
        name: name.to_string(),
        description,
        size,
        flags: export_flags(caps, read_only),
        block_sizes: (1, PREFERRED_BLOCK, MAX_PAYLOAD),
    }
}

/// What a connection serves once its client picked an export.
#[derive(Clone)]
pub struct OpenExport {
    /// The disk.
    pub disk: Arc<dyn Backend>,
    /// The write filter (a ring, or none).
    pub capture: Arc<dyn WriteCapture>,
    /// Overlap claims shared by every connection of this disk.
    pub claims: Arc<Claims>,
    /// Refuse writes.
    pub read_only: bool,
}

/// The exports a server offers.
pub trait ExportSet: Send + Sync {
    /// The exports offered now (asked at every handshake).
    fn exports(&self) -> Vec<Export>;
    /// Open the export `name` (one of [`ExportSet::exports`]) for a
    /// connection that chose it.
    fn open(&self, name: &str) -> io::Result<OpenExport>;
    /// An export a client names that [`ExportSet::exports`] does not list
    /// (names with parameters, like a recovery point `disk@123`). Asked
    /// during the handshake; the error is what the client is told.
    fn lookup(&self, name: &str) -> std::result::Result<Export, String> {
        Err(format!("no export named {name:?}"))
    }
    /// The server stops: nothing may wait for a capture any more.
    fn interrupt(&self) {}
    /// Every connection has ended: make everything durable.
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One disk under one name: what the splitter serves.
pub struct SingleExport {
    export: Export,
    open: OpenExport,
    disk: Arc<FileDisk>,
}

impl SingleExport {
    /// Serve `disk` as `name` through `capture`.
    pub fn new(
        disk: FileDisk,
        capture: Arc<dyn WriteCapture>,
        name: &str,
        read_only: bool,
    ) -> SingleExport {
        let read_only = read_only || disk.read_only();
        let disk = Arc::new(disk);
        let export = describe_export(
            name,
            format!("blockship splitter: {}", disk.path().display()),
            disk.size(),
            disk.caps(),
            read_only,
        );
        SingleExport {
            export,
            open: OpenExport {
                disk: disk.clone(),
                capture,
                claims: Arc::new(Claims::default()),
                read_only,
            },
            disk,
        }
    }
}

impl ExportSet for SingleExport {
    fn exports(&self) -> Vec<Export> {
        vec![self.export.clone()]
    }
    fn open(&self, _name: &str) -> io::Result<OpenExport> {
        Ok(self.open.clone())
    }
    fn interrupt(&self) {
        // A connection blocked on a full ring (`--ring-full block`, shipper
        // gone) must not hold the shutdown forever.
        self.open.capture.interrupt();
    }
    fn close(&self) -> io::Result<()> {
        let sync = self
            .disk
            .sync()
            .map_err(|e| io::Error::new(e.kind(), format!("flushing the disk at shutdown: {e}")));
        let cap = self.open.capture.close().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("closing the capture (ring) at shutdown: {e}"),
            )
        });
        sync.and(cap)
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (created; an existing stale socket is replaced).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "nbd://{a}"),
            ListenAddr::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
        }
    }
}

/// Where and within which bounds to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: Vec<ListenAddr>,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections in their handshake at once; more are closed at accept.
    pub max_handshakes: usize,
    /// How long a client may take over its whole handshake.
    pub handshake_timeout: Duration,
}

impl ServeConfig {
    /// Listen on `listen` with the default bounds.
    pub fn new(listen: Vec<ListenAddr>) -> ServeConfig {
        ServeConfig {
            listen,
            max_connections: 256,
            max_handshakes: 16,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Triggers an orderly shutdown of a running [`Server`] (also from a signal).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<UnixStream>);

impl ShutdownHandle {
    /// Ask the server to stop: no new connections, in-flight requests finish.
    pub fn shutdown(&self) {
        // A full socket buffer means a shutdown is already signalled.
        let _ = (&*self.0).write(&[1]);
    }

    /// Register SIGINT and SIGTERM to trigger this handle.
    pub fn on_signals(&self) -> io::Result<()> {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let w = self.0.try_clone()?;
            signal_hook::low_level::pipe::register(sig, w)?;
        }
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

/// A stream whose reads and writes fail once `deadline` passed: the
/// handshake's overall bound, which a client trickling one byte at a time
/// cannot renew.
struct Deadlined<'a> {
    s: &'a mut Stream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.set_write_timeout(Some(left))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    /// Close both directions: a thread blocked reading it returns.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

struct Shared {
    exports: Arc<dyn ExportSet>,
    cfg: ServeConfig,
    shutdown_rx: UnixStream,
    /// Connections in their handshake now, oldest first (a clone of each
    /// socket, to close the oldest when a new client needs its place).
    handshaking: Mutex<VecDeque<(u64, Stream)>>,
    /// Connections past their handshake now.
    established: AtomicUsize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.shared.cfg.listen)
            .finish()
    }
}

/// A bound, not yet running NBD server.
pub struct Server {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown_tx: Arc<UnixStream>,
}

impl Server {
    /// Bind every listener of `cfg` for `exports`.
    pub fn bind(exports: Arc<dyn ExportSet>, cfg: &ServeConfig) -> Result<Server> {
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let e = |source| Error::Listen {
                addr: addr.to_string(),
                source,
            };
            listeners.push(match addr {
                ListenAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(e)?),
                ListenAddr::Unix(p) => {
                    if std::fs::symlink_metadata(p)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                        && UnixStream::connect(p).is_err()
                    {
                        // A stale socket left by a process that died.
                        let _ = std::fs::remove_file(p);
                    }
                    Listener::Unix(UnixListener::bind(p).map_err(e)?, p.clone())
                }
            });
        }
        let (tx, rx) = UnixStream::pair().map_err(|source| Error::Io {
            what: "creating the shutdown socket pair",
            source,
        })?;
        for s in [&tx, &rx] {
            s.set_nonblocking(true).map_err(|source| Error::Io {
                what: "configuring the shutdown socket pair",
                source,
            })?;
        }
        Ok(Server {
            listeners,
            shared: Arc::new(Shared {
                exports,
                cfg: cfg.clone(),
                shutdown_rx: rx,
                handshaking: Mutex::new(VecDeque::new()),
                established: AtomicUsize::new(0),
            }),
            shutdown_tx: Arc::new(tx),
        })
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t) => t.local_addr().ok().map(ListenAddr::Tcp),
                Listener::Unix(_, p) => Some(ListenAddr::Unix(p.clone())),
            })
            .collect()
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// Accept and serve until shut down; then wait for every connection to
    /// finish its in-flight requests, flush the disk and the capture, and
    /// return.
    pub fn run(self) -> Result<()> {
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        let r = self.accept_loop(&mut conns, &mut next_id);
        self.shared.exports.interrupt();
        log::info!(
            "shutting down: waiting for {} connection(s) to finish",
            conns.len()
        );
        for c in conns {
            let _ = c.join();
        }
        for l in &self.listeners {
            if let Listener::Unix(_, p) = l {
                let _ = std::fs::remove_file(p);
            }
        }
        let closed = self.shared.exports.close().map_err(|source| Error::Io {
            what: "closing the exports at shutdown",
            source,
        });
        r.and(closed)
    }

    fn accept_loop(&self, conns: &mut Vec<JoinHandle<()>>, next_id: &mut u64) -> Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(t) => t.as_raw_fd(),
                Listener::Unix(u, _) => u.as_raw_fd(),
            })
            .chain(std::iter::once(self.shared.shutdown_rx.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            poll(&mut fds).map_err(|source| Error::Io {
                what: "waiting for connections",
                source,
            })?;
            if fds.last().is_some_and(|p| p.revents != 0) {
                return Ok(());
            }
            conns.retain(|c| !c.is_finished());
            for (i, l) in self.listeners.iter().enumerate() {
                if fds[i].revents == 0 {
                    continue;
                }
                let accepted = match l {
                    Listener::Tcp(t) => t.accept().map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        (Stream::Tcp(s), a.to_string())
                    }),
                    Listener::Unix(u, p) => u
                        .accept()
                        .map(|(s, _)| (Stream::Unix(s), format!("{}", p.display()))),
                };
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        log::warn!("accept failed: {e}");
                        continue;
                    }
                };
                *next_id += 1;
                let peer = format!("conn {} ({peer})", next_id);
                let max = self.shared.cfg.max_connections + self.shared.cfg.max_handshakes;
                if conns.len() >= max {
                    log::warn!("{peer}: refused, already {max} connections (served and opening)");
                    continue;
                }
                let Ok(clone) = stream.try_clone() else {
                    log::warn!("{peer}: refused, cannot track its handshake");
                    continue;
                };
                self.shared.open_handshake(*next_id, clone);
                let shared = self.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-conn-{next_id}"))
                    .spawn({
                        let id = *next_id;
                        move || serve_connection(&shared, stream, &peer, id)
                    });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => {
                        self.shared.close_handshake(*next_id);
                        log::error!("cannot start a connection thread: {e}");
                    }
                }
            }
        }
    }
}

impl Shared {
    fn opening(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Stream)>> {
        // Each update is one push or remove: consistent whatever panicked.
        self.handshaking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Count connection `id` into the handshake budget; when the budget is
    /// full, close the oldest handshake to make room: a real client's
    /// handshake takes milliseconds, so the oldest is the likeliest to be a
    /// silent or trickling one.
    fn open_handshake(&self, id: u64, s: Stream) {
        let mut q = self.opening();
        while q.len() >= self.cfg.max_handshakes.max(1) {
            let Some((old, os)) = q.pop_front() else {
                break;
            };
            log::warn!(
                "conn {old}: closed, still in its handshake while {} others wait (budget {})",
                q.len() + 1,
                self.cfg.max_handshakes
            );
            os.shutdown();
        }
        q.push_back((id, s));
    }

    fn close_handshake(&self, id: u64) {
        self.opening().retain(|(i, _)| *i != id);
    }
}

fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: fds is a live, exclusively borrowed slice of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Counts a connection out of the handshake budget when dropped.
struct Handshaking<'a>(&'a Shared, u64);

impl Drop for Handshaking<'_> {
    fn drop(&mut self) {
        self.0.close_handshake(self.1);
    }
}

/// Counts an established connection out when dropped.
struct Established<'a>(&'a AtomicUsize);

impl Drop for Established<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_connection(shared: &Shared, mut stream: Stream, peer: &str, conn_id: u64) {
    let budget = Handshaking(shared, conn_id);
    let mut exports = shared.exports.exports();
    let deadline = Instant::now() + shared.cfg.handshake_timeout;
    let neg = {
        let mut d = Deadlined {
            s: &mut stream,
            deadline,
        };
        let lookup = |name: &str| shared.exports.lookup(name);
        match nbd::serve_handshake_with(&mut d, &mut exports, &lookup) {
            Ok(Outcome::Transmission(n)) => n,
            Ok(Outcome::Aborted) => {
                log::debug!("{peer}: client ended the handshake");
                return;
            }
            Err(e) => {
                log::warn!("{peer}: handshake failed: {e}");
                return;
            }
        }
    };
    drop(budget);
    let max = shared.cfg.max_connections;
    if shared.established.fetch_add(1, Ordering::AcqRel) >= max {
        shared.established.fetch_sub(1, Ordering::AcqRel);
        log::warn!("{peer}: closed after its handshake, already serving {max} connections");
        return;
    }
    let _established = Established(&shared.established);
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    let Some(export) = exports.get(neg.export) else {
        log::error!(
            "{peer}: the handshake chose export {} of {}",
            neg.export,
            exports.len()
        );
        return;
    };
    let open = match shared.exports.open(&export.name) {
        Ok(o) => o,
        Err(e) => {
            log::warn!("{peer}: cannot open export {:?}: {e}", export.name);
            return;
        }
    };
    log::info!(
        "{peer}: connected to {:?} (structured replies: {}, block status: {})",
        export.name,
        neg.structured_replies,
        neg.base_allocation
    );
    let cfg = ConnConfig {
        disk: &*open.disk,
        capture: &*open.capture,
        limits: ExportLimits {
            size: export.size,
            read_only: open.read_only || export.flags & FLAG_READ_ONLY != 0,
            max_payload: MAX_PAYLOAD,
            structured_replies: neg.structured_replies,
            block_status: neg.base_allocation,
        },
        shutdown_fd: shared.shutdown_rx.as_raw_fd(),
        peer,
        claims: &open.claims,
        conn_id,
    };
    let result = Connection::new(stream.fd(), cfg).and_then(Connection::run);
    match result {
        Ok(s) => log::info!(
            "{peer}: disconnected after {} requests ({} bytes read, {} written, {} errors)",
            s.requests,
            s.bytes_read,
            s.bytes_written,
            s.errors
        ),
        Err(e) => log::error!("{peer}: connection failed: {e}"),
    }
}
