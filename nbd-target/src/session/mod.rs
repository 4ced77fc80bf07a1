//! One shipper's connection: the driver. `hello` opens it (TLS with a
//! verified certificate, the hello, the enrolment check, the state and the
//! replica) and yields the [`apply`] side; the driver then reads frames
//! and hands each BATCH to the apply pipeline (verified whole, applied in
//! sequence order to its [`apply::RecordSink`]), passes HEARTBEATs to the
//! replica's [`Consistency`](crate::consistency::Consistency), commits
//! when the pipeline's grouping says so (made durable, the applied
//! sequence recorded) and acknowledges, sends heartbeats, and drops a
//! silent shipper or one that does not read what it is sent.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use transport::link::{LinkError, Received};
use transport::Link;
use wire::frame::{ErrorCode, ErrorMsg, FrameType, Heartbeat};
use wire::timing::{HEARTBEAT_EVERY, PEER_TIMEOUT};
use wire::WireError;

use crate::admission::{Admission, Permit};
use crate::journal::Journaled;
use crate::registry::{Claim, Registry};
use crate::state::now_ns;

pub mod apply;
mod hello;

use apply::Apply;

/// Unsent output (TLS records not yet taken by the socket, and answers
/// not yet queued) above which nothing more is read from a shipper until
/// it has read enough; one that never does is dropped after PEER_TIMEOUT.
pub const MAX_UNSENT: usize = 8 << 20;

/// How often a session looks for a failover record of its disk.
const FENCE_LOOK: Duration = Duration::from_millis(500);

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
    /// The recovery-point journal's limits (None: `--journal off`).
    pub journal: Option<crate::journal::JournalConfig>,
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

/// Why the target refuses a shipper or a frame: what the ERROR frame
/// sent it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The ERROR frame's code.
    pub code: ErrorCode,
    /// Its message.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Send the shipper an ERROR frame saying why, and end the session.
fn refuse(link: &mut Link, r: Refusal) -> SessionError {
    let mut b = Vec::new();
    ErrorMsg {
        code: r.code,
        message: r.message.clone(),
    }
    .encode(&mut b);
    if link.send(FrameType::Error, &b).is_ok() {
        // The shipper must read why, not a connection reset.
        link.linger_close(Duration::from_secs(2));
    }
    SessionError::Refused(r.message)
}

fn run(sock: TcpStream, ctx: &SessionContext, permit: &mut Permit) -> Result<(), SessionError> {
    let hello::Opened {
        mut link,
        claim,
        mut apply,
        _applying,
    } = hello::open(sock, ctx, permit)?;
    let r = drive(&mut link, &mut apply, &claim, &ctx.stop);
    if let Err(e) = &r {
        claim.0.live().last_error = e.to_string();
    }
    // Whatever happened, what was applied and synced stays recorded.
    let _ = commit(&mut link, &mut apply, &claim);
    if r.is_ok() {
        link.close();
    }
    // The replica, the apply lock and the disk's claim go before the
    // connection.
    drop(apply);
    drop(_applying);
    drop(claim);
    r
}

/// Read, apply, commit, acknowledge until the shipper leaves, the daemon
/// stops, or something fails.
fn drive(
    link: &mut Link,
    apply: &mut Apply<Journaled>,
    claim: &Claim,
    stop: &AtomicBool,
) -> Result<(), SessionError> {
    let mut paused = false;
    let mut fence_looked = std::time::Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // A failover fences the disk by writing its record: end within
        // half a second of it, what was applied committed first.
        if fence_looked.elapsed() >= FENCE_LOOK {
            fence_looked = std::time::Instant::now();
            if crate::failover::record::path(&claim.0.dir).exists() {
                commit(link, apply, claim)?;
                let m = format!(
                    "disk {:?} is being failed over at the recovery site: replication stops here (applied through seq {}); keep the ring (nothing is released): a rollback there resumes after it",
                    claim.0.id,
                    apply.applied_seq()
                );
                log::info!("shipper {}: {m}", link.peer());
                return Err(refuse(link, Refusal::new(ErrorCode::FailedOver, m)));
            }
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
                frame(link, apply, &rx, claim)?;
                link.consume(&rx);
                if apply.full() || link.unsent() > MAX_UNSENT {
                    break;
                }
            }
        }
        if apply.uncommitted() {
            let must = apply.must_commit();
            let more_waiting = if paused {
                false
            } else {
                link.pump()?;
                link.next_frame()?.is_some()
            };
            if !more_waiting || must {
                commit(link, apply, claim)?;
            }
        }
        if link.last_tx.elapsed() >= HEARTBEAT_EVERY {
            let hb = Heartbeat {
                now_ns: now_ns(),
                seq: apply.applied_seq(),
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

/// One frame from the shipper.
fn frame(
    link: &mut Link,
    apply: &mut Apply<Journaled>,
    rx: &Received,
    claim: &Claim,
) -> Result<(), SessionError> {
    match rx.header.ftype {
        FrameType::Batch => {
            let r = apply.batch(link.body(rx));
            if let Ok(done) = &r {
                let mut l = claim.0.live();
                l.wire_bytes += done.wire_bytes;
                l.plain_bytes += done.plain_bytes;
                l.batches += 1;
            }
            for body in apply.outbox() {
                link.send(FrameType::BlockHashes, &body)?;
            }
            match r {
                Ok(_) => Ok(()),
                Err(r) => Err(refuse(link, r)),
            }
        }
        FrameType::Heartbeat => {
            let hb = Heartbeat::decode(link.body(rx))?;
            apply.heartbeat(hb.source_flags);
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
            Err(refuse(link, Refusal::new(ErrorCode::Protocol, m)))
        }
    }
}

/// Commit what the pipeline applied and acknowledge it.
fn commit(
    link: &mut Link,
    apply: &mut Apply<Journaled>,
    claim: &Claim,
) -> Result<(), SessionError> {
    match apply.commit() {
        Ok(None) => Ok(()),
        Ok(Some(ack)) => {
            {
                let mut l = claim.0.live();
                l.applied_seq = ack.applied_seq;
                l.sync_cursor = apply.consistency().state().sync_cursor;
            }
            link.send(FrameType::Ack, &ack.encode())?;
            Ok(())
        }
        Err(r) => Err(refuse(link, r)),
    }
}
