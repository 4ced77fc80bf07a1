//! [`Link`]: frames over a non-blocking TLS connection, driven by one thread.
//!
//! The owner calls [`Link::send`] to queue a frame (encrypted at once into
//! rustls's buffer), [`Link::pump`] to move bytes both ways without
//! blocking, [`Link::next_frame`] to take complete received frames, and
//! [`Link::wait`] to sleep until the socket is ready or a timeout passes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use wire::frame::{FrameHeader, FrameType, FRAME_HEADER_LEN};
use wire::WireError;

/// A received frame's place in the link's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The checked header.
    pub header: FrameHeader,
    /// Total bytes (header and body) to [`Link::consume`] after use.
    pub total: usize,
}

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed, or the peer closed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// TLS failed: a bad certificate, a damaged record, a protocol violation.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The peer sent a bad frame.
    #[error("bad frame from the peer: {0}")]
    Wire(#[from] WireError),
}

/// A TLS connection carrying frames.
pub struct Link {
    /// The TLS state (client or server side).
    pub tls: rustls::Connection,
    sock: TcpStream,
    inbuf: Vec<u8>,
    start: usize,
    eof: bool,
    /// When bytes last arrived.
    pub last_rx: Instant,
    /// When a frame was last queued.
    pub last_tx: Instant,
    /// Bytes written to the socket (TLS records), cumulative.
    pub bytes_out: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.sock.peer_addr().ok())
            .finish()
    }
}

impl Link {
    /// Wrap a connected socket (made non-blocking) and a fresh TLS connection.
    pub fn new(tls: impl Into<rustls::Connection>, sock: TcpStream) -> io::Result<Link> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let mut tls = tls.into();
        // The owner bounds what it queues (its window); rustls must not
        // refuse part of a frame.
        tls.set_buffer_limit(None);
        Ok(Link {
            tls,
            sock,
            inbuf: Vec::with_capacity(64 << 10),
            start: 0,
            eof: false,
            last_rx: Instant::now(),
            last_tx: Instant::now(),
            bytes_out: 0,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> String {
        self.sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// Complete the TLS handshake within `timeout`.
    pub fn handshake(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        while self.tls.is_handshaking() {
            self.pump()?;
            if !self.tls.is_handshaking() {
                break;
            }
            if self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the peer closed the connection during the TLS handshake",
                )
                .into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out").into(),
                );
            }
            self.wait(left.min(Duration::from_millis(100)))?;
        }
        // Send what the handshake still owes (the client's Finished).
        self.pump()?;
        Ok(())
    }

    /// Queue one frame; it is encrypted now and sent by [`Link::pump`].
    pub fn send(&mut self, ftype: FrameType, body: &[u8]) -> io::Result<()> {
        self.send_parts(ftype, &[body])
    }

    /// Queue one frame whose body is the concatenation of `parts`.
    pub fn send_parts(&mut self, ftype: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut crc = 0u32;
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        let h = FrameHeader {
            ftype,
            len: u32::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            body_crc: crc,
        };
        let mut w = self.tls.writer();
        w.write_all(&h.encode())?;
        for p in parts {
            w.write_all(p)?;
        }
        self.last_tx = Instant::now();
        Ok(())
    }

    /// Ciphertext is waiting to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// The peer closed its side.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Move bytes without blocking: write what the socket takes, read what
    /// arrived, decrypt it into the frame buffer.
    pub fn pump(&mut self) -> Result<(), LinkError> {
        self.write_out()?;
        while !self.eof {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => self.eof = true,
                Ok(_) => self.last_rx = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let state = self.tls.process_new_packets()?;
            if state.plaintext_bytes_to_read() > 0 {
                self.take_plaintext()?;
            }
            if state.peer_has_closed() {
                self.eof = true;
            }
        }
        // A handshake message may have queued a reply.
        self.write_out()?;
        Ok(())
    }

    /// Write queued ciphertext until the socket would block.
    fn write_out(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(n) => self.bytes_out += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn take_plaintext(&mut self) -> io::Result<()> {
        if self.start > 0 && self.start * 2 >= self.inbuf.len() {
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        let mut r = self.tls.reader();
        let mut chunk = [0u8; 16 << 10];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete received frame, checked. Read its body with
    /// [`Link::body`], then [`Link::consume`] it.
    pub fn next_frame(&self) -> Result<Option<Received>, WireError> {
        Ok(wire::io::parse_frame(&self.inbuf[self.start..])?
            .map(|(header, total)| Received { header, total }))
    }

    /// The body of a frame returned by [`Link::next_frame`].
    pub fn body(&self, r: &Received) -> &[u8] {
        &self.inbuf[self.start + FRAME_HEADER_LEN..self.start + r.total]
    }

    /// Forget a frame once handled.
    pub fn consume(&mut self, r: &Received) {
        self.start += r.total;
        if self.start == self.inbuf.len() {
            self.inbuf.clear();
            self.start = 0;
        }
    }

    /// Sleep until the socket is readable (or writable, when ciphertext is
    /// waiting) or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut flags = PollFlags::POLLIN;
        if self.tls.wants_write() {
            flags |= PollFlags::POLLOUT;
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.sock.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Write everything queued, waiting up to `timeout`.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump()?;
            if !self.tls.wants_write() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(
                    io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading").into(),
                );
            }
            self.wait(left.min(Duration::from_millis(100)))?;
        }
    }

    /// After a final frame (an error): send what is queued and close_notify,
    /// shut down our direction, and read (discarding) until the peer closes
    /// or `timeout` passes, so the peer reads the final frame instead of a
    /// connection reset.
    pub fn linger_close(&mut self, timeout: Duration) {
        self.tls.send_close_notify();
        let deadline = Instant::now() + timeout;
        let _ = self.flush(timeout);
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        while !self.eof && Instant::now() < deadline {
            if self.pump().is_err() {
                break;
            }
            self.inbuf.clear();
            self.start = 0;
            let _ = self.wait(Duration::from_millis(50));
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Send TLS close_notify and close the socket, best effort.
    pub fn close(mut self) {
        self.tls.send_close_notify();
        let _ = self.flush(Duration::from_millis(200));
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
