//! One virtio-mmio device and its I/O thread.
//!
//! The guest's queue notifications arrive on ioeventfds (KVM signals them
//! without leaving the guest), one per queue; the device's thread waits on
//! them, serves the queue under the device's mutex and raises the
//! interrupt through an irqfd. A vCPU thread only ever takes the mutex for
//! a register access, so no disk I/O runs on a vCPU thread.
//!
//! A drain ([`VirtioMmioDevice::drain`]) runs on the caller's thread once
//! the vCPUs are stopped: it serves whatever the guest made available and
//! the thread has not picked up yet, makes the writes durable (fdatasync),
//! and leaves the device paused, so a state saved afterwards has no request
//! in flight. [`VirtioMmioDevice::resume`] opens the backend if it is not
//! open yet (a migration destination opens its disks only here, after the
//! switch-over committed) and lets the thread serve again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::dirty::DirtyLog;
use super::transport::{MmioTransport, WriteEffect};
use super::DeviceError;
use crate::state::VirtioState;

/// Event data of the stop eventfd (queue eventfds use their index).
const STOP: u64 = u64::MAX;
/// Event data of the backend's own fd (a tap).
const BACKEND: u64 = u64::MAX - 1;

struct Shared {
    transport: Mutex<MmioTransport>,
    mem: GuestMemoryMmap,
    dirty: Arc<DirtyLog>,
    irq: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves queue `index` with the lock held; raises the interrupt if
    /// anything completed. Returns how many requests completed.
    fn serve(&self, t: &mut MmioTransport, index: usize) -> u32 {
        let n = t.process(index, &self.mem, &self.dirty);
        if n > 0 {
            if let Err(e) = self.irq.write(1) {
                warn!("virtio interrupt: {e}");
            }
        }
        n
    }
}

/// A virtio-mmio device with its own I/O thread.
pub struct VirtioMmioDevice {
    shared: Arc<Shared>,
    queue_evts: Vec<EventFd>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl VirtioMmioDevice {
    /// Starts the I/O thread of `transport`. `queue_evts` (one per queue,
    /// already registered as ioeventfds) and `irq` (an irqfd) belong to the
    /// device from now on.
    pub fn start(
        name: String,
        latency: Duration,
        transport: MmioTransport,
        mem: GuestMemoryMmap,
        dirty: Arc<DirtyLog>,
        irq: EventFd,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, DeviceError> {
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(DeviceError::EventFd)?;
        let epoll = Epoll::new().map_err(DeviceError::EventFd)?;
        for (i, e) in queue_evts.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    e.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(DeviceError::EventFd)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(DeviceError::EventFd)?;
        let shared = Arc::new(Shared {
            transport: Mutex::new(transport),
            mem,
            dirty,
            irq,
        });
        let evts = queue_evts
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::EventFd)?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || io_thread(s, epoll, evts, latency))
            .map_err(DeviceError::Spawn)?;
        Ok(Self {
            shared,
            queue_evts,
            stop,
            thread: Some(thread),
        })
    }

    /// A guest read of the register at `offset` (vCPU thread).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.shared.lock().read(offset, data);
    }

    /// A guest write of the register at `offset` (vCPU thread).
    pub fn write(&self, offset: u64, data: &[u8]) {
        let effect = self.shared.lock().write(offset, data);
        if let WriteEffect::Notify(q) = effect {
            // Not through the ioeventfd (e.g. a narrow write): hand it to
            // the I/O thread the same way.
            if let Some(e) = self.queue_evts.get(q) {
                let _ = e.write(1);
            }
        }
    }

    /// Serves what is pending, flushes, and stops serving until
    /// [`Self::resume`]. Call with the vCPUs stopped. Returns how many
    /// requests the drain itself completed (made available by the guest
    /// but not yet picked up by the I/O thread).
    pub fn drain(&self) -> Result<u32, DeviceError> {
        let mut t = self.shared.lock();
        if !t.activated() {
            // Never ran here (a restored device before its first resume):
            // nothing can be in flight, and there is no file to touch.
            t.set_paused(true);
            return Ok(0);
        }
        t.set_paused(false);
        let mut n = 0;
        for i in 0..t.queue_count() {
            n += self.shared.serve(&mut t, i);
        }
        t.set_paused(true);
        t.flush()?;
        t.pause_backend();
        Ok(n)
    }

    /// Opens the backend if needed and serves again.
    pub fn resume(&self) -> Result<(), DeviceError> {
        let mut t = self.shared.lock();
        t.activate_backend()?;
        t.set_paused(false);
        drop(t);
        // Anything made available while paused is served now.
        for e in &self.queue_evts {
            let _ = e.write(1);
        }
        Ok(())
    }

    /// Hands the backend's hold on its file over (see
    /// [`super::transport::VirtioBackend::hand_over`]); call it drained.
    pub fn hand_over(&self, keep_reading: bool) -> Result<(), DeviceError> {
        self.shared.lock().hand_over_backend(keep_reading)
    }

    /// See [`super::transport::VirtioBackend::take_back`].
    pub fn take_back(&self) -> Result<(), DeviceError> {
        self.shared.lock().take_back_backend()
    }

    /// The device's registers and queues (drain it first).
    pub fn save(&self) -> VirtioState {
        self.shared.lock().save()
    }

    /// The backend's counters.
    pub fn stats(&self) -> serde_json::Value {
        self.shared.lock().backend().stats()
    }
}

use std::os::unix::io::AsRawFd;

impl Drop for VirtioMmioDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io_thread(shared: Arc<Shared>, epoll: Epoll, evts: Vec<EventFd>, latency: Duration) {
    let mut events = vec![EpollEvent::default(); evts.len() + 2];
    // The backend's fd as registered: (fd, generation, queue).
    let mut registered: Option<(i32, u64, usize)> = None;
    loop {
        let timeout = {
            let mut t = shared.lock();
            let now = t.event_fd();
            if now.map(|(f, g, _)| (f, g)) != registered.map(|(f, g, _)| (f, g)) {
                if let Some((old, _, _)) = registered.take() {
                    // Closed fds leave the epoll set by themselves; an
                    // error here only says it already left.
                    let _ = epoll.ctl(ControlOperation::Delete, old, EpollEvent::default());
                }
                if let Some((fd, g, q)) = now {
                    match epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND),
                    ) {
                        Ok(()) => {
                            registered = Some((fd, g, q));
                            // Frames that came before the registration.
                            let _ = shared.serve(&mut t, q);
                        }
                        Err(e) => warn!("virtio I/O thread: cannot wait on the backend: {e}"),
                    }
                }
            }
            t.tick()
                .map(|d| d.as_millis().min(60_000) as i32 + 1)
                .unwrap_or(-1)
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("virtio I/O thread: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let data = ev.data();
            if data == STOP {
                debug!("virtio I/O thread stops");
                return;
            }
            if data == BACKEND {
                if let Some((_, _, q)) = registered {
                    let mut t = shared.lock();
                    let _ = shared.serve(&mut t, q);
                }
                continue;
            }
            let i = data as usize;
            if let Some(e) = evts.get(i) {
                let _ = e.read();
                if !latency.is_zero() {
                    std::thread::sleep(latency);
                    // Notifications that came meanwhile are served now too.
                    let _ = e.read();
                }
                let mut t = shared.lock();
                let _ = shared.serve(&mut t, i);
            }
        }
    }
}
