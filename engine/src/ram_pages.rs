//! Guest RAM as the page server's [`PageSource`], with a fast answer to
//! "where is the next page that may hold data?" for both backings.
//!
//! For shared memory the file answers it (`lseek(SEEK_DATA)`). hugetlbfs
//! does not: its `SEEK_DATA` calls the whole file data, so without help a
//! push reads, and checks for zeros, every never-touched huge page of a
//! large guest (2G guest, 256 MiB working set at the top of RAM: the push
//! spent 158 ms reading 1.75 GiB of holes before it reached the first page
//! of data, and the guest fetched its whole working set on demand
//! meanwhile). Here the process's own page tables answer it instead, with
//! `mincore(2)` on the guest mapping.
//!
//! That is exact, not a guess, because of how huge-page RAM is built:
//! hugetlbfs has no `write(2)`, so a huge page gets data only by a write
//! through a mapping, and the only mapping of the file that is ever
//! written is [`GuestRam`]'s own (vCPUs through KVM, device emulation,
//! `write_at`, and `UFFDIO_COPY` installs all use it). A huge page written
//! through it stays mapped there until the file drops it: nothing in Ferry
//! calls `MADV_DONTNEED` on guest RAM, and [`GuestRam::discard`] punches
//! whole huge pages out of the file or zeroes parts in place. So a page
//! that `mincore` calls absent reads as zero. When `mincore` cannot answer,
//! the page is assumed to hold data.

use std::io;

use ferry_page_server::source::{FileSource, PageSource};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::PAGE_SIZE;
use crate::memory::{Backing, GuestRam, HUGE_PAGE_PAGES as UNIT_PAGES};

/// Most pages lent at once (one frame).
const LEND_MAX: usize = 512;

/// A VM's RAM as a [`PageSource`]: reads come from the memory file, and
/// holes are found by the file (shared memory) or by the guest mapping's
/// page tables (huge pages). Holds the mapping alive while it exists.
pub struct RamPages {
    ram: GuestRam,
    file: FileSource,
}

impl RamPages {
    /// A source over all of `ram`.
    pub fn new(ram: &GuestRam) -> Self {
        Self {
            ram: ram.clone(),
            file: FileSource::new(ram.file().clone(), ram.pages()),
        }
    }

    /// For huge pages: the first page at or after `pfn` whose huge page
    /// is mapped in the guest mapping, or that `mincore` could not answer
    /// for.
    ///
    /// One `mincore` call per huge page, on its first 4 KiB: a huge page is
    /// mapped whole, so that page answers for all of it. Asking about a
    /// whole range at once would be one call but far slower: where no page
    /// table covers a range, the kernel looks each 4 KiB page up in the
    /// file instead (2G guest: 23 ms per 1.75 GiB of holes, against well
    /// under 1 ms this way).
    fn next_mapped(&self, pfn: u64) -> Option<u64> {
        let page = PAGE_SIZE as u64;
        let mut at = pfn;
        // The ranges are in file order (`layout::ram_ranges`).
        for r in self.ram.ranges() {
            let (first, end) = (r.file_offset / page, (r.file_offset + r.len) / page);
            if at >= end {
                continue;
            }
            if at < first || !first.is_multiple_of(UNIT_PAGES) {
                // A part of the file no range maps, or a range not made of
                // whole huge pages: nothing to ask.
                return Some(at);
            }
            while at < end {
                let unit = at - (at - first) % UNIT_PAGES;
                match self.is_mapped(GuestAddress(r.guest_addr + (unit - first) * page)) {
                    Ok(false) => at = unit + UNIT_PAGES,
                    Ok(true) | Err(_) => return Some(at),
                }
            }
        }
        (at < self.ram.pages()).then_some(at)
    }

    /// True when each of the `n` pages at `host` (in the guest mapping)
    /// is in memory, so reading them allocates nothing; at most
    /// [`LEND_MAX`] pages.
    fn resident(&self, host: *mut u8, n: u64) -> bool {
        let mut vec = [0u8; LEND_MAX];
        let Some(vec) = usize::try_from(n).ok().and_then(|n| vec.get_mut(..n)) else {
            return false;
        };
        // SAFETY: `host` is a page-aligned address inside the guest
        // mapping with `n` pages of it after (the caller found them in one
        // RAM range), which `self.ram` keeps mapped. `mincore` only reads
        // page tables and the page cache and writes one byte per page into
        // `vec`, which has `n`.
        let rc = unsafe { libc::mincore(host.cast(), vec.len() * PAGE_SIZE, vec.as_mut_ptr()) };
        rc == 0 && vec.iter().all(|v| v & 1 != 0)
    }

    /// True when the 4 KiB page at `guest` is mapped in this process.
    fn is_mapped(&self, guest: GuestAddress) -> io::Result<bool> {
        let host = self
            .ram
            .guest_memory()
            .get_host_address(guest)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut vec = [0u8; 1];
        // SAFETY: `host` is a page-aligned address inside the guest mapping
        // (regions start on pages and `guest` is whole pages into one),
        // which `self.ram` keeps mapped. `mincore` only reads page tables
        // and writes one byte per page asked about into `vec`: one page,
        // one byte.
        let rc = unsafe { libc::mincore(host.cast(), PAGE_SIZE, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec[0] & 1 != 0)
    }
}

impl PageSource for RamPages {
    fn pages(&self) -> u64 {
        self.file.pages()
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(pfn, buf)
    }

    fn next_data(&self, pfn: u64) -> Option<u64> {
        match self.ram.backing() {
            Backing::Shmem => self.file.next_data(pfn),
            Backing::HugePages => self.next_mapped(pfn),
        }
    }

    /// The run from the guest mapping, when it lies within one RAM range
    /// (one mapping).
    unsafe fn lend_unchecked(&self, pfn: u64, n: u64) -> Option<&[u8]> {
        let page = PAGE_SIZE as u64;
        let (start, len) = (pfn.checked_mul(page)?, n.checked_mul(page)?);
        let r = self
            .ram
            .ranges()
            .iter()
            .find(|r| start >= r.file_offset && start - r.file_offset + len <= r.len)?;
        let guest = GuestAddress(r.guest_addr + (start - r.file_offset));
        let host = self.ram.guest_memory().get_host_address(guest).ok()?;
        let len = usize::try_from(len).ok()?;
        if !self.resident(host, n) {
            // A hole: read through the mapping it would be filled (a page
            // allocated, a huge page zeroed); `read` finds zeros for free.
            return None;
        }
        // SAFETY: `host..host + len` lies inside one RAM range, which is
        // one mapping of the guest's memory that lives as long as
        // `self.ram` (a clone of the VM's `GuestRam`), so as long as the
        // slice borrows `self`; every byte of it is initialized (mapped
        // file pages read as their contents or zero). The caller promises
        // that nothing writes it meanwhile, so a shared slice is sound.
        Some(unsafe { std::slice::from_raw_parts(host.cast_const(), len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{huge_pages_available, HUGE_PAGE_SIZE};

    /// Every page holding data is found, in order, and the holes between
    /// are skipped; checked against the file's own contents.
    fn finds_every_page_with_data(ram: &GuestRam) {
        let huge = UNIT_PAGES;
        let written = [3 * huge + 7, 3 * huge + 9, 40 * huge, ram.pages() - 1];
        for &p in &written {
            ram.write_at(p * PAGE_SIZE as u64, &[0xA5; PAGE_SIZE])
                .unwrap();
        }
        let src = RamPages::new(ram);
        // The answer from every start is a page at or before the next
        // written one, and never past a written page.
        for &start in &[0, 3 * huge, 3 * huge + 8, 3 * huge + 10, 41 * huge] {
            let next = written.iter().copied().find(|&p| p >= start).unwrap();
            let found = src.next_data(start).unwrap();
            assert!(
                found >= start && found <= next,
                "from {start}: {found}, data at {next}"
            );
        }
        assert_eq!(src.next_data(ram.pages()), None);
        // Walking the whole RAM the way a push does reads every written
        // page, and skips at least everything but their huge pages.
        let mut seen = Vec::new();
        let mut read = 0;
        let mut at = 0;
        let mut buf = vec![0u8; PAGE_SIZE];
        while let Some(p) = src.next_data(at) {
            src.read(p, &mut buf).unwrap();
            read += 1;
            if buf[0] == 0xA5 {
                seen.push(p);
            }
            at = p + 1;
        }
        assert_eq!(seen, written);
        if ram.backing() == Backing::HugePages {
            assert!(read <= written.len() as u64 * huge, "{read} pages read");
        }
        lends_what_it_holds(&src, &written);
    }

    /// Lent pages are the pages `read` gives; a hole is not lent (reading
    /// it through the mapping would fill it) and stays a hole.
    fn lends_what_it_holds(src: &RamPages, written: &[u64]) {
        let huge = UNIT_PAGES;
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        for &p in written {
            // SAFETY: nothing writes this test's RAM while the slice lives.
            let lent = unsafe { src.lend_unchecked(p, 1) }.expect("a written page is lent");
            src.read(p, &mut buf[..PAGE_SIZE]).unwrap();
            assert_eq!(lent, &buf[..PAGE_SIZE], "page {p}");
        }
        // Pages 3*huge+7 and +9 were written; +8 between them is data only
        // where its huge page is mapped whole.
        // SAFETY: as above.
        let run = unsafe { src.lend_unchecked(3 * huge + 7, 2) };
        match src.ram.backing() {
            Backing::HugePages => {
                src.read(3 * huge + 7, &mut buf).unwrap();
                assert_eq!(run, Some(&buf[..]), "a run in a mapped huge page");
            }
            Backing::Shmem => assert_eq!(run, None, "a run with a hole is read instead"),
        }
        let hole = 20 * huge;
        // SAFETY: as above.
        assert_eq!(unsafe { src.lend_unchecked(hole, 1) }, None);
        assert!(
            src.next_data(hole).is_some_and(|d| d > hole),
            "asking to lend a hole filled it"
        );
        // Beyond RAM: nothing.
        // SAFETY: as above.
        assert_eq!(unsafe { src.lend_unchecked(src.pages(), 1) }, None);
    }

    #[test]
    fn shared_memory_holes_come_from_the_file() {
        finds_every_page_with_data(&GuestRam::new(256 << 20).unwrap());
    }

    #[test]
    fn huge_page_holes_come_from_the_mapping() {
        let size = 256 << 20;
        let need = size / HUGE_PAGE_SIZE;
        let free = huge_pages_available().unwrap_or(0);
        assert!(
            free >= need,
            "this test needs {need} free 2 MiB huge pages and the pool has {free}: run scripts/hugepages.sh"
        );
        let ram = GuestRam::with_backing(size, Backing::HugePages).unwrap();
        // Nothing written yet: no data anywhere.
        assert_eq!(RamPages::new(&ram).next_data(0), None);
        finds_every_page_with_data(&ram);
        // A punched huge page is a hole again.
        let last = ram.pages() - 1;
        let unit = UNIT_PAGES;
        ram.discard((last / unit) * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)
            .unwrap();
        assert_eq!(RamPages::new(&ram).next_data(41 * unit), None);
    }
}
