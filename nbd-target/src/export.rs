//! The recovery site's read-only NBD exports: each replica, by disk id, at
//! its latest applied state, so the site can always look at what it holds
//! (`nbdcopy`, `nbdinfo`, `nbdfuse`, qemu). One thread per client; writes
//! are refused with EPERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbd::protocol::*;
use nbd::{Command, ExportLimits, Outcome};

use crate::registry::Registry;

/// Largest READ served.
const MAX_READ: u32 = 32 << 20;

/// Serve every replica read-only on `listener` until `stop` is set.
pub fn serve(listener: TcpListener, registry: Arc<Registry>, stop: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let reg = registry.clone();
                let _ = std::thread::Builder::new()
                    .name("nbd-export".into())
                    .spawn(move || {
                        if let Err(e) = client(s, &reg) {
                            log::debug!("NBD export client {peer}: {e}");
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                log::warn!("NBD export listener: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn exports(registry: &Registry) -> Vec<(nbd::Export, Arc<crate::registry::DiskEntry>)> {
    registry
        .all()
        .into_iter()
        .filter_map(|e| {
            let st = e.state()?;
            let flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
            Some((
                nbd::Export {
                    name: e.id.clone(),
                    description: format!(
                        "blockship replica of {} at seq {} ({})",
                        e.id,
                        st.applied_seq,
                        if st.consistent() {
                            "consistent"
                        } else {
                            "not consistent"
                        }
                    ),
                    size: st.disk_size,
                    flags,
                    block_sizes: (1, 4096, MAX_READ),
                },
                e,
            ))
        })
        .collect()
}

fn client(mut s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let list = exports(registry);
    let offered: Vec<nbd::Export> = list.iter().map(|(x, _)| x.clone()).collect();
    let neg = match nbd::serve_handshake(&mut s, &offered) {
        Ok(Outcome::Transmission(n)) => n,
        Ok(Outcome::Aborted) => return Ok(()),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let (export, entry) = &list[neg.export];
    let mut reader = entry
        .spec
        .open_reader()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let lim = ExportLimits {
        size: export.size,
        read_only: true,
        max_payload: MAX_READ,
        structured_replies: neg.structured_replies,
        block_status: neg.base_allocation,
    };
    let mut hb = [0u8; REQUEST_HEADER_LEN];
    let mut buf = Vec::new();
    let mut junk = vec![0u8; 64 << 10];
    loop {
        s.read_exact(&mut hb)?;
        let h = nbd::RequestHeader::decode(&hb)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .ok_or_else(|| std::io::Error::other("short request header"))?;
        match nbd::validate(&h, &lim) {
            Ok(Command::Read { offset, len }) => {
                buf.resize(len as usize, 0);
                match reader.read(offset, &mut buf) {
                    Ok(()) => {
                        if neg.structured_replies {
                            s.write_all(&nbd::reply::offset_data(h.cookie, offset, len))?;
                        } else {
                            s.write_all(&nbd::reply::simple(h.cookie, 0))?;
                        }
                        s.write_all(&buf)?;
                    }
                    Err(e) => reply_err(
                        &mut s,
                        neg.structured_replies,
                        h.cookie,
                        Errno::from_os(e.raw_os_error().unwrap_or(libc::EIO)),
                        "reading the replica failed",
                    )?,
                }
            }
            Ok(Command::BlockStatus { len, .. }) => {
                // Conservative: the whole range reads as data.
                let ext = [nbd::reply::Extent {
                    length: len,
                    flags: 0,
                }];
                nbd::reply::block_status_done(
                    h.cookie,
                    nbd::handshake::BASE_ALLOCATION_ID,
                    &ext,
                    &mut buf,
                );
                s.write_all(&buf)?;
            }
            Ok(Command::Disconnect) => return Ok(()),
            Ok(Command::Flush | Command::Cache { .. }) => {
                ok(&mut s, neg.structured_replies, h.cookie)?
            }
            Ok(_) => reply_err(
                &mut s,
                neg.structured_replies,
                h.cookie,
                Errno::Perm,
                "the replica export is read-only",
            )?,
            Err(rej) => {
                let mut left = rej.skip_payload as usize;
                while left > 0 {
                    let n = left.min(junk.len());
                    s.read_exact(&mut junk[..n])?;
                    left -= n;
                }
                reply_err(
                    &mut s,
                    neg.structured_replies,
                    h.cookie,
                    rej.errno,
                    rej.reason,
                )?;
            }
        }
    }
}

fn ok(s: &mut TcpStream, structured: bool, cookie: u64) -> std::io::Result<()> {
    if structured {
        s.write_all(&nbd::reply::none_done(cookie))
    } else {
        s.write_all(&nbd::reply::simple(cookie, 0))
    }
}

fn reply_err(
    s: &mut TcpStream,
    structured: bool,
    cookie: u64,
    e: Errno,
    why: &str,
) -> std::io::Result<()> {
    if structured {
        let mut b = [0u8; nbd::reply::ERROR_CHUNK_MAX];
        let n = nbd::reply::error_done(cookie, e, why, &mut b);
        s.write_all(&b[..n])
    } else {
        s.write_all(&nbd::reply::simple(cookie, e.code()))
    }
}

/// Bind the export listener.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}
