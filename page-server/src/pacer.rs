//! [`Pacer`]: a bandwidth cap for the background push (QEMU's
//! `max-bandwidth` / `max-postcopy-bandwidth`). Demand answers are never
//! paced: only the push asks the pacer.

use std::time::{Duration, Instant};

/// Keeps the bytes sent since it started at or under `rate` per second.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    /// A pacer for `rate` bytes per second, starting now.
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Counts `bytes` as sent.
    pub fn sent(&mut self, bytes: u64) {
        self.sent += bytes;
    }

    /// How long to wait before sending more; zero when under the cap.
    pub fn wait(&self) -> Duration {
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_sub(self.start.elapsed())
    }

    /// Sleeps until more may be sent (for blocking senders).
    pub fn pace(&self) {
        let w = self.wait();
        if !w.is_zero() {
            std::thread::sleep(w);
        }
    }
}

/// Parses a bandwidth: `200mbit`, `1gbit`, `500kbit` (bits per second), or
/// `25M`, `1G`, `4096` (bytes per second). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || format!("invalid bandwidth {s:?}: expected e.g. 200mbit, 1gbit or 25M (bytes/s)");
    let (num, mult, bits) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1_000_000_000u64, true)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1_000_000, true)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1_000, true)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1, true)
    } else if let Some(n) = t.strip_suffix('g') {
        (n, 1 << 30, false)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1 << 20, false)
    } else if let Some(n) = t.strip_suffix('k') {
        (n, 1 << 10, false)
    } else {
        (t.as_str(), 1, false)
    };
    let v: u64 = num.trim().parse().map_err(|_| bad())?;
    let v = v.checked_mul(mult).ok_or_else(bad)?;
    let v = if bits { v / 8 } else { v };
    if v == 0 {
        return Err(bad());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("200mbit").unwrap(), 25_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("25M").unwrap(), 25 << 20);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        for bad in ["", "fast", "0", "-5M", "99999999999999999999G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_pacer_asks_to_wait_only_when_ahead() {
        let mut p = Pacer::new(1_000_000);
        assert!(p.wait().is_zero());
        p.sent(500_000);
        let w = p.wait();
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }
}
