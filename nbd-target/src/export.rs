//! The recovery site's NBD exports: each replica, by disk id, at its latest
//! applied state, so the site can always look at what it holds (`nbdcopy`,
//! `nbdinfo`, `nbdfuse`, qemu). Served by the shared NBD server
//! (`blockdev::server`, the splitter's): structured replies, block status,
//! multi-conn, pipelining, bounded memory and connections, a handshake
//! deadline, graceful stop. Read-only: writes are refused with EPERM.
//!
//! `ID` is the replica at its latest applied state (a disk failed over and
//! not committed: the failed-over disk, writable, see [`crate::failover`]); `ID@POINT` is the disk
//! at a recovery point (`ID@latest`, `ID@123456`, `ID@2026-11-24T10:15:00Z`,
//! `ID@MARK`), a [`crate::journal::PointView`] opened per connection. A
//! test failover serves a writable copy-on-write overlay over such a view
//! with [`OneExport`].

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use blockdev::server::{describe_export, Claims, ExportSet, OpenExport};
use blockdev::{Backend, NoCapture};

use crate::failover::{FailedOverDisk, Phase};
use crate::registry::Registry;

/// Point exports (`ID@POINT`) open at once, per daemon: each holds a map
/// of the ranges changed since its point and the journal files it reads.
pub const MAX_POINT_VIEWS: usize = 32;

/// Every replica that has a state, read-only, named by its disk id; a
/// disk failed over (uncommitted) writable under its id instead.
pub struct ReplicaExports {
    registry: Arc<Registry>,
    /// Point views open now.
    views: Arc<AtomicUsize>,
    /// The failed-over disks open now: one per disk, shared by all its
    /// connections (with their overlap claims), closed with the last one.
    failed_over: Mutex<HashMap<String, OpenFailedOver>>,
}

/// A failed-over disk open in the daemon, and its connections' claims.
type OpenFailedOver = (Weak<FailedOverDisk>, Arc<Claims>);

impl ReplicaExports {
    /// The exports of `registry`'s replicas.
    pub fn new(registry: Arc<Registry>) -> ReplicaExports {
        ReplicaExports {
            registry,
            views: Arc::default(),
            failed_over: Mutex::default(),
        }
    }

    /// `ID` of a disk failed over and not committed: its overlay over the
    /// point, writable.
    fn open_failed_over(
        &self,
        entry: &crate::registry::DiskEntry,
        rec: &crate::failover::Record,
        size: u64,
    ) -> io::Result<OpenExport> {
        let mut m = self
            .failed_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((w, claims)) = m.get(&entry.id) {
            if let Some(d) = w.upgrade() {
                if Some(d.point()) == rec.point && d.overlay_name() == rec.overlay {
                    return Ok(OpenExport {
                        disk: d,
                        capture: Arc::new(NoCapture),
                        claims: claims.clone(),
                        read_only: false,
                    });
                }
            }
        }
        let point = rec.point.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no point yet", entry.id),
            )
        })?;
        let d = FailedOverDisk::open(
            &entry.dir,
            &entry.id,
            &rec.overlay,
            &crate::journal::dir_of(&entry.dir),
            &entry.spec,
            size,
            (point, rec.journal),
        )
        .map_err(|e| io::Error::other(format!("{}: {e}", entry.id)))?;
        log::info!(
            "export {}: the failed-over disk at point {point}, writable",
            entry.id
        );
        let d = Arc::new(d);
        let claims = Arc::new(Claims::default());
        m.insert(entry.id.clone(), (Arc::downgrade(&d), claims.clone()));
        Ok(OpenExport {
            disk: d,
            capture: Arc::new(NoCapture),
            claims,
            read_only: false,
        })
    }
}

/// A point view counted among the open ones while it lives.
struct Counted {
    view: crate::journal::PointView,
    views: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.views.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Backend for Counted {
    fn size(&self) -> u64 {
        self.view.size()
    }
    fn caps(&self) -> blockdev::Caps {
        self.view.caps()
    }
    fn describe(&self) -> String {
        self.view.describe()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.view.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.view.write_at(offset, data, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.view.trim(offset, len)
    }
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> io::Result<()> {
        self.view.zero(offset, len, may_trim, fast_only)
    }
    fn flush(&self) -> io::Result<()> {
        self.view.flush()
    }
    fn read_source(&self, offset: u64, len: u32) -> Option<(std::os::fd::RawFd, u64)> {
        self.view.read_source(offset, len)
    }
}

/// A replica read through its own handle, presented at the disk's size,
/// read-only.
pub(crate) struct SizedReplica {
    pub(crate) inner: Box<dyn Backend>,
    pub(crate) size: u64,
}

impl Backend for SizedReplica {
    fn size(&self) -> u64 {
        self.size
    }
    fn caps(&self) -> blockdev::Caps {
        blockdev::Caps {
            read_only: true,
            ..self.inner.caps()
        }
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn zero(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn extents(&self, offset: u64, len: u32, max: usize, out: &mut Vec<nbd::reply::Extent>) {
        self.inner.extents(offset, len, max, out);
    }
    fn uring_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.uring_fd()
    }
}

impl ReplicaExports {
    /// `ID@POINT`: the disk at a point, read-only.
    fn open_point(&self, id: &str, point: &str) -> io::Result<OpenExport> {
        let entry = self
            .registry
            .all()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no replica {id:?}")))?;
        let data_dir = entry.dir.parent().unwrap_or(std::path::Path::new("."));
        let fail =
            |e: crate::Error| io::Error::new(io::ErrorKind::NotFound, format!("{id}@{point}: {e}"));
        let dp = crate::points::DiskPoints::load(data_dir, id).map_err(fail)?;
        let pos = dp.resolve(point).map_err(fail)?;
        if self.views.fetch_add(1, Ordering::AcqRel) >= MAX_POINT_VIEWS {
            self.views.fetch_sub(1, Ordering::AcqRel);
            return Err(io::Error::other(format!(
                "{id}@{point}: {MAX_POINT_VIEWS} point exports are open already"
            )));
        }
        let view = match dp.open_view(&entry.spec, pos, &format!("export {id}@{point}")) {
            Ok(v) => Counted {
                view: v,
                views: self.views.clone(),
            },
            Err(e) => {
                self.views.fetch_sub(1, Ordering::AcqRel);
                return Err(fail(e));
            }
        };

        log::info!("export {id}@{point}: the disk at point {pos}");
        Ok(OpenExport {
            disk: Arc::new(view),
            capture: Arc::new(NoCapture),
            claims: Arc::new(Claims::default()),
            read_only: true,
        })
    }
}

/// Points of a disk whose failover is being (or was) committed are gone.
fn committing_refusal(dir: &std::path::Path, id: &str) -> io::Result<()> {
    match crate::failover::record::load(dir) {
        Ok(Some(r)) if matches!(r.phase, Phase::Committing | Phase::Committed) => {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{id}: {}: its recovery points are gone", r.describe()),
            ))
        }
        _ => Ok(()),
    }
}

/// One backend under one name (any name the client asks for is it): a
/// test failover's overlay.
pub struct OneExport {
    export: nbd::Export,
    open: OpenExport,
}

impl OneExport {
    /// Serve `disk` as `name`, described as `description`.
    pub fn new(disk: Arc<dyn Backend>, name: &str, description: String) -> OneExport {
        let caps = disk.caps();
        let read_only = caps.read_only;
        OneExport {
            export: describe_export(name, description, disk.size(), caps, read_only),
            open: OpenExport {
                disk,
                capture: Arc::new(NoCapture),
                claims: Arc::new(Claims::default()),
                read_only,
            },
        }
    }
}

impl ExportSet for OneExport {
    fn exports(&self) -> Vec<nbd::Export> {
        vec![self.export.clone()]
    }

    fn open(&self, _name: &str) -> io::Result<OpenExport> {
        Ok(self.open.clone())
    }
}

impl ExportSet for ReplicaExports {
    fn lookup(&self, name: &str) -> Result<nbd::Export, String> {
        let unknown = || format!("no export named {name:?}");
        let (id, point) = name.split_once('@').ok_or_else(unknown)?;
        let entry = self
            .registry
            .all()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(unknown)?;
        let open = self.views.load(Ordering::Acquire);
        if open >= MAX_POINT_VIEWS {
            let m = format!(
                "{name}: {open} point exports are open, the most this target serves at once; close one and retry"
            );
            log::warn!("{m}");
            return Err(m);
        }
        let data_dir = entry.dir.parent().ok_or_else(unknown)?;
        let said = |e: crate::Error| {
            let m = format!("{name}: {e}");
            log::warn!("export {m}");
            m
        };
        committing_refusal(&entry.dir, id).map_err(|e| e.to_string())?;
        let dp = crate::points::DiskPoints::load(data_dir, id).map_err(said)?;
        let pos = dp.resolve(point).map_err(said)?;
        let caps = crate::journal::view::READ_ONLY;
        Ok(describe_export(
            name,
            format!("blockship replica of {id} at point {pos} ({point}), read-only"),
            dp.state.disk_size,
            caps,
            true,
        ))
    }

    fn exports(&self) -> Vec<nbd::Export> {
        self.registry
            .all()
            .into_iter()
            .filter_map(|e| {
                let st = e.state()?;
                if let Ok(Some(r)) = crate::failover::record::load(&e.dir) {
                    let (caps, ro) = if r.phase == Phase::Uncommitted {
                        (crate::failover::disk::CAPS, false)
                    } else {
                        (crate::journal::view::READ_ONLY, true)
                    };
                    return Some(describe_export(
                        &e.id,
                        format!(
                            "blockship disk {} {}, {}",
                            e.id,
                            r.describe(),
                            if ro { "read-only" } else { "writable" }
                        ),
                        st.disk_size,
                        caps,
                        ro,
                    ));
                }
                let description = format!(
                    "blockship replica of {} at seq {} ({})",
                    e.id,
                    st.applied_seq,
                    if st.consistent() {
                        "consistent"
                    } else {
                        "not consistent"
                    }
                );
                let caps = crate::journal::view::READ_ONLY;
                Some(describe_export(
                    &e.id,
                    description,
                    st.disk_size,
                    caps,
                    true,
                ))
            })
            .collect()
    }

    fn open(&self, name: &str) -> io::Result<OpenExport> {
        if let Some((id, point)) = name.split_once('@') {
            return self.open_point(id, point);
        }
        let entry = self
            .registry
            .all()
            .into_iter()
            .find(|e| e.id == name)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no replica {name:?}"))
            })?;
        let size = entry
            .state()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("replica {name:?} has no state"),
                )
            })?
            .disk_size;
        match crate::failover::record::load(&entry.dir) {
            Ok(Some(r)) if r.phase == Phase::Uncommitted => {
                return self.open_failed_over(&entry, &r, size);
            }
            Ok(Some(r)) if r.phase != Phase::Committed => {
                return Err(io::Error::other(format!("{name}: {}", r.describe())));
            }
            Ok(_) => {}
            Err(e) => return Err(io::Error::other(format!("{name}: {e}"))),
        }
        let inner = entry
            .spec
            .open_reader()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(OpenExport {
            disk: Arc::new(SizedReplica { inner, size }),
            capture: Arc::new(NoCapture),
            claims: Arc::new(Claims::default()),
            read_only: true,
        })
    }
}
