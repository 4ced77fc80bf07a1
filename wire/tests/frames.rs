#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
//! Golden byte vectors for every frame type, round trips, and random bytes
//! fed to every decoder (never a panic).

use proptest::prelude::*;
use wire::frame::*;
use wire::io::{parse_frame, read_frame, write_frame};
use wire::records::RECORD_HEADER_LEN;
use wire::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hello() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        flags: HELLO_NEEDS_INITIAL_SYNC,
        ring_id: [0xab; 16],
        disk_size: 1 << 30,
        block_size: 4096,
        tail_seq: 5,
        next_seq: 9,
        disk_id: "db".into(),
        lineage: None,
    }
}

#[test]
fn golden_frame_header() {
    let h = FrameHeader::for_body(
        FrameType::Ack,
        &Ack {
            applied_seq: 7,
            batches: 0,
        }
        .encode(),
    );
    let b = h.encode();
    assert_eq!(
        hex(&b),
        "425357460400000010000000f2568c97388a098900000000",
        "frame header layout changed: update docs/wire-protocol.md and bump the version"
    );
    assert_eq!(FrameHeader::decode(&b).unwrap(), h);
}

#[test]
fn golden_bodies() {
    let mut v = Vec::new();
    hello().encode(&mut v);
    assert_eq!(
        hex(&v),
        concat!(
            "0100",
            "0100",
            "01000000",
            "abababababababababababababababab",
            "0000004000000000",
            "00100000",
            "00000000",
            "0500000000000000",
            "0900000000000000",
            "0200",
            "6462"
        )
    );
    assert_eq!(Hello::decode(&v).unwrap(), hello());

    // With the lineage block (a failed-over copy written since).
    let mut h = hello();
    h.lineage = Some(wire::frame::Lineage {
        disk_uuid: [0x11; 16],
        flags: wire::frame::LINEAGE_FAILED_OVER | wire::frame::LINEAGE_WRITTEN,
        from_ring: [0x22; 16],
        from_seq: 0x0102,
        failed_over_ns: 3,
    });
    let mut w = Vec::new();
    h.encode(&mut w);
    assert_eq!(w[..v.len()], v[..]);
    assert_eq!(
        hex(&w[v.len()..]),
        concat!(
            "11111111111111111111111111111111",
            "03000000",
            "00000000",
            "22222222222222222222222222222222",
            "0201000000000000",
            "0300000000000000"
        )
    );
    assert_eq!(Hello::decode(&w).unwrap(), h);
    // Unknown lineage flags, or a body of another length: refused.
    let mut bad = w.clone();
    bad[v.len() + 16] = 0x80;
    assert!(Hello::decode(&bad).is_err());
    assert!(Hello::decode(&w[..w.len() - 1]).is_err());

    let r = HelloReply {
        version: 1,
        flags: REPLY_CONSISTENT,
        applied_seq: 0x0102,
        max_body: MAX_BODY,
        sync_cursor: 0x10,
    };
    assert_eq!(
        hex(&r.encode()),
        concat!(
            "0100",
            "0000",
            "01000000",
            "0201000000000000",
            "00200004",
            "00000000",
            "1000000000000000"
        )
    );
    assert_eq!(HelloReply::decode(&r.encode()).unwrap(), r);

    let b = BatchHeader {
        first_seq: 3,
        last_seq: 4,
        count: 2,
        codec: Codec::Zstd,
        plain_len: 0x50,
        plain_crc: 0xdeadbeef,
    };
    assert_eq!(
        hex(&b.encode()),
        "030000000000000004000000000000000200000001000000".to_owned() + "50000000efbeadde"
    );

    assert_eq!(
        hex(&Ack {
            applied_seq: 0x1122,
            batches: 3
        }
        .encode()),
        "22110000000000000300000000000000"
    );

    let hb = Heartbeat {
        now_ns: 1,
        seq: 2,
        oldest_pending_ns: 3,
        records_waiting: 4,
        bytes_waiting: 5,
        source_flags: 2,
    };
    assert_eq!(
        hex(&hb.encode()),
        "0100000000000000020000000000000003000000000000000400000000000000".to_owned()
            + "0500000000000000"
            + "0200000000000000"
    );
    assert_eq!(Heartbeat::decode(&hb.encode()).unwrap(), hb);

    ErrorMsg {
        code: ErrorCode::Forbidden,
        message: "no".into(),
    }
    .encode(&mut v);
    assert_eq!(hex(&v), "030002006e6f");
    assert_eq!(ErrorMsg::decode(&v).unwrap().code, ErrorCode::Forbidden);
}

#[test]
fn golden_record() {
    let mut v = Vec::new();
    WireRecord {
        full_pass: false,
        seq: 9,
        kind: RecordKind::Write,
        offset: 4096,
        len: 2,
        after_gap: true,
        time_ns: 0x10,
        payload: b"hi",
    }
    .encode(&mut v);
    assert_eq!(
        hex(&v),
        concat!(
            "0900000000000000",
            "0010000000000000",
            "02000000",
            "01",
            "01",
            "0000",
            "1000000000000000",
            "02000000",
            "00000000",
            "6869"
        )
    );
    assert_eq!(v.len(), RECORD_HEADER_LEN + 2);
}

fn batch_plain(recs: &[WireRecord<'_>]) -> (BatchHeader, Vec<u8>) {
    let mut plain = Vec::new();
    for r in recs {
        r.encode(&mut plain);
    }
    let h = BatchHeader {
        first_seq: recs[0].seq,
        last_seq: recs[recs.len() - 1].seq,
        count: recs.len() as u32,
        codec: Codec::Stored,
        plain_len: plain.len() as u32,
        plain_crc: crc32c::crc32c(&plain),
    };
    (h, plain)
}

fn rec(seq: u64, kind: RecordKind, payload: &[u8]) -> WireRecord<'_> {
    WireRecord {
        full_pass: false,
        seq,
        kind,
        offset: 0,
        len: if kind == RecordKind::Trim {
            4096
        } else {
            payload.len() as u32
        },
        after_gap: false,
        time_ns: 0,
        payload,
    }
}

#[test]
fn records_checked_against_the_batch() {
    let (h, plain) = batch_plain(&[
        rec(1, RecordKind::Write, b"abc"),
        rec(2, RecordKind::Trim, b""),
    ]);
    h.check_plain(&plain).unwrap();
    let got: Vec<_> = RecordIter::new(h, &plain)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload, b"abc");

    // A gap without the flag is refused; with the flag it is fine.
    let (h, plain) = batch_plain(&[
        rec(1, RecordKind::Write, b"a"),
        rec(3, RecordKind::Write, b"b"),
    ]);
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));
    let mut r3 = rec(3, RecordKind::Write, b"b");
    r3.after_gap = true;
    let (h, plain) = batch_plain(&[rec(1, RecordKind::Write, b"a"), r3]);
    assert!(RecordIter::new(h, &plain).all(|r| r.is_ok()));

    // Count or last sequence not matching the header.
    let (mut h, plain) = batch_plain(&[rec(1, RecordKind::Write, b"a")]);
    h.count = 2;
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));
    h.count = 1;
    h.last_seq = 2;
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));

    // A flipped byte fails the plain checksum.
    let (h, mut plain) = batch_plain(&[rec(1, RecordKind::Write, b"abc")]);
    plain[41] ^= 1;
    assert!(matches!(
        h.check_plain(&plain),
        Err(WireError::RecordsChecksum { .. })
    ));
}

#[test]
fn framing_rejects_damage_with_names() {
    let mut stream = Vec::new();
    write_frame(
        &mut stream,
        FrameType::Ack,
        &Ack {
            applied_seq: 1,
            batches: 1,
        }
        .encode(),
    )
    .unwrap();
    let mut body = Vec::new();
    let h = read_frame(&mut &stream[..], &mut body).unwrap();
    assert_eq!(h.ftype, FrameType::Ack);
    assert_eq!(parse_frame(&stream[..10]).unwrap(), None);
    assert_eq!(parse_frame(&stream[..stream.len() - 1]).unwrap(), None);

    for i in 0..stream.len() {
        let mut bad = stream.clone();
        bad[i] ^= 0x40;
        let e = parse_frame(&bad).unwrap_err().to_string();
        assert!(!e.is_empty());
    }
    // Oversized: a valid header claiming a body larger than the type allows.
    let mut big = FrameHeader {
        ftype: FrameType::Batch,
        len: MAX_BODY + 1,
        body_crc: 0,
    }
    .encode();
    let e = FrameHeader::decode(&big).unwrap_err();
    assert!(matches!(e, WireError::Oversized { .. }), "{e}");
    big[4] = 99;
    assert!(FrameHeader::decode(&big).is_err());
    // Unknown type with a correct header checksum.
    let mut h = FrameHeader::for_body(FrameType::Ack, &[]).encode();
    h[4] = 42;
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        FrameHeader::decode(&h).unwrap_err(),
        WireError::UnknownType(42)
    );
    // Truncated stream: an I/O error, not a panic.
    assert!(read_frame(&mut &stream[..30], &mut body).is_err());
}

#[test]
fn hello_validation() {
    let mut v = Vec::new();
    let mut h = hello();
    h.disk_id = "../etc".into();
    h.encode(&mut v);
    assert!(Hello::decode(&v).is_err());
    let mut h = hello();
    h.disk_size = 1000;
    h.encode(&mut v);
    assert!(Hello::decode(&v).is_err());
    let mut h = hello();
    h.tail_seq = 10;
    h.encode(&mut v);
    assert!(Hello::decode(&v).is_err());
}

proptest! {
    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = FrameHeader::decode(&b);
        let _ = parse_frame(&b);
        let _ = Hello::decode(&b);
        let _ = HelloReply::decode(&b);
        let _ = Ack::decode(&b);
        let _ = Heartbeat::decode(&b);
        let _ = ErrorMsg::decode(&b);
        if let Ok(h) = BatchHeader::decode(&b) {
            for r in RecordIter::new(h, &b[32..]) { let _ = r; }
        }
        let h = BatchHeader { first_seq: 1, last_seq: 3, count: 3, codec: Codec::Stored, plain_len: b.len() as u32, plain_crc: 0 };
        for r in RecordIter::new(h, &b) { let _ = r; }
        let _ = read_frame(&mut &b[..], &mut Vec::new());
    }

    #[test]
    fn valid_frame_with_random_prefix_damage(n in 0usize..64, bit in 0u8..8, seq in 1u64..u64::MAX) {
        let mut s = Vec::new();
        write_frame(&mut s, FrameType::Ack, &Ack { applied_seq: seq, batches: seq }.encode()).unwrap();
        let i = n % s.len();
        s[i] ^= 1 << bit;
        prop_assert!(parse_frame(&s).is_err());
    }

    #[test]
    fn records_round_trip(items in proptest::collection::vec((0u8..4, 1u32..3000, any::<u64>(), any::<bool>()), 1..40)) {
        let payloads: Vec<Vec<u8>> = items.iter().map(|(_, l, _, _)| vec![7u8; *l as usize]).collect();
        let mut recs = Vec::new();
        let mut seq = 1u64;
        for (i, (k, l, t, gap)) in items.iter().enumerate() {
            let kind = [RecordKind::Write, RecordKind::Trim, RecordKind::Zero, RecordKind::Mark][*k as usize];
            if *gap && i > 0 { seq += 2; }
            let (len, payload): (u32, &[u8]) = match kind {
                RecordKind::Write => (*l, &payloads[i]),
                RecordKind::Mark => ((*l).min(4096), &payloads[i][..(*l).min(4096) as usize]),
                _ => (*l, &[]),
            };
            recs.push(WireRecord { full_pass: false, seq, kind, offset: if kind == RecordKind::Mark { *t } else { u64::from(*l) * 4096 }, len, after_gap: *gap && i > 0, time_ns: *t, payload });
            seq += 1;
        }
        let (h, plain) = batch_plain(&recs);
        let mut body = h.encode().to_vec();
        body.extend_from_slice(&plain);
        let h2 = BatchHeader::decode(&body).unwrap();
        h2.check_plain(&body[32..]).unwrap();
        let got: Vec<_> = RecordIter::new(h2, &body[32..]).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(got, recs);
    }
}

fn sync_rec(seq: u64, kind: RecordKind, payload: &[u8]) -> WireRecord<'_> {
    WireRecord {
        full_pass: kind != RecordKind::SyncEnd,
        seq,
        kind,
        offset: if kind == RecordKind::SyncEnd {
            wire::records::SYNC_END_FULL_PASS
        } else {
            0
        },
        len: if kind == RecordKind::SyncZero {
            4096
        } else {
            payload.len() as u32
        },
        after_gap: false,
        time_ns: 0,
        payload,
    }
}

#[test]
fn resync_records_sit_between_ring_records_without_taking_a_sequence() {
    let ok = [
        rec(1, RecordKind::Write, b"a"),
        sync_rec(2, RecordKind::SyncData, b"bb"),
        sync_rec(2, RecordKind::SyncZero, b""),
        rec(2, RecordKind::Write, b"c"),
        sync_rec(3, RecordKind::SyncEnd, b""),
    ];
    let (h, plain) = batch_plain(&ok);
    assert_eq!((h.first_seq, h.last_seq), (1, 3));
    let got: Vec<_> = RecordIter::new(h, &plain)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, ok);
    assert!(got[1].kind.is_sync() && got[1].full_pass);
    // A resync-only batch positioned at 7.
    let (h, plain) = batch_plain(&[
        sync_rec(7, RecordKind::SyncData, b"x"),
        sync_rec(7, RecordKind::SyncEnd, b""),
    ]);
    assert!(RecordIter::new(h, &plain).all(|r| r.is_ok()));
    // A resync record must carry the next ring record's sequence.
    let (h, plain) = batch_plain(&[
        rec(1, RecordKind::Write, b"a"),
        sync_rec(3, RecordKind::SyncData, b"x"),
    ]);
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));
    let (h, plain) = batch_plain(&[
        rec(4, RecordKind::Write, b"a"),
        sync_rec(4, RecordKind::SyncData, b"x"),
    ]);
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));
    // Flags belong to their kinds: FULL_PASS on a ring record is refused.
    let mut bad = rec(1, RecordKind::Write, b"a");
    bad.full_pass = true;
    let (h, plain) = batch_plain(&[bad]);
    assert!(RecordIter::new(h, &plain).any(|r| r.is_err()));
}

#[test]
fn block_hashes_frame_len_is_the_encoded_answer() {
    for len in [1u32, 4096, 4097, 1 << 20, 16 << 20] {
        let bh = BlockHashes {
            offset: 0,
            len,
            block_size: BLOCK_SIZE,
            hashes: vec![[7; 32]; len.div_ceil(BLOCK_SIZE) as usize],
        };
        let mut b = Vec::new();
        bh.encode(&mut b);
        assert_eq!(
            block_hashes_frame_len(len),
            (FRAME_HEADER_LEN + b.len()) as u64,
            "{len}"
        );
    }
    // The cap holds at least one answer of the largest hashed chunk.
    assert!(block_hashes_frame_len(wire::records::MAX_HASHED_CHUNK) <= MAX_BATCH_HASH_REPLY);
}

#[test]
fn a_mark_carries_its_kind_in_the_offset_and_reserved_bits_are_ignored() {
    let mut crash = rec(1, RecordKind::Mark, b"nightly");
    crash.offset = 0;
    let mut app = rec(2, RecordKind::Mark, b"db-quiesced");
    app.offset = wire::MARK_APP;
    // A later sender's bits this receiver does not know: still a mark.
    let mut future = rec(3, RecordKind::Mark, b"later");
    future.offset = !wire::MARK_APP;
    let recs = [crash, app, future];
    let (h, plain) = batch_plain(&recs);
    let got: Vec<_> = RecordIter::new(h, &plain)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, recs);
    let kinds: Vec<bool> = got.iter().map(WireRecord::is_app_mark).collect();
    assert_eq!(kinds, [false, true, false]);
    assert!(!rec(4, RecordKind::Write, b"x").is_app_mark());
}
