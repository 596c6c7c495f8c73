//! Destination guest RAM behind userfaultfd: missing pages fault to us.
//!
//! Every RAM range of the VM's mapping is registered in MISSING mode before
//! the vCPUs run. A page is resolved by `UFFDIO_COPY` (data) or
//! `UFFDIO_ZEROPAGE`, which also wake the threads blocked on it. Two threads
//! install concurrently (the demand fault handler and the background
//! installer), so "page already exists" (`EEXIST`) is an expected outcome,
//! not an error: the other thread won the race.
//!
//! Zero pages pushed by the source are not installed at all: they are only
//! recorded. A fault on one is resolved locally with `UFFDIO_ZEROPAGE`, and
//! the rest stay holes in the memfd, which read as zero after unregistering.
//!
//! RAM in 2 MiB huge pages, and shared memory allocated ahead
//! (`ferry-dest --prealloc`), is filled in place instead: pages are written
//! through a second mapping and mapped into the guest's with
//! `UFFDIO_CONTINUE` a unit at a time (a huge page, or 512 KiB), once the
//! unit is complete (see the `units` submodule).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use userfaultfd::{Error as UffdLibError, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

mod units;

use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_PAGES;
use crate::memory::{Backing, GuestRam};
use ferry_protocol::PageBitmap;
use units::{Writers, SHMEM_UNIT_PAGES};

/// Most pages one `UFFDIO_COPY` installs. A woken fault thread, even at
/// real-time priority, waits for the push installer's ioctl on its core to
/// return (this kernel is `PREEMPT_NONE`), so long copies are the
/// fault-latency tail: with the destination pinned to one core, p99 ÷ p50
/// went from 10.4 (one ioctl per 1 MiB frame) to 6.5 with 32 pages, at no
/// measurable cost in push rate unpinned (659 vs 678 ms, 2G/1G).
const MAX_COPY_PAGES: u64 = 32;

/// How a fault was resolved without the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// The page was there (installed by the push or another fault).
    Hit,
    /// The page is known to be zero and was installed here.
    Zero,
    /// The page must come from the source.
    Missing,
}

/// Errors from the userfaultfd-backed RAM.
#[derive(Debug, thiserror::Error)]
pub enum UffdRamError {
    /// Creating or registering the userfaultfd failed.
    #[error("userfaultfd setup failed: {0}")]
    Setup(String),
    /// Installing a page failed for a reason other than a lost race.
    #[error("installing pages {pfn}+{count} failed: {why}")]
    Install {
        /// First page.
        pfn: u64,
        /// Pages.
        count: u64,
        /// The error.
        why: String,
    },
    /// Pages outside guest RAM.
    #[error("pages {pfn}+{count} are outside guest RAM")]
    OutOfRange {
        /// First page.
        pfn: u64,
        /// Pages.
        count: u64,
    },
}

/// Attempts before a copy that keeps making no progress is an error.
const MAX_RETRIES: u32 = 1000;

#[derive(Debug, Clone, Copy)]
struct Region {
    host: usize,
    guest: u64,
    first_pfn: u64,
    pages: u64,
}

/// Guest RAM whose missing pages are served by us.
pub struct UffdRam {
    uffd: Uffd,
    regions: Vec<Region>,
    /// Pages that hold their final content (filled in place: possibly
    /// still staged, see `mapped`).
    pub present: PageBitmap,
    /// Pages the source reported as zero and that are still holes.
    pub zero: PageBitmap,
    /// RAM filled in place: the units mapped (one bit each); empty
    /// otherwise.
    mapped: PageBitmap,
    /// RAM filled in place: who writes which unit (see the `units` module).
    writers: Mutex<Writers>,
    /// RAM filled in place: a second mapping of the memory file, which no
    /// userfaultfd watches, to write pages in place.
    alias: Option<GuestMemoryMmap>,
    /// RAM filled in place: the memory file, to allocate a unit's holes.
    file: Option<Arc<File>>,
    /// Pages per unit mapped at once, when filled in place (1 otherwise).
    unit: u64,
    huge: bool,
}

impl UffdRam {
    /// Registers all of `ram` for missing-page faults. RAM filled in
    /// place (huge pages, or RAM allocated ahead) is registered for minor
    /// faults too: a page of the file that exists but that the guest has
    /// not mapped yet.
    pub fn register(ram: &GuestRam) -> Result<Self, UffdRamError> {
        let setup = |e: UffdLibError| UffdRamError::Setup(e.to_string());
        let huge = ram.backing() == Backing::HugePages;
        let in_place = huge || ram.allocated_ahead();
        let unit = match (in_place, huge) {
            (false, _) => 1,
            (true, true) => HUGE_PAGE_PAGES,
            (true, false) => SHMEM_UNIT_PAGES,
        };
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM resolves guest accesses through get_user_pages in kernel
            // mode, so kernel-mode faults must be delivered too.
            .user_mode_only(false)
            .require_features(
                FeatureFlags::THREAD_ID
                    | if huge {
                        FeatureFlags::MISSING_HUGETLBFS
                    } else {
                        FeatureFlags::MISSING_SHMEM
                    },
            )
            .create()
            .map_err(setup)?;
        let mode = if in_place {
            RegisterMode::MISSING | RegisterMode::MINOR
        } else {
            RegisterMode::MISSING
        };
        let mut regions = Vec::new();
        for r in ram.ranges() {
            let host = ram
                .guest_memory()
                .get_host_address(GuestAddress(r.guest_addr))
                .map_err(|e| UffdRamError::Setup(e.to_string()))? as usize;
            uffd.register_with_mode(host as *mut libc::c_void, r.len as usize, mode)
                .map_err(setup)?;
            regions.push(Region {
                host,
                guest: r.guest_addr,
                first_pfn: r.file_offset / PAGE_SIZE as u64,
                pages: r.len / PAGE_SIZE as u64,
            });
        }
        Ok(Self {
            uffd,
            regions,
            present: PageBitmap::new(ram.pages()),
            zero: PageBitmap::new(ram.pages()),
            mapped: PageBitmap::new(if in_place {
                ram.pages().div_ceil(unit)
            } else {
                0
            }),
            writers: Mutex::new(Writers::default()),
            alias: if in_place {
                Some(
                    ram.alias()
                        .map_err(|e| UffdRamError::Setup(format!("second mapping: {e}")))?,
                )
            } else {
                None
            },
            file: in_place.then(|| ram.file().clone()),
            unit,
            huge,
        })
    }

    /// True when pages are written in place ([`UffdRam::fill`]) and mapped
    /// a unit at a time: huge-page RAM, and RAM allocated ahead.
    pub fn fills_in_place(&self) -> bool {
        self.alias.is_some()
    }

    /// Pages mapped at once: a unit of RAM filled in place, else 1.
    pub fn unit_pages(&self) -> u64 {
        self.unit
    }

    /// True for huge-page RAM, mapped 2 MiB at a time.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// The userfaultfd, for polling.
    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// The userfaultfd itself, for reading events.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.present.pages()
    }

    /// The memory-file page of a faulting host address.
    pub fn pfn_of(&self, host_addr: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = host_addr.checked_sub(r.host)? as u64 / PAGE_SIZE as u64;
            (off < r.pages).then_some(r.first_pfn + off)
        })
    }

    /// Splits `pfn..pfn+count` at region boundaries into (host address, pfn, pages).
    fn spans(&self, pfn: u64, count: u64) -> Result<Vec<(usize, u64, u64)>, UffdRamError> {
        let mut out = Vec::with_capacity(1);
        let (mut p, end) = (
            pfn,
            pfn.checked_add(count)
                .ok_or(UffdRamError::OutOfRange { pfn, count })?,
        );
        while p < end {
            let r = self
                .regions
                .iter()
                .find(|r| p >= r.first_pfn && p < r.first_pfn + r.pages)
                .ok_or(UffdRamError::OutOfRange { pfn, count })?;
            let n = (r.first_pfn + r.pages).min(end) - p;
            out.push((r.host + ((p - r.first_pfn) as usize) * PAGE_SIZE, p, n));
            p += n;
        }
        Ok(out)
    }

    /// The guest address of page `pfn`.
    fn guest_addr_of(&self, pfn: u64) -> Result<u64, UffdRamError> {
        let [(_, p, _)] = self.spans(pfn, 1)?[..] else {
            return Err(UffdRamError::OutOfRange { pfn, count: 1 });
        };
        let r = self
            .regions
            .iter()
            .find(|r| p >= r.first_pfn && p < r.first_pfn + r.pages)
            .ok_or(UffdRamError::OutOfRange { pfn, count: 1 })?;
        Ok(r.guest + (p - r.first_pfn) * PAGE_SIZE as u64)
    }

    /// The host address of `pfn..pfn+count`, which must lie in one region.
    fn host_of(&self, pfn: u64, count: u64) -> Result<usize, UffdRamError> {
        match self.spans(pfn, count)?.as_slice() {
            [(host, _, n)] if *n == count => Ok(*host),
            _ => Err(UffdRamError::OutOfRange { pfn, count }),
        }
    }

    /// Installs `data` (whole pages) at `pfn`, skipping pages already
    /// present. Returns how many pages this call installed (into RAM
    /// filled in place: wrote in place, see the `units` submodule).
    pub fn install(&self, pfn: u64, data: &[u8]) -> Result<u64, UffdRamError> {
        let count = (data.len() / PAGE_SIZE) as u64;
        if self.fills_in_place() {
            return self.fill_from(pfn, data);
        }
        let mut installed = 0;
        let mut retries = 0;
        for (host, first, n) in self.spans(pfn, count)? {
            let mut i = 0u64;
            while i < n {
                let p = first + i;
                if self.present.get(p) {
                    i += 1;
                    continue;
                }
                // Extend over the run of pages not yet present.
                let mut run = 1;
                while i + run < n && run < MAX_COPY_PAGES && !self.present.get(p + run) {
                    run += 1;
                }
                let src = &data[((p - pfn) as usize) * PAGE_SIZE..][..run as usize * PAGE_SIZE];
                let dst = host + (i as usize) * PAGE_SIZE;
                // SAFETY: `dst..dst + run pages` lies inside a registered
                // range of guest RAM that this VM keeps mapped (checked by
                // `spans`); `src` is a live slice of exactly that length.
                // UFFDIO_COPY only fills missing pages atomically.
                let r = unsafe {
                    self.uffd.copy(
                        src.as_ptr().cast(),
                        dst as *mut libc::c_void,
                        src.len(),
                        true,
                    )
                };
                let done = match r {
                    Ok(bytes) | Err(UffdLibError::PartiallyCopied(bytes)) => {
                        (bytes / PAGE_SIZE) as u64
                    }
                    Err(UffdLibError::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                        // Installed by the other thread: take it as present.
                        self.present.set(p);
                        i += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(UffdRamError::Install {
                            pfn: p,
                            count: run,
                            why: e.to_string(),
                        })
                    }
                };
                if done == 0 {
                    // EAGAIN with nothing copied: the mapping was changing.
                    retries += 1;
                    if retries > MAX_RETRIES {
                        return Err(UffdRamError::Install {
                            pfn: p,
                            count: run,
                            why: "UFFDIO_COPY made no progress".into(),
                        });
                    }
                    continue;
                }
                installed += self.present.set_range(p, done);
                i += done;
            }
        }
        Ok(installed)
    }

    /// Records pages `first..first+n` as zero (the push's zero runs): they
    /// stay holes until a fault on one (filled in place, this may complete
    /// a unit, which is then mapped).
    pub fn note_zero(&self, first: u64, n: u64) -> Result<(), UffdRamError> {
        if self.fills_in_place() {
            self.zeros(first, n)?;
        } else {
            self.zero.set_range(first, n);
        }
        Ok(())
    }

    /// Resolves a fault on `pfn` without the network when it can: the page
    /// is present (woken) or known to be zero (installed as zero).
    pub fn resolve_local(&self, pfn: u64) -> Result<Local, UffdRamError> {
        if self.fills_in_place() {
            return self.resolve_unit(pfn);
        }
        if self.present.get(pfn) {
            self.wake(pfn);
            Ok(Local::Hit)
        } else if self.zero.get(pfn) {
            self.install_zero(pfn)?;
            Ok(Local::Zero)
        } else {
            Ok(Local::Missing)
        }
    }

    /// Pages `first..first+n` answered as zero on the fault connection:
    /// installed as zero pages (filled in place: noted). Returns how many
    /// were new.
    pub fn install_zeros(&self, first: u64, n: u64) -> Result<u64, UffdRamError> {
        if self.fills_in_place() {
            return self.zeros(first, n);
        }
        let mut newly = 0;
        for p in first..first + n {
            newly += u64::from(self.install_zero(p)?);
        }
        Ok(newly)
    }

    /// Resolves a fault on a page known to be zero without data.
    fn install_zero(&self, pfn: u64) -> Result<bool, UffdRamError> {
        if self.present.get(pfn) {
            return Ok(false);
        }
        let (host, _, _) = self.spans(pfn, 1)?[0];
        // SAFETY: `host` is one page of registered guest RAM (see `spans`).
        let r = unsafe {
            self.uffd
                .zeropage(host as *mut libc::c_void, PAGE_SIZE, true)
        };
        match r {
            Ok(_) => Ok(self.present.set(pfn)),
            Err(UffdLibError::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                Ok(self.present.set(pfn))
            }
            Err(e) => Err(UffdRamError::Install {
                pfn,
                count: 1,
                why: e.to_string(),
            }),
        }
    }

    /// Wakes threads blocked on `pfn` (after another thread installed it);
    /// filled in place, on its whole unit.
    pub fn wake(&self, pfn: u64) {
        let (first, n) = self.unit_span(pfn / self.unit);
        if let Ok(host) = self.host_of(first, n) {
            let _ = self
                .uffd
                .wake(host as *mut libc::c_void, n as usize * PAGE_SIZE);
        }
    }

    /// True when every page is present or known to be zero.
    pub fn complete(&self) -> bool {
        self.present.covers_with(&self.zero)
    }

    /// Unregisters all RAM: from now on the VM's memory is ordinary memory,
    /// and zero-known holes read as zero. Wakes any remaining waiters.
    pub fn unregister(&self) -> Result<(), UffdRamError> {
        for r in &self.regions {
            self.uffd
                .unregister(r.host as *mut libc::c_void, r.pages as usize * PAGE_SIZE)
                .map_err(|e| UffdRamError::Setup(format!("unregister: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
