//! The recovery site's NBD exports: each replica, by disk id, at its latest
//! applied state, so the site can always look at what it holds (`nbdcopy`,
//! `nbdinfo`, `nbdfuse`, qemu). Served by the shared NBD server
//! (`blockdev::server`, the splitter's): structured replies, block status,
//! multi-conn, pipelining, bounded memory and connections, a handshake
//! deadline, graceful stop. Read-only today: writes are refused with
//! EPERM. A writable copy-on-write export (test failover) is another
//! [`ExportSet`] entry whose backend is an overlay over the replica.

use std::io;
use std::sync::Arc;

use blockdev::server::{describe_export, Claims, ExportSet, OpenExport};
use blockdev::{Backend, NoCapture};

use crate::registry::Registry;

/// Every replica that has a state, read-only, named by its disk id.
pub struct ReplicaExports {
    registry: Arc<Registry>,
}

impl ReplicaExports {
    /// The exports of `registry`'s replicas.
    pub fn new(registry: Arc<Registry>) -> ReplicaExports {
        ReplicaExports { registry }
    }
}

/// A replica read through its own handle, presented at the disk's size.
struct SizedReplica {
    inner: Box<dyn Backend>,
    size: u64,
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

impl ExportSet for ReplicaExports {
    fn exports(&self) -> Vec<nbd::Export> {
        self.registry
            .all()
            .into_iter()
            .filter_map(|e| {
                let st = e.state()?;
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
                let caps = blockdev::Caps {
                    read_only: true,
                    trim: false,
                    fast_zero: false,
                    extents: false,
                    multi_conn: true,
                    inline_writes: false,
                };
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
