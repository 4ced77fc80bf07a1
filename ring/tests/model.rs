//! Property test of the ring against a simple model: random appends of
//! random sizes (every alignment, wrap-around everywhere), reads and
//! releases, and reopening both sides at random points. The consumer must
//! see exactly the records the producer accepted, in order, byte for byte;
//! changes that did not fit must be in the dirty bitmap.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::collections::VecDeque;

use proptest::prelude::*;
use ring::{Appended, Change, Consumer, CreateOptions, DiskIdentity, FullPolicy, Kind, Producer};

const DISK: u64 = 1 << 30;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u32, fill: u8 },
    Trim { offset: u64, len: u32 },
    Mark { app: bool },
    Drain { max: usize, release_all: bool },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..(DISK >> 12), 1u32..9000, any::<u8>()).prop_map(|(o, len, fill)| Op::Write { offset: o * 512, len, fill }),
        1 => (0u64..(DISK >> 12) - 256, 1u32..(1 << 20)).prop_map(|(o, len)| Op::Trim { offset: o * 4096, len }),
        1 => any::<bool>().prop_map(|app| Op::Mark { app }),
        3 => (1usize..20, any::<bool>()).prop_map(|(max, release_all)| Op::Drain { max, release_all }),
        1 => Just(Op::Reopen),
    ]
}

fn disk() -> DiskIdentity {
    DiskIdentity {
        size: DISK,
        fingerprint: [7, 11],
        path: "model-disk".into(),
    }
}

fn open(path: &std::path::Path) -> (Producer, Consumer) {
    let opts = CreateOptions {
        capacity: 64 * 1024,
        granularity: 64 * 1024,
        disk_holds_data: false,
    };
    let (p, _) = Producer::open_or_create(path, &opts, &disk(), FullPolicy::Bitmap).unwrap();
    let c = Consumer::open(path).unwrap();
    (p, c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ring_matches_model(ops in proptest::collection::vec(op(), 1..300)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let (mut p, mut c) = open(&path);
        // Records accepted and not yet read: (seq, kind, offset, payload).
        let mut model: VecDeque<(u64, Kind, u64, Vec<u8>)> = VecDeque::new();
        let mut overflowed: Vec<(u64, u64)> = Vec::new();
        let mut last_seq = 0u64;
        let mut read_unreleased: Option<u64> = None;
        for op in ops {
            match op {
                Op::Write { offset, len, fill } => {
                    let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i.to_le_bytes()[0])).collect();
                    match p.append(Change::Write { offset, data: &data }).unwrap() {
                        Appended::Record(seq) => {
                            prop_assert_eq!(seq, last_seq + 1);
                            last_seq = seq;
                            model.push_back((seq, Kind::Write, offset, data));
                        }
                        Appended::Overflowed => overflowed.push((offset, u64::from(len))),
                    }
                }
                Op::Trim { offset, len } => {
                    match p.append(Change::Trim { offset, len }).unwrap() {
                        Appended::Record(seq) => {
                            prop_assert_eq!(seq, last_seq + 1);
                            last_seq = seq;
                            model.push_back((seq, Kind::Trim, offset, Vec::new()));
                        }
                        Appended::Overflowed => overflowed.push((offset, u64::from(len))),
                    }
                }
                Op::Mark { app } => {
                    if let Appended::Record(seq) = p.append(Change::Mark { name: "point", app }).unwrap() {
                        prop_assert_eq!(seq, last_seq + 1);
                        last_seq = seq;
                        // The MARK's offset field carries its flags (bit 0: app-consistent).
                        model.push_back((seq, Kind::Mark, u64::from(app), b"point".to_vec()));
                    }
                }
                Op::Drain { max, release_all } => {
                    let mut got = ring::Batch::new();
                    c.read(max, usize::MAX, &mut got).unwrap();
                    for r in got.iter() {
                        let (seq, kind, offset, payload) = model.pop_front().expect("consumer saw a record the model lacks");
                        prop_assert_eq!((r.seq, r.kind, r.offset), (seq, kind, offset));
                        prop_assert!(r.payload == payload.as_slice(), "payload of seq {} differs", seq);
                        read_unreleased = Some(seq);
                    }
                    if let Some(s) = read_unreleased {
                        let upto = if release_all { s } else { s.saturating_sub(1) };
                        c.release(upto).unwrap();
                        if release_all { read_unreleased = None; }
                    }
                }
                Op::Reopen => {
                    drop(c);
                    drop(p);
                    (p, c) = open(&path);
                    // Records read but not released come again, in order,
                    // up to the last one read; the model has seen them.
                    if let Some(last) = read_unreleased {
                        let mut got = ring::Batch::new();
                        loop {
                            got.clear();
                            prop_assert_eq!(c.read(1, usize::MAX, &mut got).unwrap(), 1);
                            prop_assert!(got.get(0).unwrap().seq <= last);
                            if got.get(0).unwrap().seq == last {
                                break;
                            }
                        }
                    }
                }
            }
        }
        // Everything left is still readable, in order.
        let mut got = ring::Batch::new();
        c.read(usize::MAX, usize::MAX, &mut got).unwrap();
        for r in got.iter() {
            let (seq, kind, offset, payload) = model.pop_front().expect("extra record");
            prop_assert_eq!((r.seq, r.kind, r.offset), (seq, kind, offset));
            prop_assert!(r.payload == payload.as_slice());
        }
        prop_assert!(model.is_empty(), "records accepted but never seen: {}", model.len());
        // Every overflowed change is covered by the dirty bitmap.
        let dirty = p.dirty_extents();
        for (off, len) in overflowed {
            let end = (off + len).min(DISK);
            let mut at = off;
            while at < end {
                prop_assert!(dirty.iter().any(|e| e.offset <= at && at < e.offset + e.len), "byte {} of an overflowed change is not dirty", at);
                at = (at / 65536 + 1) * 65536;
            }
        }
    }
}
