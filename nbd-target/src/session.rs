//! One shipper's connection: TLS with a verified certificate, the hello,
//! the enrolment check, then batches verified whole, applied in sequence
//! order, made durable, the applied sequence recorded, and acknowledged.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport::link::{LinkError, Received, DEFAULT_READ_AHEAD};
use transport::Link;
use wire::frame::*;
use wire::timing::{HEARTBEAT_EVERY, HELLO_TIMEOUT, PEER_TIMEOUT};
use wire::{RecordIter, RecordKind, WireError};

use crate::admission::{Admission, Permit};
use crate::registry::{Claim, Registry, STATE_FILE};
use crate::replica::ReplicaWriter;
use crate::state::{now_ns, Reason, ReplicaState, StateFile};

/// Unsent output (TLS records not yet taken by the socket, and answers
/// not yet queued) above which nothing more is read from a shipper until
/// it has read enough; one that never does is dropped after PEER_TIMEOUT.
pub const MAX_UNSENT: usize = 8 << 20;
/// Bytes read ahead of a complete frame before the HELLO (after it,
/// transport's DEFAULT_READ_AHEAD).
const HELLO_READ_AHEAD: usize = 4096;
/// Applied bytes after which the target makes them durable and acknowledges
/// even if more batches are already waiting.
const COMMIT_BYTES: u64 = 64 << 20;
/// Age of the oldest unacknowledged batch after which the target commits.
const COMMIT_AGE: Duration = Duration::from_millis(50);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The link failed (socket, TLS, a bad frame).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The peer broke the protocol, or was refused: what was sent it.
    #[error("{0}")]
    Refused(String),
    /// The peer said why it closed.
    #[error("the shipper closed with an error: {0}")]
    Peer(String),
}

impl From<WireError> for SessionError {
    fn from(e: WireError) -> Self {
        SessionError::Link(LinkError::Wire(e))
    }
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Link(LinkError::Io(e))
    }
}

/// What a session needs from the daemon.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// The replicas.
    pub registry: Arc<Registry>,
    /// TLS server configuration (client certificates required).
    pub tls: Arc<rustls::ServerConfig>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// The caps on connections (the accept loop admits, sessions hold a
    /// [`Permit`]).
    pub admission: Arc<Admission>,
}

/// Serve one shipper connection until it ends; log how it ended. `permit`
/// is its place among the daemon's connections, held until it ends.
pub fn serve(sock: TcpStream, ctx: &SessionContext, mut permit: Permit) {
    let peer = sock
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    match run(sock, ctx, &mut permit) {
        Ok(()) => log::info!("shipper {peer}: connection closed"),
        Err(e) => log::warn!("shipper {peer}: {e}"),
    }
}

fn refuse(link: &mut Link, code: ErrorCode, message: String) -> SessionError {
    let mut b = Vec::new();
    ErrorMsg {
        code,
        message: message.clone(),
    }
    .encode(&mut b);
    if link.send(FrameType::Error, &b).is_ok() {
        // The shipper must read why, not a connection reset.
        link.linger_close(Duration::from_secs(2));
    }
    SessionError::Refused(message)
}

/// The HELLO, by `deadline`. Only a HELLO header is accepted: any other
/// frame (or a bad header) is refused as soon as its header is here,
/// before a byte of its body is read; the link reads no more than a HELLO
/// and a little read-ahead meanwhile.
fn wait_hello(link: &mut Link, deadline: Instant) -> Result<Received, SessionError> {
    loop {
        link.pump()?;
        match link.peek_header() {
            Ok(Some(h)) if h.ftype != FrameType::Hello => {
                let m = format!(
                    "expected HELLO, got a {} header ({} bytes of body) before the hello: nothing of it read",
                    h.ftype.name(),
                    h.len
                );
                return Err(refuse(link, ErrorCode::Protocol, m));
            }
            Ok(_) => {}
            Err(e) => {
                let m = format!("bad frame instead of a HELLO: {e}");
                return Err(refuse(link, ErrorCode::Protocol, m));
            }
        }
        match link.next_frame() {
            Ok(Some(r)) if r.header.ftype == FrameType::Hello => return Ok(r),
            Ok(Some(r)) => {
                let m = format!("expected HELLO, got {}", r.header.ftype.name());
                return Err(refuse(link, ErrorCode::Protocol, m));
            }
            Ok(None) => {}
            Err(e) => {
                let m = format!("bad HELLO frame: {e}");
                return Err(refuse(link, ErrorCode::Protocol, m));
            }
        }
        if link.eof() {
            return Err(SessionError::Refused(
                "the shipper closed the connection".into(),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SessionError::Refused(format!(
                "no hello within {} s of connecting",
                HELLO_TIMEOUT.as_secs()
            )));
        }
        link.wait(left.min(Duration::from_millis(100)))?;
    }
}

fn run(sock: TcpStream, ctx: &SessionContext, permit: &mut Permit) -> Result<(), SessionError> {
    // The TLS handshake and the HELLO share one deadline.
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let tls = rustls::ServerConnection::new(ctx.tls.clone()).map_err(LinkError::Tls)?;
    let mut link = Link::new(tls, sock)?;
    link.set_limits(FrameType::Hello.max_body(), HELLO_READ_AHEAD);
    link.handshake(deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| {
            SessionError::Refused(format!("TLS handshake failed, nothing accepted: {e}"))
        })?;
    let id = link
        .tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(transport::tls::peer_identity)
        .unwrap_or_default();

    let rx = wait_hello(&mut link, deadline)?;
    permit.opened();
    link.set_limits(MAX_BODY, DEFAULT_READ_AHEAD);
    let hello = match Hello::decode(link.body(&rx)) {
        Ok(h) => h,
        Err(e) => {
            return Err(refuse(
                &mut link,
                ErrorCode::Protocol,
                format!("bad HELLO: {e}"),
            ))
        }
    };
    link.consume(&rx);
    if hello.min_version > PROTOCOL_VERSION || hello.max_version < MIN_PROTOCOL_VERSION {
        let m = format!(
            "no common protocol version: the shipper speaks {}..={}, this target {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
            hello.min_version, hello.max_version
        );
        return Err(refuse(&mut link, ErrorCode::Version, m));
    }
    if !id.disks.contains(&hello.disk_id) {
        let m = format!(
            "certificate {:?} may write disks {:?}, not {:?}: nothing written (issue it with `nbd-target pki issue --disk {}`)",
            id.name, id.disks, hello.disk_id, hello.disk_id
        );
        return Err(refuse(&mut link, ErrorCode::Forbidden, m));
    }
    let Some(claim) = ctx.registry.claim(&hello.disk_id) else {
        let m = format!("another shipper is connected for disk {:?}", hello.disk_id);
        return Err(refuse(&mut link, ErrorCode::Busy, m));
    };
    let mut s = match Session::open(&claim, &hello) {
        Ok(s) => s,
        Err((code, m)) => return Err(refuse(&mut link, code, m)),
    };
    {
        let mut l = claim.0.live();
        l.connected = true;
        l.peer = link.peer();
        l.peer_name = id.name.clone();
        l.applied_seq = s.state.state.applied_seq;
        l.last_error.clear();
    }
    log::info!(
        "shipper {} ({:?}) replicating disk {:?} into {}: applied seq {}, resuming after it{}",
        link.peer(),
        id.name,
        hello.disk_id,
        claim.0.spec.describe(),
        s.state.state.applied_seq,
        if s.state.state.consistent() {
            String::new()
        } else {
            format!(
                "; replica not consistent: {}",
                s.state.state.reason.explain()
            )
        }
    );
    let st = s.state.state;
    let mut flags = 0;
    if st.consistent() {
        flags |= REPLY_CONSISTENT;
    }
    if st.reason.needs_full_pass() {
        flags |= REPLY_FULL_SYNC;
    }
    if st.reason.worth_comparing() {
        flags |= REPLY_COMPARE;
    }
    if st.reason == Reason::SourceOverflow {
        flags |= REPLY_DIRTY_PENDING;
    }
    let reply = HelloReply {
        version: PROTOCOL_VERSION.min(hello.max_version),
        flags,
        applied_seq: st.applied_seq,
        max_body: MAX_BODY,
        sync_cursor: st.sync_cursor,
    };
    link.send(FrameType::HelloReply, &reply.encode())?;
    let r = s.apply_loop(&mut link, &claim, &ctx.stop);
    if let Err(e) = &r {
        claim.0.live().last_error = e.to_string();
    }
    // Whatever happened, what was applied and synced stays recorded.
    let _ = s.commit(&mut link, &claim);
    if r.is_ok() {
        link.close();
    }
    r
}

struct Session {
    writer: ReplicaWriter,
    state: StateFile,
    disk_size: u64,
    /// Highest sequence applied (durable once committed).
    pending: u64,
    uncommitted: u64,
    uncommitted_since: Option<Instant>,
    plain: Vec<u8>,
    dec: zstd::bulk::Decompressor<'static>,
    /// The state changed (consistency, sync cursor) and must be saved at the next commit.
    dirty_state: bool,
    /// Batch frames of this connection handled (applied or skipped).
    batches: u64,
    /// Batch frames acknowledged.
    batches_acked: u64,
    /// The source's flags (HELLO_*) as last reported.
    source_flags: u32,
    /// Full-pass chunks done beyond the cursor (offset → end).
    done_ahead: std::collections::BTreeMap<u64, u64>,
    /// Frames to send once the current batch is handled (BLOCK_HASHES).
    outbox: Vec<Vec<u8>>,
    hash_buf: Vec<u8>,
    /// Bytes a compare found equal (not sent), this connection.
    same_bytes: u64,
}

impl Session {
    fn open(claim: &Claim, hello: &Hello) -> Result<Session, (ErrorCode, String)> {
        let e = &claim.0;
        std::fs::create_dir_all(&e.dir).map_err(|err| {
            (
                ErrorCode::ReplicaIo,
                format!("cannot create {}: {err}", e.dir.display()),
            )
        })?;
        let fresh = ReplicaState {
            applied_seq: 0,
            ring_id: hello.ring_id,
            disk_size: hello.disk_size,
            reason: if hello.flags & HELLO_NEEDS_INITIAL_SYNC != 0 {
                Reason::NeedsInitialSync
            } else {
                Reason::None
            },
            since_seq: 0,
            updated_ns: now_ns(),
            sync_cursor: 0,
        };
        let mut state = StateFile::open_or_create(&e.dir.join(STATE_FILE), fresh)
            .map_err(|err| (ErrorCode::ReplicaIo, err.to_string()))?;
        if state.state.disk_size != hello.disk_size {
            return Err((
                ErrorCode::Mismatch,
                format!(
                    "disk {:?} has {} bytes but its replica was made for {}: a resized disk needs a new replica",
                    hello.disk_id, hello.disk_size, state.state.disk_size
                ),
            ));
        }
        let mut changed = false;
        if state.state.ring_id == [0; 16] {
            // A seed: it belongs to whichever ring first ships to it.
            state.state.ring_id = hello.ring_id;
            changed = true;
        } else if state.state.ring_id != hello.ring_id {
            log::warn!(
                "disk {:?}: the source's ring was recreated; its sequence numbers start again and the replica needs a full sync",
                hello.disk_id
            );
            state.state.ring_id = hello.ring_id;
            state.state.applied_seq = 0;
            state.state.reason = Reason::RingReplaced;
            state.state.sync_cursor = 0;
            changed = true;
        }
        if hello.next_seq <= state.state.applied_seq {
            // The source's ring went back (a power cut lost records it had
            // shipped, and their sequence numbers are given again): take
            // the new ones, and compare the whole disk.
            log::warn!(
                "disk {:?}: the source's ring is back at seq {} but the replica applied up to {}: records were lost at the source; a full pass will compare the disk",
                hello.disk_id,
                hello.next_seq,
                state.state.applied_seq
            );
            state.state.applied_seq = hello.next_seq.saturating_sub(1);
            state.state.reason = Reason::SourceGap;
            state.state.since_seq = hello.next_seq;
            state.state.sync_cursor = 0;
            changed = true;
        }
        let applied = state.state.applied_seq;
        if hello.tail_seq > applied + 1 && state.state.consistent() {
            {
                log::warn!(
                    "disk {:?}: the source released records {}..{} before this replica received them",
                    hello.disk_id,
                    applied + 1,
                    hello.tail_seq
                );
                state.state.reason = Reason::MissedRecords;
                state.state.since_seq = hello.tail_seq;
                state.state.sync_cursor = 0;
                changed = true;
            }
        }
        if hello.flags & HELLO_NEEDS_VERIFY != 0 && !state.state.reason.needs_full_pass() {
            log::warn!(
                "disk {:?}: the source lost records (torn ring tail or unclean reboot): a full pass will compare and resend",
                hello.disk_id
            );
            state.state.reason = Reason::SourceGap;
            state.state.since_seq = applied;
            state.state.sync_cursor = 0;
            changed = true;
        }
        if hello.flags & HELLO_OVERFLOW != 0 && state.state.consistent() {
            log::warn!(
                "disk {:?}: the source's ring overflowed: the replica is not consistent until the dirty extents are resent",
                hello.disk_id
            );
            state.state.reason = Reason::SourceOverflow;
            state.state.since_seq = applied;
            changed = true;
        }
        if changed {
            state
                .save()
                .map_err(|err| (ErrorCode::ReplicaIo, err.to_string()))?;
        }
        let writer = e
            .spec
            .open_writer(hello.disk_size)
            .map_err(|err| (ErrorCode::ReplicaIo, err.to_string()))?;
        let dec = zstd::bulk::Decompressor::new()
            .map_err(|err| (ErrorCode::Internal, format!("zstd: {err}")))?;
        Ok(Session {
            writer,
            disk_size: hello.disk_size,
            pending: applied.max(hello.tail_seq.saturating_sub(1)),
            state,
            uncommitted: 0,
            uncommitted_since: None,
            plain: Vec::new(),
            dec,
            dirty_state: false,
            batches: 0,
            batches_acked: 0,
            source_flags: hello.flags,
            done_ahead: std::collections::BTreeMap::new(),
            outbox: Vec::new(),
            hash_buf: Vec::new(),
            same_bytes: 0,
        })
    }

    fn apply_loop(
        &mut self,
        link: &mut Link,
        claim: &Claim,
        stop: &AtomicBool,
    ) -> Result<(), SessionError> {
        let mut paused = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // A shipper that does not read what it is sent is not read from
            // either (so it cannot make the target queue without limit).
            let over = link.unsent() > MAX_UNSENT;
            if over != paused {
                paused = over;
                log::debug!(
                    "shipper {}: {}",
                    link.peer(),
                    if paused {
                        "more than 8 MiB it has not read yet: not reading from it until it does"
                    } else {
                        "has read what it was sent: reading again"
                    }
                );
            }
            let mut progressed = false;
            if paused {
                link.pump_out()?;
            } else {
                link.pump()?;
                while let Some(rx) = link.next_frame()? {
                    progressed = true;
                    self.frame(link, &rx, claim)?;
                    link.consume(&rx);
                    if self.uncommitted >= COMMIT_BYTES || link.unsent() > MAX_UNSENT {
                        break;
                    }
                }
            }
            if self.pending > self.state.state.applied_seq
                || self.batches > self.batches_acked
                || self.dirty_state
            {
                let old = self
                    .uncommitted_since
                    .is_some_and(|t| t.elapsed() >= COMMIT_AGE);
                let more_waiting = if paused {
                    false
                } else {
                    link.pump()?;
                    link.next_frame()?.is_some()
                };
                if !more_waiting || old || self.uncommitted >= COMMIT_BYTES {
                    self.commit(link, claim)?;
                }
            }
            if link.last_tx.elapsed() >= HEARTBEAT_EVERY {
                let hb = Heartbeat {
                    now_ns: now_ns(),
                    seq: self.state.state.applied_seq,
                    ..Heartbeat::default()
                };
                link.send(FrameType::Heartbeat, &hb.encode())?;
            }
            if link.eof() {
                return Ok(());
            }
            if link.last_rx.elapsed() >= PEER_TIMEOUT {
                return Err(SessionError::Refused(format!(
                    "nothing heard for {} s: dropping the connection",
                    PEER_TIMEOUT.as_secs()
                )));
            }
            if paused {
                link.wait_writable(Duration::from_millis(100))?;
            } else if !progressed {
                link.wait(Duration::from_millis(100))?;
            }
        }
    }

    fn frame(&mut self, link: &mut Link, rx: &Received, claim: &Claim) -> Result<(), SessionError> {
        match rx.header.ftype {
            FrameType::Batch => {
                let r = self.batch(link.body(rx), claim);
                for body in self.outbox.drain(..) {
                    link.send(FrameType::BlockHashes, &body)?;
                }
                match r {
                    Ok(()) => Ok(()),
                    Err((code, m)) => Err(refuse(link, code, m)),
                }
            }
            FrameType::Heartbeat => {
                let hb = Heartbeat::decode(link.body(rx))?;
                self.source_flags = hb.source_flags;
                if hb.source_flags & HELLO_OVERFLOW != 0 && self.state.state.consistent() {
                    log::warn!(
                        "disk {:?}: the source's ring overflowed: changes after seq {} are only in its dirty bitmap; the replica is not consistent until they are resent",
                        claim.0.id,
                        self.pending
                    );
                    self.state.state.reason = Reason::SourceOverflow;
                    self.state.state.since_seq = self.pending;
                    self.dirty_state = true;
                }
                let mut l = claim.0.live();
                l.source_head_seq = hb.seq;
                l.oldest_pending_ns = hb.oldest_pending_ns;
                l.records_waiting = hb.records_waiting;
                l.bytes_waiting = hb.bytes_waiting;
                l.updated_ns = now_ns();
                Ok(())
            }
            FrameType::Error => {
                let e = ErrorMsg::decode(link.body(rx))?;
                Err(SessionError::Peer(e.message))
            }
            t => {
                let m = format!("unexpected {} frame from a shipper", t.name());
                Err(refuse(link, ErrorCode::Protocol, m))
            }
        }
    }

    /// Verify a whole batch, then apply its records above the applied sequence.
    fn batch(&mut self, body: &[u8], claim: &Claim) -> Result<(), (ErrorCode, String)> {
        let proto = |e: WireError| {
            (
                ErrorCode::Protocol,
                format!("rejected batch, nothing applied: {e}"),
            )
        };
        let h = BatchHeader::decode(body).map_err(proto)?;
        let payload = &body[BATCH_HEADER_LEN..];
        // Taken out of self while its records are applied (put back at the
        // end; an error ends the session anyway).
        let mut buf = std::mem::take(&mut self.plain);
        let plain: &[u8] = match h.codec {
            Codec::Stored => payload,
            Codec::Zstd => {
                buf.clear();
                buf.reserve(h.plain_len as usize);
                let n = self
                    .dec
                    .decompress_to_buffer(payload, &mut buf)
                    .map_err(|e| {
                        (
                            ErrorCode::Protocol,
                            format!(
                                "rejected batch {}..={}, nothing applied: zstd payload does not decode: {e}",
                                h.first_seq, h.last_seq
                            ),
                        )
                    })?;
                &buf[..n]
            }
        };
        h.check_plain(plain).map_err(proto)?;
        let mut first_gap = false;
        // The BLOCK_HASHES answers the batch may ask for, all differing.
        let mut hash_reply = 0u64;
        for (i, r) in RecordIter::new(h, plain).enumerate() {
            let r = r.map_err(proto)?;
            if i == 0 {
                first_gap = r.after_gap;
            }
            if r.kind == RecordKind::SyncHash {
                hash_reply += block_hashes_frame_len(r.len);
                if hash_reply > MAX_BATCH_HASH_REPLY {
                    return Err(proto(WireError::Invalid {
                        what: "batch",
                        detail: format!(
                            "its SYNC_HASH records (up to seq {}) may ask for more than {} bytes of BLOCK_HASHES answers, the most one batch may",
                            r.seq, MAX_BATCH_HASH_REPLY
                        ),
                    }));
                }
            }
            if !matches!(r.kind, RecordKind::Mark | RecordKind::SyncEnd)
                && r.end().is_none_or(|e| e > self.disk_size)
            {
                return Err(proto(WireError::Invalid {
                    what: "record extent",
                    detail: format!(
                        "seq {}: {}+{} is outside the {}-byte disk",
                        r.seq, r.offset, r.len, self.disk_size
                    ),
                }));
            }
        }
        self.batches += 1;
        if h.first_seq > self.pending + 1 && !first_gap {
            return Err((
                ErrorCode::Sequence,
                format!(
                    "batch starts at seq {} but the replica has applied up to {}: records in between are missing",
                    h.first_seq, self.pending
                ),
            ));
        }
        if self.uncommitted_since.is_none() {
            self.uncommitted_since = Some(Instant::now());
        }
        let mut applied_bytes = 0u64;
        for r in RecordIter::new(h, plain).flatten() {
            if r.kind.is_sync() {
                // Resync records are never a replay: their data was read from
                // the source after every ring record before them in the
                // stream was captured, so applying them here is correct.
                self.apply_sync(&r, claim)?;
                applied_bytes += u64::from(r.len);
                continue;
            }
            if r.seq <= self.pending {
                continue; // a replay: already applied
            }
            log::trace!("record {} {:?} at {}+{}", r.seq, r.kind, r.offset, r.len);
            if r.seq > self.pending + 1 && self.state.state.consistent() {
                log::warn!(
                    "disk {:?}: the source skipped from seq {} to {} (records lost at the source); the replica needs those regions resent",
                    claim.0.id,
                    self.pending,
                    r.seq
                );
                self.state.state.reason = Reason::SourceGap;
                self.state.state.since_seq = r.seq;
                self.state.state.sync_cursor = 0;
                self.dirty_state = true;
            }
            let res = match r.kind {
                RecordKind::Write => self.writer.write(r.offset, r.payload),
                RecordKind::Trim | RecordKind::Zero => self.writer.zero(r.offset, u64::from(r.len)),
                // Resync records were handled above.
                _ => Ok(()),
            };
            res.map_err(|e| {
                (
                    ErrorCode::ReplicaIo,
                    format!(
                        "disk {:?}: applying seq {}: {e}; will retry when the shipper reconnects",
                        claim.0.id, r.seq
                    ),
                )
            })?;
            self.pending = r.seq;
            applied_bytes += u64::from(r.len);
        }
        self.uncommitted += applied_bytes;
        let mut l = claim.0.live();
        l.wire_bytes += (body.len() + FRAME_HEADER_LEN) as u64;
        l.plain_bytes += plain.len() as u64;
        l.batches += 1;
        drop(l);
        self.plain = buf;
        Ok(())
    }

    /// Apply one resync record: data or zeroes read from the source, or the
    /// end of a pass (which may make the replica consistent again).
    fn apply_sync(
        &mut self,
        r: &wire::WireRecord<'_>,
        claim: &Claim,
    ) -> Result<(), (ErrorCode, String)> {
        let io = |e: crate::Error| {
            (
                ErrorCode::ReplicaIo,
                format!(
                    "disk {:?}: resync at offset {}: {e}; will retry when the shipper reconnects",
                    claim.0.id, r.offset
                ),
            )
        };
        log::debug!(
            "resync {:?} at {}+{} tag {} (applied {})",
            r.kind,
            r.offset,
            r.len,
            r.seq,
            self.pending
        );
        match r.kind {
            RecordKind::SyncData => self.writer.write(r.offset, r.payload).map_err(io)?,
            RecordKind::SyncZero => self.writer.zero(r.offset, u64::from(r.len)).map_err(io)?,
            RecordKind::SyncHash => {
                // Compare at this position of the stream: the replica as it is
                // after every record before the hash's tag.
                let n = r.len as usize;
                self.hash_buf.resize(n, 0);
                self.writer.read(r.offset, &mut self.hash_buf).map_err(io)?;
                if blake3::hash(&self.hash_buf).as_bytes()[..] == r.payload[..] {
                    self.same_bytes += u64::from(r.len);
                } else {
                    let hashes = self
                        .hash_buf
                        .chunks(BLOCK_SIZE as usize)
                        .map(|b| *blake3::hash(b).as_bytes())
                        .collect();
                    let mut body = Vec::new();
                    BlockHashes {
                        offset: r.offset,
                        len: r.len,
                        block_size: BLOCK_SIZE,
                        hashes,
                    }
                    .encode(&mut body);
                    self.outbox.push(body);
                    // Done once the shipper sent the differing blocks.
                    return Ok(());
                }
            }
            _ => {}
        }
        let overflowed = self.source_flags & HELLO_OVERFLOW != 0;
        let st = &mut self.state.state;
        match r.kind {
            RecordKind::SyncData
            | RecordKind::SyncZero
            | RecordKind::SyncHash
            | RecordKind::SyncChunkDone
                if r.full_pass =>
            {
                // The cursor moves over chunks done in order; chunks done
                // ahead of it wait in `done_ahead` (lost at a restart: the
                // pass then compares them again).
                let end = r.offset + u64::from(r.len);
                if r.offset <= st.sync_cursor && end > st.sync_cursor {
                    st.sync_cursor = end;
                    while let Some((&o, &e)) = self.done_ahead.first_key_value() {
                        if o > st.sync_cursor {
                            break;
                        }
                        st.sync_cursor = st.sync_cursor.max(e);
                        self.done_ahead.pop_first();
                    }
                    self.dirty_state = true;
                } else if r.offset > st.sync_cursor {
                    self.done_ahead.insert(r.offset, end);
                }
            }
            RecordKind::SyncEnd if r.offset == wire::records::SYNC_END_FULL_PASS => {
                if st.sync_cursor >= self.disk_size && st.reason.needs_full_pass() {
                    // Changes that overflowed during the pass still have to come.
                    st.reason = if overflowed {
                        Reason::SourceOverflow
                    } else {
                        Reason::None
                    };
                    log::info!(
                        "disk {:?}: full pass complete: {}",
                        claim.0.id,
                        st.reason.explain()
                    );
                } else if !st.reason.needs_full_pass() {
                    log::info!("disk {:?}: full pass complete", claim.0.id);
                } else {
                    log::warn!(
                        "disk {:?}: a full pass ended with only {} of {} bytes covered in order; the next one starts over",
                        claim.0.id, st.sync_cursor, self.disk_size
                    );
                }
                st.sync_cursor = 0;
                self.dirty_state = true;
            }
            RecordKind::SyncEnd if st.reason == Reason::SourceOverflow => {
                log::info!(
                    "disk {:?}: the source's dirty extents were resent: the replica is consistent",
                    claim.0.id
                );
                st.reason = Reason::None;
                self.dirty_state = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// Make what was applied durable, record the applied sequence and the
    /// resync progress, and acknowledge both.
    fn commit(&mut self, link: &mut Link, claim: &Claim) -> Result<(), SessionError> {
        if self.pending <= self.state.state.applied_seq
            && self.batches == self.batches_acked
            && !self.dirty_state
        {
            return Ok(());
        }
        self.dirty_state = false;
        let r = self.writer.sync().and_then(|()| {
            self.state.state.applied_seq = self.pending;
            self.state.save()
        });
        if let Err(e) = r {
            // The state keeps the last durable sequence; the shipper resends.
            self.state.state.applied_seq = crate::state::read(&claim.0.dir.join(STATE_FILE))
                .ok()
                .flatten()
                .map_or(0, |s| s.applied_seq);
            let m = format!(
                "disk {:?}: {e}; will retry when the shipper reconnects",
                claim.0.id
            );
            return Err(refuse(link, ErrorCode::ReplicaIo, m));
        }
        self.uncommitted = 0;
        self.uncommitted_since = None;
        self.batches_acked = self.batches;
        {
            let mut l = claim.0.live();
            l.applied_seq = self.pending;
            l.sync_cursor = self.state.state.sync_cursor;
        }
        let ack = Ack {
            applied_seq: self.pending,
            batches: self.batches,
        };
        link.send(FrameType::Ack, &ack.encode())?;
        Ok(())
    }
}
