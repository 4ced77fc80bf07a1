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
    seeded_state(&dir, size)?;
    Ok((size, written))
}

/// The state of a seeded replica of `size` bytes in `dir`: not consistent
/// until a full pass compared it (by hashes) with the source.
pub(crate) fn seeded_state(dir: &Path, size: u64) -> Result<StateFile> {
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
    )
}

/// What `seed --in-place` registered.
#[derive(Debug, Clone)]
pub struct InPlaceSeed {
    /// The disk file (canonical path).
    pub path: std::path::PathBuf,
    /// Its size.
    pub size: u64,
    /// The identity it carries (None: no marker, accepted with --force).
    pub marker: Option<blockdev::marker::Marker>,
    /// What the original side's ring says (last sequence, last write).
    pub in_place: crate::identity::InPlace,
}

/// Register the original disk file `disk` itself (no copy) as the starting
/// replica of `disk_id`: the first full pass compares it with the source
/// by hashes and sends only what differs. The disk must carry the marker
/// of this disk id (a splitter that protected it wrote it), unless
/// `force`; it must not be in use (a splitter serving it).
pub fn seed_in_place(
    data_dir: &Path,
    disk_id: &str,
    disk: &Path,
    force: bool,
) -> Result<InPlaceSeed> {
    wire::identity::validate_disk_id(disk_id).map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = data_dir.join(disk_id);
    if dir.join(STATE_FILE).exists() {
        return Err(Error::Invalid(format!(
            "disk {disk_id:?} already has a replica in {}: move that folder away first (with the daemon stopped) to seed it again",
            dir.display()
        )));
    }
    let path = std::fs::canonicalize(disk).map_err(io(disk, "finding the disk"))?;
    let size = blockdev::FileDisk::open_unlocked(&path, true)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
        .map(|d| blockdev::Backend::size(&d))?;
    if size == 0 || size % 4096 != 0 {
        return Err(Error::Invalid(format!(
            "{} holds {size} bytes, not a positive multiple of 4096: not a disk",
            path.display()
        )));
    }
    if crate::lockfile::in_use(&path)? {
        return Err(Error::Invalid(format!(
            "{} is in use (a splitter serving it?): stop it first; the target will write to it",
            path.display()
        )));
    }
    let marker = blockdev::marker::read(&path).map_err(io(&path, "reading the disk marker"))?;
    match &marker {
        None if !force => {
            return Err(Error::Invalid(format!(
                "{} carries no blockship disk marker, so it is not known to be disk {disk_id:?}; seeding in place makes the target write to it. If it is that disk, run again with --force",
                path.display()
            )))
        }
        Some(m) if !force && m.disk_id.as_deref().is_some_and(|d| d != disk_id) => {
            return Err(Error::Invalid(format!(
                "{} is disk {:?} (its marker, identity {}), not {disk_id:?}: refused (--force to use it anyway; the target will write to it)",
                path.display(),
                m.disk_id.as_deref().unwrap_or_default(),
                crate::failover::record::hex(&m.uuid)
            )))
        }
        _ => {}
    }
    let in_place = original_side(&path, marker.as_ref());
    std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the replica folder"))?;
    let link = dir.join(REPLICA_FILE);
    // Again after a crash here: the same link is fine.
    if std::fs::read_link(&link).ok().as_deref() != Some(path.as_path()) {
        std::os::unix::fs::symlink(&path, &link).map_err(io(&link, "linking the replica"))?;
    }
    crate::identity::save(
        &dir,
        &crate::identity::Identity {
            uuid: marker.as_ref().map_or([0; 16], |m| m.uuid),
            marked: marker.is_some(),
            force,
            in_place: Some(in_place.clone()),
        },
    )?;
    seeded_state(&dir, size)?;
    crate::failover::record::sync_dir(&dir)?;
    Ok(InPlaceSeed {
        path,
        size,
        marker,
        in_place,
    })
}

/// The original side's last sequence and last write, from the ring its
/// marker names (when that ring is there and still bound to it).
fn original_side(
    path: &Path,
    marker: Option<&blockdev::marker::Marker>,
) -> crate::identity::InPlace {
    let mut p = crate::identity::InPlace {
        path: path.display().to_string(),
        ring_id: marker.and_then(|m| m.ring_id),
        head_seq: 0,
        last_write_ns: 0,
    };
    let (Some(rp), Some(rid)) = (marker.and_then(|m| m.ring_path.clone()), p.ring_id) else {
        return p;
    };
    let rp = Path::new(&rp);
    match ring::status(rp) {
        Ok(st) if st.disk_id == ring::uuid_string(&rid) => {
            p.head_seq = st.head_seq;
            let newest = ring::dump(rp, Some(st.head_seq), 1)
                .ok()
                .and_then(|(v, _)| v.first().map(|e| e.time_ns))
                .unwrap_or(0);
            let overflow = st.overflow_since_ns.filter(|_| st.overflow).unwrap_or(0);
            p.last_write_ns = newest.max(overflow);
        }
        Ok(_) => log::warn!(
            "ring {} no longer captures {}: the original side's last write is unknown",
            rp.display(),
            path.display()
        ),
        Err(e) => log::warn!(
            "ring {} of {}: {e}; the original side's last write is unknown",
            rp.display(),
            path.display()
        ),
    }
    p
}
