//! Live progress of a migration, for progress bars: what phase it is in and
//! how many of that phase's pages have gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Shared between the migrating thread (writer) and a display (reader).
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<String>,
    /// Pages of the current phase sent so far.
    pub done: AtomicU64,
    total: AtomicU64,
    finished: AtomicBool,
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
