//! [`PageBitmap`]: one bit per guest page, the one bitmap type of Ferry.
//!
//! It records which pages were sent, received, found dirty, stored in a
//! snapshot or discarded. Bits live in atomic 64-bit words, so the
//! destination's installer and fault thread can set pages concurrently
//! while another thread tests them; single-threaded users pay only plain
//! loads and stores. On the wire and in snapshot files a bitmap is its words
//! in little-endian order (bit `p % 64` of word `p / 64` is page `p`).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page of a fixed number of pages. Bits past `pages` are
/// always clear.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl Clone for PageBitmap {
    fn clone(&self) -> Self {
        Self::from_words(self.pages, self.words())
    }
}

impl PartialEq for PageBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.pages == other.pages && self.words() == other.words()
    }
}

/// Mask of the valid bits of word `i` of a bitmap of `pages` pages.
fn valid_mask(pages: u64, i: usize) -> u64 {
    let valid = pages.saturating_sub(i as u64 * 64).min(64);
    if valid == 64 {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    }
}

impl PageBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// All set.
    pub fn full(pages: u64) -> Self {
        let b = Self::new(pages);
        b.set_range(0, pages);
        b
    }

    /// From words (missing words are clear, extra words and bits past
    /// `pages` are dropped).
    pub fn from_words(pages: u64, words: Vec<u64>) -> Self {
        let n = pages.div_ceil(64) as usize;
        Self {
            words: (0..n)
                .map(|i| AtomicU64::new(words.get(i).copied().unwrap_or(0) & valid_mask(pages, i)))
                .collect(),
            pages,
        }
    }

    /// From little-endian bytes as stored on the wire or in a file. `None`
    /// when `bytes` is not exactly the size that `pages` pages need, rounded
    /// up to whole bytes or to whole words.
    pub fn from_le_bytes(pages: u64, bytes: &[u8]) -> Option<Self> {
        let len = bytes.len() as u64;
        if len != pages.div_ceil(8) && len != pages.div_ceil(64) * 8 {
            return None;
        }
        let words = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Some(Self::from_words(pages, words))
    }

    /// The words as little-endian bytes (whole words).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Word `i` (0 past the end).
    pub fn word(&self, i: usize) -> u64 {
        self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// True when `pfn` is set (false past the end).
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.pages && self.word((pfn / 64) as usize) & (1 << (pfn % 64)) != 0
    }

    /// Sets `pfn`; returns whether it was clear before (false past the end).
    pub fn set(&self, pfn: u64) -> bool {
        if pfn >= self.pages {
            return false;
        }
        let bit = 1 << (pfn % 64);
        self.words[(pfn / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears `pfn`; returns whether it was set before.
    pub fn clear(&self, pfn: u64) -> bool {
        if pfn >= self.pages {
            return false;
        }
        let bit = 1 << (pfn % 64);
        self.words[(pfn / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Sets `count` pages from `pfn` (clipped to the end); returns how many
    /// were clear before.
    pub fn set_range(&self, pfn: u64, count: u64) -> u64 {
        let end = pfn.saturating_add(count).min(self.pages);
        let mut p = pfn;
        let mut newly = 0;
        while p < end {
            let i = (p / 64) as usize;
            let lo = p % 64;
            let n = (64 - lo).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let old = self.words[i].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((!old & mask).count_ones());
            p += n;
        }
        newly
    }

    /// Clears every page.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// True when every page is set.
    pub fn is_full(&self) -> bool {
        self.count() == self.pages
    }

    /// Sets every page that is set in `other` (same size; extra ignored).
    pub fn or_with(&self, other: &PageBitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_or(b.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    /// Clears every page that is set in `other`.
    pub fn clear_those_in(&self, other: &PageBitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_and(!b.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    /// True when every page is set here or in `other`.
    pub fn covers_with(&self, other: &PageBitmap) -> bool {
        (0..self.words.len()).all(|i| {
            let mask = valid_mask(self.pages, i);
            (self.word(i) | other.word(i)) & mask == mask
        })
    }

    /// The first set page at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_where(from, self.pages, false)
    }

    /// The first clear page at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.next_where(from, self.pages, true)
    }

    /// The first set page in `from..end`. It reads only the words that
    /// range covers, where [`PageBitmap::next_set`] reads on to the end
    /// of the bitmap when nothing is set (a 2G guest's bitmap is 8,192
    /// words: the push asked that once per frame).
    pub fn next_set_before(&self, from: u64, end: u64) -> Option<u64> {
        self.next_where(from, end.min(self.pages), false)
    }

    /// The first clear page in `from..end`, reading only the words that
    /// range covers.
    pub fn next_clear_before(&self, from: u64, end: u64) -> Option<u64> {
        self.next_where(from, end.min(self.pages), true)
    }

    /// The first page in `from..end` (`end` at most `pages`) that is clear
    /// when `clear`, else set.
    fn next_where(&self, from: u64, end: u64, clear: bool) -> Option<u64> {
        if from >= end {
            return None;
        }
        let flip = if clear { u64::MAX } else { 0 };
        let last = ((end - 1) / 64) as usize;
        let mut i = (from / 64) as usize;
        let mut word = ((self.word(i) ^ flip) & valid_mask(self.pages, i)) & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let p = i as u64 * 64 + u64::from(word.trailing_zeros());
                return (p < end).then_some(p);
            }
            i += 1;
            if i > last {
                return None;
            }
            word = (self.word(i) ^ flip) & valid_mask(self.pages, i);
        }
    }

    /// Set pages in ascending order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let p = self.next_set(at)?;
            at = p + 1;
            Some(p)
        })
    }

    /// Runs of set pages from `from` on, as `(first, count)`, each at most
    /// `max_run` long (a longer run is split).
    pub fn runs(&self, from: u64, max_run: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let max_run = max_run.max(1);
        let mut at = from;
        std::iter::from_fn(move || {
            let first = self.next_set(at)?;
            let limit = first.saturating_add(max_run).min(self.pages);
            let end = self.next_clear(first).map_or(limit, |c| c.min(limit));
            at = end;
            Some((first, end - first))
        })
    }

    /// Number of set pages below `pfn`.
    pub fn rank(&self, pfn: u64) -> u64 {
        let pfn = pfn.min(self.pages);
        let full = (pfn / 64) as usize;
        let whole: u64 = self.words[..full]
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        let part = self.word(full) & !(!0u64 << (pfn % 64));
        whole + u64::from(part.count_ones())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear_count() {
        let b = PageBitmap::new(130);
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
        assert_eq!(b.set_range(60, 10), 10);
        assert_eq!(b.set_range(125, 100), 4);
        assert_eq!(b.count(), 15);
        assert!(!b.set(130), "past the end");
        assert!(b.clear(129) && !b.clear(129));
        assert_eq!(b.count(), 14);
        assert!(!b.is_full());
        assert!(PageBitmap::full(130).is_full());
    }

    #[test]
    fn set_range_counts_only_new_pages_across_words() {
        let b = PageBitmap::new(300);
        b.set(70);
        b.set(200);
        assert_eq!(b.set_range(0, 300), 298);
        assert!(b.is_full());
        assert_eq!(b.set_range(0, 300), 0);
    }

    #[test]
    fn iteration_runs_and_rank() {
        let b = PageBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set(p);
        }
        assert_eq!(
            b.iter_set().collect::<Vec<_>>(),
            vec![0, 1, 2, 63, 64, 65, 130, 199]
        );
        assert_eq!(
            b.runs(0, 100).collect::<Vec<_>>(),
            vec![(0, 3), (63, 3), (130, 1), (199, 1)]
        );
        assert_eq!(
            b.runs(1, 2).collect::<Vec<_>>(),
            vec![(1, 2), (63, 2), (65, 1), (130, 1), (199, 1)]
        );
        assert_eq!(b.next_clear(63), Some(66));
        assert_eq!(b.next_set(200), None);
        assert_eq!(b.rank(0), 0);
        assert_eq!(b.rank(64), 4);
        assert_eq!(b.rank(200), 8);
        assert_eq!(PageBitmap::full(130).next_clear(0), None);
    }

    #[test]
    fn bounded_searches_stop_at_their_end() {
        let b = PageBitmap::new(1000);
        b.set(5);
        b.set(700);
        assert_eq!(b.next_set_before(0, 5), None);
        assert_eq!(b.next_set_before(0, 6), Some(5));
        assert_eq!(b.next_set_before(6, 700), None, "700 is past the end");
        assert_eq!(b.next_set_before(6, 701), Some(700));
        assert_eq!(b.next_set_before(6, 5000), Some(700), "end clipped");
        assert_eq!(b.next_set_before(701, 5000), None);
        assert_eq!(b.next_set_before(9, 9), None, "empty range");
        assert_eq!(b.next_set_before(2000, 3000), None);
        b.set_range(64, 128);
        assert_eq!(b.next_clear_before(64, 192), None);
        assert_eq!(b.next_clear_before(64, 193), Some(192));
        assert_eq!(b.next_clear_before(100, 120), None);
        // Agrees with the unbounded search wherever that answer is in range.
        for from in [0, 5, 63, 64, 191, 192, 699, 700, 999] {
            for end in [from, from + 1, from + 64, from + 600, 1000] {
                let want = b.next_set(from).filter(|&p| p < end);
                assert_eq!(b.next_set_before(from, end), want, "{from}..{end}");
                let want = b.next_clear(from).filter(|&p| p < end);
                assert_eq!(b.next_clear_before(from, end), want, "{from}..{end}");
            }
        }
    }

    #[test]
    fn bytes_round_trip_and_tail_bits_are_dropped() {
        let b = PageBitmap::new(70);
        b.set(3);
        b.set(69);
        let bytes = b.to_le_bytes();
        assert_eq!(bytes.len(), 16);
        assert_eq!(PageBitmap::from_le_bytes(70, &bytes).unwrap(), b);
        assert_eq!(PageBitmap::from_le_bytes(70, &bytes[..9]).unwrap(), b);
        assert!(PageBitmap::from_le_bytes(70, &bytes[..8]).is_none());
        let noisy = PageBitmap::from_words(70, vec![u64::MAX, u64::MAX]);
        assert_eq!(noisy.count(), 70, "bits past the end are clear");
    }

    #[test]
    fn bulk_operations() {
        let a = PageBitmap::new(100);
        let b = PageBitmap::new(100);
        a.set_range(0, 50);
        b.set_range(40, 60);
        assert!(a.covers_with(&b));
        b.clear(99);
        assert!(!a.covers_with(&b));
        let c = a.clone();
        c.or_with(&b);
        assert_eq!(c.count(), 99);
        c.clear_those_in(&a);
        assert_eq!(c.iter_set().next(), Some(50));
        a.clear_all();
        assert_eq!(a.count(), 0);
    }
}
