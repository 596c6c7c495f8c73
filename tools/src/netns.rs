//! Where the two sides of a move run: loopback, or two network namespaces
//! joined by a veth pair that this module creates (and removes on drop),
//! optionally limited by a tbf qdisc. Traffic never leaves the namespaces
//! it made. Used by ferry-bench and by the two-host integration tests.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Errors setting up the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A link rate was not understood.
    #[error("invalid link rate {0:?}: expected e.g. 100mbit, 1gbit, 10gbit")]
    Rate(String),
    /// An `ip`/`tc` command failed.
    #[error("`{cmd}` failed: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// stderr or the spawn error.
        msg: String,
    },
}

/// Which side of the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source.
    Source,
    /// The destination.
    Dest,
}

/// ferry-bench's namespaces, veth pair and subnet.
const BENCH_TAG: &str = "ferrybench";
const BENCH_VETH: &str = "fbench";
const BENCH_SUBNET: u8 = 200;

/// Two namespaces, `<tag>-a` (the source, 10.77.<subnet>.1) and `<tag>-b`
/// (the destination, 10.77.<subnet>.2).
#[derive(Debug)]
struct Pair {
    a: String,
    b: String,
    subnet: u8,
}

/// The network the runs use.
#[derive(Debug)]
pub struct Net {
    namespaces: Option<Pair>,
    rate: Option<String>,
    veth: Option<String>,
}

/// Checks a tc rate such as `1gbit` or `500mbit`.
pub fn check_rate(rate: &str) -> Result<(), NetError> {
    let units = [
        "bit", "kbit", "mbit", "gbit", "tbit", "bps", "kbps", "mbps", "gbps",
    ];
    let lower = rate.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let num_ok = !digits.is_empty()
        && digits
            .parse::<f64>()
            .is_ok_and(|v| v.is_finite() && v > 0.0)
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.');
    if num_ok && units.contains(&unit) {
        Ok(())
    } else {
        Err(NetError::Rate(rate.into()))
    }
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Command {
            cmd: args.join(" "),
            msg: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            cmd: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn delete_namespaces(names: [&str; 2]) {
    for ns in names {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Net {
    /// Both sides on 127.0.0.1.
    pub fn loopback() -> Net {
        Net {
            namespaces: None,
            rate: None,
            veth: None,
        }
    }

    /// Creates `ferrybench-a` (10.77.200.1) and `ferrybench-b`
    /// (10.77.200.2) joined by a veth pair, with a tbf limit when `rate`
    /// is given. Namespaces left by an earlier, interrupted run are
    /// replaced.
    pub fn namespaces(rate: Option<&str>) -> Result<Net, NetError> {
        Net::tagged(BENCH_TAG, BENCH_VETH, BENCH_SUBNET, rate)
    }

    /// Creates `<tag>-a` (10.77.`subnet`.1) and `<tag>-b` (10.77.`subnet`.2)
    /// joined by the veth pair `<veth>va`/`<veth>vb` (`veth` at most 13
    /// bytes), with a tbf limit when `rate` is given. Namespaces of the same
    /// names, left by an earlier run, are replaced; give each concurrent
    /// user its own tag.
    pub fn tagged(tag: &str, veth: &str, subnet: u8, rate: Option<&str>) -> Result<Net, NetError> {
        if let Some(r) = rate {
            check_rate(r)?;
        }
        let pair = Pair {
            a: format!("{tag}-a"),
            b: format!("{tag}-b"),
            subnet,
        };
        delete_namespaces([&pair.a, &pair.b]);
        let (a, b) = (pair.a.clone(), pair.b.clone());
        // From here on, dropping `net` removes whatever was made.
        let net = Net {
            namespaces: Some(pair),
            rate: rate.map(str::to_string),
            veth: Some(veth.to_string()),
        };
        run(&["ip", "netns", "add", &a])?;
        run(&["ip", "netns", "add", &b])?;
        let (va, vb) = (format!("{veth}va"), format!("{veth}vb"));
        run(&[
            "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ])?;
        for (ns, dev, host) in [(&a, &va, 1), (&b, &vb, 2)] {
            let ip = format!("10.77.{subnet}.{host}/24");
            run(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            if let Some(r) = &net.rate {
                run(&[
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", r, "burst", "256kb", "latency", "50ms",
                ])?;
            }
        }
        Ok(net)
    }

    /// A command that runs `program` on `side`.
    pub fn command(&self, side: Side, program: &Path) -> Command {
        match &self.namespaces {
            Some(pair) => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    if side == Side::Source {
                        &pair.a
                    } else {
                        &pair.b
                    },
                ]);
                c.arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// [`Net::command`], pinned to CPU `cpu` with `taskset` when given (so
    /// that the source and the destination of a measured run never share a
    /// core).
    pub fn command_on(&self, side: Side, program: &Path, cpu: Option<usize>) -> Command {
        match cpu {
            None => self.command(side, program),
            Some(cpu) => {
                let mut c = self.command(side, Path::new("taskset"));
                c.args(["-c", &cpu.to_string()]).arg(program);
                c
            }
        }
    }

    /// Moves the calling thread into `side`'s namespace (network namespaces
    /// are per thread), for a thread that talks across the link itself.
    /// On loopback it does nothing.
    pub fn enter(&self, side: Side) -> std::io::Result<()> {
        let Some(pair) = &self.namespaces else {
            return Ok(());
        };
        let name = if side == Side::Source {
            &pair.a
        } else {
            &pair.b
        };
        let ns = std::fs::File::open(format!("/var/run/netns/{name}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
    }

    /// Puts `side`'s end of the veth on a bridge `br0` (which takes over
    /// the side's address) and adds a persistent tap `tap` on the same
    /// bridge, for a VM's network card: with both sides bridged, the two
    /// bridges and the veth are one Ethernet. Only with namespaces.
    pub fn bridge_with_tap(&self, side: Side, tap: &str) -> Result<(), NetError> {
        let Some(pair) = &self.namespaces else {
            return Err(NetError::Command {
                cmd: "bridge".into(),
                msg: "needs namespaces".into(),
            });
        };
        let (ns, host) = if side == Side::Source {
            (&pair.a, 1)
        } else {
            (&pair.b, 2)
        };
        let veth = self.veth_of(side);
        let ip = format!("10.77.{}.{host}/24", pair.subnet);
        run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", ns, "addr", "del", &ip, "dev", &veth])?;
        run(&["ip", "-n", ns, "link", "set", &veth, "master", "br0"])?;
        run(&["ip", "-n", ns, "addr", "add", &ip, "dev", "br0"])?;
        run(&["ip", "-n", ns, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        run(&["ip", "-n", ns, "link", "set", tap, "master", "br0"])?;
        run(&["ip", "-n", ns, "link", "set", tap, "up"])?;
        Ok(())
    }

    fn veth_of(&self, side: Side) -> String {
        let v = self.veth.as_deref().unwrap_or_default();
        if side == Side::Source {
            format!("{v}va")
        } else {
            format!("{v}vb")
        }
    }

    /// The source's address.
    pub fn source_ip(&self) -> Ipv4Addr {
        match &self.namespaces {
            Some(pair) => Ipv4Addr::new(10, 77, pair.subnet, 1),
            None => Ipv4Addr::LOCALHOST,
        }
    }

    /// The destination's address.
    pub fn dest_ip(&self) -> Ipv4Addr {
        match &self.namespaces {
            Some(pair) => Ipv4Addr::new(10, 77, pair.subnet, 2),
            None => Ipv4Addr::LOCALHOST,
        }
    }

    /// A port for the destination of run `index`.
    pub fn dest_port(&self, index: usize) -> std::io::Result<u16> {
        if self.namespaces.is_some() {
            Ok(17000 + (index % 20000) as u16)
        } else {
            crate::bench::procs::free_port()
        }
    }

    /// `loopback`, `netns` or `netns 1gbit`.
    pub fn describe(&self) -> String {
        match (&self.namespaces, &self.rate) {
            (None, _) => "loopback".into(),
            (Some(_), None) => "netns".into(),
            (Some(_), Some(r)) => format!("netns {r}"),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so the pair.
        if let Some(pair) = &self.namespaces {
            delete_namespaces([&pair.a, &pair.b]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        for ok in ["1gbit", "100mbit", "2.5Gbit", "10kbps"] {
            assert!(check_rate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "gbit", "1", "1 gbit", "-1gbit", "1gbit;rm", "1xbit", "0gbit",
        ] {
            assert!(check_rate(bad).is_err(), "{bad}");
        }
        let l = Net::loopback();
        assert_eq!(l.describe(), "loopback");
        assert_eq!(l.dest_ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(
            l.command(Side::Dest, Path::new("/bin/true")).get_program(),
            "/bin/true"
        );
    }
}
