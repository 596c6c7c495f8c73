//! What every device model does the same way with its virtqueues and its
//! config space: take the next chain the guest made available, return a
//! chain through the used ring, and read config bytes at any offset.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// The next chain the guest made available on `queue`: its head index
/// and its descriptors (as far as they could be read: a chain cut short
/// ends on a descriptor that still says NEXT). `Ok(None)` when there is
/// none; `Err` says why the avail ring cannot be read.
pub(super) fn next_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Vec<Descriptor>)>, String> {
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => return Err(format!("avail ring: {e}")),
    };
    Ok(chain.map(|c| (c.head_index(), c.collect())))
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
