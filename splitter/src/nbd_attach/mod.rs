//! `splitter nbd-attach`: the kernel's NBD client (`/dev/nbdN`) attached to
//! an NBD server through the kernel's netlink interface, with a
//! dead-connection timeout, and reconnected when a connection dies.
//!
//! Debian 12's `nbd-client` (3.24) configures a device over netlink but sets
//! no dead-connection timeout and does not reconnect: when the splitter
//! restarts, every request in flight fails and the file system on the
//! device sees I/O errors. This does what the kernel offers for that: it
//! connects with `NBD_ATTR_DEAD_CONN_TIMEOUT` (requests issued while no
//! connection is alive wait that long instead of failing), a request
//! timeout (a request a dead connection never answers is requeued then),
//! and stays in the foreground listening for the kernel's
//! `NBD_CMD_LINK_DEAD` notification; on one, it connects again (the NBD
//! handshake, simple replies: the kernel reads no structured replies) and
//! hands the new socket over with `NBD_CMD_RECONFIGURE`.
//! (`linux/nbd-netlink.h`, `drivers/block/nbd.c`.)
//!
//! This module is not an NBD data path: the kernel does the I/O.

pub mod netlink;

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netlink::{attr_u32, attrs, Msg, Socket};

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_LINK_DEAD: u8 = 4;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const FAMILY_VERSION: u8 = 1;
const MCAST_GROUP: &str = "nbd_mc_group";

/// What went wrong attaching or reconnecting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The kernel has no NBD client.
    #[error("the kernel has no NBD client over netlink (generic netlink family \"nbd\" not found): load it with `modprobe nbd`")]
    NoNbd,
    /// The device name is not /dev/nbdN.
    #[error("{0}: not an NBD device (expected /dev/nbdN)")]
    Device(String),
    /// The server could not be reached or refused the export.
    #[error("connecting to {server} (export {export:?}): {err}")]
    Server {
        /// HOST:PORT.
        server: String,
        /// The export.
        export: String,
        /// Why.
        err: String,
    },
    /// A netlink request failed.
    #[error("{what} of /dev/nbd{index}: {err}")]
    Kernel {
        /// The request.
        what: &'static str,
        /// The device.
        index: u32,
        /// The kernel's error.
        err: io::Error,
    },
}

/// `splitter nbd-attach` options.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// N of /dev/nbdN.
    pub index: u32,
    /// HOST:PORT of the NBD server.
    pub server: String,
    /// The export name.
    pub export: String,
    /// Connections (the server must advertise multi-conn for more than 1).
    pub connections: u32,
    /// Seconds before an unanswered request is requeued (and its
    /// connection declared dead).
    pub timeout: u64,
    /// Seconds requests wait for a live connection before they fail.
    pub dead_conn_timeout: u64,
}

/// N of `/dev/nbdN`.
pub fn device_index(dev: &Path) -> Result<u32, AttachError> {
    dev.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| AttachError::Device(dev.display().to_string()))
}

/// One TCP connection in transmission phase: its size and flags.
fn dial(o: &AttachOptions) -> Result<(TcpStream, u64, u16), AttachError> {
    let err = |e: String| AttachError::Server {
        server: o.server.clone(),
        export: o.export.clone(),
        err: e,
    };
    use std::net::ToSocketAddrs;
    let addr = o
        .server
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("the name resolves to no address".into()))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| err(e.to_string()))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| err(e.to_string()))?;
    let c = nbd::client::Client::connect_simple(s, &o.export).map_err(|e| err(e.to_string()))?;
    let (size, flags) = (c.size(), c.flags());
    let s = c.into_stream();
    // The kernel reads and writes the socket without timeouts of its own.
    s.set_read_timeout(None).map_err(|e| err(e.to_string()))?;
    Ok((s, size, flags))
}

fn family(sock: &mut Socket, index: u32) -> Result<(u16, Vec<(String, u32)>), AttachError> {
    sock.family("nbd").map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOENT) {
            AttachError::NoNbd
        } else {
            AttachError::Kernel {
                what: "looking up the nbd netlink family",
                index,
                err: e,
            }
        }
    })
}

/// Attach `/dev/nbdN`, then keep it connected until `stop`: each
/// connection the kernel reports dead is dialled again and handed over.
/// Returns when `stop` is set (the device stays attached: `--detach`
/// removes it).
pub fn attach(o: &AttachOptions, stop: &AtomicBool) -> Result<(), AttachError> {
    let mut ctl = Socket::open().map_err(|err| AttachError::Kernel {
        what: "opening a netlink socket",
        index: o.index,
        err,
    })?;
    ctl.set_timeout(Duration::from_secs(10))
        .map_err(|err| AttachError::Kernel {
            what: "netlink socket timeout",
            index: o.index,
            err,
        })?;
    let (fam, groups) = family(&mut ctl, o.index)?;
    // Listen before connecting: a connection that dies at once is not missed.
    let mut events = Socket::open().map_err(|err| AttachError::Kernel {
        what: "opening a netlink socket",
        index: o.index,
        err,
    })?;
    match groups.iter().find(|(n, _)| n == MCAST_GROUP) {
        Some((_, g)) => events.join(*g).map_err(|err| AttachError::Kernel {
            what: "joining the nbd multicast group",
            index: o.index,
            err,
        })?,
        None => log::warn!("the kernel's nbd module has no {MCAST_GROUP} multicast group: dead connections will not be noticed, so this will not reconnect"),
    }
    let _ = events.set_timeout(Duration::from_millis(500));

    let mut socks = Vec::new();
    let (mut size, mut flags) = (0, 0);
    for i in 0..o.connections.max(1) {
        let (s, sz, fl) = dial(o)?;
        if i > 0 && (sz != size || fl != flags) {
            return Err(AttachError::Server {
                server: o.server.clone(),
                export: o.export.clone(),
                err: "the connections disagree on the export's size or flags".into(),
            });
        }
        (size, flags) = (sz, fl);
        socks.push(s);
    }
    if socks.len() > 1 && flags & nbd::protocol::FLAG_CAN_MULTI_CONN == 0 {
        return Err(AttachError::Server {
            server: o.server.clone(),
            export: o.export.clone(),
            err: "the export does not advertise multi-conn: use one connection".into(),
        });
    }
    let mut m = Msg::new(fam, NBD_CMD_CONNECT, FAMILY_VERSION);
    m.put_u32(NBD_ATTR_INDEX, o.index)
        .put_u64(NBD_ATTR_SIZE_BYTES, size)
        .put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, 512)
        .put_u64(NBD_ATTR_TIMEOUT, o.timeout)
        .put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, o.dead_conn_timeout)
        .put_u64(NBD_ATTR_SERVER_FLAGS, u64::from(flags))
        .put_u64(NBD_ATTR_CLIENT_FLAGS, 0)
        .begin(NBD_ATTR_SOCKETS);
    for s in &socks {
        let fd = u32::try_from(s.as_raw_fd()).unwrap_or(u32::MAX);
        m.begin(NBD_SOCK_ITEM).put_u32(NBD_SOCK_FD, fd).end();
    }
    m.end();
    ctl.request(&mut m).map_err(|err| AttachError::Kernel {
        what: "NBD_CMD_CONNECT",
        index: o.index,
        err,
    })?;
    // The kernel holds its own references to the sockets now.
    drop(socks);
    log::info!(
        "attached /dev/nbd{} to {} export {:?}: {size} bytes, {} connection(s), request timeout {} s, dead-connection timeout {} s",
        o.index,
        o.server,
        o.export,
        o.connections.max(1),
        o.timeout,
        o.dead_conn_timeout
    );

    // Connections reported dead and not yet replaced.
    let mut dead = 0u32;
    let mut dead_since: Option<Instant> = None;
    let mut next_try = Instant::now();
    let mut last_warning: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        match events.receive() {
            Ok(msgs) => {
                for r in msgs {
                    if r.family == fam
                        && r.cmd == NBD_CMD_LINK_DEAD
                        && attrs(&r.attrs)
                            .iter()
                            .any(|&(t, v)| t == NBD_ATTR_INDEX && attr_u32(v) == Some(o.index))
                    {
                        dead += 1;
                        dead_since.get_or_insert_with(Instant::now);
                        log::warn!(
                            "/dev/nbd{}: the kernel reports a dead connection to {}: reconnecting (requests wait up to {} s)",
                            o.index,
                            o.server,
                            o.dead_conn_timeout
                        );
                    }
                }
            }
            Err(e) => log::warn!("reading nbd notifications: {e}"),
        }
        if dead == 0 || Instant::now() < next_try {
            continue;
        }
        match reconnect(o, &mut ctl, fam, size) {
            Ok(()) => {
                dead -= 1;
                log::info!(
                    "/dev/nbd{}: reconnected to {} after {} ms",
                    o.index,
                    o.server,
                    dead_since.map_or(0, |t| t.elapsed().as_millis())
                );
                if dead == 0 {
                    dead_since = None;
                    last_warning = None;
                }
            }
            Err(AttachError::Kernel { err, .. }) if err.raw_os_error() == Some(libc::ENOSPC) => {
                // No dead connection left to replace: the kernel has them all.
                log::info!("/dev/nbd{}: no connection is dead any more", o.index);
                dead = 0;
                dead_since = None;
            }
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    log::warn!(
                        "/dev/nbd{}: reconnecting for {} s: {e} (trying every 200 ms)",
                        o.index,
                        dead_since.map_or(0, |t| t.elapsed().as_secs())
                    );
                    last_warning = Some(Instant::now());
                }
                next_try = Instant::now() + Duration::from_millis(200);
            }
        }
    }
    log::info!(
        "stopping: /dev/nbd{} stays attached but will not reconnect by itself (`splitter nbd-attach --device /dev/nbd{} --detach` removes it)",
        o.index,
        o.index
    );
    Ok(())
}

/// Dial once and hand the socket to the kernel in place of a dead one.
fn reconnect(o: &AttachOptions, ctl: &mut Socket, fam: u16, size: u64) -> Result<(), AttachError> {
    let (s, sz, _) = dial(o)?;
    if sz != size {
        return Err(AttachError::Server {
            server: o.server.clone(),
            export: o.export.clone(),
            err: format!("the export is {sz} bytes now, not {size}: not the same disk"),
        });
    }
    let fd = u32::try_from(s.as_raw_fd()).unwrap_or(u32::MAX);
    let mut m = Msg::new(fam, NBD_CMD_RECONFIGURE, FAMILY_VERSION);
    m.put_u32(NBD_ATTR_INDEX, o.index)
        .begin(NBD_ATTR_SOCKETS)
        .begin(NBD_SOCK_ITEM)
        .put_u32(NBD_SOCK_FD, fd)
        .end()
        .end();
    ctl.request(&mut m).map_err(|err| AttachError::Kernel {
        what: "NBD_CMD_RECONFIGURE",
        index: o.index,
        err,
    })?;
    Ok(())
}

/// Disconnect `/dev/nbdN` (`--detach`).
pub fn detach(index: u32) -> Result<(), AttachError> {
    let mut ctl = Socket::open().map_err(|err| AttachError::Kernel {
        what: "opening a netlink socket",
        index,
        err,
    })?;
    let _ = ctl.set_timeout(Duration::from_secs(10));
    let (fam, _) = family(&mut ctl, index)?;
    let mut m = Msg::new(fam, NBD_CMD_DISCONNECT, FAMILY_VERSION);
    m.put_u32(NBD_ATTR_INDEX, index);
    ctl.request(&mut m).map_err(|err| AttachError::Kernel {
        what: "NBD_CMD_DISCONNECT",
        index,
        err,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        assert!(device_index(Path::new("/dev/sda")).is_err());
        assert!(device_index(Path::new("/dev/nbd")).is_err());
    }
}
