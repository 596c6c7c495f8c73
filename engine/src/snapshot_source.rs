//! A snapshot file as a page-server [`PageSource`], for lazy restore.
//!
//! A snapshot stores only its non-zero pages, in page order, after a bitmap
//! with one bit per page (see `snapshot`). Stored page `pfn` therefore lives
//! at `data_at + rank(pfn) * 4096`, where `rank(pfn)` is the number of set
//! bits below `pfn`. [`SnapshotPages`] keeps the bitmap as 64-bit words plus
//! the count of set bits before each word, so a rank is one table look-up
//! and one `count_ones`; pages are read with `pread`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferry_page_server::source::{check_read, PageSource};

use crate::layout::PAGE_SIZE;

/// Guest memory served out of a snapshot file: stored pages are read from
/// the file, every other page reads as zero.
#[derive(Debug, Clone)]
pub struct SnapshotPages {
    file: Arc<File>,
    /// Bit `pfn % 64` of word `pfn / 64` is set when page `pfn` is stored;
    /// no bit past the last page is set.
    words: Vec<u64>,
    /// `before[w]`: set bits in `words[..w]`.
    before: Vec<u64>,
    pages: u64,
    data_at: u64,
}

impl SnapshotPages {
    /// A source over `pages` pages whose stored pages are marked in `bitmap`
    /// (bit `i % 8` of byte `i / 8` for page `i`) and stored in page order
    /// from byte `data_at` of `file`. Bits past `pages` are ignored.
    pub fn new(file: Arc<File>, bitmap: &[u8], pages: u64, data_at: u64) -> Self {
        let mut words: Vec<u64> = bitmap
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= !(!0u64 << (pages % 64));
            }
        }
        let mut before = Vec::with_capacity(words.len());
        let mut n = 0u64;
        for w in &words {
            before.push(n);
            n += u64::from(w.count_ones());
        }
        Self {
            file,
            words,
            before,
            pages,
            data_at,
        }
    }

    /// Pages stored in the file.
    pub fn stored(&self) -> u64 {
        self.before.last().copied().unwrap_or(0)
            + self.words.last().map_or(0, |w| u64::from(w.count_ones()))
    }

    /// True when page `pfn` is stored in the file.
    pub fn is_stored(&self, pfn: u64) -> bool {
        self.words
            .get((pfn / 64) as usize)
            .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    /// Stored pages below `pfn` (`pfn <= pages`): the file index of page
    /// `pfn` when it is stored.
    pub fn rank(&self, pfn: u64) -> u64 {
        let w = (pfn / 64) as usize;
        match (self.before.get(w), self.words.get(w)) {
            (Some(b), Some(word)) => b + u64::from((word & !(!0u64 << (pfn % 64))).count_ones()),
            _ => self.stored(),
        }
    }

    /// Length of the run at `pfn` of pages that are all stored or all not,
    /// at most `max`.
    fn run(&self, pfn: u64, max: u64) -> u64 {
        let stored = self.is_stored(pfn);
        let mut n = 1;
        while n < max && self.is_stored(pfn + n) == stored {
            n += 1;
        }
        n
    }
}

impl PageSource for SnapshotPages {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        let count = check_read(self.pages, pfn, buf.len())?;
        // Stored pages are consecutive in the file, so each run of them is
        // one pread.
        let mut i = 0u64;
        while i < count {
            let p = pfn + i;
            let n = self.run(p, count - i);
            let part = &mut buf[(i as usize) * PAGE_SIZE..((i + n) as usize) * PAGE_SIZE];
            if self.is_stored(p) {
                let at = self.data_at + self.rank(p) * PAGE_SIZE as u64;
                self.file.read_exact_at(part, at)?;
            } else {
                part.fill(0);
            }
            i += n;
        }
        Ok(())
    }

    fn next_data(&self, pfn: u64) -> Option<u64> {
        if pfn >= self.pages {
            return None;
        }
        let mut w = (pfn / 64) as usize;
        let mut word = self.words.get(w)? & (!0u64 << (pfn % 64));
        while word == 0 {
            w += 1;
            word = *self.words.get(w)?;
        }
        Some(w as u64 * 64 + u64::from(word.trailing_zeros()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `stored` distinct pages after `data_at` bytes of padding,
    /// page `k` of the data filled with byte `k + 1`.
    fn file_with(name: &str, data_at: u64, stored: u64) -> (std::path::PathBuf, Arc<File>) {
        let path = std::env::temp_dir().join(format!(
            "ferry-snapshot-source-{name}-{}",
            std::process::id()
        ));
        let mut bytes = vec![0xeeu8; data_at as usize];
        for k in 0..stored {
            bytes.extend(std::iter::repeat_n(k as u8 + 1, PAGE_SIZE));
        }
        std::fs::write(&path, &bytes).unwrap();
        (path.clone(), Arc::new(File::open(&path).unwrap()))
    }

    fn bitmap_of(pages: u64, set: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; pages.div_ceil(8) as usize];
        for &p in set {
            b[(p / 8) as usize] |= 1 << (p % 8);
        }
        b
    }

    #[test]
    fn rank_next_data_and_reads_follow_the_bitmap() {
        // Set bits across word boundaries, a full word, and the last page.
        let pages = 300u64;
        let mut set: Vec<u64> = vec![0, 1, 5, 63, 64, 70, 199, 299];
        set.extend(128..192);
        set.sort_unstable();
        let (path, file) = file_with("rank", 8192, set.len() as u64);
        // A stray bit past the last page must not count.
        let mut bitmap = bitmap_of(304, &set);
        bitmap[37] |= 0x80;
        let src = SnapshotPages::new(file, &bitmap, pages, 8192);
        assert_eq!(src.stored(), set.len() as u64);

        for pfn in 0..=pages {
            let naive = set.iter().filter(|&&s| s < pfn).count() as u64;
            assert_eq!(src.rank(pfn), naive, "rank({pfn})");
            let next = set.iter().copied().find(|&s| s >= pfn);
            assert_eq!(src.next_data(pfn), next, "next_data({pfn})");
        }
        assert_eq!(src.next_data(pages + 100), None);

        // Every page alone, then one read over everything.
        let mut page = vec![0u8; PAGE_SIZE];
        for pfn in 0..pages {
            src.read(pfn, &mut page).unwrap();
            let want = match set.iter().position(|&s| s == pfn) {
                Some(k) => k as u8 + 1,
                None => 0,
            };
            assert!(page.iter().all(|&b| b == want), "page {pfn}");
        }
        let mut all = vec![0xffu8; pages as usize * PAGE_SIZE];
        src.read(0, &mut all).unwrap();
        for (pfn, p) in all.chunks_exact(PAGE_SIZE).enumerate() {
            let want = set
                .iter()
                .position(|&s| s == pfn as u64)
                .map_or(0, |k| k as u8 + 1);
            assert!(p.iter().all(|&b| b == want), "page {pfn} in a long read");
        }
        // Out of bounds and partial pages are refused.
        assert!(src.read(pages - 1, &mut vec![0; 2 * PAGE_SIZE]).is_err());
        assert!(src.read(0, &mut [0u8; 100]).is_err());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_empty_snapshot_is_all_zero() {
        let (path, file) = file_with("empty", 4096, 0);
        let src = SnapshotPages::new(file, &bitmap_of(128, &[]), 128, 4096);
        assert_eq!(
            (src.stored(), src.rank(128), src.next_data(0)),
            (0, 0, None)
        );
        let mut buf = vec![1u8; 4 * PAGE_SIZE];
        src.read(10, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(path);
    }
}
