//! `splitter ring status`: the ring and its shipper's progress, as text
//! and as JSON (keys are a contract: scripts and tests read them), and the
//! ring's Prometheus text for `splitter serve --metrics`.

use std::fmt::Write as _;
use std::path::Path;

/// Rate (bytes/s) and ETA (s) of the running resync pass.
fn resync_rate(p: &ring::ShipProgress, now: u64) -> (f64, Option<f64>) {
    let secs = now.saturating_sub(p.sync_started_ns) as f64 / 1e9;
    let rate = if secs > 0.0 {
        p.sync_done as f64 / secs
    } else {
        0.0
    };
    let left = p.sync_total.saturating_sub(p.sync_done) as f64;
    (rate, (rate > 0.0).then(|| left / rate))
}

fn resync_json(p: &ring::ShipProgress, now: u64) -> serde_json::Value {
    let (rate, eta) = resync_rate(p, now);
    serde_json::json!({
        "phase": p.sync_phase.name(),
        "done_bytes": p.sync_done,
        "total_bytes": p.sync_total,
        "rate_bytes_per_second": rate,
        "eta_seconds": eta,
        "data_bytes_sent": p.sync_data_bytes,
    })
}

fn resync_line(p: &ring::ShipProgress, now: u64) -> Option<String> {
    if !p.sync_phase.is_running() {
        return None;
    }
    let (rate, eta) = resync_rate(p, now);
    let phase = p.sync_phase.name();
    Some(format!(
        "{phase}: {:.1}% ({} of {} bytes), {:.1} MB/s, ETA {}; the replica is not crash-consistent until it ends",
        p.sync_done as f64 * 100.0 / p.sync_total.max(1) as f64,
        p.sync_done,
        p.sync_total,
        rate / 1e6,
        eta.map_or("?".into(), |e| format!("{e:.0} s"))
    ))
}

/// Prometheus text: the ring's state and, when shipping in-process, the shipper's.
pub fn metrics_text(
    ring_path: Option<&std::path::Path>,
    disk_id: &str,
    stats: Option<&shipper::Stats>,
) -> String {
    let mut t = metrics::Text::new();
    let now = ring::wall_clock_ns();
    if let Some(st) = ring_path.and_then(|p| ring::status(p).ok()) {
        let l = [("disk", st.disk_id.as_str())];
        t.sample(
            "blockship_ring_capacity_bytes",
            "gauge",
            "Bytes in the ring's record area.",
            &l,
            st.capacity as f64,
        );
        t.sample(
            "blockship_ring_used_bytes",
            "gauge",
            "Ring bytes holding unreleased records.",
            &l,
            st.used_bytes as f64,
        );
        t.sample(
            "blockship_ring_head_seq",
            "gauge",
            "Sequence of the newest record.",
            &l,
            st.head_seq as f64,
        );
        t.sample(
            "blockship_ring_records_waiting",
            "gauge",
            "Records not yet released by the shipper.",
            &l,
            st.records_waiting as f64,
        );
        t.sample(
            "blockship_ring_oldest_waiting_seconds",
            "gauge",
            "Age of the oldest unreleased record.",
            &l,
            st.oldest_waiting_ns
                .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e9),
        );
        t.sample(
            "blockship_ring_overflow",
            "gauge",
            "1 when changes overflowed into the dirty bitmap.",
            &l,
            f64::from(u8::from(st.overflow)),
        );
        t.sample(
            "blockship_ring_dirty_bytes",
            "gauge",
            "Disk bytes marked in the dirty bitmap.",
            &l,
            st.dirty_bytes as f64,
        );
    }
    if let Some(s) = stats {
        s.metrics(disk_id, now, &mut t);
    }
    t.finish()
}

fn lag(st: &ring::Status, now: u64) -> Option<f64> {
    st.oldest_waiting_ns
        .map(|t| now.saturating_sub(t) as f64 / 1e9)
}

/// What this side is, from the disk's marker: `protected-source`, or
/// `reverse-protected-source` (a failed-over copy protected back toward the
/// original site), with the failover it began as.
pub fn role(st: &ring::Status) -> (&'static str, Option<String>) {
    let m = blockdev::marker::read(Path::new(&st.disk_path))
        .ok()
        .flatten();
    match m.and_then(|m| m.failover) {
        Some(o) => (
            "reverse-protected-source",
            Some(format!(
                "failed over from ring {} at seq {}",
                ring::uuid_string(&o.from_ring),
                o.seq
            )),
        ),
        None => ("protected-source", None),
    }
}

/// `ring status --json`.
pub fn status_json(path: &Path, st: &ring::Status, now: u64) -> serde_json::Value {
    let lag = lag(st, now);
    let (role, origin) = role(st);
    serde_json::json!({
        "role": role,
        "failed_over_from": origin,
        "ring": path.display().to_string(),
        "disk_id": st.disk_id,
        "disk_path": st.disk_path,
        "disk_size": st.disk_size,
        "capacity": st.capacity,
        "used_bytes": st.used_bytes,
        "head_seq": st.head_seq,
        "tail_seq": st.tail_seq,
        "records_waiting": st.records_waiting,
        "oldest_waiting_age_seconds": lag,
        "overflow": st.overflow,
        "overflow_since_ns": st.overflow_since_ns,
        "dirty_bytes": st.dirty_bytes,
        "bitmap_granularity": st.granularity,
        "crash_dirty": st.crash_dirty,
        "needs_initial_sync": st.needs_initial_sync,
        "needs_verify": st.needs_verify,
        "records_lost": st.records_lost,
        "clean": st.clean,
        "producer_pid": st.producer_pid,
        "rpo_lag_seconds": lag.unwrap_or(0.0),
        "shipper": st.shipper.as_ref().map(|sh| serde_json::json!({
            "state": sh.progress.state.name(),
            "acked_seq": sh.progress.acked_seq,
            "bytes_before_compression": sh.progress.plain_bytes,
            "bytes_on_wire": sh.progress.wire_bytes,
            "compression_ratio": if sh.progress.wire_bytes > 0 { sh.progress.plain_bytes as f64 / sh.progress.wire_bytes as f64 } else { 1.0 },
            "throughput_bytes_per_second": sh.progress.rate,
            "compression": compression_json(&sh.progress),
            "updated_seconds_ago": now.saturating_sub(sh.updated_ns) as f64 / 1e9,
            "pid": sh.pid,
            "resync": resync_json(&sh.progress, now),
        })),
    })
}

/// What the shipper sends batches as and why, from the published codes.
fn compression(p: &ring::ShipProgress) -> Option<(String, &'static str)> {
    use shipper::compress::{Choice, Reason};
    let c = Choice::from_code(p.codec)?;
    Some((
        c.name(),
        Reason::from_code(p.codec_reason).map_or("unknown", Reason::name),
    ))
}

fn compression_json(p: &ring::ShipProgress) -> serde_json::Value {
    match compression(p) {
        Some((codec, reason)) => serde_json::json!({ "codec": codec, "reason": reason }),
        None => serde_json::Value::Null,
    }
}

/// `ring status` as text.
pub fn status_text(path: &Path, st: &ring::Status, now: u64) -> String {
    let lag = lag(st, now);
    let mut out = String::new();
    let (role, origin) = role(st);
    let _ = writeln!(
        out,
        "role:             {role}{}",
        origin.map(|o| format!(" ({o})")).unwrap_or_default()
    );
    let _ = writeln!(out, "ring:             {}", path.display());
    let _ = writeln!(
        out,
        "disk:             {} ({}, {} bytes)",
        st.disk_id, st.disk_path, st.disk_size
    );
    let _ = writeln!(
        out,
        "capacity:         {} bytes, {} used ({:.1}%)",
        st.capacity,
        st.used_bytes,
        st.used_bytes as f64 * 100.0 / st.capacity as f64
    );
    let _ = writeln!(
        out,
        "sequences:        tail {} .. head {}",
        st.tail_seq, st.head_seq
    );
    let _ = writeln!(out, "records waiting:  {}", st.records_waiting);
    let _ = writeln!(
        out,
        "RPO lag:          {:.3} s (age of the oldest record not yet acknowledged)",
        lag.unwrap_or(0.0)
    );
    if let Some(sh) = &st.shipper {
        let p = &sh.progress;
        let _ = writeln!(
            out,
            "shipper:          {} (pid {}, updated {:.1} s ago), acknowledged up to seq {}",
            p.state.name(),
            sh.pid,
            now.saturating_sub(sh.updated_ns) as f64 / 1e9,
            p.acked_seq
        );
        let _ =
            writeln!(out,
            "shipped:          {} bytes of records as {} bytes on the wire ({:.2}x), {:.1} MB/s",
            p.plain_bytes,
            p.wire_bytes,
            if p.wire_bytes > 0 { p.plain_bytes as f64 / p.wire_bytes as f64 } else { 1.0 },
            p.rate as f64 / 1e6
        );
        if let Some((codec, reason)) = compression(p) {
            let _ = writeln!(out, "compression:      {codec} ({reason})");
        }
        if let Some(line) = resync_line(p, now) {
            let _ = writeln!(out, "resync:           {line}");
        }
    } else {
        let _ = writeln!(out, "shipper:          none has run on this ring");
    }
    let _ = writeln!(
        out,
        "overflow:         {}{}",
        if st.overflow { "yes" } else { "no" },
        st.overflow_since_ns
            .map(|t| format!(" (since {:.0} s ago)", now.saturating_sub(t) as f64 / 1e9))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "dirty:            {} bytes ({} bytes per bit)",
        st.dirty_bytes, st.granularity
    );
    let mut notes = Vec::new();
    if st.needs_initial_sync {
        notes.push("the disk held data before the ring: a replica needs an initial copy");
    }
    if st.crash_dirty {
        notes.push("a crash or failed write left extents in the dirty bitmap");
    }
    if st.needs_verify {
        notes.push("changes may be missing (torn tail or reboot): verify the replica");
    }
    for n in notes {
        let _ = writeln!(out, "note:             {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: ring::SyncPhase) -> ring::Status {
        ring::Status {
            disk_id: "id".into(),
            disk_path: "/d".into(),
            disk_size: 1 << 20,
            capacity: 1 << 16,
            used_bytes: 0,
            head_seq: 0,
            tail_seq: 1,
            records_waiting: 0,
            oldest_waiting_ns: None,
            overflow: false,
            overflow_since_ns: None,
            dirty_bytes: 0,
            granularity: 65536,
            needs_initial_sync: false,
            needs_verify: false,
            records_lost: 0,
            producer_pid: 1,
            crash_dirty: false,
            clean: true,
            shipper: Some(ring::ShipperStatus {
                progress: ring::ShipProgress {
                    state: ring::LinkState::Connected,
                    sync_phase: phase,
                    sync_done: 1,
                    sync_total: 2,
                    ..ring::ShipProgress::default()
                },
                updated_ns: 1,
                pid: 2,
            }),
        }
    }

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        k.sort_unstable();
        k
    }

    /// The JSON keys and the phase names are a contract.
    #[test]
    fn json_keys_and_phase_names() {
        let names = [
            (ring::SyncPhase::None, "none"),
            (ring::SyncPhase::FullCopy, "full pass (copying the disk)"),
            (
                ring::SyncPhase::FullCompare,
                "full pass (comparing by hashes)",
            ),
            (ring::SyncPhase::DirtyExtents, "resending dirty extents"),
        ];
        for (phase, name) in names {
            let j = status_json(Path::new("/r"), &status(phase), 10);
            assert_eq!(
                keys(&j),
                [
                    "bitmap_granularity",
                    "capacity",
                    "clean",
                    "crash_dirty",
                    "dirty_bytes",
                    "disk_id",
                    "disk_path",
                    "disk_size",
                    "failed_over_from",
                    "head_seq",
                    "needs_initial_sync",
                    "needs_verify",
                    "oldest_waiting_age_seconds",
                    "overflow",
                    "overflow_since_ns",
                    "producer_pid",
                    "records_lost",
                    "records_waiting",
                    "ring",
                    "role",
                    "rpo_lag_seconds",
                    "shipper",
                    "tail_seq",
                    "used_bytes",
                ]
            );
            let sh = &j["shipper"];
            assert_eq!(
                keys(sh),
                [
                    "acked_seq",
                    "bytes_before_compression",
                    "bytes_on_wire",
                    "compression",
                    "compression_ratio",
                    "pid",
                    "resync",
                    "state",
                    "throughput_bytes_per_second",
                    "updated_seconds_ago",
                ]
            );
            assert_eq!(sh["state"], "connected");
            assert_eq!(
                keys(&sh["resync"]),
                [
                    "data_bytes_sent",
                    "done_bytes",
                    "eta_seconds",
                    "phase",
                    "rate_bytes_per_second",
                    "total_bytes",
                ]
            );
            assert_eq!(sh["resync"]["phase"], name);
            let text = status_text(Path::new("/r"), &status(phase), 10);
            assert_eq!(
                text.contains(&format!("resync:           {name}: ")),
                phase != ring::SyncPhase::None,
                "{text}"
            );
        }
    }
}
