//! `nbd-target status` and the daemon's metrics: per disk, the applied
//! sequence, consistency, what waits at the source, RPO lag, bytes before
//! and after compression, throughput and connection state. The state file
//! says what is durable; the live file (rewritten every second by a running
//! daemon) says what is happening now.

use std::path::Path;

use serde_json::{json, Value};

use crate::registry::{known_disks, Live, Registry, LIVE_FILE, STATE_FILE};
use crate::state::{self, now_ns};

/// A live file older than this means no daemon is updating it.
const LIVE_STALE_NS: u64 = 5_000_000_000;

/// The live numbers as JSON (the live file's content).
pub fn live_json(l: &Live) -> Value {
    json!({
        "written_ns": now_ns(),
        "connected": l.connected,
        "peer": l.peer,
        "peer_name": l.peer_name,
        "applied_seq": l.applied_seq,
        "source_head_seq": l.source_head_seq,
        "oldest_pending_ns": l.oldest_pending_ns,
        "records_waiting": l.records_waiting,
        "bytes_waiting": l.bytes_waiting,
        "wire_bytes": l.wire_bytes,
        "plain_bytes": l.plain_bytes,
        "batches": l.batches,
        "rate_bytes_per_second": l.rate,
        "last_error": l.last_error,
    })
}

fn lag_seconds(oldest_pending_ns: u64, now: u64) -> f64 {
    if oldest_pending_ns == 0 {
        0.0
    } else {
        now.saturating_sub(oldest_pending_ns) as f64 / 1e9
    }
}

/// Status of every replica under `data_dir`, as JSON.
pub fn collect(data_dir: &Path) -> crate::error::Result<Value> {
    let now = now_ns();
    let mut disks = Vec::new();
    for id in known_disks(data_dir) {
        let dir = data_dir.join(&id);
        let st = state::read(&dir.join(STATE_FILE))?;
        let live: Option<Value> = std::fs::read(dir.join(LIVE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let fresh = live
            .as_ref()
            .and_then(|l| l["written_ns"].as_u64())
            .is_some_and(|t| now.saturating_sub(t) < LIVE_STALE_NS);
        let g = |k: &str| live.as_ref().and_then(|l| l[k].as_u64()).unwrap_or(0);
        let connected = fresh && live.as_ref().is_some_and(|l| l["connected"] == true);
        let (wire, plain) = (g("wire_bytes"), g("plain_bytes"));
        disks.push(json!({
            "disk_id": id,
            "replica": dir.join(crate::registry::REPLICA_FILE).display().to_string(),
            "applied_seq": st.map_or(0, |s| s.applied_seq),
            "disk_size": st.map_or(0, |s| s.disk_size),
            "consistent": st.is_some_and(|s| s.consistent()),
            "inconsistent_reason": st.map_or("none", |s| s.reason.name()),
            "inconsistent_explanation": st.filter(|s| !s.consistent()).map(|s| s.reason.explain()),
            "updated_ns": st.map_or(0, |s| s.updated_ns),
            "full_pass_needed": st.is_some_and(|s| s.reason.needs_full_pass()),
            "full_pass_cursor": st.map_or(0, |s| s.sync_cursor),
            "connection": if connected { "connected" } else if fresh { "waiting for the shipper" } else { "target not running" },
            "peer": live.as_ref().map(|l| l["peer"].clone()),
            "peer_name": live.as_ref().map(|l| l["peer_name"].clone()),
            "source_head_seq": g("source_head_seq"),
            "records_waiting": if connected { g("records_waiting") } else { 0 },
            "bytes_waiting": if connected { g("bytes_waiting") } else { 0 },
            "rpo_lag_seconds": if connected { Some(lag_seconds(g("oldest_pending_ns"), now)) } else { None },
            "bytes_before_compression": plain,
            "bytes_on_wire": wire,
            "compression_ratio": if wire > 0 { plain as f64 / wire as f64 } else { 1.0 },
            "throughput_bytes_per_second": if connected { live.as_ref().and_then(|l| l["rate_bytes_per_second"].as_f64()).unwrap_or(0.0) } else { 0.0 },
            "last_error": live.as_ref().map(|l| l["last_error"].clone()),
            "journal": crate::points::status_json(data_dir, &dir),
            "role": role(&dir),
            "failover": crate::failover::record::load(&dir).ok().flatten().map(|r| r.to_json()),
            "failover_text": crate::failover::record::load(&dir).ok().flatten().map(|r| r.describe()),
            "last_failover": crate::failover::record::last_failover(&dir),
        }));
    }
    Ok(json!({ "data_dir": data_dir.display().to_string(), "disks": disks }))
}

/// What the disk is at this site: `replica` (of a protected source),
/// `failing-over`, `failed-over-uncommitted`, `failed-over-committing`,
/// `failed-over-committed` (the image is the disk now), or
/// `replica-in-place` (seeded from the original disk file itself: the
/// reverse protection of a failed-over disk).
pub fn role(dir: &Path) -> &'static str {
    use crate::failover::Phase;
    match crate::failover::record::load(dir) {
        Ok(Some(r)) => match r.phase {
            Phase::Fencing => "failing-over",
            Phase::Uncommitted => "failed-over-uncommitted",
            Phase::Committing => "failed-over-committing",
            Phase::Committed => "failed-over-committed",
        },
        Err(_) => "unknown",
        Ok(None) => {
            let replica = dir.join(crate::registry::REPLICA_FILE);
            if std::fs::symlink_metadata(&replica).is_ok_and(|m| m.file_type().is_symlink()) {
                "replica-in-place"
            } else {
                "replica"
            }
        }
    }
}

/// The status as text for people.
pub fn render_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let disks = v["disks"].as_array().cloned().unwrap_or_default();
    if disks.is_empty() {
        let _ = writeln!(
            s,
            "no replicas in {} yet",
            v["data_dir"].as_str().unwrap_or("?")
        );
    }
    for d in disks {
        let _ = writeln!(s, "disk {}", d["disk_id"].as_str().unwrap_or("?"));
        let _ = writeln!(
            s,
            "  replica:        {} ({} bytes)",
            d["replica"].as_str().unwrap_or("?"),
            d["disk_size"]
        );
        let _ = writeln!(
            s,
            "  role:           {}",
            d["failover_text"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| d["role"].as_str().unwrap_or("?").to_string())
        );
        if let Some(f) = d["last_failover"].as_object() {
            if d["failover"].is_null() {
                let _ = writeln!(
                    s,
                    "  last failover:  at {} ({}), {}",
                    f.get("point").and_then(|v| v.as_str()).unwrap_or("?"),
                    f.get("point_name").and_then(|v| v.as_str()).unwrap_or(""),
                    f.get("failed_over_at")
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                );
            }
        }
        let _ = writeln!(s, "  applied seq:    {}", d["applied_seq"]);
        if d["consistent"] == true {
            let _ = writeln!(s, "  consistent:     yes");
        } else {
            let _ = writeln!(
                s,
                "  consistent:     NO: {}",
                d["inconsistent_explanation"].as_str().unwrap_or("unknown")
            );
        }
        if d["full_pass_needed"] == true {
            let size = d["disk_size"].as_u64().unwrap_or(0).max(1);
            let at = d["full_pass_cursor"].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "  full pass:      {:.1}% ({at} of {size} bytes done)",
                at as f64 * 100.0 / size as f64
            );
        }
        let _ = writeln!(
            s,
            "  connection:     {} {}",
            d["connection"].as_str().unwrap_or("?"),
            d["peer"].as_str().unwrap_or("")
        );
        if let Some(lag) = d["rpo_lag_seconds"].as_f64() {
            let _ = writeln!(s, "  RPO lag:        {lag:.3} s");
            let _ = writeln!(
                s,
                "  waiting:        {} records, {} bytes at the source (head seq {})",
                d["records_waiting"], d["bytes_waiting"], d["source_head_seq"]
            );
            let _ = writeln!(
                s,
                "  throughput:     {:.1} MB/s",
                d["throughput_bytes_per_second"].as_f64().unwrap_or(0.0) / 1e6
            );
        }
        let _ = writeln!(
            s,
            "  shipped:        {} bytes of records as {} bytes on the wire ({:.2}x)",
            d["bytes_before_compression"],
            d["bytes_on_wire"],
            d["compression_ratio"].as_f64().unwrap_or(1.0)
        );
        let j = &d["journal"];
        if j["journal"] == true {
            let _ = writeln!(
                s,
                "  journal:        {} bytes (limit {}, retention {} s); oldest point {} ({}); {} open point export(s)",
                j["journal_bytes"],
                j["journal_limit_bytes"],
                j["retention_seconds"],
                j["oldest_point"]["seq"],
                j["oldest_point_time"].as_str().unwrap_or("-"),
                j["open_point_exports"]
            );
            if j["gap"]["open"] == true {
                let _ = writeln!(
                    s,
                    "  timeline gap:   after {} until now ({} since {}): no point inside it is offered; the last consistent point stays available",
                    j["gap"]["from_seq"].as_u64().map_or("the start".into(), |n| n.to_string()),
                    j["gap"]["reason"].as_str().unwrap_or("?"),
                    j["gap"]["since"].as_str().unwrap_or("-")
                );
            }
        } else {
            let _ = writeln!(s, "  journal:        none (only the latest state is kept)");
        }
        if let Some(e) = d["last_error"].as_str().filter(|e| !e.is_empty()) {
            let _ = writeln!(s, "  last error:     {e}");
        }
    }
    s
}

/// Prometheus text for a running daemon.
pub fn metrics_text(reg: &Registry) -> String {
    let mut t = metrics::Text::new();
    let now = now_ns();
    let all = reg.all();
    let rows: Vec<(String, Live, Option<state::ReplicaState>)> = all
        .iter()
        .map(|e| (e.id.clone(), e.live().clone(), e.state()))
        .collect();
    let each = |t: &mut metrics::Text,
                name: &str,
                kind: &str,
                help: &str,
                f: &dyn Fn(&Live, &Option<state::ReplicaState>) -> f64| {
        for (id, l, st) in &rows {
            t.sample(name, kind, help, &[("disk", id)], f(l, st));
        }
    };
    each(
        &mut t,
        "blockship_target_applied_seq",
        "gauge",
        "Newest sequence durably applied to the replica.",
        &|_, s| s.map_or(0.0, |s| s.applied_seq as f64),
    );
    each(
        &mut t,
        "blockship_target_consistent",
        "gauge",
        "1 when the replica is crash-consistent.",
        &|_, s| f64::from(u8::from(s.is_some_and(|s| s.consistent()))),
    );
    for e in &all {
        use crate::failover::Phase;
        let v = match crate::failover::record::load(&e.dir) {
            Ok(Some(r)) => match r.phase {
                Phase::Fencing | Phase::Uncommitted => 1.0,
                Phase::Committing | Phase::Committed => 2.0,
            },
            Ok(None) => 0.0,
            // A record that cannot be read: not "replicating".
            Err(_) => -1.0,
        };
        t.sample(
            "blockship_target_failed_over",
            "gauge",
            "0: replicating; 1: failed over, reversible; 2: failed over, committed; -1: the failover record cannot be read.",
            &[("disk", &e.id)],
            v,
        );
    }
    each(
        &mut t,
        "blockship_target_connected",
        "gauge",
        "1 while a shipper is connected.",
        &|l, _| f64::from(u8::from(l.connected)),
    );
    each(
        &mut t,
        "blockship_target_rpo_lag_seconds",
        "gauge",
        "Age of the oldest change not yet durable at the recovery site.",
        &|l, _| {
            if l.connected {
                lag_seconds(l.oldest_pending_ns, now)
            } else {
                0.0
            }
        },
    );
    each(
        &mut t,
        "blockship_target_records_waiting",
        "gauge",
        "Records waiting at the source.",
        &|l, _| l.records_waiting as f64,
    );
    each(
        &mut t,
        "blockship_target_bytes_waiting",
        "gauge",
        "Bytes waiting at the source.",
        &|l, _| l.bytes_waiting as f64,
    );
    each(
        &mut t,
        "blockship_target_plain_bytes_total",
        "counter",
        "Record bytes received, before compression.",
        &|l, _| l.plain_bytes as f64,
    );
    each(
        &mut t,
        "blockship_target_wire_bytes_total",
        "counter",
        "Frame bytes received, after compression.",
        &|l, _| l.wire_bytes as f64,
    );
    each(
        &mut t,
        "blockship_target_batches_total",
        "counter",
        "Batches applied.",
        &|l, _| l.batches as f64,
    );
    each(
        &mut t,
        "blockship_target_throughput_bytes_per_second",
        "gauge",
        "Record bytes applied per second, recent.",
        &|l, _| l.rate,
    );
    // The journal, from its files (cheap: headers and sizes).
    let journals: Vec<(String, serde_json::Value)> = all
        .iter()
        .map(|e| {
            let data_dir = e.dir.parent().unwrap_or(Path::new("."));
            (e.id.clone(), crate::points::status_json(data_dir, &e.dir))
        })
        .collect();
    for (name, help, key) in [
        (
            "blockship_target_journal_bytes",
            "Bytes the recovery-point journal holds.",
            "journal_bytes",
        ),
        (
            "blockship_target_journal_limit_bytes",
            "The journal's size limit (--journal-max).",
            "journal_limit_bytes",
        ),
        (
            "blockship_target_journal_retention_seconds",
            "The retention in force (--retention).",
            "retention_seconds",
        ),
        (
            "blockship_target_open_point_exports",
            "Open point exports and test failovers.",
            "open_point_exports",
        ),
    ] {
        for (id, j) in &journals {
            t.sample(
                name,
                "gauge",
                help,
                &[("disk", id)],
                j[key].as_f64().unwrap_or(0.0),
            );
        }
    }
    for (id, j) in &journals {
        t.sample(
            "blockship_target_oldest_point_seq",
            "gauge",
            "Sequence number of the oldest recovery point kept.",
            &[("disk", id)],
            j["oldest_point"]["seq"].as_f64().unwrap_or(0.0),
        );
    }
    t.finish()
}
