//! Segment files: `NNNNNNNN.idx` (header, entries) and `NNNNNNNN.dat`
//! (payloads), listed in number order, read forward, and repaired after a
//! crash by cutting the first entry that does not check and everything
//! after it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{Entry, Header, ENTRY_LEN, HEADER_LEN};
use crate::error::{io, Error, Result};

/// The index file of segment `n` in `dir`.
pub fn idx_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.idx"))
}

/// The payload file of segment `n` in `dir`.
pub fn dat_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.dat"))
}

/// The segment numbers in `dir`, oldest first (empty when there is no
/// journal).
pub fn list(dir: &Path) -> Result<Vec<u64>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, "listing the journal")(e)),
    };
    let mut v = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io(dir, "listing the journal"))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_suffix(".idx")
            .and_then(|n| n.parse::<u64>().ok())
        {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// An open segment, for reading.
#[derive(Debug)]
pub struct Segment {
    /// Its number.
    pub n: u64,
    /// Its header.
    pub header: Header,
    /// The index file.
    pub idx: File,
    /// The payload file.
    pub dat: File,
    /// Index path, for messages.
    pub idx_path: PathBuf,
}

impl Segment {
    /// Open segment `n` of `dir` and read its header. `Ok(None)`: it is
    /// gone (pruned meanwhile).
    pub fn open(dir: &Path, n: u64) -> Result<Option<Segment>> {
        let ip = idx_path(dir, n);
        let dp = dat_path(dir, n);
        let idx = match File::open(&ip) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&ip, "opening a journal index")(e)),
        };
        let dat = match File::open(&dp) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&dp, "opening a journal payload file")(e)),
        };
        let mut hb = [0u8; HEADER_LEN];
        read_full(&idx, 0, &mut hb).map_err(io(&ip, "reading a journal header"))?;
        let header = Header::decode(&hb).map_err(|reason| Error::Corrupt {
            path: ip.clone(),
            reason,
        })?;
        Ok(Some(Segment {
            n,
            header,
            idx,
            dat,
            idx_path: ip,
        }))
    }

    /// Entries from index position `from` (an entry number), as many as
    /// are complete and check, with the entry number after the last. With
    /// `payloads`, an entry counts only if its payload checks too (crash
    /// repair); without, only the index is read (opening a view).
    pub fn read_entries(&self, from: u64, out: &mut Vec<Entry>, payloads: bool) -> Result<u64> {
        let mut buf = vec![0u8; 256 * ENTRY_LEN];
        let mut next = from;
        let mut payload = Vec::new();
        loop {
            let off = HEADER_LEN as u64 + next * ENTRY_LEN as u64;
            let n = read_some(&self.idx, off, &mut buf)
                .map_err(io(&self.idx_path, "reading the journal index"))?;
            let whole = n / ENTRY_LEN;
            if whole == 0 {
                return Ok(next);
            }
            for b in buf[..whole * ENTRY_LEN].chunks_exact(ENTRY_LEN) {
                let Some(e) = Entry::decode(b) else {
                    return Ok(next);
                };
                if payloads && e.dat_len > 0 {
                    payload.resize(e.dat_len as usize, 0);
                    if read_full(&self.dat, e.dat_pos, &mut payload).is_err()
                        || !e.payload_ok(&payload)
                    {
                        return Ok(next);
                    }
                }
                out.push(e);
                next += 1;
            }
            if whole < buf.len() / ENTRY_LEN {
                return Ok(next);
            }
        }
    }

    /// Read `buf.len()` payload bytes at `pos`.
    pub fn read_payload(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        read_full(&self.dat, pos, buf)
    }
}

/// The newest segment of `dir` made whole after a crash: entries after the
/// first one that does not check are cut from the index, payload bytes
/// after the last good entry's from the payload file, and both synced. A
/// segment whose header does not check (torn at creation: it held
/// nothing yet) is removed. Returns the segment's header, its entries
/// and the payload length.
pub fn repair_newest(dir: &Path, n: u64) -> Result<Option<(Header, Vec<Entry>, u64)>> {
    let ip = idx_path(dir, n);
    let seg = match Segment::open(dir, n) {
        Ok(Some(s)) => s,
        Ok(None) => {
            remove_pair(dir, n)?;
            return Ok(None);
        }
        Err(Error::Corrupt { reason, .. }) => {
            log::warn!(
                "journal segment {} has an unreadable header ({reason}): it was being created when the target stopped; removed",
                ip.display()
            );
            remove_pair(dir, n)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    let count = seg.read_entries(0, &mut entries, true)?;
    let idx_len = HEADER_LEN as u64 + count * ENTRY_LEN as u64;
    let dat_len = entries
        .iter()
        .map(|e| e.dat_pos + u64::from(e.dat_len))
        .max()
        .unwrap_or(0);
    let header = seg.header;
    drop(seg);
    for (p, len) in [(ip.clone(), idx_len), (dat_path(dir, n), dat_len)] {
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io(&p, "opening a journal file to repair it"))?;
        let have = f.metadata().map_err(io(&p, "reading its size"))?.len();
        if have > len {
            log::warn!(
                "journal {}: cutting a torn tail of {} bytes (written when the target stopped, never acknowledged)",
                p.display(),
                have - len
            );
            f.set_len(len).map_err(io(&p, "cutting a torn tail"))?;
            f.sync_all()
                .map_err(io(&p, "syncing a repaired journal file"))?;
        }
    }
    Ok(Some((header, entries, dat_len)))
}

/// Remove segment `n`'s two files (missing ones are fine).
pub fn remove_pair(dir: &Path, n: u64) -> Result<()> {
    for p in [idx_path(dir, n), dat_path(dir, n)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, "removing a journal segment")(e)),
        }
    }
    Ok(())
}

/// Bytes both files of segment `n` take.
pub fn bytes(dir: &Path, n: u64) -> u64 {
    [idx_path(dir, n), dat_path(dir, n)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn read_some(f: &File, mut off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_full(f: &File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    if read_some(f, off, buf)? == buf.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "shorter than its index says",
        ))
    }
}
