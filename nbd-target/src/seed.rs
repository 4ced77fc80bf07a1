//! `nbd-target seed`: register an image carried to the recovery site on
//! other media as the starting replica of a disk. The first full pass then
//! compares it with the source by hashes (chunk, then block) and sends only
//! what differs.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{io, Error, Result};
use crate::registry::{REPLICA_FILE, STATE_FILE};
use crate::state::{now_ns, Reason, ReplicaState, StateFile};

/// Copy `image` (sparsely: all-zero MiBs are not written) as the replica of
/// `disk_id` under `data_dir`. Refuses a disk that already has a replica.
/// Returns (image size, bytes written).
pub fn seed(data_dir: &Path, disk_id: &str, image: &Path) -> Result<(u64, u64)> {
    wire::identity::validate_disk_id(disk_id).map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = data_dir.join(disk_id);
    if dir.join(STATE_FILE).exists() {
        return Err(Error::Invalid(format!(
            "disk {disk_id:?} already has a replica in {}: move that folder away first to seed it again",
            dir.display()
        )));
    }
    let mut src = File::open(image).map_err(io(image, "opening the seed image"))?;
    let size = src
        .metadata()
        .map_err(io(image, "reading the seed image's size"))?
        .len();
    if size == 0 || size % 4096 != 0 {
        return Err(Error::Invalid(format!(
            "seed image {} holds {size} bytes, not a positive multiple of 4096: not a disk image",
            image.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the replica folder"))?;
    let tmp = dir.join(format!("{REPLICA_FILE}.seeding"));
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(&tmp, "creating the replica"))?;
    dst.set_len(size).map_err(io(&tmp, "sizing the replica"))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut written) = (0u64, 0u64);
    while at < size {
        let n = usize::try_from((size - at).min(buf.len() as u64)).unwrap_or(buf.len());
        src.read_exact(&mut buf[..n])
            .map_err(io(image, "reading the seed image"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at)
                .map_err(io(&tmp, "writing the replica"))?;
            written += n as u64;
        }
        at += n as u64;
    }
    dst.sync_all().map_err(io(&tmp, "syncing the replica"))?;
    std::fs::rename(&tmp, dir.join(REPLICA_FILE)).map_err(io(&tmp, "renaming the replica"))?;
    StateFile::open_or_create(
        &dir.join(STATE_FILE),
        ReplicaState {
            applied_seq: 0,
            // Adopted by the first ring that ships to it.
            ring_id: [0; 16],
            disk_size: size,
            reason: Reason::Seeded,
            since_seq: 0,
            updated_ns: now_ns(),
            sync_cursor: 0,
        },
    )?;
    Ok((size, written))
}
