//! The wire's own limit, measured in the same run as the migrations: a
//! plain TCP bulk copy from the source's side to the destination's side of
//! the benchmark's network (loopback or the two namespaces), so that a
//! migration's total time can be compared with what the link could carry.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::netns::{Net, Side};

/// Bytes copied per probe.
pub const PROBE_BYTES: u64 = 1 << 30;
/// Probes run; the best one is the wire's figure.
pub const PROBES: usize = 3;

/// Errors measuring the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A socket operation failed.
    #[error("wire probe: {0}")]
    Io(#[from] std::io::Error),
    /// The receiving thread died.
    #[error("wire probe: the receiving thread failed")]
    Receiver,
}

/// What the wire carried.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireFigure {
    /// Best bulk rate over the probes, bytes/s.
    pub bytes_per_s: f64,
    /// Each probe's rate, bytes/s.
    pub probes: [f64; PROBES],
    /// The source and the destination threads were pinned to CPUs 0 and 1.
    pub pinned: bool,
    /// The sender's TCP congestion control (as Ferry's source uses).
    #[serde(default)]
    pub congestion: Option<String>,
}

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// One copy of `bytes` through `addr`; the rate is taken at the receiver,
/// from the first byte to the last.
fn probe(
    net: &Net,
    listener: &TcpListener,
    bytes: u64,
    pinned: bool,
    congestion: Option<&str>,
) -> Result<f64, WireError> {
    let addr: SocketAddr = listener.local_addr()?;
    let listener = listener.try_clone()?;
    let recv = std::thread::scope(|s| {
        let receiver = s.spawn(move || -> std::io::Result<Duration> {
            if pinned {
                pin(1);
            }
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            let mut start = None;
            while got < bytes {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                start.get_or_insert_with(Instant::now);
                got += n as u64;
            }
            Ok(start.map_or(Duration::ZERO, |s| s.elapsed()))
        });
        let sent = (|| -> std::io::Result<()> {
            net.enter(Side::Source)?;
            if pinned {
                pin(0);
            }
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            if let Some(name) = congestion {
                ferry_transport::congestion::set(&conn, name)?;
            }
            // Non-zero bytes, like a page of guest memory.
            let chunk = vec![0xa5u8; 1 << 20];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                conn.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            Ok(())
        })();
        let took = receiver.join().map_err(|_| WireError::Receiver)?;
        sent?;
        Ok::<_, WireError>(took?)
    })?;
    Ok(bytes as f64 / recv.as_secs_f64().max(1e-9))
}

/// Measures the bulk TCP rate from the source's side to the destination's
/// side of `net`, on a thread that enters the destination's namespace;
/// the sender uses congestion control `congestion` (default: the system's).
pub fn measure(net: &Net, pinned: bool, congestion: Option<&str>) -> Result<WireFigure, WireError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<WireFigure, WireError> {
            net.enter(Side::Dest)?;
            let listener = TcpListener::bind((net.dest_ip(), 0))?;
            let mut probes = [0.0; PROBES];
            for p in &mut probes {
                *p = probe(net, &listener, PROBE_BYTES, pinned, congestion)?;
            }
            Ok(WireFigure {
                bytes_per_s: probes.iter().copied().fold(0.0, f64::max),
                probes,
                pinned,
                congestion: congestion.map(str::to_string),
            })
        })
        .join()
        .map_err(|_| WireError::Receiver)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_probe_moves_every_byte() {
        let net = Net::loopback();
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let rate = probe(&net, &l, 8 << 20, false, Some("reno")).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }
}
