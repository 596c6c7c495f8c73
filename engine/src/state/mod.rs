//! The complete state of a paused VM, apart from its memory.
//!
//! [`MachineState`] is what a snapshot stores and what a migration sends
//! ahead of the pages: a few kilobytes per vCPU. Capture and restore follow
//! strict ordering rules, written down next to the code that obeys them in
//! [`vcpu`] and [`vm`]; [`codec`] turns the state into a versioned,
//! checksummed, self-describing blob.

pub mod codec;
mod devices_codec;
pub mod vcpu;
pub mod vm;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vm_superio::serial::SerialState;

pub use crate::devices::DiskConfig;
pub use virtio_queue::QueueState;

pub use codec::{decode, encode, CodecError, STATE_FORMAT_VERSION};

/// Facts about the machine the state belongs to; a restore target must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineMeta {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The guest's TSC frequency, which the destination must provide too.
    pub tsc_khz: u32,
}

/// Architectural state of one vCPU, in KVM's structures.
pub struct VcpuState {
    /// CPUID as read back with KVM_GET_CPUID2.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state in the legacy 4 KiB XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers, from KVM_GET_MSR_INDEX_LIST.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            cpuid: self.cpuid.clone(),
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave ends in a flexible array member and so is not
            // `Clone`; the fixed 4 KiB region is all this VM ever uses.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

/// VM-wide in-kernel device and clock state.
#[derive(Clone)]
pub struct VmState {
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock's base.
    pub clock: kvm_clock_data,
    /// The master i8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave i8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// State of the VMM's own (userspace) devices.
#[derive(Clone, Default)]
pub struct DeviceState {
    /// COM1.
    pub serial: SerialState,
    /// The bytes of the console line COM1's output had begun but not
    /// finished (never output by the VM they were saved from), shorter
    /// than [`crate::console::MAX_LINE`] and without line ends.
    pub serial_line: Vec<u8>,
    /// The virtio-mmio devices, in slot order (slot `i` is at
    /// [`crate::devices::mmio_base`]`(i)`). Since state version 3.
    pub virtio: Vec<VirtioState>,
}

/// What backs a virtio device: the part of its configuration that a
/// restore needs to rebuild it (and that `--disk` at a restore may
/// override).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioBackendConfig {
    /// virtio-blk on a raw file.
    Blk(DiskConfig),
    /// virtio-net on a tap.
    Net(crate::devices::NetConfig),
}

/// One virtio-mmio device: its transport registers, its queues and its
/// backend's configuration. Saved after the device was drained (no
/// request in flight: everything the guest made available is in the used
/// ring), so `next_avail`/`next_used` say exactly which requests are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioState {
    /// The virtio device ID (2 for a block device).
    pub device_type: u32,
    /// The device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, ...).
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver acknowledged.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus` (bit 0: used buffer, bit 1: configuration change).
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The queues, untrusted until the device rebuilds them.
    pub queues: Vec<QueueState>,
    /// The backend.
    pub backend: VirtioBackendConfig,
}

/// Everything needed to resume a paused VM, given its memory.
#[derive(Clone)]
pub struct MachineState {
    /// Machine shape.
    pub meta: MachineMeta,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Per-vCPU state, indexed by vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// Userspace devices.
    pub devices: DeviceState,
}
