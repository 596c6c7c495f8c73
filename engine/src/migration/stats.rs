//! Migration statistics: JSON for machines, a table for people.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// The distribution as `(latency_us, fraction of samples at or below)`
    /// points, for CDF plots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<(u64, f64)>,
}

impl LatencySummary {
    /// Summarizes a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
            cdf: h
                .iter_quantiles(2)
                .map(|v| {
                    (
                        v.value_iterated_to(),
                        (v.quantile_iterated_to() * 1e4).round() / 1e4,
                    )
                })
                .collect(),
        }
    }
}

/// A microsecond histogram from 1 µs to 100 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant histogram bounds are valid")
}

/// Demand-fault latency, overall and per vCPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultLatency {
    /// All demand faults.
    pub overall: LatencySummary,
    /// By vCPU index ("other" for non-vCPU threads).
    pub per_vcpu: BTreeMap<String, LatencySummary>,
}

/// Time vCPUs spent blocked on demand faults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Blocktime {
    /// Sum over vCPUs, ms.
    pub total_ms: f64,
    /// Per vCPU, ms.
    pub per_vcpu_ms: BTreeMap<String, f64>,
}

/// What one migration cost, as measured by the destination.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationStats {
    /// `postcopy`.
    pub mode: String,
    /// Guest RAM.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Source pause until destination vCPUs run.
    pub downtime_us: u64,
    /// Part of the downtime spent between `Ready` and `Commit` (the
    /// switch-over's extra round trip; recoveries before `Commit` included).
    #[serde(default)]
    pub commit_wait_us: u64,
    /// From the start of the move on the source (before it connects)
    /// until every page is present on the destination.
    pub total_ms: f64,
    /// Guest pages.
    pub pages_total: u64,
    /// Pages sent in answer to demand faults.
    pub pages_demand: u64,
    /// Non-zero pages pushed by the background stream.
    pub pages_pushed: u64,
    /// Pages the source reported as zero (no data sent).
    pub pages_zero: u64,
    /// Pages loaded before the vCPUs ran from a page source in the same
    /// process, not over the link (a lazy restore's replay list).
    #[serde(default)]
    pub pages_preloaded: u64,
    /// Faults resolved by pages the background push had already delivered.
    pub prefetch_hits: u64,
    /// Faults on zero pages, resolved locally.
    pub zero_faults: u64,
    /// The scheduling the destination's fault thread got (`realtime`,
    /// `slice` or `normal`; absent without a fault thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_priority: Option<crate::sched::Applied>,
    /// Pages demand requests asked for after the faulting page
    /// (fault-around, see `migration::fault_around`; into RAM filled in
    /// place, the other missing pages of the faulting unit).
    #[serde(default)]
    pub fault_around_pages: u64,
    /// What the destination's guest RAM is made of (`shmem`, or
    /// `huge-pages` for 2 MiB pages).
    #[serde(default)]
    pub backing: crate::memory::Backing,
    /// The destination's guest RAM was made and allocated before the move
    /// (`ferry-dest --prealloc`, see `migration::ram_ahead`).
    #[serde(default)]
    pub ram_allocated_ahead: bool,
    /// With `ferry-dest --prealloc hello`: how long allocating the RAM the
    /// `Hello` asked for took, before the answer (the source's VM still
    /// ran); absent when nothing was allocated then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_allocated_on_hello_ms: Option<f64>,
    /// The peer timeout the move ran with on the destination: the shorter
    /// of the two sides' `--peer-timeout` (0 in statistics from before it
    /// was recorded).
    #[serde(default)]
    pub peer_timeout_ms: u64,
    /// Post-copy wrote pages in place and mapped them a unit at a time
    /// with `UFFDIO_CONTINUE` (huge pages, or RAM allocated ahead), rather
    /// than `UFFDIO_COPY` from a buffer (see `migration::uffd_ram`).
    #[serde(default)]
    pub filled_in_place: bool,
    /// How the destination installed the push (`pipelined`, or `inline`
    /// when it may use one CPU only); absent without a push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_install: Option<PushInstall>,
    /// Bytes on both connections, both directions, headers included.
    pub bytes_wire: u64,
    /// Bytes of the state blob.
    pub bytes_state: u64,
    /// Uncompressed bytes of data pages / bytes of page data on the wire.
    pub compression_ratio: f64,
    /// Demand-fault latency (fault read → page installed).
    pub fault_latency_us: FaultLatency,
    /// vCPU time blocked on demand faults.
    pub blocktime: Blocktime,
    /// Links lost after `Commit` and recovered.
    #[serde(default)]
    pub recoveries: u32,
    /// Time spent waiting for those recoveries, ms.
    #[serde(default)]
    pub recovery_ms: f64,
    /// Pre-copy modes: whether the downtime target was met.
    #[serde(default)]
    pub converged: Option<bool>,
    /// Pre-copy modes: the rounds (0 is the full pass).
    #[serde(default)]
    pub precopy_rounds: Vec<ferry_protocol::RoundStats>,
    /// The source's own counters.
    pub source: serde_json::Value,
    /// Migrated local disks (`--migrate-disk`): their blocks and how they
    /// arrived (absent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStats>,
    /// Pages faulted over the network, in order (not in the JSON: a lazy
    /// restore records them as the snapshot's replay list).
    #[serde(skip)]
    pub demand_order: Vec<u64>,
}

/// How the blocks of migrated local disks arrived.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskStats {
    /// Blocks (4 KiB) of every migrated disk.
    pub blocks: u64,
    /// Blocks that came on the control connection (push, pre-copy rounds;
    /// zero runs included).
    pub blocks_pushed: u64,
    /// Blocks asked for over the fault connection because a guest disk
    /// request needed them before they arrived.
    pub demand_requests: u64,
    /// Blocks fetched on demand that were installed by the answer.
    pub demand_blocks: u64,
    /// Time guest disk requests waited for blocks, summed, ms.
    pub wait_ms: f64,
    /// Blocks that arrived after the guest had written them here, and
    /// were dropped (the guest's write wins).
    pub dropped_after_guest_write: u64,
}

/// Recoveries of a session after `Commit`, as one side counted them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// How many.
    pub count: u32,
    /// Time from losing the link until the move continued, summed, ms.
    pub ms: f64,
}

impl Recovery {
    /// Counts one recovery that began at `since`, and publishes the count.
    pub fn record(
        &mut self,
        since: std::time::Instant,
        progress: Option<&super::progress::Progress>,
    ) {
        self.count += 1;
        self.ms += since.elapsed().as_secs_f64() * 1e3;
        if let Some(p) = progress {
            p.recoveries
                .store(u64::from(self.count), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl MigrationStats {
    /// A table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rows: Vec<(&str, String)> = vec![
            ("mode", self.mode.clone()),
            (
                "guest",
                format!("{} MiB, {} vCPUs", self.mem_size >> 20, self.vcpus),
            ),
            (
                "downtime",
                format!("{:.3} ms", self.downtime_us as f64 / 1e3),
            ),
            (
                "of which Ready → Commit",
                format!("{:.3} ms", self.commit_wait_us as f64 / 1e3),
            ),
            ("total time", format!("{:.1} ms", self.total_ms)),
            (
                "pages demand / pushed / zero",
                format!(
                    "{} / {} / {}",
                    self.pages_demand, self.pages_pushed, self.pages_zero
                ),
            ),
            (
                "prefetch hits / zero faults",
                format!("{} / {}", self.prefetch_hits, self.zero_faults),
            ),
            (
                "bytes on the wire",
                format!("{:.1} MiB", mib(self.bytes_wire)),
            ),
            ("state blob", format!("{} bytes", self.bytes_state)),
            (
                "recoveries",
                format!("{} ({:.0} ms)", self.recoveries, self.recovery_ms),
            ),
            (
                "compression ratio",
                format!("{:.2}", self.compression_ratio),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<30} {v}");
        }
        let _ = writeln!(
            s,
            "  {:<30} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
            "fault latency (µs)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut lat = vec![("all".to_string(), &self.fault_latency_us.overall)];
        lat.extend(
            self.fault_latency_us
                .per_vcpu
                .iter()
                .map(|(k, v)| (format!("vCPU {k}"), v)),
        );
        for (name, l) in lat {
            let _ = writeln!(
                s,
                "    {:<28} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
                name, l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        let _ = writeln!(
            s,
            "  {:<30} {:.1} ms",
            "vCPU blocktime (sum)", self.blocktime.total_ms
        );
        s
    }
}

/// How the destination installed the background push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushInstall {
    /// Two threads: one reads frames, an installer thread maps them.
    Pipelined,
    /// The reading thread maps each frame itself (a destination limited
    /// to one CPU).
    Inline,
}
