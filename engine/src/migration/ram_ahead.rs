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
//!
//! A destination that does not know the size in advance allocates on the
//! `Hello` instead (`ferry-dest --prealloc hello`, [`RamAhead::make_now`]):
//! the RAM the `Hello` asks for, before the `HelloAck`, while the source
//! still runs the VM and waits for the answer, kept from its peer timeout
//! by the destination's `Ping`s. RAM the host's free memory (or the huge
//! page pool) cannot hold is not allocated ahead: the move then allocates
//! as it goes, as without.
//!
//! A `ferry-dest --daemon --prealloc session` applies the same rule,
//! [`check_room`], to each session's `Hello` before it starts the VM
//! process that would allocate its RAM: one that does not fit gets a VM
//! process that allocates as the move goes. The daemon starts one VM
//! process at a time and each allocates before it listens, so the next
//! `Hello` is weighed against the memory the earlier ones took; what they
//! hold ahead counts against the three quarters too, so that sessions one
//! after another cannot each take three quarters of what is left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::{
    huge_pages_available, memory_available, Backing, GuestRam, MemoryError, HUGE_PAGE_SIZE,
};

/// One guest RAM made ahead, waiting for the move that fits it.
#[derive(Debug, Clone, Default)]
pub struct RamAhead {
    ram: Arc<Mutex<Option<GuestRam>>>,
    taken: Arc<AtomicBool>,
    /// How long [`RamAhead::make_now`] took, once it made RAM.
    made_on_hello: Arc<Mutex<Option<Duration>>>,
}

/// `size` bytes of RAM of `backing`, every page allocated now, and how long
/// the allocation took.
fn allocated(size: u64, backing: Backing) -> Result<(GuestRam, Duration), MemoryError> {
    let mut ram = GuestRam::with_backing(size, backing)?;
    let t = Instant::now();
    ram.allocate_all()?;
    Ok((ram, t.elapsed()))
}

/// What RAM of `backing` the host can allocate now without pushing others
/// out, for a caller that already holds `held` bytes of RAM of `backing`
/// it allocated ahead: three quarters of the available memory counted with
/// that RAM, less that RAM (so all it holds stays within three quarters),
/// or the free pages of the huge page pool.
fn room_for(backing: Backing, held: u64) -> Option<u64> {
    match backing {
        Backing::Shmem => {
            memory_available().map(|b| (b.saturating_add(held) / 4 * 3).saturating_sub(held))
        }
        Backing::HugePages => huge_pages_available().map(|p| p * HUGE_PAGE_SIZE),
    }
}

/// RAM the host has no room to allocate ahead now (see [`check_room`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no room to allocate the guest's {} MiB of RAM ahead: this host has room for {} MiB of {} now",
    .size >> 20,
    .room >> 20,
    match .backing {
        Backing::Shmem => {
            "4 KiB pages (three quarters of its available memory, less RAM allocated ahead \
             before and still held)"
        }
        Backing::HugePages => "2 MiB pages (the free pages of its huge page pool)",
    }
)]
pub struct NoRoom {
    /// The RAM asked for, bytes.
    pub size: u64,
    /// The room there is, bytes.
    pub room: u64,
    /// What the RAM would be made of.
    pub backing: Backing,
}

/// Whether the host has room to allocate `size` bytes of `backing` ahead
/// now: three quarters of its available memory, or the free pages of its
/// huge page pool (a host that does not say has room). The one rule of
/// `--prealloc hello` ([`RamAhead::make_now`]) and of a daemon's
/// `--prealloc session`; RAM that does not fit is not allocated ahead.
/// `held` is RAM of `backing` the caller allocated ahead earlier and still
/// holds (a daemon's running VM processes; 0 for a single move): it counts
/// against the three quarters too, so that sessions one after another
/// cannot each take three quarters of what the last one left.
pub fn check_room(size: u64, backing: Backing, held: u64) -> Result<(), NoRoom> {
    match room_for(backing, held) {
        Some(room) if size > room => Err(NoRoom {
            size,
            room,
            backing,
        }),
        _ => Ok(()),
    }
}

impl RamAhead {
    /// Makes `size` bytes of RAM of `backing` and allocates every page of
    /// it now; returns it and how long the allocation took.
    pub fn make(size: u64, backing: Backing) -> Result<(Self, Duration), MemoryError> {
        let (ram, took) = allocated(size, backing)?;
        Ok((
            Self {
                ram: Arc::new(Mutex::new(Some(ram))),
                ..Self::default()
            },
            took,
        ))
    }

    /// Makes and allocates `size` bytes of `backing` now, for the move
    /// whose `Hello` asked for them, unless RAM of that size and kind is
    /// waiting already or the host has no room for it (`Ok(None)`: the move
    /// then allocates as it goes). Returns how long the allocation took.
    pub fn make_now(&self, size: u64, backing: Backing) -> Result<Option<Duration>, MemoryError> {
        let mut slot = self.ram.lock().unwrap_or_else(|p| p.into_inner());
        if slot
            .as_ref()
            .is_some_and(|r| r.size() == size && r.backing() == backing)
        {
            return Ok(None);
        }
        if let Err(no_room) = check_room(size, backing, 0) {
            tracing::warn!("{no_room}; the move allocates as it goes");
            return Ok(None);
        }
        let (ram, took) = allocated(size, backing)?;
        *slot = Some(ram);
        *self.made_on_hello.lock().unwrap_or_else(|p| p.into_inner()) = Some(took);
        Ok(Some(took))
    }

    /// How long the allocation on the `Hello` took, when one was made.
    pub fn made_on_hello(&self) -> Option<Duration> {
        *self.made_on_hello.lock().unwrap_or_else(|p| p.into_inner())
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

    /// RAM made on the `Hello` is taken by that move; RAM of that size
    /// and kind waiting already is not made again; RAM the host cannot
    /// hold is not made at all.
    #[test]
    fn ram_is_made_on_the_hello_once_and_only_where_it_fits() {
        let ahead = RamAhead::default();
        assert_eq!(ahead.made_on_hello(), None);
        let took = ahead.make_now(16 << 20, Backing::Shmem).unwrap();
        assert!(took.is_some());
        assert_eq!(ahead.made_on_hello(), took);
        assert_eq!(ahead.make_now(16 << 20, Backing::Shmem).unwrap(), None);
        let ram = ahead.take(16 << 20, Backing::Shmem).unwrap();
        assert!(ram.allocated_ahead());
        assert!(ahead.was_taken());

        let huge = RamAhead::default();
        assert_eq!(huge.make_now(1 << 40, Backing::HugePages).unwrap(), None);
        assert!(huge.take(1 << 40, Backing::HugePages).is_none());
        let room = room_for(Backing::Shmem, 0).expect("MemAvailable in /proc/meminfo");
        assert!(room > 0);
        assert_eq!(
            huge.make_now(room + (1 << 30), Backing::Shmem).unwrap(),
            None
        );
        assert_eq!(huge.made_on_hello(), None);
    }

    /// The rule says what does not fit, with both sizes.
    #[test]
    fn check_room_names_the_sizes() {
        let room = room_for(Backing::Shmem, 0).expect("MemAvailable in /proc/meminfo");
        assert_eq!(check_room(16 << 20, Backing::Shmem, 0), Ok(()));
        let size = (room + (1 << 30)) & !((2 << 20) - 1);
        let e = check_room(size, Backing::Shmem, 0).unwrap_err();
        assert_eq!((e.size, e.backing), (size, Backing::Shmem));
        let said = e.to_string();
        assert!(
            said.contains(&format!("{} MiB of RAM ahead", size >> 20)),
            "{said}"
        );
        assert!(said.contains("available memory"), "{said}");
        let huge = check_room(1 << 40, Backing::HugePages, 0).unwrap_err();
        assert!(huge.to_string().contains("huge page pool"), "{huge}");
    }

    /// RAM allocated ahead earlier and still held counts against the
    /// three quarters: half the available memory fits alone, and not
    /// beside twice the available memory held already (the three
    /// quarters of all three leave a quarter of it).
    #[test]
    fn ram_held_ahead_counts_against_the_room() {
        let available = memory_available().expect("MemAvailable in /proc/meminfo");
        let half = (available / 2) & !((2 << 20) - 1);
        assert_eq!(check_room(half, Backing::Shmem, 0), Ok(()));
        let e = check_room(half, Backing::Shmem, 2 * available).unwrap_err();
        assert!(e.room < half, "{e}");
        assert_eq!(room_for(Backing::Shmem, u64::MAX), Some(0));
    }
}
