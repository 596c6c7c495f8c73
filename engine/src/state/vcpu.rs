//! Capture and restore of one vCPU's architectural state.
//!
//! All of these ioctls run on the vCPU's own thread while it is paused (out
//! of KVM_RUN). The ordering rules below are KVM's, not ours; breaking any of
//! them loses state silently rather than failing.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use tracing::{debug, warn};

use super::VcpuState;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Errors from capturing or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {what} failed: {source}")]
    Kvm {
        /// The ioctl, e.g. "KVM_SET_SREGS".
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took or gave fewer MSRs than asked for.
    #[error("{what}: KVM processed {done} of {asked} MSRs; MSR {index:#x} was refused")]
    Msr {
        /// The ioctl.
        what: &'static str,
        /// How many were processed.
        done: usize,
        /// How many were asked for.
        asked: usize,
        /// The first MSR not processed.
        index: u32,
    },
    /// A list did not fit KVM's fixed-size array.
    #[error("too many {0} entries for KVM")]
    TooMany(&'static str),
    /// The vCPU exited for an I/O access that KVM could not complete, so
    /// its registers are not consistent and must not be saved.
    #[error("the vCPU's last exit, a {0}, could not be completed; its state is not consistent")]
    IncompleteIo(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Reads the MSRs in `indices`, which must all be readable.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    // KVM_GET_MSRS takes at most KVM_MAX_MSR_ENTRIES at a time.
    for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR"))?;
        let done = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if done != chunk.len() {
            return Err(VcpuStateError::Msr {
                what: "KVM_GET_MSRS",
                done,
                asked: chunk.len(),
                index: chunk[done],
            });
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Keeps the MSRs of `candidates` that this vCPU can actually read back.
///
/// KVM_GET_MSR_INDEX_LIST names MSRs that a given CPU model may still refuse;
/// probing once at VM creation keeps every later save exact.
pub fn readable_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut ok = Vec::with_capacity(candidates.len());
    for &index in candidates {
        if read_msrs(fd, &[index]).is_ok() {
            ok.push(index);
        } else {
            debug!(
                msr = format_args!("{index:#x}"),
                "MSR not readable, not saved"
            );
        }
    }
    ok
}

fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooMany("MSR"))?;
        let done = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if done != chunk.len() {
            return Err(VcpuStateError::Msr {
                what: "KVM_SET_MSRS",
                done,
                asked: chunk.len(),
                index: chunk[done].index,
            });
        }
    }
    Ok(())
}

/// Captures a paused vCPU.
pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    // MP_STATE first: KVM_GET_MP_STATE runs kvm_apic_accept_events(), which
    // may change LAPIC and register state (e.g. a pending INIT); everything
    // read after it is consistent with the run state it returned.
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let mut msrs = read_msrs(fd, msr_indices)?;
    // A TSC_DEADLINE of 0 means "disarmed", but restoring 0 after IA32_TSC
    // may be taken as a deadline in the past and fire a spurious interrupt
    // on some kernels. Store the TSC itself instead: an equally expired but
    // harmless deadline, which is what Firecracker does too.
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let (Some(tsc), Some(dl)) = (
        tsc,
        msrs.iter_mut()
            .find(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data == 0),
    ) {
        dl.data = tsc;
    }
    // Read CPUID back rather than trusting what we set: it is what the guest
    // actually sees, including KVM's own adjustments.
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    // VCPU_EVENTS last: it holds pending events that the reads above do not
    // disturb, and it is what REGS/SREGS restore would clobber.
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Restores a vCPU that has been created but not yet run.
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    // 1. CPUID before anything else: KVM derives the valid bits of XCR0,
    //    EFER, CR4 and the MSRs from it.
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuStateError::TooMany("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    // 2. MP_STATE.
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    // 3. REGS before VCPU_EVENTS: KVM_SET_REGS clears pending exceptions.
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    // 4. SREGS before LAPIC: it writes APIC_BASE, which relocates/enables the
    //    LAPIC that KVM_SET_LAPIC then fills.
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // 5-6. XSAVE, then XCRS.
    // SAFETY: `s.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE (or
    // decoded to exactly that size); KVM reads at most sizeof(kvm_xsave)
    // because this VM never enabled KVM_CAP_XSAVE2's larger buffer.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    // 7. DEBUGREGS.
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    // 8. LAPIC before the MSRs: IA32_TSC_DEADLINE is only accepted while the
    //    LVT timer is in TSC-deadline mode.
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    // 9. MSRs, with TSC_DEADLINE in a last chunk of its own after IA32_TSC:
    //    the deadline is interpreted relative to the guest TSC being set.
    let (deadline, rest): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = s
        .msrs
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, &rest)?;
    write_msrs(fd, &deadline)?;
    // 10. VCPU_EVENTS after REGS/SREGS/MSRs, so nothing clears them again.
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    // 11. Tell a kvmclock guest it was paused, so its watchdogs do not fire.
    //     EINVAL just means the guest does not use kvmclock.
    if let Err(e) = fd.kvmclock_ctrl() {
        if e.errno() == libc::EINVAL {
            debug!("guest does not use kvmclock; KVMCLOCK_CTRL skipped");
        } else {
            warn!("KVMCLOCK_CTRL failed: {e}");
        }
    }
    Ok(())
}
