//! Where a replica's bytes live: a sparse file in the data folder, or an
//! upstream NBD server (the "NBD-backed replica"), both through the shared
//! disk backends (`blockdev::FileDisk`, `blockdev::NbdDisk`). The session
//! applies records through [`ReplicaWriter`] (the seam where a journal
//! will sit); the export reads through a backend of its own
//! ([`ReplicaSpec::open_reader`]), so reads never wait behind an apply.

use std::fs::OpenOptions;
use std::path::PathBuf;

use blockdev::{Backend, FileDisk, NbdDisk};

use crate::error::{io, Error, Result};

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaSpec {
    /// A sparse file.
    File(PathBuf),
    /// An export of an upstream NBD server.
    Nbd {
        /// host:port
        addr: String,
        /// Export name.
        export: String,
    },
}

impl ReplicaSpec {
    /// Parse `nbd://HOST:PORT/EXPORT`.
    pub fn parse_nbd_uri(uri: &str) -> Result<ReplicaSpec> {
        let bad = || {
            Error::Invalid(format!(
                "{uri:?} is not an NBD URI like nbd://127.0.0.1:10809/export"
            ))
        };
        let rest = uri.strip_prefix("nbd://").ok_or_else(bad)?;
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        if addr.is_empty() {
            return Err(bad());
        }
        let addr = if addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:10809")
        };
        Ok(ReplicaSpec::Nbd {
            addr,
            export: export.to_string(),
        })
    }

    /// For logs and status.
    pub fn describe(&self) -> String {
        match self {
            ReplicaSpec::File(p) => p.display().to_string(),
            ReplicaSpec::Nbd { addr, export } => format!("nbd://{addr}/{export}"),
        }
    }

    /// Open for applying records. A file replica is created (sparse) when
    /// missing and must have the disk's size; an NBD export must be at
    /// least as large as the disk.
    pub fn open_writer(&self, disk_size: u64) -> Result<ReplicaWriter> {
        match self {
            ReplicaSpec::File(p) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
                    .map_err(io(p, "opening the replica"))?;
                let len = f
                    .metadata()
                    .map_err(io(p, "reading the replica's size"))?
                    .len();
                if len == 0 {
                    f.set_len(disk_size).map_err(io(p, "sizing the replica"))?;
                } else if len != disk_size {
                    return Err(Error::Invalid(format!(
                        "replica {} holds {len} bytes but the source disk has {disk_size}: a resized disk needs a new replica (move the folder away)",
                        p.display()
                    )));
                }
                drop(f);
                // Locked like a splitter locks its disk: a replica seeded in
                // place (the original disk file) is never written by a
                // splitter and the target at once.
                let mut disk = FileDisk::open(p, false).map_err(|e| {
                    Error::Invalid(format!(
                        "replica {}: {e} (in use by another process: a splitter serving it, or a failover command?)",
                        p.display()
                    ))
                })?;
                // Written once, read rarely: aligned extents go around the
                // page cache (blockdev::direct says why).
                if let Err(why) = disk.use_direct_writes() {
                    log::debug!(
                        "replica {}: writes through the page cache ({why})",
                        p.display()
                    );
                }
                Ok(ReplicaWriter {
                    disk: Box::new(disk),
                    path: p.clone(),
                    nbd: false,
                })
            }
            ReplicaSpec::Nbd { .. } => {
                let c = self.connect()?;
                if c.size() < disk_size {
                    return Err(Error::Invalid(format!(
                        "NBD backend {} has {} bytes, less than the disk's {disk_size}",
                        self.describe(),
                        c.size()
                    )));
                }
                Ok(ReplicaWriter {
                    disk: Box::new(c),
                    path: PathBuf::from(self.describe()),
                    nbd: true,
                })
            }
        }
    }

    /// Open for reading (the export), with a handle of its own.
    pub fn open_reader(&self) -> Result<Box<dyn Backend>> {
        match self {
            ReplicaSpec::File(p) => {
                Ok(Box::new(FileDisk::open_unlocked(p, true).map_err(|e| {
                    Error::Invalid(format!("opening replica {} for reading: {e}", p.display()))
                })?))
            }
            ReplicaSpec::Nbd { .. } => Ok(Box::new(self.connect()?)),
        }
    }

    fn connect(&self) -> Result<NbdDisk> {
        let ReplicaSpec::Nbd { addr, export } = self else {
            return Err(Error::Invalid("not an NBD replica".into()));
        };
        NbdDisk::connect(addr, export).map_err(|source| Error::Nbd {
            backend: self.describe(),
            source,
        })
    }
}

/// Applies changes to a replica, through the shared disk backend.
pub struct ReplicaWriter {
    disk: Box<dyn Backend>,
    /// Where it lives, for messages.
    path: PathBuf,
    /// An NBD-backed replica (errors name the backend).
    nbd: bool,
}

impl std::fmt::Debug for ReplicaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWriter")
            .field("path", &self.path)
            .finish()
    }
}

impl ReplicaWriter {
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| {
            if self.nbd {
                Error::Nbd {
                    backend: self.path.display().to_string(),
                    source: nbd::Error::Io {
                        context: what,
                        source,
                    },
                }
            } else {
                Error::Io {
                    path: self.path.clone(),
                    what,
                    source,
                }
            }
        }
    }

    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.disk
            .write_at(offset, data, false)
            .map_err(self.err("writing the replica"))
    }

    /// Make `offset..offset+len` read as zeroes (trim or zero record).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.disk
            .zero(offset, len, true, false)
            .map_err(self.err("zeroing part of the replica"))
    }

    /// Read `buf.len()` bytes at `offset` (to hash what the replica holds).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.disk
            .read_at(offset, buf)
            .map_err(self.err("reading the replica"))
    }

    /// Make everything applied so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.disk.flush().map_err(self.err("syncing the replica"))
    }
}

impl ReplicaWriter {
    /// Block status of `offset..offset+len` (holes read as zeroes).
    pub fn extents(&self, offset: u64, len: u32, max: usize, out: &mut Vec<nbd::reply::Extent>) {
        self.disk.extents(offset, len, max, out);
    }
}
