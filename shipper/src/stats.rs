//! The shipper's counters: shared with the splitter's metrics, published in
//! the ring file for `splitter ring status`, rendered as Prometheus text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ring::{LinkState, ShipProgress, SyncPhase};

use crate::compress::{Choice, Reason};

/// Live counters of one shipper.
#[derive(Debug, Default)]
pub struct Stats {
    /// Newest sequence the target acknowledged durable.
    pub acked_seq: AtomicU64,
    /// Newest sequence sent.
    pub sent_seq: AtomicU64,
    /// Record bytes sent (before compression).
    pub plain_bytes: AtomicU64,
    /// Batch payload bytes sent (after compression), with frame headers.
    pub wire_bytes: AtomicU64,
    /// TLS bytes written to the socket.
    pub tls_bytes: AtomicU64,
    /// Batches sent.
    pub batches: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// The link state ([`LinkState::code`]; see [`Stats::set_state`]).
    state: AtomicU64,
    /// Record bytes per second, recent.
    pub rate: AtomicU64,
    /// Capture time (ns) of the oldest unacknowledged record, 0 if none.
    pub oldest_pending_ns: AtomicU64,
    /// Records read from the ring and not yet acknowledged, plus unread.
    pub records_waiting: AtomicU64,
    /// Ring bytes not yet released.
    pub bytes_waiting: AtomicU64,
    /// Disk bytes a running full pass covers (0: none runs).
    pub sync_full_total: AtomicU64,
    /// Disk bytes the full pass has sent.
    pub sync_full_done: AtomicU64,
    /// Dirty bytes queued for resending, cumulative.
    pub sync_dirty_total: AtomicU64,
    /// Dirty bytes resent, cumulative.
    pub sync_dirty_done: AtomicU64,
    /// Disk bytes sent as zero extents (holes, zeroes), cumulative.
    pub sync_zero_bytes: AtomicU64,
    /// Disk bytes read and hashed to compare with the replica, cumulative.
    pub sync_compared_bytes: AtomicU64,
    /// Disk bytes sent as data by resyncs, cumulative.
    pub sync_data_bytes: AtomicU64,
    /// What the resync is doing ([`SyncPhase::code`]; see [`Stats::set_sync_phase`]).
    sync_phase: AtomicU64,
    /// When the running pass started (ns since the epoch).
    pub sync_started_ns: AtomicU64,
    /// What batches are sent as now ([`crate::compress::Choice::code`]).
    codec: AtomicU64,
    /// Why ([`crate::compress::Reason::code`]).
    codec_reason: AtomicU64,
    /// The last error, for status.
    pub last_error: Mutex<String>,
}

impl Stats {
    /// What goes into the ring file.
    pub fn progress(&self) -> ShipProgress {
        let phase = self.sync_phase();
        let (done, total) = match phase {
            SyncPhase::FullCopy | SyncPhase::FullCompare => (
                self.sync_full_done.load(Ordering::Relaxed),
                self.sync_full_total.load(Ordering::Relaxed),
            ),
            SyncPhase::DirtyExtents => (
                self.sync_dirty_done.load(Ordering::Relaxed),
                self.sync_dirty_total.load(Ordering::Relaxed),
            ),
            SyncPhase::None => (0, 0),
        };
        ShipProgress {
            acked_seq: self.acked_seq.load(Ordering::Relaxed),
            state: self.state(),
            plain_bytes: self.plain_bytes.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            rate: self.rate.load(Ordering::Relaxed),
            sync_phase: phase,
            sync_done: done,
            sync_total: total,
            sync_started_ns: self.sync_started_ns.load(Ordering::Relaxed),
            sync_data_bytes: self.sync_data_bytes.load(Ordering::Relaxed),
            codec: self.codec.load(Ordering::Relaxed),
            codec_reason: self.codec_reason.load(Ordering::Relaxed),
        }
    }

    /// Record the compression in force.
    pub fn set_compression(&self, (c, r): (Choice, Reason)) {
        self.codec.store(c.code(), Ordering::Relaxed);
        self.codec_reason.store(r.code(), Ordering::Relaxed);
    }

    /// The compression in force, once a connection reported it.
    pub fn compression(&self) -> Option<(Choice, Option<Reason>)> {
        Choice::from_code(self.codec.load(Ordering::Relaxed)).map(|c| {
            (
                c,
                Reason::from_code(self.codec_reason.load(Ordering::Relaxed)),
            )
        })
    }

    /// Set the link state.
    pub fn set_state(&self, s: LinkState) {
        self.state.store(s.code(), Ordering::Relaxed);
    }

    /// The link state.
    pub fn state(&self) -> LinkState {
        LinkState::from_u64(self.state.load(Ordering::Relaxed))
    }

    /// Set what the resync is doing.
    pub fn set_sync_phase(&self, p: SyncPhase) {
        self.sync_phase.store(p.code(), Ordering::Relaxed);
    }

    /// What the resync is doing.
    pub fn sync_phase(&self) -> SyncPhase {
        SyncPhase::from_u64(self.sync_phase.load(Ordering::Relaxed))
    }

    /// Remember an error.
    pub fn set_error(&self, e: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = e.to_string();
    }

    /// The last error.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Prometheus samples for disk `disk`, appended to `t`.
    pub fn metrics(&self, disk: &str, now_ns: u64, t: &mut metrics::Text) {
        let l = [("disk", disk)];
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let oldest = self.oldest_pending_ns.load(Ordering::Relaxed);
        let lag = if oldest == 0 {
            0.0
        } else {
            now_ns.saturating_sub(oldest) as f64 / 1e9
        };
        t.sample(
            "blockship_shipper_rpo_lag_seconds",
            "gauge",
            "Age of the oldest change not yet acknowledged durable by the recovery site.",
            &l,
            lag,
        );
        t.sample(
            "blockship_shipper_acked_seq",
            "gauge",
            "Newest sequence acknowledged durable by the recovery site.",
            &l,
            g(&self.acked_seq),
        );
        t.sample(
            "blockship_shipper_sent_seq",
            "gauge",
            "Newest sequence sent.",
            &l,
            g(&self.sent_seq),
        );
        t.sample(
            "blockship_shipper_records_waiting",
            "gauge",
            "Records in the ring not yet acknowledged.",
            &l,
            g(&self.records_waiting),
        );
        t.sample(
            "blockship_shipper_bytes_waiting",
            "gauge",
            "Ring bytes not yet released.",
            &l,
            g(&self.bytes_waiting),
        );
        t.sample(
            "blockship_shipper_plain_bytes_total",
            "counter",
            "Record bytes shipped, before compression.",
            &l,
            g(&self.plain_bytes),
        );
        t.sample(
            "blockship_shipper_wire_bytes_total",
            "counter",
            "Frame bytes shipped, after compression.",
            &l,
            g(&self.wire_bytes),
        );
        t.sample(
            "blockship_shipper_tls_bytes_total",
            "counter",
            "Bytes written to the socket, TLS included.",
            &l,
            g(&self.tls_bytes),
        );
        t.sample(
            "blockship_shipper_batches_total",
            "counter",
            "Batches sent.",
            &l,
            g(&self.batches),
        );
        t.sample(
            "blockship_shipper_connects_total",
            "counter",
            "Connections made to the target.",
            &l,
            g(&self.connects),
        );
        t.sample(
            "blockship_shipper_connected",
            "gauge",
            "1 while connected to the target.",
            &l,
            f64::from(u8::from(self.state() == LinkState::Connected)),
        );
        if let Some((c, why)) = self.compression() {
            t.sample(
                "blockship_shipper_compression_level",
                "gauge",
                "zstd level batches are sent at now (0: stored).",
                &l,
                f64::from(c.level()),
            );
            for r in Reason::ALL {
                t.sample(
                    "blockship_shipper_compression_reason",
                    "gauge",
                    "1 for the reason the compression in force was chosen.",
                    &[("disk", disk), ("reason", r.name())],
                    f64::from(u8::from(why == Some(r))),
                );
            }
        }
        t.sample(
            "blockship_shipper_throughput_bytes_per_second",
            "gauge",
            "Record bytes shipped per second, recent.",
            &l,
            g(&self.rate),
        );
    }
}
