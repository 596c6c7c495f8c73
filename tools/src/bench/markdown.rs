//! `results.md`: per matrix point, the median and spread (min–max) of the
//! headline numbers, QEMU's rows next to Ferry's, then the failures.

use std::fmt::Write;

use super::matrix::{size_arg, Mode};
use super::record::RunRecord;
use super::summary::{Spread, SummaryError};

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MarkdownError {
    /// A metric had a non-finite sample.
    #[error("column {column}: {source}")]
    Summary {
        /// The column.
        column: &'static str,
        /// Why.
        source: SummaryError,
    },
}

/// The columns: header, stats path, scale, decimals.
const COLUMNS: [(&str, &str, f64, usize); 7] = [
    ("downtime ms", "downtime_us", 1e-3, 2),
    ("total ms", "total_ms", 1.0, 0),
    ("guest stall ms", "guest_stall_ms", 1.0, 1),
    ("guest lost ms", "guest_lost_ms", 1.0, 1),
    ("wire MiB", "bytes_wire", 1.0 / (1u64 << 20) as f64, 1),
    ("fault p50 µs", "fault_latency_us/overall/p50", 1.0, 0),
    ("fault p99 µs", "fault_latency_us/overall/p99", 1.0, 0),
];

type Key = (usize, u64, u64, u64, u32, bool, String, String);

fn key(r: &RunRecord) -> Key {
    let mode_idx = r
        .mode
        .parse::<Mode>()
        .ok()
        .and_then(|m| Mode::ALL.iter().position(|x| *x == m))
        .unwrap_or(Mode::ALL.len());
    // Ferry before QEMU; rows of one point side by side.
    (
        mode_idx,
        r.mem_size,
        r.ws_size,
        r.dirty_rate,
        r.vcpus,
        r.pinned,
        r.peer.clone(),
        r.mode.clone(),
    )
}

/// Groups records by matrix point and peer, in table order.
pub fn groups(records: &[RunRecord]) -> Vec<Vec<&RunRecord>> {
    let mut sorted: Vec<&RunRecord> = records.iter().collect();
    sorted.sort_by_key(|r| key(r));
    let mut out: Vec<Vec<&RunRecord>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(g) if key(g[0]) == key(r) => g.push(r),
            _ => out.push(vec![r]),
        }
    }
    out
}

/// The Markdown table (and notes, and failures).
pub fn table(records: &[RunRecord], title: &str) -> Result<String, MarkdownError> {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    let mut header = "| mode | peer | mem | ws | dirty rate | vCPUs | ok |".to_string();
    let mut rule = "|---|---|---|---|---|---|---|".to_string();
    for (h, ..) in COLUMNS {
        let _ = write!(header, " {h} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for g in groups(records) {
        let r0 = g[0];
        let ok: Vec<&&RunRecord> = g.iter().filter(|r| r.ok()).collect();
        let rate = if r0.dirty_rate == 0 {
            "unlimited".to_string()
        } else {
            format!("{} pages/s", r0.dirty_rate)
        };
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {} | {} | {}/{} |",
            r0.mode,
            r0.peer_label(),
            size_arg(r0.mem_size),
            size_arg(r0.ws_size),
            rate,
            r0.vcpus,
            ok.len(),
            g.len()
        );
        for (column, path, scale, decimals) in COLUMNS {
            // Latency percentiles of runs without faults are not data.
            let has = |r: &RunRecord| {
                !path.starts_with("fault_latency_us/")
                    || r.num("fault_latency_us/overall/count").unwrap_or(0.0) > 0.0
            };
            let samples: Vec<f64> = ok
                .iter()
                .filter(|r| has(r))
                .filter_map(|r| r.num(path))
                .map(|v| v * scale)
                .collect();
            let cell = Spread::of(&samples)
                .map_err(|source| MarkdownError::Summary { column, source })?
                .map_or_else(|| "—".to_string(), |sp| sp.cell(decimals));
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nCells are the median over the successful runs, with (min–max) when they differ; \
         — means not measured. Guest stall is the longest gap between two guest TICK lines \
         across the move (host clock; it includes one 50 ms report interval) and is the \
         number to compare across peers. Guest lost is the work the guest lost across the \
         move, in ms at its steady rate: per vCPU, the rounds it would have done at the rate \
         of the ~1 s before its last source TICK (the pause), minus the rounds it did, from \
         the pause until a TICK interval runs at 90% of that rate again; summed over vCPUs \
         and divided by the summed rate. Both are computed by ferry-bench from the stamped \
         serial logs, the same way for Ferry and QEMU (`guest_lost_recovered` in \
         results.json is false where the guest never got back to 90% before the log ended: \
         then the loss is a lower bound)."
    );
    if records.iter().any(|r| r.peer == "qemu") {
        let _ = writeln!(
            s,
            "\nQEMU rows run the same guest ELF under `qemu-system-x86_64 -M microvm -cpu qemu64` \
             with **1 vCPU** (QEMU does not start this guest's APs, so only vCPU 0 would run the \
             workload). QEMU's downtime is QMP's `downtime` where it is sane (QEMU's post-copy \
             value is known to be unreliable; otherwise —); wire bytes are `ram.transferred`; \
             QEMU reports no fault latencies. As for Ferry, QEMU's guest stall counts only \
             the gaps that end on the destination; `guest_stall_source_ms` in results.json has \
             the longest gap on the QEMU source after `migrate` (pre-copy dirty logging can \
             stall the guest there)."
        );
    }
    let failed: Vec<&RunRecord> = records.iter().filter(|r| !r.ok()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed runs\n");
        for r in failed {
            let err = r.error.as_deref().unwrap_or_default().replace('\n', " ");
            let err: String = err.chars().take(300).collect();
            let _ = writeln!(s, "- `{}`: {err}", r.run_dir);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::{test_spec, Peer};

    fn rec(
        peer: Peer,
        mode: Mode,
        mem: u64,
        repeat: u32,
        downtime: u64,
        err: Option<&str>,
    ) -> RunRecord {
        let spec = test_spec(peer, mode, mem, repeat);
        let mut r = RunRecord::new(&spec, "loopback", &spec.label());
        r.set_stats(serde_json::json!({
            "downtime_us": downtime, "total_ms": 100.0, "guest_stall_ms": 60.0, "guest_lost_ms": 12.5,
            "bytes_wire": 64u64 << 20,
            "fault_latency_us": {"overall": {"count": if mode == Mode::Postcopy { 10 } else { 0 }, "p50": 50, "p99": 900}}
        }))
        .unwrap();
        r.error = err.map(String::from);
        r
    }

    #[test]
    fn table_has_medians_spreads_and_failures() {
        let recs = vec![
            rec(Peer::Qemu, Mode::Postcopy, 1 << 30, 0, 3000, None),
            rec(
                Peer::Ferry,
                Mode::Precopy,
                1 << 30,
                0,
                9000,
                Some("boom\nline"),
            ),
            rec(Peer::Ferry, Mode::Postcopy, 1 << 30, 0, 1000, None),
            rec(Peer::Ferry, Mode::Postcopy, 1 << 30, 1, 3000, None),
            rec(Peer::Ferry, Mode::Postcopy, 1 << 30, 2, 1500, None),
        ];
        let g = groups(&recs);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].len(), 3);
        assert_eq!(
            (g[0][0].peer.as_str(), g[1][0].peer.as_str()),
            ("ferry", "qemu")
        );
        let t = table(&recs, "t").unwrap();
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].contains(
                "| postcopy | ferry | 1G | 64M | unlimited | 1 | 3/3 | 1.50 (1.00–3.00) | 100 | 60.0 | 12.5 |"
            ),
            "{t}"
        );
        assert!(lines[2].contains("| qemu |"));
        assert!(
            lines[3].contains("| precopy | ferry |") && lines[3].contains("0/1 | — |"),
            "{t}"
        );
        assert!(t.contains("## Failed runs") && t.contains("boom line"));
        assert!(t.contains("**1 vCPU**"));
    }
}
