//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0000  +--------------------------+
//!              | low RAM (unused by boot) |
//! 0x0000_6000  | hvm_start_info           |  START_INFO_ADDR
//! 0x0000_7000  | e820-style memory map    |  MEMMAP_ADDR
//! 0x0000_8000  | 64-bit fallback page tbl |  BOOT_PML4_ADDR (only for the 64-bit entry)
//! 0x0002_0000  | kernel command line      |  CMDLINE_ADDR (up to CMDLINE_MAX)
//! 0x0010_0000  | guest ELF image ...      |  HIMEM_START
//!     ...      | RAM                      |
//! min(mem,3G)  +--------------------------+
//!              | MMIO hole: virtio-mmio   |  VIRTIO_MMIO_BASE (0xfe000000), 4 KiB each
//!              | devices, IOAPIC, LAPIC   |
//! 0x1_0000_0000+--------------------------+
//!              | RAM above 4 GiB          |  when mem > 3 GiB
//!              +--------------------------+
//! ```
//!
//! All RAM lives in one memfd; the region above 4 GiB starts at file offset
//! `LOW_RAM_MAX`, so file offset and guest address agree below the hole.

/// Size of a guest page, the unit of every memory transfer.
pub const PAGE_SIZE: usize = 4096;
/// Where `hvm_start_info` is written.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where the PVH memory map table is written.
pub const MEMMAP_ADDR: u64 = 0x7000;
/// Where the kernel command line is written.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted, including the NUL terminator.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// First address above the legacy area; the ELF is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below the MMIO hole ends here at most.
pub const LOW_RAM_MAX: u64 = 3 << 30;
/// RAM that does not fit below the hole continues here.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Base of the IOAPIC MMIO window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Base of the local APIC MMIO window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The first virtio-mmio device's registers; device `i` is at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`, interrupt GSI
/// `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_MMIO_BASE: u64 = 0xfe00_0000;
/// Bytes of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices a VM may have.
pub const MAX_VIRTIO_DEVICES: usize = 8;
/// GSI (IOAPIC pin) of the first virtio-mmio device.
pub const VIRTIO_FIRST_GSI: u32 = 10;
/// KVM needs three pages for the TSS below 4 GiB, inside the MMIO hole.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Smallest guest accepted: room for boot structures, the image and a working set.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest accepted (a sanity bound, far above this machine's 24 GiB).
pub const MAX_MEM: u64 = 1 << 40;

/// Most vCPUs a Ferry VM may have: the one limit that building a VM
/// ([`crate::vm`]), decoding a state blob ([`crate::state::codec`]) and
/// admitting a move's `Hello` (`migration::admission`) all apply, so a
/// state or `Hello` this VMM cannot run is refused when it is read, not
/// when the VM is built. (KVM on a host may allow fewer.)
pub const MAX_VCPUS: u32 = 8;

/// True when `vcpus` is a vCPU count a Ferry VM can have: 1 to
/// [`MAX_VCPUS`].
pub fn valid_vcpus(vcpus: u32) -> bool {
    (1..=MAX_VCPUS).contains(&vcpus)
}

/// True when `size` is a usable guest RAM size: whole pages, within bounds.
pub fn valid_mem_size(size: u64) -> bool {
    size.is_multiple_of(PAGE_SIZE as u64) && (MIN_MEM..=MAX_MEM).contains(&size)
}

/// One contiguous range of guest RAM and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub len: u64,
    /// Offset of the first byte in the memory file.
    pub file_offset: u64,
}

impl RamRange {
    /// One past the last guest address of this range.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.len
    }
}

/// Splits `mem_size` bytes of RAM around the MMIO hole, in guest-address
/// order, which is also file order (the ranges lie back to back in the file).
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(LOW_RAM_MAX);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        len: low,
        file_offset: 0,
    }];
    if mem_size > LOW_RAM_MAX {
        ranges.push(RamRange {
            guest_addr: HIGH_RAM_START,
            len: mem_size - LOW_RAM_MAX,
            file_offset: LOW_RAM_MAX,
        });
    }
    ranges
}

/// Maps a guest page frame number to its page index in the memory file, if
/// the frame is RAM.
pub fn gpa_to_file_offset(ranges: &[RamRange], gpa: u64) -> Option<u64> {
    ranges
        .iter()
        .find(|r| gpa >= r.guest_addr && gpa < r.end())
        .map(|r| r.file_offset + (gpa - r.guest_addr))
}

/// Maps an offset in the memory file back to the guest physical address.
pub fn file_offset_to_gpa(ranges: &[RamRange], offset: u64) -> Option<u64> {
    ranges
        .iter()
        .find(|r| offset >= r.file_offset && offset < r.file_offset + r.len)
        .map(|r| r.guest_addr + (offset - r.file_offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        let r = ram_ranges(256 << 20);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].end(), 256 << 20);
    }

    #[test]
    fn big_guest_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), LOW_RAM_MAX);
        assert_eq!(r[1].guest_addr, HIGH_RAM_START);
        assert_eq!(r[1].len, 1 << 30);
        assert_eq!(
            gpa_to_file_offset(&r, HIGH_RAM_START + 4096),
            Some(LOW_RAM_MAX + 4096)
        );
        assert_eq!(gpa_to_file_offset(&r, LAPIC_ADDR), None);
        assert_eq!(file_offset_to_gpa(&r, LOW_RAM_MAX), Some(HIGH_RAM_START));
    }
}
