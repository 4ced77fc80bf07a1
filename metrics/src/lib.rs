//! A minimal Prometheus endpoint for blockship's daemons: a thread that
//! answers `GET /metrics` with the text exposition format, and a builder
//! for that text.
//!
//! It is *not* a metrics registry: each daemon renders its own numbers
//! from the state it already keeps, when a scrape arrives.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Renders the current metrics text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What one scrape may take; a client beyond them is answered 431 or 400,
/// or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections answered at once (each on a thread of its own); one more
    /// is closed at once.
    pub max_connections: usize,
    /// The whole request and answer, from accept to close.
    pub deadline: Duration,
    /// Bytes of the request line and headers.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8,
            deadline: Duration::from_secs(5),
            max_header_bytes: 8 << 10,
        }
    }
}

/// Listen on `addr` and answer scrapes from a background thread, within
/// the default [`Limits`]. Returns the bound address (useful with port 0).
pub fn serve(addr: SocketAddr, render: Render) -> std::io::Result<SocketAddr> {
    serve_with(addr, render, Limits::default())
}

/// [`serve`] with other limits.
pub fn serve_with(addr: SocketAddr, render: Render, limits: Limits) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                // Only this thread adds, so the check cannot overshoot.
                if open.load(Ordering::Acquire) >= limits.max_connections {
                    log::debug!(
                        "metrics: {} scrapes running, closing one more",
                        limits.max_connections
                    );
                    continue;
                }
                open.fetch_add(1, Ordering::AcqRel);
                let (render, open2) = (render.clone(), open.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics-scrape".into())
                    .spawn(move || {
                        if let Err(e) = answer(s, &render, &limits) {
                            log::debug!("metrics request failed: {e}");
                        }
                        open2.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    log::debug!("metrics: cannot start a thread: {e}");
                    open.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    log::info!("Prometheus metrics on http://{local}/metrics");
    Ok(local)
}

/// Time left before `deadline`, as a socket timeout (never zero, which
/// would mean none); an error once it passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the request took longer than its deadline",
        ));
    }
    Ok(d)
}

/// Read the request line and headers (up to the empty line) by `deadline`.
/// `Ok(None)`: more than `max` bytes.
fn read_head(s: &mut TcpStream, deadline: Instant, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .or_else(|| head.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
        {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > max {
            return Ok(None);
        }
        s.set_read_timeout(Some(left(deadline)?))?;
        // Never more than one byte past the limit, whatever was sent.
        let want = buf.len().min(max + 1 - head.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the client closed before the end of its request",
                ))
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                left(deadline)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Write all of `b` by `deadline`.
fn write_by(s: &mut TcpStream, b: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    while at < b.len() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(&b[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                left(deadline)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn status(code: &str) -> String {
    format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
}

/// Answer a bad request with `code`, then take (and drop) what the client
/// still sends, up to 1 MiB and the deadline, so it reads the answer rather
/// than a connection reset.
fn refuse(s: &mut TcpStream, code: &str, deadline: Instant) -> std::io::Result<()> {
    write_by(s, status(code).as_bytes(), deadline)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut buf = [0u8; 4096];
    let mut taken = 0usize;
    while taken < 1 << 20 {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => taken += n,
        }
    }
    Ok(())
}

fn answer(mut s: TcpStream, render: &Render, limits: &Limits) -> std::io::Result<()> {
    let deadline = Instant::now() + limits.deadline;
    let Some(head) = read_head(&mut s, deadline, limits.max_header_bytes)? else {
        return refuse(&mut s, "431 Request Header Fields Too Large", deadline);
    };
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or("");
    let mut words = line.split_whitespace();
    let (method, path, version) = (words.next(), words.next(), words.next());
    if words.next().is_some() || !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return refuse(&mut s, "400 Bad Request", deadline);
    }
    if method != Some("GET") && method != Some("HEAD") {
        return refuse(&mut s, "405 Method Not Allowed", deadline);
    }
    if matches!(path, Some("/metrics" | "/")) {
        let body = render();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if method == Some("GET") {
            out.push_str(&body);
        }
        write_by(&mut s, out.as_bytes(), deadline)
    } else {
        write_by(&mut s, status("404 Not Found").as_bytes(), deadline)
    }
}

/// Builds exposition text: one `# HELP`/`# TYPE` per metric name, then samples.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
    last: String,
}

impl Text {
    /// An empty text.
    pub fn new() -> Text {
        Text::default()
    }

    /// One sample. `kind` is "gauge" or "counter"; `labels` are name/value pairs.
    pub fn sample(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        if self.last != name {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
            self.last = name.to_string();
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let esc = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{esc}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(limits: Limits) -> SocketAddr {
        serve_with(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            Arc::new(|| "m 1\n".into()),
            limits,
        )
        .expect("bind on loopback")
    }

    /// Send `req`, read the answer until the server closes (or 10 s).
    fn ask(addr: SocketAddr, req: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // The server may answer and close before taking all of it.
        let _ = c.write_all(req);
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn text_and_scrape() {
        let mut t = Text::new();
        t.sample("x_total", "counter", "X.", &[("disk", "a\"b")], 3.0);
        t.sample("x_total", "counter", "X.", &[("disk", "c")], 4.5);
        let s = t.finish();
        assert_eq!(
            s,
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{disk=\"a\\\"b\"} 3\nx_total{disk=\"c\"} 4.5\n"
        );
        let addr = start(Limits::default());
        let got = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        assert!(got.ends_with("\r\n\r\nm 1\n"), "{got}");
        let got = ask(addr, b"GET /nothing HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    }

    #[test]
    fn headers_over_the_limit_get_431_and_junk_400() {
        let addr = start(Limits::default());
        let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while req.len() < 64 << 10 {
            req.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        req.extend_from_slice(b"\r\n");
        let got = ask(addr, &req);
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        // One endless header line, no newline at all.
        let got = ask(addr, &vec![b'a'; 32 << 10]);
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        let got = ask(addr, b"\x16\x03\x01 hello\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        // Still answering.
        let got = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    }

    #[test]
    fn a_trickling_client_is_closed_at_the_deadline() {
        let limits = Limits {
            deadline: Duration::from_millis(800),
            ..Limits::default()
        };
        let addr = start(limits);
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let t = Instant::now();
        // One byte every 50 ms renews any per-read timeout, never ends.
        let closed = loop {
            if c.write_all(b"X").is_err() {
                break true;
            }
            let mut b = [0u8; 64];
            match c.read(&mut b) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break true,
            }
            if t.elapsed() > Duration::from_secs(5) {
                break false;
            }
        };
        assert!(closed, "still open after {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn connections_beyond_the_cap_are_closed_and_scrapes_resume() {
        let limits = Limits {
            max_connections: 4,
            deadline: Duration::from_secs(2),
            ..Limits::default()
        };
        let addr = start(limits);
        // Four silent clients hold every place...
        let idle: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // ...so a fifth is closed at once, without an answer.
        let t = Instant::now();
        let got = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(got, "", "answered beyond the cap");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // The deadline frees the places; scrapes are answered again.
        std::thread::sleep(Duration::from_millis(2500));
        let got = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        drop(idle);
    }
}
