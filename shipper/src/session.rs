//! One connection to the target: TLS, hello, then a loop that sends
//! batches while the window has room, takes acknowledgements (releasing
//! ring space), sends heartbeats, and publishes progress.

use std::collections::VecDeque;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ring::LinkState;
use transport::link::LinkError;
use transport::Link;
use wire::frame::*;
// PEER_TIMEOUT: a target silent this long is gone; HEARTBEAT_EVERY: also
// carries lag and waiting counts to the target.
use wire::timing::{CONNECT_TIMEOUT, HEARTBEAT_EVERY, HELLO_TIMEOUT, PEER_TIMEOUT};

use crate::batch::Encoded;
use crate::compress::policy::Spent;
use crate::error::{Error, Result};
use crate::pace::Pacer;
use crate::pipeline::{Meta, Ready};
use crate::ship::Shipper;

/// How often progress is published in the ring file.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Most records per batch.
const MAX_RECORDS: usize = 1 << 16;

/// Batches sent on this connection and not yet acknowledged.
#[derive(Default)]
struct Window {
    inflight: VecDeque<InFlight>,
    /// Plain bytes in `inflight`.
    bytes: u64,
    /// Batches sent on this connection (their numbers count from 1).
    sent: u64,
}

impl Window {
    /// The target acknowledged the first `batches` batches.
    fn acked(&mut self, batches: u64) {
        while self.inflight.front().is_some_and(|f| f.batch <= batches) {
            if let Some(f) = self.inflight.pop_front() {
                self.bytes -= f.plain;
            }
        }
    }
}

/// Send one sealed batch and account for it (window, pacer, counters).
/// Returns its bytes on the wire.
fn send_batch(
    link: &mut Link,
    w: &mut Window,
    pacer: &mut Pacer,
    stats: &crate::stats::Stats,
    b: &Ready,
) -> std::io::Result<u64> {
    let payload = b.payload();
    let frame_len = (FRAME_HEADER_LEN + BATCH_HEADER_LEN + payload.len()) as u64;
    let plain = u64::from(b.header.plain_len);
    link.send_parts(FrameType::Batch, &[&b.header.encode(), payload])?;
    w.sent += 1;
    w.inflight.push_back(InFlight {
        plain,
        first_time_ns: b.meta.first_time_ns,
        batch: w.sent,
    });
    w.bytes += plain;
    pacer.sent(frame_len);
    stats.plain_bytes.fetch_add(plain, Ordering::Relaxed);
    stats.wire_bytes.fetch_add(frame_len, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    Ok(frame_len)
}

struct InFlight {
    plain: u64,
    first_time_ns: u64,
    /// Batch number in this connection.
    batch: u64,
}

fn link_err(sh: &Shipper) -> impl Fn(LinkError) -> Error + '_ {
    move |source| Error::Link {
        target: sh.cfg.target.clone(),
        source,
    }
}

fn connect(sh: &Shipper) -> Result<Link> {
    let target = &sh.cfg.target;
    let io = |e: std::io::Error| Error::Link {
        target: target.clone(),
        source: LinkError::Io(e),
    };
    let addr = target
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| Error::Invalid(format!("{target} resolves to no address")))?;
    let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(io)?;
    let conn = rustls::ClientConnection::new(sh.tls.clone(), sh.server_name.clone())
        .map_err(|e| link_err(sh)(LinkError::Tls(e)))?;
    let mut link = Link::new(conn, sock).map_err(io)?;
    link.handshake(HELLO_TIMEOUT).map_err(link_err(sh))?;
    Ok(link)
}

fn refused(sh: &Shipper, body: &[u8]) -> Error {
    match ErrorMsg::decode(body) {
        Ok(m) => Error::Refused {
            target: sh.cfg.target.clone(),
            code: Some(m.code),
            message: m.message,
        },
        Err(e) => link_err(sh)(LinkError::Wire(e)),
    }
}

/// The ring's state as HELLO_* flags.
fn source_flags(c: &ring::Consumer) -> u32 {
    let st = c.state();
    let mut flags = 0;
    if st & ring::format::STATE_NEEDS_INITIAL_SYNC != 0 {
        flags |= HELLO_NEEDS_INITIAL_SYNC;
    }
    // Extents a crash left in the dirty bitmap are resent like overflowed
    // ones: the target must not call the replica consistent meanwhile.
    if st & (ring::format::STATE_OVERFLOW | ring::format::STATE_CRASH_DIRTY) != 0 {
        flags |= HELLO_OVERFLOW;
    }
    if st & ring::format::STATE_NEEDS_VERIFY != 0 {
        flags |= HELLO_NEEDS_VERIFY;
    }
    flags
}

/// The disk's lineage from its marker (`blockdev::marker`): its stable
/// identity (the ring's id when the disk has no marker), and, for a
/// failed-over copy protected back, the point it began as.
fn lineage(ring_id: [u8; 16], disk: Option<&std::path::Path>) -> Option<wire::frame::Lineage> {
    let m = match disk.map(blockdev::marker::read) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(m))) => Some(m),
        Some(Err(e)) => {
            // Not "unmarked": the target would adopt the ring's id.
            log::warn!("disk marker: {e}; the target gets no lineage");
            return None;
        }
    };
    let mut l = wire::frame::Lineage {
        disk_uuid: m.as_ref().map_or(ring_id, |m| m.uuid),
        flags: if m.is_some() {
            wire::frame::LINEAGE_MARKED
        } else {
            0
        },
        ..Default::default()
    };
    if let Some(o) = m.and_then(|m| m.failover) {
        l.flags |= wire::frame::LINEAGE_FAILED_OVER;
        if o.written {
            l.flags |= wire::frame::LINEAGE_WRITTEN;
        }
        l.from_ring = o.from_ring;
        l.from_seq = o.seq;
        l.failed_over_ns = o.at_ns;
    }
    Some(l)
}

fn hello(sh: &mut Shipper, link: &mut Link) -> Result<HelloReply> {
    let c = &sh.consumer;
    let flags = source_flags(c);
    let h = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        flags,
        ring_id: c.disk_id(),
        disk_size: c.disk_size(),
        block_size: BLOCK_SIZE,
        tail_seq: c.tail_seq().max(1),
        next_seq: c.head_next_seq().max(c.tail_seq()).max(1),
        disk_id: sh.cfg.disk_id.clone(),
        lineage: lineage(c.disk_id(), sh.cfg.disk.as_deref()),
    };
    let mut b = Vec::new();
    h.encode(&mut b);
    link.send(FrameType::Hello, &b)
        .map_err(|e| link_err(sh)(LinkError::Io(e)))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        link.pump().map_err(link_err(sh))?;
        if let Some(rx) = link
            .next_frame()
            .map_err(|e| link_err(sh)(LinkError::Wire(e)))?
        {
            let body = link.body(&rx);
            let r = match rx.header.ftype {
                FrameType::HelloReply => {
                    HelloReply::decode(body).map_err(|e| link_err(sh)(LinkError::Wire(e)))
                }
                FrameType::Error => Err(refused(sh, body)),
                t => Err(Error::Refused {
                    target: sh.cfg.target.clone(),
                    code: None,
                    message: format!("answered the hello with {}", t.name()),
                }),
            };
            link.consume(&rx);
            return r;
        }
        if link.eof() || Instant::now() >= deadline {
            return Err(Error::Refused {
                target: sh.cfg.target.clone(),
                code: None,
                message: "no answer to the hello (closed or timed out)".into(),
            });
        }
        link.wait(Duration::from_millis(50))
            .map_err(|e| link_err(sh)(LinkError::Io(e)))?;
    }
}

/// Run one connection until it fails or the shipper is stopped and drained.
pub(crate) fn run(sh: &mut Shipper) -> Result<()> {
    let mut link = connect(sh)?;
    let target = sh.cfg.target.clone();
    let lerr = move |source: LinkError| Error::Link {
        target: target.clone(),
        source,
    };
    sh.stats.connects.fetch_add(1, Ordering::Relaxed);
    let reply = hello(sh, &mut link)?;
    let applied = reply.applied_seq;
    sh.stats.set_state(LinkState::Connected);
    sh.stats.acked_seq.store(applied, Ordering::Relaxed);
    log::info!(
        "connected to {} for disk {:?}: the replica has applied up to seq {applied}{}; shipping from seq {}",
        sh.cfg.target,
        sh.cfg.disk_id,
        if reply.flags & REPLY_CONSISTENT == 0 { " (not consistent yet)" } else { "" },
        (applied + 1).max(sh.consumer.next_seq())
    );
    if let Some(r) = &mut sh.resync {
        r.start(&reply, &sh.consumer, &sh.stats);
    } else if reply.flags & REPLY_FULL_SYNC != 0 || sh.consumer.dirty_bytes() > 0 {
        log::warn!("the replica needs a resync, but this shipper was not given the disk (--disk) to read it from");
    }
    let mut w = Window::default();
    let mut pacer = Pacer::new(sh.cfg.max_rate);
    let mut waiting_since: Option<Instant> = None;
    let mut last_publish = Instant::now() - PUBLISH_EVERY;
    let mut rate_mark = (Instant::now(), sh.stats.plain_bytes.load(Ordering::Relaxed));
    let mut drain_deadline: Option<Instant> = None;
    let mut last_heartbeat = Instant::now();
    sh.pipe.reset();
    sh.stats.set_compression(sh.pipe.policy.current());
    loop {
        let turn = Instant::now();
        if drain_deadline.is_none() && sh.stop.load(Ordering::Relaxed) {
            drain_deadline = Some(Instant::now() + sh.cfg.drain_timeout);
        }
        if let Err(e) = link.pump() {
            // The target may have said why before the connection broke.
            if let Ok(Some(rx)) = link.next_frame() {
                if rx.header.ftype == FrameType::Error {
                    return Err(refused(sh, link.body(&rx)));
                }
            }
            return Err(lerr(e));
        }
        // Acknowledgements and other frames from the target.
        while let Some(rx) = link.next_frame().map_err(|e| lerr(LinkError::Wire(e)))? {
            match rx.header.ftype {
                FrameType::Ack => {
                    let a = Ack::decode(link.body(&rx)).map_err(|e| lerr(LinkError::Wire(e)))?;
                    w.acked(a.batches);
                    sh.consumer.release(a.applied_seq)?;
                    if let Some(r) = &mut sh.resync {
                        r.acked(a.batches, &sh.consumer);
                    }
                    sh.stats
                        .acked_seq
                        .fetch_max(a.applied_seq, Ordering::Relaxed);
                }
                FrameType::Heartbeat => {}
                FrameType::BlockHashes => {
                    let bh = BlockHashes::decode(link.body(&rx))
                        .map_err(|e| lerr(LinkError::Wire(e)))?;
                    match &mut sh.resync {
                        Some(r) => r.block_hashes(bh),
                        None => return Err(Error::Invalid(
                            "the target compares by hashes but this shipper has no disk to read"
                                .into(),
                        )),
                    }
                }
                FrameType::Error => {
                    let e = refused(sh, link.body(&rx));
                    return Err(e);
                }
                t => {
                    return Err(Error::Refused {
                        target: sh.cfg.target.clone(),
                        code: None,
                        message: format!("sent an unexpected {} frame", t.name()),
                    })
                }
            }
            link.consume(&rx);
        }
        // Send sealed batches in order while the link takes them, and fill
        // the pipeline from the ring (and the resync) while it has room.
        sh.pipe.poll(Duration::ZERO)?;
        loop {
            // Nothing new while ciphertext still waits for the socket: the
            // window bounds what is unacknowledged, this bounds memory.
            while w.bytes < sh.cfg.window_bytes && pacer.wait().is_zero() && !link.wants_write() {
                let Some(b) = sh.pipe.pop_ready()? else { break };
                let wire = send_batch(&mut link, &mut w, &mut pacer, &sh.stats, &b)
                    .map_err(|e| lerr(LinkError::Io(e)))?;
                sh.pipe
                    .policy
                    .sent(wire, u64::from(b.header.plain_len), b.choice);
                if b.meta.first_time_ns != 0 {
                    sh.stats
                        .sent_seq
                        .store(b.header.last_seq, Ordering::Relaxed);
                }
                sh.pipe.recycle(b);
                link.pump().map_err(&lerr)?;
            }
            if sh.pipe.is_full() || w.bytes >= sh.cfg.window_bytes {
                break;
            }
            if !fill(
                sh,
                &w,
                applied,
                &mut waiting_since,
                drain_deadline.is_some(),
            )? {
                break;
            }
        }
        // Progress, lag, heartbeats.
        let oldest = match w.inflight.iter().find(|f| f.first_time_ns != 0) {
            Some(f) => f.first_time_ns,
            // Then batches read and not yet sent (sealing, or paced).
            None => match sh.pipe.oldest_time_ns() {
                Some(t) => t,
                None if sh.consumer.unread_bytes() == 0 => 0,
                None => sh.stats.oldest_pending_ns.load(Ordering::Relaxed).max(1),
            },
        };
        sh.stats.oldest_pending_ns.store(oldest, Ordering::Relaxed);
        if last_publish.elapsed() >= PUBLISH_EVERY {
            last_publish = Instant::now();
            let acked = sh.stats.acked_seq.load(Ordering::Relaxed);
            let head = sh.consumer.head_next_seq().saturating_sub(1);
            sh.stats
                .records_waiting
                .store(head.saturating_sub(acked), Ordering::Relaxed);
            sh.stats
                .bytes_waiting
                .store(sh.consumer.used_bytes(), Ordering::Relaxed);
            sh.stats.tls_bytes.store(link.bytes_out, Ordering::Relaxed);
            let dt = rate_mark.0.elapsed().as_secs_f64();
            if dt >= 1.0 {
                let now = sh.stats.plain_bytes.load(Ordering::Relaxed);
                let bytes = now - rate_mark.1;
                let ms = u64::try_from(rate_mark.0.elapsed().as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                sh.stats
                    .rate
                    .store(bytes.saturating_mul(1000) / ms, Ordering::Relaxed);
                rate_mark = (Instant::now(), now);
            }
            sh.consumer.publish(&sh.stats.progress());
        }
        // Every second, also while batches flow: it carries lag and the
        // ring's flags (overflow) to the target.
        if last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            last_heartbeat = Instant::now();
            let hb = Heartbeat {
                now_ns: ring::wall_clock_ns(),
                seq: sh.consumer.head_next_seq().saturating_sub(1),
                oldest_pending_ns: if oldest > 1 {
                    oldest
                } else if sh.consumer.unread_bytes() > 0 {
                    sh.consumer.oldest_unreleased_ns().unwrap_or(0)
                } else {
                    0
                },
                records_waiting: sh.stats.records_waiting.load(Ordering::Relaxed),
                bytes_waiting: sh.stats.bytes_waiting.load(Ordering::Relaxed),
                source_flags: source_flags(&sh.consumer),
            };
            link.send(FrameType::Heartbeat, &hb.encode())
                .map_err(|e| lerr(LinkError::Io(e)))?;
        }
        if let Some(d) = drain_deadline {
            let done =
                w.inflight.is_empty() && sh.pipe.is_empty() && sh.consumer.unread_bytes() == 0;
            if done || Instant::now() >= d {
                if !done {
                    log::warn!(
                        "stopping with {} records not yet acknowledged; they stay in the ring for the next run",
                        sh.stats.records_waiting.load(Ordering::Relaxed)
                    );
                }
                link.close();
                return Ok(());
            }
        }
        if link.eof() {
            // Frames that arrived with the close (an ERROR saying why) come first.
            while let Ok(Some(rx)) = link.next_frame() {
                if rx.header.ftype == FrameType::Error {
                    return Err(refused(sh, link.body(&rx)));
                }
                link.consume(&rx);
            }
            return Err(Error::Refused {
                target: sh.cfg.target.clone(),
                code: None,
                message: "closed the connection".into(),
            });
        }
        if link.last_rx.elapsed() >= PEER_TIMEOUT {
            return Err(lerr(LinkError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing heard for {} s", PEER_TIMEOUT.as_secs()),
            ))));
        }
        let link_full =
            w.bytes >= sh.cfg.window_bytes || !pacer.wait().is_zero() || link.wants_write();
        // Busy: the shipper itself is behind (a batch's worth waits, or
        // the threads are sealing); waiting out --batch-delay is idle.
        let waiting = sh.consumer.unread_bytes();
        let spent = if waiting == 0 && sh.pipe.is_empty() {
            Spent::Idle
        } else if link_full {
            Spent::Blocked
        } else if sh.pipe.sealing() || waiting >= sh.cfg.batch_bytes as u64 {
            Spent::Busy
        } else {
            Spent::Idle
        };
        let t = if sh.pipe.sealing() {
            Duration::from_millis(1)
        } else if link.wants_write() {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(1).max(pacer.wait().min(Duration::from_millis(50)))
        };
        link.wait(t).map_err(|e| lerr(LinkError::Io(e)))?;
        sh.pipe.policy.spent(spent, turn.elapsed());
        if let Some((old, new, why)) = sh.pipe.policy.tick() {
            log::info!(
                "compression: {} instead of {} ({}: {})",
                new.name(),
                old.name(),
                why.name(),
                why.explain()
            );
        }
        sh.stats.set_compression(sh.pipe.policy.current());
    }
}

/// Put the next batch into the pipeline: a prepared resync batch whose
/// turn it is, or records from the ring. False when there is none now.
fn fill(
    sh: &mut Shipper,
    w: &Window,
    applied: u64,
    waiting_since: &mut Option<Instant>,
    draining: bool,
) -> Result<bool> {
    // The number the next batch pushed gets on this connection: batches
    // leave the pipeline in order, and all of them are sent.
    let batch_no = w.sent + sh.pipe.len() as u64 + 1;
    if let Some(r) = &mut sh.resync {
        if !draining
            && r.ready_tag().is_none()
            && w.bytes < sh.cfg.window_bytes
            && r.has_work(&sh.consumer)
        {
            // Read, hashed (and, for a copy, encoded) here while the
            // compression threads seal the batches before it.
            r.prepare(&sh.consumer, sh.cfg.batch_bytes as u64, &sh.stats)?;
        }
        // A prepared resync batch enters the stream once every ring record
        // below its tag was read (and so queued before it): the next unread
        // record (if any) is at or above it. (Not `next_seq() >= tag`:
        // after a gap in the sequence that may never happen.)
        let ready = r.ready_tag().is_some_and(|t| {
            sh.consumer.next_seq() >= t
                || sh.consumer.unread_bytes() == 0
                || sh.consumer.peek_seq().is_none_or(|s| s >= t)
        });
        if ready {
            let mut plain = sh.pipe.spare();
            plain.clear();
            if let Some(sb) = r.take_ready(&mut plain, batch_no) {
                // Resync batches hold no ring records: no capture time,
                // acknowledged by batch count.
                sh.pipe.push(
                    plain,
                    Meta {
                        first: sb.seq,
                        last: sb.seq,
                        count: sb.count,
                        first_time_ns: 0,
                    },
                )?;
                return Ok(true);
            }
            sh.pipe.give_back(plain);
        }
    }
    let unread = sh.consumer.unread_bytes();
    if unread == 0 {
        *waiting_since = None;
        return Ok(false);
    }
    let since = *waiting_since.get_or_insert_with(Instant::now);
    if (!w.inflight.is_empty() || !sh.pipe.is_empty())
        && unread < sh.cfg.batch_bytes as u64
        && since.elapsed() < sh.cfg.batch_delay
        && !draining
    {
        return Ok(false);
    }
    // Not past the tag of a resync batch waiting to go in between.
    let stop = sh
        .resync
        .as_ref()
        .and_then(|r| r.ready_tag())
        .unwrap_or(u64::MAX);
    let n = sh
        .consumer
        .read_below(MAX_RECORDS, sh.cfg.batch_bytes, stop, &mut sh.batch)?;
    if n == 0 {
        return Ok(false);
    }
    *waiting_since = None;
    let last = sh.batch.last_seq().unwrap_or(0);
    match crate::batch::encode(&mut sh.batch, applied, sh.pipe.spare()) {
        Encoded::Empty(spare) => {
            // Everything in it was already applied at the target.
            sh.consumer.release(last)?;
            sh.pipe.give_back(spare);
        }
        Encoded::Plain(p) => sh.pipe.push(
            p.bytes,
            Meta {
                first: p.first,
                last: p.last,
                count: p.count,
                first_time_ns: p.first_time_ns.max(1),
            },
        )?,
    }
    Ok(true)
}
