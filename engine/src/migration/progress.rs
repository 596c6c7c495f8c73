//! Live progress of a migration, for progress bars and the API's `status`:
//! its stage, the current phase and how many of that phase's pages have
//! gone, and how many times it recovered from a lost link.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use super::cancel::CancelGate;

/// Where a migration is, as the API reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Nothing started yet.
    #[default]
    Idle,
    /// Pages move while the guest runs (pre-copy rounds), or the
    /// destination receives them.
    Precopy,
    /// The guest is paused and the switch-over (`State`, `Ready`,
    /// `Commit`) is under way.
    Switching,
    /// The destination runs the guest; pages still move.
    Postcopy,
    /// A link was lost after `Commit`: both sides wait and reconnect.
    Recovering,
    /// Every page arrived.
    Completed,
    /// It ended without completing (see `error`).
    Failed,
}

/// What the VM does on this side once the migration has settled it. Until
/// then the API reports the VM as `migrating`; from then on it reports this,
/// even while the migrating thread still writes its statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmHere {
    /// Its vCPUs run here (the destination took it, or the source rolled
    /// back to it).
    Running,
    /// Paused here, and free to resume (a source that was paused before).
    Paused,
    /// Paused here, and it must not run here: why.
    Held(String),
}

impl VmHere {
    /// The API's `run_state` for it.
    pub fn run_state(&self) -> &'static str {
        match self {
            VmHere::Running => "running",
            VmHere::Paused | VmHere::Held(_) => "paused",
        }
    }

    /// Why it must not run here, if it must not.
    pub fn held(&self) -> Option<&str> {
        match self {
            VmHere::Held(why) => Some(why),
            _ => None,
        }
    }
}

/// Shared between the migrating thread (writer) and a display (reader).
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<String>,
    /// Pages of the current phase sent so far.
    pub done: AtomicU64,
    total: AtomicU64,
    finished: AtomicBool,
    stage: Mutex<Stage>,
    error: Mutex<Option<String>>,
    here: Mutex<Option<VmHere>>,
    /// Links lost and recovered after `Commit`.
    pub recoveries: AtomicU64,
    /// Bytes sent to the destination so far, all phases.
    pub bytes: AtomicU64,
    /// Whether the move may still be cancelled, and whether it was.
    pub cancel: CancelGate,
    started: OnceLock<Instant>,
}

/// A consistent-enough reading of [`Progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressView {
    /// E.g. "pre-copy round 2" or "post-copy".
    pub phase: String,
    /// Pages sent in this phase.
    pub done: u64,
    /// Pages this phase will send.
    pub total: u64,
    /// The migration ended (either way).
    pub finished: bool,
}

impl Progress {
    /// Starts a phase of `total` pages.
    pub fn phase(&self, name: impl Into<String>, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = name.into();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Marks the end of the migration.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Enters `stage` (the first call starts the clock for the rate).
    pub fn stage(&self, stage: Stage) {
        self.started.get_or_init(Instant::now);
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = stage;
    }

    /// The current stage.
    pub fn current_stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the VM now does on this side.
    pub fn vm_here(&self, here: VmHere) {
        *self.here.lock().unwrap_or_else(|p| p.into_inner()) = Some(here);
    }

    /// What the VM does on this side, once the migration has settled it.
    pub fn current_vm_here(&self) -> Option<VmHere> {
        self.here.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks the migration failed, with why.
    pub fn fail(&self, why: impl Into<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
        self.stage(Stage::Failed);
    }

    /// What the API's `status` shows: stage, phase, pages done and left in
    /// it, its rate, recoveries and the error, if any.
    pub fn report(&self) -> serde_json::Value {
        let v = self.view();
        let secs = self
            .started
            .get()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        serde_json::json!({
            "stage": self.current_stage(),
            "phase": v.phase,
            "pages_done": v.done,
            "pages_left": v.total.saturating_sub(v.done),
            "pages_per_s": if secs > 0.0 { (v.done as f64 / secs).round() } else { 0.0 },
            "bytes_sent": self.bytes.load(Ordering::Relaxed),
            "bytes_per_s": if secs > 0.0 {
                (self.bytes.load(Ordering::Relaxed) as f64 / secs).round()
            } else {
                0.0
            },
            "recoveries": self.recoveries.load(Ordering::Relaxed),
            "error": *self.error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// Reads the current state.
    pub fn view(&self) -> ProgressView {
        ProgressView {
            phase: self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_reset_the_count() {
        let p = Progress::default();
        p.phase("pre-copy round 0", 100);
        p.done.fetch_add(40, Ordering::Relaxed);
        assert_eq!(p.view().done, 40);
        p.phase("post-copy", 7);
        let v = p.view();
        assert_eq!(
            (v.phase.as_str(), v.done, v.total, v.finished),
            ("post-copy", 0, 7, false)
        );
        p.finish();
        assert!(p.view().finished);
    }
}
