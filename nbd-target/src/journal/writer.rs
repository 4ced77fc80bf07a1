//! The apply side of the journal. [`JournalWriter`] appends entries to
//! the newest segment and rolls segments; [`Journaled`] is the
//! [`RecordSink`] that keeps the undo-before-overwrite order:
//!
//! ```text
//!  record ─► read the before-image ─► entry buffered ─► replica write held
//!                 (from the replica)                      in `held`
//!  flush:  payloads + entries written, both fdatasync'd ─► held writes reach the replica
//!  commit: flush ─► replica fdatasync ─► (the pipeline) state file ─► ACK
//! ```
//!
//! A replica block is never overwritten before the before-image that
//! undoes it is durable, so a power cut can lose only entries of records
//! that were never acknowledged (and whose writes never reached the
//! replica). Held writes are flushed early when a record or a read
//! touches one of them (so a before-image is always read from the
//! replica as the stream left it), or when [`HELD_BYTES`] or
//! [`HELD_OPS`] are held.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::format::{
    Entry, Header, Kind, OpenGap, ENTRY_APP, ENTRY_FROM_START, ENTRY_LEN, HEADER_LEN,
};
use super::payload::PayloadOut;
use super::segment::{self, dat_path, idx_path};
use super::{JournalConfig, Pos};
use crate::error::{io, Result};
use crate::replica::ReplicaWriter;
use crate::session::apply::RecordSink;
use crate::state::{now_ns, Reason, ReplicaState};

/// Held replica writes (bytes) that make the journal flush early.
pub const HELD_BYTES: usize = 8 << 20;
/// Held replica writes (count) that make the journal flush early.
pub const HELD_OPS: usize = 1024;
/// Before-images are read and kept in pieces of at most this many bytes.
const PIECE: u64 = 1 << 20;

/// What the journal knows of the stream, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Newest segment.
    pub segment: u64,
    /// Newest position recorded.
    pub last: Pos,
    /// Entries appended by this writer.
    pub entries: u64,
    /// Payload bytes appended by this writer.
    pub payload_bytes: u64,
}

/// Appends to a disk's journal.
#[derive(Debug)]
pub struct JournalWriter {
    dir: PathBuf,
    cfg: JournalConfig,
    seg: u64,
    /// The highest position of any entry in the current segment (those
    /// kept from before a crash too): the next segment's base is at least
    /// this, so segment k never holds anything after segment k+1's base.
    seg_max: Pos,
    idx: File,
    /// The payload file, staged (direct writes where possible).
    dat: PayloadOut,
    idx_len: u64,
    idx_buf: Vec<u8>,
    /// Position of the newest record or item seen.
    last: Pos,
    last_good: Pos,
    gap: Option<OpenGap>,
    cur_time: u64,
    /// The current ring record has an entry (every ring record gets one).
    cur_has_entry: bool,
    stats: WriterStats,
    last_prune: Option<Instant>,
    disk_id: String,
}

impl JournalWriter {
    /// Open (or begin) the journal in `dir` for a replica whose durable
    /// state is `state` (read before this connection's HELLO changed
    /// anything). A torn tail is cut. Entries past the state's applied
    /// sequence (applied, never acknowledged) are kept: their
    /// before-images were read from the replica as the stream left it, so
    /// they undo correctly; the stream continues after the durable state.
    pub fn open(
        dir: &Path,
        cfg: JournalConfig,
        state: &ReplicaState,
        disk_id: &str,
    ) -> Result<JournalWriter> {
        std::fs::create_dir_all(dir).map_err(io(dir, "creating the journal folder"))?;
        let durable = Pos {
            epoch: 0,
            seq: state.applied_seq,
            sub: true,
        };
        let mut segs = segment::list(dir)?;
        remove_orphan_payloads(dir, &segs)?;
        while let Some(&n) = segs.last() {
            if let Some((h, entries, dat_len)) = segment::repair_newest(dir, n)? {
                let mut w = JournalWriter::with_files(dir, cfg, n, &h, dat_len, disk_id)?;
                w.idx_len = (HEADER_LEN + entries.len() * ENTRY_LEN) as u64;
                w.replay(&h, &entries);
                let durable = Pos {
                    epoch: w.last.epoch,
                    ..durable
                };
                if w.last > durable {
                    w.last = durable;
                }
                if w.last_good > w.last {
                    w.last_good = w.last;
                }
                log::info!(
                    "disk {disk_id:?}: journal segment {n} reopened at {} ({} entries in it){}",
                    w.last,
                    entries.len(),
                    match w.gap {
                        Some(g) => format!(
                            ", gap open since {}",
                            g.from.map_or("the start".into(), |p| p.to_string())
                        ),
                        None => String::new(),
                    }
                );
                return Ok(w);
            }
            segs.pop();
        }
        // A new journal: history starts at the replica's state.
        let gap = (state.reason != Reason::None).then(|| OpenGap {
            from: None,
            reason: state.reason as u32,
            since_ns: now_ns(),
        });
        let h = Header {
            segment: 1,
            created_ns: now_ns(),
            base: durable,
            last_good: durable,
            gap,
        };
        write_new_segment(dir, &h)?;
        log::info!(
            "disk {disk_id:?}: journal begun at seq {} ({})",
            state.applied_seq,
            if gap.is_some() {
                "no consistent point yet"
            } else {
                "the replica's state is the oldest point"
            }
        );
        let mut w = JournalWriter::with_files(dir, cfg, 1, &h, 0, disk_id)?;
        w.idx_len = HEADER_LEN as u64;
        Ok(w)
    }

    fn with_files(
        dir: &Path,
        cfg: JournalConfig,
        n: u64,
        h: &Header,
        dat_len: u64,
        disk_id: &str,
    ) -> Result<JournalWriter> {
        let (ip, dp) = (idx_path(dir, n), dat_path(dir, n));
        let idx = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ip)
            .map_err(io(&ip, "opening the journal index"))?;
        let dat = PayloadOut::open(&dp, dat_len)?;
        Ok(JournalWriter {
            dir: dir.to_path_buf(),
            cfg,
            seg: n,
            seg_max: h.base,
            idx,
            dat,
            idx_len: HEADER_LEN as u64,
            idx_buf: Vec::new(),
            last: h.base,
            last_good: h.last_good,
            gap: h.gap,
            cur_time: 0,
            cur_has_entry: true,
            stats: WriterStats {
                segment: n,
                last: h.base,
                ..WriterStats::default()
            },
            last_prune: None,
            disk_id: disk_id.to_string(),
        })
    }

    /// The header's carried state moved forward over `entries`.
    fn replay(&mut self, h: &Header, entries: &[Entry]) {
        self.last = h.base;
        self.last_good = h.last_good;
        self.gap = h.gap;
        for e in entries {
            match e.kind {
                Kind::GapOpen => {
                    self.gap = Some(OpenGap {
                        from: (e.flags & ENTRY_FROM_START == 0).then_some(e.pos),
                        reason: u32::try_from(e.offset).unwrap_or(0),
                        since_ns: e.time_ns,
                    });
                    let epoch = u32::try_from(e.len).unwrap_or(e.pos.epoch);
                    if epoch > self.last.epoch {
                        self.last = Pos {
                            epoch,
                            seq: 0,
                            sub: false,
                        };
                    }
                }
                Kind::GapClose => {
                    self.gap = None;
                    self.last_good = e.pos;
                }
                _ => {
                    if self.gap.is_none() {
                        self.last_good = e.pos;
                    }
                }
            }
            if e.pos > self.last {
                self.last = e.pos;
            }
        }
        self.stats.last = self.last;
        self.seg_max = entries.iter().map(|e| e.pos).fold(h.base, Pos::max);
    }

    /// Newest position recorded, and the stats.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            last: self.last,
            ..self.stats
        }
    }

    /// The journal folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The HELLO changed the state from `before` to `after`: if the
    /// source's sequence numbers started again (its ring went back or was
    /// replaced), a new epoch begins, recorded durably (with the gap it
    /// opens) before the state file says so.
    pub fn after_hello(&mut self, before: &ReplicaState, after: &ReplicaState) -> Result<()> {
        let went_back = after.applied_seq < before.applied_seq || after.ring_id != before.ring_id;
        if !went_back {
            return Ok(());
        }
        let from = if self.gap.is_some() {
            self.gap.and_then(|g| g.from)
        } else {
            Some(self.last_good)
        };
        let epoch = self.last.epoch + 1;
        log::info!(
            "disk {:?}: the source's sequence numbers start again at {} (epoch {epoch}); points before it stay named by time or mark",
            self.disk_id,
            after.applied_seq + 1
        );
        self.push_gap_open(from, after.reason as u32, epoch);
        self.last = Pos {
            epoch,
            seq: after.applied_seq,
            sub: true,
        };
        self.flush_entries()
    }

    fn push_gap_open(&mut self, from: Option<Pos>, reason: u32, epoch_after: u32) {
        let now = now_ns();
        let e = Entry {
            kind: Kind::GapOpen,
            flags: if from.is_none() { ENTRY_FROM_START } else { 0 },
            pos: from.unwrap_or_default(),
            time_ns: now,
            offset: u64::from(reason),
            len: u64::from(epoch_after),
            dat_pos: 0,
            dat_len: 0,
            dat_crc: 0,
        };
        self.push_meta(e);
        self.gap = Some(OpenGap {
            from,
            reason,
            since_ns: now,
        });
    }

    /// A record or resync item at sequence `seq` is next in the stream.
    pub fn position(&mut self, seq: u64, sync: bool, time_ns: u64, consistent: bool) {
        let mut pos = Pos {
            epoch: self.last.epoch,
            seq,
            sub: sync,
        };
        if pos < self.last {
            if sync {
                // A resync item never goes back: it happens where the stream is.
                pos = Pos {
                    sub: true,
                    ..self.last
                };
            } else {
                // Only after a HELLO said so (after_hello): anything else is a
                // replay the pipeline skipped. Keep the order monotonic.
                log::warn!(
                    "disk {:?}: ring record {seq} after {}: recorded in a new epoch",
                    self.disk_id,
                    self.last
                );
                pos.epoch += 1;
                // Durable with the gap it opens (or continues), like after_hello's.
                let from = match self.gap {
                    Some(g) => g.from,
                    None => Some(self.last_good),
                };
                self.push_gap_open(from, Reason::SourceGap as u32, pos.epoch);
            }
        }
        if consistent && self.gap.is_some() {
            self.close_gap(self.last);
        } else if !consistent && self.gap.is_none() {
            self.push_gap_open(Some(self.last_good), Reason::SourceGap as u32, pos.epoch);
        }
        self.last = pos;
        self.cur_time = if sync { now_ns() } else { time_ns };
        self.cur_has_entry = sync;
        if self.gap.is_none() {
            self.last_good = pos;
        }
    }

    /// The replica's consistency as the pipeline now sees it (after a
    /// SYNC_END, a HEARTBEAT, a HELLO).
    pub fn consistency(&mut self, consistent: bool, reason: Reason) {
        if consistent && self.gap.is_some() {
            self.close_gap(self.last);
        } else if !consistent && self.gap.is_none() {
            self.push_gap_open(Some(self.last_good), reason as u32, self.last.epoch);
        }
    }

    fn close_gap(&mut self, at: Pos) {
        let e = Entry {
            kind: Kind::GapClose,
            flags: 0,
            pos: at,
            time_ns: now_ns(),
            offset: 0,
            len: 0,
            dat_pos: 0,
            dat_len: 0,
            dat_crc: 0,
        };
        self.push_meta(e);
        self.gap = None;
        self.last_good = at;
    }

    /// An entry for the current position.
    fn entry(
        &mut self,
        kind: Kind,
        flags: u8,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<()> {
        let e = Entry {
            kind,
            flags,
            pos: self.last,
            time_ns: self.cur_time,
            offset,
            len,
            dat_pos: 0,
            dat_len: 0,
            dat_crc: 0,
        };
        self.push(e, payload)?;
        self.cur_has_entry = true;
        Ok(())
    }

    /// An entry without payload.
    fn push_meta(&mut self, e: Entry) {
        self.seg_max = self.seg_max.max(e.pos);
        self.idx_buf.extend_from_slice(&e.encode());
        self.stats.entries += 1;
    }

    /// An entry and its payload (pieces of at most PIECE bytes, or a mark
    /// name); flushes first when the stage has no room for it.
    fn push(&mut self, mut e: Entry, payload: &[u8]) -> Result<()> {
        if payload.is_empty() {
            self.push_meta(e);
            return Ok(());
        }
        if payload.len() > self.dat.room() {
            self.flush_entries()?;
        }
        e.dat_pos = self.dat.next_pos();
        e.dat_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        e.dat_crc = crc32c::crc32c(payload);
        self.dat.push(payload);
        self.stats.payload_bytes += payload.len() as u64;
        self.push_meta(e);
        Ok(())
    }

    /// The current ring record changed nothing: keep its time.
    fn noop_if_none(&mut self) -> Result<()> {
        if !self.cur_has_entry {
            self.entry(Kind::Noop, 0, 0, 0, &[])?;
        }
        Ok(())
    }

    /// A MARK record at the current position.
    pub fn mark(&mut self, name: &[u8], flags: u64) -> Result<()> {
        let f = if flags & 1 != 0 { ENTRY_APP } else { 0 };
        self.entry(Kind::Mark, f, 0, name.len() as u64, name)
    }

    /// Something is buffered.
    pub fn dirty(&self) -> bool {
        !self.idx_buf.is_empty()
    }

    /// Write the buffered payloads and entries and make them durable.
    pub fn flush_entries(&mut self) -> Result<()> {
        if self.idx_buf.is_empty() {
            return Ok(());
        }
        let ip = idx_path(&self.dir, self.seg);
        // Payloads durable first: an entry is never visible (to a view in
        // another process) before the bytes it names.
        self.dat.flush()?;
        self.idx
            .write_all_at(&self.idx_buf, self.idx_len)
            .map_err(io(&ip, "appending to the journal index"))?;
        self.idx
            .sync_data()
            .map_err(io(&ip, "syncing the journal index"))?;
        self.idx_len += self.idx_buf.len() as u64;
        self.idx_buf.clear();
        Ok(())
    }

    /// After a commit: a new segment when this one is full, and pruning
    /// (at most once a second).
    pub fn after_commit(&mut self) -> Result<()> {
        if self.dat.end() + self.idx_len >= self.cfg.segment_bytes {
            let h = Header {
                segment: self.seg + 1,
                created_ns: now_ns(),
                base: self.last.max(self.seg_max),
                last_good: self.last_good,
                gap: self.gap,
            };
            write_new_segment(&self.dir, &h)?;
            let w =
                JournalWriter::with_files(&self.dir, self.cfg, h.segment, &h, 0, &self.disk_id)?;
            self.seg = w.seg;
            self.seg_max = w.seg_max;
            self.idx = w.idx;
            self.dat = w.dat;
            self.idx_len = HEADER_LEN as u64;
            self.stats.segment = self.seg;
            log::debug!(
                "disk {:?}: journal segment {} begun at {}",
                self.disk_id,
                self.seg,
                self.last
            );
        }
        if self.last_prune.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            self.last_prune = Some(Instant::now());
            super::prune::prune(&self.dir, &self.cfg, &self.disk_id)?;
        }
        Ok(())
    }
}

/// Create segment `h.segment` with header `h` (the index made durable and
/// the folder synced, so it survives a power cut once this returns).
fn write_new_segment(dir: &Path, h: &Header) -> Result<()> {
    let dp = dat_path(dir, h.segment);
    let dat = File::create(&dp).map_err(io(&dp, "creating a journal segment"))?;
    dat.sync_all()
        .map_err(io(&dp, "syncing a new journal segment"))?;
    let ip = idx_path(dir, h.segment);
    let tmp = dir.join(format!("{:08}.idx.new", h.segment));
    let f = File::create(&tmp).map_err(io(&tmp, "creating a journal index"))?;
    f.write_all_at(&h.encode(), 0)
        .map_err(io(&tmp, "writing a journal header"))?;
    f.sync_all().map_err(io(&tmp, "syncing a journal header"))?;
    std::fs::rename(&tmp, &ip).map_err(io(&ip, "installing a journal index"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the journal folder"))
}

/// Payload files whose index is gone (a prune cut short), and indexes
/// being installed, removed.
fn remove_orphan_payloads(dir: &Path, segs: &[u64]) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(io(dir, "listing the journal"))?;
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = name
            .strip_suffix(".dat")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| !segs.contains(&n));
        if orphan || name.ends_with(".idx.new") {
            let p = ent.path();
            std::fs::remove_file(&p).map_err(io(&p, "removing a leftover journal file"))?;
        }
    }
    Ok(())
}

/// A replica write held until the before-images that undo it are durable.
#[derive(Debug, Clone, Copy)]
struct Held {
    offset: u64,
    len: u64,
    /// Range in `held_data`; None: zeroes.
    data: Option<usize>,
}

/// The replica with its journal: the [`RecordSink`] the sessions apply to.
/// Without a journal (`serve --journal off`) it passes everything straight
/// to the replica.
#[derive(Debug)]
pub struct Journaled {
    replica: ReplicaWriter,
    journal: Option<JournalWriter>,
    held: Vec<Held>,
    held_data: Vec<u8>,
    scratch: Vec<u8>,
    /// A write or flush failed: held writes may be lost, so nothing more
    /// is committed through this sink (the session ends; the shipper
    /// resends from the durable state).
    poisoned: bool,
}

impl Journaled {
    /// `replica`, journaled by `journal` when it is Some.
    pub fn new(replica: ReplicaWriter, journal: Option<JournalWriter>) -> Journaled {
        Journaled {
            replica,
            journal,
            held: Vec::new(),
            held_data: Vec::new(),
            scratch: Vec::new(),
            poisoned: false,
        }
    }

    /// The journal, if on.
    pub fn journal(&self) -> Option<&JournalWriter> {
        self.journal.as_ref()
    }

    fn overlaps_held(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.held
            .iter()
            .any(|h| h.offset < end && offset < h.offset + h.len)
    }

    /// Make the held before-images durable, then let the held writes reach
    /// the replica.
    fn flush_held(&mut self) -> crate::Result<()> {
        if self.poisoned {
            return Err(crate::Error::Invalid(
                "an earlier journal or replica write of this connection failed: nothing more is committed through it".into(),
            ));
        }
        let r = self.try_flush_held();
        self.poisoned |= r.is_err();
        r
    }

    fn try_flush_held(&mut self) -> crate::Result<()> {
        if let Some(j) = &mut self.journal {
            j.flush_entries()?;
        }
        for h in &self.held {
            match h.data {
                Some(start) => {
                    let n = usize::try_from(h.len).unwrap_or(usize::MAX);
                    self.replica
                        .write(h.offset, &self.held_data[start..start + n])?;
                }
                None => self.replica.zero(h.offset, h.len)?,
            }
        }
        self.held.clear();
        self.held_data.clear();
        Ok(())
    }

    fn maybe_flush(&mut self) -> crate::Result<()> {
        if self.held_data.len() >= HELD_BYTES || self.held.len() >= HELD_OPS {
            self.flush_held()?;
        }
        Ok(())
    }

    /// Before-images of `offset..offset+len`, entries for those that are
    /// not what `new` (None: zeroes) puts there. Returns whether anything
    /// changes.
    fn undo(&mut self, offset: u64, len: u64, new: Option<&[u8]>) -> crate::Result<bool> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(true);
        };
        let mut changed = false;
        let mut at = 0u64;
        let mut ext = Vec::new();
        while at < len {
            let n = (len - at).min(PIECE);
            let off = offset + at;
            let nu = usize::try_from(n).unwrap_or(usize::MAX);
            // Whole holes are known zeroes without reading them.
            let hole = n >= 64 << 10 && {
                self.replica
                    .extents(off, u32::try_from(n).unwrap_or(u32::MAX), 2, &mut ext);
                ext.len() == 1 && ext[0].flags & nbd::protocol::STATE_ZERO != 0
            };
            let piece_new = new.map(|d| &d[usize::try_from(at).unwrap_or(0)..][..nu]);
            if hole {
                if piece_new.is_some_and(|d| !is_zero(d)) {
                    j.entry(Kind::UndoZero, 0, off, n, &[])?;
                    changed = true;
                }
            } else {
                self.scratch.resize(nu, 0);
                self.replica.read(off, &mut self.scratch)?;
                let same = match piece_new {
                    Some(d) => d == &self.scratch[..],
                    None => is_zero(&self.scratch),
                };
                if !same {
                    changed = true;
                    if is_zero(&self.scratch) {
                        j.entry(Kind::UndoZero, 0, off, n, &[])?;
                    } else {
                        j.entry(Kind::Undo, 0, off, n, &self.scratch)?;
                    }
                }
            }
            at += n;
        }
        j.noop_if_none()?;
        Ok(changed)
    }
}

/// All zeroes (compared a block at a time: memcmp speed).
fn is_zero(b: &[u8]) -> bool {
    const Z: [u8; 4096] = [0; 4096];
    b.chunks(Z.len()).all(|c| c == &Z[..c.len()])
}

impl Journaled {
    fn write_inner(&mut self, offset: u64, data: &[u8]) -> crate::Result<()> {
        if self.journal.is_none() {
            return self.replica.write(offset, data);
        }
        let len = data.len() as u64;
        if self.overlaps_held(offset, len) {
            self.flush_held()?;
        }
        if !self.undo(offset, len, Some(data))? {
            return Ok(());
        }
        let start = self.held_data.len();
        self.held_data.extend_from_slice(data);
        self.held.push(Held {
            offset,
            len,
            data: Some(start),
        });
        self.maybe_flush()
    }

    fn zero_inner(&mut self, offset: u64, len: u64) -> crate::Result<()> {
        if self.journal.is_none() {
            return self.replica.zero(offset, len);
        }
        if self.overlaps_held(offset, len) {
            self.flush_held()?;
        }
        if !self.undo(offset, len, None)? {
            return Ok(());
        }
        self.held.push(Held {
            offset,
            len,
            data: None,
        });
        self.maybe_flush()
    }
}

impl RecordSink for Journaled {
    fn write(&mut self, offset: u64, data: &[u8]) -> crate::Result<()> {
        let r = self.write_inner(offset, data);
        self.poisoned |= r.is_err();
        r
    }

    fn zero(&mut self, offset: u64, len: u64) -> crate::Result<()> {
        let r = self.zero_inner(offset, len);
        self.poisoned |= r.is_err();
        r
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        if self.overlaps_held(offset, buf.len() as u64) {
            self.flush_held()?;
        }
        self.replica.read(offset, buf)
    }

    fn commit(&mut self) -> crate::Result<()> {
        self.flush_held()?;
        let r = self.replica.sync();
        self.poisoned |= r.is_err();
        r?;
        if let Some(j) = &mut self.journal {
            j.after_commit()?;
        }
        Ok(())
    }

    fn position(&mut self, seq: u64, sync: bool, time_ns: u64, consistent: bool) {
        if let Some(j) = &mut self.journal {
            j.position(seq, sync, time_ns, consistent);
        }
    }

    fn mark(&mut self, name: &[u8], flags: u64) -> crate::Result<()> {
        if let Some(j) = &mut self.journal {
            j.mark(name, flags)?;
        }
        Ok(())
    }

    fn consistency(&mut self, consistent: bool, reason: Reason) {
        if let Some(j) = &mut self.journal {
            j.consistency(consistent, reason);
        }
    }
}
