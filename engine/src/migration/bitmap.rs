//! A fixed-size bitmap of pages that several threads set concurrently.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per guest page.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// True when `pfn` is set (false past the end).
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.pages
            && self
                .words
                .get((pfn / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (pfn % 64)) != 0)
    }

    /// Sets `pfn`; returns whether it was clear before.
    pub fn set(&self, pfn: u64) -> bool {
        if pfn >= self.pages {
            return false;
        }
        match self.words.get((pfn / 64) as usize) {
            Some(w) => {
                let bit = 1 << (pfn % 64);
                w.fetch_or(bit, Ordering::AcqRel) & bit == 0
            }
            None => false,
        }
    }

    /// Clears `pfn`.
    pub fn clear(&self, pfn: u64) {
        if let Some(w) = self.words.get((pfn / 64) as usize) {
            w.fetch_and(!(1 << (pfn % 64)), Ordering::AcqRel);
        }
    }

    /// A copy of the words.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Sets `count` pages from `pfn`; returns how many were clear before.
    pub fn set_range(&self, pfn: u64, count: u64) -> u64 {
        (pfn..pfn.saturating_add(count).min(self.pages))
            .filter(|&p| self.set(p))
            .count() as u64
    }

    /// True when every page is set here or in `other`.
    pub fn covers_with(&self, other: &PageBitmap) -> bool {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .all(|(i, (a, b))| {
                let both = a.load(Ordering::Acquire) | b.load(Ordering::Acquire);
                let valid = (self.pages - i as u64 * 64).min(64);
                let mask = if valid == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
                both & mask == mask
            })
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let b = PageBitmap::new(130);
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
        assert_eq!(b.set_range(60, 10), 10);
        assert_eq!(b.set_range(125, 100), 4);
        assert_eq!(b.count(), 15);
        assert!(!b.set(130));
        let other = PageBitmap::new(130);
        assert!(!b.covers_with(&other));
        other.set_range(0, 130);
        assert!(b.covers_with(&other));
    }
}
