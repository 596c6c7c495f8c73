//! Guest serial logs with host timestamps (`<secs>.<micros> <text>`, as Ferry
//! writes them and as the QEMU peer's reader thread writes them): TICKs,
//! guest progress (rounds per second) and the guest-visible stall.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_guest::{parse_line, GuestLine};

/// Errors reading or writing a serial log.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Writing a stamped line failed.
    #[error("cannot write serial log {path}: {source}")]
    Write {
        /// The log.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One TICK: host time and the guest's round counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Host wall clock when the line arrived, µs since the epoch.
    pub host_us: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Rounds completed by that vCPU.
    pub round: u64,
}

/// What a log says: its ticks and BAD lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialLog {
    /// TICK lines, in order.
    pub ticks: Vec<Tick>,
    /// BAD lines (their guest text).
    pub bad: Vec<String>,
}

/// Host wall clock, µs since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Formats a line as Ferry's console does.
pub fn stamp(host_us: u64, text: &str) -> String {
    format!(
        "{}.{:06} {}",
        host_us / 1_000_000,
        host_us % 1_000_000,
        text
    )
}

/// Writes one stamped line and flushes it.
pub fn write_stamped(
    out: &mut impl Write,
    path: &Path,
    host_us: u64,
    text: &str,
) -> Result<(), SerialError> {
    writeln!(out, "{}", stamp(host_us, text))
        .and_then(|_| out.flush())
        .map_err(|source| SerialError::Write {
            path: path.display().to_string(),
            source,
        })
}

/// Parses a stamped log; unstamped or malformed lines are skipped.
pub fn parse_log(text: &str) -> SerialLog {
    let mut log = SerialLog::default();
    for l in text.lines() {
        let Some((stamp, rest)) = l.split_once(' ') else {
            continue;
        };
        let Some((s, us)) = stamp.split_once('.') else {
            continue;
        };
        let (Ok(s), Ok(us)) = (s.parse::<u64>(), us.parse::<u64>()) else {
            continue;
        };
        let host_us = s.saturating_mul(1_000_000).saturating_add(us);
        match parse_line(rest) {
            GuestLine::Tick { vcpu, round, .. } => log.ticks.push(Tick {
                host_us,
                vcpu,
                round,
            }),
            GuestLine::Bad { .. } => log.bad.push(rest.to_string()),
            _ => {}
        }
    }
    log
}

/// Reads a stamped log file (missing = empty).
pub fn read_log(path: &Path) -> SerialLog {
    parse_log(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The ticks of one vCPU across a move: the source's, then the
/// destination's that came later.
pub fn across(src: &SerialLog, dst: &SerialLog, vcpu: u32) -> Vec<Tick> {
    let mut out: Vec<Tick> = src
        .ticks
        .iter()
        .filter(|t| t.vcpu == vcpu)
        .copied()
        .collect();
    let last = out.last().map_or(0, |t| t.host_us);
    out.extend(
        dst.ticks
            .iter()
            .filter(|t| t.vcpu == vcpu && t.host_us > last),
    );
    out
}

/// Host time of the source's last tick (any vCPU): the pause, give or take
/// one report interval.
pub fn last_tick_us(log: &SerialLog) -> Option<u64> {
    log.ticks.iter().map(|t| t.host_us).max()
}

/// Rounds per second between consecutive ticks, as `(host_us of the later
/// tick, rate)`. Pairs whose time or round goes backwards are skipped.
pub fn round_rates(ticks: &[Tick]) -> Vec<(u64, f64)> {
    ticks
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].host_us.checked_sub(w[0].host_us).filter(|d| *d > 0)?;
            let dr = w[1].round.checked_sub(w[0].round)?;
            Some((w[1].host_us, dr as f64 * 1e6 / dt as f64))
        })
        .collect()
}

/// The guest-visible stall: the longest gap (ms) between consecutive ticks
/// of any vCPU whose later tick comes at or after `from_us` (the start of
/// the move), over the source log followed by the destination log. Ferry
/// computes its `guest_stall_ms` the same way.
pub fn max_stall_ms(src: &SerialLog, dst: &SerialLog, from_us: u64) -> Option<f64> {
    let mut vcpus: Vec<u32> = src.ticks.iter().chain(&dst.ticks).map(|t| t.vcpu).collect();
    vcpus.sort_unstable();
    vcpus.dedup();
    vcpus
        .into_iter()
        .flat_map(|v| {
            across(src, dst, v)
                .windows(2)
                .filter(|w| w[1].host_us >= from_us)
                .map(|w| w[1].host_us.saturating_sub(w[0].host_us))
                .collect::<Vec<_>>()
        })
        .max()
        .map(|us| us as f64 / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(us: u64, round: u64) -> String {
        stamp(us, &format!("FERRY TICK 0 {round} 123 4 5"))
    }

    #[test]
    fn parses_stamped_lines() {
        let text = format!(
            "{}\nnot stamped\n1.x FERRY TICK 0 1 1 1 1\n{}\n{}\n",
            tick(1_000_000, 10),
            stamp(1_050_000, "FERRY BAD page 1 gen=2"),
            stamp(1_100_000, "FERRY TICK 1 7 1 1 1"),
        );
        let log = parse_log(&text);
        assert_eq!(
            log.ticks,
            vec![
                Tick {
                    host_us: 1_000_000,
                    vcpu: 0,
                    round: 10
                },
                Tick {
                    host_us: 1_100_000,
                    vcpu: 1,
                    round: 7
                },
            ]
        );
        assert_eq!(log.bad, vec!["FERRY BAD page 1 gen=2".to_string()]);
        assert_eq!(stamp(1_000_042, "x"), "1.000042 x");
    }

    #[test]
    fn rates_and_stall_across_a_move() {
        // Source: ticks every 50 ms, 1000 rounds each (20000 rounds/s);
        // then a 300 ms gap; the destination continues.
        let src: String = (0..5)
            .map(|i| tick(10_000_000 + i * 50_000, 1000 * i) + "\n")
            .collect();
        let dst: String = (0..3)
            .map(|i| tick(10_500_000 + i * 50_000, 6000 + 1000 * i) + "\n")
            .collect();
        let (s, d) = (parse_log(&src), parse_log(&dst));
        let t = across(&s, &d, 0);
        assert_eq!(t.len(), 8);
        let r = round_rates(&t);
        assert_eq!(r.len(), 7);
        assert!((r[0].1 - 20_000.0).abs() < 1e-6);
        // The move: 2000 rounds over 300 ms.
        assert_eq!(r[4].0, 10_500_000);
        assert!((r[4].1 - 2000.0 / 0.3).abs() < 1e-6);
        assert_eq!(last_tick_us(&s), Some(10_200_000));
        assert_eq!(max_stall_ms(&s, &d, 10_200_000), Some(300.0));
        // Only gaps ending after `from` count.
        assert_eq!(max_stall_ms(&s, &d, 10_600_000), Some(50.0));
        assert_eq!(
            max_stall_ms(&SerialLog::default(), &SerialLog::default(), 0),
            None
        );
    }

    #[test]
    fn backwards_pairs_are_skipped() {
        let t = [
            Tick {
                host_us: 10,
                vcpu: 0,
                round: 5,
            },
            Tick {
                host_us: 10,
                vcpu: 0,
                round: 6,
            },
            Tick {
                host_us: 20,
                vcpu: 0,
                round: 4,
            },
            Tick {
                host_us: 30,
                vcpu: 0,
                round: 8,
            },
        ];
        assert_eq!(round_rates(&t), vec![(30, 4e5)]);
    }
}
