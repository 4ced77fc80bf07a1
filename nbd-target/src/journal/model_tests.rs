#![allow(clippy::cast_possible_truncation, clippy::ptr_arg)] // test code: sizes are small, on 64-bit hosts
//! The journal against a model: every point a view presents equals the
//! disk as it was after that record, across segment rolls, overlapping
//! writes held and flushed, zeroes over holes and data, a torn tail, a
//! new epoch, gaps, marks, and pruning with and without a lease.

use std::time::Duration;

use blockdev::Backend;

use super::*;
use crate::replica::ReplicaSpec;
use crate::session::apply::RecordSink;
use crate::state::{Reason, ReplicaState};

const SIZE: u64 = 256 << 10;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn state(applied: u64, reason: Reason) -> ReplicaState {
    ReplicaState {
        applied_seq: applied,
        ring_id: [1; 16],
        disk_size: SIZE,
        reason,
        since_seq: 0,
        updated_ns: 0,
        sync_cursor: 0,
    }
}

struct Fixture {
    _d: tempfile::TempDir,
    img: std::path::PathBuf,
    jdir: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("replica.img");
    let jdir = d.path().join("journal");
    Fixture { _d: d, img, jdir }
}

fn cfg(segment_bytes: u64) -> JournalConfig {
    JournalConfig {
        retention: Duration::from_secs(3600),
        max_bytes: 1 << 40,
        segment_bytes,
    }
}

fn sink(f: &Fixture, c: JournalConfig, st: &ReplicaState) -> Journaled {
    let w = ReplicaSpec::File(f.img.clone()).open_writer(SIZE).unwrap();
    let j = JournalWriter::open(&f.jdir, c, st, "d").unwrap();
    Journaled::new(w, Some(j))
}

fn view(f: &Fixture, p: Pos) -> PointView {
    let r = ReplicaSpec::File(f.img.clone()).open_reader().unwrap();
    PointView::open(&f.jdir, r, SIZE, p, "test").unwrap()
}

fn read_all(b: &dyn Backend) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    b.read_at(0, &mut v).unwrap();
    v
}

/// Equal, or a short message naming the first difference.
fn same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: differs first at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: lengths");
}

/// Random records; returns the model's snapshot after each seq (index = seq).
fn run(
    s: &mut Journaled,
    rng: &mut Rng,
    from_seq: u64,
    n: u64,
    model: &mut Vec<u8>,
    snaps: &mut Vec<Vec<u8>>,
) {
    for seq in from_seq..from_seq + n {
        s.position(seq, false, 1_000 + seq, true);
        let off = rng.below(SIZE / 512) * 512;
        let len = (rng.below(16) + 1) * 512;
        let len = len.min(SIZE - off);
        let (o, l) = (off as usize, len as usize);
        match rng.below(5) {
            0 => {
                s.zero(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            1 => {
                // Rewrite what is there: changes nothing.
                let same = model[o..o + l].to_vec();
                s.write(off, &same).unwrap();
            }
            _ => {
                let byte = u8::try_from(seq % 251).unwrap() + 1;
                let data = vec![byte; l];
                s.write(off, &data).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
        }
        if rng.below(4) == 0 {
            s.commit().unwrap();
        }
        while snaps.len() as u64 <= seq {
            snaps.push(Vec::new());
        }
        snaps[seq as usize] = model.clone();
    }
    s.commit().unwrap();
}

#[test]
fn every_point_reads_as_the_disk_was() {
    let f = fixture();
    let st = state(0, Reason::None);
    let mut s = sink(&f, cfg(64 << 10), &st);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    // A view opened before the writes sees them go by untouched.
    let early = view(
        &f,
        Pos {
            epoch: 0,
            seq: 0,
            sub: true,
        },
    );
    run(&mut s, &mut rng, 1, 300, &mut model, &mut snaps);
    let segs = segment::list(&f.jdir).unwrap();
    assert!(segs.len() > 2, "segments rolled: {segs:?}");
    same(&read_all(&early), &snaps[0], "early view");
    same(
        &std::fs::read(&f.img).unwrap(),
        &model,
        "the replica is the latest",
    );
    for seq in [1u64, 2, 3, 10, 77, 150, 151, 299, 300] {
        for sub in [false, true] {
            let v = view(&f, Pos { epoch: 0, seq, sub });
            same(
                &read_all(&v),
                &snaps[seq as usize],
                &format!("point {seq} {sub}"),
            );
        }
    }
    // Block by block (many wholly covered by the journal: read from it alone).
    let v = view(
        &f,
        Pos {
            epoch: 0,
            seq: 150,
            sub: false,
        },
    );
    let mut blk = vec![0u8; 4096];
    for i in 0..(SIZE / 4096) {
        v.read_at(i * 4096, &mut blk).unwrap();
        let o = (i * 4096) as usize;
        same(&blk, &snaps[150][o..o + 4096], &format!("block {i} at 150"));
    }
    // Unaligned reads through a view.
    let v = view(
        &f,
        Pos {
            epoch: 0,
            seq: 42,
            sub: false,
        },
    );
    let mut b = vec![0u8; 10_000];
    v.read_at(1_234, &mut b).unwrap();
    same(&b, &snaps[42][1_234..11_234], "unaligned");
    let t = Timeline::load(&f.jdir, Some(&state(300, Reason::None))).unwrap();
    assert_eq!(
        t.oldest,
        Some(Pos {
            epoch: 0,
            seq: 0,
            sub: true
        })
    );
    assert_eq!(
        t.newest,
        Some(Pos {
            epoch: 0,
            seq: 300,
            sub: false
        })
    );
    assert_eq!(t.latest(), t.newest);
    // Times name the last record captured at or before them.
    let p = t
        .resolve(&f.jdir, None, &PointName::Time(1_000 + 57))
        .unwrap();
    assert_eq!(p.seq, 57);
}

#[test]
fn torn_tail_and_reopen_keep_every_acknowledged_point() {
    let f = fixture();
    let mut s = sink(&f, cfg(1 << 30), &state(0, Reason::None));
    let mut rng = Rng(7);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    run(&mut s, &mut rng, 1, 40, &mut model, &mut snaps);
    drop(s);
    // A torn tail: half an entry, and payload bytes no entry names.
    let idx = segment::idx_path(&f.jdir, 1);
    let mut b = std::fs::read(&idx).unwrap();
    b.extend_from_slice(&[0xab; 37]);
    std::fs::write(&idx, &b).unwrap();
    let dat = segment::dat_path(&f.jdir, 1);
    let mut d = std::fs::read(&dat).unwrap();
    d.extend_from_slice(&[0xcd; 1000]);
    std::fs::write(&dat, &d).unwrap();
    // Reopened on a state that acknowledged only up to 35: 36..40 are
    // applied but unacknowledged; the shipper sends them again.
    let mut s = sink(&f, cfg(1 << 30), &state(35, Reason::None));
    assert_eq!(std::fs::read(&idx).unwrap().len(), b.len() - 37);
    let mut rng2 = Rng(7);
    let mut m2 = vec![0u8; SIZE as usize];
    let mut s2 = vec![m2.clone()];
    // Replay the same stream from the start into the model only.
    {
        let mut dummy = sink(&fixture(), cfg(1 << 30), &state(0, Reason::None));
        run(&mut dummy, &mut rng2, 1, 40, &mut m2, &mut s2);
    }
    assert!(s2 == snaps, "the stream is deterministic");
    // Resend 36..=40 exactly as the ring holds them, then 10 more.
    let mut rng3 = Rng(7);
    let mut scratch = vec![0u8; SIZE as usize];
    let mut ss = vec![scratch.clone()];
    let mut other = sink(&fixture(), cfg(1 << 30), &state(0, Reason::None));
    run(&mut other, &mut rng3, 1, 35, &mut scratch, &mut ss);
    let mut model = snaps[35].clone();
    run(&mut s, &mut rng3, 36, 15, &mut model, &mut snaps);
    for seq in [0u64, 5, 35, 36, 38, 40, 41, 50] {
        let v = view(
            &f,
            Pos {
                epoch: 0,
                seq,
                sub: true,
            },
        );
        same(&read_all(&v), &snaps[seq as usize], &format!("point {seq}"));
    }
}

#[test]
fn gaps_epochs_and_marks() {
    let f = fixture();
    let mut s = sink(&f, cfg(1 << 30), &state(0, Reason::None));
    let mut rng = Rng(99);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    run(&mut s, &mut rng, 1, 10, &mut model, &mut snaps);
    s.position(11, false, 2_000, true);
    s.mark(b"before-upgrade", 1).unwrap();
    snaps.push(model.clone());
    // An overflow: not consistent after 11; a resync rewrites blocks.
    s.consistency(false, Reason::SourceOverflow);
    s.position(12, false, 2_001, false);
    s.write(0, &[0xee; 4096]).unwrap();
    s.position(12, true, 0, false);
    s.write(8192, &[0xdd; 4096]).unwrap();
    s.consistency(true, Reason::None);
    s.commit().unwrap();
    let t = Timeline::load(&f.jdir, Some(&state(12, Reason::None))).unwrap();
    assert_eq!(t.marks.len(), 1);
    assert!(t.marks[0].app);
    assert_eq!(t.gaps.len(), 1);
    let g = t.gaps[0];
    assert_eq!(
        g.from,
        Some(Pos {
            epoch: 0,
            seq: 11,
            sub: false
        })
    );
    assert_eq!(
        g.to,
        Some(Pos {
            epoch: 0,
            seq: 12,
            sub: true
        })
    );
    assert_eq!(g.reason, Reason::SourceOverflow);
    let m = t
        .resolve(&f.jdir, None, &PointName::Mark("before-upgrade".into()))
        .unwrap();
    same(&read_all(&view(&f, m)), &snaps[11], "mark");
    assert!(t.resolve(&f.jdir, None, &PointName::Seq(12)).is_ok());
    assert_eq!(
        t.resolve(&f.jdir, None, &PointName::Seq(12)).unwrap(),
        Pos {
            epoch: 0,
            seq: 12,
            sub: true
        }
    );
    // The source's numbers start again (its ring went back to 5).
    drop(s);
    let before = state(12, Reason::None);
    let mut j = JournalWriter::open(&f.jdir, cfg(1 << 30), &before, "d").unwrap();
    j.after_hello(&before, &state(5, Reason::SourceGap))
        .unwrap();
    let w = ReplicaSpec::File(f.img.clone()).open_writer(SIZE).unwrap();
    let mut s = Journaled::new(w, Some(j));
    s.position(6, false, 3_000, false);
    s.write(4096, &[0x11; 4096]).unwrap();
    s.commit().unwrap();
    let t = Timeline::load(&f.jdir, Some(&state(6, Reason::SourceGap))).unwrap();
    assert_eq!(t.newest.map(|p| p.epoch), Some(1));
    // The newest consistent point is the last one before the new epoch.
    assert_eq!(
        t.latest(),
        Some(Pos {
            epoch: 0,
            seq: 12,
            sub: true
        })
    );
    let v = view(&f, t.latest().unwrap());
    let mut want = snaps[11].clone();
    want[0..4096].fill(0xee);
    want[8192..12288].fill(0xdd);
    same(&read_all(&v), &want, "last point of epoch 0");
}

#[test]
fn pruning_keeps_what_a_lease_needs() {
    let f = fixture();
    let mut c = cfg(32 << 10);
    let mut s = sink(&f, c, &state(0, Reason::None));
    let mut rng = Rng(3);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    run(&mut s, &mut rng, 1, 100, &mut model, &mut snaps);
    let old = view(
        &f,
        Pos {
            epoch: 0,
            seq: 5,
            sub: true,
        },
    );
    c.max_bytes = 1;
    let p = prune::prune(&f.jdir, &c, "d").unwrap();
    assert_eq!(p.segments, 0, "the lease on 5 keeps everything after it");
    assert!(p.kept_for_leases > 0);
    run(&mut s, &mut rng, 101, 50, &mut model, &mut snaps);
    same(&read_all(&old), &snaps[5], "the old view still reads right");
    drop(old);
    let p = prune::prune(&f.jdir, &c, "d").unwrap();
    assert!(p.segments > 0);
    let t = Timeline::load(&f.jdir, Some(&state(150, Reason::None))).unwrap();
    let oldest = t.oldest.unwrap();
    assert!(oldest.seq > 5, "{oldest}");
    same(
        &read_all(&view(&f, oldest)),
        &snaps[oldest.seq as usize],
        "oldest",
    );
    assert!(t.resolve(&f.jdir, None, &PointName::Seq(5)).is_err());
    // Retention by age: every segment but the newest goes.
    c.max_bytes = 1 << 40;
    c.retention = Duration::ZERO;
    std::thread::sleep(Duration::from_millis(5));
    prune::prune(&f.jdir, &c, "d").unwrap();
    assert_eq!(segment::list(&f.jdir).unwrap().len(), 1);
}

#[test]
fn a_write_reaches_the_replica_only_after_its_undo_entry_is_written() {
    let f = fixture();
    let mut s = sink(&f, cfg(1 << 30), &state(0, Reason::None));
    s.position(1, false, 1, true);
    s.write(0, &[7; 4096]).unwrap();
    // Held: neither in the replica nor is its entry in the index yet.
    let img = std::fs::read(&f.img).unwrap();
    assert!(
        img[..4096].iter().all(|&b| b == 0),
        "held until the journal is durable"
    );
    let idx = segment::idx_path(&f.jdir, 1);
    assert_eq!(std::fs::metadata(&idx).unwrap().len(), 128);
    // A record touching it flushes first: entry, then the replica.
    s.position(2, false, 2, true);
    s.write(2048, &[8; 4096]).unwrap();
    assert_eq!(std::fs::metadata(&idx).unwrap().len(), 128 + 64);
    assert!(std::fs::read(&f.img).unwrap()[..4096]
        .iter()
        .all(|&b| b == 7));
    s.commit().unwrap();
    let img = std::fs::read(&f.img).unwrap();
    assert!(img[..2048].iter().all(|&b| b == 7) && img[2048..6144].iter().all(|&b| b == 8));
    assert_eq!(std::fs::metadata(&idx).unwrap().len(), 128 + 2 * 64);
}

#[test]
fn entries_kept_past_a_crash_stay_visible_across_a_segment_roll() {
    let f = fixture();
    let c = cfg(48 << 10);
    let mut s = sink(&f, c, &state(0, Reason::None));
    let mut rng = Rng(11);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    run(&mut s, &mut rng, 1, 60, &mut model, &mut snaps);
    drop(s);
    // The state acknowledged only 20: 21..60 reached the replica and the
    // journal, unacknowledged. The shipper resends them; segments roll.
    let mut s = sink(&f, c, &state(20, Reason::None));
    let mut rng2 = Rng(11);
    let mut scratch = vec![0u8; SIZE as usize];
    let mut ss = vec![scratch.clone()];
    let mut other = sink(&fixture(), cfg(1 << 30), &state(0, Reason::None));
    run(&mut other, &mut rng2, 1, 20, &mut scratch, &mut ss);
    let mut model = snaps[20].clone();
    run(&mut s, &mut rng2, 21, 60, &mut model, &mut snaps);
    assert!(segment::list(&f.jdir).unwrap().len() > 3);
    for seq in [20u64, 25, 30, 40, 55, 60, 70, 80] {
        let v = view(
            &f,
            Pos {
                epoch: 0,
                seq,
                sub: true,
            },
        );
        same(&read_all(&v), &snaps[seq as usize], &format!("point {seq}"));
    }
}

#[test]
fn a_segment_pruned_while_a_view_opens_is_an_error_not_a_hole() {
    let f = fixture();
    let mut s = sink(&f, cfg(32 << 10), &state(0, Reason::None));
    let mut rng = Rng(5);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    run(&mut s, &mut rng, 1, 120, &mut model, &mut snaps);
    let segs = segment::list(&f.jdir).unwrap();
    assert!(segs.len() > 4, "{segs:?}");
    // A middle segment gone (a prune racing the view's opening).
    let mid = segs[2];
    let base_after = segment::Segment::open(&f.jdir, segs[3])
        .unwrap()
        .unwrap()
        .header
        .base;
    segment::remove_pair(&f.jdir, mid).unwrap();
    let r = ReplicaSpec::File(f.img.clone()).open_reader().unwrap();
    let p = Pos {
        epoch: 0,
        seq: base_after.seq.saturating_sub(1),
        sub: true,
    };
    let e = PointView::open(&f.jdir, r, SIZE, p, "test").expect_err("a hole in the journal");
    assert!(e.to_string().contains("older than the oldest kept"), "{e}");
    // Points after the hole are still right.
    let later = Pos {
        epoch: 0,
        seq: 110,
        sub: true,
    };
    same(&read_all(&view(&f, later)), &snaps[110], "after the hole");
}
