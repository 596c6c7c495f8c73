//! The virtio-mmio register file (virtio 1.x, "version 2" transport),
//! generic over the device behind it.
//!
//! Everything here runs under the device's mutex, either on a vCPU thread
//! (a register access: cheap, no I/O) or on the device's own I/O thread
//! (serving a queue). Guest values are untrusted: a bad register access is
//! ignored, a bad queue configuration leaves the queue unusable and the
//! device reports `DEVICE_NEEDS_RESET`; nothing panics.

use tracing::warn;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::dirty::DirtyLog;
use super::DeviceError;
use crate::state::{VirtioBackendConfig, VirtioState};

/// "virt", the magic value at offset 0.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO transport.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("FRRY").
pub const VENDOR_ID: u32 = 0x5952_5246;

/// A device model behind the transport: what makes a block device a block
/// device. One per device, owned by the transport.
pub trait VirtioBackend: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Feature bits offered (`VIRTIO_F_VERSION_1` is added by the transport).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Opens what backs the device (a file), if not open yet. Called when
    /// the VM starts running, so a migration destination opens it only
    /// after the switch-over committed.
    fn activate(&mut self) -> Result<(), DeviceError>;
    /// A migration's source reached its switch-over: let go of what the
    /// destination takes when it starts (a disk's lock), keeping at most
    /// what lets this side still read it (`keep_reading`). The next
    /// [`Self::activate`] (a roll-back's resume) takes it back, or fails.
    fn hand_over(&mut self, _keep_reading: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Takes back what [`Self::hand_over`] let go (a roll-back), without
    /// starting the device; fails if someone else took it meanwhile.
    fn take_back(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Checks, without opening anything, that [`Self::activate`] would
    /// find its backend (a restore checks this before the VM may
    /// run, so a missing disk refuses the move instead of failing after
    /// its commit).
    fn check(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Serves every request available on queue `index`; returns how many
    /// were completed (put in the used ring), and why the queue cannot be
    /// served any more if it cannot (the device then needs a reset).
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> (u32, Option<String>);
    /// Makes completed writes durable (a drain ends with it).
    fn flush(&mut self) -> Result<(), DeviceError>;
    /// The device stops until the next [`Self::activate`] (a drain, after
    /// [`Self::flush`]): let go of what a paused VM must not hold (a tap
    /// that would otherwise keep taking the VM's frames).
    fn pause(&mut self) {}
    /// An fd the device's I/O thread also waits on (readable,
    /// edge-triggered), a generation that changes whenever the fd is
    /// replaced, and the queue to serve when it is readable.
    fn event_fd(&self) -> Option<(std::os::unix::io::RawFd, u64, usize)> {
        None
    }
    /// Timed work (an announce), run by the I/O thread while the device
    /// runs; returns how long until it is due again.
    fn tick(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// What a restore needs to rebuild this backend.
    fn config(&self) -> VirtioBackendConfig;
    /// Counters for the API's status.
    fn stats(&self) -> serde_json::Value;
}

/// Sets the low or high half of one of a queue's ring addresses. A value
/// the queue refuses (misaligned) is ignored, silently: this runs on a
/// vCPU thread, which must not log on a guest's behalf.
fn set_ring_half(q: &mut Queue, reg: u32, v: u32) {
    let half = |old: u64| match reg & 4 {
        0 => (old & !0xffff_ffff) | u64::from(v),
        _ => (old & 0xffff_ffff) | (u64::from(v) << 32),
    };
    let _ = match reg & !4 {
        VIRTIO_MMIO_QUEUE_DESC_LOW => {
            q.try_set_desc_table_address(GuestAddress(half(q.desc_table())))
        }
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
            q.try_set_avail_ring_address(GuestAddress(half(q.avail_ring())))
        }
        _ => q.try_set_used_ring_address(GuestAddress(half(q.used_ring()))),
    };
}

/// What a register write asks of the device beyond the register file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing.
    None,
    /// The driver notified queue `n` (a notify that did not go through the
    /// ioeventfd, e.g. a narrow write).
    Notify(usize),
}

/// The registers of one virtio-mmio device, and its backend.
pub struct MmioTransport {
    backend: Box<dyn VirtioBackend>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
    /// Set by a drain: no request is served until the VM runs again.
    paused: bool,
    /// The backend was opened ([`Self::activate_backend`]).
    activated: bool,
}

fn new_queues(backend: &dyn VirtioBackend) -> Result<Vec<Queue>, DeviceError> {
    backend
        .queue_max_sizes()
        .iter()
        .map(|&m| Queue::new(m).map_err(|e| DeviceError::Queue(format!("{e}"))))
        .collect()
}

impl MmioTransport {
    /// A device in its reset state.
    pub fn new(backend: Box<dyn VirtioBackend>) -> Result<Self, DeviceError> {
        let queues = new_queues(backend.as_ref())?;
        Ok(Self {
            backend,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            paused: true,
            activated: false,
        })
    }

    /// A device as `state` describes it. The state is untrusted: queues
    /// are rebuilt through virtio-queue's checks, and a state that does
    /// not fit the backend is refused.
    pub fn from_state(
        backend: Box<dyn VirtioBackend>,
        state: &VirtioState,
    ) -> Result<Self, DeviceError> {
        if state.device_type != backend.device_type() {
            return Err(DeviceError::State(format!(
                "device type {} where {} was expected",
                state.device_type,
                backend.device_type()
            )));
        }
        let max = backend.queue_max_sizes();
        if state.queues.len() != max.len() {
            return Err(DeviceError::State(format!(
                "{} queues where the device has {}",
                state.queues.len(),
                max.len()
            )));
        }
        let mut queues = Vec::with_capacity(max.len());
        for (i, (qs, &m)) in state.queues.iter().zip(max).enumerate() {
            if qs.max_size != m {
                return Err(DeviceError::State(format!(
                    "queue {i} has max size {} where the device has {m}",
                    qs.max_size
                )));
            }
            let q = if qs.ready {
                Queue::try_from(*qs).map_err(|e| DeviceError::State(format!("queue {i}: {e}")))?
            } else {
                // A queue the driver has not finished setting up: keep
                // what it wrote so far where it is valid.
                let mut q = Queue::new(m).map_err(|e| DeviceError::Queue(format!("{e}")))?;
                let _ = q.try_set_size(qs.size);
                q.set_desc_table_address(
                    Some(qs.desc_table as u32),
                    Some((qs.desc_table >> 32) as u32),
                );
                q.set_avail_ring_address(
                    Some(qs.avail_ring as u32),
                    Some((qs.avail_ring >> 32) as u32),
                );
                q.set_used_ring_address(
                    Some(qs.used_ring as u32),
                    Some((qs.used_ring >> 32) as u32),
                );
                q.set_next_avail(qs.next_avail);
                q.set_next_used(qs.next_used);
                q
            };
            queues.push(q);
        }
        Ok(Self {
            backend,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            queues,
            paused: true,
            activated: false,
        })
    }

    /// The registers and queues, for a saved state.
    pub fn save(&self) -> VirtioState {
        VirtioState {
            device_type: self.backend.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            backend: self.backend.config(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &dyn VirtioBackend {
        self.backend.as_ref()
    }

    /// How many queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn device_features(&self) -> u64 {
        self.backend.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    /// True when the driver finished setting the device up and the device
    /// is usable.
    pub fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
    }

    /// Stops serving requests (a drain).
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Opens the backend (see [`VirtioBackend::activate`]).
    pub fn activate_backend(&mut self) -> Result<(), DeviceError> {
        self.backend.activate()?;
        self.activated = true;
        Ok(())
    }

    /// See [`VirtioBackend::hand_over`].
    pub fn hand_over_backend(&mut self, keep_reading: bool) -> Result<(), DeviceError> {
        self.backend.hand_over(keep_reading)
    }

    /// See [`VirtioBackend::take_back`].
    pub fn take_back_backend(&mut self) -> Result<(), DeviceError> {
        self.backend.take_back()
    }

    /// See [`VirtioBackend::check`].
    pub fn check_backend(&self) -> Result<(), DeviceError> {
        self.backend.check()
    }

    /// True once the backend was opened.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Flushes the backend.
    pub fn flush(&mut self) -> Result<(), DeviceError> {
        self.backend.flush()
    }

    /// See [`VirtioBackend::pause`].
    pub fn pause_backend(&mut self) {
        self.backend.pause()
    }

    /// See [`VirtioBackend::event_fd`].
    pub fn event_fd(&self) -> Option<(std::os::unix::io::RawFd, u64, usize)> {
        self.backend.event_fd()
    }

    /// Runs the backend's timed work while the device runs (see
    /// [`VirtioBackend::tick`]).
    pub fn tick(&mut self) -> Option<std::time::Duration> {
        if self.paused {
            return None;
        }
        self.backend.tick()
    }

    /// Serves queue `index` if the device runs; returns how many requests
    /// completed. Marks the used ring dirty and sets the interrupt status
    /// when any did; the caller raises the interrupt.
    pub fn process(&mut self, index: usize, mem: &GuestMemoryMmap, dirty: &DirtyLog) -> u32 {
        if self.paused || !self.active() {
            return 0;
        }
        let Some(q) = self.queues.get_mut(index) else {
            return 0;
        };
        if !q.ready() {
            return 0;
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire).ok();
            tracing::trace!(
                queue = index,
                ?avail,
                next_avail = q.next_avail(),
                "serving"
            );
        }
        let (done, broken) = self.backend.process(index, q, mem, dirty);
        let used_ring = (q.used_ring(), 6 + 8 * u64::from(q.size()));
        if let Some(why) = broken {
            warn!(queue = index, "virtio device needs a reset: {why}");
            self.needs_reset();
        }
        if done > 0 {
            // The used ring: flags, idx, the elements, avail_event.
            dirty.mark(used_ring.0, used_ring.1);
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
        done
    }

    /// A guest read of the register at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.backend
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.backend.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_READY => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of the register at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> WriteEffect {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.backend
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return WriteEffect::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return WriteEffect::None;
        };
        if !offset.is_multiple_of(4) {
            return WriteEffect::None;
        }
        let v = u32::from_le_bytes(bytes);
        let sel = self.queue_sel as usize;
        // Queue registers may only change while the queue is not ready.
        let configurable = self.queues.get(sel).is_some_and(|q| !q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configurable => {
                // An invalid size (0, not a power of two, above the
                // maximum, or beyond 16 bits) is ignored: the queue keeps
                // its size.
                if let Ok(size) = u16::try_from(v) {
                    let _ = self.queues[sel].try_set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if configurable =>
            {
                set_ring_half(&mut self.queues[sel], offset as u32, v)
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if (v as usize) < self.queues.len() => {
                return WriteEffect::Notify(v as usize);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => {}
        }
        WriteEffect::None
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK sticks only if the driver asked for nothing we lack
        // and accepted VERSION_1 (the modern transport requires it).
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        // DRIVER_OK with a ready queue that cannot be used: the driver
        // gets NEEDS_RESET rather than a device that silently ignores it.
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            let bad = self
                .queues
                .iter()
                .any(|q| q.ready() && !Queue::try_from(q.state()).is_ok_and(|_| q.size() > 0));
            if bad {
                v |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = v;
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    /// Marks the device broken (`DEVICE_NEEDS_RESET`), e.g. when its queue
    /// state cannot be served any more.
    pub fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Blk, DiskConfig};

    fn reg(t: &MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn set(t: &mut MmioTransport, off: u32, v: u32) -> WriteEffect {
        t.write(u64::from(off), &v.to_le_bytes())
    }

    fn blk() -> MmioTransport {
        MmioTransport::new(Box::new(Blk::new(DiskConfig::new("/nonexistent", "s")))).unwrap()
    }

    #[test]
    fn identity_and_feature_negotiation() {
        let mut t = blk();
        assert_eq!(reg(&t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(reg(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(reg(&t, VIRTIO_MMIO_DEVICE_ID), 2);
        set(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(reg(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1");
        // A feature the device does not offer: FEATURES_OK does not stick.
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        set(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(reg(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Reset, then only what is offered.
        set(&mut t, VIRTIO_MMIO_STATUS, 0);
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        set(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        set(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_ne!(reg(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn bad_accesses_are_ignored_and_a_bad_queue_needs_reset() {
        let mut t = blk();
        // Narrow, unaligned and unknown accesses: no effect, no panic.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(3, &[1, 2, 3, 4]);
        t.write(0x50, &[0]);
        assert_eq!(set(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7), WriteEffect::None);
        assert_eq!(
            set(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            WriteEffect::Notify(0)
        );
        set(&mut t, VIRTIO_MMIO_QUEUE_SEL, 9);
        assert_eq!(reg(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        set(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        set(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        // Queue 0 made ready with an invalid size and an unaligned ring:
        // both values are refused (the queue keeps its defaults, rings at
        // 0), and the first notification finds the queue unusable.
        set(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        set(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
        set(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1001);
        set(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        set(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | 8 | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert!(t.active());
        t.set_paused(false);
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 16)]).unwrap();
        let dirty = DirtyLog::default();
        assert_eq!(t.process(0, &mem, &dirty), 0);
        assert_ne!(reg(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!t.active());
        // The state of a broken device still saves and restores.
        let s = t.save();
        let back =
            MmioTransport::from_state(Box::new(Blk::new(DiskConfig::new("/nonexistent", "s"))), &s)
                .unwrap();
        assert!(!back.active());
    }

    #[test]
    fn a_queue_size_beyond_16_bits_is_ignored_not_truncated() {
        let mut t = blk();
        set(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        // 0x10010 would have become 16.
        set(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0x1_0010);
        assert_eq!(t.save().queues[0].size, 256);
        set(&mut t, VIRTIO_MMIO_QUEUE_NUM, 24);
        assert_eq!(t.save().queues[0].size, 256, "not a power of two");
        set(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(t.save().queues[0].size, 16);
    }

    #[test]
    fn config_space_reads_capacity_bytes_and_zero_beyond() {
        let t = blk();
        let mut b = [0xffu8; 16];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 4, &mut b);
        assert_eq!(b, [0; 16]);
    }
}
