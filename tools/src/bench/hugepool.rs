//! Warming the huge page pool before a `--huge-pages` matrix.
//!
//! A page of the pool that was never used since the pool was reserved may
//! not be backed yet by the host's own hypervisor (here, a nested guest
//! with free page reporting): its first write faults there, at 0.22-0.34
//! GB/s. After that it stays backed, because the pool keeps its pages. So
//! the first run that touches a fresh pool page pays a one-off cost that no
//! later run pays: 2G/1.5G post-copy took 2017 ms on fresh pool pages and
//! 622-760 ms on warm ones. The bench allocates every free pool page once,
//! which is what a host that reserves its pool at boot has done long before
//! any migration, and says how long it took.

use std::time::{Duration, Instant};

use ferry_engine::memory::{huge_pages_available, HUGE_PAGE_SIZE};

/// Allocates (and so zeroes) every free 2 MiB page of the pool that no
/// mapping has reserved, once, then frees them; returns how many there were
/// and how long it took.
pub fn warm() -> Result<(u64, Duration), String> {
    let pages = huge_pages_available().ok_or("no HugePages_Free in /proc/meminfo")?;
    if pages == 0 {
        return Err("the huge page pool is empty: raise /proc/sys/vm/nr_hugepages".into());
    }
    let t = Instant::now();
    let fd = nix::sys::memfd::memfd_create(
        c"ferry-bench-warm",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC
            | nix::sys::memfd::MFdFlags::MFD_HUGETLB
            | nix::sys::memfd::MFdFlags::MFD_HUGE_2MB,
    )
    .map_err(|e| format!("memfd_create(MFD_HUGETLB): {e}"))?;
    let len = (pages * HUGE_PAGE_SIZE) as i64;
    nix::fcntl::fallocate(&fd, nix::fcntl::FallocateFlags::empty(), 0, len)
        .map_err(|e| format!("allocating {pages} huge pages: {e}"))?;
    Ok((pages, t.elapsed()))
}
