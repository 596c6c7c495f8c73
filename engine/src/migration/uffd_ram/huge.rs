//! Huge-page RAM behind userfaultfd: 2 MiB pages assembled from 4 KiB ones.
//!
//! The protocol moves 4 KiB pages, but a 2 MiB page of hugetlbfs can only
//! be mapped whole (`UFFDIO_COPY` of the full page; there is no
//! `UFFDIO_ZEROPAGE` for it). So pages are staged: each arriving page is
//! copied into its huge page's staging buffer and marked `present`, a zero
//! page is only marked `zero`, and the huge page is installed when the last
//! of its 512 pages is known. A huge page whose pages are all zero is not
//! installed until a vCPU touches it: it stays a hole, which reads as zero.
//!
//! A fault on a huge page not yet complete asks for all of its missing
//! pages at once (see `migration::fault`); that is fault-around to the
//! mapping unit.
//! Staging buffers are reused, so their memory stays backed.

use std::collections::HashMap;

use userfaultfd::Error as UffdLibError;

use super::{Local, UffdRam, UffdRamError};
use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_SIZE;

/// 4 KiB pages in one huge page: the unit mapped at once.
pub use crate::memory::HUGE_PAGE_PAGES as UNIT_PAGES;

const _: () = assert!(
    UNIT_PAGES.is_multiple_of(64),
    "a huge page is whole bitmap words"
);

/// Spare buffers kept for reuse at most (16 × 2 MiB).
const MAX_SPARE: usize = 16;

/// Huge pages being assembled.
#[derive(Default)]
pub(super) struct Staging {
    /// Huge page index → its buffer (the data pages that arrived so far).
    units: HashMap<u64, Vec<u8>>,
    /// Buffers of installed huge pages, for reuse.
    spare: Vec<Vec<u8>>,
    /// One huge page of zeros, for an all-zero page a vCPU touches.
    zeros: Vec<u8>,
}

impl UffdRam {
    /// Stages pages `pfn..pfn+count` (from `data`, or zero pages when
    /// `None`) and installs every huge page that became complete. Returns
    /// how many pages became known.
    pub(super) fn stage(
        &self,
        pfn: u64,
        count: u64,
        data: Option<&[u8]>,
    ) -> Result<u64, UffdRamError> {
        let end = pfn
            .checked_add(count)
            .filter(|&e| e <= self.pages())
            .ok_or(UffdRamError::OutOfRange { pfn, count })?;
        let mut st = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = 0;
        let mut p = pfn;
        while p < end {
            let unit = p / UNIT_PAGES;
            let unit_end = ((unit + 1) * UNIT_PAGES).min(end);
            let whole = p.is_multiple_of(UNIT_PAGES) && unit_end - p == UNIT_PAGES;
            // (Nothing here yet also means nothing staged and not mapped.)
            if let Some(d) = data.filter(|_| whole && self.unit_untouched(unit)) {
                // A whole huge page of which nothing is here yet (a push
                // frame or a demand answer): mapped straight from `data`,
                // with no staging copy.
                let from = ((p - pfn) as usize) * PAGE_SIZE;
                self.copy_unit(unit, &d[from..from + HUGE_PAGE_SIZE as usize])?;
                newly += self.present.set_range(p, UNIT_PAGES);
            } else if !self.mapped.get(unit) {
                for q in p..unit_end {
                    if self.present.get(q) || self.zero.get(q) {
                        continue;
                    }
                    newly += 1;
                    let Some(d) = data else {
                        self.zero.set(q);
                        continue;
                    };
                    let Staging { units, spare, .. } = &mut *st;
                    let buf = units.entry(unit).or_insert_with(|| {
                        spare
                            .pop()
                            .unwrap_or_else(|| vec![0; HUGE_PAGE_SIZE as usize])
                    });
                    let at = ((q % UNIT_PAGES) as usize) * PAGE_SIZE;
                    let from = ((q - pfn) as usize) * PAGE_SIZE;
                    buf[at..at + PAGE_SIZE].copy_from_slice(&d[from..from + PAGE_SIZE]);
                    self.present.set(q);
                }
                if self.unit_known(unit) {
                    self.install_unit(&mut st, unit, false)?;
                }
            }
            p = unit_end;
        }
        Ok(newly)
    }

    /// True when every page of huge page `unit` is present or zero.
    fn unit_known(&self, unit: u64) -> bool {
        let first = unit * UNIT_PAGES;
        match self.unit_words(unit) {
            Some(words) => words.into_iter().all(|i| self.known_word(i) == u64::MAX),
            None => (first..first + UNIT_PAGES).all(|q| self.present.get(q) || self.zero.get(q)),
        }
    }

    /// True when no page of huge page `unit` is present or zero yet.
    fn unit_untouched(&self, unit: u64) -> bool {
        match self.unit_words(unit) {
            Some(words) => words.into_iter().all(|i| self.known_word(i) == 0),
            None => self.missing_in_unit(unit * UNIT_PAGES).count() as u64 == UNIT_PAGES,
        }
    }

    /// The bitmap words of huge page `unit` when it lies whole in RAM (a
    /// huge page is a whole number of words), so that the questions above
    /// read 8 words each, not 1,024 bits (they are asked for every frame).
    fn unit_words(&self, unit: u64) -> Option<std::ops::Range<usize>> {
        let first = unit.checked_mul(UNIT_PAGES)?;
        let end = first.checked_add(UNIT_PAGES)?;
        let words = usize::try_from(first / 64).ok()?..usize::try_from(end / 64).ok()?;
        (end <= self.pages()).then_some(words)
    }

    /// Word `i` of the pages known: present or zero.
    fn known_word(&self, i: usize) -> u64 {
        self.present.word(i) | self.zero.word(i)
    }

    /// Installs complete huge page `unit`. One whose pages are all zero is
    /// left a hole unless `touched` (a vCPU waits on it).
    fn install_unit(&self, st: &mut Staging, unit: u64, touched: bool) -> Result<(), UffdRamError> {
        let first = unit * UNIT_PAGES;
        let buf = st.units.remove(&unit);
        if buf.is_none() && !touched {
            return Ok(());
        }
        let (src, zeros) = match buf {
            Some(mut b) => {
                // Zero pages never wrote their part of a reused buffer.
                for q in first..first + UNIT_PAGES {
                    if !self.present.get(q) {
                        let at = ((q - first) as usize) * PAGE_SIZE;
                        b[at..at + PAGE_SIZE].fill(0);
                    }
                }
                (b, false)
            }
            None => {
                if st.zeros.is_empty() {
                    st.zeros = vec![0; HUGE_PAGE_SIZE as usize];
                }
                (std::mem::take(&mut st.zeros), true)
            }
        };
        let outcome = self.copy_unit(unit, &src);
        if zeros {
            st.zeros = src;
        } else if st.spare.len() < MAX_SPARE {
            st.spare.push(src);
        }
        outcome
    }

    /// Maps huge page `unit` from `src` (exactly one huge page of data)
    /// with one `UFFDIO_COPY`, which wakes its waiters.
    fn copy_unit(&self, unit: u64, src: &[u8]) -> Result<(), UffdRamError> {
        let first = unit * UNIT_PAGES;
        let install_err = |why: String| UffdRamError::Install {
            pfn: first,
            count: UNIT_PAGES,
            why,
        };
        if src.len() as u64 != HUGE_PAGE_SIZE {
            return Err(install_err(format!("{} bytes for a huge page", src.len())));
        }
        let host = self.host_of(first, UNIT_PAGES)?;
        // SAFETY: `host` is the start of a whole huge page of registered
        // guest RAM that this VM keeps mapped (`host_of` checked that the
        // unit lies in one region, and regions are huge-page aligned); `src`
        // is a live slice of exactly one huge page (checked above).
        // UFFDIO_COPY only fills a missing page, atomically.
        let r = unsafe {
            self.uffd.copy(
                src.as_ptr().cast(),
                host as *mut libc::c_void,
                HUGE_PAGE_SIZE as usize,
                true,
            )
        };
        match r {
            Ok(_) => {}
            Err(UffdLibError::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => return Err(install_err(e.to_string())),
        }
        self.mapped.set(unit);
        Ok(())
    }

    /// Resolves a fault on `pfn` locally when it can be: the page is
    /// mapped already (woken), or its huge page is complete (installed
    /// now). Otherwise the page, or another of its huge page, is missing.
    pub(super) fn resolve_huge(&self, pfn: u64) -> Result<Local, UffdRamError> {
        let unit = pfn / UNIT_PAGES;
        let mut st = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if self.mapped.get(unit) {
            drop(st);
            self.wake(pfn);
            return Ok(Local::Hit);
        }
        if !self.unit_known(unit) {
            return Ok(Local::Missing);
        }
        let zero = !st.units.contains_key(&unit);
        self.install_unit(&mut st, unit, true)?;
        Ok(if zero { Local::Zero } else { Local::Hit })
    }

    /// The pages of `pfn`'s huge page that are neither present nor zero.
    pub fn missing_in_unit(&self, pfn: u64) -> impl Iterator<Item = u64> + '_ {
        let first = (pfn / UNIT_PAGES) * UNIT_PAGES;
        (first..(first + UNIT_PAGES).min(self.pages()))
            .filter(|&q| !self.present.get(q) && !self.zero.get(q))
    }
}
