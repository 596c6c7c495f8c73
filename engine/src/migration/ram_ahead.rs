//! Guest RAM made and allocated before a move, for the VM it will take.
//!
//! Post-copy into RAM allocated ahead writes each page in place, into the
//! memory file through a second mapping, and maps it into the guest's
//! with `UFFDIO_CONTINUE` (see `uffd_ram`'s `units` part). Without it, the
//! first write to each page allocates and zeroes it inside the move:
//!
//! - 2 MiB pages: 2G guest, 1.5G working set, pinned, the push took 440 ms
//!   with the zeroing and 325 ms with the memory file allocated ahead;
//! - 4 KiB pages of shared memory, which RAM not allocated ahead fills
//!   with `UFFDIO_COPY`: that ran at 0.6-0.7 GB/s here into fresh pages
//!   (this host hands freed memory back to its own hypervisor), against
//!   10-11 GB/s for a copy into pages allocated ahead plus
//!   `UFFDIO_CONTINUE` at 12-14 GB/s (1.5 GiB in 64-256 KiB calls).
//!
//! Allocating when the destination starts (`ferry-dest --prealloc SIZE`,
//! QEMU's `-m` with `-mem-prealloc` on the incoming side) moves that cost
//! out of the move: 2 GiB took about 190 ms in 2 MiB pages, and 1.3-1.9 s
//! in 4 KiB pages (allocating, then mapping every page in the second
//! mapping). A post-copy, pre-copy or stop-and-copy move whose `Hello`
//! asks for RAM of that size and kind takes it; any other move (hybrid,
//! which drops single stale pages) makes its own, as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::{Backing, GuestRam, MemoryError};

/// One guest RAM made ahead, waiting for the move that fits it.
#[derive(Debug, Clone, Default)]
pub struct RamAhead {
    ram: Arc<Mutex<Option<GuestRam>>>,
    taken: Arc<AtomicBool>,
}

impl RamAhead {
    /// Makes `size` bytes of RAM of `backing` and allocates every page of
    /// it now; returns it and how long the allocation took.
    pub fn make(size: u64, backing: Backing) -> Result<(Self, Duration), MemoryError> {
        let mut ram = GuestRam::with_backing(size, backing)?;
        let t = Instant::now();
        ram.allocate_all()?;
        let took = t.elapsed();
        Ok((
            Self {
                ram: Arc::new(Mutex::new(Some(ram))),
                taken: Arc::default(),
            },
            took,
        ))
    }

    /// The RAM made ahead, when it is `size` bytes of `backing` (once).
    pub fn take(&self, size: u64, backing: Backing) -> Option<GuestRam> {
        let mut slot = self.ram.lock().unwrap_or_else(|p| p.into_inner());
        if !slot
            .as_ref()
            .is_some_and(|r| r.size() == size && r.backing() == backing)
        {
            return None;
        }
        self.taken.store(true, Ordering::Release);
        slot.take()
    }

    /// True once a move took the RAM.
    pub fn was_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs 8 free pages in the pool (scripts/setup.sh reserves them).
    #[test]
    fn only_a_move_of_its_size_and_kind_takes_it_once() {
        let (ahead, _) = RamAhead::make(16 << 20, Backing::HugePages)
            .expect("16 MiB of huge pages (run scripts/setup.sh for a pool)");
        assert!(ahead.take(32 << 20, Backing::HugePages).is_none());
        assert!(ahead.take(16 << 20, Backing::Shmem).is_none());
        assert!(!ahead.was_taken());
        let ram = ahead.take(16 << 20, Backing::HugePages).unwrap();
        assert_eq!(ram.size(), 16 << 20);
        // A page allocated ahead reads as zero.
        let mut page = [1u8; 4096];
        ram.read_at((8 << 20) + 4096, &mut page).unwrap();
        assert!(crate::memory::is_zero(&page));
        assert!(ahead.was_taken());
        assert!(ahead.take(16 << 20, Backing::HugePages).is_none());
    }

    #[test]
    fn shared_memory_is_allocated_ahead_too() {
        let (ahead, _) = RamAhead::make(16 << 20, Backing::Shmem).unwrap();
        assert!(ahead.take(16 << 20, Backing::HugePages).is_none());
        let ram = ahead.take(16 << 20, Backing::Shmem).unwrap();
        assert!(ram.allocated_ahead());
        // Every page of the file exists (no hole is left) and reads as zero.
        let blocks = nix::sys::stat::fstat(&**ram.file()).unwrap().st_blocks as u64;
        assert!(blocks * 512 >= 16 << 20, "{blocks} blocks allocated");
        let mut page = [1u8; 4096];
        ram.read_at(5 << 20, &mut page).unwrap();
        assert!(crate::memory::is_zero(&page));
    }
}
