//! The opening of a shipper's connection: the TLS handshake (the client
//! certificate must chain to the CA) and the HELLO within
//! [`HELLO_TIMEOUT`] of the accept in all, only a HELLO header taken
//! before the hello; then Version, Forbidden (enrolment: the HELLO's disk
//! id must be among the certificate's disk URIs), Busy (one shipper per
//! disk), Mismatch (disk size) or ReplicaIo, or the state opened, the
//! HELLO's news about the source given to the replica's
//! [`Consistency`], the replica opened, and the HELLO_REPLY sent.
//!
//! What the apply side needs comes out as an [`Opened`]; every refusal is
//! a [`Refusal`], sent as an ERROR frame.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use transport::link::{LinkError, Received, DEFAULT_READ_AHEAD};
use transport::tls::PeerIdentity;
use transport::Link;
use wire::frame::{
    ErrorCode, FrameType, Hello, HelloReply, MAX_BODY, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use wire::timing::HELLO_TIMEOUT;

use super::apply::Apply;
use super::{refuse, Refusal, SessionContext, SessionError};
use crate::admission::Permit;
use crate::consistency::{Consistency, SourceHello};
use crate::journal::{JournalConfig, JournalWriter, Journaled};
use crate::lockfile::Locked;
use crate::registry::{Claim, STATE_FILE};
use crate::state::StateFile;

/// Bytes read ahead of a complete frame before the HELLO (after it,
/// transport's DEFAULT_READ_AHEAD).
const HELLO_READ_AHEAD: usize = 4096;

/// A connection whose HELLO was accepted and answered.
pub(super) struct Opened {
    /// The connection (its limits those of a session now).
    pub link: Link,
    /// The disk, held for this shipper until dropped.
    pub claim: Claim,
    /// The apply side, over the replica.
    pub apply: Apply<Journaled>,
    /// The disk's apply lock, held while the session applies.
    pub _applying: Locked,
}

/// Handshake, HELLO, checks, state, replica, HELLO_REPLY. `permit` is told
/// when the opening is over (the HELLO is here).
pub(super) fn open(
    sock: TcpStream,
    ctx: &SessionContext,
    permit: &mut Permit,
) -> Result<Opened, SessionError> {
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
                Refusal::new(ErrorCode::Protocol, format!("bad HELLO: {e}")),
            ))
        }
    };
    link.consume(&rx);
    if let Err(r) = admit(&hello, &id) {
        return Err(refuse(&mut link, r));
    }
    let Some(claim) = ctx.registry.claim(&hello.disk_id) else {
        let m = format!("another shipper is connected for disk {:?}", hello.disk_id);
        return Err(refuse(&mut link, Refusal::new(ErrorCode::Busy, m)));
    };
    let (applying, failed_back) = match fence_check(&claim, &hello) {
        Ok(l) => l,
        Err(r) => return Err(refuse(&mut link, r)),
    };
    if let Err((code, m)) = crate::identity::check_hello(&claim.0.dir, &hello) {
        log::warn!("disk {:?}: {m}", hello.disk_id);
        claim.0.live().last_error = m.clone();
        return Err(refuse(&mut link, Refusal::new(code, m)));
    }
    let apply = match open_replica(&claim, &hello, ctx.journal, failed_back.as_ref()) {
        Ok(a) => a,
        Err(r) => return Err(refuse(&mut link, r)),
    };
    let st = *apply.consistency().state();
    {
        let mut l = claim.0.live();
        l.connected = true;
        l.peer = link.peer();
        l.peer_name = id.name.clone();
        l.applied_seq = st.applied_seq;
        l.last_error.clear();
    }
    log::info!(
        "shipper {} ({:?}) replicating disk {:?} into {}: applied seq {}, resuming after it{}",
        link.peer(),
        id.name,
        hello.disk_id,
        claim.0.spec.describe(),
        st.applied_seq,
        if st.consistent() {
            String::new()
        } else {
            format!("; replica not consistent: {}", st.reason.explain())
        }
    );
    let reply = HelloReply {
        version: PROTOCOL_VERSION.min(hello.max_version),
        flags: apply.consistency().reply_flags(),
        applied_seq: st.applied_seq,
        max_body: MAX_BODY,
        sync_cursor: st.sync_cursor,
    };
    link.send(FrameType::HelloReply, &reply.encode())?;
    Ok(Opened {
        link,
        claim,
        apply,
        _applying: applying,
    })
}

/// The disk's apply lock (held while the session lives, so a `failover`
/// knows when nothing applies), then the failover record: a failed-over
/// disk takes nothing from its shipper.
fn fence_check(
    claim: &Claim,
    hello: &Hello,
) -> Result<(Locked, Option<crate::failover::Record>), Refusal> {
    let e = &claim.0;
    std::fs::create_dir_all(&e.dir).map_err(|err| {
        Refusal::new(
            ErrorCode::ReplicaIo,
            format!("cannot create {}: {err}", e.dir.display()),
        )
    })?;
    // Held briefly by retention pruning, for longer by a failover command.
    let lock = crate::lockfile::lock_within(
        &e.dir.join(crate::failover::APPLY_LOCK),
        std::time::Duration::from_secs(2),
    )
    .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?
    .ok_or_else(|| {
        Refusal::new(
            ErrorCode::Busy,
            format!(
                "disk {:?} is held at the recovery site (a failover command, or retention pruning): nothing is applied; keep the ring (nothing is released)",
                e.id
            ),
        )
    })?;
    match crate::failover::record::load(&e.dir) {
        Ok(None) => Ok((lock, None)),
        Ok(Some(r)) if r.phase == crate::failover::Phase::Committed => {
            // The disk was failed back to the original site, which protects
            // it again: the old replica (the image the recovery site ran
            // on) becomes its seed once the session holds it. Its identity
            // first.
            crate::identity::check_hello(&e.dir, hello).map_err(|(c, m)| Refusal::new(c, m))?;
            crate::failover::check_failback(e, &r, hello, false)
                .map_err(|m| Refusal::new(ErrorCode::FailedOver, m))?;
            Ok((lock, Some(r)))
        }
        Ok(Some(r)) => Err(Refusal::new(
            ErrorCode::FailedOver,
            format!(
                "disk {:?} is {} at the recovery site (since {}): nothing is applied and this shipper keeps its ring (nothing is released); `nbd-target failover --rollback` there resumes replication where it stopped",
                e.id,
                r.describe(),
                crate::journal::timeline::format_rfc3339(r.failed_over_ns)
            ),
        )),
        Err(err) => Err(Refusal::new(ErrorCode::ReplicaIo, err.to_string())),
    }
}

/// The HELLO, by `deadline`. Only a HELLO header is accepted: any other
/// frame (or a bad header) is refused as soon as its header is here,
/// before a byte of its body is read; the link reads no more than a HELLO
/// and a little read-ahead meanwhile.
fn wait_hello(link: &mut Link, deadline: Instant) -> Result<Received, SessionError> {
    let protocol = |link: &mut Link, m: String| refuse(link, Refusal::new(ErrorCode::Protocol, m));
    loop {
        link.pump()?;
        match link.peek_header() {
            Ok(Some(h)) if h.ftype != FrameType::Hello => {
                let m = format!(
                    "expected HELLO, got a {} header ({} bytes of body) before the hello: nothing of it read",
                    h.ftype.name(),
                    h.len
                );
                return Err(protocol(link, m));
            }
            Ok(_) => {}
            Err(e) => {
                let m = format!("bad frame instead of a HELLO: {e}");
                return Err(protocol(link, m));
            }
        }
        match link.next_frame() {
            Ok(Some(r)) if r.header.ftype == FrameType::Hello => return Ok(r),
            Ok(Some(r)) => {
                let m = format!("expected HELLO, got {}", r.header.ftype.name());
                return Err(protocol(link, m));
            }
            Ok(None) => {}
            Err(e) => {
                let m = format!("bad HELLO frame: {e}");
                return Err(protocol(link, m));
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

/// Version (a protocol version in common), then enrolment: the HELLO's
/// disk id must be among the certificate's disk ids.
fn admit(hello: &Hello, id: &PeerIdentity) -> Result<(), Refusal> {
    if hello.min_version > PROTOCOL_VERSION || hello.max_version < MIN_PROTOCOL_VERSION {
        let m = format!(
            "no common protocol version: the shipper speaks {}..={}, this target {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
            hello.min_version, hello.max_version
        );
        return Err(Refusal::new(ErrorCode::Version, m));
    }
    if !id.disks.contains(&hello.disk_id) {
        let m = format!(
            "certificate {:?} may write disks {:?}, not {:?}: nothing written (issue it with `nbd-target pki issue --disk {}`)",
            id.name, id.disks, hello.disk_id, hello.disk_id
        );
        return Err(Refusal::new(ErrorCode::Forbidden, m));
    }
    Ok(())
}

/// The state (created at the disk's first connection), checked against
/// the HELLO (Mismatch), the HELLO's news given to the consistency and
/// saved if it changed anything, then the replica opened.
fn open_replica(
    claim: &Claim,
    hello: &Hello,
    journal: Option<JournalConfig>,
    failed_back: Option<&crate::failover::Record>,
) -> Result<Apply<Journaled>, Refusal> {
    let e = &claim.0;
    std::fs::create_dir_all(&e.dir).map_err(|err| {
        Refusal::new(
            ErrorCode::ReplicaIo,
            format!("cannot create {}: {err}", e.dir.display()),
        )
    })?;
    let source = SourceHello::from(hello);
    let fresh = Consistency::protection_begins(&source, hello.disk_size);
    let mut file = StateFile::open_or_create(&e.dir.join(STATE_FILE), fresh)
        .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?;
    if file.state.disk_size != hello.disk_size {
        return Err(Refusal::new(
            ErrorCode::Mismatch,
            format!(
                "disk {:?} has {} bytes but its replica was made for {}: a resized disk needs a new replica",
                hello.disk_id, hello.disk_size, file.state.disk_size
            ),
        ));
    }
    // A failback: the committed image is the seed, held by this session's
    // writer (its flock) before anything says so.
    let mut held = None;
    if let Some(r) = failed_back {
        let w = e
            .spec
            .open_writer(hello.disk_size)
            .map_err(|err| Refusal::new(ErrorCode::FailedOver, err.to_string()))?;
        // Again with the image held: nothing wrote it since the check.
        crate::failover::check_failback(e, r, hello, true)
            .map_err(|m| Refusal::new(ErrorCode::FailedOver, m))?;
        crate::failover::reuse_committed(&e.dir, &mut file)
            .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?;
        held = Some(w);
    }
    let jio = |err: crate::Error| Refusal::new(ErrorCode::ReplicaIo, format!("journal: {err}"));
    // The journal opens on the durable state as it was before this HELLO
    // (entries past it are applied but unacknowledged), and records a new
    // epoch before the state file says the source's numbers start again.
    let mut journal = match journal {
        Some(cfg) => Some(
            JournalWriter::open(&crate::journal::dir_of(&e.dir), cfg, &file.state, &e.id)
                .map_err(jio)?,
        ),
        None => None,
    };
    let before = file.state;
    let mut consistency = Consistency::new(file.state, &hello.disk_id, hello.flags);
    consistency.hello(&source);
    if let Some(j) = &mut journal {
        j.after_hello(&before, consistency.state()).map_err(jio)?;
    }
    if consistency.take_changed() {
        file.state = *consistency.state();
        file.save()
            .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?;
    }
    let writer = match held {
        Some(w) => w,
        None => e
            .spec
            .open_writer(hello.disk_size)
            .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?,
    };
    let pending = consistency
        .state()
        .applied_seq
        .max(hello.tail_seq.saturating_sub(1));
    let sink = Journaled::new(writer, journal);
    let apply = Apply::new(sink, file, consistency, &e.id, hello.disk_size, pending)?;
    if let Some(r) = failed_back {
        crate::failover::reprotected(&e.dir, r)
            .map_err(|err| Refusal::new(ErrorCode::ReplicaIo, err.to_string()))?;
    }
    Ok(apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16, disk: &str) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            flags: 0,
            ring_id: [1; 16],
            disk_size: 1 << 20,
            block_size: 4096,
            tail_seq: 1,
            next_seq: 1,
            disk_id: disk.into(),
            lineage: None,
        }
    }

    #[test]
    fn admit_checks_version_then_enrolment() {
        let id = PeerIdentity {
            name: "s".into(),
            disks: vec!["a".into()],
        };
        let v = PROTOCOL_VERSION;
        assert!(admit(&hello(MIN_PROTOCOL_VERSION, v, "a"), &id).is_ok());
        let code = |h: &Hello| admit(h, &id).map_err(|r| r.code).err();
        assert_eq!(code(&hello(v + 1, v + 1, "a")), Some(ErrorCode::Version));
        assert_eq!(code(&hello(v + 1, v + 1, "b")), Some(ErrorCode::Version));
        assert_eq!(code(&hello(v, v, "b")), Some(ErrorCode::Forbidden));
    }
}
