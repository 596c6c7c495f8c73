//! Guest serial logs with host timestamps (`<secs>.<micros> <text>`, as Ferry
//! writes them and as the QEMU peer's reader thread writes them): TICKs,
//! guest progress (rounds per second), the guest-visible stall and the
//! guest work lost across the move. ferry-bench derives every guest figure
//! of a run here, from the logs, the same way for Ferry and for QEMU.

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
/// the move), over the source log followed by the destination log.
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

/// The guest's steady rate is measured over this long before the pause.
pub const STEADY_US: u64 = 1_000_000;

/// True when a move may start, by the rule both peers' runs follow: `after`
/// has passed since `start`, and the guest has ticked (at least 3 TICK
/// lines) for the steady-rate window of [`lost_work`] (its working set is
/// written by its first TICK).
pub fn ready_to_move(
    log: &SerialLog,
    start: std::time::Instant,
    after: std::time::Duration,
) -> bool {
    let steady = log
        .ticks
        .first()
        .is_some_and(|t| now_us().saturating_sub(t.host_us) >= STEADY_US + 100_000);
    start.elapsed() >= after && log.ticks.len() >= 3 && steady
}

/// The guest is back once a TICK interval runs at this share of its steady
/// rate.
pub const RECOVERED: f64 = 0.9;

/// Guest work lost across a move (see [`lost_work`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LostWork {
    /// Lost rounds, in ms of steady-rate work.
    pub ms: f64,
    /// Every vCPU got back to [`RECOVERED`] of its rate (else the loss is
    /// counted up to its last TICK, a lower bound).
    pub recovered: bool,
    /// Host time (µs since the epoch) when the last vCPU was back (or its
    /// last TICK, when not `recovered`).
    pub back_us: u64,
}

/// The guest work lost across a move, summed over vCPUs.
///
/// For each vCPU that ticked on the source: the pause is its last source
/// TICK; its steady rate R is the rounds per second over the
/// [`STEADY_US`] before that TICK; it is back at the start of the first
/// TICK interval between two destination TICKs that runs at ≥
/// [`RECOVERED`] × R. Its lost
/// rounds are R × (back − pause) − (rounds done from the pause until
/// back). The result is Σ lost rounds / Σ R, in ms: the time the whole
/// guest would need at its steady rate to do the work it lost. vCPUs with
/// fewer than two source TICKs in the window, or none after the pause,
/// are left out; `None` when no vCPU is left.
pub fn lost_work(src: &SerialLog, dst: &SerialLog) -> Option<LostWork> {
    let mut vcpus: Vec<u32> = src.ticks.iter().map(|t| t.vcpu).collect();
    vcpus.sort_unstable();
    vcpus.dedup();
    let (mut lost, mut rate_sum, mut recovered, mut back_us) = (0.0, 0.0, true, 0);
    for v in vcpus {
        let ticks = across(src, dst, v);
        let n_src = src.ticks.iter().filter(|t| t.vcpu == v).count();
        let pause = ticks[n_src - 1];
        let Some(first) = ticks[..n_src]
            .iter()
            .find(|t| t.host_us + STEADY_US >= pause.host_us)
        else {
            continue;
        };
        if first.host_us >= pause.host_us || first.round >= pause.round || ticks.len() == n_src {
            continue;
        }
        let rate =
            (pause.round - first.round) as f64 * 1e6 / (pause.host_us - first.host_us) as f64;
        // Intervals that end on the destination and start there too: the one
        // from the last source TICK straddles the pause, and with the
        // rounds done before the pause in it, it could pass for "back" at
        // once (a loss of 0 was seen that way).
        let back = ticks[n_src..].windows(2).find(|w| {
            let dt = w[1].host_us.saturating_sub(w[0].host_us);
            dt > 0
                && (w[1].round.saturating_sub(w[0].round)) as f64 * 1e6 / dt as f64
                    >= RECOVERED * rate
        });
        let end = match back {
            Some(w) => w[0],
            None => {
                recovered = false;
                ticks[ticks.len() - 1]
            }
        };
        back_us = back_us.max(end.host_us);
        let expected = rate * end.host_us.saturating_sub(pause.host_us) as f64 / 1e6;
        lost += expected - end.round.saturating_sub(pause.round) as f64;
        rate_sum += rate;
    }
    (rate_sum > 0.0).then(|| LostWork {
        ms: lost / rate_sum * 1e3,
        recovered,
        back_us,
    })
}

/// Has the guest ticked `n` times on the destination (vCPU 0) and got back
/// to its steady rate (see [`lost_work`])? ferry-bench lets a moved guest
/// run until then (bounded), for the progress plot and the lost work.
pub fn settled(src_log: &Path, dst_log: &Path, n: usize) -> bool {
    let (src, dst) = (read_log(src_log), read_log(dst_log));
    dst.ticks.iter().filter(|t| t.vcpu == 0).count() >= n
        && lost_work(&src, &dst).is_some_and(|l| l.recovered)
}

/// How long a moved guest may take to settle (see [`settled`]).
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The guest figures of a run, as `results.json` keys: `guest_stall_ms`
/// (the longest TICK gap that ends on the destination: the first one spans
/// the move), `guest_bad` (BAD lines on either side), `guest_lost_ms` and
/// `guest_lost_recovered` (see [`lost_work`]).
pub fn guest_figures(
    src: &SerialLog,
    dst: &SerialLog,
) -> serde_json::Map<String, serde_json::Value> {
    let first_dst = dst.ticks.iter().map(|t| t.host_us).min().unwrap_or(0);
    let lost = lost_work(src, dst);
    let mut m = serde_json::Map::new();
    m.insert(
        "guest_stall_ms".into(),
        max_stall_ms(src, dst, first_dst).into(),
    );
    m.insert("guest_bad".into(), (src.bad.len() + dst.bad.len()).into());
    m.insert("guest_lost_ms".into(), lost.map(|l| l.ms).into());
    m.insert(
        "guest_lost_recovered".into(),
        lost.map(|l| l.recovered).into(),
    );
    m
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

    /// A log of vCPU `v` ticking every 50 ms from `from_us`: `rates` gives
    /// the rounds/s of each 50 ms interval; returns the log text and the
    /// last (time, round).
    fn ticking(v: u32, from_us: u64, round: u64, rates: &[f64]) -> (String, u64, u64) {
        let (mut t, mut r, mut out) = (from_us, round, String::new());
        out.push_str(&stamp(t, &format!("FERRY TICK {v} {r} 1 1 1\n")));
        for rate in rates {
            t += 50_000;
            r += (rate * 0.05).round() as u64;
            out.push_str(&stamp(t, &format!("FERRY TICK {v} {r} 1 1 1\n")));
        }
        (out, t, r)
    }

    #[test]
    fn lost_work_of_a_full_stop_and_of_a_slow_period() {
        // 20000 rounds/s for 2 s on the source.
        let (src, pause, r0) = ticking(0, 10_000_000, 0, &[20_000.0; 40]);
        let src = parse_log(&src);
        // A 500 ms full stop: the next tick comes 550 ms after the last
        // source tick, with one interval's work (done before the pause).
        let (dst, _, _) = ticking(0, pause + 550_000, r0 + 1000, &[20_000.0; 20]);
        let l = lost_work(&src, &parse_log(&dst)).unwrap();
        assert!((l.ms - 500.0).abs() < 1.0, "{l:?}");
        assert!(l.recovered);
        // Back at once, then 1 s at half the rate: 500 ms lost.
        let mut rates = vec![10_000.0; 20];
        rates.extend([20_000.0; 10]);
        let (dst, _, _) = ticking(0, pause, r0, &rates);
        let l = lost_work(&src, &parse_log(&dst)).unwrap();
        assert!((l.ms - 500.0).abs() < 1.0, "{l:?}");
        // Never back above 90%: counted to the end, flagged.
        let (dst, _, _) = ticking(0, pause + 100_000, r0 + 1000, &[17_000.0; 20]);
        let l = lost_work(&src, &parse_log(&dst)).unwrap();
        assert!(!l.recovered && (l.ms - 200.0).abs() < 1.0, "{l:?}");
        // Without destination ticks there is nothing to measure.
        assert_eq!(lost_work(&src, &SerialLog::default()), None);
        assert_eq!(lost_work(&SerialLog::default(), &src), None);
    }

    #[test]
    fn the_interval_across_the_pause_does_not_count_as_back() {
        // 20000 rounds/s on the source; the first destination TICK comes
        // 52 ms after the last source one with a whole interval's rounds
        // (done before the pause): that interval looks like 96% of the
        // rate. Then 500 ms at 10%, then full speed: ~450 ms lost, not 0.
        let (src, pause, r0) = ticking(0, 10_000_000, 0, &[20_000.0; 40]);
        let mut dst = stamp(
            pause + 52_000,
            &format!("FERRY TICK 0 {} 1 1 1\n", r0 + 1000),
        );
        let mut rates = vec![2_000.0; 10];
        rates.extend([20_000.0; 10]);
        let (rest, _, _) = ticking(0, pause + 52_000, r0 + 1000, &rates);
        dst.push_str(&rest);
        let l = lost_work(&parse_log(&src), &parse_log(&dst)).unwrap();
        assert!((l.ms - 452.0).abs() < 5.0, "{l:?}");
        assert!(l.recovered);
    }

    #[test]
    fn lost_work_sums_over_vcpus() {
        // vCPU 0 at 20000/s stops 500 ms; vCPU 1 at 10000/s loses nothing:
        // 10000 lost rounds / 30000 rounds/s = 333 ms.
        let (s0, p0, r0) = ticking(0, 10_000_000, 0, &[20_000.0; 30]);
        let (s1, p1, r1) = ticking(1, 10_010_000, 0, &[10_000.0; 30]);
        let (d0, _, _) = ticking(0, p0 + 550_000, r0 + 1000, &[20_000.0; 10]);
        let (d1, _, _) = ticking(1, p1, r1, &[10_000.0; 10]);
        let l = lost_work(&parse_log(&(s0 + &s1)), &parse_log(&(d0 + &d1))).unwrap();
        assert!((l.ms - 1000.0 / 3.0).abs() < 1.0, "{l:?}");
        let g = guest_figures(&parse_log(&s1), &parse_log(&d1));
        assert_eq!(g["guest_bad"], 0);
        assert_eq!(g["guest_stall_ms"], 50.0);
        assert!(g["guest_lost_ms"].as_f64().unwrap().abs() < 1e-6);
        assert_eq!(g["guest_lost_recovered"], true);
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
