//! Server side of the fixed newstyle handshake: option haggling until the
//! client enters transmission (EXPORT_NAME or GO) or gives up (ABORT).
//!
//! Generic over any blocking `Read + Write` stream; the caller decides about
//! sockets, timeouts and threads.

use std::io::{Read, Write};

use crate::protocol::*;
use crate::{Error, Result};

/// Largest option payload accepted. The largest legitimate option is a
/// meta-context request with a few 4 KiB strings; anything bigger is refused
/// with `NBD_REP_ERR_TOO_BIG` and the connection closed, so no allocation is
/// ever sized by the client beyond this.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Context id blockship gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// One export as the handshake presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Name clients ask for; the empty name also selects the first export.
    pub name: String,
    /// Human-readable description (NBD_INFO_DESCRIPTION).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags offered (without `NBD_FLAG_SEND_DF`, which is
    /// added when structured replies are negotiated).
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE).
    pub block_sizes: (u32, u32, u32),
}

/// What a successful handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in the slice given to [`serve_handshake`].
    pub export: usize,
    /// Structured replies are in use.
    pub structured_replies: bool,
    /// `base:allocation` was selected: BLOCK_STATUS is allowed.
    pub base_allocation: bool,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// How the handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client entered transmission.
    Transmission(Negotiated),
    /// The client sent NBD_OPT_ABORT (or closed during haggling).
    Aborted,
}

struct State {
    structured: bool,
    /// Export name the selected contexts belong to, and whether
    /// base:allocation is among them.
    contexts: Option<(String, bool)>,
}

/// Run the server's side of the handshake on `s`.
pub fn serve_handshake<S: Read + Write>(s: &mut S, exports: &[Export]) -> Result<Outcome> {
    let mut list = exports.to_vec();
    serve_handshake_with(s, &mut list, &|name| {
        Err(format!("no export named {name:?}"))
    })
}

/// Looks up an export the list does not name (a name with parameters,
/// like a recovery point `disk@123`); the error is the message the client
/// is given (NBD_REP_ERR_UNKNOWN).
pub type ExportLookup<'a> = &'a dyn Fn(&str) -> std::result::Result<Export, String>;

/// [`serve_handshake`] where names not in `exports` are asked of `lookup`;
/// an export it finds is appended to `exports` (so a negotiated index may
/// point past the list the caller passed in).
pub fn serve_handshake_with<S: Read + Write>(
    s: &mut S,
    exports: &mut Vec<Export>,
    lookup: ExportLookup<'_>,
) -> Result<Outcome> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).map_err(Error::io("sending greeting"))?;

    let mut b4 = [0u8; 4];
    s.read_exact(&mut b4)
        .map_err(Error::io("reading client flags"))?;
    let client_flags = u32::from_be_bytes(b4);
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(Error::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut st = State {
        structured: false,
        contexts: None,
    };
    loop {
        let mut h = [0u8; 16];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Aborted),
            Err(e) => return Err(Error::io("reading option header")(e)),
        }
        let magic = crate::request::be_u64(&h[0..8]);
        if magic != IHAVEOPT {
            return Err(Error::BadMagic {
                context: "option header",
                expected: IHAVEOPT,
                got: magic,
            });
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if len > MAX_OPTION_DATA {
            // Best effort: the client may not be reading any more.
            let _ = reply(s, opt, REP_ERR_TOO_BIG, b"option data too large");
            return Err(Error::OptionTooLarge {
                option: option_name(opt),
                len,
                max: MAX_OPTION_DATA,
            });
        }
        // Bounded by MAX_OPTION_DATA above.
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .map_err(Error::io("reading option data"))?;
        log::debug!("NBD option {} ({} bytes)", option_name(opt), len);

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Ok(idx) = find_or_lookup(&mut *exports, lookup, &name) else {
                    return Err(Error::UnknownExport(name.into_owned()));
                };
                let neg = negotiated(&st, exports, idx);
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&exports[idx].size.to_be_bytes());
                out.extend_from_slice(&neg.flags.to_be_bytes());
                if !no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                s.write_all(&out)
                    .map_err(Error::io("answering NBD_OPT_EXPORT_NAME"))?;
                return Ok(Outcome::Transmission(neg));
            }
            OPT_ABORT => {
                let _ = reply(s, opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports.iter() {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&len_u32(e.name.len()).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    reply(s, opt, REP_SERVER, &d)?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                st.structured = true;
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    reply(s, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")?;
                    continue;
                };
                let idx = match find_or_lookup(&mut *exports, lookup, &name) {
                    Ok(i) => i,
                    Err(msg) => {
                        reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    }
                };
                let neg = negotiated(&st, exports, idx);
                send_info(s, opt, &exports[idx], neg.flags, &requests)?;
                reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Outcome::Transmission(neg));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(s, opt, &data, &mut *exports, lookup, &mut st)?;
            }
            OPT_STARTTLS => {
                reply(
                    s,
                    opt,
                    REP_ERR_POLICY,
                    b"TLS is not offered on this export; use a unix socket or loopback",
                )?;
            }
            _ => {
                let msg = format!("option {opt} ({}) is not supported", option_name(opt));
                reply(s, opt, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}

fn find_or_lookup(
    exports: &mut Vec<Export>,
    lookup: ExportLookup<'_>,
    name: &str,
) -> std::result::Result<usize, String> {
    if let Some(i) = find_export(exports, name) {
        return Ok(i);
    }
    let e = lookup(name)?;
    exports.push(e);
    Ok(exports.len() - 1)
}

fn find_export(exports: &[Export], name: &str) -> Option<usize> {
    if name.is_empty() && !exports.is_empty() {
        return Some(0);
    }
    exports.iter().position(|e| e.name == name)
}

fn negotiated(st: &State, exports: &[Export], idx: usize) -> Negotiated {
    let e = &exports[idx];
    let base_allocation = st.structured
        && st
            .contexts
            .as_ref()
            .is_some_and(|(name, base)| *base && find_export(exports, name) == Some(idx));
    let mut flags = e.flags | FLAG_HAS_FLAGS;
    if st.structured {
        flags |= FLAG_SEND_DF;
    }
    Negotiated {
        export: idx,
        structured_replies: st.structured,
        base_allocation,
        flags,
    }
}

/// Strings are at most 4096 bytes and our replies are small, so lengths fit.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn reply<S: Write>(s: &mut S, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out).map_err(Error::io("sending option reply"))
}

/// A cursor over option data that never reads past its end.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.u32()?).ok()?;
        if n > MAX_STRING_LEN {
            return None;
        }
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

// Format: NBD_OPT_INFO / NBD_OPT_GO data: name length u32, name, number of
// information requests u16, that many u16 NBD_INFO_* values.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut reqs = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, reqs))
}

fn send_info<S: Write>(
    s: &mut S,
    opt: u32,
    e: &Export,
    flags: u16,
    requests: &[u16],
) -> Result<()> {
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&e.size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    reply(s, opt, REP_INFO, &d)?;

    let (min, pref, max) = e.block_sizes;
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, pref, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    reply(s, opt, REP_INFO, &d)?;

    for (kind, text) in [(INFO_NAME, &e.name), (INFO_DESCRIPTION, &e.description)] {
        if requests.contains(&kind) {
            let mut d = Vec::with_capacity(2 + text.len());
            d.extend_from_slice(&kind.to_be_bytes());
            d.extend_from_slice(text.as_bytes());
            reply(s, opt, REP_INFO, &d)?;
        }
    }
    Ok(())
}

// Format: NBD_OPT_{LIST,SET}_META_CONTEXT data: export name (u32 length +
// bytes), number of queries u32, then each query as u32 length + bytes.
fn meta_context<S: Write>(
    s: &mut S,
    opt: u32,
    data: &[u8],
    exports: &mut Vec<Export>,
    lookup: ExportLookup<'_>,
    st: &mut State,
) -> Result<()> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set && !st.structured {
        return reply(
            s,
            opt,
            REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
        );
    }
    let mut c = Cur(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
        }
        c.0.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply(s, opt, REP_ERR_INVALID, b"malformed meta context request");
    };
    if let Err(msg) = find_or_lookup(&mut *exports, lookup, &name) {
        return reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes());
    }
    let matches = |q: &str| {
        if set {
            q == CONTEXT_BASE_ALLOCATION
        } else {
            q == CONTEXT_BASE_ALLOCATION || q == "base:"
        }
    };
    let base = if queries.is_empty() {
        !set
    } else {
        queries.iter().any(|q| matches(q))
    };
    if base {
        let mut d = Vec::with_capacity(4 + CONTEXT_BASE_ALLOCATION.len());
        d.extend_from_slice(&crate::handshake::BASE_ALLOCATION_ID.to_be_bytes());
        d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
        reply(s, opt, REP_META_CONTEXT, &d)?;
    }
    if set {
        st.contexts = Some((name, base));
    }
    reply(s, opt, REP_ACK, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream whose reads come from a script and whose writes are kept.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn export() -> Export {
        Export {
            name: "disk".into(),
            description: "test".into(),
            size: 1 << 20,
            flags: FLAG_SEND_FLUSH,
            block_sizes: (1, 4096, 1 << 25),
        }
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&len_u32(data.len()).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn run(input: Vec<u8>) -> (Result<Outcome>, Vec<u8>) {
        let mut s = Script {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = serve_handshake(&mut s, &[export()]);
        (r, s.output)
    }

    #[test]
    fn golden_greeting() {
        let (_, out) = run(vec![]);
        assert_eq!(
            out,
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0, 3
            ]
        );
    }

    #[test]
    fn export_name_enters_transmission_without_zeroes() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b"disk"));
        let (r, out) = run(input);
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("expected transmission")
        };
        assert_eq!(n.flags, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
        assert_eq!(&out[18..], &[0, 0, 0, 0, 0, 0x10, 0, 0, 0, 5]);
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut q = Vec::new();
        q.extend_from_slice(&4u32.to_be_bytes());
        q.extend_from_slice(b"disk");
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        input.extend(option(OPT_SET_META_CONTEXT, &q));
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(option(OPT_GO, &go));
        let (r, _) = run(input);
        let Outcome::Transmission(n) = r.unwrap() else {
            panic!("expected transmission")
        };
        assert!(n.structured_replies && n.base_allocation);
        assert_ne!(n.flags & FLAG_SEND_DF, 0);
    }

    #[test]
    fn absurd_option_length_is_refused_without_allocating() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut o = option(OPT_GO, &[]);
        o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(o);
        let (r, out) = run(input);
        assert!(matches!(r, Err(Error::OptionTooLarge { .. })));
        assert_eq!(&out[18 + 12..18 + 16], &REP_ERR_TOO_BIG.to_be_bytes());
    }

    #[test]
    fn malformed_go_is_answered_not_fatal() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(OPT_GO, &[0, 0, 0, 9, b'x']));
        input.extend(option(OPT_ABORT, &[]));
        let (r, out) = run(input);
        assert_eq!(r.unwrap(), Outcome::Aborted);
        assert_eq!(&out[18 + 12..18 + 16], &REP_ERR_INVALID.to_be_bytes());
    }

    #[test]
    fn unknown_client_flags_close() {
        let (r, _) = run(0x80u32.to_be_bytes().to_vec());
        assert!(matches!(r, Err(Error::UnknownClientFlags(0x80))));
    }
}
