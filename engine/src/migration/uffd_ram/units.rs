//! RAM filled in place, then mapped a unit at a time: 2 MiB huge pages,
//! and shared memory allocated ahead in units of 512 KiB.
//!
//! The protocol moves 4 KiB pages, but a 2 MiB page of hugetlbfs can only
//! be mapped whole. Pages are written into the memory file through a
//! second mapping of it, the alias, which no userfaultfd watches: a page
//! that arrives goes straight to its place in the file's page cache (read
//! from the socket into it, when the connection allows: [`UffdRam::fill`]),
//! and a zero page is only marked `zero` (the file reads as zero where
//! nothing was written). When the last page of a unit is known,
//! `UFFDIO_CONTINUE` maps the unit's page-cache pages into the guest's
//! mapping (registered for minor faults as well as missing ones) and wakes
//! its waiters. No byte is copied a second time: `UFFDIO_COPY` copied each
//! one again, from a buffer into a new page.
//!
//! Shared memory in 4 KiB pages is filled the same way when every page of
//! it was allocated ahead (`ferry-dest --prealloc`): its pages exist, so
//! the guest's first touch of each is a minor fault, and one
//! `UFFDIO_CONTINUE` maps a unit of [`SHMEM_UNIT_PAGES`]. Writing into
//! pages allocated before the move avoids the allocation that
//! `UFFDIO_COPY` makes inside it (see `migration::ram_ahead`).
//!
//! Nothing writes a unit once it is mapped: from then on its contents are
//! the guest's. Every byte written through the alias is the source's final
//! content of that byte (the source is paused), so two writers of one unit
//! (the push and a demand answer) write the same bytes, and a write cut
//! short leaves only correct bytes. A unit is mapped only while no one
//! writes it (`Writers`), by whoever finishes last.
//!
//! A unit all of whose pages are zero is not mapped until a vCPU touches
//! it. A fault on a unit not yet complete asks for all of its missing
//! pages at once (see `migration::fault`); that is fault-around to the
//! mapping unit.

use std::collections::HashMap;

use userfaultfd::Error as UffdLibError;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::{Local, UffdRam, UffdRamError};
use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_PAGES;

/// 4 KiB pages of shared memory allocated ahead mapped at once: 512 KiB.
/// A fault waits for its whole unit (one answer of up to 512 KiB), and
/// the push maps what it completes a unit at a time. Measured here, 2G
/// guest, random working set, `--prealloc`, 2 rounds of 2 moves each,
/// binaries alternating (median total ms, unpinned / pinned):
///
/// | unit | 1.5G moved | 256M moved | fault p50 µs |
/// |---|---|---|---|
/// | 64 KiB | 873 / 1314 | | 95-115 |
/// | 256 KiB | 688-760 / 859-871 | | 199-237 |
/// | 512 KiB | 535 / 783 | 126 / 163 (lost 217 / 242) | 263-308 |
/// | 2 MiB | 462-581 / 558-574 | 122 / 132 (lost 273 / 365) | 718-907 |
///
/// Fewer, larger answers cost the single core of a pinned destination
/// fewer wake-ups and switches between the push, the fault thread and the
/// vCPU (`perf`: the source's core was half idle at 64 KiB); beyond
/// 512 KiB a small working set loses more work, and a fault takes 2 MiB
/// of wire time (p99 6-7 ms at 256M).
pub const SHMEM_UNIT_PAGES: u64 = 128;

/// A unit is a part of one bitmap word or whole words (see `all_words`).
const fn fits_bitmap_words(unit: u64) -> bool {
    64u64.is_multiple_of(unit) || unit.is_multiple_of(64)
}

const _: () = assert!(
    fits_bitmap_words(SHMEM_UNIT_PAGES) && fits_bitmap_words(HUGE_PAGE_PAGES),
    "a unit is a part of one bitmap word or whole words"
);

/// Who is writing which unit through the alias.
#[derive(Default)]
pub(super) struct Writers {
    /// Unit index → writers at work in it (no entry: none).
    active: HashMap<u64, u32>,
}

/// One writer's claim on a unit; ends the write when dropped, so that a
/// failed write never keeps its unit from being mapped.
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
                tracing::warn!(unit = self.unit, "mapping a unit after a failed write: {e}");
            }
        }
    }
}

impl UffdRam {
    /// Writes pages `pfn..pfn+count` of RAM filled in place: `fill` is
    /// called with each unit's part of the range in turn (in the page
    /// cache, through the alias) and must fill all of it with the pages'
    /// data. A part whose unit the guest owns already is handed over in a
    /// scratch buffer and dropped. Every unit that became complete is
    /// mapped. Returns how many pages became present.
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
            why: "RAM neither in huge pages nor allocated ahead is not filled in place".into(),
        })?;
        let mut scratch = Vec::new();
        let mut newly = 0;
        let mut p = pfn;
        while p < end {
            let unit = p / self.unit;
            let unit_end = ((unit + 1) * self.unit).min(end);
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
    /// unit that became complete and holds data. Returns how many pages
    /// became known.
    pub(super) fn zeros(&self, pfn: u64, count: u64) -> Result<u64, UffdRamError> {
        let end = self.check_range(pfn, count)?;
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = 0;
        let mut p = pfn;
        while p < end {
            let unit = p / self.unit;
            let unit_end = ((unit + 1) * self.unit).min(end);
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

    /// A claim to write unit `unit`, or `None` when it is mapped.
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

    /// Ends a write of unit `unit` (`written`: the pages it filled) and
    /// maps the unit if it is complete and no one else writes it.
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

    /// Maps unit `unit` when all its pages are known (and it is not mapped
    /// yet). The caller holds the writers' lock and knows no one writes
    /// the unit.
    fn map_if_complete(&self, unit: u64) -> Result<(), UffdRamError> {
        if self.mapped.get(unit) || !self.unit_known(unit) {
            return Ok(());
        }
        self.map_unit(unit)
    }

    /// The pages of unit `unit` (the last unit may be short; 4 KiB RAM
    /// filled by `UFFDIO_COPY` has units of one page).
    pub(super) fn unit_span(&self, unit: u64) -> (u64, u64) {
        let first = unit * self.unit;
        (first, self.unit.min(self.pages().saturating_sub(first)))
    }

    /// True when every page of unit `unit` is present or zero.
    fn unit_known(&self, unit: u64) -> bool {
        let (first, n) = self.unit_span(unit);
        all_words(first, n, |i| self.present.word(i) | self.zero.word(i))
    }

    /// True when every page of unit `unit` is present (holds data).
    fn unit_full(&self, unit: u64) -> bool {
        let (first, n) = self.unit_span(unit);
        all_words(first, n, |i| self.present.word(i))
    }

    /// True when some page of unit `unit` holds data (was written): its
    /// page exists in the page cache.
    fn unit_has_data(&self, unit: u64) -> bool {
        let (first, n) = self.unit_span(unit);
        !all_words(first, n, |i| !self.present.word(i))
    }

    /// Maps unit `unit`'s page-cache pages into the guest's mapping with
    /// `UFFDIO_CONTINUE`, which wakes its waiters. Its holes (pages of
    /// zeros never written; none in RAM allocated ahead) are allocated
    /// first, as zeros.
    fn map_unit(&self, unit: u64) -> Result<(), UffdRamError> {
        let (first, n) = self.unit_span(unit);
        let install_err = |why: String| UffdRamError::Install {
            pfn: first,
            count: n,
            why,
        };
        let host = self.host_of(first, n)?;
        let len = n * PAGE_SIZE as u64;
        if !self.unit_full(unit) {
            if let Some(file) = &self.file {
                nix::fcntl::fallocate(
                    &**file,
                    nix::fcntl::FallocateFlags::empty(),
                    (first * PAGE_SIZE as u64) as i64,
                    len as i64,
                )
                .map_err(|e| install_err(format!("allocating the unit's zero pages: {e}")))?;
            }
        }
        match self
            .uffd
            .r#continue(host as *mut libc::c_void, len as usize, true)
        {
            Ok(_) => {}
            Err(UffdLibError::SystemError(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => return Err(install_err(format!("UFFDIO_CONTINUE: {e}"))),
        }
        self.mapped.set(unit);
        Ok(())
    }

    /// Resolves a fault on `pfn` locally when it can be: the page is
    /// mapped already (woken), or its unit is complete (mapped now, or by
    /// the writer still at work in it). Otherwise the page, or another of
    /// its unit, is missing.
    pub(super) fn resolve_unit(&self, pfn: u64) -> Result<Local, UffdRamError> {
        let unit = pfn / self.unit;
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

    /// The pages of `pfn`'s unit that are neither present nor zero.
    pub fn missing_in_unit(&self, pfn: u64) -> impl Iterator<Item = u64> + '_ {
        let (first, n) = self.unit_span(pfn / self.unit);
        (first..first + n).filter(|&q| !self.present.get(q) && !self.zero.get(q))
    }
}

/// True when bits `first..first+n` of the bitmap whose word `i` is
/// `word(i)` are all set: a unit is a part of one word or whole words, so
/// this reads at most a few words, not one bit per page (it is asked for
/// every frame).
fn all_words(first: u64, n: u64, word: impl Fn(usize) -> u64) -> bool {
    let end = first + n;
    let mut p = first;
    while p < end {
        let (i, bit) = ((p / 64) as usize, p % 64);
        let bits = (64 - bit).min(end - p);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            ((1u64 << bits) - 1) << bit
        };
        if word(i) & mask != mask {
            return false;
        }
        p += bits;
    }
    true
}

#[cfg(test)]
mod bit_tests {
    use super::all_words;

    #[test]
    fn all_words_reads_parts_of_words_and_whole_ones() {
        let words = [0xffff_0000_0000_0000u64, u64::MAX, 0x0f];
        let w = |i: usize| words[i];
        assert!(all_words(48, 16, w));
        assert!(!all_words(47, 16, w));
        assert!(all_words(48, 84, w));
        assert!(!all_words(48, 85, w));
        assert!(all_words(64, 64, w));
        assert!(all_words(128, 4, w));
        assert!(!all_words(128, 5, w));
    }
}
