//! The disk marker: a small extended attribute (`user.blockship.disk`) on
//! a protected disk's file that carries the disk's stable identity from
//! one site to the other and back: which disk it is (a UUID kept through
//! failover and failback), under which disk id it is protected, which
//! ring captures its writes now, and, for a failed-over copy, the point it
//! began as. Specified in `docs/disk-marker.md`; this module is the one
//! place the code knows it.
//!
//! Written by the splitter (identity, disk id, ring) and by the target's
//! `failover --commit` (the failed-over image, its origin); read by the
//! shipper (the HELLO's lineage), `nbd-target seed --in-place` (is this
//! the disk being protected?) and the splitter (was the disk changed
//! outside its ring?). A file system without user xattrs (or a block
//! device node) has no marker: readers treat it as unknown, and say so.
//!
//! The value is text, one `key=value` a line, version first:
//! ```text
//! v=1
//! uuid=<32 hex digits>
//! disk_id=db                      (optional)
//! ring_id=<32 hex digits>         (optional: none after a failover commit)
//! ring_path=/var/lib/blockship/db.ring   (optional)
//! failover=<ring hex>:<seq>:<ns>:<written 0|1>   (optional)
//! ```

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The attribute's name.
pub const XATTR: &str = "user.blockship.disk";
/// The marker's format version.
pub const MARKER_VERSION: u32 = 1;
/// Longest marker value read.
const MAX_LEN: usize = 4096;

/// Where a failed-over copy began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The ring the point counted in.
    pub from_ring: [u8; 16],
    /// The point's sequence.
    pub seq: u64,
    /// When it was failed over (ns since the Unix epoch).
    pub at_ns: u64,
    /// Written after the failover, before a ring captured it.
    pub written: bool,
}

/// A disk's marker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marker {
    /// The disk's identity.
    pub uuid: [u8; 16],
    /// The disk id it is protected as.
    pub disk_id: Option<String>,
    /// The ring capturing its writes now.
    pub ring_id: Option<[u8; 16]>,
    /// That ring's path.
    pub ring_path: Option<String>,
    /// For a failed-over copy: where it began.
    pub failover: Option<Origin>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Marker {
    /// The attribute's value.
    pub fn encode(&self) -> String {
        let mut s = format!("v={MARKER_VERSION}\nuuid={}\n", hex(&self.uuid));
        if let Some(d) = &self.disk_id {
            s.push_str(&format!("disk_id={d}\n"));
        }
        if let Some(r) = &self.ring_id {
            s.push_str(&format!("ring_id={}\n", hex(r)));
        }
        if let Some(p) = &self.ring_path {
            s.push_str(&format!("ring_path={p}\n"));
        }
        if let Some(o) = &self.failover {
            s.push_str(&format!(
                "failover={}:{}:{}:{}\n",
                hex(&o.from_ring),
                o.seq,
                o.at_ns,
                u8::from(o.written)
            ));
        }
        s
    }

    /// Parse a value: why it is not a marker, if it is not.
    pub fn decode(v: &str) -> Result<Marker, String> {
        let mut m = Marker::default();
        let mut version = None;
        let mut uuid = None;
        for line in v.lines().filter(|l| !l.is_empty()) {
            let (k, val) = line
                .split_once('=')
                .ok_or_else(|| format!("marker line {line:?} is not key=value"))?;
            let bad = || format!("marker {k}={val:?} is not valid");
            match k {
                "v" => version = Some(val.parse::<u32>().map_err(|_| bad())?),
                "uuid" => uuid = Some(unhex(val).ok_or_else(bad)?),
                "disk_id" => m.disk_id = Some(val.to_string()),
                "ring_id" => m.ring_id = Some(unhex(val).ok_or_else(bad)?),
                "ring_path" => m.ring_path = Some(val.to_string()),
                "failover" => {
                    let p: Vec<&str> = val.split(':').collect();
                    if p.len() != 4 {
                        return Err(bad());
                    }
                    m.failover = Some(Origin {
                        from_ring: unhex(p[0]).ok_or_else(bad)?,
                        seq: p[1].parse().map_err(|_| bad())?,
                        at_ns: p[2].parse().map_err(|_| bad())?,
                        written: p[3] == "1",
                    });
                }
                // Keys of later versions are skipped.
                _ => {}
            }
        }
        match version {
            Some(MARKER_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "marker version {v} (this build reads {MARKER_VERSION})"
                ))
            }
            None => return Err("marker without a version".into()),
        }
        m.uuid = uuid.ok_or("marker without a uuid")?;
        Ok(m)
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn cname() -> CString {
    // XATTR has no NUL byte.
    CString::new(XATTR).unwrap_or_default()
}

/// The marker of the file at `path`: `None` when it has none, is not a
/// regular file (a block device keeps none) or its file system keeps no
/// user xattrs; an error when it has one that is damaged.
pub fn read(path: &Path) -> io::Result<Option<Marker>> {
    if !std::fs::metadata(path)?.is_file() {
        return Ok(None);
    }
    let (p, n) = (cpath(path)?, cname());
    let mut buf = vec![0u8; MAX_LEN];
    // SAFETY: `p` and `n` are NUL-terminated strings that live across the
    // call; `buf` is writable for `buf.len()` bytes, the size passed.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(usize::try_from(r).unwrap_or(0));
    let text = String::from_utf8_lossy(&buf);
    Marker::decode(&text).map(Some).map_err(|m| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {m}", path.display()),
        )
    })
}

/// Write `m` as the marker of the file at `path` (replacing any), durably
/// (the file is fsynced). Fails with ENOTSUP for anything but a regular
/// file, and where the file system keeps no user xattrs.
pub fn write(path: &Path, m: &Marker) -> io::Result<()> {
    // Only regular files keep a marker (a device node's user xattrs are
    // refused with EPERM): anything else is "not supported here".
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
    }
    let (p, n) = (cpath(path)?, cname());
    let v = m.encode();
    // SAFETY: `p` and `n` are NUL-terminated strings that live across the
    // call; `v` is readable for `v.len()` bytes, the size passed.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // An xattr is inode metadata: fsync makes it durable like the data.
    std::fs::File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Marker {
        Marker {
            uuid: [0x11; 16],
            disk_id: Some("db".into()),
            ring_id: Some([0x22; 16]),
            ring_path: Some("/var/lib/db.ring".into()),
            failover: Some(Origin {
                from_ring: [0x33; 16],
                seq: 42,
                at_ns: 7,
                written: true,
            }),
        }
    }

    #[test]
    fn golden_value_and_round_trip() {
        let m = full();
        assert_eq!(
            m.encode(),
            concat!(
                "v=1\n",
                "uuid=11111111111111111111111111111111\n",
                "disk_id=db\n",
                "ring_id=22222222222222222222222222222222\n",
                "ring_path=/var/lib/db.ring\n",
                "failover=33333333333333333333333333333333:42:7:1\n"
            )
        );
        assert_eq!(Marker::decode(&m.encode()), Ok(m));
        let bare = Marker {
            uuid: [1; 16],
            ..Marker::default()
        };
        assert_eq!(Marker::decode(&bare.encode()), Ok(bare));
        for bad in [
            "",
            "uuid=11",
            "v=2\nuuid=11111111111111111111111111111111",
            "v=1",
            "v=1\nx",
        ] {
            assert!(Marker::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn on_a_file() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("disk.img");
        std::fs::write(&p, b"x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&p).unwrap_or_else(|e| panic!("{e}")), None);
        match write(&p, &full()) {
            Ok(()) => assert_eq!(read(&p).unwrap_or_else(|e| panic!("{e}")), Some(full())),
            // tmpfs before 6.6 keeps no user xattrs: nothing to test here.
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
