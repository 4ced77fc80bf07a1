//! A minimal Prometheus endpoint for blockship's daemons: a thread that
//! answers `GET /metrics` with the text exposition format, and a builder
//! for that text.
//!
//! It is *not* a metrics registry: each daemon renders its own numbers
//! from the state it already keeps, when a scrape arrives.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Renders the current metrics text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Listen on `addr` and answer scrapes from a background thread. Returns
/// the bound address (useful with port 0).
pub fn serve(addr: SocketAddr, render: Render) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                if let Err(e) = answer(s, &render) {
                    log::debug!("metrics request failed: {e}");
                }
            }
        })?;
    log::info!("Prometheus metrics on http://{local}/metrics");
    Ok(local)
}

fn answer(s: TcpStream, render: &Render) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    // Skip the request headers.
    let mut h = String::new();
    while r.read_line(&mut h)? > 2 {
        h.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let mut s = s;
    if path == "/metrics" || path == "/" {
        let body = render();
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
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
        let addr = serve(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            Arc::new(|| "m 1\n".into()),
        )
        .expect("bind on loopback");
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut got = String::new();
        std::io::Read::read_to_string(&mut c, &mut got).expect("read");
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        assert!(got.ends_with("\r\n\r\nm 1\n"), "{got}");
    }
}
