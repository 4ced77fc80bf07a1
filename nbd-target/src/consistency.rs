//! Whether a replica is a crash-consistent image of its source, and what
//! cures it when it is not: one state machine owning the replica's
//! [`Reason`], its `since_seq` and the full pass's cursor.
//!
//! Every change of the reason goes through an event here; nothing else in
//! the crate assigns one (except `nbd-target seed`, which writes a new
//! state marked [`Reason::Seeded`], and [`Consistency::protection_begins`],
//! the state of a disk's first connection). The rules are those of
//! `docs/target-state.md` (the reasons table, "The commit"):
//!
//! | event | when | what it does |
//! |---|---|---|
//! | [`protection_begins`](Consistency::protection_begins) | the first HELLO for a disk | `needs-initial-sync` when the source held data before its ring, else consistent |
//! | [`ring_identified`](Consistency::ring_identified) | HELLO | an all-zero ring id (a seed) is adopted; another ring id: `ring-replaced`, applied seq 0, cursor 0 |
//! | [`source_went_back`](Consistency::source_went_back) | HELLO whose next seq is at or below the applied seq | records were lost at the source: `source-gap` since the next seq, applied seq = next seq − 1, cursor 0 |
//! | [`source_released`](Consistency::source_released) | HELLO whose tail seq is above applied + 1, on a consistent replica | `missed-records` since the tail seq, cursor 0 |
//! | [`source_needs_verify`](Consistency::source_needs_verify) | HELLO with NEEDS_VERIFY (torn ring tail, unclean reboot), unless a full pass is already asked for | `source-gap` since the applied seq, cursor 0 |
//! | [`source_overflowed`](Consistency::source_overflowed) | HELLO with OVERFLOW, or [`heartbeat`](Consistency::heartbeat) with OVERFLOW, on a consistent replica | `source-overflow` since the applied seq (HELLO) or the highest applied seq (HEARTBEAT) |
//! | [`ring_record`](Consistency::ring_record) | a ring record whose seq jumps past applied + 1 (AFTER_GAP), on a consistent replica | `source-gap` since that seq, cursor 0 |
//! | [`chunk_done`](Consistency::chunk_done) | a full-pass chunk is done (sent, zeroed, found equal) | the cursor moves over it (and over chunks done ahead of it), or it waits in done_ahead |
//! | [`full_pass_ended`](Consistency::full_pass_ended) | SYNC_END(FULL_PASS) | cursor at the end and a full pass asked for: consistent, or `source-overflow` when the source last said OVERFLOW; the cursor back to 0 |
//! | [`dirty_pass_ended`](Consistency::dirty_pass_ended) | any other SYNC_END | `source-overflow` → consistent |
//!
//! [`hello`](Consistency::hello) runs the HELLO's events in the order
//! above. The machine holds the replica's whole recorded
//! [`ReplicaState`] (some transitions move the applied seq and the ring
//! id); the apply pipeline moves the applied seq at a commit
//! ([`Consistency::set_applied_seq`]) and writes [`Consistency::state`] to
//! the state file. Whether anything changed since the last save is
//! [`Consistency::take_changed`].

use std::collections::BTreeMap;

use wire::frame::{
    Hello, HELLO_NEEDS_INITIAL_SYNC, HELLO_NEEDS_VERIFY, HELLO_OVERFLOW, REPLY_COMPARE,
    REPLY_CONSISTENT, REPLY_DIRTY_PENDING, REPLY_FULL_SYNC,
};

use crate::state::{now_ns, Reason, ReplicaState};

/// What a shipper's HELLO says about its source that bears on the
/// replica's consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceHello {
    /// The source ring's id.
    pub ring_id: [u8; 16],
    /// Oldest sequence still in the source's ring.
    pub tail_seq: u64,
    /// Next sequence the source's ring will assign.
    pub next_seq: u64,
    /// HELLO_* flags.
    pub flags: u32,
}

impl From<&Hello> for SourceHello {
    fn from(h: &Hello) -> SourceHello {
        SourceHello {
            ring_id: h.ring_id,
            tail_seq: h.tail_seq,
            next_seq: h.next_seq,
            flags: h.flags,
        }
    }
}

/// The replica's consistency, for one connection of its shipper.
#[derive(Debug, Clone)]
pub struct Consistency {
    st: ReplicaState,
    /// For log messages.
    disk_id: String,
    /// The source's flags (HELLO_*) as last reported.
    source_flags: u32,
    /// Full-pass chunks done beyond the cursor (offset → end), in memory
    /// only: lost when the session ends (the next pass starts at the
    /// durable cursor and does them again).
    done_ahead: BTreeMap<u64, u64>,
    /// The state changed since the last [`Consistency::take_changed`].
    changed: bool,
}

impl Consistency {
    /// The state of a disk's first connection ("protection begins"): a
    /// replica that is consistent, or, when the source held data before
    /// its ring existed (HELLO_NEEDS_INITIAL_SYNC), one that needs the
    /// initial sync.
    pub fn protection_begins(hello: &SourceHello, disk_size: u64) -> ReplicaState {
        ReplicaState {
            applied_seq: 0,
            ring_id: hello.ring_id,
            disk_size,
            reason: if hello.flags & HELLO_NEEDS_INITIAL_SYNC != 0 {
                Reason::NeedsInitialSync
            } else {
                Reason::None
            },
            since_seq: 0,
            updated_ns: now_ns(),
            sync_cursor: 0,
        }
    }

    /// The machine over a replica's recorded state; `source_flags`: what
    /// the source's flags are (the HELLO's).
    pub fn new(st: ReplicaState, disk_id: &str, source_flags: u32) -> Consistency {
        Consistency {
            st,
            disk_id: disk_id.to_string(),
            source_flags,
            done_ahead: BTreeMap::new(),
            changed: false,
        }
    }

    /// The replica's state as it is in memory.
    pub fn state(&self) -> &ReplicaState {
        &self.st
    }

    /// Consistent?
    pub fn consistent(&self) -> bool {
        self.st.consistent()
    }

    /// The reason it is not consistent ([`Reason::None`]: it is).
    pub fn reason(&self) -> Reason {
        self.st.reason
    }

    /// Record the applied sequence (at a commit, or reread from the state
    /// file after a failed one). Not a change of consistency.
    pub fn set_applied_seq(&mut self, seq: u64) {
        self.st.applied_seq = seq;
    }

    /// Did the state change since the last call (and must be saved)?
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether the state changed since the last [`Consistency::take_changed`].
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// The HELLO_REPLY's REPLY_* flags for this state.
    pub fn reply_flags(&self) -> u32 {
        let reason = self.st.reason;
        let mut flags = 0;
        if self.st.consistent() {
            flags |= REPLY_CONSISTENT;
        }
        if reason.needs_full_pass() {
            flags |= REPLY_FULL_SYNC;
        }
        if reason.worth_comparing() {
            flags |= REPLY_COMPARE;
        }
        if reason == Reason::SourceOverflow {
            flags |= REPLY_DIRTY_PENDING;
        }
        flags
    }

    fn become_inconsistent(&mut self, reason: Reason, since_seq: u64, restart_pass: bool) {
        self.st.reason = reason;
        self.st.since_seq = since_seq;
        if restart_pass {
            self.st.sync_cursor = 0;
        }
        self.changed = true;
    }

    /// A HELLO: its events in order (ring id, a source that went back,
    /// released records, NEEDS_VERIFY, OVERFLOW). The source's flags are
    /// the HELLO's from now on.
    pub fn hello(&mut self, h: &SourceHello) {
        self.source_flags = h.flags;
        self.ring_identified(h.ring_id);
        self.source_went_back(h.next_seq);
        self.source_released(h.tail_seq);
        if h.flags & HELLO_NEEDS_VERIFY != 0 {
            self.source_needs_verify();
        }
        if h.flags & HELLO_OVERFLOW != 0 {
            let applied = self.st.applied_seq;
            self.source_overflowed(applied);
        }
    }

    /// The HELLO's ring id: a seed (all-zero ring id) belongs to whichever
    /// ring first ships to it; another ring than the recorded one was
    /// recreated and its sequence numbers start again.
    pub fn ring_identified(&mut self, ring_id: [u8; 16]) {
        if self.st.ring_id == [0; 16] {
            self.st.ring_id = ring_id;
            self.changed = true;
        } else if self.st.ring_id != ring_id {
            log::warn!(
                "disk {:?}: the source's ring was recreated; its sequence numbers start again and the replica needs a full sync",
                self.disk_id
            );
            self.st.ring_id = ring_id;
            self.st.applied_seq = 0;
            let since = self.st.since_seq;
            self.become_inconsistent(Reason::RingReplaced, since, true);
        }
    }

    /// The HELLO's next seq: at or below the applied seq, the source's ring
    /// went back (a power cut lost records it had shipped, and their
    /// sequence numbers are given again): take the new ones, and compare
    /// the whole disk.
    pub fn source_went_back(&mut self, next_seq: u64) {
        if next_seq <= self.st.applied_seq {
            log::warn!(
                "disk {:?}: the source's ring is back at seq {} but the replica applied up to {}: records were lost at the source; a full pass will compare the disk",
                self.disk_id,
                next_seq,
                self.st.applied_seq
            );
            self.st.applied_seq = next_seq.saturating_sub(1);
            self.become_inconsistent(Reason::SourceGap, next_seq, true);
        }
    }

    /// The HELLO's tail seq: above applied + 1 on a consistent replica,
    /// the source released records this replica never received.
    pub fn source_released(&mut self, tail_seq: u64) {
        let applied = self.st.applied_seq;
        if tail_seq > applied + 1 && self.st.consistent() {
            log::warn!(
                "disk {:?}: the source released records {}..{} before this replica received them",
                self.disk_id,
                applied + 1,
                tail_seq
            );
            self.become_inconsistent(Reason::MissedRecords, tail_seq, true);
        }
    }

    /// HELLO_NEEDS_VERIFY: the source lost records (a torn ring tail, an
    /// unclean reboot: crash-dirty); whatever the reason was, unless it
    /// already asks for a full pass, a full pass compares by hashes.
    pub fn source_needs_verify(&mut self) {
        if !self.st.reason.needs_full_pass() {
            log::warn!(
                "disk {:?}: the source lost records (torn ring tail or unclean reboot): a full pass will compare and resend",
                self.disk_id
            );
            let applied = self.st.applied_seq;
            self.become_inconsistent(Reason::SourceGap, applied, true);
        }
    }

    /// HELLO_OVERFLOW at a HELLO, on a consistent replica: changes went
    /// only to the source's dirty bitmap, since `applied`.
    pub fn source_overflowed(&mut self, applied: u64) {
        if self.st.consistent() {
            log::warn!(
                "disk {:?}: the source's ring overflowed: the replica is not consistent until the dirty extents are resent",
                self.disk_id
            );
            self.become_inconsistent(Reason::SourceOverflow, applied, false);
        }
    }

    /// A HEARTBEAT's source flags (they are the source's flags from now
    /// on); `applied`: the highest sequence applied so far. OVERFLOW on a
    /// consistent replica: `source-overflow` since then.
    pub fn heartbeat(&mut self, source_flags: u32, applied: u64) {
        self.source_flags = source_flags;
        if source_flags & HELLO_OVERFLOW != 0 && self.st.consistent() {
            log::warn!(
                "disk {:?}: the source's ring overflowed: changes after seq {} are only in its dirty bitmap; the replica is not consistent until they are resent",
                self.disk_id,
                applied
            );
            self.become_inconsistent(Reason::SourceOverflow, applied, false);
        }
    }

    /// A ring record `seq` is about to be applied while `applied` is the
    /// highest sequence applied: a jump past applied + 1 (AFTER_GAP,
    /// records lost to a torn ring tail) on a consistent replica is a
    /// source gap since `seq`.
    pub fn ring_record(&mut self, seq: u64, applied: u64) {
        if seq > applied + 1 && self.st.consistent() {
            log::warn!(
                "disk {:?}: the source skipped from seq {} to {} (records lost at the source); the replica needs those regions resent",
                self.disk_id,
                applied,
                seq
            );
            self.become_inconsistent(Reason::SourceGap, seq, true);
        }
    }

    /// A full-pass chunk `offset..offset+len` is done (its data or zeroes
    /// applied, or found equal). The cursor moves over chunks done in
    /// order; chunks done ahead of it wait in done_ahead (lost at a
    /// restart: the pass then compares them again).
    pub fn chunk_done(&mut self, offset: u64, len: u32) {
        let st = &mut self.st;
        let end = offset + u64::from(len);
        if offset <= st.sync_cursor && end > st.sync_cursor {
            st.sync_cursor = end;
            while let Some((&o, &e)) = self.done_ahead.first_key_value() {
                if o > st.sync_cursor {
                    break;
                }
                st.sync_cursor = st.sync_cursor.max(e);
                self.done_ahead.pop_first();
            }
            self.changed = true;
        } else if offset > st.sync_cursor {
            self.done_ahead.insert(offset, end);
        }
    }

    /// SYNC_END(FULL_PASS): when the cursor covers the whole disk and the
    /// reason asks for a full pass, the replica is consistent, or
    /// `source-overflow` when the source last said OVERFLOW (changes that
    /// overflowed during the pass still have to come). The cursor goes
    /// back to 0 whatever the outcome.
    pub fn full_pass_ended(&mut self) {
        let overflowed = self.source_flags & HELLO_OVERFLOW != 0;
        let st = &mut self.st;
        if st.sync_cursor >= st.disk_size && st.reason.needs_full_pass() {
            st.reason = if overflowed {
                Reason::SourceOverflow
            } else {
                Reason::None
            };
            log::info!(
                "disk {:?}: full pass complete: {}",
                self.disk_id,
                st.reason.explain()
            );
        } else if !st.reason.needs_full_pass() {
            log::info!("disk {:?}: full pass complete", self.disk_id);
        } else {
            log::warn!(
                "disk {:?}: a full pass ended with only {} of {} bytes covered in order; the next one starts over",
                self.disk_id,
                st.sync_cursor,
                st.disk_size
            );
        }
        st.sync_cursor = 0;
        self.changed = true;
    }

    /// Any other SYNC_END (the dirty pass's): `source-overflow` is cured.
    pub fn dirty_pass_ended(&mut self) {
        if self.st.reason == Reason::SourceOverflow {
            log::info!(
                "disk {:?}: the source's dirty extents were resent: the replica is consistent",
                self.disk_id
            );
            self.st.reason = Reason::None;
            self.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;
    const HALF: u32 = 1 << 19;
    const RING: [u8; 16] = [7; 16];
    const OTHER: [u8; 16] = [9; 16];

    fn st(applied: u64, reason: Reason, since: u64, cursor: u64) -> ReplicaState {
        ReplicaState {
            applied_seq: applied,
            ring_id: RING,
            disk_size: SIZE,
            reason,
            since_seq: since,
            updated_ns: 0,
            sync_cursor: cursor,
        }
    }

    fn hello(ring_id: [u8; 16], tail_seq: u64, next_seq: u64, flags: u32) -> SourceHello {
        SourceHello {
            ring_id,
            tail_seq,
            next_seq,
            flags,
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Hello(SourceHello),
        Heartbeat(u32, u64),
        Ring(u64, u64),
        Chunk(u64, u32),
        FullEnd,
        DirtyEnd,
    }

    fn run(c: &mut Consistency, e: Ev) {
        match e {
            Ev::Hello(h) => c.hello(&h),
            Ev::Heartbeat(f, a) => c.heartbeat(f, a),
            Ev::Ring(s, a) => c.ring_record(s, a),
            Ev::Chunk(o, l) => c.chunk_done(o, l),
            Ev::FullEnd => c.full_pass_ended(),
            Ev::DirtyEnd => c.dirty_pass_ended(),
        }
    }

    /// (what, start, HELLO flags of the session, events, expected
    /// (applied, ring id, reason, since, cursor), changed).
    type Case = (
        &'static str,
        ReplicaState,
        u32,
        Vec<Ev>,
        (u64, [u8; 16], Reason, u64, u64),
        bool,
    );

    #[test]
    fn transitions() {
        use Reason::*;
        let ok = |a| st(a, None, 0, 0);
        let seeded = ReplicaState {
            ring_id: [0; 16],
            ..st(0, Seeded, 0, 0)
        };
        let cases: Vec<Case> = vec![
            (
                "hello, nothing to say",
                ok(10),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, 0))],
                (10, RING, None, 0, 0),
                false,
            ),
            (
                "seed adopted: the first ring's id, still seeded",
                seeded,
                0,
                vec![Ev::Hello(hello(OTHER, 1, 1, 0))],
                (0, OTHER, Seeded, 0, 0),
                true,
            ),
            (
                "ring replaced: applied 0, cursor 0, since left",
                st(10, SourceOverflow, 4, 4096),
                0,
                vec![Ev::Hello(hello(OTHER, 1, 1, 0))],
                (0, OTHER, RingReplaced, 4, 0),
                true,
            ),
            (
                "the source went back: lost records, applied = next - 1",
                ok(10),
                0,
                vec![Ev::Hello(hello(RING, 1, 8, 0))],
                (7, RING, SourceGap, 8, 0),
                true,
            ),
            (
                "the source went back over an inconsistent replica too",
                st(10, NeedsInitialSync, 0, 8192),
                0,
                vec![Ev::Hello(hello(RING, 1, 10, 0))],
                (9, RING, SourceGap, 10, 0),
                true,
            ),
            (
                "missed records: tail beyond applied + 1",
                ok(10),
                0,
                vec![Ev::Hello(hello(RING, 12, 20, 0))],
                (10, RING, MissedRecords, 12, 0),
                true,
            ),
            (
                "tail at applied + 1 is fine",
                ok(10),
                0,
                vec![Ev::Hello(hello(RING, 11, 20, 0))],
                (10, RING, None, 0, 0),
                false,
            ),
            (
                "missed records only on a consistent replica",
                st(10, SourceOverflow, 3, 0),
                0,
                vec![Ev::Hello(hello(RING, 12, 20, 0))],
                (10, RING, SourceOverflow, 3, 0),
                false,
            ),
            (
                "needs verify (crash-dirty): source gap since applied",
                ok(10),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, HELLO_NEEDS_VERIFY))],
                (10, RING, SourceGap, 10, 0),
                true,
            ),
            (
                "needs verify replaces an overflow",
                st(10, SourceOverflow, 3, 0),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, HELLO_NEEDS_VERIFY))],
                (10, RING, SourceGap, 10, 0),
                true,
            ),
            (
                "needs verify keeps a reason that asks for a full pass, and its cursor",
                st(10, Seeded, 0, 4096),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, HELLO_NEEDS_VERIFY))],
                (10, RING, Seeded, 0, 4096),
                false,
            ),
            (
                "overflow at the hello: since applied, cursor kept",
                st(10, None, 0, 4096),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, HELLO_OVERFLOW))],
                (10, RING, SourceOverflow, 10, 4096),
                true,
            ),
            (
                "overflow only on a consistent replica",
                st(10, MissedRecords, 12, 0),
                0,
                vec![Ev::Hello(hello(RING, 5, 11, HELLO_OVERFLOW))],
                (10, RING, MissedRecords, 12, 0),
                false,
            ),
            (
                "ring replaced and overflow: the replacement wins",
                ok(10),
                0,
                vec![Ev::Hello(hello(OTHER, 1, 1, HELLO_OVERFLOW))],
                (0, OTHER, RingReplaced, 0, 0),
                true,
            ),
            (
                "heartbeat overflow: since the highest applied",
                ok(10),
                0,
                vec![Ev::Heartbeat(HELLO_OVERFLOW, 14)],
                (10, RING, SourceOverflow, 14, 0),
                true,
            ),
            (
                "heartbeat without overflow",
                ok(10),
                0,
                vec![Ev::Heartbeat(0, 14)],
                (10, RING, None, 0, 0),
                false,
            ),
            (
                "ring record in order",
                ok(10),
                0,
                vec![Ev::Ring(11, 10)],
                (10, RING, None, 0, 0),
                false,
            ),
            (
                "ring record after a gap: source gap since it",
                st(10, None, 0, 4096),
                0,
                vec![Ev::Ring(15, 10)],
                (10, RING, SourceGap, 15, 0),
                true,
            ),
            (
                "a gap on an inconsistent replica changes nothing",
                st(10, SourceOverflow, 3, 0),
                0,
                vec![Ev::Ring(15, 10)],
                (10, RING, SourceOverflow, 3, 0),
                false,
            ),
            (
                "chunks in order move the cursor",
                st(0, Seeded, 0, 0),
                0,
                vec![Ev::Chunk(0, 4096), Ev::Chunk(4096, 4096)],
                (0, RING, Seeded, 0, 8192),
                true,
            ),
            (
                "a chunk ahead waits, then the cursor moves over it",
                st(0, Seeded, 0, 0),
                0,
                vec![
                    Ev::Chunk(8192, 4096),
                    Ev::Chunk(16384, 4096),
                    Ev::Chunk(0, 8192),
                ],
                (0, RING, Seeded, 0, 12288),
                true,
            ),
            (
                "a chunk behind the cursor changes nothing",
                st(0, Seeded, 0, 8192),
                0,
                vec![Ev::Chunk(0, 4096)],
                (0, RING, Seeded, 0, 8192),
                false,
            ),
            (
                "a chunk ahead alone changes nothing durable",
                st(0, Seeded, 0, 0),
                0,
                vec![Ev::Chunk(4096, 4096)],
                (0, RING, Seeded, 0, 0),
                false,
            ),
            (
                "full pass over the whole disk: consistent",
                st(3, SourceGap, 2, SIZE),
                0,
                vec![Ev::FullEnd],
                (3, RING, None, 2, 0),
                true,
            ),
            (
                "full pass while the source overflowed: source overflow",
                st(3, NeedsInitialSync, 0, SIZE),
                HELLO_OVERFLOW,
                vec![Ev::FullEnd],
                (3, RING, SourceOverflow, 0, 0),
                true,
            ),
            (
                "the heartbeat's flags count at the end of the pass",
                st(3, Seeded, 0, SIZE),
                HELLO_OVERFLOW,
                vec![Ev::Heartbeat(0, 3), Ev::FullEnd],
                (3, RING, None, 0, 0),
                true,
            ),
            (
                "a full pass short of the end: still inconsistent, cursor 0",
                st(3, MissedRecords, 5, SIZE - 4096),
                0,
                vec![Ev::FullEnd],
                (3, RING, MissedRecords, 5, 0),
                true,
            ),
            (
                "a full pass does not cure an overflow",
                st(3, SourceOverflow, 2, SIZE),
                0,
                vec![Ev::FullEnd],
                (3, RING, SourceOverflow, 2, 0),
                true,
            ),
            (
                "the dirty pass cures an overflow",
                st(3, SourceOverflow, 2, 0),
                0,
                vec![Ev::DirtyEnd],
                (3, RING, None, 2, 0),
                true,
            ),
            (
                "the dirty pass cures nothing else",
                st(3, SourceGap, 2, 4096),
                0,
                vec![Ev::DirtyEnd],
                (3, RING, SourceGap, 2, 4096),
                false,
            ),
            (
                "initial sync, then its full pass, then consistent",
                st(0, NeedsInitialSync, 0, 0),
                0,
                vec![
                    Ev::Chunk(0, HALF),
                    Ev::Chunk(u64::from(HALF), HALF),
                    Ev::FullEnd,
                    Ev::Ring(1, 0),
                ],
                (0, RING, None, 0, 0),
                true,
            ),
        ];
        for (what, start, flags, events, want, changed) in cases {
            let mut c = Consistency::new(start, "d", flags);
            for e in events {
                run(&mut c, e);
            }
            let s = c.state();
            assert_eq!(
                (
                    s.applied_seq,
                    s.ring_id,
                    s.reason,
                    s.since_seq,
                    s.sync_cursor
                ),
                want,
                "{what}"
            );
            assert_eq!(c.take_changed(), changed, "{what}: changed");
            assert!(!c.take_changed(), "{what}: taken");
        }
    }

    #[test]
    fn protection_begins() {
        let h = hello(RING, 1, 1, 0);
        let s = Consistency::protection_begins(&h, SIZE);
        assert_eq!(
            (
                s.applied_seq,
                s.ring_id,
                s.disk_size,
                s.reason,
                s.sync_cursor
            ),
            (0, RING, SIZE, Reason::None, 0)
        );
        let h = hello(RING, 1, 1, HELLO_NEEDS_INITIAL_SYNC | HELLO_OVERFLOW);
        let s = Consistency::protection_begins(&h, SIZE);
        assert_eq!(s.reason, Reason::NeedsInitialSync);
    }

    #[test]
    fn reply_flags() {
        let cases = [
            (Reason::None, REPLY_CONSISTENT),
            (Reason::NeedsInitialSync, REPLY_FULL_SYNC),
            (Reason::MissedRecords, REPLY_FULL_SYNC | REPLY_COMPARE),
            (Reason::RingReplaced, REPLY_FULL_SYNC | REPLY_COMPARE),
            (Reason::SourceGap, REPLY_FULL_SYNC | REPLY_COMPARE),
            (Reason::SourceOverflow, REPLY_DIRTY_PENDING),
            (Reason::Seeded, REPLY_FULL_SYNC | REPLY_COMPARE),
        ];
        for (reason, flags) in cases {
            let c = Consistency::new(st(1, reason, 0, 0), "d", 0);
            assert_eq!(c.reply_flags(), flags, "{reason:?}");
        }
    }
}
