//! Userspace devices on the MMIO bus: virtio-mmio transports and the
//! device models behind them (virtio-blk).
//!
//! ```text
//!  vCPU thread: MMIO exit ─► MmioBus::read/write ─► device mutex: registers
//!  guest QueueNotify ─► ioeventfd ─► device I/O thread ─► backend (file I/O)
//!                                       └─► used ring, irqfd ─► IOAPIC pin
//! ```
//!
//! Devices sit at [`layout::VIRTIO_MMIO_BASE`] + `slot *`
//! [`layout::VIRTIO_MMIO_SIZE`] with GSI [`layout::VIRTIO_FIRST_GSI`] +
//! `slot`, and are described to the guest on its command line in Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>` syntax ([`cmdline`]).

pub mod announce;
mod blk;
mod chain;
mod config;
mod device;
pub mod dirty;
pub mod image_lock;
pub mod migrated;
mod net;
mod net_config;
mod tap;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use blk::{Blk, BlkStats, SECTOR};
pub use config::{DiskConfig, MAX_PATH, MAX_SERIAL};
pub use device::VirtioMmioDevice;
use dirty::DirtyLog;
pub use net::{Net, NetStats};
pub use net_config::{format_mac, NetConfig, MAX_TAP_NAME};
use transport::{MmioTransport, VirtioBackend};

use crate::layout::{MAX_VIRTIO_DEVICES, VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::state::{VirtioBackendConfig, VirtioState};

/// Errors from devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backing file could not be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another VM or process holds the disk's lock
    /// ([`image_lock`]): a second writer would corrupt it.
    #[error(
        "cannot open disk {}: it is in use by another VM or process (it holds a lock \
         on the file that conflicts with this VM's {} lock)",
        path.display(),
        if *exclusive { "write" } else { "read" }
    )]
    InUse {
        /// The file.
        path: PathBuf,
        /// Whether this VM wanted it for writing.
        exclusive: bool,
    },
    /// One VM names a disk twice, once at least writable.
    #[error("disk {} is given twice to one VM (slots {first} and {second}); a writable disk can be used once", path.display())]
    Twice {
        /// The file.
        path: PathBuf,
        /// The first slot naming it.
        first: usize,
        /// The second.
        second: usize,
    },
    /// fdatasync failed.
    #[error("cannot flush disk {path}: {source}")]
    Flush {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd or epoll could not be made.
    #[error("device eventfd/epoll: {0}")]
    EventFd(#[source] std::io::Error),
    /// The I/O thread could not be spawned.
    #[error("cannot spawn a device I/O thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A queue could not be made.
    #[error("virtqueue: {0}")]
    Queue(String),
    /// A saved device state does not fit.
    #[error("device state: {0}")]
    State(String),
    /// Registering an irqfd or ioeventfd failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Too many devices.
    #[error("{0} virtio devices; at most {MAX_VIRTIO_DEVICES}")]
    TooMany(usize),
}

/// Guest address of slot `i`'s registers.
pub fn mmio_base(slot: usize) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE
}

/// The guest command line words describing `count` devices, e.g.
/// `virtio_mmio.device=4K@0xfe000000:10`.
pub fn cmdline(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                VIRTIO_MMIO_SIZE >> 10,
                mmio_base(i),
                VIRTIO_FIRST_GSI + i as u32
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What to build in one slot.
pub enum DeviceSpec<'a> {
    /// A new device, reset (booting); its backend is opened now.
    Fresh(VirtioBackendConfig),
    /// A device as saved; its backend is opened on the first resume.
    Restored(&'a VirtioState),
}

fn backend(config: &VirtioBackendConfig, restored: bool) -> Box<dyn VirtioBackend> {
    match config {
        VirtioBackendConfig::Blk(d) => Box::new(Blk::new(d.clone())),
        VirtioBackendConfig::Net(n) => Box::new(Net::new(n.clone(), restored)),
    }
}

/// One VM may name a file once if any of its uses writes it: its second
/// open would conflict with the first one's lock, and two devices writing
/// one image corrupt it like two VMs do. A read-only disk may be shared.
/// Paths are compared canonical (a symlink, `./`), when they exist.
fn check_disks_once(specs: &[DeviceSpec<'_>]) -> Result<(), DeviceError> {
    let disks: Vec<(usize, PathBuf, bool)> = specs
        .iter()
        .enumerate()
        .filter_map(|(slot, spec)| {
            let config = match spec {
                DeviceSpec::Fresh(c) => c,
                DeviceSpec::Restored(s) => &s.backend,
            };
            match config {
                VirtioBackendConfig::Blk(d) => Some((
                    slot,
                    std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone()),
                    d.readonly,
                )),
                VirtioBackendConfig::Net(_) => None,
            }
        })
        .collect();
    for (i, (first, path, ro)) in disks.iter().enumerate() {
        for (second, other, other_ro) in &disks[i + 1..] {
            if path == other && !(*ro && *other_ro) {
                return Err(DeviceError::Twice {
                    path: path.clone(),
                    first: *first,
                    second: *second,
                });
            }
        }
    }
    Ok(())
}

/// The VM's virtio-mmio devices, by slot.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<VirtioMmioDevice>,
    dirty: Arc<DirtyLog>,
}

impl MmioBus {
    /// Builds the devices, registers their irqfds and ioeventfds with
    /// `vm`, and starts their I/O threads.
    pub fn build(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        specs: Vec<DeviceSpec<'_>>,
    ) -> Result<Self, DeviceError> {
        if specs.len() > MAX_VIRTIO_DEVICES {
            return Err(DeviceError::TooMany(specs.len()));
        }
        check_disks_once(&specs)?;
        let dirty = Arc::new(DirtyLog::default());
        let mut devices = Vec::with_capacity(specs.len());
        for (slot, spec) in specs.into_iter().enumerate() {
            let transport = match spec {
                DeviceSpec::Fresh(c) => {
                    let mut t = MmioTransport::new(backend(&c, false))?;
                    t.activate_backend()?;
                    t
                }
                DeviceSpec::Restored(s) => {
                    let t = MmioTransport::from_state(backend(&s.backend, true), s)?;
                    t.check_backend()?;
                    t
                }
            };
            let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(DeviceError::EventFd)?;
            vm.register_irqfd(&irq, VIRTIO_FIRST_GSI + slot as u32)
                .map_err(|source| DeviceError::Kvm {
                    what: "KVM_IRQFD",
                    source,
                })?;
            let mut evts = Vec::new();
            for q in 0..transport.queue_count() {
                let e = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(DeviceError::EventFd)?;
                let addr =
                    IoEventAddress::Mmio(mmio_base(slot) + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
                vm.register_ioevent(&e, &addr, q as u32)
                    .map_err(|source| DeviceError::Kvm {
                        what: "KVM_IOEVENTFD",
                        source,
                    })?;
                evts.push(e);
            }
            let latency = match transport.backend().config() {
                VirtioBackendConfig::Blk(d) => std::time::Duration::from_micros(d.latency_us),
                VirtioBackendConfig::Net(_) => std::time::Duration::ZERO,
            };
            devices.push(VirtioMmioDevice::start(
                format!("virtio{slot}"),
                latency,
                transport,
                mem.clone(),
                dirty.clone(),
                irq,
                evts,
            )?);
        }
        Ok(Self { devices, dirty })
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True without devices.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn find(&self, addr: u64) -> Option<(&VirtioMmioDevice, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let dev = self.devices.get((off / VIRTIO_MMIO_SIZE) as usize)?;
        Some((dev, off % VIRTIO_MMIO_SIZE))
    }

    /// A guest MMIO read; false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.read(off, data);
                true
            }
            None => false,
        }
    }

    /// A guest MMIO write; false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.write(off, data);
                true
            }
            None => false,
        }
    }

    /// Drains every device (see [`VirtioMmioDevice::drain`]); returns how
    /// many requests the drain completed.
    pub fn drain(&self) -> Result<u32, DeviceError> {
        self.devices.iter().try_fold(0, |n, d| Ok(n + d.drain()?))
    }

    /// Resumes every device (see [`VirtioMmioDevice::resume`]).
    pub fn resume(&self) -> Result<(), DeviceError> {
        self.devices.iter().try_for_each(|d| d.resume())
    }

    /// Hands every device's hold on its file over to a migration's
    /// destination (the source's switch-over, every device drained): a
    /// disk's lock goes, or with `keep_reading` becomes shared. The next
    /// [`Self::resume`] takes them back.
    pub fn hand_over(&self, keep_reading: bool) -> Result<(), DeviceError> {
        self.devices
            .iter()
            .try_for_each(|d| d.hand_over(keep_reading))
    }

    /// Takes back what [`Self::hand_over`] let go (a roll-back), the
    /// devices still paused; fails on the first disk someone else took.
    pub fn take_back(&self) -> Result<(), DeviceError> {
        self.devices.iter().try_for_each(|d| d.take_back())
    }

    /// Every device's state, by slot.
    pub fn save(&self) -> Vec<VirtioState> {
        self.devices.iter().map(|d| d.save()).collect()
    }

    /// Pages the devices wrote (for pre-copy's dirty log).
    pub fn dirty(&self) -> &DirtyLog {
        &self.dirty
    }

    /// Every device's backend configuration, by slot.
    pub fn configs(&self) -> Vec<VirtioBackendConfig> {
        self.devices.iter().map(|d| d.save().backend).collect()
    }

    /// Every device's counters, by slot.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::Value::Array(self.devices.iter().map(|d| d.stats()).collect())
    }
}

/// Applies `--disk` overrides given at a restore: the `i`-th replaces the
/// configuration of the `i`-th disk. More overrides than disks is an error.
pub fn override_disks(devices: &mut [VirtioState], overrides: &[DiskConfig]) -> Result<(), String> {
    let mut disks = devices.iter_mut().filter_map(|d| match &mut d.backend {
        VirtioBackendConfig::Blk(c) => Some(c),
        _ => None,
    });
    for o in overrides {
        let d = disks.next().ok_or_else(|| {
            format!(
                "--disk {}: the saved VM has fewer disks than --disk options",
                o.path.display()
            )
        })?;
        *d = d.overridden_by(o);
    }
    Ok(())
}

/// Applies `--net` overrides given at a restore: the `i`-th replaces the
/// tap and MAC of the `i`-th network card (a clone's own MAC). More
/// overrides than cards is an error.
pub fn override_nets(devices: &mut [VirtioState], overrides: &[NetConfig]) -> Result<(), String> {
    let mut nets = devices.iter_mut().filter_map(|d| match &mut d.backend {
        VirtioBackendConfig::Net(c) => Some(c),
        _ => None,
    });
    for o in overrides {
        let n = nets.next().ok_or_else(|| {
            format!(
                "--net tap={}: the saved VM has fewer network cards than --net options",
                o.tap
            )
        })?;
        *n = n.overridden_by(o);
    }
    Ok(())
}
