//! [`Link`]: frames over a non-blocking TLS connection, driven by one thread.
//!
//! The owner calls [`Link::send`] to queue a frame (encrypted at once into
//! rustls's buffer), [`Link::pump`] to move bytes both ways without
//! blocking, [`Link::next_frame`] to take complete received frames, and
//! [`Link::wait`] to sleep until the socket is ready or a timeout passes.
//!
//! What a link holds is bounded on the receive side: it reads from the
//! socket only while the bytes it buffered hold less than its read-ahead
//! (1 MiB by default) or the frame at their start is not complete yet, and
//! never past a header whose body is over the link's limit
//! ([`Link::set_limits`]). The send side holds what its owner queued;
//! [`Link::unsent`] tells how much that is, so the owner can stop taking
//! work (and reading) from a peer that does not read.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use wire::frame::{FrameHeader, FrameType, FRAME_HEADER_LEN, MAX_BODY};
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
    /// Ciphertext taken out of rustls (by [`Link::unsent`]) and not yet
    /// written to the socket: `out[out_start..]`. Written before anything
    /// rustls still holds.
    out: Vec<u8>,
    out_start: usize,
    /// Largest frame body accepted (a larger header is an error, and no
    /// byte of its body is read).
    max_body: u32,
    /// Bytes read ahead beyond a complete frame at most (roughly: one TLS
    /// record more may arrive).
    read_ahead: usize,
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

/// Default read-ahead of a link: buffered bytes beyond the first complete
/// frame after which it stops reading from the socket.
pub const DEFAULT_READ_AHEAD: usize = 1 << 20;

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
            out: Vec::new(),
            out_start: 0,
            max_body: MAX_BODY,
            read_ahead: DEFAULT_READ_AHEAD,
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
        self.out_start < self.out.len() || self.tls.wants_write()
    }

    /// Bytes queued and not yet written to the socket (TLS records, so a
    /// little more than the frames queued). Takes what rustls holds into
    /// the link's own buffer to count it exactly.
    pub fn unsent(&mut self) -> usize {
        while self.tls.wants_write() {
            // Writing into a Vec cannot fail or block; a zero means rustls
            // holds nothing more.
            match self.tls.write_tls(&mut self.out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.out.len() - self.out_start
    }

    /// Set the largest frame body accepted (default `MAX_BODY`; a header
    /// claiming more is an error before any of its body is read) and the
    /// read-ahead beyond a complete frame (default [`DEFAULT_READ_AHEAD`]).
    pub fn set_limits(&mut self, max_body: u32, read_ahead: usize) {
        self.max_body = max_body;
        self.read_ahead = read_ahead;
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.inbuf.len() - self.start
    }

    /// The header of the next frame as soon as its 24 bytes are here, before
    /// its body is (checked: magic, checksums, the type's limit; not the
    /// link's, which [`Link::next_frame`] checks).
    pub fn peek_header(&self) -> Result<Option<FrameHeader>, WireError> {
        let b = &self.inbuf[self.start..];
        if b.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        Ok(Some(FrameHeader::decode(&b[..FRAME_HEADER_LEN])?))
    }

    /// [`Link::peek_header`], and its body within the link's limit.
    fn peek_checked(&self) -> Result<Option<FrameHeader>, WireError> {
        let Some(h) = self.peek_header()? else {
            return Ok(None);
        };
        if h.len > self.max_body {
            return Err(WireError::Oversized {
                frame: h.ftype.name(),
                len: u64::from(h.len),
                max: u64::from(self.max_body),
            });
        }
        Ok(Some(h))
    }

    /// Whether reading more from the socket stays within the receive bounds.
    fn may_read(&self) -> bool {
        let buffered = self.buffered();
        match self.peek_checked() {
            Ok(None) => true,
            // next_frame reports it; nothing more is read.
            Err(_) => false,
            Ok(Some(h)) => buffered < (FRAME_HEADER_LEN + h.len as usize).max(self.read_ahead),
        }
    }

    /// The peer closed its side.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Move bytes without blocking: write what the socket takes, read what
    /// arrived, decrypt it into the frame buffer.
    pub fn pump(&mut self) -> Result<(), LinkError> {
        self.write_out()?;
        while !self.eof && self.may_read() {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => self.eof = true,
                Ok(_) => self.last_rx = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let state = match self.tls.process_new_packets() {
                Ok(st) => st,
                Err(e) => {
                    // rustls queued an alert saying why (a certificate the
                    // peer must hear was refused): send it before failing,
                    // or the peer only sees the connection close.
                    let _ = self.write_out();
                    return Err(e.into());
                }
            };
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

    /// Write what is queued without reading anything (for a peer that is
    /// not read from until it has taken what it was sent).
    pub fn pump_out(&mut self) -> Result<(), LinkError> {
        Ok(self.write_out()?)
    }

    /// Write queued ciphertext until the socket would block.
    fn write_out(&mut self) -> io::Result<()> {
        while self.out_start < self.out.len() {
            match self.sock.write(&self.out[self.out_start..]) {
                Ok(n) => {
                    self.out_start += n;
                    self.bytes_out += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !self.out.is_empty() {
            // Everything taken out of rustls is written: give the memory back
            // when it was a lot.
            self.out.clear();
            self.out_start = 0;
            if self.out.capacity() > 1 << 20 {
                self.out = Vec::new();
            }
        }
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
        if self.peek_checked()?.is_none() {
            return Ok(None);
        }
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
        if self.wants_write() {
            flags |= PollFlags::POLLOUT;
        }
        self.poll(flags, timeout)
    }

    /// Sleep until the socket takes more of what is queued (reading
    /// nothing) or `timeout` passes.
    pub fn wait_writable(&self, timeout: Duration) -> io::Result<()> {
        if !self.wants_write() {
            std::thread::sleep(timeout);
            return Ok(());
        }
        self.poll(PollFlags::POLLOUT, timeout)
    }

    fn poll(&self, flags: PollFlags, timeout: Duration) -> io::Result<()> {
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
            if !self.wants_write() {
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
