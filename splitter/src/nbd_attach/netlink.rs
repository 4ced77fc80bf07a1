//! Generic netlink, as much of it as the kernel NBD client's control needs:
//! messages with nested attributes, a request answered by an ACK, family
//! and multicast-group lookup, and receiving multicast notifications.
//! (`linux/netlink.h`, `linux/genetlink.h`.)

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
/// SOL_NETLINK / NETLINK_ADD_MEMBERSHIP (linux/netlink.h).
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A generic netlink request being built.
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    /// A request for command `cmd` (version `version`) of `family`.
    pub fn new(family: u16, cmd: u8, version: u8) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDR];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn header(&mut self, ty: u16, len: usize) {
        // Attribute lengths are u16: every attribute here is small.
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
    }

    /// Add attribute `ty` with `payload`.
    pub fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Msg {
        self.header(ty, 4 + payload.len());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Add a u32 attribute.
    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.put(ty, &v.to_ne_bytes())
    }

    /// Add a u64 attribute.
    pub fn put_u64(&mut self, ty: u16, v: u64) -> &mut Msg {
        self.put(ty, &v.to_ne_bytes())
    }

    /// Open a nested attribute `ty` (closed by [`Msg::end`]).
    pub fn begin(&mut self, ty: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.header(ty | NLA_F_NESTED, 0);
        self
    }

    /// Close the innermost nested attribute.
    pub fn end(&mut self) -> &mut Msg {
        if let Some(at) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// The attributes in `b`: (type without flags, payload).
pub fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = usize::from(u16_at(b, at));
        if len < 4 || at + len > b.len() {
            break;
        }
        out.push((u16_at(b, at + 2) & NLA_TYPE_MASK, &b[at + 4..at + len]));
        at += align4(len);
    }
    out
}

/// A u32 attribute's value.
pub fn attr_u32(payload: &[u8]) -> Option<u32> {
    payload.first_chunk::<4>().map(|b| u32::from_ne_bytes(*b))
}

/// One message received: its generic netlink command and attributes.
#[derive(Debug, Clone)]
pub struct Received {
    /// The netlink message type (the family).
    pub family: u16,
    /// The sequence number of the request it answers (0: a notification).
    pub seq: u32,
    /// The generic netlink command.
    pub cmd: u8,
    /// The attributes, raw.
    pub attrs: Vec<u8>,
}

/// A generic netlink socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// A new socket, bound (the kernel picks the port id).
    pub fn open() -> io::Result<Socket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Socket {
            fd,
            seq: 1,
            buf: vec![0u8; 64 << 10],
        })
    }

    /// Wait at most `t` in [`Socket::receive`].
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = TimeVal::new(
            i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            i64::from(t.subsec_micros()),
        );
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// Receive multicast notifications of multicast group `group`.
    pub fn join(&self, group: u32) -> io::Result<()> {
        // 4: the size of the u32 passed.
        const LEN: libc::socklen_t = 4;
        // SAFETY: setsockopt reads sizeof(u32) bytes from a live u32 on
        // this stack frame; the descriptor is this socket's, open.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                std::ptr::from_ref(&group).cast(),
                LEN,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The messages of one datagram (empty after a timeout).
    pub fn receive(&mut self) -> io::Result<Vec<Received>> {
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let b = &self.buf[..n];
        let mut out = Vec::new();
        let mut at = 0;
        while at + NLMSG_HDR <= b.len() {
            let len = u32_at(b, at) as usize;
            if len < NLMSG_HDR || at + len > b.len() {
                break;
            }
            let ty = u16_at(b, at + 4);
            let seq = u32_at(b, at + 8);
            let body = &b[at + NLMSG_HDR..at + len];
            match ty {
                NLMSG_ERROR => {
                    let code = body
                        .first_chunk::<4>()
                        .map_or(0, |c| i32::from_ne_bytes(*c));
                    // The error code rides in `cmd`'s place: see request().
                    out.push(Received {
                        family: NLMSG_ERROR,
                        seq,
                        cmd: 0,
                        attrs: code.to_ne_bytes().to_vec(),
                    });
                }
                NLMSG_DONE => {}
                _ if body.len() >= GENL_HDR => out.push(Received {
                    family: ty,
                    seq,
                    cmd: body[0],
                    attrs: body[GENL_HDR..].to_vec(),
                }),
                _ => {}
            }
            at += align4(len);
        }
        Ok(out)
    }

    /// Send `msg` and wait for its ACK; the replies that came before it.
    pub fn request(&mut self, msg: &mut Msg) -> io::Result<Vec<Received>> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        send(self.fd.as_raw_fd(), bytes, MsgFlags::empty())?;
        let mut replies = Vec::new();
        for _ in 0..64 {
            let got = self.receive()?;
            if got.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from the kernel",
                ));
            }
            for r in got {
                if r.seq != self.seq {
                    // A late answer to an earlier request that timed out.
                    continue;
                }
                if r.family == NLMSG_ERROR {
                    let code = r
                        .attrs
                        .first_chunk::<4>()
                        .map_or(0, |c| i32::from_ne_bytes(*c));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(replies);
                }
                replies.push(r);
            }
        }
        Err(io::Error::other(
            "the kernel never acknowledged the request",
        ))
    }

    /// The id of generic netlink family `name` and its multicast groups.
    pub fn family(&mut self, name: &str) -> io::Result<(u16, Vec<(String, u32)>)> {
        let mut m = Msg::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        m.put(CTRL_ATTR_FAMILY_NAME, &z);
        let replies = self.request(&mut m)?;
        let mut id = None;
        let mut groups = Vec::new();
        for r in &replies {
            for (ty, p) in attrs(&r.attrs) {
                match ty {
                    CTRL_ATTR_FAMILY_ID if p.len() >= 2 => id = Some(u16_at(p, 0)),
                    CTRL_ATTR_MCAST_GROUPS => {
                        for (_, g) in attrs(p) {
                            let (mut gname, mut gid) = (None, None);
                            for (t, v) in attrs(g) {
                                match t {
                                    CTRL_ATTR_MCAST_GRP_NAME => {
                                        gname = Some(
                                            String::from_utf8_lossy(v)
                                                .trim_end_matches('\0')
                                                .to_string(),
                                        )
                                    }
                                    CTRL_ATTR_MCAST_GRP_ID => gid = attr_u32(v),
                                    _ => {}
                                }
                            }
                            if let (Some(n), Some(i)) = (gname, gid) {
                                groups.push((n, i));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        id.map(|i| (i, groups))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any error
    use super::*;

    #[test]
    fn nested_attributes_round_trip() {
        let mut m = Msg::new(0x20, 1, 1);
        m.put_u32(1, 7).begin(7).begin(1).put_u32(1, 9).end().end();
        m.put_u64(8, 120);
        let b = m.finish(3).to_vec();
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        assert_eq!(u32_at(&b, 8), 3);
        let top = attrs(&b[NLMSG_HDR + GENL_HDR..]);
        assert_eq!(top.len(), 3);
        assert_eq!((top[0].0, attr_u32(top[0].1)), (1, Some(7)));
        assert_eq!(top[1].0, 7, "the nested flag is masked off");
        let item = attrs(top[1].1);
        assert_eq!(item.len(), 1);
        let fd = attrs(item[0].1);
        assert_eq!((fd[0].0, attr_u32(fd[0].1)), (1, Some(9)));
        assert_eq!(top[2].1, 120u64.to_ne_bytes());
    }

    #[test]
    fn truncated_attributes_stop_the_walk() {
        let mut m = Msg::new(0x20, 1, 1);
        m.put_u32(1, 7).put_u32(2, 8);
        let b = m.finish(1).to_vec();
        let body = &b[NLMSG_HDR + GENL_HDR..b.len() - 2];
        assert_eq!(attrs(body).len(), 1);
    }
}
