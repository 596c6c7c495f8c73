//! The TLS cost section of `results.md` (`ferry-bench --tls`): every Ferry
//! point run plainly and over mutual TLS in the same benchmark, the runs
//! alternating.
//!
//! - push rate: the page server's bytes on the wire over its push time
//!   (`source/bytes_wire ÷ source/push_ms`, the destination's copy of the
//!   source's counters) for the lazy modes; the move's bytes over its total
//!   time for the others. Goal: TLS ÷ plain ≥ 0.8.
//! - demand-fault p50: TLS's median run minus plain's. Goal: ≤ +15 µs.

use std::fmt::Write;

use super::matrix::{size_arg, Peer};
use super::record::RunRecord;
use super::summary::Spread;

/// A point's identity: mode, memory, working set, rate, vCPUs, pinned.
type Key = (String, u64, u64, u64, u32, bool);

fn key(r: &RunRecord) -> Key {
    (
        r.mode.clone(),
        r.mem_size,
        r.ws_size,
        r.dirty_rate,
        r.vcpus,
        r.pinned,
    )
}

/// Bytes per second the move pushed (see the module comment).
pub fn push_rate(r: &RunRecord) -> Option<f64> {
    let (bytes, ms) = match (r.num("source/bytes_wire"), r.num("source/push_ms")) {
        (Some(b), Some(ms)) => (b, ms),
        _ => (r.num("bytes_wire")?, r.num("total_ms")?),
    };
    (ms > 0.0).then(|| bytes / ms * 1e3)
}

fn fault_p50(r: &RunRecord) -> Option<f64> {
    (r.num("fault_latency_us/overall/count")? > 0.0)
        .then(|| r.num("fault_latency_us/overall/p50"))
        .flatten()
}

fn spread(rs: &[&RunRecord], f: impl Fn(&RunRecord) -> Option<f64>) -> Option<Spread> {
    let v: Vec<f64> = rs.iter().filter(|r| r.ok()).filter_map(|r| f(r)).collect();
    Spread::of(&v).ok().flatten()
}

fn cell(s: Option<Spread>, scale: f64, decimals: usize) -> String {
    s.map_or_else(
        || "—".into(),
        |s| {
            Spread {
                median: s.median * scale,
                min: s.min * scale,
                max: s.max * scale,
                n: s.n,
            }
            .cell(decimals)
        },
    )
}

/// The section (empty without TLS runs).
pub fn section(records: &[RunRecord]) -> String {
    let tls = Peer::FerryTls.as_str();
    let plain = Peer::Ferry.as_str();
    let mut points: Vec<Key> = records.iter().filter(|r| r.peer == tls).map(key).collect();
    points.sort();
    points.dedup();
    if points.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## TLS cost (mutual TLS 1.3, AES-128-GCM, rustls/ring in userspace; same run)\n"
    );
    let _ = writeln!(
        s,
        "| mode | mem | ws | vCPUs | pinned | plain push MB/s | TLS push MB/s | \
         TLS ÷ plain (goal ≥ 0.8) | plain fault p50 µs | TLS fault p50 µs | \
         Δ p50 µs (goal ≤ +15) | plain total ms | TLS total ms |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for k in points {
        let of = |peer: &str| -> Vec<&RunRecord> {
            records
                .iter()
                .filter(|r| r.peer == peer && key(r) == k)
                .collect()
        };
        let (p, t) = (of(plain), of(tls));
        let (pr, tr) = (spread(&p, push_rate), spread(&t, push_rate));
        let (pf, tf) = (spread(&p, fault_p50), spread(&t, fault_p50));
        let (pt, tt) = (
            spread(&p, |r| r.num("total_ms")),
            spread(&t, |r| r.num("total_ms")),
        );
        let ratio = match (pr, tr) {
            (Some(a), Some(b)) if a.median > 0.0 => format!("{:.2}", b.median / a.median),
            _ => "—".into(),
        };
        let delta = match (pf, tf) {
            (Some(a), Some(b)) => format!("{:+.0}", b.median - a.median),
            _ => "—".into(),
        };
        let (mode, mem, ws, _rate, vcpus, pinned) = k;
        let _ = writeln!(
            s,
            "| {mode} | {} | {} | {vcpus} | {} | {} | {} | {ratio} | {} | {} | {delta} | {} | {} |",
            size_arg(mem),
            size_arg(ws),
            if pinned { "yes" } else { "no" },
            cell(pr, 1e-6, 0),
            cell(tr, 1e-6, 0),
            cell(pf, 1.0, 0),
            cell(tf, 1.0, 0),
            cell(pt, 1.0, 0),
            cell(tt, 1.0, 0),
        );
    }
    let _ = writeln!(
        s,
        "\nPush MB/s: the page server's bytes on the wire over its push time (post-copy, \
         hybrid), else the move's bytes over its total time. Medians (min–max) of the runs; \
         ratio and Δ of medians. TLS and plain runs alternate, so both see the same host."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::{test_spec, Mode};

    fn rec(peer: Peer, repeat: u32, bytes: f64, push_ms: f64, p50: u64) -> RunRecord {
        let spec = test_spec(peer, Mode::Postcopy, 2 << 30, repeat);
        let mut r = RunRecord::new(&spec, "loopback", &spec.label());
        r.set_stats(serde_json::json!({
            "total_ms": push_ms + 10.0,
            "source": {"bytes_wire": bytes, "push_ms": push_ms},
            "fault_latency_us": {"overall": {"count": 10, "p50": p50}}
        }))
        .unwrap();
        r
    }

    #[test]
    fn ratio_and_delta_of_medians() {
        let recs = vec![
            rec(Peer::Ferry, 0, 1e9, 1000.0, 50),
            rec(Peer::FerryTls, 0, 1e9, 1250.0, 60),
            rec(Peer::Ferry, 1, 1e9, 1000.0, 52),
            rec(Peer::FerryTls, 1, 1e9, 1250.0, 62),
        ];
        let s = section(&recs);
        let row = s.lines().find(|l| l.starts_with("| postcopy |")).unwrap();
        // 1000 MB/s plain, 800 MB/s TLS → 0.80; p50 51 → 61: +10.
        assert!(row.contains("| 1000 | 800 | 0.80 |"), "{row}");
        assert!(row.contains("| +10 |"), "{row}");
        assert!(section(&recs[..1]).is_empty());
    }
}
