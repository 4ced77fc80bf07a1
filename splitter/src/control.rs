//! The control socket of a `splitter serve` with `--ring R`: a unix socket
//! at `R.ctl` through which other processes (`splitter mark`) ask the
//! splitter that owns the ring to append a mark.
//!
//! Protocol: one request line, one reply line, then the server closes.
//!
//! ```text
//! mark <flags> <name>\n          flags: comma-separated, one of `crash` / `app`,
//!                                 optionally `by=<ns since the epoch>` (append
//!                                 only before then); the name is the rest of
//!                                 the line (spaces allowed)
//! ok seq=<seq> time_ns=<ns>\n     the mark is in the ring and durable
//! error <message>\n               nothing was recorded, unless the message says so
//! ```
//!
//! The socket is created by `splitter serve` (mode 0600; a stale one left
//! by a killed splitter is replaced: the ring's producer lock says no other
//! splitter owns it) and removed when it stops. One thread serves it with
//! `poll`: at most [`MAX_CONNECTIONS`] clients at once (more are told
//! `error busy` and closed), a request line of at most [`MAX_REQUEST`]
//! bytes, which must arrive within [`REQUEST_TIMEOUT`]; a client that
//! sends nothing or garbage is dropped and never delays another.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use crate::mark::{check_name, MarkPoint, MarkRequest, Marker};
use crate::{CaptureSession, WriteCapture};

/// Longest request line, newline included (a 4096-byte name and flags).
pub const MAX_REQUEST: usize = 4096 + 128;
/// Clients served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the serving thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// The control socket of the ring at `ring`: `ring` with `.ctl` appended.
pub fn socket_path(ring: &Path) -> PathBuf {
    let mut s = OsString::from(ring.as_os_str());
    s.push(".ctl");
    PathBuf::from(s)
}

/// The request line for `req` (with its newline).
pub fn request_line(req: &MarkRequest) -> String {
    let mut flags = String::from(if req.app { "app" } else { "crash" });
    if let Some(by) = req.append_by_ns {
        flags.push_str(&format!(",by={by}"));
    }
    format!("mark {flags} {}\n", req.name)
}

/// Parse a request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<MarkRequest, String> {
    let line = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string())?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line
        .strip_prefix("mark ")
        .ok_or_else(|| "unknown request (expected `mark <flags> <name>`)".to_string())?;
    let (flags, name) = rest
        .split_once(' ')
        .ok_or_else(|| "expected `mark <flags> <name>`".to_string())?;
    let mut app = None;
    let mut append_by_ns = None;
    for f in flags.split(',') {
        match f {
            "crash" | "app" if app.is_some() => {
                return Err("give one of the flags crash and app".into())
            }
            "crash" => app = Some(false),
            "app" => app = Some(true),
            _ => match f.strip_prefix("by=") {
                Some(n) => {
                    append_by_ns =
                        Some(n.parse::<u64>().map_err(|_| {
                            format!("bad flag {f:?}: by= takes ns since the epoch")
                        })?);
                }
                None => return Err(format!("unknown flag {f:?}")),
            },
        }
    }
    let app = app.ok_or_else(|| "give one of the flags crash and app".to_string())?;
    check_name(name)?;
    Ok(MarkRequest {
        name: name.to_string(),
        app,
        append_by_ns,
    })
}

/// The reply line for a request's result (with its newline).
pub fn reply_line(r: &Result<MarkPoint, String>) -> String {
    match r {
        Ok(p) => format!("ok seq={} time_ns={}\n", p.seq, p.time_ns),
        // One line: the message never holds a newline.
        Err(e) => format!("error {}\n", e.replace(['\n', '\r'], " ")),
    }
}

/// Parse a reply line (without its newline).
pub fn parse_reply(line: &str) -> Result<Result<MarkPoint, String>, String> {
    if let Some(e) = line.strip_prefix("error ") {
        return Ok(Err(e.to_string()));
    }
    let rest = line
        .strip_prefix("ok ")
        .ok_or_else(|| format!("unexpected reply {line:?}"))?;
    let (mut seq, mut time_ns) = (None, None);
    for kv in rest.split(' ') {
        match kv.split_once('=') {
            Some(("seq", v)) => seq = v.parse().ok(),
            Some(("time_ns", v)) => time_ns = v.parse().ok(),
            _ => {} // later fields
        }
    }
    match (seq, time_ns) {
        (Some(seq), Some(time_ns)) => Ok(Ok(MarkPoint { seq, time_ns })),
        _ => Err(format!("reply without seq and time_ns: {line:?}")),
    }
}

/// Why a request over the control socket did not give a mark.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens there (no socket, a stale one, a path too long for a
    /// socket): no splitter serves the ring.
    #[error("{0}")]
    NoServer(io::Error),
    /// The splitter answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The exchange failed after connecting (timeout, connection closed,
    /// a bad reply): the mark may or may not have been recorded.
    #[error("{0}")]
    Io(io::Error),
}

/// Ask the splitter listening at `socket` to append `req`; `timeout` bounds
/// the whole exchange.
pub fn request(
    socket: &Path,
    req: &MarkRequest,
    timeout: Duration,
) -> Result<MarkPoint, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::InvalidInput => ClientError::NoServer(e),
        // ENOTSOCK (a file that is no socket) and the like.
        _ if e.raw_os_error() == Some(libc::ENOTSOCK) => ClientError::NoServer(e),
        _ => ClientError::Io(e),
    })?;
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left())).map_err(ClientError::Io)?;
    s.write_all(request_line(req).as_bytes())
        .map_err(ClientError::Io)?;
    let mut reply = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    loop {
        s.set_read_timeout(Some(left())).map_err(ClientError::Io)?;
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply within {} ms", timeout.as_millis()),
                )))
            }
            Err(e) => return Err(ClientError::Io(e)),
        };
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the splitter closed the connection without a reply",
            )));
        }
        reply.extend_from_slice(&buf[..n]);
        if let Some(end) = reply.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&reply[..end]);
            return match parse_reply(&line) {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => Err(ClientError::Refused(e)),
                Err(e) => Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e,
                ))),
            };
        }
        if reply.len() > 4 * MAX_REQUEST {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply line too long",
            )));
        }
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("control socket {path}: {what}: {source}")]
pub struct ControlError {
    /// The socket's path.
    pub path: PathBuf,
    /// What was tried.
    pub what: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// The control socket of a running `splitter serve`; stops its thread and
/// removes the socket when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    ino: u64,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Create the control socket of the ring at `ring` (replacing a stale
    /// one) and serve mark requests with `marker` from a thread. Call it
    /// only as the ring's producer (its lock says no other splitter owns
    /// the ring, so an existing socket is stale).
    pub fn start(ring: &Path, marker: Arc<Marker>) -> Result<ControlServer, ControlError> {
        let path = socket_path(ring);
        let err = |what| {
            let path = path.clone();
            move |source| ControlError { path, what, source }
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                log::info!("replacing the stale control socket {}", path.display());
                std::fs::remove_file(&path).map_err(err("removing the stale socket"))?;
            }
            Ok(_) => {
                return Err(err("it exists and is not a socket; move it away")(
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("looking at it")(e)),
        }
        let listener = bind(&path).map_err(err("creating it"))?;
        let ino = std::fs::metadata(&path)
            .map_err(err("looking at it"))?
            .ino();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || serve(&listener, &marker, &stop))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(err("starting its thread")(e));
            }
        };
        Ok(ControlServer {
            path,
            ino,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop serving and remove the socket (when it is still ours).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the control socket's thread panicked");
            }
            if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening unix socket at `path`, mode 0600 before it accepts anyone.
fn bind(path: &Path) -> io::Result<UnixListener> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| Ok(socket::listen(&fd, Backlog::new(16)?)?));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Send `line` without waiting (a short reply to a fresh socket fits its
/// buffer; a client that does not read loses it) and close.
fn answer(mut stream: UnixStream, line: &str) {
    let _ = stream.write(line.as_bytes());
}

/// What a connection's bytes so far amount to.
enum Progress {
    /// Keep reading.
    More,
    /// Answer with this line and close.
    Done(String),
}

fn read_some(c: &mut Conn, marker: &Marker) -> Progress {
    let mut chunk = [0u8; 1024];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                // The client closed its side: what it sent is the request,
                // if anything.
                if c.buf.is_empty() {
                    return Progress::Done(String::new());
                }
                return Progress::Done(handle(&c.buf, marker));
            }
            Ok(n) => {
                let start = c.buf.len();
                c.buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = c.buf[start..].iter().position(|&b| b == b'\n') {
                    let line = &c.buf[..start + i];
                    return Progress::Done(handle(line, marker));
                }
                if c.buf.len() >= MAX_REQUEST {
                    return Progress::Done(reply_line(&Err(format!(
                        "request longer than {MAX_REQUEST} bytes"
                    ))));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
            Err(_) => return Progress::Done(String::new()),
        }
    }
}

fn handle(line: &[u8], marker: &Marker) -> String {
    let r = parse_request(line).and_then(|req| {
        let r = marker.mark(&req);
        match &r {
            Ok(p) => log::info!(
                "mark {:?} at seq {} ({}), asked over the control socket",
                req.name,
                p.seq,
                if req.app {
                    "application-consistent"
                } else {
                    "crash-consistent"
                }
            ),
            Err(e) => log::warn!("mark {:?} refused: {e}", req.name),
        }
        r
    });
    reply_line(&r)
}

/// The control socket's loop: accept, read request lines, answer; until
/// `stop` is set.
fn serve(listener: &UnixListener, marker: &Marker, stop: &AtomicBool) {
    let mut conns: Vec<Conn> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(TICK)
            .min(TICK);
        let readable: Vec<bool> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for c in &conns {
                fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
            }
            // At most TICK: fits u16 milliseconds.
            let ms = u16::try_from(wait.as_millis()).unwrap_or(100).max(1);
            match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("control socket: poll failed: {e}; marks from other processes are no longer served");
                    return;
                }
            }
        };
        // Connections first (their indices shift when the new ones come).
        let mut keep = Vec::with_capacity(conns.len());
        for (i, mut c) in conns.drain(..).enumerate() {
            let ready = readable.get(i + 1).copied().unwrap_or(false);
            if ready {
                match read_some(&mut c, marker) {
                    Progress::More => {}
                    Progress::Done(line) => {
                        answer(c.stream, &line);
                        continue;
                    }
                }
            }
            if Instant::now() >= c.deadline {
                answer(
                    c.stream,
                    &reply_line(&Err(format!(
                        "no request line within {} ms",
                        REQUEST_TIMEOUT.as_millis()
                    ))),
                );
                continue;
            }
            keep.push(c);
        }
        conns = keep;
        if readable.first().copied().unwrap_or(false) {
            accept_all(listener, &mut conns);
        }
    }
}

fn accept_all(listener: &UnixListener, conns: &mut Vec<Conn>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if conns.len() >= MAX_CONNECTIONS {
                    answer(
                        stream,
                        &reply_line(&Err("busy: too many clients at once; try again".into())),
                    );
                    continue;
                }
                conns.push(Conn {
                    stream,
                    buf: Vec::new(),
                    deadline: Instant::now() + REQUEST_TIMEOUT,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // EMFILE and the like: the client waits in the backlog.
                log::warn!("control socket: accept failed: {e}");
                return;
            }
        }
    }
}

/// A ring capture whose marks are refused from the moment it starts to
/// close: no mark can follow the ring's clean close.
pub struct GatedCapture<C> {
    inner: C,
    marker: Arc<Marker>,
}

impl<C> GatedCapture<C> {
    /// `inner`, closing `marker` before it closes.
    pub fn new(inner: C, marker: Arc<Marker>) -> GatedCapture<C> {
        GatedCapture { inner, marker }
    }
}

impl<C: WriteCapture> WriteCapture for GatedCapture<C> {
    fn session(&self) -> Box<dyn CaptureSession + '_> {
        self.inner.session()
    }
    fn close(&self) -> io::Result<()> {
        self.marker.close();
        self.inner.close()
    }
    fn interrupt(&self) {
        self.inner.interrupt();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;
    use ring::Producer;

    #[test]
    fn requests_and_replies_round_trip() {
        let r = MarkRequest {
            name: "nightly db backup".into(),
            app: true,
            append_by_ns: Some(17),
        };
        let line = request_line(&r);
        assert_eq!(line, "mark app,by=17 nightly db backup\n");
        assert_eq!(parse_request(line.trim_end().as_bytes()).unwrap(), r);
        let c = parse_request(b"mark crash x").unwrap();
        assert_eq!((c.name.as_str(), c.app, c.append_by_ns), ("x", false, None));
        for bad in [
            &b"mark"[..],
            b"mark app",
            b"mark  x",
            b"mark app,crash x",
            b"mark app,ttl=3 x",
            b"mark app,by=soon x",
            b"unmark app x",
            b"mark app a\x01b",
            b"mark app \xff",
            b"\x00\x00\x00",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        let p = MarkPoint { seq: 5, time_ns: 9 };
        assert_eq!(reply_line(&Ok(p)), "ok seq=5 time_ns=9\n");
        assert_eq!(parse_reply("ok seq=5 time_ns=9").unwrap(), Ok(p));
        assert_eq!(
            parse_reply(reply_line(&Err("no\nroom".into())).trim_end()).unwrap(),
            Err("no room".into())
        );
        assert!(parse_reply("ok seq=5").is_err());
        assert!(parse_reply("what").is_err());
    }

    #[test]
    fn the_socket_path_is_next_to_the_ring() {
        assert_eq!(
            socket_path(Path::new("/var/lib/blockship/db.ring")),
            Path::new("/var/lib/blockship/db.ring.ctl")
        );
    }

    /// A fresh 1 MiB ring for a 64 MiB disk in `dir` (the splitter's tests share it).
    pub(crate) fn producer(dir: &Path) -> (PathBuf, Arc<Producer>) {
        let path = dir.join("disk.ring");
        let disk = ring::DiskIdentity {
            size: 64 << 20,
            fingerprint: [1, 2],
            path: "/dev/test".into(),
        };
        let opts = ring::CreateOptions {
            capacity: 1 << 20,
            granularity: 64 << 10,
            disk_holds_data: false,
        };
        let (p, _) =
            Producer::open_or_create(&path, &opts, &disk, ring::FullPolicy::Bitmap).unwrap();
        (path, Arc::new(p))
    }

    #[test]
    fn hostile_clients_do_not_delay_a_mark_and_the_socket_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let (ring_path, p) = producer(dir.path());
        // A stale socket from a killed splitter is replaced.
        let sock = socket_path(&ring_path);
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let mut server = ControlServer::start(&ring_path, Arc::new(Marker::new(p))).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Silent clients, one with half a line, one with garbage.
        let silent: Vec<UnixStream> = (0..5)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        let mut half = UnixStream::connect(&sock).unwrap();
        half.write_all(b"mark crash half").unwrap();
        let mut garbage = UnixStream::connect(&sock).unwrap();
        garbage.write_all(&[0xffu8; 3000]).unwrap();
        garbage.write_all(b"\n").unwrap();
        let mut big = UnixStream::connect(&sock).unwrap();
        let _ = big.write_all(&vec![b'x'; MAX_REQUEST + 10]);

        let t = Instant::now();
        let req = MarkRequest {
            name: "point".into(),
            app: false,
            append_by_ns: None,
        };
        let got = request(&sock, &req, Duration::from_secs(5)).unwrap();
        assert_eq!(got.seq, 1);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

        let mut line = String::new();
        garbage
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        garbage.read_to_string(&mut line).unwrap();
        assert!(line.starts_with("error "), "{line}");
        line.clear();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = big.read_to_string(&mut line);
        assert!(line.contains("longer than"), "{line}");
        // The silent ones are dropped after the request timeout.
        line.clear();
        half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        half.read_to_string(&mut line).unwrap();
        assert!(line.contains("no request line"), "{line}");
        drop(silent);

        // A refused request is an error reply.
        let bad = MarkRequest {
            name: "late".into(),
            app: true,
            append_by_ns: Some(1),
        };
        assert!(matches!(
            request(&sock, &bad, Duration::from_secs(5)),
            Err(ClientError::Refused(_))
        ));
        server.stop();
        assert!(!sock.exists());
        assert!(matches!(
            request(&sock, &req, Duration::from_secs(5)),
            Err(ClientError::NoServer(_))
        ));
        let (entries, _) = ring::dump(&ring_path, None, 10).unwrap();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn too_many_clients_are_told_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (ring_path, p) = producer(dir.path());
        let _server = ControlServer::start(&ring_path, Arc::new(Marker::new(p))).unwrap();
        let sock = socket_path(&ring_path);
        let _held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        // Let the server take them all.
        std::thread::sleep(Duration::from_millis(300));
        let req = MarkRequest {
            name: "x".into(),
            app: false,
            append_by_ns: None,
        };
        match request(&sock, &req, Duration::from_secs(5)) {
            Err(ClientError::Refused(e)) => assert!(e.contains("busy"), "{e}"),
            other => panic!("expected busy, got {other:?}"),
        }
    }
}
