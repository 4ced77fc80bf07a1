//! Looking at a ring without taking a role: status and record dumps. Safe to
//! use while a producer and a consumer run.

use std::path::Path;

use crate::bitmap;
use crate::control::{ControlPage, ShipperStatus, VerifyStatus};
use crate::error::Result;
use crate::file::{uuid_string, RingFile, Scanned};
use crate::format::*;

/// A ring's state, as `splitter ring status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Disk id (UUID).
    pub disk_id: String,
    /// Disk path at creation.
    pub disk_path: String,
    /// Disk size.
    pub disk_size: u64,
    /// Data area bytes.
    pub capacity: u64,
    /// Bytes holding unreleased records.
    pub used_bytes: u64,
    /// Sequence of the newest record (0: none yet).
    pub head_seq: u64,
    /// Sequence of the oldest unreleased record.
    pub tail_seq: u64,
    /// Records waiting for the consumer to release them.
    pub records_waiting: u64,
    /// Capture time of the oldest waiting record (ns since the epoch), if any.
    pub oldest_waiting_ns: Option<u64>,
    /// Changes have overflowed into the dirty bitmap.
    pub overflow: bool,
    /// When the first overflow happened (ns since the epoch).
    pub overflow_since_ns: Option<u64>,
    /// Disk bytes marked dirty.
    pub dirty_bytes: u64,
    /// Disk bytes per bitmap bit.
    pub granularity: u64,
    /// The disk held data when the ring was made: a replica needs a full copy.
    pub needs_initial_sync: bool,
    /// Recovery cut a torn tail: source and replica must be compared.
    pub needs_verify: bool,
    /// Records lost to torn tails, cumulative.
    pub records_lost: u64,
    /// Process id of the last producer.
    pub producer_pid: u64,
    /// A crash left extents in the dirty bitmap.
    pub crash_dirty: bool,
    /// The last producer closed cleanly.
    pub clean: bool,
    /// The shipper's last published progress, if a shipper ever ran.
    pub shipper: Option<ShipperStatus>,
}

/// Read a ring's status.
pub fn status(path: &Path) -> Result<Status> {
    let rf = RingFile::open(path)?;
    let head = rf.get(live::HEAD);
    let tail = rf.get(live::TAIL);
    let next_seq = rf.get(live::NEXT_SEQ);
    let tail_seq = rf.get(live::TAIL_SEQ);
    let state = rf.get(live::STATE);
    let since = rf.get(live::OVERFLOW_SINCE);
    let oldest = if head > tail {
        let mut payload = Vec::new();
        let mut pos = tail;
        let mut found = None;
        for _ in 0..2 {
            match rf.read_record(pos, tail_seq, &mut payload, 0) {
                Scanned::Skip(n) => pos += n,
                Scanned::Record(h, _) => {
                    found = Some(h.time_ns);
                    break;
                }
                Scanned::Invalid(_) => break,
            }
        }
        found
    } else {
        None
    };
    Ok(Status {
        disk_id: uuid_string(&rf.disk_id),
        disk_path: rf.disk_path.clone(),
        disk_size: rf.layout.disk_size,
        capacity: rf.layout.capacity,
        used_bytes: head.saturating_sub(tail),
        head_seq: next_seq.saturating_sub(1),
        tail_seq,
        records_waiting: next_seq.saturating_sub(tail_seq),
        oldest_waiting_ns: oldest,
        overflow: state & STATE_OVERFLOW != 0,
        overflow_since_ns: (since != 0).then_some(since),
        dirty_bytes: bitmap::dirty_bytes(&rf),
        granularity: rf.layout.granularity,
        needs_initial_sync: state & STATE_NEEDS_INITIAL_SYNC != 0,
        needs_verify: state & STATE_NEEDS_VERIFY != 0,
        records_lost: rf.get(live::RECORDS_LOST),
        producer_pid: rf.get(live::PRODUCER_PID),
        crash_dirty: state & STATE_CRASH_DIRTY != 0,
        clean: state & STATE_CLEAN != 0,
        shipper: ControlPage::new(&rf).shipper(),
    })
}

/// One record as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpEntry {
    /// Sequence number.
    pub seq: u64,
    /// Kind.
    pub kind: Kind,
    /// Disk offset (MARK: its flags, bit 0 = [`crate::format::MARK_APP`]).
    pub offset: u64,
    /// Disk bytes (MARK: name length).
    pub len: u32,
    /// Capture time (ns since the epoch).
    pub time_ns: u64,
    /// Byte offset of the record in the ring file.
    pub file_offset: u64,
    /// crc32c of the payload, for comparing data by eye.
    pub payload_crc: u32,
    /// MARK name.
    pub mark: Option<String>,
}

/// Records from the tail (or from `from_seq`) on, at most `limit`. Stops at
/// the published head; a damaged record ends the dump with its reason.
pub fn dump(
    path: &Path,
    from_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<DumpEntry>, Option<String>)> {
    let rf = RingFile::open(path)?;
    let head = rf.get(live::HEAD);
    let mut pos = rf.get(live::TAIL);
    let mut expect = rf.get(live::TAIL_SEQ);
    let mut out = Vec::new();
    let mut payload = Vec::new();
    while pos < head && out.len() < limit {
        match rf.read_record(pos, expect, &mut payload, 0) {
            Scanned::Skip(n) => pos += n,
            Scanned::Record(h, size) => {
                let payload = &payload[..h.payload_len as usize];
                if from_seq.is_none_or(|f| h.seq >= f) {
                    out.push(DumpEntry {
                        seq: h.seq,
                        kind: h.kind,
                        offset: h.offset,
                        len: h.len,
                        time_ns: h.time_ns,
                        file_offset: rf.file_offset(pos),
                        payload_crc: crc32c::crc32c(payload),
                        mark: (h.kind == Kind::Mark)
                            .then(|| String::from_utf8_lossy(payload).into_owned()),
                    });
                }
                expect = h.seq + 1;
                pos += size;
            }
            Scanned::Invalid(why) => {
                return Ok((
                    out,
                    Some(format!(
                        "damaged record at file offset {}: {why}",
                        rf.file_offset(pos)
                    )),
                ));
            }
        }
    }
    Ok((out, None))
}

/// Ask the shipper draining the ring at `path` for an online verify
/// (`repair`: resend what differs). Returns the verify's id; wait for
/// [`verify_state`] to report it done.
pub fn request_verify(path: &Path, repair: bool) -> Result<u64> {
    let rf = RingFile::open(path)?;
    Ok(ControlPage::new(&rf).request_verify(repair).id)
}

/// The verify handshake: the newest request, the newest id done, the bytes
/// the running verify compared.
pub fn verify_state(path: &Path) -> Result<VerifyStatus> {
    let rf = RingFile::open(path)?;
    Ok(ControlPage::new(&rf).verify_status())
}
