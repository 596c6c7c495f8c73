//! Guest RAM: one memfd, mapped `MAP_SHARED` through vm-memory.
//!
//! Backing RAM with a memfd lets another thread or process (the page server,
//! a snapshot writer) read the guest's pages with plain `pread` on the file,
//! and lets the destination install pages without touching the mapping.
//!
//! The memfd holds either ordinary shared memory ([`Backing::Shmem`], the
//! default) or 2 MiB pages from the kernel's huge page pool
//! ([`Backing::HugePages`], `/proc/sys/vm/nr_hugepages`). Pool pages stay
//! with the pool when a VM frees them, so on a host that hands freed memory
//! back to its own hypervisor (free page reporting, as on this one) they are
//! still backed when the next VM touches them; a fresh 4 KiB page may not be,
//! and its first write then costs a fault in the outer hypervisor (measured
//! here: 0.22-0.34 GB/s for memory freed seconds before, against 20 GB/s for
//! pool pages). hugetlbfs has no `write(2)`, so writes to such RAM go through
//! the mapping.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{self, RamRange, PAGE_SIZE};

/// Errors from creating or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("guest memory size {0} bytes is invalid: it must be a multiple of 4 KiB between 16 MiB and 1 TiB")]
    InvalidSize(u64),
    /// Huge pages need a size in whole 2 MiB pages.
    #[error("guest memory size {0} bytes is not a multiple of 2 MiB, which huge pages need")]
    HugeSize(u64),
    /// The huge page pool is too small.
    #[error("the guest needs {need} free 2 MiB huge pages and the pool has {free}: raise /proc/sys/vm/nr_hugepages (scripts/setup.sh reserves some)")]
    HugePool {
        /// Pages the guest needs.
        need: u64,
        /// Pages free and not reserved.
        free: u64,
    },
    /// memfd creation or sizing failed.
    #[error("cannot create the guest memory file: {0}")]
    CreateFile(#[source] std::io::Error),
    /// vm-memory could not map the file.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// A read or write of the memory file failed.
    #[error("guest memory I/O at file offset {offset:#x} failed: {source}")]
    Io {
        /// File offset of the access.
        offset: u64,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// An access would run past the end of guest RAM.
    #[error("guest memory access at file offset {offset:#x}, {len} bytes, is outside the {size}-byte RAM")]
    OutOfRange {
        /// File offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of RAM.
        size: u64,
    },
}

/// What guest RAM's memory file is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Ordinary shared memory in 4 KiB pages.
    #[default]
    Shmem,
    /// 2 MiB pages from the huge page pool (`MFD_HUGETLB`).
    HugePages,
}

/// Bytes in one huge page of [`Backing::HugePages`].
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// 4 KiB pages in one huge page.
pub const HUGE_PAGE_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE as u64;

/// Guest RAM of one VM.
#[derive(Debug, Clone)]
pub struct GuestRam {
    file: Arc<File>,
    mem: GuestMemoryMmap,
    ranges: Vec<RamRange>,
    size: u64,
    backing: Backing,
    /// A second mapping of the memory file whose pages were all allocated
    /// and mapped ahead ([`GuestRam::allocate_all`]).
    alias_ahead: Option<GuestMemoryMmap>,
}

/// Reserves the pool pages for all of hugetlbfs `file` (`size` bytes):
/// one shared mapping of it without `MAP_NORESERVE` (vm-memory maps with
/// it), unmapped at once. A shared mapping's reservation belongs to the
/// file, so it outlives the mapping: from here on every page of the file
/// is guaranteed, and a pool that cannot hold the guest is an error now,
/// not a `SIGBUS` or a failed install in the middle of a move.
fn reserve_huge_pages(file: &File, size: u64) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    // SAFETY: a new mapping of the whole file at an address the kernel
    // picks; nothing else refers to it, and it is unmapped below without
    // ever being touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENOMEM) {
            MemoryError::HugePool {
                need: size / HUGE_PAGE_SIZE,
                free: huge_pages_available().unwrap_or(0),
            }
        } else {
            MemoryError::CreateFile(e)
        });
    }
    // SAFETY: `addr..addr + size` is exactly the mapping made above.
    unsafe { libc::munmap(addr, size as usize) };
    Ok(())
}

/// The number of field `name` (with its colon) in /proc/meminfo's text
/// `info`: kB for sizes, a count for the huge page fields.
fn meminfo_field(info: &str, name: &str) -> Option<u64> {
    let v = info.lines().find_map(|l| l.strip_prefix(name))?.trim();
    v.strip_suffix("kB").unwrap_or(v).trim().parse().ok()
}

/// Free 2 MiB pages in the pool that no mapping has reserved yet (what a
/// new file of huge pages can still have), from /proc/meminfo.
pub fn huge_pages_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name| meminfo_field(&info, name);
    Some(field("HugePages_Free:")?.saturating_sub(field("HugePages_Rsvd:")?))
}

/// Bytes the host can still give without reclaiming (`MemAvailable` in
/// /proc/meminfo), or `None` when the kernel does not say.
pub fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&info, "MemAvailable:")?.checked_mul(1024)
}

impl Backing {
    /// 2 MiB pages when `huge_pages` (`--huge-pages`), else shared memory.
    pub fn of_huge_pages(huge_pages: bool) -> Self {
        if huge_pages {
            Backing::HugePages
        } else {
            Backing::Shmem
        }
    }
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM in an anonymous memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_backing(size, Backing::Shmem)
    }

    /// Creates `size` bytes of zeroed guest RAM in an anonymous memfd of
    /// the given backing. Huge pages need `size` to be a multiple of 2 MiB
    /// and that many free pages in the pool, which are reserved here for
    /// the file; both are checked, with errors that say what is missing.
    pub fn with_backing(size: u64, backing: Backing) -> Result<Self, MemoryError> {
        if !layout::valid_mem_size(size) {
            return Err(MemoryError::InvalidSize(size));
        }
        let mut flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        if backing == Backing::HugePages {
            if !size.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(MemoryError::HugeSize(size));
            }
            flags |=
                nix::sys::memfd::MFdFlags::MFD_HUGETLB | nix::sys::memfd::MFdFlags::MFD_HUGE_2MB;
        }
        let fd = nix::sys::memfd::memfd_create(c"ferry-guest-ram", flags)
            .map_err(|e| MemoryError::CreateFile(e.into()))?;
        let file = File::from(fd);
        if backing == Backing::HugePages {
            file.set_len(size).map_err(MemoryError::CreateFile)?;
            reserve_huge_pages(&file, size)?;
        }
        Self::from_file(file, size, backing)
    }

    /// Creates `size` bytes of zeroed guest RAM in a new file at `path`
    /// (tmpfs or hugetlbfs), which outlives this process: after a crash the
    /// memory is still there to be served. An existing file is refused.
    pub fn in_file(size: u64, path: &std::path::Path) -> Result<Self, MemoryError> {
        if !layout::valid_mem_size(size) {
            return Err(MemoryError::InvalidSize(size));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(MemoryError::CreateFile)?;
        Self::from_file(file, size, Backing::Shmem)
    }

    fn from_file(file: File, size: u64, backing: Backing) -> Result<Self, MemoryError> {
        file.set_len(size).map_err(MemoryError::CreateFile)?;
        let file = Arc::new(file);
        let ranges = layout::ram_ranges(size);
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges.iter().map(|r| {
            (
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            )
        }))?;
        Ok(Self {
            file,
            mem,
            ranges,
            size,
            backing,
            alias_ahead: None,
        })
    }

    /// A second mapping of the memory file, with the same guest addresses
    /// as [`GuestRam::guest_memory`] at other host addresses: a write
    /// through it reaches the guest's pages without touching the guest's
    /// own mapping (nor a userfaultfd registered on it). For RAM allocated
    /// ahead, the mapping made then, whose pages are mapped already.
    pub fn alias(&self) -> Result<GuestMemoryMmap, MemoryError> {
        if let Some(alias) = &self.alias_ahead {
            return Ok(alias.clone());
        }
        Ok(GuestMemoryMmap::from_ranges_with_files(
            self.ranges.iter().map(|r| {
                (
                    GuestAddress(r.guest_addr),
                    r.len as usize,
                    Some(FileOffset::from_arc(self.file.clone(), r.file_offset)),
                )
            }),
        )?)
    }

    /// Allocates every page of the memory file now (zeroed) and maps them
    /// all in a second mapping ([`GuestRam::alias`]), so that no later
    /// write through it pays for a page or a page fault (see
    /// `migration::ram_ahead`). The guest's own mapping is left alone: its
    /// pages fault on first touch, which a userfaultfd registered for
    /// minor faults catches.
    pub fn allocate_all(&mut self) -> Result<(), MemoryError> {
        let io = |offset: u64, e: std::io::Error| MemoryError::Io { offset, source: e };
        nix::fcntl::fallocate(
            &*self.file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            self.size as i64,
        )
        .map_err(|e| io(0, e.into()))?;
        let alias = self.alias()?;
        for r in &self.ranges {
            let host = alias
                .get_host_address(GuestAddress(r.guest_addr))
                .map_err(|e| io(r.file_offset, std::io::Error::other(e.to_string())))?;
            let host = std::ptr::NonNull::new(host.cast::<libc::c_void>())
                .ok_or_else(|| io(r.file_offset, std::io::Error::other("null mapping")))?;
            // SAFETY: `host..host + r.len` is one range of `alias`, a live
            // shared mapping of the memory file that this function owns;
            // MADV_POPULATE_WRITE only faults its pages in (they were
            // allocated above and hold zeros), changing no byte.
            unsafe {
                nix::sys::mman::madvise(
                    host,
                    r.len as usize,
                    nix::sys::mman::MmapAdvise::MADV_POPULATE_WRITE,
                )
            }
            .map_err(|e| io(r.file_offset, e.into()))?;
        }
        self.alias_ahead = Some(alias);
        Ok(())
    }

    /// True when every page was allocated ahead ([`GuestRam::allocate_all`]).
    pub fn allocated_ahead(&self) -> bool {
        self.alias_ahead.is_some()
    }

    /// What the memory file is made of.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The vm-memory view, for loaders and KVM slot registration.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The RAM ranges around the MMIO hole.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes (also the memory file's length).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// The memory file itself, e.g. to hand to a page server.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads RAM at a memory-file offset.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| MemoryError::Io { offset, source })
    }

    /// Writes RAM at a memory-file offset (through the file; huge pages,
    /// which hugetlbfs cannot `write(2)`, through the mapping).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.check(offset, buf.len())?;
        if self.backing == Backing::HugePages {
            return self.write_mapped(offset, buf);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| MemoryError::Io { offset, source })
    }

    /// Writes through the mapping, range by range.
    fn write_mapped(&self, offset: u64, mut buf: &[u8]) -> Result<(), MemoryError> {
        let mut off = offset;
        while !buf.is_empty() {
            let r = self
                .ranges
                .iter()
                .find(|r| off >= r.file_offset && off < r.file_offset + r.len)
                .ok_or(MemoryError::OutOfRange {
                    offset: off,
                    len: buf.len() as u64,
                    size: self.size,
                })?;
            let n = ((r.file_offset + r.len - off) as usize).min(buf.len());
            let at = GuestAddress(r.guest_addr + (off - r.file_offset));
            self.mem
                .write_slice(&buf[..n], at)
                .map_err(|e| MemoryError::Io {
                    offset: off,
                    source: std::io::Error::other(e.to_string()),
                })?;
            buf = &buf[n..];
            off += n as u64;
        }
        Ok(())
    }

    /// Drops pages from the memory file: they read as zero afterwards, and
    /// fault again under userfaultfd. Huge-page RAM can only drop whole
    /// 2 MiB pages; a smaller part is zeroed in place instead.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.check(offset, len as usize)?;
        let huge = HUGE_PAGE_SIZE;
        if self.backing == Backing::HugePages
            && !(offset.is_multiple_of(huge) && len.is_multiple_of(huge))
        {
            let zeros = vec![0u8; PAGE_SIZE * 64];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                self.write_mapped(offset + done, &zeros[..n as usize])?;
                done += n;
            }
            return Ok(());
        }
        nix::fcntl::fallocate(
            &*self.file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map_err(|e| MemoryError::Io {
            offset,
            source: e.into(),
        })
    }
}

/// True when every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new(4095),
            Err(MemoryError::InvalidSize(_))
        ));
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::InvalidSize(_))
        ));
    }

    #[test]
    fn reads_back_and_bounds_checks() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write_at(8192, b"ferry").unwrap();
        let mut b = [0u8; 5];
        ram.read_at(8192, &mut b).unwrap();
        assert_eq!(&b, b"ferry");
        assert!(ram.read_at((16 << 20) - 2, &mut b).is_err());
        assert!(ram.read_at(u64::MAX - 1, &mut b).is_err());
    }

    #[test]
    fn discarded_pages_read_as_zero() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write_at(4096, &[7u8; 8192]).unwrap();
        ram.discard(4096, 4096).unwrap();
        let mut b = vec![1u8; 8192];
        ram.read_at(4096, &mut b).unwrap();
        assert!(is_zero(&b[..4096]) && b[4096..].iter().all(|&x| x == 7));
        assert!(ram.discard(16 << 20, 4096).is_err());
    }

    /// Reserved 2 MiB pages in the pool, from /proc/meminfo.
    fn huge_reserved() -> u64 {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap();
        meminfo_field(&info, "HugePages_Rsvd:").unwrap()
    }

    #[test]
    fn meminfo_fields_are_read_with_or_without_a_unit() {
        let info = "MemTotal:       24576000 kB\nMemAvailable:   20000000 kB\n\
                    HugePages_Total:    1024\nHugePages_Rsvd:        8\n";
        assert_eq!(meminfo_field(info, "MemAvailable:"), Some(20_000_000));
        assert_eq!(meminfo_field(info, "HugePages_Rsvd:"), Some(8));
        assert_eq!(meminfo_field(info, "HugePages_Free:"), None);
        assert!(memory_available().is_some_and(|b| b > 0));
    }

    /// Needs 8 free pages in the pool (scripts/setup.sh reserves them).
    #[test]
    fn huge_page_ram_is_reserved_whole_and_written_through_the_mapping() {
        let before = huge_reserved();
        let ram = GuestRam::with_backing(16 << 20, Backing::HugePages)
            .expect("16 MiB of huge pages (run scripts/setup.sh for a pool)");
        assert_eq!(ram.backing(), Backing::HugePages);
        // All 8 pages are the file's before any is touched (other tests may
        // reserve too, so at least 8 more).
        assert!(huge_reserved() >= before + 8);
        ram.write_at((2 << 20) - 3, b"ferry").unwrap();
        let mut b = [0u8; 5];
        ram.read_at((2 << 20) - 3, &mut b).unwrap();
        assert_eq!(&b, b"ferry");
        // A part of a huge page is zeroed in place; whole ones are punched.
        ram.write_at(4 << 20, &[7u8; 3 * 4096]).unwrap();
        ram.discard((4 << 20) + 4096, 4096).unwrap();
        let mut p = vec![1u8; 3 * 4096];
        ram.read_at(4 << 20, &mut p).unwrap();
        assert!(p[..4096].iter().all(|&x| x == 7) && is_zero(&p[4096..8192]));
        assert!(p[8192..].iter().all(|&x| x == 7));
        ram.discard(4 << 20, 2 << 20).unwrap();
        ram.read_at(4 << 20, &mut p).unwrap();
        assert!(is_zero(&p));
        assert!(matches!(
            GuestRam::with_backing((16 << 20) + 4096, Backing::HugePages),
            Err(MemoryError::HugeSize(_))
        ));
        assert!(matches!(
            GuestRam::with_backing(1 << 40, Backing::HugePages),
            Err(MemoryError::HugePool { need: 524288, .. })
        ));
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(!is_zero(&p[1..]));
    }
}
