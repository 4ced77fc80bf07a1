//! The NBD server: listeners (TCP and unix socket), the accept loop, the
//! handshake, one thread per connection, and an orderly shutdown.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nbd::protocol::{
    FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH,
    FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES,
};
use nbd::{Export, ExportLimits, Outcome};

use crate::capture::WriteCapture;
use crate::connection::{ConnConfig, Connection};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::overlap::Claims;

/// Largest READ or WRITE accepted (advertised in NBD_INFO_BLOCK_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred I/O size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;
/// Connections served at once; more are refused at accept.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The export's name (clients may also ask for the empty name).
    pub export_name: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Where to listen.
    pub listen: Vec<ListenAddr>,
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
}

struct Shared {
    disk: Disk,
    claims: Claims,
    capture: Arc<dyn WriteCapture>,
    export: Export,
    read_only: bool,
    shutdown_rx: UnixStream,
}

/// A bound, not yet running NBD server for one disk.
pub struct Server {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown_tx: Arc<UnixStream>,
}

impl Server {
    /// Bind every listener for `disk`, with `capture` as the write filter.
    pub fn bind(disk: Disk, capture: Arc<dyn WriteCapture>, cfg: &ServeConfig) -> Result<Server> {
        let read_only = cfg.read_only || disk.read_only();
        let mut flags = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        let export = Export {
            name: cfg.export_name.clone(),
            description: format!("blockship splitter: {}", disk.path().display()),
            size: disk.size(),
            flags,
            block_sizes: (1, PREFERRED_BLOCK, MAX_PAYLOAD),
        };
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
                disk,
                claims: Claims::default(),
                capture,
                export,
                read_only,
                shutdown_rx: rx,
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
        // A connection blocked on a full ring (`--ring-full block`, shipper
        // gone) must not hold the shutdown forever.
        self.shared.capture.interrupt();
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
        let sync = self.shared.disk.sync().map_err(|source| Error::Io {
            what: "flushing the disk at shutdown",
            source,
        });
        let cap = self.shared.capture.close().map_err(|source| Error::Io {
            what: "closing the capture (ring) at shutdown",
            source,
        });
        r.and(sync).and(cap)
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
                if conns.len() >= MAX_CONNECTIONS {
                    log::warn!("{peer}: refused, already serving {MAX_CONNECTIONS} connections");
                    continue;
                }
                let shared = self.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-conn-{next_id}"))
                    .spawn({
                        let id = *next_id;
                        move || serve_connection(&shared, stream, &peer, id)
                    });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => log::error!("cannot start a connection thread: {e}"),
                }
            }
        }
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

fn serve_connection(shared: &Shared, mut stream: Stream, peer: &str, conn_id: u64) {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let exports = std::slice::from_ref(&shared.export);
    let neg = match nbd::serve_handshake(&mut stream, exports) {
        Ok(Outcome::Transmission(n)) => n,
        Ok(Outcome::Aborted) => {
            log::debug!("{peer}: client ended the handshake");
            return;
        }
        Err(e) => {
            log::warn!("{peer}: handshake failed: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    log::info!(
        "{peer}: connected (structured replies: {}, block status: {})",
        neg.structured_replies,
        neg.base_allocation
    );
    let cfg = ConnConfig {
        disk: &shared.disk,
        capture: &*shared.capture,
        limits: ExportLimits {
            size: shared.export.size,
            read_only: shared.read_only,
            max_payload: MAX_PAYLOAD,
            structured_replies: neg.structured_replies,
            block_status: neg.base_allocation,
        },
        shutdown_fd: shared.shutdown_rx.as_raw_fd(),
        peer,
        claims: &shared.claims,
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
