//! How a network card is described: `--net tap=NAME,mac=MAC`.

use std::net::Ipv4Addr;

/// Longest tap name (`IFNAMSIZ` - 1).
pub const MAX_TAP_NAME: usize = 15;

/// A virtio-net device on a tap interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface on this host. Ferry opens it (and the kernel
    /// creates it if it does not exist: then it is not on any bridge and
    /// vanishes when Ferry closes it, so give a migrating VM a persistent
    /// tap made beforehand, e.g. `ip tuntap add NAME mode tap`).
    pub tap: String,
    /// The guest's MAC address (config space, `VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// The guest's IPv4 address as last seen in a frame it sent (ARP
    /// sender or IPv4 source from its own MAC): what the gratuitous ARP of
    /// the announce after a move claims. Learned by the device, saved with
    /// the VM; `None` until the guest sent something.
    pub guest_ip: Option<Ipv4Addr>,
}

/// Formats a MAC as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    /// Parses `tap=NAME,mac=MAC` (both required).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for p in spec.split(',') {
            match p.split_once('=') {
                Some(("tap", t)) => tap = Some(t.to_string()),
                Some(("mac", m)) => {
                    mac = Some(parse_mac(m).ok_or_else(|| {
                        format!("--net {spec:?}: MAC {m:?} is not like 52:54:00:12:34:56")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "--net {spec:?}: unknown option {p:?} (expected tap=NAME,mac=MAC)"
                    ))
                }
            }
        }
        let c = NetConfig {
            tap: tap.ok_or_else(|| format!("--net {spec:?}: no tap=NAME"))?,
            mac: mac.ok_or_else(|| format!("--net {spec:?}: no mac=MAC"))?,
            guest_ip: None,
        };
        c.validate().map_err(|e| format!("--net {spec:?}: {e}"))?;
        Ok(c)
    }

    /// Checks the bounds the state blob and the tap ioctl rely on.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.tap.len();
        if n == 0
            || n > MAX_TAP_NAME
            || !self.tap.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(format!(
                "tap name {:?}: 1 to {MAX_TAP_NAME} printable characters, no '/'",
                self.tap
            ));
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(format!(
                "MAC {} is multicast or zero",
                format_mac(&self.mac)
            ));
        }
        Ok(())
    }

    /// This card with what `other` (a `--net` given at a restore) says:
    /// its tap and MAC. The learned address stays (the guest keeps it).
    pub fn overridden_by(&self, other: &NetConfig) -> NetConfig {
        NetConfig {
            guest_ip: self.guest_ip,
            ..other.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let c = NetConfig::parse("tap=ftap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(c.tap, "ftap0");
        assert_eq!(c.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(format_mac(&c.mac), "52:54:00:12:34:56");
        for bad in [
            "",
            "tap=x",
            "mac=52:54:00:12:34:56",
            "tap=x,mac=52:54:00:12:34",
            "tap=x,mac=52:54:00:12:34:56:78",
            "tap=x,mac=53:54:00:12:34:56",
            "tap=x,mac=zz:54:00:12:34:56",
            "tap=0123456789abcdef,mac=52:54:00:12:34:56",
            "tap=a/b,mac=52:54:00:12:34:56",
            "tap=x,mac=52:54:00:12:34:56,what",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
