//! Online verify (DRBD's `verify`): compare the source with the replica by
//! hashes while writes go on, report the extents that differ, and with
//! repair resend them.
//!
//! Each chunk's blake3 hash travels in the ordered stream as a SYNC_HASH
//! (not part of a full pass), so the target hashes its replica at the same
//! position: a write the replica has not received yet is not behind that
//! position. A write that reached the disk but not yet the ring when the
//! chunk was read can still make one comparison differ; so a block found
//! different is compared again, each time at a later position, and only a
//! block that differs in [`ROUNDS`] comparisons in a row is reported (and
//! repaired).
//!
//! A verify is asked for through the ring file (`shipper verify`), run by
//! whichever shipper drains the ring, and reported in `RING.verify.json`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use blockdev::{Backend, FileDisk};

use ring::Extent;
use wire::frame::{block_hashes_frame_len, BlockHashes, MAX_BATCH_HASH_REPLY};
use wire::{RecordKind, WireRecord};

use crate::error::{Error, Result};

/// Disk bytes hashed per SYNC_HASH of a verify.
const CHUNK: usize = 1 << 20;
/// Comparisons a block must fail in a row to be reported.
pub const ROUNDS: u8 = 4;

/// A running verify.
#[derive(Debug)]
pub struct Verify {
    /// Its id (from the ring's request).
    pub id: u64,
    /// Resend what differs.
    pub repair: bool,
    /// The protected disk (shared with the resync).
    disk: Arc<FileDisk>,
    disk_size: u64,
    next: u64,
    /// Answers to compare again: (block hashes, comparisons failed so far).
    first: VecDeque<(BlockHashes, u8)>,
    /// Answers that failed every round: report.
    second: VecDeque<BlockHashes>,
    /// Ranges sent for another comparison (offset → comparisons failed so far).
    rechecking: HashMap<u64, u8>,
    /// Extents that differed twice.
    found: Vec<Extent>,
    compared: u64,
    started: Instant,
    buf: Vec<u8>,
}

/// What a verify found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The verify's id.
    pub id: u64,
    /// Whether differences were resent.
    pub repair: bool,
    /// Disk bytes compared.
    pub compared_bytes: u64,
    /// Extents that differed (4 KiB blocks, merged).
    pub differing: Vec<Extent>,
    /// How long it took.
    pub seconds: f64,
}

impl Report {
    /// As JSON (the report file's content).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "repair": self.repair,
            "compared_bytes": self.compared_bytes,
            "differing_bytes": self.differing.iter().map(|e| e.len).sum::<u64>(),
            "differing": self.differing.iter().map(|e| serde_json::json!({"offset": e.offset, "len": e.len})).collect::<Vec<_>>(),
            "seconds": self.seconds,
            "finished_ns": ring::wall_clock_ns(),
        })
    }
}

/// The report file of the ring at `ring`.
pub fn report_path(ring: &std::path::Path) -> PathBuf {
    let mut p = ring.as_os_str().to_owned();
    p.push(".verify.json");
    PathBuf::from(p)
}

fn hash_record(plain: &mut Vec<u8>, seq: u64, offset: u64, data: &[u8]) {
    WireRecord {
        seq,
        kind: RecordKind::SyncHash,
        offset,
        // Verify chunks are at most 1 MiB.
        len: u32::try_from(data.len()).unwrap_or(0),
        after_gap: false,
        full_pass: false,
        time_ns: ring::wall_clock_ns(),
        payload: blake3::hash(data).as_bytes(),
    }
    .encode(plain);
}

/// The runs of blocks of `data` (read at disk `offset`) whose hashes
/// differ from the replica's in `bh`: (disk offset, start, end in `data`).
pub(crate) fn differing_runs(
    data: &[u8],
    offset: u64,
    bh: &BlockHashes,
) -> Vec<(u64, usize, usize)> {
    let bs = bh.block_size as usize;
    let blocks = data.len().div_ceil(bs);
    let mut runs = Vec::new();
    let mut run: Option<(usize, usize)> = None;
    for i in 0..=blocks {
        let differs = i < blocks && {
            let b = &data[i * bs..((i + 1) * bs).min(data.len())];
            bh.hashes
                .get(i)
                .is_none_or(|h| blake3::hash(b).as_bytes() != h)
        };
        match (differs, run) {
            (true, None) => run = Some((i, i + 1)),
            (true, Some((a, _))) => run = Some((a, i + 1)),
            (false, Some((a, b))) => {
                let (from, to) = (a * bs, (b * bs).min(data.len()));
                runs.push((offset + from as u64, from, to));
                run = None;
            }
            (false, None) => {}
        }
    }
    runs
}

impl Verify {
    /// A verify of the disk `disk`.
    pub fn new(id: u64, repair: bool, disk: Arc<FileDisk>, disk_size: u64) -> Verify {
        Verify {
            id,
            repair,
            disk,
            disk_size,
            next: 0,
            first: VecDeque::new(),
            second: VecDeque::new(),
            rechecking: HashMap::new(),
            found: Vec::new(),
            compared: 0,
            started: Instant::now(),
            buf: vec![0u8; CHUNK],
        }
    }

    /// Disk bytes compared so far.
    pub fn compared(&self) -> u64 {
        self.compared
    }

    /// The target's answer to one of this verify's SYNC_HASH records.
    pub fn answer(&mut self, bh: BlockHashes) {
        let failed = self.rechecking.remove(&bh.offset).unwrap_or(0) + 1;
        if failed >= ROUNDS {
            self.second.push_back(bh);
        } else {
            self.first.push_back((bh, failed));
        }
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.disk_size)
            || len > self.buf.len()
        {
            return Err(Error::Invalid(format!(
                "the target answered a verify for {offset}+{len}, outside the disk"
            )));
        }
        self.disk
            .read_at(offset, &mut self.buf[..len])
            .map_err(|e| Error::Invalid(format!("reading the disk at {offset} for verify: {e}")))
    }

    /// Encode the next records (at position `seq`) into `plain`, up to
    /// about `max_bytes` of disk, and while the answers its SYNC_HASH
    /// records may get keep `hash_reply` (the batch's) within
    /// `MAX_BATCH_HASH_REPLY`; returns how many.
    pub fn fill(
        &mut self,
        plain: &mut Vec<u8>,
        seq: u64,
        max_bytes: u64,
        hash_reply: &mut u64,
    ) -> Result<u32> {
        let mut count = 0;
        let mut covered = 0u64;
        // Second answers: report, and resend when repairing.
        // Bounded, so a batch stays far below the protocol's limit; the rest
        // waits for the next batch.
        let budget = usize::try_from(max_bytes).unwrap_or(usize::MAX).max(CHUNK);
        while plain.len() < budget {
            let Some(bh) = self.second.pop_front() else {
                break;
            };
            self.read(bh.offset, bh.len as usize)?;
            for (at, from, to) in differing_runs(&self.buf[..bh.len as usize], bh.offset, &bh) {
                log::debug!(
                    "verify {}: {at}+{} differs in every comparison (tag {seq})",
                    self.id,
                    to - from
                );
                self.found.push(Extent {
                    offset: at,
                    len: (to - from) as u64,
                });
                if self.repair {
                    WireRecord {
                        seq,
                        kind: RecordKind::SyncData,
                        offset: at,
                        len: u32::try_from(to - from).unwrap_or(0),
                        after_gap: false,
                        full_pass: false,
                        time_ns: ring::wall_clock_ns(),
                        payload: &self.buf[from..to],
                    }
                    .encode(plain);
                    count += 1;
                }
            }
        }
        // First answers: compare the differing blocks once more, later.
        while plain.len() < budget {
            let Some((bh, failed)) = self.first.pop_front() else {
                break;
            };
            self.read(bh.offset, bh.len as usize)?;
            let runs: Vec<_> = differing_runs(&self.buf[..bh.len as usize], bh.offset, &bh);
            // Each run is within the chunk (at most 16 MiB).
            let answers: u64 = runs
                .iter()
                .map(|&(_, from, to)| {
                    block_hashes_frame_len(u32::try_from(to - from).unwrap_or(u32::MAX))
                })
                .sum();
            if *hash_reply + answers > MAX_BATCH_HASH_REPLY {
                // The next batch compares these again.
                self.first.push_front((bh, failed));
                break;
            }
            *hash_reply += answers;
            for (at, from, to) in runs {
                log::debug!(
                    "verify {}: {at}+{} differed {failed} time(s), compared again at tag {seq}",
                    self.id,
                    to - from
                );
                hash_record(plain, seq, at, &self.buf[from..to]);
                self.rechecking.insert(at, failed);
                count += 1;
            }
        }
        while self.next < self.disk_size && covered < max_bytes {
            let at = self.next;
            let n = usize::try_from((self.disk_size - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            // n <= CHUNK (1 MiB).
            let answer = block_hashes_frame_len(u32::try_from(n).unwrap_or(u32::MAX));
            if *hash_reply + answer > MAX_BATCH_HASH_REPLY {
                break;
            }
            *hash_reply += answer;
            self.read(at, n)?;
            hash_record(plain, seq, at, &self.buf[..n]);
            self.next += n as u64;
            self.compared += n as u64;
            covered += n as u64 / 16;
            count += 1;
        }
        Ok(count)
    }

    /// Every chunk was hashed and no answer is pending; `quiet`: nothing of
    /// the verify is in flight (all answers are in).
    pub fn finished(&self, quiet: bool) -> bool {
        // (Answers still queued are not finished.)
        quiet && self.next >= self.disk_size && self.first.is_empty() && self.second.is_empty()
    }

    /// The report.
    pub fn report(&self) -> Report {
        let mut v = self.found.clone();
        v.sort_by_key(|e| e.offset);
        let mut merged: Vec<Extent> = Vec::new();
        for e in v {
            match merged.last_mut() {
                Some(m) if m.offset + m.len >= e.offset => {
                    m.len = m.len.max(e.offset + e.len - m.offset);
                }
                _ => merged.push(e),
            }
        }
        Report {
            id: self.id,
            repair: self.repair,
            compared_bytes: self.compared,
            differing: merged,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}
