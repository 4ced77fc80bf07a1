//! Where a replica's bytes live: a sparse file in the data folder, or an
//! upstream NBD server (the "NBD-backed replica"). The session applies
//! records through [`ReplicaWriter`]; the read-only export reads through
//! [`ReplicaReader`], each with its own handle so that reads never wait
//! behind an apply.

use std::fs::{File, OpenOptions};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

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
                Ok(ReplicaWriter::File { f, path: p.clone() })
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
                Ok(ReplicaWriter::Nbd {
                    c,
                    name: self.describe(),
                })
            }
        }
    }

    /// Open for reading (the export).
    pub fn open_reader(&self) -> Result<ReplicaReader> {
        match self {
            ReplicaSpec::File(p) => Ok(ReplicaReader::File(
                File::open(p).map_err(io(p, "opening the replica for reading"))?,
            )),
            ReplicaSpec::Nbd { .. } => Ok(ReplicaReader::Nbd(self.connect()?)),
        }
    }

    fn connect(&self) -> Result<nbd::Client<TcpStream>> {
        let ReplicaSpec::Nbd { addr, export } = self else {
            return Err(Error::Invalid("not an NBD replica".into()));
        };
        let nbd_err = |source| Error::Nbd {
            backend: self.describe(),
            source,
        };
        let s = TcpStream::connect(addr).map_err(|source| {
            nbd_err(nbd::Error::Io {
                context: "connecting to the backend",
                source,
            })
        })?;
        let _ = s.set_nodelay(true);
        nbd::Client::connect(s, export).map_err(nbd_err)
    }
}

/// Applies changes to a replica.
#[derive(Debug)]
pub enum ReplicaWriter {
    /// A file.
    File {
        /// The file.
        f: File,
        /// Its path.
        path: PathBuf,
    },
    /// An NBD export.
    Nbd {
        /// The client connection.
        c: nbd::Client<TcpStream>,
        /// For messages.
        name: String,
    },
}

/// Largest single request sent to an NBD backend.
const NBD_CHUNK: usize = 4 << 20;

impl ReplicaWriter {
    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            ReplicaWriter::File { f, path } => f
                .write_all_at(data, offset)
                .map_err(io(path, "writing the replica")),
            ReplicaWriter::Nbd { c, name } => in_pieces(data.len(), NBD_CHUNK, |at, n| {
                c.write(offset + at as u64, &data[at..at + n], false)
                    .map_err(nbd_err(name))
            }),
        }
    }

    /// Make `offset..offset+len` read as zeroes (trim or zero record).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            ReplicaWriter::File { f, path } => {
                if punch_hole(f, offset, len).is_ok() {
                    return Ok(());
                }
                let zeroes = vec![0u8; 1 << 20];
                in_pieces(len_usize(len)?, zeroes.len(), |at, n| {
                    f.write_all_at(&zeroes[..n], offset + at as u64)
                        .map_err(io(path, "zeroing part of the replica"))
                })
            }
            ReplicaWriter::Nbd { c, name } => in_pieces(len_usize(len)?, NBD_CHUNK, |at, n| {
                // n <= NBD_CHUNK (4 MiB).
                let n = u32::try_from(n).unwrap_or(0);
                c.write_zeroes(offset + at as u64, n, false)
                    .map_err(nbd_err(name))
            }),
        }
    }

    /// Read `buf.len()` bytes at `offset` (to hash what the replica holds).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            ReplicaWriter::File { f, path } => f
                .read_exact_at(buf, offset)
                .map_err(io(path, "reading the replica")),
            ReplicaWriter::Nbd { c, name } => in_pieces(buf.len(), NBD_CHUNK, |at, n| {
                c.read(offset + at as u64, &mut buf[at..at + n])
                    .map_err(nbd_err(name))
            }),
        }
    }

    /// Make everything applied so far durable.
    pub fn sync(&mut self) -> Result<()> {
        match self {
            ReplicaWriter::File { f, path } => {
                f.sync_data().map_err(io(path, "syncing the replica"))
            }
            ReplicaWriter::Nbd { c, name } => c.flush().map_err(|source| Error::Nbd {
                backend: name.clone(),
                source,
            }),
        }
    }
}

/// Call `f(at, n)` for consecutive pieces of at most `piece` bytes covering `0..len`.
fn in_pieces(
    len: usize,
    piece: usize,
    mut f: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(piece);
        f(at, n)?;
        at += n;
    }
    Ok(())
}

/// An extent length as a buffer length.
fn len_usize(len: u64) -> Result<usize> {
    usize::try_from(len).map_err(|_| Error::Invalid(format!("extent of {len} bytes is too long")))
}

fn nbd_err(name: &str) -> impl FnOnce(nbd::Error) -> Error + '_ {
    move |source| Error::Nbd {
        backend: name.to_string(),
        source,
    }
}

/// Deallocate a range of a file so it reads as zeroes.
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let bad = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let (off, len) = (
        libc::off_t::try_from(offset).map_err(bad)?,
        libc::off_t::try_from(len).map_err(bad)?,
    );
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes a descriptor `f` keeps open and no pointers.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a replica for the export.
#[derive(Debug)]
pub enum ReplicaReader {
    /// A file.
    File(File),
    /// An NBD export.
    Nbd(nbd::Client<TcpStream>),
}

impl ReplicaReader {
    /// Fill `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            ReplicaReader::File(f) => f.read_exact_at(buf, offset),
            ReplicaReader::Nbd(c) => c
                .read(offset, buf)
                .map_err(|e| std::io::Error::other(e.to_string())),
        }
    }
}
