//! The timeline of a disk's journal: the oldest and newest point, the
//! marks, the gaps (where the replica was not consistent), and what a
//! point's name (`latest`, a sequence number, an RFC 3339 time, a mark's
//! name) resolves to. Read from the index files only (never the
//! payloads), by the daemon and by other processes alike.

use std::path::Path;

use super::format::{Kind, ENTRY_APP, ENTRY_FROM_START};
use super::segment::{self, Segment};
use super::Pos;
use crate::error::{Error, Result};
use crate::state::{Reason, ReplicaState};

/// A mark in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkInfo {
    /// Its name.
    pub name: String,
    /// Its position (right after the MARK record).
    pub pos: Pos,
    /// Capture time, ns since the epoch.
    pub time_ns: u64,
    /// Application-consistent (taken with a frozen file system or hooks).
    pub app: bool,
}

/// A stretch of the stream where the replica was not consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The newest consistent point before it (None: none kept).
    pub from: Option<Pos>,
    /// The first consistent point after it (None: still open).
    pub to: Option<Pos>,
    /// Why.
    pub reason: Reason,
    /// When it opened, ns since the epoch.
    pub since_ns: u64,
    /// When it closed (0: open).
    pub closed_ns: u64,
}

impl Gap {
    /// `p` is strictly inside.
    pub fn contains(&self, p: Pos) -> bool {
        self.from.is_none_or(|f| p > f) && self.to.is_none_or(|t| p < t)
    }
}

/// How a point is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointName {
    /// The newest consistent point.
    Latest,
    /// A sequence number (in the newest epoch that has it).
    Seq(u64),
    /// The last record captured at or before this time (ns since the epoch).
    Time(u64),
    /// The newest mark of this name.
    Mark(String),
}

impl PointName {
    /// `latest`, `123456`, `2026-11-24T10:15:00Z`, `mark:NAME` or `NAME`.
    pub fn parse(s: &str) -> PointName {
        if s == "latest" {
            return PointName::Latest;
        }
        if let Some(m) = s.strip_prefix("mark:") {
            return PointName::Mark(m.to_string());
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = s.parse() {
                return PointName::Seq(n);
            }
        }
        if let Some(t) = parse_rfc3339(s) {
            return PointName::Time(t);
        }
        PointName::Mark(s.to_string())
    }
}

impl std::fmt::Display for PointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointName::Latest => write!(f, "latest"),
            PointName::Seq(n) => write!(f, "seq {n}"),
            PointName::Time(t) => write!(f, "time {}", format_rfc3339(*t)),
            PointName::Mark(m) => write!(f, "mark {m:?}"),
        }
    }
}

/// What the journal of a disk holds.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Oldest point (None: no journal).
    pub oldest: Option<Pos>,
    /// Newest point recorded durably (capped at the state's applied seq).
    pub newest: Option<Pos>,
    /// Capture time of the oldest and newest ring record kept (0: none).
    pub oldest_time_ns: u64,
    /// See `oldest_time_ns`.
    pub newest_time_ns: u64,
    /// Marks, oldest first.
    pub marks: Vec<MarkInfo>,
    /// Gaps, oldest first.
    pub gaps: Vec<Gap>,
    /// Journal bytes (both files of every segment).
    pub bytes: u64,
    /// Segments.
    pub segments: u64,
    /// Undo entries (changed extents recorded).
    pub entries: u64,
}

impl Timeline {
    /// Read the journal in `dir` for a replica whose state is `state`.
    pub fn load(dir: &Path, state: Option<&ReplicaState>) -> Result<Timeline> {
        let mut t = Timeline::default();
        t.scan(dir, state, |_, _| {})?;
        Ok(t)
    }

    /// Scan every index entry, calling `each(entry, capped newest)` for ring
    /// records (after the timeline's own bookkeeping).
    fn scan(
        &mut self,
        dir: &Path,
        state: Option<&ReplicaState>,
        mut each: impl FnMut(&super::format::Entry, Pos),
    ) -> Result<()> {
        let segs = segment::list(dir)?;
        let mut entries = Vec::new();
        let mut last = Pos::default();
        let mut open: Option<Gap> = None;
        for (i, &n) in segs.iter().enumerate() {
            let Some(seg) = Segment::open(dir, n)? else {
                // Pruned while read: everything before it is going too.
                *self = Timeline::default();
                last = Pos::default();
                open = None;
                continue;
            };
            self.segments += 1;
            self.bytes += segment::bytes(dir, n);
            if i == 0 || self.oldest.is_none() {
                self.oldest = Some(seg.header.base);
                last = seg.header.base;
                open = seg.header.gap.map(|g| Gap {
                    from: g.from,
                    to: None,
                    reason: reason_of(g.reason),
                    since_ns: g.since_ns,
                    closed_ns: 0,
                });
            }
            entries.clear();
            seg.read_entries(0, &mut entries, false)?;
            for e in &entries {
                match e.kind {
                    Kind::GapOpen => {
                        let mut g = Gap {
                            from: (e.flags & ENTRY_FROM_START == 0).then_some(e.pos),
                            to: None,
                            reason: reason_of(u32::try_from(e.offset).unwrap_or(0)),
                            since_ns: e.time_ns,
                            closed_ns: 0,
                        };
                        // Opened again while open (a new epoch inside a
                        // resync): one gap, from the earlier start.
                        if let Some(prev) = open.take() {
                            g.from = match (prev.from, g.from) {
                                (Some(a), Some(b)) => Some(a.min(b)),
                                _ => None,
                            };
                            g.since_ns = prev.since_ns;
                        }
                        open = Some(g);
                        let epoch = u32::try_from(e.len).unwrap_or(0);
                        if epoch > last.epoch {
                            last = Pos {
                                epoch,
                                seq: 0,
                                sub: false,
                            };
                        }
                    }
                    Kind::GapClose => {
                        if let Some(mut g) = open.take() {
                            g.to = Some(e.pos);
                            g.closed_ns = e.time_ns;
                            self.gaps.push(g);
                        }
                    }
                    Kind::Mark => {}
                    _ => self.entries += u64::from(e.is_undo()),
                }
                if e.pos > last {
                    last = e.pos;
                }
            }
            // Marks and times are read after the cap is known (below).
            for e in &entries {
                if e.kind == Kind::Mark {
                    let mut name = vec![0u8; e.dat_len as usize];
                    if seg.read_payload(e.dat_pos, &mut name).is_ok() && e.payload_ok(&name) {
                        self.marks.push(MarkInfo {
                            name: String::from_utf8_lossy(&name).into_owned(),
                            pos: e.pos,
                            time_ns: e.time_ns,
                            app: e.flags & ENTRY_APP != 0,
                        });
                    }
                }
                if e.is_ring_record() {
                    if self.oldest_time_ns == 0 {
                        self.oldest_time_ns = e.time_ns;
                    }
                    self.newest_time_ns = e.time_ns;
                }
                each(e, last);
            }
        }
        if let Some(g) = open {
            self.gaps.push(g);
        }
        if self.oldest.is_some() {
            let cap = state.map_or(last, |s| Pos {
                epoch: last.epoch,
                seq: s.applied_seq,
                sub: true,
            });
            let newest = last.min(cap);
            self.newest = Some(newest);
            self.marks.retain(|m| m.pos <= newest);
            // A mark resent after a crash is the same mark.
            self.marks.dedup_by(|a, b| a.pos == b.pos);
        }
        Ok(())
    }

    /// `p` can be presented: kept, durable, and in no gap.
    pub fn valid(&self, p: Pos) -> bool {
        match (self.oldest, self.newest) {
            (Some(o), Some(n)) => o <= p && p <= n && !self.gaps.iter().any(|g| g.contains(p)),
            _ => false,
        }
    }

    /// The gap holding `p`, if any.
    pub fn gap_at(&self, p: Pos) -> Option<&Gap> {
        self.gaps.iter().find(|g| g.contains(p))
    }

    /// The oldest point that can be presented: the oldest kept, or the
    /// end of the gap it is in.
    pub fn oldest_valid(&self) -> Option<Pos> {
        let o = self.oldest?;
        if self.valid(o) {
            return Some(o);
        }
        let mut p = o;
        // Gaps are in stream order; follow them until a valid point.
        for g in &self.gaps {
            if g.contains(p) {
                p = g.to?;
            }
        }
        self.valid(p).then_some(p)
    }

    /// The newest consistent point.
    pub fn latest(&self) -> Option<Pos> {
        let n = self.newest?;
        if self.valid(n) {
            return Some(n);
        }
        let g = self.gap_at(n)?;
        g.from.filter(|&f| self.valid(f))
    }

    /// Resolve `name` to a point, re-reading the journal for a time.
    pub fn resolve(
        &self,
        dir: &Path,
        state: Option<&ReplicaState>,
        name: &PointName,
    ) -> Result<Pos> {
        let no = |why: String| Error::Invalid(format!("point {name}: {why}"));
        let (Some(oldest), Some(newest)) = (self.oldest, self.newest) else {
            return Err(no(
                "this disk has no journal yet (is `nbd-target serve` running with the journal on?)"
                    .into(),
            ));
        };
        match name {
            PointName::Latest => self.latest().ok_or_else(|| {
                no("no consistent point is kept: the replica has not been consistent since the oldest point (an initial sync or a resync is running)".into())
            }),
            PointName::Seq(n) => {
                for epoch in (oldest.epoch..=newest.epoch).rev() {
                    for sub in [true, false] {
                        let p = Pos { epoch, seq: *n, sub };
                        if self.valid(p) {
                            return Ok(p);
                        }
                    }
                    let p = Pos { epoch, seq: *n, sub: false };
                    if let Some(g) = self.gap_at(p).filter(|_| p >= oldest && p <= newest) {
                        return Err(no(self.explain_gap(g)));
                    }
                }
                Err(no(format!(
                    "outside the points kept ({} to {})",
                    oldest.seq, newest.seq
                )))
            }
            PointName::Mark(m) => {
                let mark = self
                    .marks
                    .iter()
                    .rev()
                    .find(|k| &k.name == m)
                    .ok_or_else(|| no("no mark of that name is kept (see `nbd-target points`)".into()))?;
                if let Some(g) = self.gap_at(mark.pos) {
                    return Err(no(self.explain_gap(g)));
                }
                if !self.valid(mark.pos) {
                    return Err(no("no longer kept".into()));
                }
                Ok(mark.pos)
            }
            PointName::Time(t) => {
                let mut best: Option<Pos> = None;
                let mut scratch = Timeline::default();
                scratch.scan(dir, state, |e, _| {
                    if e.is_ring_record() && e.time_ns <= *t {
                        best = Some(e.pos);
                    }
                })?;
                let p = best.ok_or_else(|| {
                    no(format!(
                        "before the oldest record kept ({})",
                        format_rfc3339(self.oldest_time_ns)
                    ))
                })?;
                let p = p.min(newest);
                for q in [p, Pos { sub: true, ..p }] {
                    if self.valid(q) {
                        return Ok(q);
                    }
                }
                match self.gap_at(p) {
                    Some(g) => Err(no(self.explain_gap(g))),
                    None => Err(no("no longer kept".into())),
                }
            }
        }
    }

    fn explain_gap(&self, g: &Gap) -> String {
        format!(
            "inside a gap in the timeline from {} to {} ({}, since {}): the replica was not consistent there; choose {}",
            g.from.map_or("the start".into(), |p| p.to_string()),
            g.to.map_or("now (still open)".into(), |p| p.to_string()),
            g.reason.name(),
            format_rfc3339(g.since_ns),
            match (g.from.filter(|&f| self.valid(f)), g.to) {
                (Some(f), Some(t)) => format!("{} or {}", f.seq, t.seq),
                (Some(f), None) => format!("{} (the last consistent point)", f.seq),
                (None, Some(t)) => format!("{} or later", t.seq),
                (None, None) => "a point after the resync completes".into(),
            }
        )
    }
}

fn reason_of(code: u32) -> Reason {
    crate::state::Reason::from_code(code)
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)` to ns since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let mut f = String::from(&digits[..digits.len().min(9)]);
        while f.len() < 9 {
            f.push('0');
        }
        frac_ns = f.parse().ok()?;
    }
    let off_s: i64 = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let v = oh * 3600 + om * 60;
            if rest.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86400 + h * 3600 + mi * 60 + se - off_s;
    let ns = secs.checked_mul(1_000_000_000)?.checked_add(frac_ns)?;
    u64::try_from(ns).ok()
}

/// ns since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` ("-" for 0).
pub fn format_rfc3339(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    let ms = (ns / 1_000_000) % 1000;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's days-from-civil and civil-from-days (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(PointName::parse("latest"), PointName::Latest);
        assert_eq!(PointName::parse("123456"), PointName::Seq(123_456));
        assert_eq!(
            PointName::parse("before-upgrade"),
            PointName::Mark("before-upgrade".into())
        );
        assert_eq!(PointName::parse("mark:42"), PointName::Mark("42".into()));
        assert_eq!(
            PointName::parse("2026-11-24T10:15:00Z"),
            PointName::Time(1_795_515_300_000_000_000)
        );
        assert_eq!(
            PointName::parse("2026-11-24T11:15:00.5+01:00"),
            PointName::Time(1_795_515_300_500_000_000)
        );
    }

    #[test]
    fn times_round_trip() {
        let t = 1_795_515_300_123_000_000;
        assert_eq!(format_rfc3339(t), "2026-11-24T10:15:00.123Z");
        assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000_000)
        );
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("2026-11-24 10:15").is_none());
    }

    #[test]
    fn gaps_hide_points() {
        let p = |seq, sub| Pos { epoch: 0, seq, sub };
        let t = Timeline {
            oldest: Some(p(10, true)),
            newest: Some(p(50, true)),
            gaps: vec![Gap {
                from: Some(p(20, false)),
                to: Some(p(30, true)),
                reason: Reason::SourceOverflow,
                since_ns: 1,
                closed_ns: 2,
            }],
            ..Timeline::default()
        };
        assert!(t.valid(p(20, false)));
        assert!(!t.valid(p(20, true)));
        assert!(!t.valid(p(30, false)));
        assert!(t.valid(p(30, true)));
        assert!(!t.valid(p(9, true)));
        assert!(!t.valid(p(51, false)));
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            t.resolve(d.path(), None, &PointName::Seq(30)).unwrap(),
            p(30, true)
        );
        assert_eq!(
            t.resolve(d.path(), None, &PointName::Seq(20)).unwrap(),
            p(20, false)
        );
        let e = t
            .resolve(d.path(), None, &PointName::Seq(25))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gap") && e.contains("source-overflow"), "{e}");
        assert_eq!(t.latest(), Some(p(50, true)));
        let open = Timeline {
            gaps: vec![Gap {
                to: None,
                ..t.gaps[0]
            }],
            ..t.clone()
        };
        assert_eq!(open.latest(), Some(p(20, false)));
    }
}
