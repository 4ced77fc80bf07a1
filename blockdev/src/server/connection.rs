//! One NBD connection in transmission phase: the request loop.
//!
//! A single thread per connection drives one io_uring that carries both the
//! socket receive and the disk I/O. Requests are decoded as they arrive and
//! submitted at once (pipelining); replies are queued as completions arrive,
//! in completion order, and sent with one `sendmsg` per batch. Request
//! buffers come from a per-connection pool; a READ's buffer moves into its
//! reply without a copy.
//!
//! A backend without a descriptor (an upstream NBD server, a filter) is
//! called inline instead, and its results enter the same completion path.
//!
//! Memory is bounded: at most [`MAX_OPS`] requests and about
//! [`MAX_INFLIGHT_BYTES`] of payload are in flight per connection; beyond
//! that the loop stops reading from the socket until something completes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use nbd::protocol::{REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_LEN};
use nbd::reply::{self, Extent, ERROR_CHUNK_MAX};
use nbd::{Command, Errno, ExportLimits, RequestHeader};

use super::buffers::BufferPool;
use super::overlap::{self, Claims};
use super::uring::{NoBuffer, Uring};
use crate::backend::Backend;
use crate::capture::{CaptureSession, CaptureSync, WriteCapture};

/// Most requests in flight on one connection.
pub const MAX_OPS: usize = 128;
/// Payload bytes in flight on one connection before reading pauses.
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// Receive buffer for request headers and small payloads.
const INBUF_LEN: usize = 256 << 10;
/// Buffers kept in the pool at rest, per connection.
const POOL_KEEP: usize = 8 << 20;
/// Most descriptors in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 30;
/// Room for the largest reply header we build inline.
const HEAD_MAX: usize = 288;
const _: () = assert!(HEAD_MAX >= ERROR_CHUNK_MAX);
const _: () = assert!(HEAD_MAX >= STRUCTURED_REPLY_LEN + 4 + 8 * MAX_EXTENTS);
/// Largest write done inline when the backend asks for it and nothing else
/// is in flight: a page-cache copy this small costs less than a hop to an
/// io_uring worker thread; larger writes still go through io_uring.
const INLINE_WRITE_MAX: u32 = 128 << 10;
/// How long a shutting-down connection waits for its client to take replies.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Zeroes written where the disk cannot zero a range by itself.
use crate::backend::ZEROES;
/// How many zeroes one write of ZEROES carries.
const ZEROES_LEN: u32 = 1 << 20;
const _: () = assert!(ZEROES_LEN as usize == crate::backend::ZEROES_LEN);

const UD_RECV: u64 = (1 << 63) | 1;
const UD_POLLOUT: u64 = (1 << 63) | 2;
const UD_SHUTDOWN: u64 = (1 << 63) | 3;
const UD_CANCEL: u64 = (1 << 63) | 4;
const UD_WAKER: u64 = (1 << 63) | 5;

/// What a connection serves and how.
pub(crate) struct ConnConfig<'a> {
    pub disk: &'a dyn Backend,
    pub capture: &'a dyn WriteCapture,
    pub limits: ExportLimits,
    /// Readable once the server shuts down.
    pub shutdown_fd: RawFd,
    /// For log lines.
    pub peer: &'a str,
    /// Claims on extents being changed, shared by every connection of the disk.
    pub claims: &'a Claims,
    /// This connection's id among them.
    pub conn_id: u64,
}

/// Counters reported when a connection ends.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The command's main operation.
    Main,
    /// fallocate was refused; zeroes are being written instead.
    ZeroWrite,
    /// PUNCH_HOLE was refused; trying ZERO_RANGE.
    ZeroRange,
    /// The data is done; an fdatasync for FUA is running.
    FuaSync,
    /// The disk cannot discard: the trim changed nothing and is not captured.
    TrimIgnored,
    /// The change is captured; the ring's ranges are being synced for a
    /// durable point (FLUSH or FUA).
    RingSync,
}

struct Slot {
    cookie: u64,
    cmd: Command,
    buf: Vec<u8>,
    /// Bytes of the current phase done so far.
    done: u32,
    phase: Phase,
    /// Payload bytes this request holds against MAX_INFLIGHT_BYTES.
    held: usize,
    /// Ring sync entries still running (RingSync phase).
    pending: u32,
    /// The ring sync running for this request.
    sync: Option<CaptureSync>,
    /// The first ring sync error seen.
    sync_err: Option<Errno>,
}

enum Input {
    Header,
    /// Receiving the payload of the WRITE in this slot.
    Payload(usize),
    /// Skipping the payload of a refused WRITE.
    Discard(u64),
}

struct Out {
    head: [u8; HEAD_MAX],
    head_len: usize,
    /// READ data (empty for other replies); `data_len` bytes of it are sent.
    data: Vec<u8>,
    data_len: usize,
    sent: usize,
    /// Bytes to release from the in-flight budget when sent.
    held: usize,
}

impl Out {
    fn total(&self) -> usize {
        self.head_len + self.data_len
    }
}

/// Field order is drop order: `ring` is declared before every buffer the
/// kernel may write into (`slots`, `inbuf`, `pool`, `out`), so it drops
/// first, and dropping it cancels and waits for every submitted entry
/// (see `Uring`'s `Drop`): no early return can free a buffer under an
/// operation still in flight.
pub(crate) struct Connection<'a> {
    cfg: ConnConfig<'a>,
    /// Results of operations run inline (backends without a descriptor,
    /// small buffered writes), handled like completions: (user_data, result).
    inline: VecDeque<(u64, i32)>,
    /// Small writes go inline (`Caps::inline_writes`).
    inline_writes: bool,
    session: Box<dyn CaptureSession + 'a>,
    /// Woken when a claim this connection waits for is released.
    waker: OwnedFd,
    waker_armed: bool,
    /// Changes waiting for an overlapping change to be captured, in order.
    parked: VecDeque<usize>,
    /// Group commit: the FLUSH whose sync is running, the FLUSHes answered
    /// with it, and those that arrived meanwhile (one sync serves them all).
    flush_driver: Option<usize>,
    flush_riders: Vec<usize>,
    flush_waiting: Vec<usize>,
    sock: RawFd,
    ring: Uring,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pool: BufferPool,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    input: Input,
    recv_pending: bool,
    recv_into: Option<usize>,
    pollout_pending: bool,
    shutdown_armed: bool,
    reading: bool,
    closing_since: Option<Instant>,
    dead: bool,
    inflight_bytes: usize,
    out: VecDeque<Out>,
    cqes: Vec<(u64, i32)>,
    extents: Vec<Extent>,
    scratch: Vec<u8>,
    stats: Stats,
}

fn os_err(res: i32) -> Errno {
    Errno::from_os(-res)
}

impl<'a> Connection<'a> {
    pub(crate) fn new(sock: RawFd, cfg: ConnConfig<'a>) -> io::Result<Connection<'a>> {
        let slots = (0..MAX_OPS)
            .map(|_| Slot {
                cookie: 0,
                cmd: Command::Flush,
                buf: Vec::new(),
                done: 0,
                phase: Phase::Main,
                held: 0,
                pending: 0,
                sync: None,
                sync_err: None,
            })
            .collect();
        Ok(Connection {
            inline: VecDeque::new(),
            inline_writes: cfg.disk.caps().inline_writes,
            session: cfg.capture.session(),
            waker: overlap::waker()?,
            waker_armed: false,
            parked: VecDeque::new(),
            flush_driver: None,
            flush_riders: Vec::new(),
            flush_waiting: Vec::new(),
            cfg,
            sock,
            ring: Uring::new(256)?,
            slots,
            free_slots: (0..MAX_OPS).rev().collect(),
            pool: BufferPool::new(POOL_KEEP),
            inbuf: vec![0u8; INBUF_LEN].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            input: Input::Header,
            recv_pending: false,
            recv_into: None,
            pollout_pending: false,
            shutdown_armed: false,
            reading: true,
            closing_since: None,
            dead: false,
            inflight_bytes: 0,
            out: VecDeque::with_capacity(MAX_OPS),
            cqes: Vec::with_capacity(512),
            extents: Vec::with_capacity(MAX_EXTENTS),
            scratch: Vec::with_capacity(HEAD_MAX),
            stats: Stats::default(),
        })
    }

    /// Serve until the client disconnects, the server shuts down, or the
    /// connection fails. Every submitted operation has completed on return.
    pub(crate) fn run(mut self) -> io::Result<Stats> {
        let r = self.serve();
        let drained = self.drain();
        r.and(drained).map(|()| self.stats)
    }

    fn serve(&mut self) -> io::Result<()> {
        self.ring.push_no_buffer(NoBuffer::poll(
            self.cfg.shutdown_fd,
            libc::POLLIN,
            UD_SHUTDOWN,
        ))?;
        self.shutdown_armed = true;
        loop {
            // Sending first: a sent READ reply frees budget, which may let
            // parse_input admit requests already buffered. Sending last: the
            // replies parse_input queued at once (errors, block status) hold
            // no budget. Waiting with budget free but requests left unparsed
            // would wait forever.
            self.send_output()?;
            self.retry_parked()?;
            self.parse_input();
            self.post_recv()?;
            self.send_output()?;
            if self.finished() {
                return Ok(());
            }
            self.arm_waker()?;
            // With results of inline operations waiting, handle them (and
            // send their replies) before entering the kernel at all: what is
            // queued in the submission ring goes with the next wait.
            if self.inline.is_empty() {
                let timeout = self.closing_since.map(|_| Duration::from_millis(200));
                self.ring.submit_and_wait(timeout)?;
            }
            self.handle_completions()?;
            if let Some(t) = self.closing_since {
                if t.elapsed() > CLOSE_GRACE && !self.out.is_empty() {
                    log::warn!(
                        "{}: client does not take its replies; dropping them",
                        self.cfg.peer
                    );
                    self.dead = true;
                }
            }
        }
    }

    fn handle_completions(&mut self) -> io::Result<()> {
        while let Some((ud, res)) = self.inline.pop_front() {
            self.complete(ud, res)?;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(&mut cqes);
        for &(ud, res) in &cqes {
            self.complete(ud, res)?;
        }
        self.cqes = cqes;
        Ok(())
    }

    fn finished(&self) -> bool {
        !self.reading && self.ops_in_flight() == 0 && (self.out.is_empty() || self.dead)
    }

    fn ops_in_flight(&self) -> usize {
        MAX_OPS - self.free_slots.len()
    }

    fn can_admit(&self) -> bool {
        !self.free_slots.is_empty() && self.inflight_bytes < MAX_INFLIGHT_BYTES
    }

    /// Cancel what is outstanding on the socket and wait for every entry.
    fn drain(&mut self) -> io::Result<()> {
        self.stop_reading();
        for (armed, ud) in [
            (self.waker_armed, UD_WAKER),
            (self.recv_pending, UD_RECV),
            (self.pollout_pending, UD_POLLOUT),
            (self.shutdown_armed, UD_SHUTDOWN),
        ] {
            if armed {
                self.ring.push_no_buffer(NoBuffer::cancel(ud, UD_CANCEL))?;
            }
        }
        while self.ring.pending() > 0 || !self.inline.is_empty() {
            self.ring
                .submit_and_wait(Some(Duration::from_millis(100)))?;
            self.handle_completions()?;
        }
        Ok(())
    }

    fn stop_reading(&mut self) {
        if !self.reading {
            return;
        }
        self.reading = false;
        if self.recv_pending {
            // If the push fails the receive completes on its own when the
            // socket closes.
            let _ = self
                .ring
                .push_no_buffer(NoBuffer::cancel(UD_RECV, UD_CANCEL));
        } else {
            self.abandon_payload();
        }
    }

    /// Drop a WRITE whose payload will never arrive (no receive is pending
    /// into its buffer when this is called).
    fn abandon_payload(&mut self) {
        if let Input::Payload(i) = self.input {
            self.input = Input::Header;
            self.session.cancel(i);
            self.release(i);
        }
    }

    // ---- input ---------------------------------------------------------

    fn parse_input(&mut self) {
        while self.reading {
            let avail = self.in_end - self.in_start;
            match self.input {
                Input::Header => {
                    if !self.can_admit() {
                        return;
                    }
                    match RequestHeader::decode(&self.inbuf[self.in_start..self.in_end]) {
                        Ok(None) => return,
                        Ok(Some(h)) => {
                            self.in_start += REQUEST_HEADER_LEN;
                            self.handle_request(h);
                        }
                        Err(e) => {
                            log::warn!("{}: {e}; closing the connection", self.cfg.peer);
                            self.stop_reading();
                        }
                    }
                }
                Input::Payload(i) => {
                    let s = &mut self.slots[i];
                    let len = payload_len(&s.cmd);
                    let need = len - s.done as usize;
                    let n = need.min(avail);
                    let at = s.done as usize;
                    s.buf[at..at + n]
                        .copy_from_slice(&self.inbuf[self.in_start..self.in_start + n]);
                    self.in_start += n;
                    // n <= need <= len <= max payload, a u32.
                    s.done += u32::try_from(n).unwrap_or(0);
                    if n < need {
                        return;
                    }
                    s.done = 0;
                    self.input = Input::Header;
                    self.start_change(i);
                }
                Input::Discard(rem) => {
                    let n = rem.min(avail as u64);
                    // n <= avail, a usize.
                    self.in_start += usize::try_from(n).unwrap_or(avail);
                    if n < rem {
                        self.input = Input::Discard(rem - n);
                        return;
                    }
                    self.input = Input::Header;
                }
            }
        }
    }

    fn post_recv(&mut self) -> io::Result<()> {
        if !self.reading || self.recv_pending {
            return Ok(());
        }
        let (ptr, len, into) = match self.input {
            Input::Payload(i) => {
                let s = &mut self.slots[i];
                let at = s.done as usize;
                let len = payload_len(&s.cmd) - at;
                // SAFETY: at <= len <= buf.len(), so the pointer stays inside the buffer.
                (unsafe { s.buf.as_mut_ptr().add(at) }, len, Some(i))
            }
            Input::Header if !self.can_admit() => return Ok(()),
            Input::Header | Input::Discard(_) => {
                if self.in_start > 0 {
                    self.inbuf.copy_within(self.in_start..self.in_end, 0);
                    self.in_end -= self.in_start;
                    self.in_start = 0;
                }
                let len = INBUF_LEN - self.in_end;
                if len == 0 {
                    return Ok(());
                }
                // SAFETY: in_end < INBUF_LEN, so the pointer stays inside inbuf.
                (
                    unsafe { self.inbuf.as_mut_ptr().add(self.in_end) },
                    len,
                    None,
                )
            }
        };
        // The buffers are at most 32 MiB (max payload) or INBUF_LEN.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let e = opcode::Recv::new(types::Fd(self.sock), ptr, len)
            .build()
            .user_data(UD_RECV);
        // SAFETY: the target is either inbuf (owned by self, never resized)
        // or the payload buffer of an active slot, which is not released or
        // reused while recv_pending is set (see complete_recv/stop_reading).
        unsafe { self.ring.push(&e)? };
        self.recv_pending = true;
        self.recv_into = into;
        Ok(())
    }

    fn complete_recv(&mut self, res: i32) {
        self.recv_pending = false;
        let into = self.recv_into.take();
        if res < 0 {
            if !matches!(-res, libc::ECANCELED | libc::EINTR | libc::EAGAIN) {
                log::debug!(
                    "{}: receive failed: {}",
                    self.cfg.peer,
                    io::Error::from_raw_os_error(-res)
                );
                self.stop_reading();
            }
        } else if res == 0 {
            log::debug!("{}: client closed its side", self.cfg.peer);
            self.stop_reading();
        } else if self.reading {
            let n = res.unsigned_abs();
            match into {
                Some(i) => {
                    let s = &mut self.slots[i];
                    s.done += n;
                    if s.done as usize == payload_len(&s.cmd) {
                        s.done = 0;
                        self.input = Input::Header;
                        self.start_change(i);
                    }
                }
                None => self.in_end += n as usize,
            }
        }
        if !self.reading {
            self.abandon_payload();
        }
    }

    fn handle_request(&mut self, h: RequestHeader) {
        self.stats.requests += 1;
        let cmd = match nbd::validate(&h, &self.cfg.limits) {
            Ok(c) => c,
            Err(rej) => {
                log::debug!(
                    "{}: refused command {} at {} len {}: {} ({})",
                    self.cfg.peer,
                    h.command,
                    h.offset,
                    h.length,
                    rej.reason,
                    rej.errno
                );
                self.reply_error(h.cookie, rej.errno, rej.reason);
                if rej.skip_payload > 0 {
                    self.input = Input::Discard(u64::from(rej.skip_payload));
                }
                return;
            }
        };
        match cmd {
            Command::Disconnect => {
                log::debug!("{}: client sent NBD_CMD_DISC", self.cfg.peer);
                self.stop_reading();
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let max = if req_one { 1 } else { MAX_EXTENTS };
                let mut ex = std::mem::take(&mut self.extents);
                self.cfg.disk.extents(offset, len, max, &mut ex);
                reply::block_status_done(
                    h.cookie,
                    nbd::handshake::BASE_ALLOCATION_ID,
                    &ex,
                    &mut self.scratch,
                );
                self.extents = ex;
                let mut o = new_out();
                o.head_len = self.scratch.len().min(HEAD_MAX);
                o.head[..o.head_len].copy_from_slice(&self.scratch[..o.head_len]);
                self.out.push_back(o);
            }
            _ => {
                // can_admit() was checked before decoding, so a slot is free.
                let Some(i) = self.free_slots.pop() else {
                    self.reply_error(h.cookie, Errno::Io, "no request slot");
                    return;
                };
                let len = payload_len(&cmd);
                let s = &mut self.slots[i];
                s.cookie = h.cookie;
                s.cmd = cmd;
                s.done = 0;
                s.phase = Phase::Main;
                s.held = len;
                if len > 0 {
                    s.buf = self.pool.get(len);
                }
                self.inflight_bytes += len;
                if let Some((offset, len)) = change_extent(&cmd) {
                    self.session.begin(i, offset, len);
                }
                match cmd {
                    Command::Write { .. } => self.input = Input::Payload(i),
                    // The disk and the capture are synced at once: every
                    // change answered before this FLUSH is in both already.
                    Command::Flush => {
                        if self.flush_driver.is_some() {
                            self.flush_waiting.push(i);
                        } else {
                            self.start_flush(i);
                        }
                    }
                    c if change_extent(&c).is_some() => self.start_change(i),
                    _ => self.submit(i),
                }
            }
        }
    }

    // ---- disk operations -------------------------------------------------

    /// Submit the change in slot `i` once no overlapping change is between
    /// the disk and the capture (see `overlap`); until then it is parked,
    /// behind any change parked before it.
    fn start_change(&mut self, i: usize) {
        let Some((offset, len)) = change_extent(&self.slots[i].cmd) else {
            return self.submit(i);
        };
        let claimed = self.parked.is_empty()
            && self
                .cfg
                .claims
                .try_claim(self.cfg.conn_id, i, offset, len, self.waker.as_raw_fd());
        if claimed {
            self.submit(i);
        } else {
            self.parked.push_back(i);
        }
    }

    /// Submit the parked changes whose extents are free now, in order.
    fn retry_parked(&mut self) -> io::Result<()> {
        while let Some(&i) = self.parked.front() {
            let Some((offset, len)) = change_extent(&self.slots[i].cmd) else {
                self.parked.pop_front();
                continue;
            };
            if !self
                .cfg
                .claims
                .try_claim(self.cfg.conn_id, i, offset, len, self.waker.as_raw_fd())
            {
                break;
            }
            self.parked.pop_front();
            self.submit(i);
        }
        Ok(())
    }

    /// Before waiting: with changes parked, be woken when a claim is
    /// released (by any connection).
    fn arm_waker(&mut self) -> io::Result<()> {
        if !self.parked.is_empty() && !self.waker_armed {
            self.ring.push_no_buffer(NoBuffer::poll(
                self.waker.as_raw_fd(),
                libc::POLLIN,
                UD_WAKER,
            ))?;
            self.waker_armed = true;
        }
        Ok(())
    }

    /// Run the current phase of slot `i` on a backend without a descriptor;
    /// the result is handled with the completions.
    fn run_inline(&mut self, i: usize) {
        let disk = self.cfg.disk;
        let s = &mut self.slots[i];
        let done = s.done;
        let bytes = |r: io::Result<()>, n: u32| r.map(|()| i32::try_from(n).unwrap_or(i32::MAX));
        let r: io::Result<i32> = match (s.cmd, s.phase) {
            (_, Phase::FuaSync) => disk.flush().map(|()| 0),
            (Command::Read { offset, len }, _) => bytes(
                disk.read_at(
                    offset + u64::from(done),
                    &mut s.buf[done as usize..len as usize],
                ),
                len - done,
            ),
            (Command::Write { offset, len, fua }, _) => bytes(
                disk.write_at(
                    offset + u64::from(done),
                    &s.buf[done as usize..len as usize],
                    fua,
                ),
                len - done,
            ),
            (
                Command::WriteZeroes {
                    offset, len, fua, ..
                },
                Phase::ZeroWrite,
            ) => {
                let n = (len - done).min(ZEROES_LEN);
                bytes(
                    disk.write_at(offset + u64::from(done), &ZEROES[..n as usize], fua),
                    n,
                )
            }
            (Command::Trim { offset, len, .. }, _) => disk.trim(offset, u64::from(len)).map(|()| 0),
            (
                Command::WriteZeroes {
                    offset,
                    len,
                    may_trim,
                    ..
                },
                phase,
            ) => disk
                .zero(
                    offset,
                    u64::from(len),
                    may_trim && phase == Phase::Main,
                    true,
                )
                .map(|()| 0),
            (Command::Cache { .. }, _) => Ok(0),
            (Command::Flush | Command::BlockStatus { .. } | Command::Disconnect, _) => {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        };
        let res = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => -libc::EOPNOTSUPP,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        self.inline.push_back((i as u64, res));
    }

    /// Submit the current phase of slot `i`.
    fn submit(&mut self, i: usize) {
        let Some(fd) = self.cfg.disk.uring_fd() else {
            // Reads the backend can point at a descriptor for still go
            // through io_uring (a recovery point's journal payloads).
            if let (Command::Read { offset, len }, Phase::Main) =
                (self.slots[i].cmd, self.slots[i].phase)
            {
                let done = self.slots[i].done;
                if let Some((fd, at)) = self
                    .cfg
                    .disk
                    .read_source(offset + u64::from(done), len - done)
                {
                    let s = &mut self.slots[i];
                    // SAFETY: done < len <= buf.len().
                    let p = unsafe { s.buf.as_mut_ptr().add(done as usize) };
                    let entry = opcode::Read::new(types::Fd(fd), p, len - done)
                        .offset(at)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: the entry points into slot i's buffer, which
                    // stays active and untouched until complete() handles
                    // this entry's completion; the descriptor is the
                    // backend's, open while it lives (read_source's contract).
                    if let Err(e) = unsafe { self.ring.push(&entry) } {
                        log::error!("{}: io_uring submission failed: {e}", self.cfg.peer);
                        self.finish(i, Err((Errno::Io, "io_uring submission failed")));
                    }
                    return;
                }
            }
            return self.run_inline(i);
        };
        if let (Command::Write { len, .. }, Phase::Main) = (self.slots[i].cmd, self.slots[i].phase)
        {
            // Alone in flight (queue depth 1): the hop to a worker thread is
            // pure latency. With others in flight, io_uring's workers run
            // the writes in parallel, which is worth more.
            if len <= INLINE_WRITE_MAX && self.inline_writes && self.ops_in_flight() <= 1 {
                return self.run_inline(i);
            }
        }
        let fd = types::Fd(fd);
        let s = &mut self.slots[i];
        let done = s.done;
        let entry = match (s.cmd, s.phase) {
            (_, Phase::FuaSync) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Command::Read { offset, len }, _) => {
                // SAFETY: done < len <= buf.len().
                let p = unsafe { s.buf.as_mut_ptr().add(done as usize) };
                opcode::Read::new(fd, p, len - done)
                    .offset(offset + u64::from(done))
                    .build()
            }
            (Command::Write { offset, len, fua }, _) => {
                // SAFETY: done < len <= buf.len().
                let p = unsafe { s.buf.as_ptr().add(done as usize) };
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, p, len - done)
                    .offset(offset + u64::from(done))
                    .rw_flags(flags)
                    .build()
            }
            (
                Command::WriteZeroes {
                    offset, len, fua, ..
                },
                Phase::ZeroWrite,
            ) => {
                let n = (len - done).min(ZEROES_LEN);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ZEROES.as_ptr(), n)
                    .offset(offset + u64::from(done))
                    .rw_flags(flags)
                    .build()
            }
            (Command::Trim { offset, len, .. }, _) => opcode::Fallocate::new(fd, u64::from(len))
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            (
                Command::WriteZeroes {
                    offset,
                    len,
                    may_trim,
                    ..
                },
                phase,
            ) => {
                let mode = if may_trim && phase == Phase::Main {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                opcode::Fallocate::new(fd, u64::from(len))
                    .offset(offset)
                    .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            (Command::Cache { offset, len }, _) => {
                // Lengths are u32, which always fit off_t.
                opcode::Fadvise::new(fd, libc::off_t::from(len), libc::POSIX_FADV_WILLNEED)
                    .offset(offset)
                    .build()
            }
            (Command::Flush | Command::BlockStatus { .. } | Command::Disconnect, _) => {
                // FLUSH goes through submit_sync; the others are answered
                // without the disk queue. Never submitted here.
                self.finish(i, Err((Errno::Io, "internal: unexpected command")));
                return;
            }
        };
        let entry = entry.user_data(i as u64);
        // SAFETY: the entry points into slot i's buffer (or the static ZEROES);
        // the slot stays active, and its buffer untouched, until complete()
        // handles this entry's completion.
        if let Err(e) = unsafe { self.ring.push(&entry) } {
            log::error!("{}: io_uring submission failed: {e}", self.cfg.peer);
            self.finish(i, Err((Errno::Io, "io_uring submission failed")));
        }
    }

    fn complete(&mut self, ud: u64, res: i32) -> io::Result<()> {
        match ud {
            UD_RECV => self.complete_recv(res),
            UD_POLLOUT => self.pollout_pending = false,
            UD_SHUTDOWN => {
                self.shutdown_armed = false;
                if res >= 0 && self.closing_since.is_none() {
                    log::debug!(
                        "{}: server shutting down; finishing in-flight requests",
                        self.cfg.peer
                    );
                    self.closing_since = Some(Instant::now());
                    self.stop_reading();
                }
            }
            UD_CANCEL => {}
            UD_WAKER => {
                self.waker_armed = false;
                overlap::drain_waker(&self.waker);
            }
            i => match usize::try_from(i) {
                Ok(slot) if slot < MAX_OPS => self.complete_op(slot, res),
                _ => log::error!("{}: completion with unknown tag {i:#x}", self.cfg.peer),
            },
        }
        Ok(())
    }

    fn complete_op(&mut self, i: usize, res: i32) {
        let s = &mut self.slots[i];
        let (cmd, phase) = (s.cmd, s.phase);
        if phase == Phase::RingSync {
            if res < 0 {
                s.sync_err.get_or_insert(os_err(res));
            }
            s.pending -= 1;
            if s.pending > 0 {
                return;
            }
            let r = match s.sync_err.take() {
                Some(e) => Err((e, "fdatasync of the disk or the ring failed")),
                None => Ok(()),
            };
            return self.finish(i, r);
        }
        if phase == Phase::FuaSync {
            let r = if res < 0 {
                Err((os_err(res), "fdatasync failed"))
            } else {
                Ok(())
            };
            return self.finish(i, r);
        }
        match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => {
                if self.transferred(i, res, len, "disk I/O failed") {
                    self.finish(i, Ok(()));
                }
            }
            Command::WriteZeroes { len, fast_only, .. } => {
                if phase == Phase::ZeroWrite {
                    if self.transferred(i, res, len, "writing zeroes failed") {
                        self.after_change(i);
                    }
                    return;
                }
                if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                    s.phase = match phase {
                        Phase::Main
                            if matches!(cmd, Command::WriteZeroes { may_trim: true, .. }) =>
                        {
                            Phase::ZeroRange
                        }
                        _ if fast_only => {
                            return self
                                .finish(i, Err((Errno::NotSup, "the disk cannot zero quickly")));
                        }
                        _ => Phase::ZeroWrite,
                    };
                    s.done = 0;
                    return self.submit(i);
                }
                if res < 0 {
                    return self.finish(i, Err((os_err(res), "zeroing failed")));
                }
                self.after_change(i);
            }
            Command::Trim { .. } => {
                // A trim is a hint: a disk that cannot punch holes ignores it.
                if res == -libc::EOPNOTSUPP {
                    s.phase = Phase::TrimIgnored;
                    return self.finish(i, Ok(()));
                }
                if res < 0 {
                    return self.finish(i, Err((os_err(res), "discard failed")));
                }
                self.after_change(i);
            }
            Command::Cache { .. } => {
                let r = if res < 0 {
                    Err((os_err(res), "cache failed"))
                } else {
                    Ok(())
                };
                self.finish(i, r);
            }
            Command::Flush | Command::BlockStatus { .. } | Command::Disconnect => {
                self.finish(i, Err((Errno::Io, "internal: unexpected completion")));
            }
        }
    }

    /// Account `res` bytes read or written for slot `i` out of `len`: true
    /// when all are done; otherwise the rest was resubmitted, or the request
    /// finished with an error (`what`), and false.
    fn transferred(&mut self, i: usize, res: i32, len: u32, what: &'static str) -> bool {
        if res <= 0 {
            let e = if res == 0 { Errno::Io } else { os_err(res) };
            self.finish(i, Err((e, what)));
            return false;
        }
        let s = &mut self.slots[i];
        s.done += res.unsigned_abs();
        if s.done < len {
            self.submit(i);
            return false;
        }
        true
    }

    /// A trim or zero reached the disk: sync for FUA, or finish.
    fn after_change(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let fua = matches!(
            s.cmd,
            Command::Trim { fua: true, .. } | Command::WriteZeroes { fua: true, .. }
        );
        // A zero written with RWF_DSYNC is already durable.
        if fua && s.phase != Phase::ZeroWrite {
            s.phase = Phase::FuaSync;
            return self.submit(i);
        }
        self.finish(i, Ok(()));
    }

    /// The disk part of slot `i` is done (or failed): capture the change,
    /// make it durable when the request asks (FLUSH, FUA), then answer.
    fn finish(&mut self, i: usize, r: Result<(), (Errno, &'static str)>) {
        let cmd = self.slots[i].cmd;
        if self.slots[i].phase == Phase::RingSync {
            let sync = self.slots[i].sync.take();
            if let (Ok(()), Some(sync)) = (&r, &sync) {
                self.session.synced(sync);
            }
            if self.flush_driver == Some(i) {
                return self.flush_done(i, r);
            }
            return self.answer(i, r);
        }
        let r = match r {
            Err(e) => {
                if let Some((offset, len)) = change_extent(&cmd) {
                    self.session.failed(i, offset, len);
                }
                Err(e)
            }
            Ok(()) => self.capture(i),
        };
        // Captured (or failed): overlapping changes may go to the disk now.
        if change_extent(&cmd).is_some() {
            self.cfg.claims.release(self.cfg.conn_id, i);
        }
        if r.is_ok() && needs_durable(&cmd) {
            if let Some(sync) = self.session.sync_plan() {
                return self.submit_sync(i, Some(sync), false);
            }
        }
        self.answer(i, r)
    }

    /// Sync the disk and the capture for the FLUSH in slot `i`.
    fn start_flush(&mut self, i: usize) {
        self.flush_driver = Some(i);
        let sync = self.session.sync_plan();
        self.submit_sync(i, sync, true);
    }

    /// The sync of FLUSH `i` finished: answer it and every FLUSH that rode
    /// on it, then start one sync for the FLUSHes that arrived meanwhile
    /// (a sync that started before they arrived cannot serve them).
    fn flush_done(&mut self, i: usize, r: Result<(), (Errno, &'static str)>) {
        self.flush_driver = None;
        self.answer(i, r);
        for j in std::mem::take(&mut self.flush_riders) {
            self.answer(j, r);
        }
        if !self.flush_waiting.is_empty() {
            let mut group = std::mem::take(&mut self.flush_waiting);
            let driver = group.remove(0);
            if !group.is_empty() {
                log::debug!(
                    "{}: one sync serves {} FLUSH requests",
                    self.cfg.peer,
                    group.len() + 1
                );
            }
            self.flush_riders = group;
            self.start_flush(driver);
        }
    }

    /// Hand the change in slot `i`, now on the disk, to the capture.
    fn capture(&mut self, i: usize) -> Result<(), (Errno, &'static str)> {
        let s = &self.slots[i];
        let c = match s.cmd {
            Command::Write { offset, len, .. } => {
                self.stats.bytes_written += u64::from(len);
                self.session.write(i, offset, &s.buf[..len as usize])
            }
            Command::Trim { .. } if s.phase == Phase::TrimIgnored => {
                self.session.cancel(i);
                Ok(())
            }
            Command::Trim { offset, len, .. } => self.session.trim(i, offset, len),
            Command::WriteZeroes { offset, len, .. } => self.session.zero(i, offset, len),
            _ => Ok(()),
        };
        c.map_err(|e| {
            log::error!("{}: capturing a change failed: {e}", self.cfg.peer);
            (Errno::Io, "capturing the write failed")
        })
    }

    /// Make the capture's ranges durable, and the disk too when `with_disk`,
    /// before answering slot `i`. When the ring shares the disk's file
    /// system, its ranges are written back (sync_file_range) and then one
    /// fdatasync of the disk flushes the device cache for both (a linked
    /// chain); otherwise both files are fdatasynced in parallel.
    fn submit_sync(&mut self, i: usize, sync: Option<CaptureSync>, with_disk: bool) {
        let disk_fd = self.cfg.disk.uring_fd();
        let inline_flush = with_disk && disk_fd.is_none();
        let with_disk = with_disk && disk_fd.is_some();
        let disk = types::Fd(disk_fd.unwrap_or(-1));
        let chain = with_disk && sync.as_ref().is_some_and(|c| c.shares_disk_device);
        let s = &mut self.slots[i];
        s.phase = Phase::RingSync;
        s.pending = 0;
        s.sync_err = None;
        let ring_entries = sync.iter().flat_map(|c| {
            c.plan.ranges.iter().map(move |&(offset, len)| {
                let e = c.range_entry(offset, len, chain);
                if chain {
                    e.flags(squeue::Flags::IO_LINK)
                } else {
                    e
                }
            })
        });
        let disk_entry = with_disk.then(|| {
            opcode::Fsync::new(disk)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        });
        for e in ring_entries.chain(disk_entry) {
            let e = e.user_data(i as u64);
            // SAFETY: sync entries point at no memory.
            match unsafe { self.ring.push(&e) } {
                Ok(()) => s.pending += 1,
                Err(_) => {
                    s.sync_err.get_or_insert(Errno::Io);
                }
            }
        }
        if inline_flush {
            // The backend's own flush, run now; its result comes back as
            // one more completion of this slot.
            let res = match self.cfg.disk.flush() {
                Ok(()) => 0,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            s.pending += 1;
            self.inline.push_back((i as u64, res));
        }
        s.sync = sync;
        if s.pending == 0 {
            let r = match s.sync_err {
                Some(e) => Err((e, "could not submit the sync")),
                None => Ok(()),
            };
            self.finish(i, r);
        }
    }

    /// Queue the reply for slot `i` and free it.
    fn answer(&mut self, i: usize, r: Result<(), (Errno, &'static str)>) {
        let cookie = self.slots[i].cookie;
        let cmd = self.slots[i].cmd;
        match (r, cmd) {
            (Ok(()), Command::Read { offset, len }) => {
                self.stats.bytes_read += u64::from(len);
                let s = &mut self.slots[i];
                let mut o = new_out();
                if self.cfg.limits.structured_replies {
                    let h = reply::offset_data(cookie, offset, len);
                    o.head[..h.len()].copy_from_slice(&h);
                    o.head_len = h.len();
                } else {
                    o.head[..SIMPLE_REPLY_LEN].copy_from_slice(&reply::simple(cookie, 0));
                    o.head_len = SIMPLE_REPLY_LEN;
                }
                o.data = std::mem::take(&mut s.buf);
                o.data_len = len as usize;
                o.held = std::mem::take(&mut s.held);
                self.out.push_back(o);
            }
            (Ok(()), _) => {
                let mut o = new_out();
                o.head[..SIMPLE_REPLY_LEN].copy_from_slice(&reply::simple(cookie, 0));
                o.head_len = SIMPLE_REPLY_LEN;
                self.out.push_back(o);
            }
            (Err((errno, why)), _) => {
                log::warn!("{}: {cmd:?} failed: {why} ({errno})", self.cfg.peer);
                self.reply_error(cookie, errno, why);
            }
        }
        self.release(i);
    }

    /// Free slot `i` and whatever it still holds.
    fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        self.inflight_bytes -= std::mem::take(&mut s.held);
        if !s.buf.is_empty() {
            self.pool.put(std::mem::take(&mut s.buf));
        }
        self.free_slots.push(i);
    }

    // ---- output ----------------------------------------------------------

    fn reply_error(&mut self, cookie: u64, errno: Errno, why: &str) {
        self.stats.errors += 1;
        let mut o = new_out();
        if self.cfg.limits.structured_replies {
            let mut b = [0u8; ERROR_CHUNK_MAX];
            let n = reply::error_done(cookie, errno, why, &mut b);
            o.head[..n].copy_from_slice(&b[..n]);
            o.head_len = n;
        } else {
            o.head[..SIMPLE_REPLY_LEN].copy_from_slice(&reply::simple(cookie, errno.code()));
            o.head_len = SIMPLE_REPLY_LEN;
        }
        self.out.push_back(o);
    }

    fn send_output(&mut self) -> io::Result<()> {
        while !self.out.is_empty() && !self.pollout_pending && !self.dead {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 64];
            let mut n_iov = 0;
            for o in self.out.iter() {
                if n_iov + 2 > iov.len() {
                    break;
                }
                if o.sent < o.head_len {
                    iov[n_iov] = libc::iovec {
                        iov_base: o.head[o.sent..].as_ptr() as *mut libc::c_void,
                        iov_len: o.head_len - o.sent,
                    };
                    n_iov += 1;
                }
                let data_sent = o.sent.saturating_sub(o.head_len);
                if data_sent < o.data_len {
                    iov[n_iov] = libc::iovec {
                        iov_base: o.data[data_sent..].as_ptr() as *mut libc::c_void,
                        iov_len: o.data_len - data_sent,
                    };
                    n_iov += 1;
                }
            }
            match sendmsg(self.sock, &iov[..n_iov]) {
                Ok(mut n) => {
                    while n > 0 {
                        let Some(front) = self.out.front_mut() else {
                            break;
                        };
                        let left = front.total() - front.sent;
                        if n < left {
                            front.sent += n;
                            break;
                        }
                        n -= left;
                        self.pop_sent();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ring.push_no_buffer(NoBuffer::poll(
                        self.sock,
                        libc::POLLOUT,
                        UD_POLLOUT,
                    ))?;
                    self.pollout_pending = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: sending replies failed: {e}", self.cfg.peer);
                    self.dead = true;
                    self.stop_reading();
                    while !self.out.is_empty() {
                        self.pop_sent();
                    }
                }
            }
        }
        Ok(())
    }

    fn pop_sent(&mut self) {
        if let Some(o) = self.out.pop_front() {
            self.inflight_bytes -= o.held;
            if !o.data.is_empty() {
                self.pool.put(o.data);
            }
        }
    }
}

fn new_out() -> Out {
    Out {
        head: [0u8; HEAD_MAX],
        head_len: 0,
        data: Vec::new(),
        data_len: 0,
        sent: 0,
        held: 0,
    }
}

/// The disk extent a command changes, if it changes one.
fn change_extent(cmd: &Command) -> Option<(u64, u64)> {
    match *cmd {
        Command::Write { offset, len, .. }
        | Command::Trim { offset, len, .. }
        | Command::WriteZeroes { offset, len, .. } => Some((offset, u64::from(len))),
        _ => None,
    }
}

/// Whether the answer must wait until the change (or, for FLUSH, every
/// change answered before) is durable on the disk and in the capture.
fn needs_durable(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Flush
            | Command::Write { fua: true, .. }
            | Command::Trim { fua: true, .. }
            | Command::WriteZeroes { fua: true, .. }
    )
}

/// Payload bytes a command carries in its buffer (READ data or WRITE data).
fn payload_len(cmd: &Command) -> usize {
    match *cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => len as usize,
        _ => 0,
    }
}

/// Send `iov` without blocking and without SIGPIPE.
fn sendmsg(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: every iovec points into a buffer owned by an `Out` in the
    // queue, which is neither freed nor modified during the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.cfg.claims.forget_waker(self.waker.as_raw_fd());
    }
}
