//! The announce after a move (QEMU's `announce-self`): a RARP and a
//! gratuitous ARP broadcast from the guest's MAC, sent [`ROUNDS`] times,
//! the first at once, then after gaps of 50, 150, 250 and 350 ms
//! ([`INITIAL`] growing by [`STEP`]). The RARP teaches every switch and
//! bridge on the way where the MAC now lives; the gratuitous ARP (when the
//! guest's address is known) refreshes the peers' neighbour caches.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Rounds of frames.
pub const ROUNDS: u32 = 5;
/// Gap after the first round.
pub const INITIAL: Duration = Duration::from_millis(50);
/// How much each gap grows.
pub const STEP: Duration = Duration::from_millis(100);
/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// Ethertype of ARP.
pub const ETH_P_ARP: u16 = 0x0806;

/// An ARP-format frame (RARP or ARP, 60 bytes with padding) broadcast
/// from `mac`: `op` 3 is a reverse request, 1 a request.
fn arp_frame(ethertype: u16, op: u16, mac: &[u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(mac); // sender
    f.extend_from_slice(&ip.octets());
    let target_mac: [u8; 6] = if op == 3 { *mac } else { [0; 6] };
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// The frames of one round.
pub fn frames(mac: &[u8; 6], ip: Option<Ipv4Addr>) -> Vec<Vec<u8>> {
    let mut v = vec![arp_frame(ETH_P_RARP, 3, mac, Ipv4Addr::UNSPECIFIED)];
    if let Some(ip) = ip {
        v.push(arp_frame(ETH_P_ARP, 1, mac, ip));
    }
    v
}

/// When the next rounds are due.
#[derive(Debug, Default, Clone, Copy)]
pub struct Schedule {
    next: Option<Instant>,
    done: u32,
}

impl Schedule {
    /// Starts a new announce now (replacing one under way).
    pub fn start(&mut self, now: Instant) {
        self.next = Some(now);
        self.done = 0;
    }

    /// Stops it (the device paused).
    pub fn cancel(&mut self) {
        self.next = None;
    }

    /// True when a round is due at `now`; the round counts as done.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.next {
            Some(t) if t <= now => {
                self.done += 1;
                self.next = (self.done < ROUNDS).then(|| now + INITIAL + STEP * (self.done - 1));
                true
            }
            _ => false,
        }
    }

    /// How long until the next round, if one is pending.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.next.map(|t| t.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_rounds_with_growing_gaps() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        assert!(!s.due(t0));
        s.start(t0);
        let mut t = t0;
        let mut gaps = Vec::new();
        while s.due(t) {
            let w = s.wait(t);
            if let Some(w) = w {
                gaps.push(w.as_millis());
                t += w;
            }
        }
        assert_eq!(gaps, [50, 150, 250, 350]);
    }

    #[test]
    fn frames_are_rarp_and_gratuitous_arp() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = frames(&mac, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(f.len(), 2);
        assert_eq!(&f[0][12..14], &[0x80, 0x35]);
        assert_eq!(&f[0][6..12], &mac);
        assert_eq!(&f[1][12..14], &[0x08, 0x06]);
        assert_eq!(&f[1][28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[1][38..42], &[10, 0, 0, 2]);
        assert!(f.iter().all(|f| f.len() == 60));
        assert_eq!(frames(&mac, None).len(), 1);
    }
}
