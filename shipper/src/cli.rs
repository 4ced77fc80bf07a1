//! Command-line pieces shared by `shipper run` and `splitter serve
//! --ship-to`, so both ways of running the shipper take the same flags.

use std::path::PathBuf;
use std::time::Duration;

use crate::ship::ShipConfig;

/// Shipping flags (everything but the ring and the target address).
#[derive(clap::Args, Debug, Clone)]
pub struct ShipArgs {
    /// The disk's id at the recovery site (its replica's name and NBD export
    /// name); the TLS certificate must be enrolled for it.
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// TLS folder with ca.pem, cert.pem, key.pem (from `nbd-target pki issue`).
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,
    /// Fix the zstd level of batches (0: never compress). Without it the
    /// shipper adapts, batch by batch: stored while the link has room and
    /// the CPU is busy, zstd-1 when the link is the bottleneck (or the CPU
    /// idle), zstd-3 when the link is the bottleneck and the CPU has room.
    /// `ring status` and the metrics say what it chose and why.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub zstd_level: Option<i32>,
    /// Threads compressing batches while the shipper reads, sends and
    /// resyncs (0: compress on the shipper's own thread). Default: one per
    /// core, at most 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub compress_threads: Option<u16>,
    /// Limit the bandwidth used on the wire, bytes per second (K, M, G suffixes), e.g. 10M.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub max_rate: Option<u64>,
    /// Most record bytes per batch (K, M suffixes).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    pub batch_size: u64,
    /// Most milliseconds a partial batch waits for more records while
    /// others are in flight (a lone write ships at once when none are).
    #[arg(long, value_name = "MS", default_value_t = 2)]
    pub batch_delay_ms: u64,
    /// Most record bytes sent and not yet acknowledged (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub window: u64,
    /// Disk bytes per resync chunk: the unit a full pass reads, compares by
    /// hash and sends (a differing chunk is then compared per 4 KiB block).
    /// A power of two from 4K to 16M.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub sync_chunk: u64,
}

impl ShipArgs {
    /// A shipper configuration for `ring` and `target`.
    pub fn config(&self, ring: PathBuf, target: String) -> Result<ShipConfig, String> {
        let disk_id = self
            .disk_id
            .clone()
            .ok_or("--disk-id is required to ship (the replica's name at the recovery site)")?;
        let tls = self
            .tls
            .clone()
            .ok_or("--tls is required to ship (a folder made by `nbd-target pki issue`)")?;
        let mut c = ShipConfig::new(ring, target, disk_id, tls);
        c.zstd_level = self.zstd_level;
        if let Some(n) = self.compress_threads {
            c.compress_threads = usize::from(n);
        }
        c.max_rate = self.max_rate;
        c.batch_bytes =
            usize::try_from(self.batch_size.clamp(64 << 10, 16 << 20)).unwrap_or(4 << 20);
        c.batch_delay = Duration::from_millis(self.batch_delay_ms);
        c.window_bytes = self.window.max(c.batch_bytes as u64);
        c.sync_chunk = self.sync_chunk;
        Ok(c)
    }
}

/// Parse a size like `512K`, `64M`, `1G`, `2T` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let m = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 1G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
