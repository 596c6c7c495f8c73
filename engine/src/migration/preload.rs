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

use std::fmt;
use std::sync::Arc;

use ferry_page_server::source::PageSource;
use ferry_protocol::PageBitmap;

use super::error::DestError;
use super::uffd_ram::UffdRam;
use crate::layout::PAGE_SIZE;

/// Pages per read and install.
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

/// Loads `p` into `ram`; returns how many pages were installed (pages
/// already present are skipped).
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
    let mut buf = vec![0u8; RUN_PAGES as usize * PAGE_SIZE];
    let mut installed = 0;
    for (first, n) in p.set.runs(0, RUN_PAGES).skip(share).step_by(THREADS) {
        let data = &mut buf[..n as usize * PAGE_SIZE];
        p.from.read(first, data).map_err(|e| {
            DestError::Refused(format!("reading pages {first}+{n} to preload: {e}"))
        })?;
        installed += ram.install(first, data)?;
    }
    Ok(installed)
}
