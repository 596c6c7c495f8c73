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
