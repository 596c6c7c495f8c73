//! Capture and restore of VM-wide KVM state: PIT, clock and irqchips.
//!
//! The in-kernel irqchip and PIT must exist before the vCPUs are created;
//! the restore order is PIT2, CLOCK, then PIC master, PIC slave, IOAPIC.
//! Userspace devices are restored after all KVM state, so an interrupt they
//! raise lands on a fully restored irqchip.

use kvm_bindings::{
    kvm_irqchip, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::VmState;

/// Errors from VM-level state.
#[derive(Debug, thiserror::Error)]
#[error("VM {what} failed: {source}")]
pub struct VmStateError {
    /// The ioctl.
    pub what: &'static str,
    /// The errno.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

/// Captures VM-wide state. All vCPUs must be paused.
pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    // TSC_STABLE describes this host's clocksource; it is not ours to set.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(VmState {
        pit,
        clock,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP(PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP(PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP(IOAPIC)")?,
    })
}

/// Restores VM-wide state into a VM whose irqchip and PIT exist.
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), VmStateError> {
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    vm.set_clock(&s.clock).map_err(kvm("KVM_SET_CLOCK"))?;
    vm.set_irqchip(&s.pic_master)
        .map_err(kvm("KVM_SET_IRQCHIP(PIC master)"))?;
    vm.set_irqchip(&s.pic_slave)
        .map_err(kvm("KVM_SET_IRQCHIP(PIC slave)"))?;
    vm.set_irqchip(&s.ioapic)
        .map_err(kvm("KVM_SET_IRQCHIP(IOAPIC)"))?;
    Ok(())
}
