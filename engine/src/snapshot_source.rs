//! A snapshot file as a page-server [`PageSource`], for lazy restore.
//!
//! A snapshot stores only its non-zero pages, in page order, after a bitmap
//! with one bit per page (see `snapshot`). Stored page `pfn` therefore lives
//! at `data_at + rank(pfn) * 4096`, where `rank(pfn)` is the number of set
//! bits below `pfn`. [`SnapshotPages`] keeps the [`PageBitmap`] plus the
//! count of set bits before each word, so a rank is one table look-up and
//! one `count_ones`; pages are read with `pread`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferry_page_server::source::{check_read, PageSource};
use ferry_protocol::PageBitmap;

use crate::layout::PAGE_SIZE;

/// Guest memory served out of a snapshot file: stored pages are read from
/// the file, every other page reads as zero.
#[derive(Debug, Clone)]
pub struct SnapshotPages {
    file: Arc<File>,
    /// Set for the pages stored in the file.
    stored: Arc<PageBitmap>,
    /// `before[w]`: stored pages below page `64 * w`.
    before: Vec<u64>,
    data_at: u64,
}

impl SnapshotPages {
    /// A source over the pages of `stored`, those set being stored in page
    /// order from byte `data_at` of `file`.
    pub fn new(file: Arc<File>, stored: PageBitmap, data_at: u64) -> Self {
        let words = stored.pages().div_ceil(64) as usize;
        let mut before = Vec::with_capacity(words);
        let mut n = 0u64;
        for w in 0..words {
            before.push(n);
            n += u64::from(stored.word(w).count_ones());
        }
        Self {
            file,
            stored: Arc::new(stored),
            before,
            data_at,
        }
    }

    /// Pages stored in the file.
    pub fn stored(&self) -> u64 {
        self.rank(self.stored.pages())
    }

    /// True when page `pfn` is stored in the file.
    pub fn is_stored(&self, pfn: u64) -> bool {
        self.stored.get(pfn)
    }

    /// Stored pages below `pfn` (`pfn <= pages`): the file index of page
    /// `pfn` when it is stored. One table look-up and one `count_ones`.
    pub fn rank(&self, pfn: u64) -> u64 {
        let pfn = pfn.min(self.stored.pages());
        let w = (pfn / 64) as usize;
        let word = self.stored.word(w) & !(!0u64 << (pfn % 64));
        match self.before.get(w) {
            Some(b) => b + u64::from(word.count_ones()),
            None => self
                .before
                .last()
                .map_or(0, |b| b + u64::from(self.stored.word(w - 1).count_ones())),
        }
    }

    /// Length of the run at `pfn` of pages that are all stored or all not,
    /// at most `max`.
    fn run(&self, pfn: u64, max: u64) -> u64 {
        let limit = pfn.saturating_add(max);
        let end = if self.is_stored(pfn) {
            self.stored.next_clear_before(pfn, limit)
        } else {
            self.stored.next_set_before(pfn, limit)
        };
        end.map_or(max, |e| e - pfn)
    }
}

impl PageSource for SnapshotPages {
    fn pages(&self) -> u64 {
        self.stored.pages()
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        let count = check_read(self.stored.pages(), pfn, buf.len())?;
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
        self.stored.next_set(pfn)
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
        let src = SnapshotPages::new(
            file,
            PageBitmap::from_le_bytes(pages, &bitmap).unwrap(),
            8192,
        );
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
        let src = SnapshotPages::new(file, PageBitmap::new(128), 4096);
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
