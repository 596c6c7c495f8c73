//! Fault-around: how many pages a demand request asks for.
//!
//! A demand fault costs a network round trip, so when the guest walks
//! memory in order, asking for the pages after the faulting one saves the
//! faults that would follow. When it does not (random access), the extra
//! pages only delay the answer and take wire time from the push.
//!
//! The window adapts per vCPU, the way a file system's read-ahead does: a
//! fault on the page right after the previous request's window (or inside
//! it, when that request is still in flight) means the guest is walking on,
//! so the window doubles, up to [`MAX_WINDOW`]; any other fault halves it,
//! down to one page. A random guest so settles on single pages at once,
//! and a sequential one reaches the full window within a few faults.

use std::collections::HashMap;

/// Most pages one demand request asks for (128 KiB).
pub const MAX_WINDOW: u64 = 32;

/// One vCPU's read-ahead state.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Pages the next request asks for at most.
    window: u64,
    /// The first page after the last request.
    next: u64,
}

/// The windows of every faulting thread.
#[derive(Debug, Default)]
pub struct FaultAround {
    streams: HashMap<u32, Stream>,
}

impl FaultAround {
    /// The window for a fault on `pfn` by `vcpu`: how many pages, from
    /// `pfn` on, the request may ask for (the caller then stops at the
    /// first page it already has or has asked for).
    pub fn window(&mut self, vcpu: u32, pfn: u64) -> u64 {
        let s = self.streams.entry(vcpu).or_insert(Stream {
            window: 1,
            next: u64::MAX,
        });
        let last_window = s.window;
        let walking_on =
            s.next != u64::MAX && pfn >= s.next.saturating_sub(last_window) && pfn <= s.next;
        s.window = if walking_on {
            (s.window * 2).min(MAX_WINDOW)
        } else {
            (s.window / 2).max(1)
        };
        s.window
    }

    /// Notes that a request for `count` pages from `pfn` went out for
    /// `vcpu`.
    pub fn asked(&mut self, vcpu: u32, pfn: u64, count: u64) {
        if let Some(s) = self.streams.get_mut(&vcpu) {
            s.next = pfn.saturating_add(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs faults through the policy as the fault thread would (each
    /// request asks for the whole window) and returns the windows.
    fn walk(fa: &mut FaultAround, vcpu: u32, faults: &[u64]) -> Vec<u64> {
        faults
            .iter()
            .map(|&p| {
                let w = fa.window(vcpu, p);
                fa.asked(vcpu, p, w);
                w
            })
            .collect()
    }

    #[test]
    fn a_sequential_walk_grows_the_window_to_the_cap() {
        let mut fa = FaultAround::default();
        let mut at = 1000;
        let mut windows = Vec::new();
        for _ in 0..10 {
            let w = fa.window(0, at);
            fa.asked(0, at, w);
            windows.push(w);
            at += w; // the next fault is the first page not fetched
        }
        assert_eq!(windows, [1, 2, 4, 8, 16, 32, 32, 32, 32, 32]);
    }

    #[test]
    fn random_faults_keep_single_pages_and_a_jump_shrinks_the_window() {
        let mut fa = FaultAround::default();
        assert_eq!(walk(&mut fa, 0, &[10, 5000, 77, 123_456]), [1, 1, 1, 1]);
        // Walk up to 8, then jump: the window halves per jump.
        let mut fa = FaultAround::default();
        assert_eq!(walk(&mut fa, 0, &[0, 1, 3, 7]), [1, 2, 4, 8]);
        assert_eq!(walk(&mut fa, 0, &[900, 5, 60_000, 42]), [4, 2, 1, 1]);
    }

    #[test]
    fn a_fault_inside_the_window_in_flight_counts_as_walking_on() {
        // The vCPU faulted on 101 while the request for 100..104 was
        // still on its way: its page is in that window.
        let mut fa = FaultAround::default();
        walk(&mut fa, 0, &[98, 99]); // window 2 asked at 99 → next 101
        assert_eq!(fa.window(0, 100), 4);
    }

    #[test]
    fn each_vcpu_has_its_own_window() {
        let mut fa = FaultAround::default();
        // vCPU 0 walks in order while vCPU 1 jumps around in between.
        let mut windows0 = Vec::new();
        let mut at = 0;
        for i in 0..6u64 {
            let w = fa.window(0, at);
            fa.asked(0, at, w);
            windows0.push(w);
            at += w;
            let w1 = fa.window(1, 1_000_000 + i * 7919);
            fa.asked(1, 1_000_000 + i * 7919, w1);
            assert_eq!(w1, 1);
        }
        assert_eq!(windows0, [1, 2, 4, 8, 16, 32]);
    }
}
