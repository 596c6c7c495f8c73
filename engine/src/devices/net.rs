//! virtio-net on a tap interface.
//!
//! Two queues: 0 receives (frames from the tap into the guest's
//! write-only buffers), 1 transmits (the guest's frames out to the tap).
//! Every frame on a queue starts with the 12-byte `virtio_net_hdr_v1`;
//! no offload is offered, so the header is all zero but `num_buffers`
//! (1) on receive, and ignored on transmit. The MAC is in the
//! configuration space (`VIRTIO_NET_F_MAC`), with the link status
//! (`VIRTIO_NET_F_STATUS`, always up).
//!
//! Chains come from the guest and are checked: a receive chain must be
//! write-only, unbroken and large enough for the header and the frame; a
//! transmit chain must be read-only, unbroken, at least a header and an
//! Ethernet header long and at most [`MAX_FRAME`] bytes. A chain that fails
//! is returned with length 0 and counted (`malformed`); on receive the
//! frame waits for the next chain. Nothing the guest writes can make the
//! device panic or allocate more than [`MAX_FRAME`].
//!
//! The tap is opened when the VM first runs here ([`VirtioBackend::activate`]:
//! on a migration destination, after the switch-over committed) and closed
//! when the device pauses ([`VirtioBackend::pause`]), so the source's tap
//! stops delivering frames at the switch-over. Each open but the first
//! of a freshly booted device starts an announce ([`super::announce`]).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{debug, info, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::announce::{self, Schedule};
use super::chain::{next_chain, read_config_bytes, return_chain};
use super::dirty::DirtyLog;
use super::net_config::{format_mac, NetConfig};
use super::tap::Tap;
use super::transport::VirtioBackend;
use super::DeviceError;
use crate::state::VirtioBackendConfig;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// Bytes of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Largest frame moved either way (no offloads: an MTU of 1500 needs
/// 1514; this leaves room for VLAN tags and jumbo frames).
pub const MAX_FRAME: usize = 9216;
/// Ethernet header.
const ETH_HLEN: usize = 14;

/// Counters since the device was created (not part of the saved state).
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes of them (without the virtio header).
    pub rx_bytes: u64,
    /// Frames sent by the guest to the tap.
    pub tx_frames: u64,
    /// Bytes of them.
    pub tx_bytes: u64,
    /// Frames the guest sent that the tap did not take (full, closed).
    pub tx_dropped: u64,
    /// Chains returned unused because they were malformed.
    pub malformed: u64,
    /// Announce rounds sent.
    pub announce_rounds: u64,
    /// Announce frames written to the tap.
    pub announce_frames: u64,
    /// Times the tap was opened.
    pub tap_opens: u64,
}

/// A virtio-net backend.
pub struct Net {
    config: NetConfig,
    tap: Option<Tap>,
    /// Bumped whenever `tap` is replaced (the I/O thread re-registers).
    tap_generation: u64,
    /// Announce on the next open (a restored device, or one reopened after
    /// a pause).
    announce_on_open: bool,
    announce: Schedule,
    /// A frame read from the tap that no receive chain took yet.
    pending: Option<usize>,
    rx_buf: Box<[u8]>,
    stats: NetStats,
}

/// Which descriptors of a chain may be used, or why none.
fn usable(descs: &[Descriptor], write: bool) -> Result<u64, &'static str> {
    if descs.last().is_none_or(|d| d.has_next()) {
        return Err("broken chain");
    }
    if descs.iter().any(|d| d.is_write_only() != write) {
        return Err("a descriptor has the wrong direction");
    }
    Ok(descs.iter().map(|d| u64::from(d.len())).sum())
}

impl Net {
    /// A device for `config`. `restored`: it comes from a saved state, so
    /// its first open announces the guest.
    pub fn new(config: NetConfig, restored: bool) -> Self {
        Self {
            config,
            tap: None,
            tap_generation: 0,
            announce_on_open: restored,
            announce: Schedule::default(),
            pending: None,
            rx_buf: vec![0u8; MAX_FRAME].into_boxed_slice(),
            stats: NetStats::default(),
        }
    }

    /// A device whose "tap" is `fd`, already open: anything that reads
    /// and writes one frame per call without blocking, such as one end of
    /// a non-blocking `UnixDatagram::pair`. For tests of the guest-driven
    /// paths (a receive needs frames to deliver), which have no tap.
    #[doc(hidden)]
    pub fn with_frame_fd(config: NetConfig, fd: std::os::fd::OwnedFd) -> Self {
        let mut net = Self::new(config, false);
        net.tap = Some(Tap::from_fd(fd));
        net.tap_generation = 1;
        net
    }

    /// The counters.
    pub fn counters(&self) -> NetStats {
        self.stats
    }

    /// Copies `src` into the write-only buffers of `descs`, from byte
    /// `at` of the chain on. The caller checked the total length.
    fn scatter(
        descs: &[Descriptor],
        mut at: u64,
        mut src: &[u8],
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> Result<(), String> {
        for d in descs {
            if src.is_empty() {
                break;
            }
            let len = u64::from(d.len());
            if at >= len {
                at -= len;
                continue;
            }
            let n = ((len - at) as usize).min(src.len());
            let gpa = GuestAddress(
                d.addr()
                    .0
                    .checked_add(at)
                    .ok_or_else(|| "address overflows".to_string())?,
            );
            mem.write_slice(&src[..n], gpa)
                .map_err(|e| format!("guest write at {:#x}: {e}", gpa.0))?;
            dirty.mark(gpa.0, n as u64);
            src = &src[n..];
            at = 0;
        }
        Ok(())
    }

    /// Moves frames from the tap into receive chains while both last.
    fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> (u32, Option<String>) {
        let mut done = 0;
        loop {
            let Some(tap) = self.tap.as_mut() else {
                return (done, None);
            };
            let len = match self.pending {
                Some(n) => n,
                None => match tap.read_frame(&mut self.rx_buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (done, None),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!(tap = self.config.tap, "tap read: {e}");
                        return (done, None);
                    }
                },
            };
            self.pending = Some(len);
            let (head, descs) = match next_chain(queue, mem) {
                Ok(Some(c)) => c,
                // No buffer: the frame waits (the guest's next notify
                // brings us back).
                Ok(None) => return (done, None),
                Err(why) => return (done, Some(format!("receive {why}"))),
            };
            let mut hdr = [0u8; HDR_LEN];
            hdr[10] = 1; // num_buffers
            let used = match usable(&descs, true) {
                Ok(cap) if cap >= (HDR_LEN + len) as u64 => {
                    match Self::scatter(&descs, 0, &hdr, mem, dirty).and_then(|()| {
                        Self::scatter(&descs, HDR_LEN as u64, &self.rx_buf[..len], mem, dirty)
                    }) {
                        Ok(()) => Some((HDR_LEN + len) as u32),
                        Err(why) => {
                            debug!(why, "virtio-net receive chain refused");
                            None
                        }
                    }
                }
                Ok(cap) => {
                    debug!(cap, len, "virtio-net receive chain too small");
                    None
                }
                Err(why) => {
                    debug!(why, "virtio-net receive chain refused");
                    None
                }
            };
            match used {
                Some(_) => {
                    self.pending = None;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                }
                None => self.stats.malformed += 1,
            }
            if let Err(why) = return_chain(queue, mem, head, used.unwrap_or(0)) {
                return (done, Some(why));
            }
            done += 1;
        }
    }

    /// Sends every chain the guest made available on the transmit queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (u32, Option<String>) {
        let mut done = 0;
        let mut frame = Vec::new();
        loop {
            let (head, descs) = match next_chain(queue, mem) {
                Ok(Some(c)) => c,
                Ok(None) => return (done, None),
                Err(why) => return (done, Some(format!("transmit {why}"))),
            };
            match self.gather(&descs, mem, &mut frame) {
                Ok(()) => self.send(&frame[HDR_LEN..]),
                Err(why) => {
                    debug!(why, "virtio-net transmit chain refused");
                    self.stats.malformed += 1;
                }
            }
            if let Err(why) = return_chain(queue, mem, head, 0) {
                return (done, Some(why));
            }
            done += 1;
        }
    }

    /// Reads a transmit chain into `frame` (header included).
    fn gather(
        &self,
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        frame: &mut Vec<u8>,
    ) -> Result<(), String> {
        let total = usable(descs, false)?;
        if total < (HDR_LEN + ETH_HLEN) as u64 || total > (HDR_LEN + MAX_FRAME) as u64 {
            return Err(format!("length {total}"));
        }
        frame.clear();
        frame.resize(total as usize, 0);
        let mut at = 0;
        for d in descs {
            let n = d.len() as usize;
            mem.read_slice(&mut frame[at..at + n], d.addr())
                .map_err(|e| format!("guest read at {:#x}: {e}", d.addr().0))?;
            at += n;
        }
        Ok(())
    }

    /// Writes one frame from the guest to the tap, learning the guest's
    /// address on the way.
    fn send(&mut self, eth: &[u8]) {
        self.learn(eth);
        let Some(tap) = self.tap.as_mut() else {
            self.stats.tx_dropped += 1;
            return;
        };
        match tap.write_frame(eth) {
            Ok(_) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += eth.len() as u64;
            }
            Err(e) => {
                self.stats.tx_dropped += 1;
                debug!(tap = self.config.tap, "tap write: {e}");
            }
        }
    }

    /// The guest's IPv4 address, from an ARP or IPv4 frame it sent from
    /// its own MAC.
    fn learn(&mut self, eth: &[u8]) {
        if eth.get(6..12) != Some(&self.config.mac[..]) {
            return;
        }
        let ip = match eth.get(12..14) {
            Some([0x08, 0x06]) => eth.get(28..32),
            Some([0x08, 0x00]) => eth.get(26..30),
            _ => None,
        };
        if let Some(&[a, b, c, d]) = ip {
            let ip = Ipv4Addr::new(a, b, c, d);
            if !ip.is_unspecified() && self.config.guest_ip != Some(ip) {
                info!(tap = self.config.tap, %ip, "guest address learned");
                self.config.guest_ip = Some(ip);
            }
        }
    }

    fn announce_round(&mut self) {
        let Some(tap) = self.tap.as_mut() else {
            return;
        };
        for f in announce::frames(&self.config.mac, self.config.guest_ip) {
            match tap.write_frame(&f) {
                Ok(_) => self.stats.announce_frames += 1,
                Err(e) => debug!(tap = self.config.tap, "announce: {e}"),
            }
        }
        self.stats.announce_rounds += 1;
        debug!(round = self.stats.announce_rounds, "announce sent");
    }
}

impl VirtioBackend for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], le16 status; the rest is not
        // offered and reads as zero.
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.config.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn check(&self) -> Result<(), DeviceError> {
        if self.tap.is_some() {
            return Ok(());
        }
        Tap::check(&self.config.tap).map_err(|source| DeviceError::Open {
            path: self.config.tap.clone().into(),
            source,
        })
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        if self.tap.is_some() {
            return Ok(());
        }
        let tap = Tap::open(&self.config.tap).map_err(|source| DeviceError::Open {
            path: self.config.tap.clone().into(),
            source,
        })?;
        info!(
            tap = self.config.tap,
            mac = format_mac(&self.config.mac),
            "tap opened"
        );
        self.tap = Some(tap);
        self.tap_generation += 1;
        self.stats.tap_opens += 1;
        if self.announce_on_open {
            self.announce.start(Instant::now());
        }
        self.announce_on_open = true;
        Ok(())
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> (u32, Option<String>) {
        match index {
            RX => self.receive(queue, mem, dirty),
            TX => self.transmit(queue, mem),
            _ => (0, None),
        }
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn pause(&mut self) {
        if self.tap.take().is_some() {
            info!(tap = self.config.tap, "tap closed (paused)");
            self.tap_generation += 1;
        }
        self.pending = None;
        self.announce.cancel();
    }

    fn event_fd(&self) -> Option<(std::os::unix::io::RawFd, u64, usize)> {
        self.tap.as_ref().map(|t| (t.fd(), self.tap_generation, RX))
    }

    fn tick(&mut self) -> Option<Duration> {
        let now = Instant::now();
        while self.announce.due(now) {
            self.announce_round();
        }
        self.announce.wait(now)
    }

    fn config(&self) -> VirtioBackendConfig {
        VirtioBackendConfig::Net(self.config.clone())
    }

    fn stats(&self) -> serde_json::Value {
        let s = self.stats;
        json!({
            "kind": "net",
            "tap": self.config.tap,
            "mac": format_mac(&self.config.mac),
            "guest_ip": self.config.guest_ip.map(|i| i.to_string()),
            "rx_frames": s.rx_frames,
            "rx_bytes": s.rx_bytes,
            "tx_frames": s.tx_frames,
            "tx_bytes": s.tx_bytes,
            "tx_dropped": s.tx_dropped,
            "malformed": s.malformed,
            "announce_rounds": s.announce_rounds,
            "announce_frames": s.announce_frames,
            "tap_opens": s.tap_opens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn queue(mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(16);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        let _ = mem;
        q
    }

    fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn publish(mem: &GuestMemoryMmap, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    #[test]
    fn malformed_transmit_chains_are_returned_unused_without_panic() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let dirty = DirtyLog::default();
        let mut q = queue(&mem);
        let mut net = Net::new(
            NetConfig::parse("tap=none0,mac=52:54:00:00:00:01").unwrap(),
            false,
        );
        // 0: write-only; 1: outside RAM; 2: a loop; 3: next out of the
        // table; 4: 4 GiB long; 5: too short; 6: a good frame (no tap:
        // dropped, still returned).
        desc(&mem, 0, 0x8000, 64, 2, 0);
        desc(&mem, 1, 0xffff_ff00_0000, 64, 0, 0);
        desc(&mem, 2, 0x8000, 64, 1, 2);
        desc(&mem, 3, 0x8000, 64, 1, 200);
        desc(&mem, 4, 0x8000, u32::MAX, 0, 0);
        desc(&mem, 5, 0x8000, 8, 0, 0);
        desc(&mem, 6, 0x8000, 60, 0, 0);
        publish(&mem, &[0, 1, 2, 3, 4, 5, 6, 77]);
        let (done, broken) = net.process(TX, &mut q, &mem, &dirty);
        assert_eq!(done, 7);
        assert!(broken.is_some(), "head 77 is outside the queue");
        let s = net.counters();
        // Six bad chains, and head 77 (read as an empty chain that cannot
        // be returned).
        assert_eq!(s.malformed, 7, "{s:?}");
        assert_eq!(s.tx_dropped, 1, "{s:?}");
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 7);
    }

    #[test]
    fn receive_without_a_tap_takes_no_chain() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let dirty = DirtyLog::default();
        let mut q = queue(&mem);
        let mut net = Net::new(
            NetConfig::parse("tap=none0,mac=52:54:00:00:00:01").unwrap(),
            false,
        );
        desc(&mem, 0, 0x8000, 2048, 2, 0);
        publish(&mem, &[0]);
        assert_eq!(net.process(RX, &mut q, &mem, &dirty), (0, None));
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let net = Net::new(
            NetConfig::parse("tap=none0,mac=52:54:00:00:00:01").unwrap(),
            false,
        );
        let mut b = [0u8; 10];
        net.read_config(0, &mut b);
        assert_eq!(b, [0x52, 0x54, 0, 0, 0, 1, 1, 0, 0, 0]);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }
}
