//! Writing a segment's payload file (`.dat`): before-images are staged in
//! a page-aligned buffer and written with `O_DIRECT` where the file system
//! takes it, so they do not pass through (and crowd) the page cache: they
//! are written once and read only when an old point is looked at. Each
//! flush pads the staged bytes to [`ALIGN`] so the next one starts
//! aligned; where `O_DIRECT` is refused (tmpfs, some overlays) the file is
//! written through the page cache instead, unpadded. Either way the file is
//! fdatasync'd before the entries that name the bytes are written.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::error::{io, Result};

/// Alignment of direct writes (offset, length, memory).
pub const ALIGN: usize = 4096;
/// Bytes staged before the writer must flush.
pub const STAGE: usize = 16 << 20;

/// The payload file of the newest segment, for appending.
pub struct PayloadOut {
    file: File,
    path: PathBuf,
    direct: bool,
    stage: MmapMut,
    len: usize,
    /// File offset of the first staged byte.
    pos: u64,
}

impl std::fmt::Debug for PayloadOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadOut")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("pos", &self.pos)
            .field("staged", &self.len)
            .finish()
    }
}

fn align_up(v: u64) -> u64 {
    let a = ALIGN as u64;
    v.div_ceil(a) * a
}

impl PayloadOut {
    /// Append to `path` from `end` (the end of its last good payload).
    pub fn open(path: &Path, end: u64) -> Result<PayloadOut> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            Err(_) => (
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(path, "opening the journal payloads"))?,
                false,
            ),
        };
        let stage = MmapMut::map_anon(STAGE)
            .map_err(io(path, "allocating the journal's staging buffer"))?;
        Ok(PayloadOut {
            file,
            path: path.to_path_buf(),
            direct,
            stage,
            len: 0,
            pos: if direct { align_up(end) } else { end },
        })
    }

    /// Room left in the stage.
    pub fn room(&self) -> usize {
        STAGE - self.len
    }

    /// Where the next staged byte will be in the file.
    pub fn next_pos(&self) -> u64 {
        self.pos + self.len as u64
    }

    /// Nothing staged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stage `b` (at most [`PayloadOut::room`] bytes).
    pub fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.room());
        self.stage[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    /// Write what is staged and make it durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let n = if self.direct {
            let padded = usize::try_from(align_up(self.len as u64))
                .unwrap_or(STAGE)
                .min(STAGE);
            self.stage[self.len..padded].fill(0);
            padded
        } else {
            self.len
        };
        match self.file.write_all_at(&self.stage[..n], self.pos) {
            Ok(()) => {}
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // The file system opened it O_DIRECT but will not take the
                // write: through the page cache from now on.
                log::info!(
                    "journal {}: direct writes refused ({e}); writing through the page cache",
                    self.path.display()
                );
                self.file = OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(io(&self.path, "reopening the journal payloads"))?;
                self.direct = false;
                self.file
                    .write_all_at(&self.stage[..self.len], self.pos)
                    .map_err(io(&self.path, "appending to the journal"))?;
                return self.done(self.len);
            }
            Err(e) => return Err(io(&self.path, "appending to the journal")(e)),
        }
        self.done(n)
    }

    fn done(&mut self, n: usize) -> Result<()> {
        self.file
            .sync_data()
            .map_err(io(&self.path, "syncing the journal"))?;
        self.pos += n as u64;
        self.len = 0;
        Ok(())
    }

    /// Bytes the file holds (written and staged).
    pub fn end(&self) -> u64 {
        self.next_pos()
    }
}
