//! One ublk hardware queue: a thread with libublk's io_uring, one task per
//! tag on a single-thread executor. A tag's request goes through the same
//! steps as a request of one NBD connection (`server::connection`):
//! overlap claim → capture `begin` (the in-flight mark) → the disk
//! (io_uring on the disk's descriptor) → capture → claim released → for
//! FUA, the disk and the ring synced → answer. A FLUSH syncs the ranges of
//! the capture's plan and the disk before it is answered.
//!
//! The queue's tasks share one capture session (one in-flight lane of the
//! ring; the tag is the slot), borrowed only between awaits.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkUringData};

use super::Shared;
use crate::capture::CaptureSession;

type Session<'a> = RefCell<Box<dyn CaptureSession + 'a>>;

/// The claims' connection id of queue `qid` (NBD connections count up
/// from 0; the two front ends never serve one disk in one process).
fn claim_owner(qid: u16) -> u64 {
    u64::MAX - u64::from(qid)
}

/// Run queue `qid` until the device stops.
///
/// A queue that cannot run, or panics, takes the process down (abort): its
/// claims and in-flight marks would otherwise stay held while the other
/// queues serve, and the device would never start. The device survives
/// (user recovery); a restarted splitter recovers the ring.
pub(super) fn run(qid: u16, dev: &UblkDev, shared: &Shared) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_queue(qid, dev, shared)
    }));
    match r {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            log::error!(
                "ublk queue {qid}: {why}: aborting (the device stays; restart with --recover)"
            );
            std::process::abort();
        }
        Err(_) => {
            log::error!(
                "ublk queue {qid} panicked: aborting (the device stays; restart with --recover)"
            );
            std::process::abort();
        }
    }
}

fn serve_queue(qid: u16, dev: &UblkDev, shared: &Shared) -> Result<(), String> {
    let waker =
        crate::server::overlap::waker().map_err(|e| format!("cannot make an eventfd: {e}"))?;
    let q = UblkQueue::new(qid, dev).map_err(|e| format!("cannot set up: {e}"))?;
    let session: Session<'_> = RefCell::new(shared.capture.session());
    let waker_fd = std::os::fd::AsRawFd::as_raw_fd(&waker);
    let exe = smol::LocalExecutor::new();
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, session) = (&q, &session);
        tasks.push(exe.spawn(async move {
            match io_task(q, tag, session, shared, waker_fd).await {
                Ok(()) | Err(libublk::UblkError::QueueIsDown) => {}
                Err(e) => log::error!("ublk queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
    shared.claims.forget_waker(waker_fd);
    log::debug!("ublk queue {qid} stopped");
    Ok(())
}

/// One tag: fetch a request, serve it, answer it and fetch the next.
async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    session: &Session<'_>,
    shared: &Shared,
    waker: i32,
) -> Result<(), libublk::UblkError> {
    let mut buf = IoBuf::<u8>::new(shared.io_buf_bytes);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        shared.busy.fetch_add(1, Ordering::SeqCst);
        if shared.handing_over.load(Ordering::SeqCst) {
            // A successor takes over: this request is left unanswered and
            // the kernel issues it again to the new process.
            shared.busy.fetch_sub(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        let res = handle(q, tag, buf.as_mut_slice(), session, shared, waker).await;
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        if res < 0 {
            report_failure(q, tag, res, shared);
        }
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Log a failed request (the first 20; then one line per 1000).
fn report_failure(q: &UblkQueue<'_>, tag: u16, res: i32, shared: &Shared) {
    let n = shared.failures.fetch_add(1, Ordering::Relaxed);
    if n < 20 || n.is_multiple_of(1000) {
        let iod = q.get_iod(tag);
        log::warn!(
            "ublk queue {} tag {tag}: op {} at sector {} (+{} sectors, flags {:#x}) failed: {} ({} failures so far)",
            q.get_qid(),
            iod.op_flags & 0xff,
            iod.start_sector,
            iod.nr_sectors,
            iod.op_flags >> 8,
            io::Error::from_raw_os_error(-res),
            n + 1
        );
    }
}

/// A request's byte count as the kernel's result (at most io_buf_bytes,
/// checked against the buffer before: it fits).
fn done_bytes(len: u32) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

/// A negative errno for the kernel.
fn neg(e: &io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// Serve the request in `tag`; the result the kernel gets (bytes done for
/// reads and writes, 0 for the others, or a negative errno).
async fn handle(
    q: &UblkQueue<'_>,
    tag: u16,
    buf: &mut [u8],
    session: &Session<'_>,
    shared: &Shared,
    waker: i32,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        // A FLUSH carries no range (the kernel sends sector u64::MAX, 0 sectors).
        return match sync(shared, session).await {
            Ok(()) => 0,
            Err(e) => neg(&e),
        };
    }
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let len = u64::from(iod.nr_sectors) << 9;
    let size = shared.disk.size();
    let Some(offset) = iod.start_sector.checked_mul(512) else {
        return -libc::EINVAL;
    };
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return -libc::EINVAL;
    }
    // At most io_buf_bytes (the kernel's max_sectors), so it fits u32 and usize.
    let (Ok(n), Ok(len32)) = (usize::try_from(len), u32::try_from(len)) else {
        return -libc::EINVAL;
    };
    let is_change = matches!(
        op,
        sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
    );
    if is_change && shared.disk.caps().read_only {
        return -libc::EPERM;
    }
    match op {
        sys::UBLK_IO_OP_READ => {
            if n > buf.len() {
                return -libc::EINVAL;
            }
            match read(shared, offset, &mut buf[..n]).await {
                Ok(()) => done_bytes(len32),
                Err(e) => neg(&e),
            }
        }
        sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            if op == sys::UBLK_IO_OP_WRITE && n > buf.len() {
                return -libc::EINVAL;
            }
            let slot = usize::from(tag);
            let owner = claim_owner(q.get_qid());
            // Overlapping changes reach the disk and the ring in one order:
            // a change waits while another one over its bytes is in flight
            // (rare: file systems do not do it), polling every 50 µs.
            while !shared.claims.try_claim(owner, slot, offset, len, waker) {
                pause_us(50).await;
            }
            session.borrow_mut().begin(slot, offset, len);
            let done = match op {
                sys::UBLK_IO_OP_WRITE => write(shared, offset, &buf[..n]).await,
                sys::UBLK_IO_OP_DISCARD => match shared.disk.trim(offset, len) {
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        // Nothing changed: like a trim the NBD server ignores.
                        session.borrow_mut().cancel(slot);
                        shared.claims.release(owner, slot);
                        return 0;
                    }
                    r => r,
                },
                _ => {
                    let may_trim = iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0;
                    shared.disk.zero(offset, len, may_trim, false)
                }
            };
            let captured = match done {
                Err(e) => {
                    session.borrow_mut().failed(slot, offset, len);
                    Err(e)
                }
                Ok(()) => {
                    let mut s = session.borrow_mut();
                    match op {
                        sys::UBLK_IO_OP_WRITE => s.write(slot, offset, &buf[..n]),
                        sys::UBLK_IO_OP_DISCARD => s.trim(slot, offset, len32),
                        _ => s.zero(slot, offset, len32),
                    }
                    .map_err(|e| {
                        log::error!("ublk: capturing a change at {offset}+{len} failed: {e}");
                        io::Error::from_raw_os_error(libc::EIO)
                    })
                }
            };
            shared.claims.release(owner, slot);
            if let Err(e) = captured {
                return neg(&e);
            }
            if fua {
                if let Err(e) = sync(shared, session).await {
                    return neg(&e);
                }
            }
            if op == sys::UBLK_IO_OP_WRITE {
                done_bytes(len32)
            } else {
                0
            }
        }
        _ => -libc::EOPNOTSUPP,
    }
}

/// Submit one entry on the queue's io_uring and wait for its result.
async fn submit(sqe: io_uring::squeue::Entry) -> io::Result<i32> {
    match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
        Ok(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        Ok(r) => Ok(r),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Wait `us` microseconds without blocking the queue's other tags.
async fn pause_us(us: u64) {
    let ts = types::Timespec::new().nsec(u32::try_from(us * 1000).unwrap_or(1_000_000));
    // The timespec lives in this frame until the completion is reaped (the
    // future is awaited here). ETIME is the normal result.
    let _ = submit(opcode::Timeout::new(&ts).build()).await;
}

/// Fill `buf` from the disk at `offset`.
async fn read(shared: &Shared, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let direct = shared.direct.as_ref().map(AsRawFd::as_raw_fd);
    let Some(fd) = direct.or_else(|| shared.disk.uring_fd()) else {
        return shared.disk.read_at(offset, buf);
    };
    let mut at = 0usize;
    while at < buf.len() {
        let rest = &mut buf[at..];
        // At most io_buf_bytes.
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        // The buffer is this tag's, untouched until the read completes:
        // the future is awaited here.
        let sqe = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
            .offset(offset + at as u64)
            .build();
        match submit(sqe).await? {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n => at += usize::try_from(n).unwrap_or(0),
        }
    }
    Ok(())
}

/// Write `data` to the disk at `offset`.
async fn write(shared: &Shared, offset: u64, data: &[u8]) -> io::Result<()> {
    let fd = match (&shared.direct, shared.disk.uring_fd()) {
        // Direct I/O from the tag's page-aligned buffer, 512-byte aligned.
        (Some(d), _) => d.as_raw_fd(),
        (None, Some(fd)) if !shared.disk.caps().inline_writes => fd,
        // Buffered writes to a file: cheaper on this thread than through an
        // io_uring worker (see Caps::inline_writes).
        _ => return shared.disk.write_at(offset, data, false),
    };
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Write::new(types::Fd(fd), rest.as_ptr(), len)
            .offset(offset + at as u64)
            .build();
        match submit(sqe).await? {
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            n => at += usize::try_from(n).unwrap_or(0),
        }
    }
    Ok(())
}

/// Make every change captured so far durable, on the disk and in the ring:
/// the ranges of the capture's plan, then the disk (when the ring shares
/// the disk's file system, its ranges are written back and the disk's
/// fdatasync flushes the device cache for both).
async fn sync(shared: &Shared, session: &Session<'_>) -> io::Result<()> {
    let plan = session.borrow_mut().sync_plan();
    if let Some(c) = &plan {
        for &(offset, len) in &c.plan.ranges {
            submit(c.range_entry(offset, len, c.shares_disk_device)).await?;
        }
    }
    match shared.disk.uring_fd() {
        Some(fd) => {
            submit(
                opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            )
            .await?;
        }
        None => shared.disk.flush()?,
    }
    if let Some(c) = &plan {
        session.borrow_mut().synced(c);
    }
    Ok(())
}
