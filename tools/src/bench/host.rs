//! What the host did during a run that the run itself does not show: CPU
//! time its own hypervisor took (steal) and memory it handed back to that
//! hypervisor (free page reporting, where the kernel exposes a counter).
//! Both explain outliers that no change to Ferry would: on this host a
//! destination whose fresh pages were just reported back writes them at a
//! tenth of the usual rate.

use serde_json::{json, Map, Value};

/// The counter of memory reported back to the hypervisor, where it exists.
const REPORTED_KIB: &str = "/sys/module/page_reporting/parameters/reported_kib";

/// A reading of the host counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCounters {
    /// Steal time of all CPUs, ms.
    pub steal_ms: Option<f64>,
    /// Memory reported back to the hypervisor so far, KiB.
    pub reported_kib: Option<u64>,
}

/// The steal time of all CPUs in `/proc/stat` text, in clock ticks (the
/// eighth value of the `cpu` line).
pub fn steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

impl HostCounters {
    /// Reads the counters now (each absent where the host has none).
    pub fn read() -> Self {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&t| t > 0)
            .unwrap_or(100) as f64;
        let steal_ms = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| steal_ticks(&s))
            .map(|t| t as f64 * 1000.0 / hz);
        let reported_kib = std::fs::read_to_string(REPORTED_KIB)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Self {
            steal_ms,
            reported_kib,
        }
    }

    /// What changed since `before`, as statistics keys: `host_steal_ms`
    /// and `host_reported_mib`.
    pub fn since(&self, before: &HostCounters) -> Map<String, Value> {
        let mut m = Map::new();
        if let (Some(a), Some(b)) = (before.steal_ms, self.steal_ms) {
            m.insert("host_steal_ms".into(), json!((b - a).max(0.0)));
        }
        if let (Some(a), Some(b)) = (before.reported_kib, self.reported_kib) {
            m.insert(
                "host_reported_mib".into(),
                json!(b.saturating_sub(a) / 1024),
            );
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  4400914 1462 1231318 2350102 6790 0 39408 34951 2182628 1361\n\
                    cpu0 2297936 848 639872 1056550 2125 0 19704 17641 1195545 818\n";
        assert_eq!(steal_ticks(stat), Some(34951));
        assert_eq!(steal_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(steal_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn differences_become_statistics() {
        let a = HostCounters {
            steal_ms: Some(1000.0),
            reported_kib: Some(4096),
        };
        let b = HostCounters {
            steal_ms: Some(1250.0),
            reported_kib: Some(4096 + 3 * 1024),
        };
        let m = b.since(&a);
        assert_eq!(m["host_steal_ms"], json!(250.0));
        assert_eq!(m["host_reported_mib"], json!(3));
        let none = HostCounters {
            steal_ms: None,
            reported_kib: None,
        };
        assert!(b.since(&none).is_empty());
    }
}
