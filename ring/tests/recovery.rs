//! Crash recovery, corruption, identity, role locks and overflow of a ring
//! file, driven through the public API and by damaging the file itself.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::os::unix::fs::FileExt;
use std::path::Path;

use ring::{Appended, Change, Consumer, CreateOptions, DiskIdentity, Error, FullPolicy, Producer};

fn disk(size: u64) -> DiskIdentity {
    DiskIdentity {
        size,
        fingerprint: [1, 2],
        path: "/dev/test".into(),
    }
}

const OPTS: CreateOptions = CreateOptions {
    capacity: 256 * 1024,
    granularity: 64 * 1024,
    disk_holds_data: false,
};

fn producer(path: &Path) -> ring::Result<(Producer, ring::Recovery)> {
    Producer::open_or_create(path, &OPTS, &disk(1 << 30), FullPolicy::Bitmap)
}

fn write(p: &Producer, i: u64) -> u64 {
    let data = vec![u8::try_from(i % 251).unwrap(); 1000];
    match p
        .append(Change::Write {
            offset: i * 4096,
            data: &data,
        })
        .unwrap()
    {
        Appended::Record(s) => s,
        Appended::Overflowed => panic!("unexpected overflow"),
    }
}

fn flip(path: &Path, file_offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, file_offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, file_offset).unwrap();
}

#[test]
fn torn_tail_is_cut_and_the_sequence_goes_on_after_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    {
        let (p, _) = producer(&path).unwrap();
        for i in 0..10 {
            write(&p, i);
        }
        p.sync().unwrap(); // records 1..=10 durable
        for i in 10..13 {
            write(&p, i);
        }
    }
    // Damage the payload of record 12 (after the durable point).
    let (entries, _) = ring::dump(&path, Some(12), 1).unwrap();
    flip(&path, entries[0].file_offset + 100);
    let (p, rec) = producer(&path).unwrap();
    assert!(rec.bytes_cut > 0 && rec.gap, "{rec:?}");
    let st = ring::status(&path).unwrap();
    assert!(st.needs_verify && st.records_lost == 2, "{st:?}");
    // Sequence numbers are never reused: the next record is 14, marked.
    assert_eq!(write(&p, 20), 14);
    let mut c = Consumer::open(&path).unwrap();
    let mut got = ring::Batch::new();
    c.read(100, usize::MAX, &mut got).unwrap();
    let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=11).chain([14]).collect::<Vec<_>>());
    assert!(got.get(got.len() - 1).unwrap().after_gap);
    assert!(!got.get(0).unwrap().after_gap);
}

#[test]
fn corruption_before_the_durable_point_is_an_error_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    {
        let (p, _) = producer(&path).unwrap();
        for i in 0..10 {
            write(&p, i);
        }
        p.sync().unwrap();
    }
    let (entries, _) = ring::dump(&path, Some(5), 1).unwrap();
    let at = entries[0].file_offset;
    flip(&path, at + 60);
    match producer(&path) {
        Err(Error::Corrupt {
            file_offset,
            expected_seq,
            ..
        }) => {
            assert_eq!((file_offset, expected_seq), (at, 5));
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // A consumer reading past it stops with the same kind of error.
    let mut c = Consumer::open(&path).unwrap();
    let mut got = ring::Batch::new();
    let err = c.read(100, usize::MAX, &mut got).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                expected_seq: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(got.len(), 4);
    let msg = err.to_string();
    assert!(msg.contains(&format!("file offset {at}")), "{msg}");
}

#[test]
fn a_damaged_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    drop(producer(&path).unwrap());
    flip(&path, 20);
    let err = producer(&path).unwrap_err();
    assert!(matches!(err, Error::NotARing { .. }), "{err}");
    std::fs::write(dir.path().join("junk"), b"hello").unwrap();
    let err = producer(&dir.path().join("junk")).unwrap_err();
    assert!(err.to_string().contains("not a blockship ring"), "{err}");
}

#[test]
fn another_disk_or_a_resized_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    drop(producer(&path).unwrap());
    let other = DiskIdentity {
        fingerprint: [9, 9],
        ..disk(1 << 30)
    };
    let err = Producer::open_or_create(&path, &OPTS, &other, FullPolicy::Bitmap).unwrap_err();
    assert!(matches!(err, Error::WrongDisk { .. }), "{err}");
    let err =
        Producer::open_or_create(&path, &OPTS, &disk(2 << 30), FullPolicy::Bitmap).unwrap_err();
    assert!(err.to_string().contains("size changed"), "{err}");
}

#[test]
fn one_producer_and_one_consumer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (_p, _) = producer(&path).unwrap();
    assert!(matches!(
        producer(&path),
        Err(Error::Busy {
            role: "producer",
            ..
        })
    ));
    let _c = Consumer::open(&path).unwrap();
    assert!(matches!(
        Consumer::open(&path),
        Err(Error::Busy {
            role: "consumer",
            ..
        })
    ));
}

#[test]
fn overflow_marks_the_bitmap_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (p, _) = producer(&path).unwrap();
    let data = vec![1u8; 64 * 1024];
    let mut overflowed = Vec::new();
    for i in 0..16u64 {
        let offset = i * (1 << 20);
        if p.append(Change::Write {
            offset,
            data: &data,
        })
        .unwrap()
            == Appended::Overflowed
        {
            overflowed.push(offset);
        }
    }
    assert!(!overflowed.is_empty());
    // From the first overflow on, with no consumer, everything overflows.
    let first = overflowed[0];
    assert_eq!(
        overflowed,
        (first / (1 << 20)..16)
            .map(|i| i * (1 << 20))
            .collect::<Vec<_>>()
    );
    drop(p);
    let (p, _) = producer(&path).unwrap();
    let dirty = p.dirty_extents();
    let want: Vec<ring::Extent> = overflowed
        .iter()
        .map(|&offset| ring::Extent {
            offset,
            len: 64 * 1024,
        })
        .collect();
    assert_eq!(
        dirty, want,
        "the bitmap covers exactly the overflowed writes"
    );
    let st = ring::status(&path).unwrap();
    assert!(st.overflow && st.overflow_since_ns.is_some());
    assert_eq!(st.dirty_bytes, 64 * 1024 * overflowed.len() as u64);
    // A resync clears bits once the replica holds the data.
    let c = Consumer::open(&path).unwrap();
    c.clear_dirty(first, 64 * 1024);
    assert_eq!(p.dirty_extents().len(), overflowed.len() - 1);
}

#[test]
fn blocking_policy_waits_for_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (p, _) = Producer::open_or_create(&path, &OPTS, &disk(1 << 30), FullPolicy::Block).unwrap();
    let path2 = path.clone();
    let drain = std::thread::spawn(move || {
        let mut c = Consumer::open(&path2).unwrap();
        let mut seen = 0u64;
        let mut got = ring::Batch::new();
        while seen < 200 {
            got.clear();
            if c.read(8, usize::MAX, &mut got).unwrap() == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            for r in got.iter() {
                seen += 1;
                assert_eq!(r.seq, seen);
            }
            c.release(seen).unwrap();
        }
    });
    let data = vec![3u8; 16 * 1024];
    for i in 0..200u64 {
        let r = p
            .append(Change::Write {
                offset: i * 16384,
                data: &data,
            })
            .unwrap();
        assert_eq!(r, Appended::Record(i + 1), "block mode never overflows");
    }
    drain.join().unwrap();
}

#[test]
fn changes_in_flight_at_a_crash_go_to_the_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    {
        let (p, _) = producer(&path).unwrap();
        let lane = p.take_lane().unwrap();
        p.begin(&lane, 3, 5 << 20, 8192); // on its way to the disk...
        p.begin(&lane, 4, 9 << 20, 4096);
        p.end(&lane, 4); // ...this one made it into the ring
                         // The process dies here: no close.
    }
    let (p, rec) = producer(&path).unwrap();
    assert!(rec.unclean && rec.inflight_marked == 1, "{rec:?}");
    assert_eq!(
        p.dirty_extents(),
        vec![ring::Extent {
            offset: 5 << 20,
            len: 64 * 1024
        }]
    );
    let st = ring::status(&path).unwrap();
    assert!(st.crash_dirty && !st.needs_verify, "{st:?}");
    p.close().unwrap();
    drop(p);
    assert!(ring::status(&path).unwrap().clean);
    let (_p, rec) = producer(&path).unwrap();
    assert!(!rec.unclean && rec.inflight_marked == 0, "{rec:?}");
}

#[test]
fn marks_carry_their_kind_and_a_ring_opens_as_producer_without_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    {
        let (p, _) = producer(&path).unwrap();
        write(&p, 0);
        // Without its disk, the ring cannot be opened as a second producer.
        assert!(matches!(
            Producer::open_existing(&path, FullPolicy::Bitmap),
            Err(Error::Busy { .. })
        ));
        p.close().unwrap();
    }
    {
        let (p, rec) = Producer::open_existing(&path, FullPolicy::Bitmap).unwrap();
        assert!(!rec.unclean);
        let (a, t) = p
            .append_timed(Change::Mark {
                name: "crash-point",
                app: false,
            })
            .unwrap();
        assert_eq!(a, Appended::Record(2));
        assert!(t > 0);
        assert_eq!(
            p.append(Change::Mark {
                name: "app-point",
                app: true
            })
            .unwrap(),
            Appended::Record(3)
        );
        p.sync().unwrap();
        p.close().unwrap();
    }
    let (entries, damage) = ring::dump(&path, Some(2), 10).unwrap();
    assert!(damage.is_none());
    let marks: Vec<_> = entries
        .iter()
        .map(|e| (e.seq, e.mark.clone().unwrap(), e.offset))
        .collect();
    assert_eq!(
        marks,
        [
            (2, "crash-point".to_string(), 0),
            (3, "app-point".to_string(), ring::format::MARK_APP)
        ]
    );
    // The serving splitter opens it again with its disk; the sequence goes on.
    let (p, rec) = producer(&path).unwrap();
    assert!(!rec.unclean && !rec.gap);
    assert_eq!(write(&p, 1), 4);
    let mut c = Consumer::open(&path).unwrap();
    let mut got = ring::Batch::new();
    c.read(10, usize::MAX, &mut got).unwrap();
    let kinds: Vec<_> = got
        .iter()
        .map(|r| (r.seq, r.kind, r.is_app_mark()))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, ring::Kind::Write, false),
            (2, ring::Kind::Mark, false),
            (3, ring::Kind::Mark, true),
            (4, ring::Kind::Write, false)
        ]
    );
}

#[test]
fn a_batch_with_header_room_lays_records_out_for_the_caller_and_hands_its_buffer_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (p, _) = producer(&path).unwrap();
    for i in 0..5 {
        write(&p, i);
    }
    p.append(Change::Trim {
        offset: 0,
        len: 4096,
    })
    .unwrap();
    let mut c = Consumer::open(&path).unwrap();
    let mut b = ring::Batch::with_header_room(40);
    assert_eq!(c.read(100, usize::MAX, &mut b).unwrap(), 6);
    // 40 bytes of room, then each payload, back to back.
    let mut at = 0;
    for i in 0..6 {
        assert_eq!(b.room_at(i), Some(at));
        at += 40 + b.get(i).unwrap().payload.len();
    }
    assert_eq!(b.bytes_mut().len(), at);
    let bytes = b.take_bytes(Vec::new());
    assert_eq!(bytes.len(), at);
    assert_eq!(&bytes[40..1040], &[0u8; 1000][..]);
    assert_eq!(&bytes[1080..2080], &[1u8; 1000][..]);
    assert!(b.is_empty());
    // The handed-back buffer is read into again.
    write(&p, 7);
    assert_eq!(c.read(100, usize::MAX, &mut b).unwrap(), 1);
    assert_eq!(b.get(0).unwrap().payload, &[7u8; 1000][..]);
    let again = b.take_bytes(bytes);
    assert_eq!(again.len(), 1040);
}
