//! Where the two sides run: loopback, or two network namespaces joined by
//! a veth pair that ferry-bench creates (and removes), optionally limited
//! by a tbf qdisc. Traffic never leaves the namespaces it made.

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

const NS_A: &str = "ferrybench-a";
const NS_B: &str = "ferrybench-b";
const SUBNET: u8 = 200;

/// The network the runs use.
#[derive(Debug)]
pub struct Net {
    namespaces: bool,
    rate: Option<String>,
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

fn delete_namespaces() {
    for ns in [NS_A, NS_B] {
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
            namespaces: false,
            rate: None,
        }
    }

    /// Creates `ferrybench-a` (10.77.200.1) and `ferrybench-b`
    /// (10.77.200.2) joined by a veth pair, with a tbf limit when `rate`
    /// is given. Namespaces left by an earlier, interrupted run are
    /// replaced.
    pub fn namespaces(rate: Option<&str>) -> Result<Net, NetError> {
        if let Some(r) = rate {
            check_rate(r)?;
        }
        delete_namespaces();
        let net = Net {
            namespaces: true,
            rate: rate.map(str::to_string),
        };
        run(&["ip", "netns", "add", NS_A])?;
        run(&["ip", "netns", "add", NS_B])?;
        let (va, vb) = ("fbenchva", "fbenchvb");
        run(&[
            "ip", "link", "add", va, "netns", NS_A, "type", "veth", "peer", "name", vb, "netns",
            NS_B,
        ])?;
        for (ns, dev, host) in [(NS_A, va, 1), (NS_B, vb, 2)] {
            let ip = format!("10.77.{SUBNET}.{host}/24");
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
        if self.namespaces {
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                if side == Side::Source { NS_A } else { NS_B },
            ]);
            c.arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// The destination's address.
    pub fn dest_ip(&self) -> Ipv4Addr {
        if self.namespaces {
            Ipv4Addr::new(10, 77, SUBNET, 2)
        } else {
            Ipv4Addr::LOCALHOST
        }
    }

    /// A port for the destination of run `index`.
    pub fn dest_port(&self, index: usize) -> std::io::Result<u16> {
        if self.namespaces {
            Ok(17000 + (index % 20000) as u16)
        } else {
            super::procs::free_port()
        }
    }

    /// `loopback`, `netns` or `netns 1gbit`.
    pub fn describe(&self) -> String {
        match (&self.namespaces, &self.rate) {
            (false, _) => "loopback".into(),
            (true, None) => "netns".into(),
            (true, Some(r)) => format!("netns {r}"),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so the pair.
        if self.namespaces {
            delete_namespaces();
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
