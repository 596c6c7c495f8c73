//! Cancelling a migration out before its switch-over commits (the
//! convention of QEMU's `migrate_cancel`).
//!
//! Until the source writes `Commit`, the VM is the source's: a cancelled
//! move rolls back like any other failure before that point (the source
//! resumes its VM and tells the destination, with `Abort`, to discard its
//! copy, which never ran). From `Commit` on it cannot be undone, since the
//! destination may run the VM. [`CancelGate`] makes the two exclusive:
//! whichever of [`CancelGate::cancel`] and [`CancelGate::commit`] comes
//! first wins, and the loser is told so.

use std::sync::atomic::{AtomicU8, Ordering};

/// No move that could be cancelled (none started, or one that was
/// committed from its start, such as a recovery).
const IDLE: u8 = 0;
/// A move before its commit point.
const OPEN: u8 = 1;
/// Cancelled before its commit point: it must roll back.
const CANCELLED: u8 = 2;
/// Past its commit point.
const COMMITTED: u8 = 3;

/// Whether a migration out may still be cancelled, and whether it was.
#[derive(Debug)]
pub struct CancelGate(AtomicU8);

impl Default for CancelGate {
    fn default() -> Self {
        Self(AtomicU8::new(IDLE))
    }
}

/// Why a cancel request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    /// Nothing is moving out before its switch-over.
    #[error("there is no migration out to cancel")]
    Nothing,
    /// `Commit` was written (or is being written): the destination may run
    /// the VM, so this side must not.
    #[error("too late to cancel: the switch-over has committed and the destination runs the VM")]
    Committed,
}

impl CancelGate {
    /// A move that may be cancelled until it commits starts.
    pub fn open(&self) {
        self.0.store(OPEN, Ordering::SeqCst);
    }

    /// Asks the move to stop before it commits. `Ok` means it will roll
    /// back (asking twice is fine).
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        match self
            .0
            .compare_exchange(OPEN, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(CANCELLED) => Ok(()),
            Err(COMMITTED) => Err(CancelRefused::Committed),
            Err(_) => Err(CancelRefused::Nothing),
        }
    }

    /// Whether a cancel was accepted.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// The commit point: true when the move may commit, after which every
    /// cancel is refused; false when a cancel came first.
    pub fn commit(&self) -> bool {
        let mut now = self.0.load(Ordering::SeqCst);
        loop {
            if now == CANCELLED {
                return false;
            }
            match self
                .0
                .compare_exchange(now, COMMITTED, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(changed) => now = changed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_commit_exclude_each_other() {
        let g = CancelGate::default();
        assert_eq!(g.cancel(), Err(CancelRefused::Nothing));
        g.open();
        assert!(!g.is_cancelled());
        assert_eq!(g.cancel(), Ok(()));
        assert_eq!(g.cancel(), Ok(()), "a second cancel is no error");
        assert!(g.is_cancelled());
        assert!(!g.commit(), "a cancelled move must not commit");
        assert!(g.is_cancelled(), "the failed commit keeps the cancel");

        g.open();
        assert!(g.commit());
        assert_eq!(g.cancel(), Err(CancelRefused::Committed));
        assert!(!g.is_cancelled());

        // A move committed from the start (a recovery) refuses cancels.
        let g = CancelGate::default();
        assert!(g.commit());
        assert_eq!(g.cancel(), Err(CancelRefused::Committed));
    }

    #[test]
    fn exactly_one_of_a_racing_cancel_and_commit_wins() {
        for _ in 0..200 {
            let g = std::sync::Arc::new(CancelGate::default());
            g.open();
            let g2 = g.clone();
            let t = std::thread::spawn(move || g2.cancel());
            let committed = g.commit();
            let cancelled = t.join().unwrap();
            assert_ne!(committed, cancelled.is_ok(), "{committed} {cancelled:?}");
        }
    }
}
