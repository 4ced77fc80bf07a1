//! Validation of a request against the export it addresses, in one function
//! with checked arithmetic: command, flags, read-only, range and size limits.

use crate::protocol::*;
use crate::request::RequestHeader;

/// What a connection negotiated and what its export allows: everything
/// [`validate`] needs to judge a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Writes, trims and zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// Largest READ or WRITE payload accepted.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    pub block_status: bool,
}

/// A request that passed validation: every field is within the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read {
        /// Start.
        offset: u64,
        /// Length, at most `max_payload`.
        len: u32,
    },
    /// Write the `len` payload bytes that follow the header.
    Write {
        /// Start.
        offset: u64,
        /// Length, at most `max_payload`.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (a hint; blockship punches a hole).
    Trim {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch a range.
    Cache {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Make a range read as zeroes.
    WriteZeroes {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// The server may punch a hole (NO_HOLE was not set).
        may_trim: bool,
        /// Fail with `ENOTSUP` rather than write zeroes slowly.
        fast_only: bool,
    },
    /// Report allocation of a range (`base:allocation`).
    BlockStatus {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
        /// Return a single descriptor.
        req_one: bool,
    },
    /// Finish outstanding requests and close.
    Disconnect,
}

/// A rejected request: the error to reply, and the payload bytes the caller
/// must still consume (a refused WRITE is still followed by its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// The error value for the reply.
    pub errno: Errno,
    /// Payload bytes that follow this header on the wire and must be skipped.
    pub skip_payload: u32,
    /// Why, for the log and for structured error messages.
    pub reason: &'static str,
}

/// Judge one request header against the export.
pub fn validate(h: &RequestHeader, lim: &ExportLimits) -> Result<Command, Rejected> {
    let payload = if h.command == CMD_WRITE { h.length } else { 0 };
    let reject = |errno, reason| Rejected {
        errno,
        skip_payload: payload,
        reason,
    };

    let allowed_flags = match h.command {
        CMD_READ if lim.structured_replies => CMD_FLAG_DF,
        CMD_READ | CMD_DISC | CMD_FLUSH | CMD_CACHE => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err(reject(Errno::Inval, "unknown command")),
    };
    if h.flags & !allowed_flags != 0 {
        return Err(reject(Errno::Inval, "flag not valid for this command"));
    }

    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return Err(reject(Errno::Perm, "export is read-only"));
    }

    if matches!(h.command, CMD_DISC | CMD_FLUSH) {
        if h.offset != 0 || h.length != 0 {
            return Err(reject(Errno::Inval, "offset and length must be zero"));
        }
        return Ok(if h.command == CMD_DISC {
            Command::Disconnect
        } else {
            Command::Flush
        });
    }

    if h.length == 0 {
        return Err(reject(Errno::Inval, "zero-length request"));
    }
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > lim.max_payload {
        let errno = if h.command == CMD_READ {
            Errno::Overflow
        } else {
            Errno::Inval
        };
        return Err(reject(errno, "request larger than the maximum block size"));
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= lim.size);
    if !in_range {
        let errno = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            Errno::NoSpc
        } else {
            Errno::Inval
        };
        return Err(reject(errno, "request beyond the end of the export"));
    }

    let (offset, len, fua) = (h.offset, h.length, h.flags & CMD_FLAG_FUA != 0);
    Ok(match h.command {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => {
            let fast_only = h.flags & CMD_FLAG_FAST_ZERO != 0;
            let may_trim = h.flags & CMD_FLAG_NO_HOLE == 0;
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
                fast_only,
            }
        }
        CMD_BLOCK_STATUS => {
            if !lim.block_status {
                return Err(reject(Errno::Inval, "no metadata context negotiated"));
            }
            let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
            Command::BlockStatus {
                offset,
                len,
                req_one,
            }
        }
        // Every other value returned early when the flags were looked up.
        _ => return Err(reject(Errno::Inval, "unknown command")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
        max_payload: 1 << 16,
        structured_replies: true,
        block_status: true,
    };

    fn hdr(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn errno_for_each_kind_of_bad_request() {
        let cases = [
            (hdr(99, 0, 0, 1), Errno::Inval),
            (hdr(CMD_READ, CMD_FLAG_FUA, 0, 1), Errno::Inval),
            (hdr(CMD_READ, 1 << 9, 0, 1), Errno::Inval),
            (hdr(CMD_READ, 0, 1 << 20, 1), Errno::Inval),
            (hdr(CMD_READ, 0, u64::MAX, 2), Errno::Inval),
            (hdr(CMD_READ, 0, 0, (1 << 16) + 1), Errno::Overflow),
            (hdr(CMD_WRITE, 0, (1 << 20) - 1, 2), Errno::NoSpc),
            (hdr(CMD_WRITE, 0, 0, (1 << 16) + 1), Errno::Inval),
            (hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1), Errno::NoSpc),
            (hdr(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1), Errno::Inval),
            (hdr(CMD_FLUSH, 0, 1, 0), Errno::Inval),
            (hdr(CMD_READ, 0, 0, 0), Errno::Inval),
        ];
        for (h, want) in cases {
            assert_eq!(validate(&h, &LIM).unwrap_err().errno, want, "{h:?}");
        }
    }

    #[test]
    fn refused_write_still_skips_its_payload() {
        let ro = ExportLimits {
            read_only: true,
            ..LIM
        };
        let r = validate(&hdr(CMD_WRITE, 0, 0, 512), &ro).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (Errno::Perm, 512));
        let r = validate(&hdr(CMD_TRIM, 0, 0, 512), &ro).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (Errno::Perm, 0));
    }

    #[test]
    fn last_byte_is_in_range() {
        let c = validate(&hdr(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 1, 1), &LIM).unwrap();
        assert_eq!(
            c,
            Command::Write {
                offset: (1 << 20) - 1,
                len: 1,
                fua: true
            }
        );
    }

    #[test]
    fn block_status_needs_a_context_and_df_needs_structured_replies() {
        let lim = ExportLimits {
            block_status: false,
            structured_replies: false,
            ..LIM
        };
        assert!(validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 1), &lim).is_err());
        assert!(validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &lim).is_err());
        assert!(validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &LIM).is_ok());
    }

    proptest! {
        /// Against a model: an accepted request is always inside the export
        /// and within the payload limit; a refused WRITE always skips exactly
        /// its announced payload.
        #[test]
        fn accepted_requests_are_in_range(command in 0u16..10, flags: u16, offset in prop_oneof![0u64..(1 << 21), any::<u64>()], length in prop_oneof![0u32..(1 << 17), any::<u32>()], ro: bool) {
            let lim = ExportLimits { read_only: ro, ..LIM };
            let h = hdr(command, flags, offset, length);
            match validate(&h, &lim) {
                Ok(Command::Flush | Command::Disconnect) => prop_assert!(offset == 0 && length == 0),
                Ok(c) => {
                    prop_assert!(offset + u64::from(length) <= lim.size);
                    prop_assert!(length > 0);
                    if matches!(c, Command::Read { .. } | Command::Write { .. }) {
                        prop_assert!(length <= lim.max_payload);
                    }
                    let writes = matches!(c, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                    prop_assert!(!(ro && writes), "write accepted on a read-only export");
                }
                Err(r) => prop_assert_eq!(r.skip_payload, if command == CMD_WRITE { length } else { 0 }),
            }
        }
    }
}
