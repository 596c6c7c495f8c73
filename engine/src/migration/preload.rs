//! Loading pages into a destination's guest RAM from a page source in the
//! same process, before the vCPUs run: a lazy restore's replay list, read
//! from the snapshot file and installed with `UFFDIO_COPY` on two threads.
//!
//! Sending those pages over the restore's socketpair as a pre-copy pass
//! copied each one four times (read, socket write, socket read, install) on
//! one thread, at about 0.6 GB/s; here each is read once and installed once,
//! and the two halves go in parallel. The source half of the restore is
//! told which pages these are ([`super::SourceOptions::preloaded`]) and
//! never sends them.
//!
//! RAM in 2 MiB huge pages is mapped a whole huge page at a time, so its
//! set must name whole huge pages ([`whole_huge_pages`]); each is read and
//! mapped with one `UFFDIO_COPY`.

use std::fmt;
use std::sync::Arc;

use ferry_page_server::source::PageSource;
use ferry_protocol::PageBitmap;

use super::error::DestError;
use super::uffd_ram::UffdRam;
use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_PAGES;

/// Pages per read and install (4 KiB RAM; huge-page RAM: one huge page).
const RUN_PAGES: u64 = 64;

/// Loader threads. Two cores on the hosts Ferry was measured on; more would
/// only contend for the same page-cache and memory-cgroup locks.
const THREADS: usize = 2;

/// What to load, and from where.
#[derive(Clone)]
pub struct Preload {
    /// The pages to load.
    pub set: Arc<PageBitmap>,
    /// Where their contents are.
    pub from: Arc<dyn PageSource>,
}

impl fmt::Debug for Preload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preload")
            .field("pages", &self.set.count())
            .finish_non_exhaustive()
    }
}

/// `set` widened to the whole huge pages it touches: what a preload into
/// huge-page RAM loads.
pub fn whole_huge_pages(set: &PageBitmap) -> PageBitmap {
    let wide = PageBitmap::new(set.pages());
    for (first, n) in set.runs(0, u64::MAX) {
        let from = first - first % HUGE_PAGE_PAGES;
        let to = (first + n)
            .div_ceil(HUGE_PAGE_PAGES)
            .saturating_mul(HUGE_PAGE_PAGES)
            .min(set.pages());
        wide.set_range(from, to - from);
    }
    wide
}

/// Loads `p` into `ram`; returns how many pages were installed (pages
/// already present are skipped). Into huge-page RAM, `p`'s set must be
/// whole huge pages (see [`whole_huge_pages`]).
pub(super) fn load(p: &Preload, ram: &UffdRam) -> Result<u64, DestError> {
    if p.set.pages() != ram.pages() || p.from.pages() != ram.pages() {
        return Err(DestError::Refused(format!(
            "preload of {} pages from a source of {} into guest RAM of {}",
            p.set.pages(),
            p.from.pages(),
            ram.pages()
        )));
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|i| s.spawn(move || load_share(p, ram, i)))
            .collect();
        let mut installed = 0;
        for w in workers {
            installed += w
                .join()
                .map_err(|_| DestError::Refused("a preload thread panicked".into()))??;
        }
        Ok(installed)
    })
}

/// Loads every `THREADS`-th run of `p`'s set, starting with run `share`.
fn load_share(p: &Preload, ram: &UffdRam, share: usize) -> Result<u64, DestError> {
    let run = if ram.is_huge() {
        HUGE_PAGE_PAGES
    } else {
        RUN_PAGES
    };
    let mut buf = vec![0u8; run as usize * PAGE_SIZE];
    let mut installed = 0;
    for (first, n) in p.set.runs(0, run).skip(share).step_by(THREADS) {
        if ram.is_huge() && (first % run != 0 || n != run) {
            return Err(DestError::Refused(format!(
                "preloading huge-page RAM takes whole huge pages, not pages {first}+{n}"
            )));
        }
        let data = &mut buf[..n as usize * PAGE_SIZE];
        p.from.read(first, data).map_err(|e| {
            DestError::Refused(format!("reading pages {first}+{n} to preload: {e}"))
        })?;
        installed += ram.install(first, data)?;
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_widens_to_the_huge_pages_it_touches() {
        let set = PageBitmap::new(4 * HUGE_PAGE_PAGES);
        set.set(3);
        set.set_range(HUGE_PAGE_PAGES * 2 - 1, 2);
        let wide = whole_huge_pages(&set);
        let runs: Vec<_> = wide.runs(0, u64::MAX).collect();
        assert_eq!(runs, vec![(0, 3 * HUGE_PAGE_PAGES)]);
        // Nothing set, nothing widened; the last huge page ends at the end.
        assert_eq!(whole_huge_pages(&PageBitmap::new(1024)).count(), 0);
        let last = PageBitmap::new(2 * HUGE_PAGE_PAGES);
        last.set(2 * HUGE_PAGE_PAGES - 1);
        let runs: Vec<_> = whole_huge_pages(&last).runs(0, u64::MAX).collect();
        assert_eq!(runs, vec![(HUGE_PAGE_PAGES, HUGE_PAGE_PAGES)]);
    }
}
