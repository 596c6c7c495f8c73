//! The payload of a `Virtio` state section: one virtio-mmio device.
//!
//! ```text
//! device_type u32 | status u32 | device_features_sel u32 | driver_features_sel u32
//! driver_features u64 | queue_sel u32 | interrupt_status u32 | config_generation u32
//! queue_count u16 | queue_count x { max_size u16, size u16, ready u8, event_idx u8,
//!                                   next_avail u16, next_used u16,
//!                                   desc_table u64, avail_ring u64, used_ring u64 }
//! backend kind u8 | backend payload
//!   kind 1 (blk): readonly u8 | serial_len u8 | serial | path_len u16 | path bytes
//!   kind 2 (net): tap_len u8 | tap name | mac [u8; 6] | has_ip u8 | ip [u8; 4] if has_ip
//! ```
//!
//! Little-endian. The decoder checks every length and bound (queue count,
//! serial length and characters, path length, no trailing bytes) and
//! never panics; queue contents are checked again when the device is
//! rebuilt from them.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use virtio_queue::QueueState;

use super::{VirtioBackendConfig, VirtioState};
use crate::devices::{DiskConfig, NetConfig};

/// Most queues a saved device may have.
pub const MAX_QUEUES: usize = 16;
const BACKEND_BLK: u8 = 1;
const BACKEND_NET: u8 = 2;

/// Encodes one device.
pub fn encode(s: &VirtioState) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + 34 * s.queues.len());
    for x in [
        s.device_type,
        s.status,
        s.device_features_sel,
        s.driver_features_sel,
    ] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&s.driver_features.to_le_bytes());
    for x in [s.queue_sel, s.interrupt_status, s.config_generation] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&(s.queues.len() as u16).to_le_bytes());
    for q in &s.queues {
        v.extend_from_slice(&q.max_size.to_le_bytes());
        v.extend_from_slice(&q.size.to_le_bytes());
        v.push(u8::from(q.ready));
        v.push(u8::from(q.event_idx_enabled));
        v.extend_from_slice(&q.next_avail.to_le_bytes());
        v.extend_from_slice(&q.next_used.to_le_bytes());
        for a in [q.desc_table, q.avail_ring, q.used_ring] {
            v.extend_from_slice(&a.to_le_bytes());
        }
    }
    match &s.backend {
        VirtioBackendConfig::Blk(d) => {
            v.push(BACKEND_BLK);
            v.push(u8::from(d.readonly));
            v.push(d.serial.len() as u8);
            v.extend_from_slice(d.serial.as_bytes());
            let p = d.path.as_os_str().as_bytes();
            v.extend_from_slice(&(p.len() as u16).to_le_bytes());
            v.extend_from_slice(p);
        }
        VirtioBackendConfig::Net(n) => {
            v.push(BACKEND_NET);
            v.push(n.tap.len() as u8);
            v.extend_from_slice(n.tap.as_bytes());
            v.extend_from_slice(&n.mac);
            match n.guest_ip {
                Some(ip) => {
                    v.push(1);
                    v.extend_from_slice(&ip.octets());
                }
                None => v.push(0),
            }
        }
    }
    v
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err(format!(
                "truncated: {n} bytes needed, {} left",
                self.b.len()
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(format!("flag byte {x}")),
        }
    }
}

/// Decodes one device; the error says what is wrong.
pub fn decode(p: &[u8]) -> Result<VirtioState, String> {
    let mut c = Cursor { b: p };
    let device_type = c.u32()?;
    let status = c.u32()?;
    let device_features_sel = c.u32()?;
    let driver_features_sel = c.u32()?;
    let driver_features = c.u64()?;
    let queue_sel = c.u32()?;
    let interrupt_status = c.u32()?;
    let config_generation = c.u32()?;
    let n = c.u16()? as usize;
    if n > MAX_QUEUES {
        return Err(format!("{n} queues (at most {MAX_QUEUES})"));
    }
    let mut queues = Vec::with_capacity(n);
    for _ in 0..n {
        queues.push(QueueState {
            max_size: c.u16()?,
            size: c.u16()?,
            ready: c.flag()?,
            event_idx_enabled: c.flag()?,
            next_avail: c.u16()?,
            next_used: c.u16()?,
            desc_table: c.u64()?,
            avail_ring: c.u64()?,
            used_ring: c.u64()?,
        });
    }
    let backend = match c.u8()? {
        BACKEND_BLK => {
            let readonly = c.flag()?;
            let sn = c.u8()? as usize;
            let serial = std::str::from_utf8(c.take(sn)?)
                .map_err(|_| "serial is not UTF-8".to_string())?
                .to_string();
            let pn = c.u16()? as usize;
            let path = PathBuf::from(std::ffi::OsString::from_vec(c.take(pn)?.to_vec()));
            if path.as_os_str().as_bytes().contains(&0) {
                return Err("path contains NUL".into());
            }
            let d = DiskConfig {
                path,
                readonly,
                serial,
                latency_us: 0,
                migrated: None,
            };
            d.validate()?;
            VirtioBackendConfig::Blk(d)
        }
        BACKEND_NET => {
            let tn = c.u8()? as usize;
            let tap = std::str::from_utf8(c.take(tn)?)
                .map_err(|_| "tap name is not UTF-8".to_string())?
                .to_string();
            let mut mac = [0u8; 6];
            mac.copy_from_slice(c.take(6)?);
            let guest_ip = if c.flag()? {
                let b = c.take(4)?;
                Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            } else {
                None
            };
            let n = NetConfig { tap, mac, guest_ip };
            n.validate()?;
            VirtioBackendConfig::Net(n)
        }
        k => return Err(format!("unknown backend kind {k}")),
    };
    if !c.b.is_empty() {
        return Err(format!("{} bytes after the device", c.b.len()));
    }
    Ok(VirtioState {
        device_type,
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        config_generation,
        queues,
        backend,
    })
}

#[cfg(test)]
pub(crate) fn sample() -> VirtioState {
    VirtioState {
        device_type: 2,
        status: 15,
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: 1 << 32 | 1 << 9,
        queue_sel: 0,
        interrupt_status: 1,
        config_generation: 0,
        queues: vec![QueueState {
            max_size: 256,
            size: 16,
            ready: true,
            event_idx_enabled: false,
            next_avail: 77,
            next_used: 77,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2000,
        }],
        backend: VirtioBackendConfig::Blk(DiskConfig {
            path: "/var/lib/disk.img".into(),
            readonly: false,
            serial: "ferry0".into(),
            latency_us: 0,
            migrated: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation() {
        let s = sample();
        let b = encode(&s);
        assert_eq!(decode(&b).unwrap(), s);
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode(&long).is_err());
    }

    #[test]
    fn net_round_trip_and_every_truncation() {
        for guest_ip in [None, Some(std::net::Ipv4Addr::new(10, 88, 0, 2))] {
            let mut s = sample();
            s.device_type = 1;
            s.backend = VirtioBackendConfig::Net(NetConfig {
                tap: "ftap0".into(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
                guest_ip,
            });
            let b = encode(&s);
            assert_eq!(decode(&b).unwrap(), s);
            for n in 0..b.len() {
                assert!(decode(&b[..n]).is_err(), "truncated to {n}");
            }
        }
    }
}
