//! A ring file: creating it, opening and validating its header, its live
//! cursors, role locks, and reading records out of its data area.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::format::*;
use crate::shm::{self as sys, Shm};

/// How long taking a role's lock waits while someone else holds it. A
/// process killed a moment ago can still hold it: its io_uring workers keep
/// its memory, and so the ring's mapping and open file, alive until the
/// kernel has finished their requests (a restart right after a crash).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The disk a ring belongs to, as the splitter sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]

pub struct DiskIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Stable fingerprint: (st_dev, st_ino) of a file, (st_rdev, 0) of a block device.
    pub fingerprint: [u64; 2],
    /// Path, for messages.
    pub path: String,
}

/// The shape of a ring, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Data area bytes.
    pub capacity: u64,
    /// File offset of the data area.
    pub data_offset: u64,
    /// File offset of the dirty bitmap.
    pub bitmap_offset: u64,
    /// Bitmap bytes.
    pub bitmap_len: u64,
    /// Disk bytes per bitmap bit.
    pub granularity: u64,
    /// Size of the disk.
    pub disk_size: u64,
    /// File offset of the in-flight table.
    pub inflight_offset: u64,
    /// Entries in the in-flight table.
    pub inflight_entries: u64,
}

/// Options for a new ring.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Data area size in bytes (rounded up to 4 KiB; at least 64 KiB).
    pub capacity: u64,
    /// Disk bytes per dirty-bitmap bit (a power of two, at least 4 KiB).
    pub granularity: u64,
    /// The disk already holds data (a replica needs an initial copy).
    pub disk_holds_data: bool,
}

/// One role lock byte per role (OFD locks: per open file, across processes).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Producer = 0,
    Consumer = 1,
}

pub(crate) struct RingFile {
    pub file: File,
    pub path: PathBuf,
    pub shm: Shm,
    pub layout: Layout,
    pub disk_id: [u8; 16],
    pub fingerprint: [u64; 2],
    pub disk_path: String,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Current wall-clock time in ns since the Unix epoch.
pub fn wall_clock_ns() -> u64 {
    now_ns()
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if !sys::getrandom(&mut id) {
        // Fall back to time and pid: unique enough for a disk id.
        id[..8].copy_from_slice(&now_ns().to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id[6] = (id[6] & 0x0f) | 0x40; // UUID version 4
    id[8] = (id[8] & 0x3f) | 0x80; // RFC 4122 variant
    id
}

/// Format a 16-byte id as a UUID string.
pub fn uuid_string(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// `FALLOC_FL_WRITE_ZEROES` (Linux 6.17): zero a range and leave it allocated
/// as written blocks.
const FALLOC_FL_WRITE_ZEROES: libc::c_int = 0x80;

/// Turn the preallocated (unwritten) blocks into written zeroes, so writes
/// through the mapping later never convert extents (which costs a journal
/// transaction per page fault on ext4 and stalls the writer). Uses
/// `FALLOC_FL_WRITE_ZEROES` where the kernel has it, else writes zeroes.
fn write_zeroes(file: &File, total: u64) -> io::Result<()> {
    if sys::fallocate(file, FALLOC_FL_WRITE_ZEROES, total).is_ok() {
        return Ok(());
    }
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < total {
        // At most 1 MiB.
        let n = usize::try_from(total - at)
            .unwrap_or(zeroes.len())
            .min(zeroes.len());
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

impl RingFile {
    /// Create a new ring file for `disk` (fails if the file exists).
    pub fn create(path: &Path, opts: &CreateOptions, disk: &DiskIdentity) -> Result<RingFile> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if !opts.granularity.is_power_of_two() || opts.granularity < PAGE {
            return Err(invalid(format!(
                "bitmap granularity {} must be a power of two of at least 4096",
                opts.granularity
            )));
        }
        let capacity = opts.capacity.max(MIN_CAPACITY).div_ceil(PAGE) * PAGE;
        let bits = disk.size.div_ceil(opts.granularity);
        let bitmap_len = bits.div_ceil(8).div_ceil(PAGE).max(1) * PAGE;
        let layout = Layout {
            capacity,
            data_offset: HEADER_LEN,
            bitmap_offset: HEADER_LEN + capacity,
            bitmap_len,
            granularity: opts.granularity,
            disk_size: disk.size,
            inflight_offset: HEADER_LEN + capacity + bitmap_len,
            inflight_entries: LANES * LANE_ENTRIES,
        };
        let total = layout.inflight_offset + layout.inflight_entries * INFLIGHT_ENTRY_LEN;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "creating"))?;
        // Allocate every block now: a ring must never hit ENOSPC while
        // capturing, and writes through the mapping must not allocate.
        if let Err(e) = sys::fallocate(&file, 0, total) {
            let _ = std::fs::remove_file(path);
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(io_err(
                    path,
                    "allocating (is there room for the whole ring?)",
                )(e));
            }
            return Err(io_err(
                path,
                "allocating: the file system cannot preallocate; put the ring elsewhere",
            )(e));
        }
        if let Err(e) = write_zeroes(&file, total) {
            let _ = std::fs::remove_file(path);
            return Err(io_err(path, "writing the ring's blocks")(e));
        }
        let disk_id = random_id();
        let mut h = vec![0u8; hdr::STATIC_LEN];
        h[hdr::MAGIC..hdr::MAGIC + 8].copy_from_slice(&FILE_MAGIC);
        h[hdr::VERSION..hdr::VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        h[hdr::HEADER_LEN..hdr::HEADER_LEN + 4].copy_from_slice(&8192u32.to_le_bytes());
        for (at, v) in [
            (hdr::CAPACITY, capacity),
            (hdr::DATA_OFFSET, layout.data_offset),
            (hdr::BITMAP_OFFSET, layout.bitmap_offset),
            (hdr::BITMAP_LEN, bitmap_len),
            (hdr::DISK_SIZE, disk.size),
            (hdr::FINGERPRINT_A, disk.fingerprint[0]),
            (hdr::FINGERPRINT_B, disk.fingerprint[1]),
            (hdr::CREATED, now_ns()),
            (hdr::INFLIGHT_OFFSET, layout.inflight_offset),
            (hdr::INFLIGHT_ENTRIES, layout.inflight_entries),
        ] {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let gran =
            u32::try_from(opts.granularity).map_err(|_| invalid("granularity too large".into()))?;
        h[hdr::GRANULARITY..hdr::GRANULARITY + 4].copy_from_slice(&gran.to_le_bytes());
        h[hdr::DISK_ID..hdr::DISK_ID + 16].copy_from_slice(&disk_id);
        let p = disk.path.as_bytes();
        let n = p.len().min(hdr::DISK_PATH_LEN);
        h[hdr::DISK_PATH..hdr::DISK_PATH + n].copy_from_slice(&p[..n]);
        let crc = crc32c::crc32c(&h[..hdr::STATIC_CRC]);
        h[hdr::STATIC_CRC..hdr::STATIC_CRC + 4].copy_from_slice(&crc.to_le_bytes());

        let shm = Shm::map(&file, total).map_err(io_err(path, "mapping"))?;
        shm.write(0, &h);
        let rf = RingFile {
            file,
            path: path.to_path_buf(),
            shm,
            layout,
            disk_id,
            fingerprint: disk.fingerprint,
            disk_path: disk.path.clone(),
        };
        rf.set(live::NEXT_SEQ, 1);
        rf.set(live::TAIL_SEQ, 1);
        if opts.disk_holds_data {
            rf.set(live::STATE, STATE_NEEDS_INITIAL_SYNC);
        }
        rf.shm
            .sync(0, usize::try_from(HEADER_LEN).unwrap_or(8192))
            .map_err(io_err(path, "writing the header"))?;
        rf.file.sync_all().map_err(io_err(path, "syncing"))?;
        Ok(rf)
    }

    /// Open and validate an existing ring file.
    pub fn open(path: &Path) -> Result<RingFile> {
        let bad = |reason: String| Error::NotARing {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        let file_len = file
            .metadata()
            .map_err(io_err(path, "reading metadata"))?
            .len();
        if file_len < HEADER_LEN {
            return Err(bad(format!(
                "only {file_len} bytes long: not a blockship ring"
            )));
        }
        let mut h = vec![0u8; hdr::STATIC_LEN];
        {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut h, 0)
                .map_err(io_err(path, "reading the header"))?;
        }
        if h[..8] != FILE_MAGIC {
            return Err(bad("bad magic: not a blockship ring".into()));
        }
        let version = u32_le(&h, hdr::VERSION);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {VERSION}"
            )));
        }
        if crc32c::crc32c(&h[..hdr::STATIC_CRC]) != u32_le(&h, hdr::STATIC_CRC) {
            return Err(bad("header checksum mismatch: the header is damaged".into()));
        }
        let layout = Layout {
            capacity: u64_le(&h, hdr::CAPACITY),
            data_offset: u64_le(&h, hdr::DATA_OFFSET),
            bitmap_offset: u64_le(&h, hdr::BITMAP_OFFSET),
            bitmap_len: u64_le(&h, hdr::BITMAP_LEN),
            granularity: u64::from(u32_le(&h, hdr::GRANULARITY)),
            disk_size: u64_le(&h, hdr::DISK_SIZE),
            inflight_offset: u64_le(&h, hdr::INFLIGHT_OFFSET),
            inflight_entries: u64_le(&h, hdr::INFLIGHT_ENTRIES),
        };
        let inflight_end = layout
            .inflight_entries
            .checked_mul(INFLIGHT_ENTRY_LEN)
            .and_then(|n| n.checked_add(layout.inflight_offset));
        // The in-flight table is the last part of the file: a file shorter
        // than the layout it claims (truncated, or copied short) would be
        // mapped past its end, and touching that part of the mapping kills
        // the process with SIGBUS. Check every part against the length now.
        let inflight_ok = layout.inflight_entries == LANES * LANE_ENTRIES
            && layout.bitmap_len.checked_add(layout.bitmap_offset) == Some(layout.inflight_offset)
            && inflight_end.is_some_and(|e| e <= file_len);
        if !inflight_ok {
            return Err(bad(format!(
                "the file is {file_len} bytes but its header describes {} bytes (in-flight table of {} entries at {}): the ring file was truncated or damaged; move it away and start the splitter with a new --ring (the replica is then resynchronised)",
                inflight_end.map_or_else(|| "more than 2^64".to_string(), |e| e.to_string()),
                layout.inflight_entries,
                layout.inflight_offset
            )));
        }
        let sane = layout.capacity >= MIN_CAPACITY
            && layout.capacity.is_multiple_of(PAGE)
            && layout.data_offset == HEADER_LEN
            && layout.bitmap_offset == HEADER_LEN + layout.capacity
            && layout.granularity.is_power_of_two()
            && layout.bitmap_len * 8 >= layout.disk_size.div_ceil(layout.granularity.max(1))
            && layout
                .bitmap_offset
                .checked_add(layout.bitmap_len)
                .is_some_and(|e| e <= file_len);
        if !sane {
            return Err(bad(format!(
                "inconsistent layout {layout:?} for a file of {file_len} bytes"
            )));
        }
        let mut disk_id = [0u8; 16];
        disk_id.copy_from_slice(&h[hdr::DISK_ID..hdr::DISK_ID + 16]);
        let raw_path = &h[hdr::DISK_PATH..hdr::DISK_PATH + hdr::DISK_PATH_LEN];
        let end = raw_path
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_path.len());
        let disk_path = String::from_utf8_lossy(&raw_path[..end]).into_owned();
        // Checked above: the whole layout lies inside the file.
        let total = inflight_end.unwrap_or(file_len);
        let shm = Shm::map(&file, total).map_err(io_err(path, "mapping"))?;
        Ok(RingFile {
            file,
            path: path.to_path_buf(),
            shm,
            layout,
            disk_id,
            fingerprint: [
                u64_le(&h, hdr::FINGERPRINT_A),
                u64_le(&h, hdr::FINGERPRINT_B),
            ],
            disk_path,
        })
    }

    /// Refuse a disk that is not the one this ring was made for.
    pub fn check_disk(&self, disk: &DiskIdentity) -> Result<()> {
        let ring_disk = format!(
            "disk {} ({}, {} bytes)",
            uuid_string(&self.disk_id),
            self.disk_path,
            self.layout.disk_size
        );
        if disk.size != self.layout.disk_size {
            return Err(Error::WrongDisk {
                path: self.path.clone(),
                ring_disk,
                given: format!("{} of {} bytes", disk.path, disk.size),
                advice: "the disk's size changed; a ring cannot follow a resize: create a new ring (a new --ring path) and resynchronise the replica",
            });
        }
        if disk.fingerprint != self.fingerprint {
            return Err(Error::WrongDisk {
                path: self.path.clone(),
                ring_disk,
                given: disk.path.clone(),
                advice: "give the disk this ring was made for, or a new --ring path for this disk",
            });
        }
        Ok(())
    }

    /// Take the lock of `role`, or fail with `Busy` once it has been held
    /// by someone else for [`LOCK_WAIT`].
    pub fn lock(&self, role: Role) -> Result<()> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let e = loop {
            match sys::lock_byte(&self.file, role as u64) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => break e,
            }
        };
        if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            return Err(Error::Busy {
                path: self.path.clone(),
                role: match role {
                    Role::Producer => "producer",
                    Role::Consumer => "consumer",
                },
            });
        }
        Err(io_err(&self.path, "locking")(e))
    }

    /// Load a live header field (Acquire).
    pub fn get(&self, field: usize) -> u64 {
        self.shm.atomic(field).load(Ordering::Acquire)
    }

    /// Store a live header field (Release).
    pub fn set(&self, field: usize, v: u64) {
        self.shm.atomic(field).store(v, Ordering::Release);
    }

    /// Set bits in a live header field.
    pub fn set_bits(&self, field: usize, bits: u64) {
        self.shm.atomic(field).fetch_or(bits, Ordering::AcqRel);
    }

    /// File offset of a data-area position.
    pub fn file_offset(&self, pos: u64) -> u64 {
        self.layout.data_offset + offset_of(pos, self.layout.capacity)
    }

    fn map_offset(&self, pos: u64) -> usize {
        // The mapping covers the whole file, whose length fits usize (mapped).
        usize::try_from(self.file_offset(pos)).unwrap_or(usize::MAX)
    }

    /// Write raw bytes at a data-area position (must not cross the end).
    pub fn write_at(&self, pos: u64, bytes: &[u8]) {
        self.shm.write(self.map_offset(pos), bytes);
    }

    /// Write a record (header, then payload) at a data-area position with
    /// one `pwritev` into the file's page cache, which the mapping shares.
    /// Cheaper than copying through the mapping for large payloads: no
    /// write fault per page.
    pub fn write_record(&self, pos: u64, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut at = self.file_offset(pos);
        let mut bufs = [io::IoSlice::new(header), io::IoSlice::new(payload)];
        let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
        while !slices.is_empty() {
            let n = sys::pwritev(&self.file, slices, at)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            at += n as u64;
            io::IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }

    /// The sequence of the record at `pos` from its header alone (no
    /// payload copy, no checksum): `Err(size)` for padding to skip, `Ok(None)`
    /// for bytes that are not a record header.
    pub fn peek_seq(&self, pos: u64) -> std::result::Result<Option<u64>, u64> {
        let cap = self.layout.capacity;
        let room = cap - offset_of(pos, cap);
        if room < RECORD_HEADER_LEN as u64 {
            return Err(room);
        }
        let mut raw = [0u8; RECORD_HEADER_LEN];
        self.shm.read(self.map_offset(pos), &mut raw);
        match RecordHeader::decode(&raw) {
            Some(h) if h.kind == Kind::Pad => Err(h.size().min(room).max(RECORD_ALIGN)),
            Some(h) => Ok(Some(h.seq)),
            None => Ok(None),
        }
    }

    /// Read the record at `pos`, expecting sequence `expect`; its payload is
    /// copied to `buf[at..at + payload_len]` (`buf` grows when too short;
    /// bytes already there are overwritten, not zeroed first). See [`Scanned`].
    pub fn read_record(&self, pos: u64, expect: u64, buf: &mut Vec<u8>, at: usize) -> Scanned {
        let cap = self.layout.capacity;
        let off = offset_of(pos, cap);
        let room = cap - off;
        if room < RECORD_HEADER_LEN as u64 {
            return Scanned::Skip(room);
        }
        let mut raw = [0u8; RECORD_HEADER_LEN];
        self.shm.read(self.map_offset(pos), &mut raw);
        let Some(h) = RecordHeader::decode(&raw) else {
            return Scanned::Invalid("bad record magic or kind".into());
        };
        let seq_ok = h.seq == expect || (h.flags & FLAG_AFTER_GAP != 0 && h.seq > expect);
        if !seq_ok {
            return Scanned::Invalid(format!("sequence {} where {expect} was expected", h.seq));
        }
        if h.flags & !FLAG_AFTER_GAP != 0 {
            return Scanned::Invalid(format!("unknown record flags {:#x}", h.flags));
        }
        let shape_ok = h.payload_len <= MAX_PAYLOAD
            && match h.kind {
                Kind::Write => h.payload_len == h.len && h.len > 0,
                Kind::Trim | Kind::Zero => h.payload_len == 0 && h.len > 0,
                Kind::Mark => h.payload_len <= 4096,
                Kind::Pad => h.payload_len == 0 && u64::from(h.len) == room,
            };
        if !shape_ok {
            return Scanned::Invalid(format!("inconsistent {} record lengths", h.kind.name()));
        }
        if matches!(h.kind, Kind::Write | Kind::Trim | Kind::Zero)
            && h.offset
                .checked_add(u64::from(h.len))
                .is_none_or(|e| e > self.layout.disk_size)
        {
            return Scanned::Invalid("extent beyond the end of the disk".into());
        }
        let size = h.size();
        if size > room {
            return Scanned::Invalid("record runs past the end of the data area".into());
        }
        let start = at;
        let end = start + h.payload_len as usize;
        if end > buf.len() {
            buf.resize(end, 0);
        }
        if h.payload_len > 0 {
            self.shm.read(
                self.map_offset(pos + RECORD_HEADER_LEN as u64),
                &mut buf[start..end],
            );
        }
        if !RecordHeader::checksum_ok(&raw, &buf[start..end]) {
            return Scanned::Invalid("checksum mismatch".into());
        }
        if h.kind == Kind::Pad {
            Scanned::Skip(size)
        } else {
            Scanned::Record(h, size)
        }
    }

    /// The (offset, length) atomics of in-flight entry `i`.
    pub fn inflight_entry(
        &self,
        i: u64,
    ) -> (&std::sync::atomic::AtomicU64, &std::sync::atomic::AtomicU64) {
        // inflight_entries == LANES * LANE_ENTRIES > 0 (checked at open).
        let at = self.layout.inflight_offset
            + i.min(self.layout.inflight_entries.saturating_sub(1)) * INFLIGHT_ENTRY_LEN;
        // Inside the mapped file (validated at open).
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        (self.shm.atomic(at), self.shm.atomic(at + 8))
    }

    /// Msync the header page.
    pub fn sync_header(&self) -> io::Result<()> {
        self.shm.sync(0, 4096)
    }

    /// Whether writing the ring file's ranges back (`sync_file_range`) and
    /// then fdatasyncing `disk` makes the ring durable too (the FLUSH
    /// shortcut: one device cache flush for both). True only when both
    /// files are on one file system that overwrites allocated blocks in
    /// place (ext2/3/4, XFS) and no block of the ring is shared (a reflink
    /// copy) or unwritten: a copy-on-write write allocates, and the new
    /// allocation is durable only with an fsync of the ring itself. Returns
    /// the reason when not.
    pub fn in_place_with(&self, disk: &File) -> std::result::Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        const EXT4: u64 = 0xEF53;
        const XFS: u64 = 0x5846_5342;
        const BTRFS: u64 = 0x9123_683E;
        const SHARED: u32 = 0x2000;
        const UNWRITTEN: u32 = 0x800;
        const NOT_ON_DISK: u32 = 0x2 | 0x4; // UNKNOWN | DELALLOC
        let (Ok(dm), Ok(rm)) = (disk.metadata(), self.file.metadata()) else {
            return Err("cannot stat the disk or the ring".into());
        };
        if !dm.file_type().is_file() {
            return Err("the disk is not a regular file".into());
        }
        if dm.dev() != rm.dev() {
            return Err("the ring is on another file system than the disk".into());
        }
        match sys::fs_magic(&self.file) {
            Ok(EXT4 | XFS) => {}
            Ok(BTRFS) => return Err("btrfs writes copy-on-write".into()),
            Ok(m) => {
                return Err(format!(
                    "file system type {m:#x} is not known to overwrite in place"
                ))
            }
            Err(e) => return Err(format!("statfs failed: {e}")),
        }
        match sys::fiemap_flags(&self.file, rm.len()) {
            Ok(f) if f & SHARED != 0 => Err("blocks of the ring are shared (a reflinked copy): writes to them are copy-on-write".into()),
            Ok(f) if f & (UNWRITTEN | NOT_ON_DISK) != 0 => Err("blocks of the ring are unwritten or not allocated yet".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("FIEMAP failed: {e}")),
        }
    }

    /// Msync the whole dirty bitmap.
    pub fn sync_bitmap(&self) -> io::Result<()> {
        // Inside the mapping (validated at open).
        let off = usize::try_from(self.layout.bitmap_offset).unwrap_or(usize::MAX);
        let len = usize::try_from(self.layout.bitmap_len).unwrap_or(usize::MAX);
        self.shm.sync(off, len)
    }

    /// Msync the in-flight table.
    pub fn sync_inflight(&self) -> io::Result<()> {
        // Inside the mapping (validated at open).
        let off = usize::try_from(self.layout.inflight_offset).unwrap_or(usize::MAX);
        let len = usize::try_from(self.layout.inflight_entries * INFLIGHT_ENTRY_LEN)
            .unwrap_or(usize::MAX);
        self.shm.sync(off, len)
    }

    /// Msync the consumer's page (its tail cursors).
    pub fn sync_consumer_page(&self) -> io::Result<()> {
        // CONSUMER_PAGE is 4096, inside the mapping.
        self.shm
            .sync(usize::try_from(CONSUMER_PAGE).unwrap_or(4096), 4096)
    }
}

/// The outcome of reading at one position.
pub(crate) enum Scanned {
    /// A valid record of `size` bytes.
    Record(RecordHeader, u64),
    /// Padding of this many bytes to skip (a PAD record or a short remainder).
    Skip(u64),
    /// Not a valid record here (end of the ring, or damage).
    Invalid(String),
}
