//! [`Pacer`]: a bandwidth cap for the background push (QEMU's
//! `max-bandwidth` / `max-postcopy-bandwidth`). Demand answers are never
//! paced: only the push asks the pacer.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// Longest sleep of one [`Pacer::pace`] call: a sender far over its cap
/// gets control back this often (to see a cancel, say) and calls again.
pub const MAX_PACE_SLEEP: Duration = Duration::from_millis(100);

/// Keeps the bytes sent since it started at or under `rate` per second.
///
/// The rate is never 0 (under which the push would never send a page): the
/// type has no such pacer, and a rate read from outside comes through
/// [`check_rate`] or [`parse_rate`], which refuse 0 saying why.
///
/// ```compile_fail
/// // A plain number, 0 included, is not a rate.
/// let _ = ferry_page_server::pacer::Pacer::new(0);
/// ```
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: NonZeroU64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    /// A pacer for `rate` bytes per second, starting now.
    pub fn new(rate: NonZeroU64) -> Self {
        Self {
            rate,
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Counts `bytes` as sent.
    pub fn sent(&mut self, bytes: u64) {
        self.sent = self.sent.saturating_add(bytes);
    }

    /// How long to wait before sending more; zero when under the cap.
    pub fn wait(&self) -> Duration {
        let due = Duration::try_from_secs_f64(self.sent as f64 / self.rate.get() as f64)
            .unwrap_or(Duration::MAX);
        due.saturating_sub(self.start.elapsed())
    }

    /// Sleeps until more may be sent, but no longer than
    /// [`MAX_PACE_SLEEP`] (for blocking senders). True when more may be
    /// sent now; false when the sender is still over its cap and should
    /// call again, after whatever it must look at meanwhile (a cancel).
    #[must_use]
    pub fn pace(&self) -> bool {
        let w = self.wait();
        if w.is_zero() {
            return true;
        }
        std::thread::sleep(w.min(MAX_PACE_SLEEP));
        w <= MAX_PACE_SLEEP
    }
}

/// Refuses a cap of 0 bytes per second, under which the push would never
/// send a page (and a VM paused for the copy would wait for ever); returns
/// the rate, as the only kind a [`Pacer`] takes. The rule of [`parse_rate`]
/// and of the API's `max_bandwidth`.
pub fn check_rate(rate: u64) -> Result<NonZeroU64, String> {
    NonZeroU64::new(rate).ok_or_else(|| {
        "0 bytes/s would never send a page: give at least 1 (bytes per second), or no cap".into()
    })
}

/// Parses a bandwidth: `200mbit`, `1gbit`, `500kbit` (bits per second), or
/// `25M`, `1G`, `4096` (bytes per second). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<NonZeroU64, String> {
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
    check_rate(v).map_err(|why| format!("invalid bandwidth {s:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let rate = |s| parse_rate(s).map(NonZeroU64::get);
        assert_eq!(rate("200mbit").unwrap(), 25_000_000);
        assert_eq!(rate("1gbit").unwrap(), 125_000_000);
        assert_eq!(rate("25M").unwrap(), 25 << 20);
        assert_eq!(rate("4096").unwrap(), 4096);
        for bad in ["", "fast", "0", "-5M", "99999999999999999999G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cap_of_zero_is_refused_saying_why() {
        let e = check_rate(0).unwrap_err();
        assert!(e.contains("0 bytes/s would never send a page"), "{e}");
        assert_eq!(check_rate(1), Ok(NonZeroU64::MIN));
        let e = parse_rate("7bit").unwrap_err();
        assert!(e.contains("\"7bit\": 0 bytes/s"), "{e}");
    }

    /// A pacer is made only from a rate of at least 1 byte/s: 0 is
    /// refused where a rate comes in, never turned into 1 byte/s (whose
    /// push would take days); the type takes nothing else (see the
    /// `compile_fail` example on [`Pacer`]).
    #[test]
    fn a_pacer_of_zero_cannot_be_made() {
        for zero in ["0", "0M", "0gbit", "7bit"] {
            assert!(parse_rate(zero).is_err(), "{zero}");
        }
        assert!(check_rate(0).is_err());
        let p = Pacer::new(check_rate(1).unwrap());
        assert_eq!(p.rate.get(), 1);
        let mut p = Pacer::new(parse_rate("1M").unwrap());
        p.sent(1 << 19);
        let w = p.wait();
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }

    /// Far over its cap (1 MiB sent at 1 byte/s: 12 days ahead), a pacer
    /// sleeps one bounded nap per call and says it is still ahead; under
    /// a short wait it sleeps that and says go.
    #[test]
    fn a_pace_call_sleeps_at_most_max_pace_sleep() {
        let mut p = Pacer::new(NonZeroU64::MIN);
        p.sent(1 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            let go = p.pace();
            let _ = tx.send((go, t.elapsed()));
        });
        let (go, took) = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("one pace() call slept past 2 s");
        assert!(!go, "12 days over the cap, and told to go on");
        assert!(
            took >= MAX_PACE_SLEEP && took < MAX_PACE_SLEEP * 5,
            "slept {took:?}"
        );
        let mut p = Pacer::new(NonZeroU64::new(1_000_000).unwrap());
        p.sent(20_000);
        assert!(p.pace(), "20 ms over the cap");
        assert!(p.wait().is_zero());
    }

    #[test]
    fn the_pacer_asks_to_wait_only_when_ahead() {
        let mut p = Pacer::new(NonZeroU64::new(1_000_000).unwrap());
        assert!(p.wait().is_zero());
        p.sent(500_000);
        let w = p.wait();
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }
}
