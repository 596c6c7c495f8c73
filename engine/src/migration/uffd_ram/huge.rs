//! Huge-page RAM behind userfaultfd: 2 MiB pages filled in place, then
//! mapped whole.
//!
//! The protocol moves 4 KiB pages, but a 2 MiB page of hugetlbfs can only
//! be mapped whole. Pages are written into the memory file through a
//! second mapping of it, the alias, which no userfaultfd watches: a page
//! that arrives goes straight to its place in the file's page cache (read
//! from the socket into it, when the connection allows: [`UffdRam::fill`]),
//! and a zero page is only marked `zero` (the file reads as zero where
//! nothing was written). When the last of a huge page's 512 pages is known,
//! `UFFDIO_CONTINUE` maps that page-cache page into the guest's mapping
//! (registered for minor faults as well as missing ones) and wakes its
//! waiters. No byte is copied a second time: `UFFDIO_COPY` copied each one
//! again, from a buffer into a new page.
//!
//! Nothing writes a huge page once it is mapped: from then on its contents
//! are the guest's. Every byte written through the alias is the source's
//! final content of that byte (the source is paused), so two writers of one
//! huge page (the push and a demand answer) write the same bytes, and a
//! write cut short leaves only correct bytes. A huge page is mapped only
//! while no one writes it (`Writers`), by whoever finishes last.
//!
//! A huge page all of whose pages are zero is not mapped until a vCPU
//! touches it: it stays a hole, which reads as zero. A fault on a huge page
//! not yet complete asks for all of its missing pages at once (see
//! `migration::fault`); that is fault-around to the mapping unit.

use std::collections::HashMap;

use userfaultfd::Error as UffdLibError;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::{Local, UffdRam, UffdRamError};
use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_SIZE;

/// 4 KiB pages in one huge page: the unit mapped at once.
pub use crate::memory::HUGE_PAGE_PAGES as UNIT_PAGES;

const _: () = assert!(
    UNIT_PAGES.is_multiple_of(64),
    "a huge page is whole bitmap words"
);

/// Who is writing which huge page through the alias.
#[derive(Default)]
pub(super) struct Writers {
    /// Huge page index → writers at work in it (no entry: none).
    active: HashMap<u64, u32>,
}

/// One writer's claim on a huge page; ends the write when dropped, so
/// that a failed write never keeps its huge page from being mapped.
struct Claim<'a> {
    ram: &'a UffdRam,
    unit: u64,
    done: bool,
}

impl Claim<'_> {
    /// Ends the write of pages `first..first+n`, which now hold their
    /// data; returns how many of them were not present before.
    fn finish(mut self, first: u64, n: u64) -> Result<u64, UffdRamError> {
        self.done = true;
        self.ram.end_write(self.unit, Some((first, n)))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.ram.end_write(self.unit, None) {
                tracing::warn!(
                    unit = self.unit,
                    "mapping a huge page after a failed write: {e}"
                );
            }
        }
    }
}

impl UffdRam {
    /// Writes pages `pfn..pfn+count` of huge-page RAM in place: `fill` is
    /// called with each huge page's part of the range in turn (in the
    /// page cache, through the alias) and must fill all of it with the
    /// pages' data. A part whose huge page the guest owns already is
    /// handed over in a scratch buffer and dropped. Every huge page that
    /// became complete is mapped. Returns how many pages became present.
    pub fn fill<E: From<UffdRamError>>(
        &self,
        pfn: u64,
        count: u64,
        mut fill: impl FnMut(&mut VolatileSlice<'_>) -> Result<(), E>,
    ) -> Result<u64, E> {
        let end = self.check_range(pfn, count)?;
        let alias = self.alias.as_ref().ok_or(UffdRamError::Install {
            pfn,
            count,
            why: "RAM in 4 KiB pages is not filled in place".into(),
        })?;
        let mut scratch = Vec::new();
        let mut newly = 0;
        let mut p = pfn;
        while p < end {
            let unit = p / UNIT_PAGES;
            let unit_end = ((unit + 1) * UNIT_PAGES).min(end);
            let (n, len) = (unit_end - p, ((unit_end - p) as usize) * PAGE_SIZE);
            match self.begin_write(unit) {
                Some(claim) => {
                    let at = self.guest_addr_of(p)?;
                    let mut dst = alias.get_slice(GuestAddress(at), len).map_err(|e| {
                        UffdRamError::Install {
                            pfn: p,
                            count: n,
                            why: format!("the alias of guest RAM: {e}"),
                        }
                    })?;
                    fill(&mut dst)?;
                    newly += claim.finish(p, n)?;
                }
                None => {
                    scratch.resize(len, 0);
                    fill(&mut VolatileSlice::from(&mut scratch[..]))?;
                }
            }
            p = unit_end;
        }
        Ok(newly)
    }

    /// [`UffdRam::fill`] from pages at hand.
    pub(super) fn fill_from(&self, pfn: u64, data: &[u8]) -> Result<u64, UffdRamError> {
        let mut from = 0;
        self.fill(pfn, (data.len() / PAGE_SIZE) as u64, |dst| {
            dst.copy_from(&data[from..from + dst.len()]);
            from += dst.len();
            Ok::<_, UffdRamError>(())
        })
    }

    /// Marks pages `pfn..pfn+count` zero (those not present) and maps every
    /// huge page that became complete and holds data. Returns how many
    /// pages became known.
    pub(super) fn zeros(&self, pfn: u64, count: u64) -> Result<u64, UffdRamError> {
        let end = self.check_range(pfn, count)?;
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = 0;
        let mut p = pfn;
        while p < end {
            let unit = p / UNIT_PAGES;
            let unit_end = ((unit + 1) * UNIT_PAGES).min(end);
            for q in p..unit_end {
                if !self.present.get(q) && !self.zero.get(q) {
                    self.zero.set(q);
                    newly += 1;
                }
            }
            if !w.active.contains_key(&unit) && self.unit_has_data(unit) {
                self.map_if_complete(unit)?;
            }
            p = unit_end;
        }
        Ok(newly)
    }

    fn check_range(&self, pfn: u64, count: u64) -> Result<u64, UffdRamError> {
        pfn.checked_add(count)
            .filter(|&e| e <= self.pages())
            .ok_or(UffdRamError::OutOfRange { pfn, count })
    }

    /// A claim to write huge page `unit`, or `None` when it is mapped.
    fn begin_write(&self, unit: u64) -> Option<Claim<'_>> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if self.mapped.get(unit) {
            return None;
        }
        *w.active.entry(unit).or_default() += 1;
        Some(Claim {
            ram: self,
            unit,
            done: false,
        })
    }

    /// Ends a write of huge page `unit` (`written`: the pages it filled)
    /// and maps the huge page if it is complete and no one else writes it.
    fn end_write(&self, unit: u64, written: Option<(u64, u64)>) -> Result<u64, UffdRamError> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let newly = written.map_or(0, |(first, n)| self.present.set_range(first, n));
        if let Some(c) = w.active.get_mut(&unit) {
            *c -= 1;
            if *c == 0 {
                w.active.remove(&unit);
            }
        }
        if !w.active.contains_key(&unit) && self.unit_has_data(unit) {
            self.map_if_complete(unit)?;
        }
        Ok(newly)
    }

    /// Maps huge page `unit` when all its pages are known (and it is not
    /// mapped yet). The caller holds the writers' lock and knows no one
    /// writes the huge page.
    fn map_if_complete(&self, unit: u64) -> Result<(), UffdRamError> {
        if self.mapped.get(unit) || !self.unit_known(unit) {
            return Ok(());
        }
        self.map_unit(unit)
    }

    /// True when every page of huge page `unit` is present or zero.
    fn unit_known(&self, unit: u64) -> bool {
        let first = unit * UNIT_PAGES;
        match self.unit_words(unit) {
            Some(words) => words.into_iter().all(|i| self.known_word(i) == u64::MAX),
            None => (first..(first + UNIT_PAGES).min(self.pages()))
                .all(|q| self.present.get(q) || self.zero.get(q)),
        }
    }

    /// True when some page of huge page `unit` holds data (was written):
    /// its page exists in the page cache.
    fn unit_has_data(&self, unit: u64) -> bool {
        let first = unit * UNIT_PAGES;
        match self.unit_words(unit) {
            Some(words) => words.into_iter().any(|i| self.present.word(i) != 0),
            None => (first..(first + UNIT_PAGES).min(self.pages())).any(|q| self.present.get(q)),
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

    /// Maps huge page `unit`'s page-cache page into the guest's mapping
    /// with `UFFDIO_CONTINUE`, which wakes its waiters. A hole (a huge page
    /// of zero pages) is allocated first, as zeros.
    fn map_unit(&self, unit: u64) -> Result<(), UffdRamError> {
        let first = unit * UNIT_PAGES;
        let install_err = |why: String| UffdRamError::Install {
            pfn: first,
            count: UNIT_PAGES,
            why,
        };
        let host = self.host_of(first, UNIT_PAGES)?;
        if !self.unit_has_data(unit) {
            if let Some(file) = &self.file {
                nix::fcntl::fallocate(
                    &**file,
                    nix::fcntl::FallocateFlags::empty(),
                    (unit * HUGE_PAGE_SIZE) as i64,
                    HUGE_PAGE_SIZE as i64,
                )
                .map_err(|e| install_err(format!("allocating a zero huge page: {e}")))?;
            }
        }
        match self
            .uffd
            .r#continue(host as *mut libc::c_void, HUGE_PAGE_SIZE as usize, true)
        {
            Ok(_) => {}
            Err(UffdLibError::SystemError(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => return Err(install_err(format!("UFFDIO_CONTINUE: {e}"))),
        }
        self.mapped.set(unit);
        Ok(())
    }

    /// Resolves a fault on `pfn` locally when it can be: the page is
    /// mapped already (woken), or its huge page is complete (mapped now,
    /// or by the writer still at work in it). Otherwise the page, or
    /// another of its huge page, is missing.
    pub(super) fn resolve_huge(&self, pfn: u64) -> Result<Local, UffdRamError> {
        let unit = pfn / UNIT_PAGES;
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if self.mapped.get(unit) {
            drop(w);
            self.wake(pfn);
            return Ok(Local::Hit);
        }
        if !self.unit_known(unit) {
            return Ok(Local::Missing);
        }
        let zero = !self.unit_has_data(unit);
        if !w.active.contains_key(&unit) {
            self.map_unit(unit)?;
        }
        Ok(if zero { Local::Zero } else { Local::Hit })
    }

    /// The pages of `pfn`'s huge page that are neither present nor zero.
    pub fn missing_in_unit(&self, pfn: u64) -> impl Iterator<Item = u64> + '_ {
        let first = (pfn / UNIT_PAGES) * UNIT_PAGES;
        (first..(first + UNIT_PAGES).min(self.pages()))
            .filter(|&q| !self.present.get(q) && !self.zero.get(q))
    }
}
