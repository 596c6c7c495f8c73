//! The wire's own limit, measured in the same run as the migrations: a
//! plain TCP bulk copy from the source's side to the destination's side of
//! the benchmark's network (loopback or the two namespaces), so that a
//! migration's total time can be compared with what the link could carry.
//!
//! Two kinds of copy, each run [`PROBES`] times (alternating), the best of
//! each kind being its figure:
//!
//! - **cached**: 1 MiB buffers written and read again and again, which stay
//!   in the CPU's caches: the most the socket path carries;
//! - **RAM to RAM**: 1 GiB written beforehand on the sender, read into 1 GiB
//!   touched beforehand on the receiver (as `ferry-dest --prealloc` has its
//!   RAM), each byte once: what carrying a guest's memory costs the two
//!   sides over this link, with nothing else running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::netns::{Net, Side};

/// Bytes copied per probe.
pub const PROBE_BYTES: u64 = 1 << 30;
/// Probes of each kind; the best one is the kind's figure.
pub const PROBES: usize = 5;
/// Bytes per `write` and per `read`.
const CHUNK: usize = 1 << 20;

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
    /// Best bulk rate over the cached probes, bytes/s.
    pub bytes_per_s: f64,
    /// Each cached probe's rate, bytes/s.
    pub probes: Vec<f64>,
    /// Best bulk rate over the RAM-to-RAM probes, bytes/s (absent in
    /// results from before they were measured).
    #[serde(default)]
    pub ram_bytes_per_s: Option<f64>,
    /// Each RAM-to-RAM probe's rate, bytes/s.
    #[serde(default)]
    pub ram_probes: Vec<f64>,
    /// The source and the destination threads were pinned to CPUs 0 and 1.
    pub pinned: bool,
    /// The sender's TCP congestion control (as Ferry's source uses).
    #[serde(default)]
    pub congestion: Option<String>,
}

/// Where a probe's bytes come from and go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buffers {
    /// One 1 MiB buffer on each side, used again and again.
    Cached,
    /// `PROBE_BYTES` on each side, each byte used once.
    Ram,
}

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// The part of `buf` that `Buffers` uses for the bytes at `at`.
fn window(buf: &mut [u8], kind: Buffers, at: u64, n: usize) -> &mut [u8] {
    match kind {
        Buffers::Cached => &mut buf[..n],
        Buffers::Ram => &mut buf[at as usize..at as usize + n],
    }
}

/// A buffer of `len` bytes of `byte`, every page of it written (so that
/// no probe pays for first touches).
fn written(len: usize, byte: u8) -> Vec<u8> {
    vec![byte; len]
}

/// One copy of `bytes` through `listener`; the rate is taken at the
/// receiver, from the first byte to the last. `send` and `recv` are the
/// two sides' buffers (`CHUNK` long, or `bytes` for RAM to RAM).
fn probe(
    net: &Net,
    listener: &TcpListener,
    (bytes, kind): (u64, Buffers),
    (send, recv): (&mut [u8], &mut [u8]),
    pinned: bool,
    congestion: Option<&str>,
) -> Result<f64, WireError> {
    let addr: SocketAddr = listener.local_addr()?;
    let listener = listener.try_clone()?;
    let took = std::thread::scope(|s| {
        let receiver = s.spawn(move || -> std::io::Result<Duration> {
            if pinned {
                pin(1);
            }
            let (mut conn, _) = listener.accept()?;
            let mut got = 0u64;
            let mut start = None;
            while got < bytes {
                let want = (bytes - got).min(CHUNK as u64) as usize;
                let n = conn.read(window(recv, kind, got, want))?;
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
            let mut at = 0u64;
            while at < bytes {
                let n = (bytes - at).min(CHUNK as u64) as usize;
                conn.write_all(window(send, kind, at, n))?;
                at += n as u64;
            }
            Ok(())
        })();
        let took = receiver.join().map_err(|_| WireError::Receiver)?;
        sent?;
        Ok::<_, WireError>(took?)
    })?;
    Ok(bytes as f64 / took.as_secs_f64().max(1e-9))
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

/// Measures the bulk TCP rate from the source's side to the destination's
/// side of `net`, cached and RAM to RAM, on a thread that enters the
/// destination's namespace; the sender uses congestion control
/// `congestion` (default: the system's).
pub fn measure(net: &Net, pinned: bool, congestion: Option<&str>) -> Result<WireFigure, WireError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<WireFigure, WireError> {
            net.enter(Side::Dest)?;
            let listener = TcpListener::bind((net.dest_ip(), 0))?;
            // Non-zero bytes, like pages of guest memory.
            let (mut send_c, mut recv_c) = (written(CHUNK, 0xa5), written(CHUNK, 1));
            let len = PROBE_BYTES as usize;
            let (mut send_r, mut recv_r) = (written(len, 0xa5), written(len, 1));
            let copy = |kind: Buffers, bufs: (&mut [u8], &mut [u8])| {
                probe(
                    net,
                    &listener,
                    (PROBE_BYTES, kind),
                    bufs,
                    pinned,
                    congestion,
                )
            };
            let (mut probes, mut ram_probes) = (Vec::new(), Vec::new());
            for _ in 0..PROBES {
                probes.push(copy(Buffers::Cached, (&mut send_c[..], &mut recv_c[..]))?);
                ram_probes.push(copy(Buffers::Ram, (&mut send_r[..], &mut recv_r[..]))?);
            }
            Ok(WireFigure {
                bytes_per_s: best(&probes),
                probes,
                ram_bytes_per_s: Some(best(&ram_probes)),
                ram_probes,
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

    /// Both kinds carry every byte, and RAM to RAM lands each one where it
    /// was in the sender's buffer.
    #[test]
    fn a_loopback_probe_moves_every_byte() {
        let net = Net::loopback();
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let (mut send, mut recv) = (written(CHUNK, 7), written(CHUNK, 0));
        let bufs = (&mut send[..], &mut recv[..]);
        let rate = probe(
            &net,
            &l,
            (8 << 20, Buffers::Cached),
            bufs,
            false,
            Some("reno"),
        )
        .unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        assert!(recv.iter().all(|&b| b == 7));

        let len = 3 * CHUNK + 4096;
        let mut send: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
        let mut recv = written(len, 0xff);
        let bufs = (&mut send[..], &mut recv[..]);
        let rate = probe(&net, &l, (len as u64, Buffers::Ram), bufs, false, None).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        assert_eq!(recv, send);
    }

    #[test]
    fn figures_from_before_ram_probes_still_load() {
        let old = r#"{"bytes_per_s": 2.0, "probes": [1.0, 2.0, 1.5], "pinned": true}"#;
        let w: WireFigure = serde_json::from_str(old).unwrap();
        assert_eq!((w.ram_bytes_per_s, w.ram_probes.len()), (None, 0));
        assert_eq!(best(&w.probes), 2.0);
    }
}
