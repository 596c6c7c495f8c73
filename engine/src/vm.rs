//! A VM: KVM objects, guest RAM, COM1 and the vCPU threads.
//!
//! Building a VM has two halves, so a migration destination can do the slow
//! half before the state arrives:
//!
//! 1. [`PreparedVm::new`]: KVM VM, memory slots over a memfd, irqchip and
//!    PIT2 (before any vCPU, as KVM requires), the vCPU fds and the MSR list.
//! 2. Either [`PreparedVm::boot`] (load an ELF, set entry registers) or
//!    [`PreparedVm::restore`] (apply a [`MachineState`]); both give a paused
//!    [`Vm`] whose vCPU threads wait for [`Vm::resume`].

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tracing::{info, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::console::{Console, ConsoleError, ConsoleLine, LineSink, COM1_IRQ};
use crate::devices::{self, DeviceError, DeviceSpec, DiskConfig, MmioBus};
use crate::layout::{KVM_TSS_ADDR, MAX_VCPUS};
use crate::memory::{Backing, GuestRam, MemoryError};
use crate::state::vm as vm_state;
use crate::state::{vcpu as vcpu_state, DeviceState, MachineMeta, MachineState};
use crate::vcpu::{VcpuError, VcpuHandle};
use ferry_protocol::PageBitmap;

/// Errors from building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU thread.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// vCPU state.
    #[error(transparent)]
    VcpuState(#[from] vcpu_state::VcpuStateError),
    /// VM-level state.
    #[error(transparent)]
    VmState(#[from] vm_state::VmStateError),
    /// The console.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A virtio device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The console output file.
    #[error("cannot open console output {path}: {source}")]
    ConsoleFile {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad vCPU count.
    #[error("{0} vCPUs requested; Ferry supports 1 to {MAX_VCPUS} (and KVM here may allow fewer)")]
    VcpuCount(u32),
    /// A state that does not fit this VM.
    #[error("state does not fit this VM: {0}")]
    Mismatch(String),
    /// The operation needs the VM in another run state.
    #[error("the VM is {0}")]
    WrongRunState(&'static str),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Called with each complete console line. Shared, so that whoever runs
/// the VM (a tool, a test) can watch its guest without the VMM knowing what
/// the guest says.
pub type SharedLineObserver = Arc<dyn Fn(&ConsoleLine) + Send + Sync>;

/// Where the guest's console lines go.
#[derive(Clone, Default)]
pub enum ConsoleOutput {
    /// This process's stdout.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Nowhere (observers still see them).
    Discard,
    /// Where the inner output says, and to an observer too.
    Observed(Box<ConsoleOutput>, SharedLineObserver),
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleOutput::Stdout => f.write_str("Stdout"),
            ConsoleOutput::File(p) => f.debug_tuple("File").field(p).finish(),
            ConsoleOutput::Discard => f.write_str("Discard"),
            ConsoleOutput::Observed(inner, _) => f.debug_tuple("Observed").field(inner).finish(),
        }
    }
}

impl ConsoleOutput {
    /// The same output, with `observer` also called for each line.
    pub fn observed(self, observer: SharedLineObserver) -> Self {
        ConsoleOutput::Observed(Box::new(self), observer)
    }

    fn open(&self) -> Result<Box<dyn Write + Send>, VmError> {
        Ok(match self {
            ConsoleOutput::Stdout => Box::new(std::io::stdout()),
            ConsoleOutput::Discard => Box::new(std::io::sink()),
            ConsoleOutput::File(path) => Box::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::ConsoleFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
            ConsoleOutput::Observed(inner, _) => inner.open()?,
        })
    }

    /// The observers along the chain.
    fn observers(&self) -> Vec<SharedLineObserver> {
        match self {
            ConsoleOutput::Observed(inner, o) => {
                let mut v = inner.observers();
                v.push(o.clone());
                v
            }
            _ => Vec::new(),
        }
    }
}

/// A VM whose KVM objects and memory exist but whose vCPUs have no state yet.
pub struct PreparedVm {
    kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    vcpu_fds: Vec<VcpuFd>,
    msr_indices: Vec<u32>,
    console_out: ConsoleOutput,
    tsc_khz: u32,
    disks: Vec<DiskConfig>,
    nets: Vec<devices::NetConfig>,
}

impl PreparedVm {
    /// Creates the VM, its RAM and its vCPUs.
    pub fn new(mem_size: u64, vcpus: u32, console_out: ConsoleOutput) -> Result<Self, VmError> {
        Self::backed(mem_size, vcpus, console_out, Backing::Shmem, false)
    }

    /// Like [`Self::new`], with RAM of the given backing (huge pages).
    pub fn new_backed(
        mem_size: u64,
        vcpus: u32,
        console_out: ConsoleOutput,
        backing: Backing,
    ) -> Result<Self, VmError> {
        Self::backed(mem_size, vcpus, console_out, backing, false)
    }

    /// Like [`Self::new`], with guest RAM in a new file at `path` that
    /// outlives the process (see [`GuestRam::in_file`]).
    pub fn new_in_file(
        mem_size: u64,
        vcpus: u32,
        console_out: ConsoleOutput,
        path: &std::path::Path,
    ) -> Result<Self, VmError> {
        Self::create(
            GuestRam::in_file(mem_size, path)?,
            vcpus,
            console_out,
            false,
        )
    }

    /// Like [`Self::new`], for a VM whose memory will arrive through
    /// userfaultfd: guest page faults are resolved on the vCPU threads
    /// themselves (see [`enable_sync_faults`]).
    pub fn new_for_postcopy(
        mem_size: u64,
        vcpus: u32,
        console_out: ConsoleOutput,
        backing: Backing,
    ) -> Result<Self, VmError> {
        Self::backed(mem_size, vcpus, console_out, backing, true)
    }

    /// Like [`Self::new_backed`] (`sync_faults: false`) or
    /// [`Self::new_for_postcopy`] (`true`), in guest RAM made already (see
    /// `migration::ram_ahead`).
    pub fn in_ram(
        ram: GuestRam,
        vcpus: u32,
        console_out: ConsoleOutput,
        sync_faults: bool,
    ) -> Result<Self, VmError> {
        Self::create(ram, vcpus, console_out, sync_faults)
    }

    fn backed(
        mem_size: u64,
        vcpus: u32,
        console_out: ConsoleOutput,
        backing: Backing,
        sync_faults: bool,
    ) -> Result<Self, VmError> {
        let ram = GuestRam::with_backing(mem_size, backing)?;
        Self::create(ram, vcpus, console_out, sync_faults)
    }

    fn create(
        ram: GuestRam,
        vcpus: u32,
        console_out: ConsoleOutput,
        sync_faults: bool,
    ) -> Result<Self, VmError> {
        if !crate::layout::valid_vcpus(vcpus) {
            return Err(VmError::VcpuCount(vcpus));
        }
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let max = kvm.get_max_vcpus() as u32;
        if vcpus > max {
            return Err(VmError::VcpuCount(vcpus));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        set_memory_slots(&fd, &ram, 0)?;
        if sync_faults {
            enable_sync_faults(&fd);
        }
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // The irqchip and PIT must exist before any vCPU is created.
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let mut vcpu_fds = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            vcpu_fds.push(
                fd.create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let candidates = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_indices = vcpu_state::readable_msrs(&vcpu_fds[0], candidates.as_slice());
        let tsc_khz = vcpu_fds[0]
            .get_tsc_khz()
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        Ok(Self {
            kvm,
            fd,
            ram,
            vcpu_fds,
            msr_indices,
            console_out,
            tsc_khz,
            disks: Vec::new(),
            nets: Vec::new(),
        })
    }

    /// Gives a VM that [`Self::boot`]s these disks (virtio-blk, in slot
    /// order). A restore takes its devices from the state instead.
    pub fn with_disks(mut self, disks: Vec<DiskConfig>) -> Self {
        self.disks = disks;
        self
    }

    /// Gives a VM that [`Self::boot`]s these network cards (virtio-net,
    /// in the slots after the disks).
    pub fn with_nets(mut self, nets: Vec<devices::NetConfig>) -> Self {
        self.nets = nets;
        self
    }

    /// Guest RAM, e.g. to fill it before restoring state.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The machine shape this VM has.
    pub fn meta(&self) -> MachineMeta {
        MachineMeta {
            vcpus: self.vcpu_fds.len() as u32,
            mem_size: self.ram.size(),
            tsc_khz: self.tsc_khz,
        }
    }

    /// Boots `elf` from scratch. `cmdline` gets `cpus=` and `tsc_khz=`
    /// added, and a `virtio_mmio.device=` word per disk.
    pub fn boot(self, elf: &[u8], cmdline: &str) -> Result<Vm, VmError> {
        let full = format!(
            "cpus={} tsc_khz={} {} {}",
            self.vcpu_fds.len(),
            self.tsc_khz,
            devices::cmdline(self.disks.len() + self.nets.len()),
            cmdline
        );
        let info = boot::load_pvh(&self.ram, elf, full.trim_end())?;
        info!(entry = ?info.entry, image_end = info.image_end, "guest loaded");
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for (i, v) in self.vcpu_fds.iter().enumerate() {
            let cpuid = vcpu_cpuid(&supported, i as u32, self.vcpu_fds.len() as u32)?;
            v.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let mut regs = v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
            let mut sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            boot::entry_registers(info.entry, &mut regs, &mut sregs);
            v.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            v.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            v.set_fpu(&kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_SET_FPU"))?;
            set_lint(v)?;
            // Every vCPU starts at the entry; APs do not wait for a SIPI.
            v.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        let console = self.new_console(None)?;
        let specs = self
            .disks
            .iter()
            .map(|d| DeviceSpec::Fresh(crate::state::VirtioBackendConfig::Blk(d.clone())))
            .chain(
                self.nets
                    .iter()
                    .map(|n| DeviceSpec::Fresh(crate::state::VirtioBackendConfig::Net(n.clone()))),
            )
            .collect();
        let bus = MmioBus::build(&self.fd, self.ram.guest_memory(), specs)?;
        self.start(console, bus)
    }

    /// Applies a saved state. Guest RAM must already hold the VM's memory
    /// (or be ready to fault it in).
    pub fn restore(self, state: &MachineState) -> Result<Vm, VmError> {
        let meta = self.meta();
        if state.meta.vcpus != meta.vcpus || state.meta.mem_size != meta.mem_size {
            return Err(VmError::Mismatch(format!(
                "state is for {} vCPUs and {} bytes of RAM; this VM has {} and {}",
                state.meta.vcpus, state.meta.mem_size, meta.vcpus, meta.mem_size
            )));
        }
        if state.meta.tsc_khz != meta.tsc_khz {
            // No TSC scaling on this host (KVM_CAP_TSC_CONTROL is 0): the
            // guest's TSC runs at this host's rate from here on.
            warn!(
                saved = state.meta.tsc_khz,
                host = meta.tsc_khz,
                "TSC frequency differs and cannot be scaled"
            );
        }
        // VM-wide KVM state first (PIT2, CLOCK, irqchips), then the vCPUs,
        // then userspace devices last, so an interrupt a device raises on
        // restore lands on fully restored interrupt controllers.
        vm_state::restore(&self.fd, &state.vm)?;
        for (v, s) in self.vcpu_fds.iter().zip(&state.vcpus) {
            vcpu_state::restore(v, s)?;
        }
        let console = self.new_console(Some(&state.devices))?;
        // The devices' backends (disk files) are opened at the first
        // resume: on a migration destination, after the commit.
        let specs = state
            .devices
            .virtio
            .iter()
            .map(DeviceSpec::Restored)
            .collect();
        let bus = MmioBus::build(&self.fd, self.ram.guest_memory(), specs)?;
        self.start(console, bus)
    }

    fn new_console(&self, devices: Option<&DeviceState>) -> Result<Arc<Console>, VmError> {
        let irq =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ConsoleError::EventFd)?;
        self.fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let mut sink = LineSink::new(self.console_out.open()?);
        for o in self.console_out.observers() {
            sink.observe(Box::new(move |line| o(line)));
        }
        if let Some(d) = devices {
            // The line the guest was printing when the state was saved.
            sink.resume_line(&d.serial_line);
        }
        Ok(match devices {
            Some(d) => Console::from_state(irq, sink, &d.serial)?,
            None => Console::new(irq, sink),
        })
    }

    fn start(self, console: Arc<Console>, bus: MmioBus) -> Result<Vm, VmError> {
        let meta = self.meta();
        let bus = Arc::new(bus);
        let msrs = Arc::new(self.msr_indices);
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for (i, fd) in self.vcpu_fds.into_iter().enumerate() {
            vcpus.push(VcpuHandle::spawn(
                i as u32,
                fd,
                console.clone(),
                bus.clone(),
                msrs.clone(),
            )?);
        }
        Ok(Vm {
            vcpus,
            console,
            bus,
            fd: self.fd,
            ram: self.ram,
            _kvm: self.kvm,
            meta,
            running: false,
            keep_alive: Vec::new(),
        })
    }
}

/// Registers (or re-registers with new `flags`) one KVM memory slot per RAM
/// range; slot `i` is `ram.ranges()[i]`.
fn set_memory_slots(fd: &VmFd, ram: &GuestRam, flags: u32) -> Result<(), VmError> {
    for (slot, region) in ram.ranges().iter().enumerate() {
        let host = ram
            .guest_memory()
            .get_host_address(GuestAddress(region.guest_addr))
            .map_err(|e| {
                VmError::Memory(MemoryError::Io {
                    offset: region.file_offset,
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
        let mr = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.guest_addr,
            memory_size: region.len,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `region.len`
        // bytes owned by `ram`, which the VM keeps alive (in `Vm`) for as
        // long as the KVM VM fd exists.
        unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Makes KVM fault missing guest pages in on the vCPU thread itself.
///
/// By default KVM hands a guest access to a non-present host page to an
/// async-page-fault kworker and halts the vCPU meanwhile; the userfaultfd
/// event then names the kworker, not the vCPU, so faults cannot be
/// attributed to vCPUs, and the extra hand-off costs latency (p50 149 µs
/// against 95 µs measured here). KVM skips async page faults when HLT exits
/// are disabled and the guest has no paravirtual async-PF, so this disables
/// HLT exits. The cost: a guest that executes HLT keeps its host CPU busy.
/// Must run before any vCPU is created; failure only loses attribution.
fn enable_sync_faults(fd: &VmFd) {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_DISABLE_EXITS,
        args: [u64::from(kvm_bindings::KVM_X86_DISABLE_EXITS_HLT), 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = fd.enable_cap(&cap) {
        warn!("cannot disable HLT exits ({e}); faults will not be attributed to vCPUs");
    }
}

/// CPUID for vCPU `index`: what KVM supports, with this vCPU's APIC ID.
fn vcpu_cpuid(supported: &CpuId, index: u32, count: u32) -> Result<CpuId, VmError> {
    let mut entries = supported.as_slice().to_vec();
    for e in &mut entries {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count; "running
                // under a hypervisor".
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count & 0xff) << 16);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|_| VmError::Mismatch("too many CPUID entries".into()))
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware would leave them.
fn set_lint(v: &VcpuFd) -> Result<(), VmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = v.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let val = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    v.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// A VM with running or paused vCPU threads.
pub struct Vm {
    // Field order matters for drop: vCPU threads end before the VM fd and
    // the memory they use go away.
    vcpus: Vec<VcpuHandle>,
    console: Arc<Console>,
    /// virtio-mmio devices; their I/O threads end before the memory and
    /// the userfaultfd (`keep_alive`) they may touch go away.
    bus: Arc<MmioBus>,
    fd: VmFd,
    ram: GuestRam,
    _kvm: Kvm,
    meta: MachineMeta,
    running: bool,
    /// Things that must outlive the vCPU threads (a destination's
    /// userfaultfd: closing it while a vCPU could still fault would let the
    /// kernel fill the fault with a zero page).
    keep_alive: Vec<Box<dyn Send>>,
}

impl Vm {
    /// Keeps `thing` until the VM is dropped, released only after every
    /// vCPU thread has ended.
    pub fn keep_alive(&mut self, thing: Box<dyn Send>) {
        self.keep_alive.push(thing);
    }

    /// Creates and boots a VM, leaving it paused.
    pub fn boot(
        mem_size: u64,
        vcpus: u32,
        elf: &[u8],
        cmdline: &str,
        console: ConsoleOutput,
    ) -> Result<Self, VmError> {
        PreparedVm::new(mem_size, vcpus, console)?.boot(elf, cmdline)
    }

    /// Machine shape.
    pub fn meta(&self) -> MachineMeta {
        self.meta
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM fd (for dirty logging).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Starts KVM dirty logging on all of guest RAM (and clears the log),
    /// and the devices' record of the pages they write.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        set_memory_slots(&self.fd, &self.ram, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)?;
        self.bus.dirty().set_enabled(true);
        self.take_dirty_log().map(|_| ())
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.bus.dirty().set_enabled(false);
        set_memory_slots(&self.fd, &self.ram, 0)
    }

    /// The virtio devices' counters (a JSON array, by slot).
    pub fn device_stats(&self) -> serde_json::Value {
        self.bus.stats()
    }

    /// The virtio disks' configurations, by slot (disks take the first
    /// slots; network cards follow them).
    pub fn disk_configs(&self) -> Vec<DiskConfig> {
        self.bus
            .configs()
            .into_iter()
            .filter_map(|c| match c {
                crate::state::VirtioBackendConfig::Blk(d) => Some(d),
                crate::state::VirtioBackendConfig::Net(_) => None,
            })
            .collect()
    }

    /// The blocks (4 KiB) of the disk file `path` the guest wrote since the
    /// last call, while dirty logging is on (pre-copy of a migrated disk).
    pub fn take_disk_dirty(&self, path: &std::path::Path) -> Vec<u64> {
        self.bus.dirty().take_disk(path)
    }

    /// Returns and clears the pages the guest wrote since the last call: one
    /// bit per memory-file page.
    pub fn take_dirty_log(&self) -> Result<PageBitmap, VmError> {
        let mut out = vec![0u64; self.ram.pages().div_ceil(64) as usize];
        for (slot, r) in self.ram.ranges().iter().enumerate() {
            let log = self
                .fd
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            // Ranges start on 64-page boundaries of the memory file (0 and
            // 3 GiB), so slot words map onto whole output words.
            let first = (r.file_offset / crate::layout::PAGE_SIZE as u64 / 64) as usize;
            for (o, w) in out.iter_mut().skip(first).zip(log) {
                *o |= w;
            }
        }
        // What the devices wrote, which KVM's log cannot see.
        let page = crate::layout::PAGE_SIZE as u64;
        for gpfn in self.bus.dirty().take() {
            let off = gpfn
                .checked_mul(page)
                .and_then(|gpa| crate::layout::gpa_to_file_offset(self.ram.ranges(), gpa));
            if let Some(pfn) = off.map(|o| o / page) {
                if let Some(w) = out.get_mut((pfn / 64) as usize) {
                    *w |= 1 << (pfn % 64);
                }
            }
        }
        Ok(PageBitmap::from_words(self.ram.pages(), out))
    }

    /// True while the vCPUs run.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Kernel thread ids of the vCPU threads, by vCPU index.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus.iter().map(|v| v.tid()).collect()
    }

    /// The first vCPU that the guest stopped, and why.
    pub fn stopped_reason(&self) -> Option<String> {
        self.vcpus.iter().find_map(|v| v.stopped_reason())
    }

    /// Starts the devices (opens their backends) without running any
    /// vCPU; [`Vm::resume`] does it too, so a caller that must know
    /// whether an error left the guest unrun calls this first.
    pub fn resume_devices(&mut self) -> Result<(), VmError> {
        Ok(self.bus.resume()?)
    }

    /// A migration's source at its commit point (paused, drained): lets go
    /// of the disks' locks so the destination can take them when it
    /// starts; with `keep_reading` (migrated disks, which the source still
    /// reads to serve their blocks) each becomes a shared lock instead. A
    /// later [`Vm::resume`] (a roll-back) takes them back first, and fails
    /// without running a vCPU if another VM took a disk meanwhile.
    pub fn hand_over_disks(&mut self, keep_reading: bool) -> Result<(), VmError> {
        if self.running {
            return Err(VmError::WrongRunState("running; pause it first"));
        }
        Ok(self.bus.hand_over(keep_reading)?)
    }

    /// Takes back the disks' locks that [`Vm::hand_over_disks`] let go (a
    /// move rolled back after its commit point), without running anything.
    /// Fails, leaving the VM paused, on a disk another VM or process took
    /// meanwhile.
    pub fn take_back_disks(&mut self) -> Result<(), VmError> {
        Ok(self.bus.take_back()?)
    }

    /// Starts or continues all vCPUs. The devices go first: the first
    /// resume opens their backends (disk files) and locks them.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.resume_devices()?;
        self.resume_vcpus()
    }

    /// Starts or continues all vCPUs, once [`Vm::resume_devices`] did.
    pub fn resume_vcpus(&mut self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.resume()?;
        }
        self.running = true;
        Ok(())
    }

    /// Stops all vCPUs; returns once none is inside KVM_RUN.
    pub fn pause(&mut self) -> Result<std::time::Duration, VmError> {
        let t = Instant::now();
        for v in &self.vcpus {
            v.request_pause()?;
        }
        for v in &self.vcpus {
            v.wait_paused()?;
        }
        self.running = false;
        // No vCPU can make a request now: finish the ones made, flush.
        if !self.bus.is_empty() {
            let drained = self.bus.drain()?;
            info!(
                requests = drained,
                "devices drained: every request made is complete and flushed"
            );
        }
        Ok(t.elapsed())
    }

    /// Captures the state of the paused VM.
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        if self.running {
            return Err(VmError::WrongRunState("running; pause it first"));
        }
        // Devices first: anything they raised is then already in the
        // irqchip state captured below, so no interrupt is lost.
        let (serial, serial_line) = self.console.save();
        let devices = DeviceState {
            serial,
            serial_line,
            virtio: self.bus.save(),
        };
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save()?);
        }
        let vm = vm_state::save(&self.fd)?;
        Ok(MachineState {
            meta: self.meta,
            vm,
            vcpus,
            devices,
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vcpus.clear();
        self.console.flush();
    }
}
