//! Guest RAM made and allocated before a move, for the VM it will take.
//!
//! Huge-page RAM is filled in place (see `uffd_ram`'s `huge` part), and the
//! first write to a page of hugetlbfs allocates it and zeroes its 2 MiB.
//! Inside a post-copy move that zeroing sits on the critical path: 2G
//! guest, 1.5G working set, pinned, the push took 440 ms with it and 325 ms
//! with the memory file allocated beforehand. Allocating it when the
//! destination starts (`ferry-dest --prealloc SIZE`, QEMU's `-m` with
//! `-mem-prealloc` on the incoming side) moves that cost out of the move:
//! 2 GiB took about 190 ms here. A move whose `Hello` asks for RAM of that
//! size and kind takes it; any other move makes its own, as before.
//!
//! Only huge-page RAM is allocated ahead: its guest mapping is registered
//! for minor faults, so a page of the file that exists but was not
//! received yet still faults. Shared memory in 4 KiB pages is registered
//! for missing faults only, where an allocated page would read as zero.

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
    /// Makes `size` bytes of huge-page RAM and allocates every page of it
    /// now; returns it and how long the allocation took.
    pub fn make(size: u64) -> Result<(Self, Duration), MemoryError> {
        let ram = GuestRam::with_backing(size, Backing::HugePages)?;
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
        let (ahead, _) = RamAhead::make(16 << 20)
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
}
