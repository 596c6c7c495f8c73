//! Watches the workload guest's console lines: ticks, readiness and BAD
//! reports.
//!
//! The workload guest is the project's correctness oracle; the tools that
//! run it collect its verdict here and show it in the API's `status`. The
//! engine never reads guest output: [`watch`] attaches a [`GuestMonitor`] to
//! a console as an observer.
//!
//! Console lines are the guest's to write, so nothing in them may grow
//! the monitor: per-vCPU records are kept only for vCPU numbers below the
//! VM's vCPU count (lines naming others are ignored), and the counters
//! saturate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use ferry_engine::console::ConsoleLine;
use ferry_engine::ConsoleOutput;
use ferry_guest::{parse_line, GuestLine};
use serde::{Deserialize, Serialize};

/// How many BAD lines are kept verbatim.
const KEEP_BAD: usize = 16;

/// The last tick seen from one vCPU.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastTick {
    /// The guest's round counter.
    pub round: u64,
    /// The guest's TSC.
    pub tsc: u64,
    /// Timer interrupts counted by the guest.
    pub timer_irqs: u64,
    /// Host time of the line, µs since the Unix epoch.
    pub host_us: u64,
}

/// What the guest has told us so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestMonitor {
    /// vCPU numbers at or above this are not the VM's: their lines are
    /// ignored.
    #[serde(skip)]
    vcpus: u32,
    /// Host time the VM was created (µs since epoch).
    pub created_us: u64,
    /// Host time of the first TICK.
    pub first_tick_us: Option<u64>,
    /// TICK lines seen.
    pub ticks: u64,
    /// How many of the VM's vCPUs reported READY (each counts once, however
    /// often it says so).
    pub ready: u32,
    /// The vCPUs that reported READY (all below `vcpus`).
    #[serde(skip)]
    ready_vcpus: BTreeSet<u32>,
    /// BAD lines seen.
    pub bad: u64,
    /// The first BAD lines.
    pub bad_lines: Vec<String>,
    /// The latest tick per vCPU.
    pub last_tick: BTreeMap<u32, LastTick>,
    /// Longest host-time gap between consecutive ticks, per vCPU (µs).
    pub max_tick_gap_us: BTreeMap<u32, u64>,
    /// The disk workload's latest `FERRY DISK` report, if it runs.
    pub disk: Option<DiskReport>,
    /// The network workload's latest `FERRY NET` report, if it runs.
    pub net: Option<NetReport>,
}

/// The network workload's latest report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams echoed back intact.
    pub echoed: u64,
    /// Datagrams lost.
    pub lost: u64,
}

/// The disk workload's latest report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskReport {
    /// Requests completed.
    pub ops: u64,
    /// Errors the guest found (each also a BAD line).
    pub errors: u64,
    /// Malformed chains submitted (`disk_bad=1`).
    pub malformed: u64,
    /// Malformed chains answered with an error status.
    pub rejected: u64,
    /// True once the workload stopped (`DISKEND`).
    pub finished: bool,
}

impl GuestMonitor {
    /// A monitor for a VM with `vcpus` vCPUs (or at most that many),
    /// created at `created_us`.
    pub fn new(created_us: u64, vcpus: u32) -> Self {
        Self {
            vcpus,
            created_us,
            ..Default::default()
        }
    }

    /// Feeds one console line. A `TICK` or `READY` line for a vCPU the VM
    /// does not have is ignored.
    pub fn observe(&mut self, line: &ConsoleLine) {
        match parse_line(&line.text) {
            GuestLine::Tick { vcpu, .. } | GuestLine::Ready { vcpu } if vcpu >= self.vcpus => {}
            GuestLine::Tick {
                vcpu,
                round,
                tsc,
                timer_irqs,
                ..
            } => {
                self.ticks = self.ticks.saturating_add(1);
                self.first_tick_us.get_or_insert(line.host_us);
                if let Some(prev) = self.last_tick.get(&vcpu) {
                    let gap = line.host_us.saturating_sub(prev.host_us);
                    let max = self.max_tick_gap_us.entry(vcpu).or_default();
                    *max = (*max).max(gap);
                }
                self.last_tick.insert(
                    vcpu,
                    LastTick {
                        round,
                        tsc,
                        timer_irqs,
                        host_us: line.host_us,
                    },
                );
            }
            GuestLine::Ready { vcpu } => {
                self.ready_vcpus.insert(vcpu);
                self.ready = u32::try_from(self.ready_vcpus.len()).unwrap_or(u32::MAX);
            }
            GuestLine::Disk {
                ops,
                errors,
                malformed,
                rejected,
            } => {
                self.disk = Some(DiskReport {
                    ops,
                    errors,
                    malformed,
                    rejected,
                    finished: false,
                })
            }
            GuestLine::Net {
                sent, echoed, lost, ..
            } => self.net = Some(NetReport { sent, echoed, lost }),
            GuestLine::DiskEnd { ops, errors, .. } => {
                let d = self.disk.get_or_insert_with(DiskReport::default);
                d.ops = ops;
                d.errors = errors;
                d.finished = true;
            }
            GuestLine::Bad { .. } => {
                self.bad = self.bad.saturating_add(1);
                if self.bad_lines.len() < KEEP_BAD {
                    self.bad_lines.push(line.text.clone());
                }
            }
            _ => {}
        }
    }

    /// Longest gap between two consecutive ticks of any vCPU, in ms; None
    /// until some vCPU ticked twice (e.g. a guest moved before its first tick).
    pub fn max_stall_ms(&self) -> Option<f64> {
        self.max_tick_gap_us
            .values()
            .copied()
            .max()
            .map(|us| us as f64 / 1e3)
    }

    /// Microseconds from VM creation to the first tick.
    pub fn boot_to_first_tick_us(&self) -> Option<u64> {
        self.first_tick_us
            .map(|t| t.saturating_sub(self.created_us))
    }
}

/// Sends `out`'s lines through a new [`GuestMonitor`] too, for a VM of
/// `vcpus` vCPUs (a destination that does not know yet gives
/// [`ferry_engine::layout::MAX_VCPUS`]); returns the output to give the VM and
/// the monitor to read.
pub fn watch(out: ConsoleOutput, vcpus: u32) -> (ConsoleOutput, Arc<Mutex<GuestMonitor>>) {
    let monitor = Arc::new(Mutex::new(GuestMonitor::new(
        ferry_engine::console::now_us(),
        vcpus,
    )));
    let m = monitor.clone();
    let out = out.observed(Arc::new(move |line: &ConsoleLine| {
        m.lock().unwrap_or_else(|p| p.into_inner()).observe(line)
    }));
    (out, monitor)
}

/// The monitor's verdict as JSON, for the API's `status`.
pub fn status_json(monitor: &Mutex<GuestMonitor>) -> serde_json::Value {
    serde_json::to_value(&*monitor.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(host_us: u64, text: &str) -> ConsoleLine {
        ConsoleLine {
            host_us,
            text: text.into(),
        }
    }

    /// A guest that prints lines for vCPUs its VM does not have cannot
    /// grow the monitor (or the `status` answer): only the VM's own vCPUs
    /// get records, and the others' lines count for nothing.
    #[test]
    fn lines_for_vcpus_the_vm_lacks_are_ignored() {
        let mut m = GuestMonitor::new(0, 2);
        for (t, vcpu) in [(10, 0), (20, 1), (40, 0), (50, 1)] {
            m.observe(&line(t, &format!("FERRY TICK {vcpu} 1 2 3 4")));
        }
        m.observe(&line(60, "FERRY READY 1"));
        let small = status_json(&Mutex::new(m.clone())).to_string().len();
        for i in 0..10_000u32 {
            for host_us in [100, 200] {
                let vcpu = [2, 64, 1_000_000 + i, u32::MAX][i as usize % 4];
                m.observe(&line(host_us, &format!("FERRY TICK {vcpu} 0 0 0 0")));
                m.observe(&line(host_us, &format!("FERRY READY {vcpu}")));
            }
        }
        assert!(
            m.last_tick.keys().eq(&[0, 1]),
            "records for {} vCPUs",
            m.last_tick.len()
        );
        assert_eq!(m.max_tick_gap_us, BTreeMap::from([(0, 30), (1, 30)]));
        assert_eq!((m.ticks, m.ready), (4, 1));
        let json = status_json(&Mutex::new(m)).to_string();
        assert_eq!(json.len(), small, "{json}");
    }

    /// The counters stop at their maximum instead of overflowing.
    #[test]
    fn the_counters_saturate() {
        let mut m = GuestMonitor::new(0, 1);
        m.ticks = u64::MAX;
        m.bad = u64::MAX;
        m.observe(&line(2, "FERRY TICK 0 1 2 3 4"));
        m.observe(&line(3, "FERRY BAD vcpu=0 page=1 expected=2 got=3"));
        assert_eq!((m.ticks, m.bad), (u64::MAX, u64::MAX));
    }

    /// `ready` counts the VM's vCPUs that said READY, not READY lines: a
    /// guest that prints it twice for vCPU 0 (or for a vCPU the VM lacks)
    /// does not make a 2-vCPU VM look ready; vCPU 1's line does.
    #[test]
    fn ready_counts_each_vcpu_once() {
        let mut m = GuestMonitor::new(0, 2);
        m.observe(&line(1, "FERRY READY 0"));
        m.observe(&line(2, "FERRY READY 0"));
        m.observe(&line(3, "FERRY READY 2"));
        assert_eq!(m.ready, 1);
        assert_eq!(status_json(&Mutex::new(m.clone()))["ready"], 1);
        for t in 4..1000 {
            m.observe(&line(t, "FERRY READY 0"));
        }
        assert_eq!(m.ready, 1);
        m.observe(&line(1000, "FERRY READY 1"));
        m.observe(&line(1001, "FERRY READY 1"));
        assert_eq!(m.ready, 2);
        assert_eq!(status_json(&Mutex::new(m))["ready"], 2);
    }
}
