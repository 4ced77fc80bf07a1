//! What a power cut (not only a process kill) may lose, and what the
//! producer does so that recovery never relies on it: bits of the dirty
//! bitmap, the "open, not clean" state, the in-flight table at close, and a
//! ring file shorter than its header says. The page-cache checks (which
//! pages are still only in memory) are in `tests/power_cut.rs` at the
//! workspace root; these tests check the plans and states that make them
//! pass.

#![allow(clippy::unwrap_used)] // tests fail loudly on any error

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ring::{Appended, Change, CreateOptions, DiskIdentity, Error, FullPolicy, Producer};

const CAPACITY: u64 = 256 * 1024;
/// Where the bitmap starts in a ring of CAPACITY: after the two header pages.
const BITMAP_OFFSET: u64 = 8192 + CAPACITY;

fn disk() -> DiskIdentity {
    DiskIdentity {
        size: 1 << 30,
        fingerprint: [1, 2],
        path: "/dev/test".into(),
    }
}

const OPTS: CreateOptions = CreateOptions {
    capacity: CAPACITY,
    granularity: 64 * 1024,
    disk_holds_data: false,
};

fn producer(path: &Path, policy: FullPolicy) -> ring::Result<(Producer, ring::Recovery)> {
    Producer::open_or_create(path, &OPTS, &disk(), policy)
}

fn has_bitmap(plan: &ring::SyncPlan) -> bool {
    plan.ranges.iter().any(|&(off, _)| off == BITMAP_OFFSET)
}

#[test]
fn a_bit_set_outside_overflow_is_in_the_next_sync_plan_until_synced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (p, _) = producer(&path, FullPolicy::Bitmap).unwrap();
    assert!(!has_bitmap(&p.sync_plan()), "nothing marked yet");
    // A write that failed part-way on the disk: its extent is marked.
    p.mark_dirty(3 << 20, 4096);
    let plan = p.sync_plan();
    assert!(has_bitmap(&plan), "the mark must be made durable: {plan:?}");
    // The bitmap goes before the header, whose state may depend on it.
    assert_eq!(plan.ranges.first().map(|r| r.0), Some(BITMAP_OFFSET));
    assert_eq!(plan.ranges.last().map(|r| r.0), Some(0));
    p.synced(&plan);
    assert!(!has_bitmap(&p.sync_plan()), "synced: not again");
    p.mark_dirty(5 << 20, 4096);
    assert!(has_bitmap(&p.sync_plan()));
}

#[test]
fn close_moves_what_is_still_in_flight_to_the_bitmap_before_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    {
        let (p, _) = producer(&path, FullPolicy::Bitmap).unwrap();
        let lane = p.take_lane().unwrap();
        // A change marked in flight that its front end never ended.
        p.begin(&lane, 7, 9 << 20, 8192);
        p.close().unwrap();
    }
    let st = ring::status(&path).unwrap();
    assert!(st.dirty_bytes > 0, "the in-flight extent is dirty: {st:?}");
    let (p, rec) = producer(&path, FullPolicy::Bitmap).unwrap();
    assert!(!rec.unclean, "closed cleanly: {rec:?}");
    let dirty = p.dirty_extents();
    assert!(
        dirty
            .iter()
            .any(|e| e.offset <= 9 << 20 && e.offset + e.len > 9 << 20),
        "{dirty:?}"
    );
}

#[test]
fn a_truncated_ring_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    drop(producer(&path, FullPolicy::Bitmap).unwrap());
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [4096, len / 2] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - cut).unwrap();
        drop(f);
        // Before the check this mapped past the end of the file and the
        // first touch of the in-flight table killed the process (SIGBUS).
        match producer(&path, FullPolicy::Bitmap) {
            Err(e @ (Error::NotARing { .. } | Error::Corrupt { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a ring cut by {cut} bytes was accepted"),
        }
    }
}

#[test]
fn a_header_claiming_no_in_flight_entries_is_refused() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    drop(producer(&path, FullPolicy::Bitmap).unwrap());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut h = vec![0u8; 512];
    f.read_exact_at(&mut h, 0).unwrap();
    h[368..376].copy_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&h[..508]);
    h[508..512].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 0).unwrap();
    let e = producer(&path, FullPolicy::Bitmap).err().unwrap();
    assert!(matches!(e, Error::NotARing { .. }), "{e}");
}

#[test]
fn interrupt_releases_a_writer_waiting_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let (p, _) = producer(&path, FullPolicy::Block).unwrap();
    let p = Arc::new(p);
    let data = vec![7u8; 60 * 1024];
    // No consumer: four records fill the ring; the fifth waits.
    for i in 0..4 {
        let r = p.append(Change::Write {
            offset: i * (64 << 10),
            data: &data,
        });
        assert!(matches!(r, Ok(Appended::Record(_))), "{r:?}");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let p = p.clone();
        let data = data.clone();
        std::thread::spawn(move || {
            let r = p.append(Change::Write {
                offset: 10 << 20,
                data: &data,
            });
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the writer should wait for room"
    );
    p.interrupt();
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("interrupt must release the writer");
    assert_eq!(r, Ok(Appended::Overflowed));
    writer.join().unwrap();
    assert!(!p.dirty_extents().is_empty());
}
