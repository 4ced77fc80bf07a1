//! `--max-rate`: a pacer that lets a sender go when the bytes it already
//! sent have had their time at the configured rate (ASR's network
//! throttling, done per shipper).

use std::time::{Duration, Instant};

/// Paces bytes to a rate.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u64>,
    next: Instant,
}

impl Pacer {
    /// Bytes per second; `None` is unlimited.
    pub fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate: rate.filter(|&r| r > 0),
            next: Instant::now(),
        }
    }

    /// How long until more may be sent (zero: now).
    pub fn wait(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// Account for `bytes` just sent.
    pub fn sent(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let now = Instant::now();
        // Never bank more than 100 ms of unused credit.
        let base = self
            .next
            .max(now - Duration::from_millis(100).min(now.elapsed()));
        self.next = base + Duration::from_secs_f64(bytes as f64 / rate as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let mut p = Pacer::new(Some(1_000_000));
        p.sent(500_000);
        let w = p.wait();
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
        let mut u = Pacer::new(None);
        u.sent(1 << 30);
        assert_eq!(u.wait(), Duration::ZERO);
    }
}
