//! The adaptive choice: stored, zstd-1, or zstd-3, from what is scarce.
//!
//! Every half second the shipper's loop reports how it spent the time
//! (blocked on the link with a batch ready, busy with data waiting, or
//! idle), the bytes it put on the wire, and what zstd did to the batches it
//! compressed (or to a 64 KiB probe taken every second while sending
//! stored, every batch while the data did not compress). From that it keeps three estimates:
//! - the **link rate**: wire bytes per second while the link was the
//!   bottleneck (blocked at least 40% of the time: the window full, the
//!   socket not taking more, or `--max-rate`), forgotten after 30 s without
//!   being the bottleneck, raised when more went through;
//! - the **compression rate**: plain bytes per second zstd-1 handles on the
//!   pool's threads (measured, on this machine, under its load);
//! - the **ratio**: packed / plain bytes of recent data.
//!
//! The choice:
//! - data that does not compress (ratio ≥ 0.97): stored;
//! - the link is known to be the bottleneck: the model says compress when
//!   that moves more plain bytes through it, `min(compression rate, link
//!   rate / ratio)` above 1.15 × the link rate; a stronger level when the
//!   link stays the bottleneck with at least 30% of the CPU idle; stored
//!   otherwise. But "the link" is whatever stops the shipper from sending:
//!   the network, or a recovery site busy writing (on one machine, or a
//!   slow replica disk), where compressing only adds work at both ends. So
//!   the model is only the first guess: while the link is the bottleneck
//!   the policy **measures** the plain bytes per second each choice
//!   (stored, zstd-1, zstd-3 when the CPU has room) actually moves,
//!   probing each one for a half-second window when its figure is missing
//!   or older than 60 s, and keeps the best (a cheaper one unless a
//!   dearer one moves 5% more);
//! - otherwise the link has room: stored while the CPU is busy (less than
//!   15% idle, or the shipper itself behind), zstd-1 when it is idle (at
//!   least 35%; between the two the choice stays, and a change made for
//!   the CPU stands at least 3 s).
//!
//! The machine's idle CPU comes from `/proc/stat`. `--zstd-level N` fixes
//! the choice instead.

use std::time::{Duration, Instant};

use super::{Choice, Reason};

/// How often the choice is made again.
pub const DECIDE_EVERY: Duration = Duration::from_millis(500);
/// How long a measured link rate is believed without being seen again.
const LINK_MEMORY: Duration = Duration::from_secs(30);
/// Compression rate per thread assumed before one is measured (bytes/s).
const DEFAULT_ZSTD_RATE: f64 = 150e6;
/// The stronger level.
const STRONG: i32 = 3;
/// How long a change made for the CPU's sake stands before the next one.
const CPU_DWELL: Duration = Duration::from_secs(3);
/// How long a measured throughput of a choice is believed.
const MEASURE_MEMORY: Duration = Duration::from_secs(60);
/// The choices measured against each other while the link is the
/// bottleneck, cheapest first.
const CANDIDATES: [Choice; 3] = [Choice::Stored, Choice::Zstd(1), Choice::Zstd(STRONG)];

fn candidate(c: Choice) -> Option<usize> {
    CANDIDATES.iter().position(|&x| x == c)
}

fn link_reason(c: Choice) -> Reason {
    match c {
        Choice::Stored => Reason::LinkFasterThanZstd,
        Choice::Zstd(l) if l >= STRONG => Reason::LinkBoundCpuSpare,
        Choice::Zstd(_) => Reason::LinkBound,
    }
}

/// Among measured plain rates (cheapest first), the best: a dearer choice
/// only when it moves 5% more than the best cheaper one.
fn best(rates: &[Option<f64>]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, r) in rates.iter().enumerate() {
        if let Some(r) = *r {
            if best.is_none_or(|(_, b)| r > 1.05 * b) {
                best = Some((i, r));
            }
        }
    }
    best.map(|b| b.0)
}

/// How the shipper's loop spent a stretch of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// A batch (or records) waiting, the link not taking it.
    Blocked,
    /// Records waiting, the link free: encoding, compressing, waiting for
    /// the pool.
    Busy,
    /// Nothing to send.
    Idle,
}

/// What one decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// The choice in force.
    pub current: Choice,
    /// Fraction of the window spent blocked on the link.
    pub blocked: f64,
    /// Fraction spent busy with records waiting.
    pub busy: f64,
    /// Wire bytes per second link rate, when the link was the bottleneck
    /// recently.
    pub link_rate: Option<f64>,
    /// Packed / plain of recent data.
    pub ratio: Option<f64>,
    /// Plain bytes per second all compression threads handle.
    pub zstd_rate: f64,
    /// The machine's idle CPU fraction over the window.
    pub cpu_idle: Option<f64>,
}

/// The choice for `i`.
pub fn decide(i: &Inputs) -> (Choice, Reason) {
    if i.ratio.is_some_and(|r| r >= 0.97) {
        return (Choice::Stored, Reason::Incompressible);
    }
    let idle = i.cpu_idle.unwrap_or(0.0);
    if let Some(link) = i.link_rate {
        let ratio = i.ratio.unwrap_or(0.5).max(0.01);
        let packed = i.zstd_rate.min(link / ratio);
        if packed <= 1.15 * link {
            return (Choice::Stored, Reason::LinkFasterThanZstd);
        }
        let saturated = i.blocked >= 0.4;
        let strong = matches!(i.current, Choice::Zstd(l) if l >= STRONG);
        if saturated && (idle >= 0.3 || (strong && idle >= 0.15)) {
            return (Choice::Zstd(STRONG), Reason::LinkBoundCpuSpare);
        }
        return (Choice::Zstd(1), Reason::LinkBound);
    }
    match i.current {
        Choice::Zstd(_) if idle < 0.15 || i.busy > 0.5 => (Choice::Stored, Reason::CpuBound),
        Choice::Zstd(_) => (Choice::Zstd(1), Reason::CpuIdle),
        Choice::Stored if idle >= 0.35 && i.busy < 0.2 => (Choice::Zstd(1), Reason::CpuIdle),
        Choice::Stored => (Choice::Stored, Reason::CpuBound),
    }
}

/// The machine's CPU time counters from `/proc/stat`: (idle, total) jiffies.
fn cpu_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((idle, total))
}

/// Exponential moving average.
fn ema(old: Option<f64>, new: f64, weight: f64) -> f64 {
    old.map_or(new, |o| o + (new - o) * weight)
}

/// The adaptive (or fixed) choice and what it is made from.
#[derive(Debug)]
pub struct Policy {
    fixed: Option<Choice>,
    threads: usize,
    choice: Choice,
    reason: Reason,
    window_start: Instant,
    blocked: Duration,
    busy: Duration,
    wire: u64,
    /// Plain bytes of batches of the choice in force sent after the first
    /// one in this window, and when that first one went.
    plain: u64,
    first_sent: Option<Instant>,
    /// Plain bytes per second each of [`CANDIDATES`] moved while the link
    /// was the bottleneck, and when.
    measured: [Option<(f64, Instant)>; 3],
    /// The choice in force is a probe (one window), not a decision.
    probing: bool,
    /// The last choice decided (not probed), for the log.
    decided: Choice,
    /// When the choice in force was made.
    since: Instant,
    cpu_mark: Option<(u64, u64)>,
    link: Option<(f64, Instant)>,
    ratio: Option<f64>,
    zstd_rate: Option<f64>,
    last_probe: Instant,
}

impl Policy {
    /// `fixed`: `--zstd-level` when given. `threads`: compression threads
    /// (0: on the shipper's own thread, which counts as one).
    pub fn new(fixed: Option<i32>, threads: usize) -> Policy {
        let fixed = fixed.map(Choice::from_level);
        Policy {
            fixed,
            threads: threads.max(1),
            choice: fixed.unwrap_or(Choice::Zstd(1)),
            reason: if fixed.is_some() {
                Reason::Fixed
            } else {
                Reason::Starting
            },
            window_start: Instant::now(),
            blocked: Duration::ZERO,
            busy: Duration::ZERO,
            wire: 0,
            plain: 0,
            first_sent: None,
            measured: [None; 3],
            probing: false,
            decided: fixed.unwrap_or(Choice::Zstd(1)),
            since: Instant::now()
                .checked_sub(CPU_DWELL)
                .unwrap_or_else(Instant::now),
            cpu_mark: cpu_times(),
            link: None,
            ratio: None,
            zstd_rate: None,
            last_probe: Instant::now(),
        }
    }

    /// The choice in force and why.
    pub fn current(&self) -> (Choice, Reason) {
        (self.choice, self.reason)
    }

    /// The loop spent `d` this way.
    pub fn spent(&mut self, how: Spent, d: Duration) {
        match how {
            Spent::Blocked => self.blocked += d,
            Spent::Busy => self.busy += d,
            Spent::Idle => {}
        }
    }

    /// A batch of `plain` record bytes, sealed as `choice`, went on the
    /// wire as `wire` bytes. Only batches of the choice in force count
    /// toward what it moves (a probe's window also sends batches sealed
    /// before it).
    pub fn sent(&mut self, wire: u64, plain: u64, choice: Choice) {
        self.wire += wire;
        if choice == self.choice {
            // Timed from the first such batch: the window's start went to
            // batches sealed before it.
            if self.first_sent.is_none() {
                self.first_sent = Some(Instant::now());
            } else {
                self.plain += plain;
            }
        }
    }

    /// What zstd did: `input` plain bytes into `output`, in `ns`.
    pub fn zstd(&mut self, input: usize, output: usize, ns: u64) {
        if input == 0 {
            return;
        }
        let r = output as f64 / input as f64;
        // Data changes kind at once (a file of text after one of random
        // bytes): a sample far from the average replaces it.
        self.ratio = Some(match self.ratio {
            Some(old) if (r - old).abs() <= 0.2 => ema(Some(old), r, 0.3),
            _ => r,
        });
        if ns > 0 {
            let rate = input as f64 * 1e9 / ns as f64;
            self.zstd_rate = Some(ema(self.zstd_rate, rate, 0.3));
        }
    }

    /// Whether the next stored batch should carry a probe: every batch
    /// while stored because the data did not compress (so compressible
    /// data is noticed within a batch), one a second otherwise.
    pub fn wants_probe(&mut self) -> bool {
        let every = if self.reason == Reason::Incompressible {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        if self.fixed.is_some()
            || self.choice != Choice::Stored
            || self.last_probe.elapsed() < every
        {
            return false;
        }
        self.last_probe = Instant::now();
        true
    }

    /// Decide again when a window has passed; Some((old, new, reason))
    /// when the choice changed.
    pub fn tick(&mut self) -> Option<(Choice, Choice, Reason)> {
        let wall = self.window_start.elapsed();
        if self.fixed.is_some() || wall < DECIDE_EVERY {
            return None;
        }
        let secs = wall.as_secs_f64();
        let blocked = self.blocked.as_secs_f64() / secs;
        let busy = self.busy.as_secs_f64() / secs;
        let wire_rate = self.wire as f64 / secs;
        let now = cpu_times();
        let cpu_idle = match (self.cpu_mark, now) {
            (Some((i0, t0)), Some((i1, t1))) if t1 > t0 => {
                Some(i1.saturating_sub(i0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        self.cpu_mark = now;
        if blocked >= 0.4 && wire_rate > 0.0 {
            let r = ema(self.link.map(|l| l.0), wire_rate, 0.5);
            self.link = Some((r, Instant::now()));
        } else if let Some((r, seen)) = self.link {
            if wire_rate > 1.2 * r {
                self.link = Some((wire_rate, seen));
            } else if seen.elapsed() > LINK_MEMORY {
                self.link = None;
            }
        }
        // What the choice in force moved, when the link or the CPU held it
        // back (not when the writer gave it little to move), and always
        // what a probe moved.
        let timed = self.first_sent.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if (self.probing || blocked >= 0.4 || busy >= 0.5)
            && self.link.is_some()
            && self.plain > 0
            && timed > 0.05
        {
            if let Some(i) = candidate(self.choice) {
                let rate = self.plain as f64 / timed;
                let old = self.measured[i].filter(|m| m.1.elapsed() < MEASURE_MEMORY);
                // A probe's one window replaces; a running choice averages.
                let r = if self.probing {
                    rate
                } else {
                    ema(old.map(|m| m.0), rate, 0.5)
                };
                self.measured[i] = Some((r, Instant::now()));
            }
        }
        let (mut choice, mut reason) = decide(&Inputs {
            current: self.choice,
            blocked,
            busy,
            link_rate: self.link.map(|l| l.0),
            ratio: self.ratio,
            zstd_rate: self.zstd_rate.unwrap_or(DEFAULT_ZSTD_RATE) * self.threads as f64,
            cpu_idle,
        });
        self.probing = false;
        // The CPU's idle share swings with the writer: a change made for
        // the CPU's sake stands for a while, so the choice does not flap.
        let cpu_reason = matches!(reason, Reason::CpuBound | Reason::CpuIdle);
        if cpu_reason && choice != self.choice && self.since.elapsed() < CPU_DWELL {
            // Kept: say why it is what it is now.
            choice = self.choice;
            reason = if choice == Choice::Stored {
                Reason::CpuBound
            } else {
                Reason::CpuIdle
            };
        }
        if self.link.is_some() && reason != Reason::Incompressible {
            // The link is the bottleneck: measurements decide, the model's
            // choice is what gets measured first.
            let spare = cpu_idle.unwrap_or(0.0) >= 0.3;
            let fresh = |m: &Option<(f64, Instant)>| {
                m.filter(|m| m.1.elapsed() < MEASURE_MEMORY).map(|m| m.0)
            };
            let rates: Vec<Option<f64>> = self.measured.iter().map(fresh).collect();
            // zstd-3 is a candidate with CPU to spare, or once it proved best.
            let allowed = |i: usize| i < 2 || spare || rates[2].is_some();
            let missing = (0..CANDIDATES.len()).find(|&i| allowed(i) && rates[i].is_none());
            let model_first = candidate(choice).filter(|&i| rates[i].is_none());
            if let Some(i) = model_first.or(missing) {
                choice = CANDIDATES[i];
                self.probing = true;
            } else if let Some(i) = best(&rates) {
                choice = CANDIDATES[i];
            }
            reason = link_reason(choice);
        }
        self.window_start = Instant::now();
        self.blocked = Duration::ZERO;
        self.busy = Duration::ZERO;
        self.wire = 0;
        self.plain = 0;
        self.first_sent = None;
        if choice != self.choice {
            self.since = Instant::now();
        }
        self.choice = choice;
        self.reason = reason;
        // Probes are not news; a decision that differs from the last is.
        let old = self.decided;
        if self.probing || choice == old {
            return None;
        }
        self.decided = choice;
        Some((old, choice, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            current: Choice::Zstd(1),
            blocked: 0.0,
            busy: 0.0,
            link_rate: None,
            ratio: Some(0.5),
            zstd_rate: 400e6,
            cpu_idle: Some(0.0),
        }
    }

    #[test]
    fn a_fast_link_and_a_busy_cpu_send_stored() {
        let i = Inputs {
            busy: 0.9,
            ..inputs()
        };
        assert_eq!(decide(&i), (Choice::Stored, Reason::CpuBound));
        // It stays stored while the CPU is busy, and compresses once idle.
        let i = Inputs {
            current: Choice::Stored,
            ..i
        };
        assert_eq!(decide(&i), (Choice::Stored, Reason::CpuBound));
        let i = Inputs {
            cpu_idle: Some(0.6),
            busy: 0.0,
            ..i
        };
        assert_eq!(decide(&i), (Choice::Zstd(1), Reason::CpuIdle));
        // Between the thresholds the choice stays (no flapping).
        let mid = Inputs {
            cpu_idle: Some(0.25),
            ..i
        };
        assert_eq!(decide(&mid).0, Choice::Stored);
        let mid = Inputs {
            current: Choice::Zstd(1),
            ..mid
        };
        assert_eq!(decide(&mid).0, Choice::Zstd(1));
    }

    #[test]
    fn a_slow_link_is_filled_with_compressed_batches() {
        // 1 Gbit/s: 117 MB/s on the wire; zstd halves the data and runs at
        // 400 MB/s: compressed, 234 MB/s of writes get through.
        let i = Inputs {
            blocked: 0.8,
            link_rate: Some(117e6),
            ..inputs()
        };
        assert_eq!(decide(&i), (Choice::Zstd(1), Reason::LinkBound));
        // Even while stored (it was chosen before the link filled up).
        let stored = Inputs {
            current: Choice::Stored,
            ..i
        };
        assert_eq!(decide(&stored), (Choice::Zstd(1), Reason::LinkBound));
        // With CPU to spare: the stronger level, kept with less spare.
        let spare = Inputs {
            cpu_idle: Some(0.5),
            ..i
        };
        assert_eq!(decide(&spare), (Choice::Zstd(3), Reason::LinkBoundCpuSpare));
        let keep = Inputs {
            current: Choice::Zstd(3),
            cpu_idle: Some(0.2),
            ..i
        };
        assert_eq!(decide(&keep).0, Choice::Zstd(3));
        let drop = Inputs {
            current: Choice::Zstd(3),
            cpu_idle: Some(0.05),
            ..i
        };
        assert_eq!(decide(&drop).0, Choice::Zstd(1));
    }

    #[test]
    fn a_link_faster_than_zstd_and_incompressible_data_go_stored() {
        let i = Inputs {
            blocked: 0.8,
            link_rate: Some(900e6),
            ..inputs()
        };
        assert_eq!(decide(&i), (Choice::Stored, Reason::LinkFasterThanZstd));
        let i = Inputs {
            link_rate: Some(117e6),
            ratio: Some(0.99),
            ..i
        };
        assert_eq!(decide(&i), (Choice::Stored, Reason::Incompressible));
    }

    #[test]
    fn a_fixed_level_never_changes_and_probes_are_rationed() {
        let mut p = Policy::new(Some(0), 2);
        assert_eq!(p.current(), (Choice::Stored, Reason::Fixed));
        p.window_start -= Duration::from_secs(1);
        p.spent(Spent::Blocked, Duration::from_secs(1));
        assert_eq!(p.tick(), None);
        assert!(!p.wants_probe());
        let mut p = Policy::new(None, 2);
        assert_eq!(p.current(), (Choice::Zstd(1), Reason::Starting));
        // A window of a busy shipper on a loaded machine: it goes stored
        // (this machine may be idle; then it stays compressed, also fine).
        p.window_start -= Duration::from_secs(1);
        p.spent(Spent::Busy, Duration::from_millis(900));
        let _ = p.tick();
        assert_ne!(p.current().1, Reason::Starting);
        p.choice = Choice::Stored;
        p.last_probe -= Duration::from_secs(2);
        assert!(p.wants_probe());
        assert!(!p.wants_probe());
    }

    /// One window of the policy: blocked, `plain` bytes moved in it.
    fn window(p: &mut Policy, plain: u64) {
        p.window_start -= Duration::from_secs(1);
        p.spent(Spent::Blocked, Duration::from_millis(900));
        // The first batch starts the clock; the rest count, over 0.9 s.
        let c = p.current().0;
        p.sent(0, 0, c);
        p.first_sent = p.first_sent.map(|t| t - Duration::from_millis(900));
        p.sent(plain / 2, plain * 9 / 10, c);
        let _ = p.tick();
    }

    #[test]
    fn while_the_link_holds_it_back_the_choice_that_moves_most_wins() {
        // A recovery site that writes slower when it must also decompress:
        // zstd-1 moves 300 MB/s, stored 340; the model would compress.
        let mut p = Policy::new(None, 2);
        p.zstd(1 << 20, 1 << 19, 1_000_000);
        let mut seen = Vec::new();
        for _ in 0..8 {
            let c = p.current().0;
            seen.push(c);
            let moved = match c {
                Choice::Stored => 340_000_000,
                Choice::Zstd(1) => 300_000_000,
                _ => 200_000_000,
            };
            window(&mut p, moved);
        }
        assert!(
            seen.contains(&Choice::Stored) && seen.contains(&Choice::Zstd(1)),
            "{seen:?}"
        );
        assert_eq!(p.current(), (Choice::Stored, Reason::LinkFasterThanZstd));
        // A slow network: zstd-1 moves twice what stored does.
        let mut p = Policy::new(None, 2);
        p.zstd(1 << 20, 1 << 19, 1_000_000);
        for _ in 0..8 {
            let moved = match p.current().0 {
                Choice::Stored => 117_000_000,
                Choice::Zstd(1) => 234_000_000,
                _ => 150_000_000,
            };
            window(&mut p, moved);
        }
        assert_eq!(p.current().0, Choice::Zstd(1), "{:?}", p.measured);
        // Stale figures are measured again: a probe, then back.
        for m in p.measured.iter_mut().flatten() {
            m.1 -= MEASURE_MEMORY;
        }
        window(&mut p, 234_000_000);
        assert!(p.probing, "{:?}", p.measured);
    }

    #[test]
    fn best_prefers_the_cheaper_within_five_percent() {
        assert_eq!(best(&[Some(100.0), Some(104.0), None]), Some(0));
        assert_eq!(best(&[Some(100.0), Some(110.0), Some(112.0)]), Some(1));
        assert_eq!(best(&[None, Some(110.0), Some(120.0)]), Some(2));
        assert_eq!(best(&[None, None, None]), None);
    }

    #[test]
    fn the_link_rate_is_learned_while_blocked_and_forgotten_later() {
        let mut p = Policy::new(None, 1);
        p.window_start -= Duration::from_secs(1);
        p.spent(Spent::Blocked, Duration::from_millis(800));
        p.sent(100_000_000, 200_000_000, p.current().0);
        p.zstd(1 << 20, 1 << 19, 2_000_000);
        let _ = p.tick();
        let r = p.link.map(|l| l.0).unwrap_or(0.0);
        assert!((90e6..110e6).contains(&r), "{r}");
        // The link regime: zstd-1 was measured, another choice is probed next.
        assert!(p.probing, "{:?}", p.measured);
        assert!(
            matches!(
                p.current().1,
                Reason::LinkBound | Reason::LinkBoundCpuSpare | Reason::LinkFasterThanZstd
            ),
            "{:?}",
            p.current()
        );
        p.link = p
            .link
            .map(|(r, t)| (r, t - LINK_MEMORY - Duration::from_secs(1)));
        p.window_start -= Duration::from_secs(1);
        let _ = p.tick();
        assert!(p.link.is_none());
    }
}
