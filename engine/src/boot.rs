//! PVH boot: load an ELF with linux-loader, write `hvm_start_info`, the memory
//! map and the command line, and compute the vCPUs' entry state.
//!
//! This is the path a Linux `vmlinux` takes too. Every vCPU (not just the
//! BSP) starts at the entry; the guest tells them apart by APIC ID.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, MEMMAP_ADDR, START_INFO_ADDR};
use crate::memory::GuestRam;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// Where a minimal GDT is placed, so the hidden segment state matches memory.
const BOOT_GDT_ADDR: u64 = 0x500;
/// Page tables for the 64-bit entry: PML4, PDPT, PD (identity map of 1 GiB).
const BOOT_PML4_ADDR: u64 = 0x8000;
const BOOT_PDPT_ADDR: u64 = 0x9000;
const BOOT_PD_ADDR: u64 = 0xa000;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors from loading and configuring the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The ELF could not be loaded.
    #[error("cannot load the guest ELF: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// The command line is too long or has bad characters.
    #[error("invalid guest command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing boot structures failed.
    #[error("cannot write the PVH boot structures: {0}")]
    Configure(#[from] linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// How the vCPUs enter the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = start_info.
    Pvh32(u64),
    /// Fallback for ELFs without a PVH note: 64-bit long mode with an
    /// identity map of the first GiB, RBX = start_info.
    Long64(u64),
}

/// What the boot left for the vCPUs.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Where and how to enter.
    pub entry: BootEntry,
    /// One past the last byte of the loaded image.
    pub image_end: u64,
}

/// Loads `elf` into `ram`, and writes the PVH start_info, memory map and
/// command line.
pub fn load_pvh(ram: &GuestRam, elf: &[u8], cmdline: &str) -> Result<BootInfo, BootError> {
    let mem = ram.guest_memory();
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(HIMEM_START)),
    )?;

    let mut cl = Cmdline::new(CMDLINE_MAX)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)?;

    let memmap: Vec<hvm_memmap_table_entry> = ram
        .ranges()
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.guest_addr,
            size: r.len,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, mem)?;

    write_boot_gdt(ram)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh32(addr.0),
        _ => {
            write_identity_map(ram)?;
            BootEntry::Long64(loaded.kernel_load.0)
        }
    };
    Ok(BootInfo {
        entry,
        image_end: loaded.kernel_end,
    })
}

/// GDT: null, 32-bit code, data, TSS, 64-bit code.
const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
    0x00af_9b00_0000_ffff,
];
const CODE32_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;
const CODE64_SEL: u16 = 0x20;

fn write_boot_gdt(ram: &GuestRam) -> Result<(), BootError> {
    for (i, d) in GDT.iter().enumerate() {
        ram.guest_memory()
            .write_obj(*d, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

fn write_identity_map(ram: &GuestRam) -> Result<(), BootError> {
    let mem = ram.guest_memory();
    mem.write_obj(BOOT_PDPT_ADDR | 0x3, GuestAddress(BOOT_PML4_ADDR))?;
    mem.write_obj(BOOT_PD_ADDR | 0x3, GuestAddress(BOOT_PDPT_ADDR))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(BOOT_PD_ADDR + i * 8))?;
    }
    Ok(())
}

fn segment(selector: u16, flags: u16) -> kvm_segment {
    // `flags` packs the descriptor's access byte and G/DB/L bits as in the GDT.
    let access = flags & 0xff;
    kvm_segment {
        base: 0,
        limit: if selector == TSS_SEL {
            0x67
        } else {
            0xffff_ffff
        },
        selector,
        type_: (access & 0xf) as u8,
        present: ((access >> 7) & 1) as u8,
        dpl: ((access >> 5) & 3) as u8,
        s: ((access >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        db: ((flags >> 14) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the entry register state of one vCPU on top of KVM's reset state.
pub fn entry_registers(entry: BootEntry, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    let data = segment(DATA_SEL, 0xc093);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SEL, 0x008b);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    *regs = kvm_regs {
        rflags: 0x2,
        rbx: START_INFO_ADDR,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh32(ip) => {
            sregs.cs = segment(CODE32_SEL, 0xc09b);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = ip;
        }
        BootEntry::Long64(ip) => {
            sregs.cs = segment(CODE64_SEL, 0xa09b);
            sregs.cr3 = BOOT_PML4_ADDR;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = ip;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_like_the_gdt() {
        let cs = segment(CODE32_SEL, 0xc09b);
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.db, cs.g, cs.l),
            (0xb, 1, 1, 1, 1, 0)
        );
        let cs64 = segment(CODE64_SEL, 0xa09b);
        assert_eq!((cs64.l, cs64.db), (1, 0));
        assert_eq!(segment(TSS_SEL, 0x8b).limit, 0x67);
    }
}
