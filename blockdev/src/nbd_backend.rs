//! A disk that is an export of an upstream NBD server (the recovery site's
//! `--backend ID=nbd://HOST:PORT/EXPORT`), through `nbd::Client`: one
//! connection, requests of at most 4 MiB, one at a time.

use std::io;
use std::net::TcpStream;
use std::sync::Mutex;

use nbd::protocol::{FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES};
use nbd::reply::Extent;

use crate::backend::{Backend, Caps};

/// Largest single request sent upstream.
const CHUNK: usize = 4 << 20;

/// An upstream NBD export.
pub struct NbdDisk {
    client: Mutex<nbd::Client<TcpStream>>,
    name: String,
    size: u64,
    flags: u16,
}

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDisk").field("name", &self.name).finish()
    }
}

/// An NBD error as an I/O error: the server's errno when it sent one.
fn to_io(e: nbd::Error) -> io::Error {
    match e {
        nbd::Error::Io { source, .. } => source,
        nbd::Error::Request { errno, .. } => {
            let code = i32::try_from(errno.code()).unwrap_or(libc::EIO);
            io::Error::from_raw_os_error(code)
        }
        other => io::Error::other(other.to_string()),
    }
}

impl NbdDisk {
    /// Connect to `addr` (host:port) and open `export`.
    pub fn connect(addr: &str, export: &str) -> Result<NbdDisk, nbd::Error> {
        let s = TcpStream::connect(addr).map_err(|source| nbd::Error::Io {
            context: "connecting to the NBD server",
            source,
        })?;
        let _ = s.set_nodelay(true);
        let c = nbd::Client::connect(s, export)?;
        Ok(NbdDisk {
            size: c.size(),
            flags: c.flags(),
            client: Mutex::new(c),
            name: format!("nbd://{addr}/{export}"),
        })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, nbd::Client<TcpStream>> {
        // A panic in another request leaves the connection as it was: the
        // next request fails or succeeds on its own.
        self.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Call `f(at, n)` for consecutive pieces of at most CHUNK bytes of `0..len`.
fn pieces(len: u64, mut f: impl FnMut(u64, usize) -> io::Result<()>) -> io::Result<()> {
    let mut at = 0u64;
    while at < len {
        // At most CHUNK.
        let n = usize::try_from(len - at).unwrap_or(CHUNK).min(CHUNK);
        f(at, n)?;
        at += n as u64;
    }
    Ok(())
}

/// A piece length as the protocol's u32 (pieces are at most CHUNK).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Backend for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.flags & FLAG_READ_ONLY != 0,
            trim: self.flags & FLAG_SEND_TRIM != 0,
            fast_zero: self.flags & FLAG_SEND_WRITE_ZEROES != 0,
            extents: false,
            multi_conn: self.flags & FLAG_CAN_MULTI_CONN != 0,
            inline_writes: false,
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut c = self.client();
        pieces(buf.len() as u64, |at, n| {
            // at < buf.len(), a usize.
            let i = usize::try_from(at).unwrap_or(0);
            c.read(offset + at, &mut buf[i..i + n]).map_err(to_io)
        })
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut c = self.client();
        pieces(data.len() as u64, |at, n| {
            // at < data.len(), a usize.
            let i = usize::try_from(at).unwrap_or(0);
            c.write(offset + at, &data[i..i + n], fua).map_err(to_io)
        })
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.flags & FLAG_SEND_TRIM == 0 {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let mut c = self.client();
        pieces(len, |at, n| c.trim(offset + at, len32(n)).map_err(to_io))
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> io::Result<()> {
        if self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            if fast_only {
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            return crate::backend::write_zeroes(offset, len, |at, z| self.write_at(at, z, false));
        }
        let mut c = self.client();
        pieces(len, |at, n| {
            c.write_zeroes(offset + at, len32(n), !may_trim)
                .map_err(to_io)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.client().flush().map_err(to_io)
    }

    fn extents(&self, _offset: u64, len: u32, _max: usize, out: &mut Vec<Extent>) {
        out.clear();
        out.push(Extent {
            length: len,
            flags: 0,
        });
    }
}
