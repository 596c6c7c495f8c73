//! [`Spare`]: one set of buffers made ahead of a move (when a process
//! starts), so that the move does not spend its first milliseconds, or its
//! pause, backing fresh memory. The source's page server keeps its
//! [`crate::server::Buffers`] this way, and the destination its fault
//! connection's buffers.

use std::sync::{Arc, Mutex};

/// Buffers whose memory is written once when they are made, so that it is
/// backed before a move needs it.
pub trait Backed {
    /// A new set, backed now.
    fn backed() -> Self;
}

/// A place for one set of `T` made ahead; clones share the one set.
#[derive(Debug)]
pub struct Spare<T>(Arc<Mutex<Option<T>>>);

impl<T> Clone for Spare<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Spare<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }
}

impl<T: Backed> Spare<T> {
    /// Makes the spare set now, unless there is one.
    pub fn fill(&self) {
        let mut spare = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spare.is_none() {
            *spare = Some(T::backed());
        }
    }

    /// The spare set, or a new one made now when there is none (a process
    /// that never filled it, or a second move).
    pub fn take(&self) -> T {
        let spare = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        spare.unwrap_or_else(T::backed)
    }

    /// True while a spare set waits.
    pub fn is_filled(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Made(Box<u64>);

    impl Backed for Made {
        fn backed() -> Self {
            Made(Box::new(7))
        }
    }

    #[test]
    fn a_spare_set_is_made_once_and_taken_once() {
        let spare = Spare::<Made>::default();
        assert!(!spare.is_filled());
        spare.fill();
        let shared = spare.clone();
        assert!(shared.is_filled(), "clones share the one set");
        let at: *const u64 = &*spare.0.lock().unwrap().as_ref().unwrap().0;
        spare.fill(); // already filled: the same set stays
        let first = shared.take();
        assert_eq!(&*first.0 as *const u64, at, "took the set made ahead");
        assert!(!spare.is_filled());
        // With none left, take makes a new one.
        assert_eq!(*spare.take().0, 7);
    }
}
