//! The protected disk's marker (`blockdev::marker`) as the splitter keeps
//! it: before the ring opens, a ring that no longer describes the disk (the
//! disk was failed over, or failed back, or captured by another ring since)
//! is started again, so that no stale record is ever shipped; after it
//! opens, the marker names the disk's identity, disk id and ring, for the
//! shipper's HELLO and for `nbd-target seed --in-place` at the other site.

use std::io;
use std::path::Path;

use blockdev::marker::{self, Marker};

/// Read `disk`'s marker and drop the ring at `ring` when it belongs to
/// another history of the disk. Returns the marker read.
pub fn before_ring(disk: &Path, ring: &Path) -> io::Result<Option<Marker>> {
    let m = marker::read(disk).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{}: the disk marker cannot be read ({e}); it carries the disk's identity across failover: look at it with `getfattr -n {} {}`, remove it with `setfattr -x {} {}` only if the disk is not a failed-over copy",
                disk.display(),
                marker::XATTR,
                disk.display(),
                marker::XATTR,
                disk.display()
            ),
        )
    })?;
    let Some(mk) = &m else {
        return Ok(None);
    };
    if !ring.exists() {
        return Ok(m);
    }
    let st = match ring::status(ring) {
        Ok(st) => st,
        // A damaged ring is the ring's business (it says so when opened).
        Err(_) => return Ok(m),
    };
    let stale = match mk.ring_id {
        None => true,
        Some(r) => ring::uuid_string(&r) != st.disk_id,
    };
    if stale {
        let why = match (&mk.ring_id, &mk.failover) {
            (None, Some(_)) => "the disk was failed over or failed back since".to_string(),
            (None, None) => "the disk was changed outside it".to_string(),
            (Some(r), _) => format!("the disk is captured by ring {} now", ring::uuid_string(r)),
        };
        log::warn!(
            "ring {} (ring id {}, {} records waiting) no longer describes {}: {why}; starting a new ring (its replica is compared by hashes: a full pass sends only what differs)",
            ring.display(),
            st.disk_id,
            st.records_waiting,
            disk.display()
        );
        std::fs::remove_file(ring)?;
    }
    Ok(m)
}

/// Record in `disk`'s marker that ring `ring_id` (at `ring`) captures it,
/// protected as `disk_id` when shipping; the identity is kept (or the
/// ring's id when the disk had none). A file system without user xattrs
/// only gets a warning; any other failure is an error (a marker that does
/// not name the ring would make the next start drop the ring as stale).
pub fn after_ring(
    disk: &Path,
    ring: &Path,
    ring_id: [u8; 16],
    disk_id: Option<&str>,
    before: Option<Marker>,
) -> io::Result<()> {
    let mut m = before.clone().unwrap_or(Marker {
        uuid: ring_id,
        ..Marker::default()
    });
    m.ring_id = Some(ring_id);
    m.ring_path = Some(
        std::fs::canonicalize(ring)
            .unwrap_or_else(|_| ring.to_path_buf())
            .display()
            .to_string(),
    );
    if let Some(d) = disk_id {
        if let Some(old) = m.disk_id.as_deref().filter(|o| *o != d) {
            log::warn!(
                "{} was protected as disk {old:?}; it is shipped as {d:?} now",
                disk.display()
            );
        }
        m.disk_id = Some(d.to_string());
    }
    if before.as_ref() == Some(&m) {
        return Ok(());
    }
    match marker::write(disk, &m) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            log::warn!(
                "{}: no user xattrs here, so the disk carries no identity marker (a failback to it needs `nbd-target seed --in-place --force`)",
                disk.display()
            );
            Ok(())
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{}: writing the disk marker: {e}", disk.display()),
        )),
    }
}
