//! The wire crate's one error type.

/// A frame or record that cannot be accepted. The connection that carried
/// it is dropped and resumed; nothing in it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the layout needs.
    #[error("truncated {what}: {got} bytes, need {need}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a blockship frame (bad magic): the peer is not a blockship peer.
    #[error(
        "bad frame magic {0:#010x}: the peer does not speak the blockship replication protocol"
    )]
    BadMagic(u32),
    /// The frame header's own checksum failed.
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the frame was damaged in transit")]
    HeaderChecksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// The body's checksum failed.
    #[error("{frame} frame body checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the frame was damaged in transit")]
    BodyChecksum {
        /// Frame type name.
        frame: &'static str,
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A body longer than allowed.
    #[error("{frame} frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Frame type name.
        frame: &'static str,
        /// Claimed length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field holds a value the protocol does not allow.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The batch's plain records do not match their checksum.
    #[error("batch {first_seq}..={last_seq}: records checksum mismatch after decoding (stored {stored:#010x}, computed {computed:#010x})")]
    RecordsChecksum {
        /// First sequence of the batch.
        first_seq: u64,
        /// Last sequence of the batch.
        last_seq: u64,
        /// Checksum in the batch header.
        stored: u32,
        /// Checksum of the decoded records.
        computed: u32,
    },
}

impl WireError {
    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> WireError {
        WireError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}
