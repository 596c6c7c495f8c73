//! What every device model does the same way with its virtqueues and its
//! config space: take the next chain the guest made available, return a
//! chain through the used ring, and read config bytes at any offset.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// The next chain the guest made available on `queue`: its head index
/// and its descriptors (as far as they could be read: a chain cut short
/// ends on a descriptor that still says NEXT). At most the queue's size of
/// descriptors are read: a longer chain (only an indirect table, which no
/// device here offers, can make one) is cut short there, so a chain costs
/// at most `16 x size` bytes and `size` descriptor reads. `Ok(None)` when
/// there is none; `Err` says why the avail ring cannot be read.
pub(super) fn next_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Vec<Descriptor>)>, String> {
    let limit = usize::from(queue.size());
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => return Err(format!("avail ring: {e}")),
    };
    match chain {
        Some(c) => Ok(Some((c.head_index(), c.take(limit).collect()))),
        None => {
            // virtio-queue's iterator also ends, without a word, on an
            // avail ring entry it cannot read (a ring that runs out of
            // guest RAM after its `idx`): that queue can never be served.
            let slot = queue.next_avail() % queue.size().max(1);
            let entry = queue
                .avail_ring()
                .checked_add(4 + 2 * u64::from(slot))
                .map(GuestAddress);
            if !entry.is_some_and(|a| mem.check_range(a, 2, Permissions::Read)) {
                return Err(format!(
                    "avail ring entry {slot} (ring at {:#x}, size {}) is not in guest RAM",
                    queue.avail_ring(),
                    queue.size()
                ));
            }
            Ok(None)
        }
    }
}

/// Puts chain `head` in the used ring with `len` bytes written to it;
/// `Err` says why it cannot be returned.
pub(super) fn return_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), String> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| format!("cannot return descriptor {head}: {e}"))
}

/// Fills `data` with the bytes of `config` from `offset` on; bytes past
/// its end (or an offset that overflows) read as zero.
pub(super) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(size: u16, avail: u64) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        (mem, q)
    }

    fn desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    #[test]
    fn a_looping_indirect_table_is_read_only_up_to_the_queue_size() {
        // Head 0 is an indirect table of 65535 descriptors whose first two
        // point at each other: virtio-queue follows the loop for 65535
        // steps (a 1 MiB vector per chain before the cut).
        let (mem, mut q) = setup(16, AVAIL);
        let table = 0x8000;
        desc(&mem, DESC, table, 16 * 0xffff, 4, 0);
        desc(&mem, table, 0x9000, 0, 1, 1);
        desc(&mem, table + 16, 0x9000, 0, 1, 0);
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let (head, descs) = next_chain(&mut q, &mem).unwrap().unwrap();
        assert_eq!(head, 0);
        assert_eq!(descs.len(), 16);
        assert!(descs.last().unwrap().has_next(), "cut short: broken");
        assert!(next_chain(&mut q, &mem).unwrap().is_none());
    }

    #[test]
    fn an_avail_ring_running_out_of_guest_ram_is_an_error_not_a_stall() {
        // The ring's `idx` is the last two bytes of RAM; its entries are
        // beyond. virtio-queue's iterator just ends there.
        let (mem, mut q) = setup(16, (1 << 16) - 4);
        mem.write_obj(1u16, GuestAddress((1 << 16) - 2)).unwrap();
        let e = next_chain(&mut q, &mem).unwrap_err();
        assert!(e.contains("avail ring entry 0"), "{e}");
        // A ring in RAM with nothing available is just empty.
        let (mem, mut q) = setup(16, AVAIL);
        assert!(next_chain(&mut q, &mem).unwrap().is_none());
    }

    #[test]
    fn config_bytes_past_the_end_read_as_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
