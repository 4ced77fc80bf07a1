//! The producer side: the splitter appends every change, in one total order
//! across all its connections; records that do not fit go to the dirty
//! bitmap (or, with [`FullPolicy::Block`], the writer waits for room).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::bitmap::{self, Extent};
use crate::error::{Error, Result};
use crate::file::{wall_clock_ns, CreateOptions, DiskIdentity, RingFile, Role, Scanned};
use crate::format::*;

/// What to do when a record does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Mark the extent in the dirty bitmap and go on (contract 4: writes
    /// never wait on the network).
    Bitmap,
    /// Wait until the consumer releases room.
    Block,
}

/// One change to capture.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// `data` written at `offset`.
    Write {
        /// Disk offset.
        offset: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `len` bytes at `offset` discarded.
    Trim {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `len` bytes at `offset` zeroed.
    Zero {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// A named point in the stream (a recovery point).
    Mark {
        /// The name (at most 4096 bytes).
        name: &'a str,
        /// Application-consistent (taken with the file system frozen or
        /// between application hooks); false: crash-consistent. Stored as
        /// bit 0 ([`crate::format::MARK_APP`]) of the record's offset field.
        app: bool,
    },
}

impl Change<'_> {
    /// The disk extent (offset, length) a change covers; None for a mark.
    pub fn extent(&self) -> Option<(u64, u64)> {
        match *self {
            Change::Write { offset, data } => Some((offset, data.len() as u64)),
            Change::Trim { offset, len } | Change::Zero { offset, len } => {
                Some((offset, u64::from(len)))
            }
            Change::Mark { .. } => None,
        }
    }
}

/// Where a change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Recorded with this sequence number.
    Record(u64),
    /// Did not fit: its extent is marked in the dirty bitmap.
    Overflowed,
}

/// The byte ranges of the ring file a sync must make durable, and the
/// position it makes durable when they all are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Producer position covered when every range is durable.
    pub head: u64,
    /// (file offset, length) ranges; lengths fit `u32`.
    pub ranges: Vec<(u64, u32)>,
    /// Set when the ranges include the dirty bitmap: the marks covered
    /// (producer count, shared count) once they are durable.
    pub marks: Option<(u64, u64)>,
}

struct State {
    head: u64,
    next_seq: u64,
    after_gap: bool,
    /// Start of the bytes not yet covered by a completed sync.
    synced: u64,
    /// Bitmap marks (this producer's count, and the ring's shared count)
    /// covered by the last completed sync of the bitmap.
    marks_synced: (u64, u64),
}

/// The writing side of a ring. One per ring (enforced with a lock); shared
/// by all of the splitter's connections (`&self` methods, internally locked).
pub struct Producer {
    rf: RingFile,
    state: Mutex<State>,
    policy: FullPolicy,
    /// Free in-flight lanes.
    lanes: Mutex<Vec<u64>>,
    /// Bitmap marks this producer made, counted *after* the bits are set
    /// (the ring's shared `dirty_marks` is counted before): a sync plan
    /// that sees this count move includes the bitmap, and covers the bits.
    marks_set: AtomicU64,
    /// Set by [`Producer::interrupt`]: appends no longer wait for room.
    interrupted: AtomicBool,
    /// Test hook: the next appends fail as if the ring file's write did.
    fail_appends: AtomicU64,
}

/// A connection's lane in the in-flight table: `LANE_ENTRIES` entries, one
/// per request slot. Give it back with [`Producer::release_lane`].
#[derive(Debug)]
pub struct Lane(u64);

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("path", &self.rf.path)
            .finish()
    }
}

/// What recovery found when a producer opened an existing ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Records found valid beyond the saved head (written, cursor not saved).
    pub bytes_recovered: u64,
    /// Bytes of a torn tail that were cut off.
    pub bytes_cut: u64,
    /// Sequence numbers were lost with the tail: the next record says so.
    pub gap: bool,
    /// Changes that were in flight at a crash, moved to the dirty bitmap.
    pub inflight_marked: u64,
    /// The producer had not closed cleanly.
    pub unclean: bool,
}

impl Producer {
    /// Open the ring at `path` for `disk`, creating it with `opts` when the
    /// file does not exist. An existing ring is recovered (see
    /// the returned [`Recovery`] for what was found).
    pub fn open_or_create(
        path: &Path,
        opts: &CreateOptions,
        disk: &DiskIdentity,
        policy: FullPolicy,
    ) -> Result<(Producer, Recovery)> {
        let existed = path.exists();
        let rf = if existed {
            let rf = RingFile::open(path)?;
            rf.check_disk(disk)?;
            rf
        } else {
            let rf = RingFile::create(path, opts, disk)?;
            log::info!(
                "created ring {} for disk {}: {} bytes of records, dirty bitmap at {} bytes per bit",
                path.display(),
                crate::uuid_string(&rf.disk_id),
                rf.layout.capacity,
                rf.layout.granularity
            );
            rf
        };
        Producer::take(rf, existed, policy)
    }

    /// Open an existing ring as its producer without the disk it belongs
    /// to: for a process that only appends marks while no splitter serves
    /// the disk (`splitter mark`). The ring is recovered like at any open
    /// (a torn tail cut, what was in flight at a crash moved to the dirty
    /// bitmap); [`Producer::close`] it when done. Fails with
    /// [`Error::Busy`] when another process is the producer.
    pub fn open_existing(path: &Path, policy: FullPolicy) -> Result<(Producer, Recovery)> {
        let rf = RingFile::open(path)?;
        Producer::take(rf, true, policy)
    }

    /// Take the producer role of an opened (or new) ring and recover it.
    fn take(rf: RingFile, existed: bool, policy: FullPolicy) -> Result<(Producer, Recovery)> {
        rf.lock(Role::Producer)?;
        let mut rec = recover(&rf)?;
        if existed {
            after_crash(&rf, &mut rec);
        }
        rf.shm
            .atomic(live::STATE)
            .fetch_and(!STATE_CLEAN, Ordering::AcqRel);
        let [a, b] = boot_id();
        rf.set(live::BOOT_ID, a);
        rf.set(live::BOOT_ID + 8, b);
        let head = rf.get(live::HEAD);
        let next_seq = rf.get(live::NEXT_SEQ);
        let after_gap = rec.gap;
        rf.set(live::PRODUCER_PID, u64::from(std::process::id()));
        make_open_durable(&rf)?;

        let p = Producer {
            state: Mutex::new(State {
                head,
                next_seq,
                after_gap,
                synced: rf.get(live::SYNCED_HEAD).min(head),
                marks_synced: (0, rf.get(live::DIRTY_MARKS)),
            }),
            rf,
            policy,
            lanes: Mutex::new((0..LANES).rev().collect()),
            marks_set: AtomicU64::new(0),
            interrupted: AtomicBool::new(false),
            fail_appends: AtomicU64::new(0),
        };
        Ok((p, rec))
    }

    /// The disk id this ring was created for.
    pub fn disk_id(&self) -> [u8; 16] {
        self.rf.disk_id
    }

    /// Whether a FLUSH may write the ring's ranges back and then fdatasync
    /// `disk` alone (see `RingFile::in_place_with`); Err gives the reason
    /// it may not, and both files must then be synced.
    pub fn flush_shortcut(&self, disk: &std::fs::File) -> std::result::Result<(), String> {
        self.rf.in_place_with(disk)
    }

    /// The ring file's descriptor (for syncing its ranges with io_uring).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.rf.file.as_raw_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the ring inconsistent:
        // the published cursor only moves after a record is complete.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Append one change. Total order: records get consecutive sequence
    /// numbers in the order calls take the internal lock.
    pub fn append(&self, change: Change<'_>) -> Result<Appended> {
        self.append_timed(change).map(|(a, _)| a)
    }

    /// [`Producer::append`], also returning the capture time the record
    /// carries (ns since the Unix epoch; the time of the attempt when the
    /// change overflowed).
    pub fn append_timed(&self, change: Change<'_>) -> Result<(Appended, u64)> {
        let (kind, offset, len, payload): (Kind, u64, u32, &[u8]) = match change {
            Change::Write { offset, data } => {
                let len = u32::try_from(data.len())
                    .map_err(|_| self.invalid("write larger than 4 GiB"))?;
                (Kind::Write, offset, len, data)
            }
            Change::Trim { offset, len } => (Kind::Trim, offset, len, &[]),
            Change::Zero { offset, len } => (Kind::Zero, offset, len, &[]),
            Change::Mark { name, app } => {
                if name.len() > 4096 {
                    return Err(self.invalid("mark names are at most 4096 bytes"));
                }
                // At most 4096, checked above.
                (
                    Kind::Mark,
                    if app { MARK_APP } else { 0 },
                    u32::try_from(name.len()).unwrap_or(0),
                    name.as_bytes(),
                )
            }
        };
        if kind != Kind::Mark
            && (len == 0
                || offset
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > self.rf.layout.disk_size))
        {
            return Err(self.invalid("change outside the disk"));
        }
        let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let need = record_size(payload_len);
        let cap = self.rf.layout.capacity;
        let mut st = self.lock();
        // A record larger than the ring (or than any record may be) can
        // never fit: it goes to the bitmap even in blocking mode.
        let too_big = need > cap || payload_len > MAX_PAYLOAD;
        let pad = loop {
            let off = offset_of(st.head, cap);
            let room = cap - off;
            let pad = if need > room { room } else { 0 };
            let durable_tail = self.rf.get(live::DURABLE_TAIL);
            if !too_big && st.head + pad + need - durable_tail <= cap {
                break pad;
            }
            // An empty ring that still has no room (the record would need
            // the padding too) cannot make room by waiting either.
            let waiting_helps = !too_big && st.head != durable_tail;
            let may_wait = !self.interrupted.load(Ordering::Acquire);
            if self.policy == FullPolicy::Block && waiting_helps && may_wait {
                drop(st);
                std::thread::sleep(Duration::from_micros(500));
                st = self.lock();
                continue;
            }
            drop(st);
            return Ok((self.overflow(kind, offset, len), wall_clock_ns()));
        };
        let time_ns = wall_clock_ns();
        if pad >= RECORD_HEADER_LEN as u64 {
            let h = RecordHeader {
                kind: Kind::Pad,
                flags: 0,
                seq: st.next_seq,
                offset: 0,
                // pad < capacity, and the ring's capacity is far below 4 GiB
                // per record; a PAD's len is the room left, at most `need`.
                len: u32::try_from(pad).unwrap_or(u32::MAX),
                payload_len: 0,
                time_ns,
                crc: 0,
            };
            self.rf.write_at(st.head, &h.encode(&[]));
        }
        let pos = st.head + pad;
        let seq = st.next_seq;
        let h = RecordHeader {
            kind,
            flags: if st.after_gap { FLAG_AFTER_GAP } else { 0 },
            seq,
            offset,
            len: if kind == Kind::Mark { payload_len } else { len },
            payload_len,
            time_ns,
            crc: 0,
        };
        let hb = h.encode(payload);
        // A plain load first: the test hook costs no read-modify-write on
        // the append path when unused.
        let injected = self.fail_appends.load(Ordering::Relaxed) != 0
            && self
                .fail_appends
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        let written = if injected {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.rf.write_record(pos, &hb, payload)
        };
        if let Err(source) = written {
            // Nothing was published; the bytes written are past the head.
            return Err(Error::Io {
                path: self.rf.path.clone(),
                what: "writing a record",
                source,
            });
        }
        st.head = pos + need;
        st.next_seq += 1;
        st.after_gap = false;
        // Publish: the consumer reads HEAD with Acquire and then the bytes.
        // HEAD first: whoever sees NEXT_SEQ = n finds every record below n
        // under HEAD (the resync relies on it to place chunks).
        self.rf.set(live::HEAD, st.head);
        self.rf.set(live::NEXT_SEQ, st.next_seq);
        Ok((Appended::Record(seq), time_ns))
    }

    /// Mark an extent in the bitmap and count it for the next sync plan.
    fn mark(&self, offset: u64, len: u64) {
        bitmap::mark(&self.rf, offset, len);
        self.marks_set.fetch_add(1, Ordering::AcqRel);
    }

    fn overflow(&self, kind: Kind, offset: u64, len: u32) -> Appended {
        if matches!(kind, Kind::Write | Kind::Trim | Kind::Zero) {
            self.mark(offset, u64::from(len));
        }
        if self.rf.get(live::STATE) & STATE_OVERFLOW == 0 {
            let now = wall_clock_ns();
            let _ = self.rf.shm.atomic(live::OVERFLOW_SINCE).compare_exchange(
                0,
                now,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            );
            self.rf.set_bits(live::STATE, STATE_OVERFLOW);
            log::warn!(
                "ring {} is full: changes now go to the dirty bitmap ({} bytes per bit) until the shipper catches up and resyncs them",
                self.rf.path.display(),
                self.rf.layout.granularity
            );
        }
        Appended::Overflowed
    }

    fn invalid(&self, reason: &str) -> Error {
        Error::Invalid {
            path: self.rf.path.clone(),
            reason: reason.into(),
        }
    }

    /// What a sync must cover now: the records appended since the last
    /// completed sync, the in-flight table, the header page (cursors,
    /// state) and, when any bit
    /// was set since the last completed sync, the dirty bitmap (listed
    /// first: a writeback in range order makes the bits durable before the
    /// header that may depend on them).
    pub fn sync_plan(&self) -> SyncPlan {
        // Read before the lock and before the ranges: a mark counted here
        // has its bits set already (counted after setting), so the bitmap
        // sync below covers it.
        let marks = (
            self.marks_set.load(Ordering::Acquire),
            self.rf.get(live::DIRTY_MARKS),
        );
        let st = self.lock();
        let cap = self.rf.layout.capacity;
        let mut ranges = Vec::with_capacity(4);
        let mut from = st.synced.max(st.head.saturating_sub(cap));
        while from < st.head {
            let off = offset_of(from, cap);
            let n = (st.head - from).min(cap - off).min(1 << 30);
            // n <= 1 GiB.
            ranges.push((
                self.rf.layout.data_offset + off,
                u32::try_from(n).unwrap_or(1 << 30),
            ));
            from += n;
        }
        let with_bitmap =
            marks != st.marks_synced || self.rf.get(live::STATE) & STATE_OVERFLOW != 0;
        if with_bitmap {
            let mut at = self.rf.layout.bitmap_offset;
            let end = at + self.rf.layout.bitmap_len;
            let mut bitmap = Vec::new();
            while at < end {
                let n = (end - at).min(1 << 30);
                bitmap.push((at, u32::try_from(n).unwrap_or(1 << 30)));
                at += n;
            }
            ranges.splice(0..0, bitmap);
        }
        // The in-flight table: the lanes' marks and clears since the last
        // sync (recovery reads it after a crash). Only its dirty pages are
        // written.
        let inflight_len = self.rf.layout.inflight_entries * INFLIGHT_ENTRY_LEN;
        ranges.push((
            self.rf.layout.inflight_offset,
            // LANES * LANE_ENTRIES * 16 = 512 KiB.
            u32::try_from(inflight_len).unwrap_or(u32::MAX),
        ));
        ranges.push((0, 4096));
        SyncPlan {
            head: st.head,
            ranges,
            marks: with_bitmap.then_some(marks),
        }
    }

    /// Every range of `plan` is durable: records before `plan.head` survive
    /// a power cut, and recovery may treat damage before it as corruption.
    pub fn synced(&self, plan: &SyncPlan) {
        let mut st = self.lock();
        if let Some((own, shared)) = plan.marks {
            st.marks_synced.0 = st.marks_synced.0.max(own);
            st.marks_synced.1 = st.marks_synced.1.max(shared);
        }
        if plan.head > st.synced {
            st.synced = plan.head;
            self.rf
                .shm
                .atomic(live::SYNCED_HEAD)
                .fetch_max(plan.head, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Make everything appended so far durable, synchronously (msync).
    pub fn sync(&self) -> Result<()> {
        let plan = self.sync_plan();
        for &(off, len) in &plan.ranges {
            let off = usize::try_from(off).unwrap_or(usize::MAX);
            self.rf
                .shm
                .sync(off, len as usize)
                .map_err(|source| Error::Io {
                    path: self.rf.path.clone(),
                    what: "syncing",
                    source,
                })?;
        }
        self.synced(&plan);
        Ok(())
    }

    /// Take a lane of the in-flight table for one connection; None when all
    /// are taken (that connection's crash window is then not covered).
    pub fn take_lane(&self) -> Option<Lane> {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .map(Lane)
    }

    /// Give a lane back; every entry must be clear.
    pub fn release_lane(&self, lane: Lane) {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(lane.0);
    }

    /// Mark request `slot` of `lane` as about to change `offset..offset+len`
    /// on the disk. Call before the disk is touched.
    pub fn begin(&self, lane: &Lane, slot: u64, offset: u64, len: u64) {
        let (o, l) = self
            .rf
            .inflight_entry(lane.0 * LANE_ENTRIES + slot.min(LANE_ENTRIES - 1));
        o.store(offset, std::sync::atomic::Ordering::Relaxed);
        l.store(len.max(1), std::sync::atomic::Ordering::Release);
    }

    /// The change of `slot` is in the ring (or failed): clear its entry.
    pub fn end(&self, lane: &Lane, slot: u64) {
        let (_, l) = self
            .rf
            .inflight_entry(lane.0 * LANE_ENTRIES + slot.min(LANE_ENTRIES - 1));
        l.store(0, std::sync::atomic::Ordering::Release);
    }

    /// Close cleanly: sync everything and record that nothing was in flight.
    /// Call once every front end has stopped. A change still marked in the
    /// in-flight table (a front end that did not end it) may be on the disk
    /// without being in the ring: its extent goes to the dirty bitmap, which
    /// is made durable before CLEAN is written.
    pub fn close(&self) -> Result<()> {
        let left = move_inflight_to_bitmap(&self.rf);
        if left > 0 {
            self.marks_set.fetch_add(left, Ordering::AcqRel);
            log::warn!(
                "ring {}: {left} change(s) were still marked in flight at close; their extents are now in the dirty bitmap for resync",
                self.rf.path.display()
            );
        }
        self.sync()?;
        let io = |what| {
            let path = self.rf.path.clone();
            move |source| Error::Io { path, what, source }
        };
        self.rf
            .sync_inflight()
            .map_err(io("syncing the in-flight table at close"))?;
        self.rf.set_bits(live::STATE, STATE_CLEAN);
        self.rf
            .sync_header()
            .map_err(io("syncing the header at close"))
    }

    /// Stop waiting for room: appends that wait (`--ring-full block`) and
    /// those that would, put their extents in the dirty bitmap instead.
    /// Called when the front ends shut down, so a dead shipper cannot keep
    /// the splitter from stopping.
    pub fn interrupt(&self) {
        if !self.interrupted.swap(true, Ordering::AcqRel) && self.policy == FullPolicy::Block {
            log::info!(
                "ring {}: stopping; writes waiting for room in the ring go to the dirty bitmap",
                self.rf.path.display()
            );
        }
    }

    /// Test hook (fault injection): the next `n` appends fail as if writing
    /// the record into the ring file had failed with EIO.
    #[doc(hidden)]
    pub fn fail_next_appends(&self, n: u64) {
        self.fail_appends.store(n, Ordering::Release);
    }

    /// Mark an extent dirty for resync (a change that failed half-way on
    /// the disk, or reached the disk but not the ring). The next sync plan
    /// includes the bitmap.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        self.mark(offset, len);
        self.rf.set_bits(live::STATE, STATE_CRASH_DIRTY);
    }

    /// The dirty extents (overflowed changes not yet resynced).
    pub fn dirty_extents(&self) -> Vec<Extent> {
        bitmap::extents(&self.rf)
    }
}

/// This boot's id (/proc/sys/kernel/random/boot_id), as two u64.
fn boot_id() -> [u64; 2] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    let half = |r: std::ops::Range<usize>| {
        hex.get(r)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
    };
    [half(0..16), half(16..32)]
}

/// After an unclean stop: changes that were in flight may be on the disk
/// without being in the ring; their extents go to the dirty bitmap. After a
/// reboot the in-flight table itself may be stale: the replica must be
/// verified.
fn after_crash(rf: &RingFile, rec: &mut Recovery) {
    if rf.get(live::STATE) & STATE_CLEAN != 0 {
        return;
    }
    rec.unclean = true;
    let marked = move_inflight_to_bitmap(rf);
    rec.inflight_marked = marked;
    if marked > 0 {
        log::warn!(
            "ring {}: the last producer stopped with {marked} change(s) in flight; their extents are now in the dirty bitmap for resync",
            rf.path.display()
        );
    }
    let [a, b] = boot_id();
    let same_boot = rf.get(live::BOOT_ID) == a && rf.get(live::BOOT_ID + 8) == b;
    if !same_boot {
        rf.set_bits(live::STATE, STATE_NEEDS_VERIFY);
        log::warn!(
            "ring {}: the machine restarted without a clean stop of the splitter; changes not flushed before may be missing from the ring: the replica must be verified against the disk",
            rf.path.display()
        );
    } else {
        log::info!(
            "ring {}: recovering after an unclean stop of the last producer",
            rf.path.display()
        );
    }
}

/// Move every extent still marked in the in-flight table to the dirty
/// bitmap and clear its entry; returns how many there were (and sets
/// CRASH_DIRTY when any).
fn move_inflight_to_bitmap(rf: &RingFile) -> u64 {
    let mut marked = 0;
    for i in 0..rf.layout.inflight_entries {
        let (o, l) = rf.inflight_entry(i);
        let len = l.load(Ordering::Acquire);
        if len != 0 {
            bitmap::mark(rf, o.load(Ordering::Acquire), len);
            l.store(0, Ordering::Release);
            marked += 1;
        }
    }
    if marked > 0 {
        rf.set_bits(live::STATE, STATE_CRASH_DIRTY);
    }
    marked
}

/// Before the first change is served, make the state recovery read after a
/// power cut match the one this producer runs in: the bits recovery just
/// set (bitmap, first), then the cleared in-flight entries, then the
/// header (CLEAN cleared, this boot's id, the recovered head and next
/// sequence). Without it a power cut finds the previous run's CLEAN and
/// trusts a stale in-flight table and sequence.
fn make_open_durable(rf: &RingFile) -> Result<()> {
    let io = |what| {
        let path = rf.path.clone();
        move |source| Error::Io { path, what, source }
    };
    rf.sync_bitmap()
        .map_err(io("syncing the dirty bitmap at open"))?;
    rf.sync_inflight()
        .map_err(io("syncing the in-flight table at open"))?;
    rf.sync_header().map_err(io("syncing the header at open"))
}

/// Find the true end of the records after the header's cursors may have gone
/// stale (crash, power cut): scan from the consumer's tail, validating each
/// record's checksum and the sequence continuity.
fn recover(rf: &RingFile) -> Result<Recovery> {
    let cap = rf.layout.capacity;
    let tail = rf.get(live::TAIL);
    let tail_seq = rf.get(live::TAIL_SEQ);
    let saved_head = rf.get(live::HEAD);
    let saved_next = rf.get(live::NEXT_SEQ);
    let synced = rf.get(live::SYNCED_HEAD);
    if rf.get(live::DURABLE_TAIL) > tail || tail_seq == 0 {
        return Err(Error::NotARing {
            path: rf.path.clone(),
            reason: "inconsistent cursors in the header".into(),
        });
    }
    let mut pos = tail;
    let mut end = tail;
    let mut expect = tail_seq;
    let mut payload = Vec::new();
    let mut why_stopped = String::new();
    while pos - tail < cap {
        match rf.read_record(pos, expect, &mut payload, 0) {
            Scanned::Record(h, size) => {
                pos += size;
                end = pos;
                expect = h.seq + 1;
            }
            Scanned::Skip(size) => pos += size,
            Scanned::Invalid(why) => {
                why_stopped = why;
                break;
            }
        }
    }
    if end < synced {
        return Err(Error::Corrupt {
            path: rf.path.clone(),
            file_offset: rf.file_offset(end),
            expected_seq: expect,
            reason: why_stopped,
        });
    }
    let mut rec = Recovery::default();
    if end < saved_head {
        rec.bytes_cut = saved_head - end;
        let lost = saved_next.saturating_sub(expect);
        log::warn!(
            "ring {}: cut a torn tail of {} bytes ({} records after seq {}) at file offset {}: {}; the replica must be verified against the disk",
            rf.path.display(),
            rec.bytes_cut,
            lost,
            expect.saturating_sub(1),
            rf.file_offset(end),
            why_stopped
        );
        rf.set_bits(live::STATE, STATE_NEEDS_VERIFY);
        rf.shm
            .atomic(live::RECORDS_LOST)
            .fetch_add(lost, std::sync::atomic::Ordering::AcqRel);
    } else if end > saved_head {
        rec.bytes_recovered = end - saved_head;
        log::info!(
            "ring {}: found {} bytes of complete records beyond the saved head",
            rf.path.display(),
            rec.bytes_recovered
        );
    }
    rec.gap = saved_next > expect;
    rf.set(live::HEAD, end);
    rf.set(live::NEXT_SEQ, expect.max(saved_next));
    Ok(rec)
}
