//! Scheduling hints for the threads on a migration's latency path.
//!
//! On a busy core a woken thread waits until the scheduler lets it preempt
//! whatever runs. Under EEVDF (Linux 6.6+), a thread that asks for a short
//! time slice gets an early deadline when it wakes, so it preempts the bulk
//! work (the push's receiver and installer) at once instead of waiting for
//! that work's slice to end. Measured here (1 vCPU, the destination pinned
//! to one core): the fault thread's wake-up delay was 0.2 ms on average and
//! up to 5 ms, which was the whole fault-latency tail.
//!
//! Measured on this machine (2G guest, 1G working set, the destination
//! pinned to one core; fault latency p50 / p99):
//!
//! | fault thread | p50 | p99 |
//! |---|---:|---:|
//! | normal | 135 µs | 2089 µs |
//! | 0.1 ms slice | 143 µs | 1828 µs |
//! | `SCHED_FIFO` 1 | 56 µs | 460 µs |
//!
//! So [`FaultPriority::Auto`] asks for real-time priority (which needs
//! `CAP_SYS_NICE`) and falls back to the short slice, which needs no
//! privilege: a normal (`SCHED_OTHER`) thread may choose its own slice
//! between 0.1 ms and 100 ms. A real-time fault thread must never spin; the
//! fault loop sleeps in `poll` whenever a pass finds nothing, and the
//! kernel's real-time throttling (5% of each second left to others) is the
//! backstop.

use std::io;
use std::time::Duration;

/// How the destination's fault thread asks to be scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultPriority {
    /// Real-time if permitted, else a short slice.
    #[default]
    Auto,
    /// `SCHED_FIFO` priority 1; an error if not permitted.
    Realtime,
    /// A 0.1 ms EEVDF slice (no privilege needed).
    Slice,
    /// No change.
    Normal,
}

/// What [`FaultPriority::apply`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Applied {
    /// `SCHED_FIFO` priority 1.
    Realtime,
    /// A short EEVDF slice.
    Slice,
    /// Nothing changed.
    Normal,
}

/// The short slice the fault thread asks for.
pub const FAULT_SLICE: Duration = Duration::from_micros(100);

impl FaultPriority {
    /// Applies the choice to the calling thread.
    pub fn apply(self) -> io::Result<Applied> {
        match self {
            FaultPriority::Normal => Ok(Applied::Normal),
            FaultPriority::Slice => set_own_slice(FAULT_SLICE).map(|()| Applied::Slice),
            FaultPriority::Realtime => set_own_fifo().map(|()| Applied::Realtime),
            FaultPriority::Auto => match set_own_fifo() {
                Ok(()) => Ok(Applied::Realtime),
                Err(_) => {
                    Ok(set_own_slice(FAULT_SLICE).map_or(Applied::Normal, |()| Applied::Slice))
                }
            },
        }
    }
}

impl std::fmt::Display for FaultPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Realtime => "realtime",
            Self::Slice => "slice",
            Self::Normal => "normal",
        })
    }
}

impl std::str::FromStr for FaultPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "realtime" => Ok(Self::Realtime),
            "slice" => Ok(Self::Slice),
            "normal" => Ok(Self::Normal),
            _ => Err(format!(
                "unknown fault priority {s:?} (expected auto, realtime, slice or normal)"
            )),
        }
    }
}

/// Makes the calling thread `SCHED_FIFO` at the lowest real-time priority.
pub fn set_own_fifo() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid `sched_param`; pid 0 is this thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the scheduler to give the calling thread time slices of `slice`
/// (clamped by the kernel to 0.1..100 ms), keeping its policy (normal) and
/// its nice value.
pub fn set_own_slice(slice: Duration) -> io::Result<()> {
    // SAFETY: getpriority only reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised `sched_attr` whose `size`
    // field says how many bytes the kernel may read; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_shorten_its_own_slice() {
        std::thread::spawn(|| {
            set_own_slice(Duration::from_micros(100)).expect("sched_setattr");
            // The kernel reports the slice back through sched_getattr.
            // SAFETY: `sched_attr` is plain integers; all zeroes is valid.
            let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
            // SAFETY: `attr` is writable and its size is passed.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    0,
                    &mut attr as *mut _,
                    std::mem::size_of::<libc::sched_attr>() as u32,
                    0,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(attr.sched_runtime, 100_000);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn fault_priorities_parse_and_normal_changes_nothing() {
        for (s, p) in [
            ("auto", FaultPriority::Auto),
            ("realtime", FaultPriority::Realtime),
            ("slice", FaultPriority::Slice),
            ("normal", FaultPriority::Normal),
        ] {
            assert_eq!(s.parse::<FaultPriority>().unwrap(), p);
        }
        let e = "fast".parse::<FaultPriority>().unwrap_err();
        assert!(e.contains("\"fast\""), "{e}");
        let got = std::thread::spawn(|| FaultPriority::Normal.apply().unwrap())
            .join()
            .unwrap();
        assert_eq!(got, Applied::Normal);
        // Auto always ends in some policy, never an error.
        let got = std::thread::spawn(|| FaultPriority::Auto.apply().unwrap())
            .join()
            .unwrap();
        assert_ne!(got, Applied::Normal);
    }
}
