//! The post-copy goals table of `results.md`: for each post-copy point, Ferry
//! next to QEMU and next to the wire's own limit, all from one run.
//!
//! - total time: Ferry's median over QEMU's median, and Ferry's worst run
//!   over QEMU's worst run;
//! - Ferry's median total over the wire's limit: the non-zero bytes the move
//!   had to carry (`(pages_total − pages_zero) × 4 KiB`, the median run's)
//!   divided by the bulk TCP rate measured in the same run ([`super::wire`]),
//!   once at the wire's limit (the fastest copy of any kind: the goal's
//!   column) and once at the best RAM-to-RAM rate (what a copy of that much
//!   memory costs with nothing else running);
//! - guest work lost: Ferry's median over QEMU's median;
//! - fault tail: p99 over p50 of Ferry's demand faults.

use std::fmt::Write;

use super::matrix::{size_arg, Mode};
use super::record::RunRecord;
use super::summary::Spread;
use super::wire::WireFigure;
use ferry_engine::memory::Backing;

const PAGE: f64 = 4096.0;

fn samples(rs: &[&RunRecord], f: impl Fn(&RunRecord) -> Option<f64>) -> Vec<f64> {
    rs.iter().filter(|r| r.ok()).filter_map(|r| f(r)).collect()
}

fn spread(v: &[f64]) -> Option<Spread> {
    Spread::of(v).ok().flatten()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

fn cell(s: Option<Spread>, decimals: usize) -> String {
    s.map_or_else(|| "—".into(), |s| s.cell(decimals))
}

/// Non-zero bytes a run had to move.
fn nonzero_bytes(r: &RunRecord) -> Option<f64> {
    Some((r.num("pages_total")? - r.num("pages_zero")?).max(0.0) * PAGE)
}

/// The goals section (empty when there is no post-copy run).
pub fn section(records: &[RunRecord], wire: Option<&WireFigure>) -> String {
    let post: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.mode == Mode::Postcopy.as_str() && r.vcpus == 1 && r.dirty_rate == 0)
        .collect();
    let mut points: Vec<(u64, u64, bool)> = post
        .iter()
        .filter(|r| r.peer == "ferry")
        .map(|r| (r.mem_size, r.ws_size, r.pinned))
        .collect();
    points.sort_unstable();
    points.dedup();
    if points.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(s, "\n## Post-copy goals (1 vCPU, unlimited dirty rate)\n");
    match wire {
        Some(w) => {
            let rates = |v: &[f64]| {
                v.iter()
                    .map(|p| format!("{:.2}", p / 1e9))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let memory = match w.backing {
                Some(Backing::Shmem) => "between shared memory in 4 KiB pages, written beforehand",
                Some(Backing::HugePages) => "between 2 MiB huge pages, written beforehand",
                None => "between private heap buffers",
            };
            let congestion = w.congestion.as_deref().map_or_else(
                || "the system's congestion control".to_string(),
                |c| format!("congestion control {c}, as Ferry's source"),
            );
            let _ = write!(
                s,
                "Wire: bulk TCP from the source's side to the destination's, copies of 1 GiB \
                 in this run ({congestion}, {memory}): the limit is the fastest copy, \
                 **{:.2} GB/s**. Cached (the first 1 MiB of each side again and again): {}",
                w.bytes_per_s / 1e9,
                rates(&w.probes),
            );
            match w.ram_bytes_per_s {
                Some(r) => {
                    let _ = writeln!(
                        s,
                        "; RAM to RAM (each byte of 1 GiB once): {}, best **{:.2} GB/s**.\n",
                        rates(&w.ram_probes),
                        r / 1e9,
                    );
                }
                None => {
                    let _ = writeln!(s, "; RAM to RAM not measured.\n");
                }
            }
        }
        None => {
            let _ = writeln!(s, "Wire: not measured in this run.\n");
        }
    }
    let _ = writeln!(
        s,
        "| mem | ws | pinned | Ferry total ms | QEMU total ms | median ratio (goal ≤ 0.8) | \
         worst ratio (goal ≤ 1.0) | wire limit ms | Ferry ÷ wire (goal ≤ 1.3) | \
         Ferry ÷ RAM-to-RAM wire | Ferry lost ms | QEMU lost ms | lost ratio (goal ≤ 0.5) | fault p50 µs | fault p99 µs | \
         p99 ÷ p50 (goal ≤ 10) |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (mem, ws, pinned) in points {
        let of = |peer: &str| -> Vec<&RunRecord> {
            post.iter()
                .copied()
                .filter(|r| {
                    r.peer == peer && r.mem_size == mem && r.ws_size == ws && r.pinned == pinned
                })
                .collect()
        };
        let (ferry, qemu) = (of("ferry"), of("qemu"));
        let ft = spread(&samples(&ferry, |r| r.num("total_ms")));
        let qt = spread(&samples(&qemu, |r| r.num("total_ms")));
        let fl = spread(&samples(&ferry, |r| r.num("guest_lost_ms")));
        let ql = spread(&samples(&qemu, |r| r.num("guest_lost_ms")));
        let bytes = spread(&samples(&ferry, nonzero_bytes)).map(|b| b.median);
        let at = |rate: Option<f64>| Some(bytes? / rate? * 1e3);
        let wire_ms = at(wire.map(|w| w.bytes_per_s));
        let ram_wire_ms = at(wire.and_then(|w| w.ram_bytes_per_s));
        let has_faults =
            |r: &RunRecord| r.num("fault_latency_us/overall/count").unwrap_or(0.0) > 0.0;
        let p50 = spread(&samples(&ferry, |r| {
            has_faults(r)
                .then(|| r.num("fault_latency_us/overall/p50"))
                .flatten()
        }));
        let p99 = spread(&samples(&ferry, |r| {
            has_faults(r)
                .then(|| r.num("fault_latency_us/overall/p99"))
                .flatten()
        }));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            size_arg(mem),
            size_arg(ws),
            if pinned { "yes" } else { "no" },
            cell(ft, 0),
            cell(qt, 0),
            ratio(ft.map(|s| s.median), qt.map(|s| s.median)),
            ratio(ft.map(|s| s.max), qt.map(|s| s.max)),
            wire_ms.map_or_else(|| "—".into(), |v| format!("{v:.0}")),
            ratio(ft.map(|s| s.median), wire_ms),
            ratio(ft.map(|s| s.median), ram_wire_ms),
            cell(fl, 0),
            cell(ql, 0),
            ratio(fl.map(|s| s.median), ql.map(|s| s.median)),
            cell(p50, 0),
            cell(p99, 0),
            ratio(p99.map(|s| s.median), p50.map(|s| s.median)),
        );
    }
    let _ = writeln!(
        s,
        "\nRatios are of medians, except the worst ratio (Ferry's slowest run over QEMU's \
         slowest). The wire limit is the median Ferry run's non-zero bytes \
         ((pages_total − pages_zero) × 4 KiB) at the wire's limit; the RAM-to-RAM ratio \
         takes the best RAM-to-RAM rate instead. Pinned rows ran the \
         source on CPU 0 and the destination on CPU 1 (QEMU's too)."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::{test_spec, Peer};

    fn rec(peer: Peer, repeat: u32, total: f64, lost: f64) -> RunRecord {
        let spec = test_spec(peer, Mode::Postcopy, 2 << 30, repeat);
        let mut r = RunRecord::new(&spec, "loopback", &spec.label());
        r.set_stats(serde_json::json!({
            "total_ms": total, "guest_lost_ms": lost,
            "pages_total": 524288u64, "pages_zero": 262144u64,
            "fault_latency_us": {"overall": {"count": 10, "p50": 50, "p99": 400}}
        }))
        .unwrap();
        r
    }

    #[test]
    fn ratios_against_qemu_and_the_wire() {
        let recs = vec![
            rec(Peer::Ferry, 0, 800.0, 100.0),
            rec(Peer::Ferry, 1, 900.0, 300.0),
            rec(Peer::Ferry, 2, 1000.0, 200.0),
            rec(Peer::Qemu, 0, 1000.0, 400.0),
            rec(Peer::Qemu, 1, 1250.0, 400.0),
        ];
        let wire = WireFigure {
            bytes_per_s: (1u64 << 30) as f64,
            probes: vec![(1u64 << 30) as f64; 3],
            ram_bytes_per_s: Some((1u64 << 29) as f64),
            ram_probes: vec![(1u64 << 29) as f64; 3],
            pinned: false,
            congestion: None,
            backing: None,
        };
        let s = section(&recs, Some(&wire));
        let row = s.lines().find(|l| l.starts_with("| 2G | 64M |")).unwrap();
        // Medians 900 vs 1125 → 0.80; worst 1000 vs 1250 → 0.80; 1 GiB of
        // non-zero pages at 1 GiB/s → 1000 ms, 900 / 1000 → 0.90 (at the
        // RAM-to-RAM 0.5 GiB/s: 2000 ms, 0.45); lost 200 vs 400 → 0.50;
        // p99/p50 = 8.
        assert_eq!(
            row,
            "| 2G | 64M | no | 900 (800–1000) | 1125 (1000–1250) | 0.80 | 0.80 | 1000 | 0.90 | \
             0.45 | 200 (100–300) | 400 | 0.50 | 50 | 400 | 8.00 |"
        );
        let mut old = wire.clone();
        old.ram_bytes_per_s = None;
        let s = section(&recs, Some(&old));
        assert!(s.contains("RAM to RAM not measured"), "{s}");
        let row = s.lines().find(|l| l.starts_with("| 2G | 64M |")).unwrap();
        assert!(row.contains("| 1000 | 0.90 | — | 200"), "{row}");
        assert!(section(&recs[3..], None).is_empty());
        assert!(section(&recs, None).contains("not measured"));
    }
}
