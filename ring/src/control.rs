//! The consumer page's control plane: the shipper's progress, the
//! online-verify handshake and the resync phase; typed, versioned, separate
//! from the record journal.
//!
//! The journal (records, cursors, state flags, bitmap, in-flight table) is
//! in [`crate::format`]. The fields here share page 1 of the header with
//! the consumer's cursors, but nothing in the journal depends on them:
//! they are what `ring status`, the metrics and `shipper verify` read, and
//! the shipper writes. Every field is a little-endian `u64` atomic on its
//! own 64-byte line; the enums below are stored as their `code()`.
//!
//! Versioned with the ring file: the layout is part of format version
//! [`crate::format::VERSION`] (1), and a change to it is a new version. A
//! reader never trusts a stored code: an unknown [`LinkState`] or
//! [`SyncPhase`] reads as `None`, a state that claims nothing.

use std::sync::atomic::{AtomicU64, Ordering};

// Format: the consumer page's control fields (page 1 of the header, after
// the consumer's cursors at 4096..4288). Little-endian u64 atomics, each on
// its own 64-byte line. The shipper's progress (informational; 0 when no
// shipper ever ran):
//   4288  ship_acked_seq    newest sequence the recovery site acknowledged durable
//   4352  ship_state        LinkState: 0 none, 1 connecting, 2 connected, 3 retrying after an error
//   4416  ship_plain_bytes  record bytes shipped (before compression), cumulative
//   4480  ship_wire_bytes   frame bytes sent (after compression), cumulative
//   4544  ship_updated_ns   when the shipper last updated these, ns since the epoch (0: never)
//   4608  ship_rate         record bytes per second shipped, recent
//   4672  ship_pid          process id of the shipper
// the online-verify handshake between `shipper verify` and the shipper:
//   4736  verify_request    VerifyRequest: id << 1 | repair, the newest verify asked for (ids count up from 1)
//   4800  verify_done       id of the newest verify finished (its report is RING.verify.json)
//   4864  verify_progress   disk bytes the running verify has compared
// and the shipper's resync (informational):
//   4928  sync_phase        SyncPhase: 0 none, 1 full pass copying, 2 full pass comparing by hashes, 3 dirty extents
//   4992  sync_done         disk bytes the running pass covered
//   5056  sync_total        disk bytes the running pass covers
//   5120  sync_started_ns   when the running pass started, ns since the epoch
//   5184  sync_data_bytes   disk bytes resyncs sent as data, cumulative
// and the shipper's compression (informational; 0: not reported, what a
// shipper from before these fields leaves):
//   5248  ship_codec        what batches are sent as now: 1 stored, 2 + N zstd level N
//   5312  ship_codec_reason why (the shipper's `compress::Reason` codes: 1 fixed,
//                           2 starting, 3 cpu-bound, 4 cpu-idle, 5 link-bound,
//                           6 link-bound-cpu-spare, 7 incompressible,
//                           8 link-faster-than-zstd)
/// File offsets of the control fields.
pub(crate) mod off {
    pub const SHIP_ACKED_SEQ: usize = 4288;
    pub const SHIP_STATE: usize = 4352;
    pub const SHIP_PLAIN_BYTES: usize = 4416;
    pub const SHIP_WIRE_BYTES: usize = 4480;
    pub const SHIP_UPDATED_NS: usize = 4544;
    pub const SHIP_RATE: usize = 4608;
    pub const SHIP_PID: usize = 4672;
    pub const VERIFY_REQUEST: usize = 4736;
    pub const VERIFY_DONE: usize = 4800;
    pub const VERIFY_PROGRESS: usize = 4864;
    pub const SYNC_PHASE: usize = 4928;
    pub const SYNC_DONE: usize = 4992;
    pub const SYNC_TOTAL: usize = 5056;
    pub const SYNC_STARTED_NS: usize = 5120;
    pub const SYNC_DATA_BYTES: usize = 5184;
    pub const SHIP_CODEC: usize = 5248;
    pub const SHIP_CODEC_REASON: usize = 5312;
}

/// Where a shipper's connection stands (`ship_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinkState {
    /// No shipper has run (0).
    #[default]
    None,
    /// Connecting, first attempt (1).
    Connecting,
    /// Connected and shipping (2).
    Connected,
    /// The last attempt failed; retrying after a pause (3).
    Retrying,
}

impl LinkState {
    /// The stored value.
    pub const fn code(self) -> u64 {
        match self {
            LinkState::None => 0,
            LinkState::Connecting => 1,
            LinkState::Connected => 2,
            LinkState::Retrying => 3,
        }
    }

    /// From the stored value; an unknown value is [`LinkState::None`].
    pub const fn from_u64(v: u64) -> LinkState {
        match v {
            1 => LinkState::Connecting,
            2 => LinkState::Connected,
            3 => LinkState::Retrying,
            _ => LinkState::None,
        }
    }

    /// Name for status output (`ring status`: `shipper.state`).
    pub const fn name(self) -> &'static str {
        match self {
            LinkState::None => "none",
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Retrying => "retrying",
        }
    }
}

/// What the shipper's resync is doing (`sync_phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SyncPhase {
    /// No resync pass runs (0).
    #[default]
    None,
    /// A full pass copying the disk (1).
    FullCopy,
    /// A full pass comparing by hashes: the replica holds data (2).
    FullCompare,
    /// Resending the dirty bitmap's extents (3).
    DirtyExtents,
}

impl SyncPhase {
    /// The stored value.
    pub const fn code(self) -> u64 {
        match self {
            SyncPhase::None => 0,
            SyncPhase::FullCopy => 1,
            SyncPhase::FullCompare => 2,
            SyncPhase::DirtyExtents => 3,
        }
    }

    /// From the stored value; an unknown value is [`SyncPhase::None`] (no
    /// pass that anyone could show or wait for).
    pub const fn from_u64(v: u64) -> SyncPhase {
        match v {
            1 => SyncPhase::FullCopy,
            2 => SyncPhase::FullCompare,
            3 => SyncPhase::DirtyExtents,
            _ => SyncPhase::None,
        }
    }

    /// Name for status output (`ring status`: `shipper.resync.phase`).
    pub const fn name(self) -> &'static str {
        match self {
            SyncPhase::None => "none",
            SyncPhase::FullCopy => "full pass (copying the disk)",
            SyncPhase::FullCompare => "full pass (comparing by hashes)",
            SyncPhase::DirtyExtents => "resending dirty extents",
        }
    }

    /// A full pass over the disk (copying or comparing).
    pub const fn is_full_pass(self) -> bool {
        matches!(self, SyncPhase::FullCopy | SyncPhase::FullCompare)
    }

    /// A pass runs.
    pub const fn is_running(self) -> bool {
        !matches!(self, SyncPhase::None)
    }
}

/// An online verify asked for (`verify_request`). Id 0: none ever was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VerifyRequest {
    /// The verify's id; ids count up from 1.
    pub id: u64,
    /// Resend what differs.
    pub repair: bool,
}

impl VerifyRequest {
    /// The stored value: `id << 1 | repair`.
    pub const fn encode(self) -> u64 {
        self.id << 1 | self.repair as u64
    }

    /// From the stored value (every value decodes).
    pub const fn decode(v: u64) -> VerifyRequest {
        VerifyRequest {
            id: v >> 1,
            repair: v & 1 != 0,
        }
    }

    /// The request after this one.
    pub const fn next(self, repair: bool) -> VerifyRequest {
        VerifyRequest {
            id: self.id + 1,
            repair,
        }
    }
}

/// Where the online-verify handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyStatus {
    /// The newest verify asked for.
    pub requested: VerifyRequest,
    /// Id of the newest verify finished (its report is written).
    pub done: u64,
    /// Disk bytes the running verify has compared.
    pub compared_bytes: u64,
}

/// The shipper's progress as published in the ring file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShipProgress {
    /// Newest sequence acknowledged durable by the recovery site.
    pub acked_seq: u64,
    /// Connection state.
    pub state: LinkState,
    /// Record bytes shipped (before compression), cumulative.
    pub plain_bytes: u64,
    /// Frame bytes sent (after compression), cumulative.
    pub wire_bytes: u64,
    /// Record bytes per second, recent.
    pub rate: u64,
    /// What the resync is doing.
    pub sync_phase: SyncPhase,
    /// Disk bytes the running pass covered.
    pub sync_done: u64,
    /// Disk bytes the running pass covers.
    pub sync_total: u64,
    /// When the running pass started (ns since the epoch).
    pub sync_started_ns: u64,
    /// Disk bytes resyncs sent as data, cumulative.
    pub sync_data_bytes: u64,
    /// What batches are sent as now (`ship_codec`; 0: not reported).
    pub codec: u64,
    /// Why (`ship_codec_reason`; 0: not reported).
    pub codec_reason: u64,
}

/// A shipper's progress, read from the ring file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipperStatus {
    /// The progress numbers.
    pub progress: ShipProgress,
    /// When they were published (ns since the epoch).
    pub updated_ns: u64,
    /// The shipper's process id.
    pub pid: u64,
}

/// Where the control fields live: the `u64` atomic at a file offset of the
/// header (a ring file's mapping; a plain array in tests).
pub(crate) trait Words {
    /// The atomic at byte offset `off` (8-byte aligned, inside the header).
    fn word(&self, off: usize) -> &AtomicU64;
}

impl Words for crate::file::RingFile {
    fn word(&self, off: usize) -> &AtomicU64 {
        self.shm.atomic(off)
    }
}

/// The control fields of one ring file, read and written as typed values.
/// Loads are Acquire, stores Release (as every live header field).
pub(crate) struct ControlPage<'a, W: Words + ?Sized> {
    w: &'a W,
}

impl<'a, W: Words + ?Sized> ControlPage<'a, W> {
    /// The control page of `w`.
    pub(crate) fn new(w: &'a W) -> ControlPage<'a, W> {
        ControlPage { w }
    }

    fn get(&self, off: usize) -> u64 {
        self.w.word(off).load(Ordering::Acquire)
    }

    fn set(&self, off: usize, v: u64) {
        self.w.word(off).store(v, Ordering::Release);
    }

    /// Publish a shipper's progress, as process `pid` at `now_ns`. The
    /// update time goes last: a reader that sees it sees the rest.
    pub(crate) fn publish(&self, p: &ShipProgress, pid: u64, now_ns: u64) {
        self.set(off::SHIP_ACKED_SEQ, p.acked_seq);
        self.set(off::SHIP_STATE, p.state.code());
        self.set(off::SHIP_PLAIN_BYTES, p.plain_bytes);
        self.set(off::SHIP_WIRE_BYTES, p.wire_bytes);
        self.set(off::SHIP_RATE, p.rate);
        self.set(off::SYNC_PHASE, p.sync_phase.code());
        self.set(off::SYNC_DONE, p.sync_done);
        self.set(off::SYNC_TOTAL, p.sync_total);
        self.set(off::SYNC_STARTED_NS, p.sync_started_ns);
        self.set(off::SYNC_DATA_BYTES, p.sync_data_bytes);
        self.set(off::SHIP_CODEC, p.codec);
        self.set(off::SHIP_CODEC_REASON, p.codec_reason);
        self.set(off::SHIP_PID, pid);
        self.set(off::SHIP_UPDATED_NS, now_ns);
    }

    /// The last published progress.
    pub(crate) fn progress(&self) -> ShipProgress {
        ShipProgress {
            acked_seq: self.get(off::SHIP_ACKED_SEQ),
            state: LinkState::from_u64(self.get(off::SHIP_STATE)),
            plain_bytes: self.get(off::SHIP_PLAIN_BYTES),
            wire_bytes: self.get(off::SHIP_WIRE_BYTES),
            rate: self.get(off::SHIP_RATE),
            sync_phase: SyncPhase::from_u64(self.get(off::SYNC_PHASE)),
            sync_done: self.get(off::SYNC_DONE),
            sync_total: self.get(off::SYNC_TOTAL),
            sync_started_ns: self.get(off::SYNC_STARTED_NS),
            sync_data_bytes: self.get(off::SYNC_DATA_BYTES),
            codec: self.get(off::SHIP_CODEC),
            codec_reason: self.get(off::SHIP_CODEC_REASON),
        }
    }

    /// The shipper's published progress; None when no shipper ever ran.
    pub(crate) fn shipper(&self) -> Option<ShipperStatus> {
        let updated_ns = self.get(off::SHIP_UPDATED_NS);
        (updated_ns != 0).then(|| ShipperStatus {
            progress: self.progress(),
            updated_ns,
            pid: self.get(off::SHIP_PID),
        })
    }

    /// The newest online verify asked for.
    pub(crate) fn verify_request(&self) -> VerifyRequest {
        VerifyRequest::decode(self.get(off::VERIFY_REQUEST))
    }

    /// Ask for the next online verify (atomically: two callers get two
    /// ids). Returns the request made.
    pub(crate) fn request_verify(&self, repair: bool) -> VerifyRequest {
        let a = self.w.word(off::VERIFY_REQUEST);
        let mut cur = a.load(Ordering::Acquire);
        loop {
            let req = VerifyRequest::decode(cur).next(repair);
            match a.compare_exchange(cur, req.encode(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return req,
                Err(v) => cur = v,
            }
        }
    }

    /// Verify `id` finished (its report is written).
    pub(crate) fn set_verify_done(&self, id: u64) {
        self.set(off::VERIFY_DONE, id);
    }

    /// Bytes the running verify has compared.
    pub(crate) fn set_verify_progress(&self, bytes: u64) {
        self.set(off::VERIFY_PROGRESS, bytes);
    }

    /// The handshake's state.
    pub(crate) fn verify_status(&self) -> VerifyStatus {
        VerifyStatus {
            requested: self.verify_request(),
            done: self.get(off::VERIFY_DONE),
            compared_bytes: self.get(off::VERIFY_PROGRESS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CONSUMER_PAGE, HEADER_LEN};

    /// A header's worth of words, standing in for a ring file's mapping.
    struct Header(Vec<AtomicU64>);

    impl Header {
        fn new() -> Header {
            Header((0..HEADER_LEN / 8).map(|_| AtomicU64::new(0)).collect())
        }

        /// The header's bytes, little endian, as the file holds them.
        fn bytes(&self) -> Vec<u8> {
            self.0
                .iter()
                .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
                .collect()
        }

        fn u64_at(&self, off: usize) -> u64 {
            let b = self.bytes();
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[off..off + 8]);
            u64::from_le_bytes(a)
        }
    }

    impl Words for Header {
        fn word(&self, off: usize) -> &AtomicU64 {
            assert_eq!(off % 8, 0);
            &self.0[off / 8]
        }
    }

    #[test]
    fn link_state_codes() {
        let all = [
            (LinkState::None, 0, "none"),
            (LinkState::Connecting, 1, "connecting"),
            (LinkState::Connected, 2, "connected"),
            (LinkState::Retrying, 3, "retrying"),
        ];
        for (s, code, name) in all {
            assert_eq!(s.code(), code);
            assert_eq!(LinkState::from_u64(code), s);
            assert_eq!(s.name(), name);
        }
        for v in [4, 5, 255, 1 << 32, u64::MAX] {
            assert_eq!(LinkState::from_u64(v), LinkState::None);
        }
        assert_eq!(LinkState::default(), LinkState::None);
    }

    #[test]
    fn sync_phase_codes() {
        let all = [
            (SyncPhase::None, 0, "none"),
            (SyncPhase::FullCopy, 1, "full pass (copying the disk)"),
            (SyncPhase::FullCompare, 2, "full pass (comparing by hashes)"),
            (SyncPhase::DirtyExtents, 3, "resending dirty extents"),
        ];
        for (p, code, name) in all {
            assert_eq!(p.code(), code);
            assert_eq!(SyncPhase::from_u64(code), p);
            assert_eq!(p.name(), name);
            assert_eq!(p.is_running(), code != 0);
            assert_eq!(p.is_full_pass(), code == 1 || code == 2);
        }
        for v in [4, 7, 1 << 40, u64::MAX] {
            assert_eq!(SyncPhase::from_u64(v), SyncPhase::None);
        }
        assert_eq!(SyncPhase::default(), SyncPhase::None);
    }

    #[test]
    fn verify_request_codes() {
        let golden = [
            (0, VerifyRequest::default()),
            (
                2,
                VerifyRequest {
                    id: 1,
                    repair: false,
                },
            ),
            (
                3,
                VerifyRequest {
                    id: 1,
                    repair: true,
                },
            ),
            (
                84,
                VerifyRequest {
                    id: 42,
                    repair: false,
                },
            ),
            (
                u64::MAX,
                VerifyRequest {
                    id: u64::MAX >> 1,
                    repair: true,
                },
            ),
        ];
        for (v, r) in golden {
            assert_eq!(VerifyRequest::decode(v), r);
            assert_eq!(r.encode(), v);
        }
        assert_eq!(
            VerifyRequest {
                id: 6,
                repair: true
            }
            .next(false),
            VerifyRequest {
                id: 7,
                repair: false
            }
        );
    }

    /// Golden layout: every field at its documented offset, on page 1,
    /// after the consumer's cursors, one per 64-byte line.
    #[test]
    fn golden_page_layout() {
        let h = Header::new();
        let page = ControlPage::new(&h);
        assert!(page.shipper().is_none(), "never published");
        let p = ShipProgress {
            acked_seq: 0x11,
            state: LinkState::Retrying,
            plain_bytes: 0x33,
            wire_bytes: 0x44,
            rate: 0x55,
            sync_phase: SyncPhase::FullCompare,
            sync_done: 0x77,
            sync_total: 0x88,
            sync_started_ns: 0x99,
            sync_data_bytes: 0xaa,
            codec: 3,
            codec_reason: 5,
        };
        page.publish(&p, 4242, 1_000_000_000);
        page.set_verify_done(5);
        page.set_verify_progress(0xbb);
        assert_eq!(
            page.request_verify(true),
            VerifyRequest {
                id: 1,
                repair: true
            }
        );
        let want: [(usize, u64); 17] = [
            (4288, 0x11),
            (4352, 3),
            (4416, 0x33),
            (4480, 0x44),
            (4544, 1_000_000_000),
            (4608, 0x55),
            (4672, 4242),
            (4736, 3),
            (4800, 5),
            (4864, 0xbb),
            (4928, 2),
            (4992, 0x77),
            (5056, 0x88),
            (5120, 0x99),
            (5184, 0xaa),
            (5248, 3),
            (5312, 5),
        ];
        let bytes = h.bytes();
        for (i, &(off, v)) in want.iter().enumerate() {
            assert_eq!(h.u64_at(off), v, "field at {off}");
            assert_eq!(off % 64, 0);
            let page_start = usize::try_from(CONSUMER_PAGE).unwrap();
            assert!(off >= page_start + 192 && off + 8 <= page_start + 4096);
            if i > 0 {
                assert_eq!(off - want[i - 1].0, 64);
            }
        }
        assert_eq!(&bytes[4352..4360], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[4544..4552], &[0, 0xca, 0x9a, 0x3b, 0, 0, 0, 0]);
        // Nothing else of the header was touched.
        for off in (0..bytes.len()).step_by(8) {
            if !want.iter().any(|&(o, _)| o == off) {
                assert_eq!(h.u64_at(off), 0, "field at {off}");
            }
        }
        // And it reads back.
        assert_eq!(
            page.shipper(),
            Some(ShipperStatus {
                progress: p,
                updated_ns: 1_000_000_000,
                pid: 4242
            })
        );
        assert_eq!(
            page.verify_status(),
            VerifyStatus {
                requested: VerifyRequest {
                    id: 1,
                    repair: true
                },
                done: 5,
                compared_bytes: 0xbb
            }
        );
        assert_eq!(
            page.request_verify(false),
            VerifyRequest {
                id: 2,
                repair: false
            }
        );
        assert_eq!(h.u64_at(4736), 4);
    }

    #[test]
    fn unknown_codes_read_as_none() {
        let h = Header::new();
        h.word(off::SHIP_STATE).store(9, Ordering::Relaxed);
        h.word(off::SYNC_PHASE).store(u64::MAX, Ordering::Relaxed);
        let p = ControlPage::new(&h).progress();
        assert_eq!(p.state, LinkState::None);
        assert_eq!(p.sync_phase, SyncPhase::None);
    }
}
