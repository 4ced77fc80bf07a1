//! Client side: fixed newstyle handshake (structured replies,
//! `base:allocation`, NBD_OPT_GO) and synchronous transmission, one request
//! at a time. Used by the recovery site to drive upstream NBD servers.

use std::io::{Read, Write};

use crate::protocol::*;
use crate::reply::{Extent, ReplyHeader};
use crate::request::RequestHeader;
use crate::{Error, Result};

/// Largest non-data chunk payload the client accepts from a server (error
/// messages, block status descriptors); bigger is a protocol violation.
const MAX_CHUNK: u32 = 1 << 20;

/// An NBD connection in transmission phase.
#[derive(Debug)]
pub struct Client<S> {
    s: S,
    size: u64,
    flags: u16,
    structured: bool,
    base_allocation: Option<u32>,
    block_sizes: Option<(u32, u32, u32)>,
    next_cookie: u64,
}

fn read_exact<S: Read>(s: &mut S, buf: &mut [u8], context: &'static str) -> Result<()> {
    s.read_exact(buf).map_err(Error::io(context))
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| Error::Protocol("option data longer than 4 GiB".into()))?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out).map_err(Error::io("sending option"))
}

/// One option reply: its type and data.
fn read_option_reply<S: Read>(s: &mut S, opt: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h, "reading option reply")?;
    let magic = crate::request::be_u64(&h[0..8]);
    if magic != REPLY_MAGIC {
        return Err(Error::BadMagic {
            context: "option reply",
            expected: REPLY_MAGIC,
            got: magic,
        });
    }
    let got_opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if got_opt != opt {
        return Err(Error::Protocol(format!(
            "reply to option {got_opt} while waiting for {opt}"
        )));
    }
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    if len > MAX_CHUNK {
        return Err(Error::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    read_exact(s, &mut data, "reading option reply data")?;
    Ok((kind, data))
}

fn refused(opt: u32, kind: u32, data: &[u8]) -> Error {
    Error::Refused {
        what: option_name(opt).to_string(),
        reason: format!("reply {kind:#x}: {}", String::from_utf8_lossy(data)),
    }
}

fn string_field(s: &str) -> Vec<u8> {
    // Export names and context names are at most 4096 bytes by protocol.
    let mut v = u32::try_from(s.len()).unwrap_or(0).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn greet<S: Read + Write>(s: &mut S) -> Result<()> {
    let mut g = [0u8; 18];
    read_exact(s, &mut g, "reading server greeting")?;
    let magic = crate::request::be_u64(&g[0..8]);
    if magic != NBDMAGIC {
        return Err(Error::BadMagic {
            context: "server greeting",
            expected: NBDMAGIC,
            got: magic,
        });
    }
    let opt_magic = crate::request::be_u64(&g[8..16]);
    if opt_magic != IHAVEOPT {
        return Err(Error::BadMagic {
            context: "server greeting (oldstyle servers are not supported)",
            expected: IHAVEOPT,
            got: opt_magic,
        });
    }
    let hflags = u16::from_be_bytes([g[16], g[17]]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol(
            "server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .map_err(Error::io("sending client flags"))
}

/// List the server's exports (NBD_OPT_LIST), then end the session politely.
pub fn list_exports<S: Read + Write>(mut s: S) -> Result<Vec<String>> {
    greet(&mut s)?;
    send_option(&mut s, OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (kind, data) = read_option_reply(&mut s, OPT_LIST)?;
        match kind {
            REP_ACK => break,
            REP_SERVER => {
                let Some(n) = data.first_chunk::<4>() else {
                    return Err(Error::Protocol("short NBD_REP_SERVER".into()));
                };
                let n = u32::from_be_bytes(*n) as usize;
                let name = data.get(4..4 + n).ok_or_else(|| {
                    Error::Protocol("NBD_REP_SERVER name longer than its reply".into())
                })?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            k => return Err(refused(OPT_LIST, k, &data)),
        }
    }
    send_option(&mut s, OPT_ABORT, &[])?;
    Ok(names)
}

impl<S: Read + Write> Client<S> {
    /// Handshake on `s` and enter transmission on `export`, with structured
    /// replies and `base:allocation` when the server has them.
    pub fn connect(s: S, export: &str) -> Result<Client<S>> {
        Client::connect_with(s, export, true)
    }

    /// Handshake on `s` and enter transmission on `export` with simple
    /// replies only: for a socket handed to the kernel's NBD client, which
    /// does not read structured replies.
    pub fn connect_simple(s: S, export: &str) -> Result<Client<S>> {
        Client::connect_with(s, export, false)
    }

    /// The connection, in transmission phase (for the kernel's NBD client).
    pub fn into_stream(self) -> S {
        self.s
    }

    fn connect_with(mut s: S, export: &str, want_structured: bool) -> Result<Client<S>> {
        greet(&mut s)?;

        let mut structured = false;
        if want_structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
            let (kind, data) = read_option_reply(&mut s, OPT_STRUCTURED_REPLY)?;
            structured = match kind {
                REP_ACK => true,
                k if k & REP_FLAG_ERROR != 0 => false,
                k => return Err(refused(OPT_STRUCTURED_REPLY, k, &data)),
            };
        }

        let mut base_allocation = None;
        if structured {
            let mut q = string_field(export);
            q.extend_from_slice(&1u32.to_be_bytes());
            q.extend(string_field(CONTEXT_BASE_ALLOCATION));
            send_option(&mut s, OPT_SET_META_CONTEXT, &q)?;
            loop {
                let (kind, data) = read_option_reply(&mut s, OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT => {
                        if let Some(id) = data.first_chunk::<4>() {
                            base_allocation = Some(u32::from_be_bytes(*id));
                        }
                    }
                    // Servers without metadata contexts refuse: carry on without.
                    _ => break,
                }
            }
        }

        let mut go = string_field(export);
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut s, OPT_GO, &go)?;
        let mut size_flags = None;
        let mut block_sizes = None;
        loop {
            let (kind, data) = read_option_reply(&mut s, OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    let info = data.first_chunk::<2>().map(|b| u16::from_be_bytes(*b));
                    match (info, data.len()) {
                        (Some(INFO_EXPORT), 12) => {
                            let size = crate::request::be_u64(&data[2..10]);
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            size_flags = Some((size, flags));
                        }
                        (Some(INFO_BLOCK_SIZE), 14) => {
                            let v = |i: usize| {
                                u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]])
                            };
                            block_sizes = Some((v(2), v(6), v(10)));
                        }
                        _ => {}
                    }
                }
                k => return Err(refused(OPT_GO, k, &data)),
            }
        }
        let (size, flags) = size_flags.ok_or_else(|| {
            Error::Protocol("server finished NBD_OPT_GO without NBD_INFO_EXPORT".into())
        })?;
        Ok(Client {
            s,
            size,
            flags,
            structured,
            base_allocation,
            block_sizes,
            next_cookie: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Block size constraints (minimum, preferred, maximum), if the server sent them.
    pub fn block_sizes(&self) -> Option<(u32, u32, u32)> {
        self.block_sizes
    }

    /// Structured replies are in use.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s
            .write_all(&h.encode())
            .map_err(Error::io("sending request"))?;
        if !payload.is_empty() {
            self.s
                .write_all(payload)
                .map_err(Error::io("sending write payload"))?;
        }
        Ok(cookie)
    }

    /// Read replies for `cookie` until done. Data chunks land in `buf`
    /// (which covers `offset..offset+buf.len()`); extents go to `extents`.
    /// With `cookie` None, the first reply's cookie is taken (raw requests
    /// answered out of order); the cookie answered is returned.
    fn finish(
        &mut self,
        name: &'static str,
        cookie: Option<u64>,
        offset: u64,
        mut buf: Option<&mut [u8]>,
        mut extents: Option<&mut Vec<Extent>>,
    ) -> Result<u64> {
        let mut cookie = cookie;
        let mut error: Option<(Errno, String)> = None;
        loop {
            let mut prefix = [0u8; 4];
            read_exact(&mut self.s, &mut prefix, "reading reply")?;
            let mut h = [0u8; STRUCTURED_REPLY_LEN];
            h[..4].copy_from_slice(&prefix);
            let len = ReplyHeader::len_from_prefix(prefix)?;
            read_exact(&mut self.s, &mut h[4..len], "reading reply")?;
            let hdr = ReplyHeader::decode(&h[..len])?
                .ok_or_else(|| Error::Protocol("short reply header".into()))?;
            match hdr {
                ReplyHeader::Simple {
                    error: e,
                    cookie: c,
                } => {
                    if *cookie.get_or_insert(c) != c {
                        return Err(Error::Protocol(format!("reply for unknown cookie {c}")));
                    }
                    if e != 0 {
                        return Err(request_error(
                            name,
                            c,
                            offset,
                            Errno::from_code(e),
                            String::new(),
                        ));
                    }
                    if let Some(b) = buf.as_deref_mut() {
                        read_exact(&mut self.s, b, "reading READ data")?;
                    }
                    return Ok(c);
                }
                ReplyHeader::Chunk(c) => {
                    if *cookie.get_or_insert(c.cookie) != c.cookie {
                        return Err(Error::Protocol(format!(
                            "chunk for unknown cookie {}",
                            c.cookie
                        )));
                    }
                    let buf_len = buf.as_deref().map_or(0, <[u8]>::len);
                    match c.kind {
                        REPLY_TYPE_NONE if c.length == 0 => {}
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                            let mut o = [0u8; 8];
                            read_exact(&mut self.s, &mut o, "reading chunk offset")?;
                            let at = u64::from_be_bytes(o);
                            let n = if c.kind == REPLY_TYPE_OFFSET_DATA {
                                u64::from(c.length.checked_sub(8).ok_or_else(|| {
                                    Error::Protocol("OFFSET_DATA chunk shorter than 8".into())
                                })?)
                            } else {
                                let mut l = [0u8; 4];
                                read_exact(&mut self.s, &mut l, "reading hole length")?;
                                u64::from(u32::from_be_bytes(l))
                            };
                            let rel = at.checked_sub(offset);
                            let range = rel.and_then(|r| {
                                let start = usize::try_from(r).ok()?;
                                let end = start.checked_add(usize::try_from(n).ok()?)?;
                                (end <= buf_len).then_some(start..end)
                            });
                            let (Some(range), Some(b)) = (range, buf.as_deref_mut()) else {
                                return Err(Error::Protocol("chunk outside the request".into()));
                            };
                            if c.kind == REPLY_TYPE_OFFSET_DATA {
                                read_exact(&mut self.s, &mut b[range], "reading READ data")?;
                            } else {
                                b[range].fill(0);
                            }
                        }
                        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            if c.length > MAX_CHUNK {
                                return Err(Error::Protocol(format!(
                                    "chunk of {} bytes",
                                    c.length
                                )));
                            }
                            let mut d = vec![0u8; c.length as usize];
                            read_exact(&mut self.s, &mut d, "reading chunk")?;
                            if c.kind == REPLY_TYPE_BLOCK_STATUS {
                                if let Some(ex) = extents.as_deref_mut() {
                                    for pair in d.get(4..).unwrap_or(&[]).chunks_exact(8) {
                                        ex.push(Extent {
                                            length: u32::from_be_bytes([
                                                pair[0], pair[1], pair[2], pair[3],
                                            ]),
                                            flags: u32::from_be_bytes([
                                                pair[4], pair[5], pair[6], pair[7],
                                            ]),
                                        });
                                    }
                                }
                            } else if d.len() >= 6 {
                                let errno =
                                    Errno::from_code(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                                let mlen = usize::from(u16::from_be_bytes([d[4], d[5]]));
                                let msg = d.get(6..6 + mlen).unwrap_or(&[]);
                                error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
                            } else {
                                return Err(Error::Protocol("error chunk shorter than 6".into()));
                            }
                        }
                        k => {
                            return Err(Error::Protocol(format!("unexpected chunk type {k}")));
                        }
                    }
                    if c.flags & REPLY_FLAG_DONE != 0 {
                        return match error {
                            Some((errno, msg)) => {
                                Err(request_error(name, c.cookie, offset, errno, msg))
                            }
                            None => Ok(c.cookie),
                        };
                    }
                }
            }
        }
    }

    fn length(len: usize) -> Result<u32> {
        u32::try_from(len).map_err(|_| Error::Protocol("request longer than 4 GiB".into()))
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = Self::length(buf.len())?;
        let cookie = self.send(CMD_READ, 0, offset, len, &[])?;
        self.finish("READ", Some(cookie), offset, Some(buf), None)
            .map(drop)
    }

    /// Write `data` at `offset`; with `fua`, durable before the reply.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = Self::length(data.len())?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send(CMD_WRITE, flags, offset, len, data)?;
        self.finish("WRITE", Some(cookie), offset, None, None)
            .map(drop)
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        let cookie = self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.finish("FLUSH", Some(cookie), 0, None, None).map(drop)
    }

    /// Discard `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        let cookie = self.send(CMD_TRIM, 0, offset, len, &[])?;
        self.finish("TRIM", Some(cookie), offset, None, None)
            .map(drop)
    }

    /// Zero `len` bytes at `offset`; `no_hole` forbids deallocating them.
    pub fn write_zeroes(&mut self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        let cookie = self.send(CMD_WRITE_ZEROES, flags, offset, len, &[])?;
        self.finish("WRITE_ZEROES", Some(cookie), offset, None, None)
            .map(drop)
    }

    /// Allocation status (`base:allocation`) of up to `len` bytes at `offset`.
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<Extent>> {
        if self.base_allocation.is_none() {
            return Err(Error::Refused {
                what: "NBD_CMD_BLOCK_STATUS".into(),
                reason: "the server did not agree to base:allocation".into(),
            });
        }
        let cookie = self.send(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut ex = Vec::new();
        self.finish("BLOCK_STATUS", Some(cookie), offset, None, Some(&mut ex))?;
        Ok(ex)
    }

    /// Send NBD_CMD_DISC and drop the connection.
    pub fn disconnect(mut self) -> Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        self.s.flush().map_err(Error::io("sending disconnect"))
    }

    /// Send a raw request (for tests of servers): header and payload as given.
    pub fn raw_request(&mut self, header: &RequestHeader, payload: &[u8]) -> Result<()> {
        self.s
            .write_all(&header.encode())
            .map_err(Error::io("sending request"))?;
        self.s
            .write_all(payload)
            .map_err(Error::io("sending payload"))
    }

    /// Read the next reply to a raw request, whichever it answers, and return
    /// its cookie and the server's errno (None for success). For READs pass
    /// `read_sink`, standing for offsets `0..len` of the export, to receive
    /// the data; for other requests pass None (a simple reply then carries
    /// no data).
    pub fn raw_reply(&mut self, read_sink: Option<&mut [u8]>) -> Result<(u64, Option<Errno>)> {
        match self.finish("raw request", None, 0, read_sink, None) {
            Ok(c) => Ok((c, None)),
            Err(Error::Request { errno, cookie, .. }) => Ok((cookie, Some(errno))),
            Err(e) => Err(e),
        }
    }
}

fn request_error(
    command: &'static str,
    cookie: u64,
    offset: u64,
    errno: Errno,
    msg: String,
) -> Error {
    let message = if msg.is_empty() {
        msg
    } else {
        format!(": {msg}")
    };
    Error::Request {
        command,
        cookie,
        offset,
        errno,
        message,
    }
}
