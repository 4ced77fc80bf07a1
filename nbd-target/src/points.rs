//! Recovery points as commands see them: opening a disk's journal from
//! its data folder, naming a point, `nbd-target points` (text and JSON),
//! the "tested at" tags a test failover leaves, and the journal part of
//! `status`. The journal itself is [`crate::journal`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{io, Error, Result};
use crate::journal::timeline::{format_rfc3339, Gap, MarkInfo};
use crate::journal::{self, lease, segment, JournalConfig, PointName, PointView, Pos, Timeline};
use crate::registry::{REPLICA_FILE, STATE_FILE};
use crate::replica::ReplicaSpec;
use crate::state::{self, now_ns, ReplicaState};

/// Where the "tested at" tags are (JSON lines: epoch, seq, sub, time_ns, what).
pub const TESTED_FILE: &str = "tested.jsonl";
/// Where `serve` writes the retention in force (for `status`).
pub const CONFIG_FILE: &str = "journal-config.json";

/// A disk's recovery points, from its data folder.
#[derive(Debug)]
pub struct DiskPoints {
    /// Disk id.
    pub disk_id: String,
    /// The disk's folder.
    pub dir: PathBuf,
    /// Its journal folder.
    pub journal: PathBuf,
    /// The replica's state.
    pub state: ReplicaState,
    /// The timeline.
    pub timeline: Timeline,
}

impl DiskPoints {
    /// Read disk `disk_id`'s state and journal in `data_dir`.
    pub fn load(data_dir: &Path, disk_id: &str) -> Result<DiskPoints> {
        wire::identity::validate_disk_id(disk_id)
            .map_err(|e| Error::Invalid(format!("disk id {disk_id:?}: {e}")))?;
        let dir = data_dir.join(disk_id);
        let state = state::read(&dir.join(STATE_FILE))?.ok_or_else(|| {
            Error::Invalid(format!(
                "no replica of disk {disk_id:?} in {} (see `nbd-target status --data-dir {}`)",
                data_dir.display(),
                data_dir.display()
            ))
        })?;
        let journal = journal::dir_of(&dir);
        let timeline = Timeline::load(&journal, Some(&state))?;
        Ok(DiskPoints {
            disk_id: disk_id.to_string(),
            dir,
            journal,
            state,
            timeline,
        })
    }

    /// Resolve a point's name.
    pub fn resolve(&self, name: &str) -> Result<Pos> {
        self.timeline
            .resolve(&self.journal, Some(&self.state), &PointName::parse(name))
    }

    /// The replica as a file in the data folder, unless `backend` says where.
    pub fn replica_spec(&self, backend: Option<&str>) -> Result<ReplicaSpec> {
        match backend {
            Some(uri) => ReplicaSpec::parse_nbd_uri(uri),
            None => Ok(ReplicaSpec::File(self.dir.join(REPLICA_FILE))),
        }
    }

    /// Open the disk at `point` (a lease held for `what`). Refused once a
    /// failover commit of the disk has begun (checked with the lease held,
    /// and the commit checks the leases after it records `committing`):
    /// it rewrites the replica and removes the journal.
    pub fn open_view(&self, spec: &ReplicaSpec, point: Pos, what: &str) -> Result<PointView> {
        let view = self.open_view_during_commit(spec, point, what)?;
        if let Some(r) = crate::failover::record::load(&self.dir)? {
            if matches!(
                r.phase,
                crate::failover::Phase::Committing | crate::failover::Phase::Committed
            ) {
                return Err(Error::Invalid(format!(
                    "disk {:?} is {}: its recovery points are gone",
                    self.disk_id,
                    r.describe()
                )));
            }
        }
        Ok(view)
    }

    /// [`DiskPoints::open_view`] without the commit check: for the commit.
    pub fn open_view_during_commit(
        &self,
        spec: &ReplicaSpec,
        point: Pos,
        what: &str,
    ) -> Result<PointView> {
        let reader = spec.open_reader()?;
        PointView::open(&self.journal, reader, self.state.disk_size, point, what)
    }

    /// Tag `point` as tested now.
    pub fn tag_tested(&self, point: Pos, what: &str) -> Result<()> {
        let p = self.journal.join(TESTED_FILE);
        let line = json!({
            "epoch": point.epoch, "seq": point.seq, "sub": point.sub,
            "time_ns": now_ns(), "what": what,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io(&p, "opening the tested-at log"))?;
        writeln!(f, "{line}").map_err(io(&p, "writing the tested-at log"))?;
        f.sync_data().map_err(io(&p, "syncing the tested-at log"))
    }

    /// Every "tested at" tag: (point, time_ns).
    pub fn tested(&self) -> Vec<(Pos, u64)> {
        let Ok(text) = std::fs::read_to_string(self.journal.join(TESTED_FILE)) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    Pos {
                        epoch: v["epoch"]
                            .as_u64()
                            .and_then(|e| u32::try_from(e).ok())
                            .unwrap_or(0),
                        seq: v["seq"].as_u64().unwrap_or(0),
                        sub: v["sub"].as_bool().unwrap_or(false),
                    },
                    v["time_ns"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// `nbd-target points --json`.
    pub fn to_json(&self) -> Value {
        let t = &self.timeline;
        let tested = self.tested();
        let tested_at = |p: Pos| {
            tested
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|&(_, t)| t)
                .max()
                .map(format_rfc3339)
        };
        let marks: Vec<Value> = t
            .marks
            .iter()
            .map(|m: &MarkInfo| {
                json!({
                    "name": m.name,
                    "seq": m.pos.seq,
                    "epoch": m.pos.epoch,
                    "time": format_rfc3339(m.time_ns),
                    "time_ns": m.time_ns,
                    "kind": if m.app { "app" } else { "crash" },
                    "tested_at": tested_at(m.pos),
                    "available": t.valid(m.pos),
                })
            })
            .collect();
        let gaps: Vec<Value> = t
            .gaps
            .iter()
            .map(|g: &Gap| {
                json!({
                    "from_seq": g.from.map(|p| p.seq),
                    "to_seq": g.to.map(|p| p.seq),
                    "open": g.to.is_none(),
                    "reason": g.reason.name(),
                    "explanation": g.reason.explain(),
                    "since": format_rfc3339(g.since_ns),
                    "closed": if g.closed_ns > 0 { Some(format_rfc3339(g.closed_ns)) } else { None },
                })
            })
            .collect();
        let tested_list: Vec<Value> = tested
            .iter()
            .map(
                |(p, tm)| json!({"seq": p.seq, "epoch": p.epoch, "tested_at": format_rfc3339(*tm)}),
            )
            .collect();
        json!({
            "disk_id": self.disk_id,
            "journal": t.oldest.is_some(),
            "oldest": t.oldest_valid().map(point_json),
            "journal_base": t.oldest.map(point_json),
            "oldest_time": format_rfc3339(t.oldest_time_ns),
            "newest": t.newest.map(point_json),
            "newest_time": format_rfc3339(t.newest_time_ns),
            "latest": t.latest().map(point_json),
            "applied_seq": self.state.applied_seq,
            "marks": marks,
            "gaps": gaps,
            "tested": tested_list,
            "journal_bytes": t.bytes,
            "journal_segments": t.segments,
            "journal_entries": t.entries,
            "open_point_exports": lease::live(&self.journal).len(),
        })
    }
}

/// A point as JSON: `seq`, `epoch`, `after_resync` and its `name`.
pub fn point_json(p: Pos) -> Value {
    json!({
        "seq": p.seq,
        "epoch": p.epoch,
        "after_resync": p.sub,
        "name": p.seq.to_string(),
    })
}

/// `nbd-target points` for people.
pub fn render_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let seq = |p: &Value| p["seq"].as_u64().map_or("-".to_string(), |n| n.to_string());
    let _ = writeln!(s, "disk {}", v["disk_id"].as_str().unwrap_or("?"));
    if v["journal"] != true {
        let _ = writeln!(
            s,
            "  no journal: no recovery points are kept (serve with the journal on)"
        );
        return s;
    }
    let _ = writeln!(
        s,
        "  points:   {} ({}) .. {} ({}), every sequence number in between outside the gaps",
        seq(&v["oldest"]),
        v["oldest_time"].as_str().unwrap_or("-"),
        seq(&v["newest"]),
        v["newest_time"].as_str().unwrap_or("-")
    );
    let _ = writeln!(s, "  latest consistent point: {}", seq(&v["latest"]));
    let _ = writeln!(
        s,
        "  journal:  {} bytes in {} segment(s); {} open point export(s)",
        v["journal_bytes"], v["journal_segments"], v["open_point_exports"]
    );
    let marks = v["marks"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "  marks:    {}",
        if marks.is_empty() { "none" } else { "" }
    );
    for m in &marks {
        let _ = writeln!(
            s,
            "    {:>10}  {}  {:5}  {}{}{}",
            m["seq"],
            m["time"].as_str().unwrap_or("-"),
            m["kind"].as_str().unwrap_or("?"),
            m["name"].as_str().unwrap_or("?"),
            m["tested_at"]
                .as_str()
                .map_or(String::new(), |t| format!("  (tested at {t})")),
            if m["available"] == false {
                "  (inside a gap: not available)"
            } else {
                ""
            }
        );
    }
    let gaps = v["gaps"].as_array().cloned().unwrap_or_default();
    if !gaps.is_empty() {
        let _ = writeln!(s, "  gaps (no point offered inside):");
    }
    for g in &gaps {
        let _ = writeln!(
            s,
            "    after {} until {}: {} since {}{}",
            g["from_seq"]
                .as_u64()
                .map_or("the start".into(), |n| n.to_string()),
            g["to_seq"]
                .as_u64()
                .map_or("now (resync running)".into(), |n| n.to_string()),
            g["reason"].as_str().unwrap_or("?"),
            g["since"].as_str().unwrap_or("-"),
            g["closed"]
                .as_str()
                .map_or(String::new(), |c| format!(", closed {c}"))
        );
    }
    s
}

/// Record the journal limits `serve` runs with (for `status`).
pub fn write_config(data_dir: &Path, cfg: Option<&JournalConfig>) -> Result<()> {
    let p = data_dir.join(CONFIG_FILE);
    let v = match cfg {
        Some(c) => json!({
            "journal": true,
            "retention_seconds": c.retention.as_secs(),
            "journal_max_bytes": c.max_bytes,
            "segment_bytes": c.segment_bytes,
        }),
        None => json!({ "journal": false }),
    };
    std::fs::write(&p, v.to_string()).map_err(io(&p, "writing the journal configuration"))
}

/// The journal part of a disk's status: cheap (headers and file sizes,
/// never the entries).
pub fn status_json(data_dir: &Path, disk_dir: &Path) -> Value {
    let cfg: Value = std::fs::read(data_dir.join(CONFIG_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let jdir = journal::dir_of(disk_dir);
    let segs = segment::list(&jdir).unwrap_or_default();
    let bytes: u64 = segs.iter().map(|&n| segment::bytes(&jdir, n)).sum();
    let oldest = segs
        .first()
        .and_then(|&n| segment::Segment::open(&jdir, n).ok().flatten())
        .map(|s| (s.header.base, s.header.created_ns));
    let leases = lease::live(&jdir);
    let gap = segs.last().and_then(|&n| newest_gap(&jdir, n));
    json!({
        "journal": !segs.is_empty(),
        "journal_bytes": bytes,
        "journal_limit_bytes": cfg["journal_max_bytes"],
        "retention_seconds": cfg["retention_seconds"],
        "oldest_point": oldest.map(|(p, _)| point_json(p)),
        "oldest_point_time": oldest.map(|(_, t)| format_rfc3339(t)),
        "open_point_exports": leases.len(),
        "open_point_exports_detail": leases.iter().map(|l| json!({"seq": l.point.seq, "pid": l.pid, "what": l.what})).collect::<Vec<_>>(),
        "gap": gap,
    })
}

/// The gap open in the newest segment (or the last one closed in it), from
/// that segment alone: `{from_seq, to_seq, open, reason, since}`.
fn newest_gap(jdir: &Path, n: u64) -> Option<Value> {
    let seg = segment::Segment::open(jdir, n).ok()??;
    let mut entries = Vec::new();
    seg.read_entries(0, &mut entries, false).ok()?;
    let mut gap = seg.header.gap.map(|g| (g.from, None, g.reason, g.since_ns));
    for e in &entries {
        match e.kind {
            journal::format::Kind::GapOpen => {
                let from = (e.flags & journal::format::ENTRY_FROM_START == 0).then_some(e.pos);
                gap = Some((from, None, u32::try_from(e.offset).unwrap_or(0), e.time_ns));
            }
            journal::format::Kind::GapClose => {
                if let Some(g) = gap.as_mut() {
                    g.1 = Some(e.pos);
                }
            }
            _ => {}
        }
    }
    let (from, to, reason, since) = gap?;
    let reason = state::Reason::from_code(reason);
    Some(json!({
        "from_seq": from.map(|p| p.seq),
        "to_seq": to.map(|p: Pos| p.seq),
        "open": to.is_none(),
        "reason": reason.name(),
        "since": format_rfc3339(since),
    }))
}
