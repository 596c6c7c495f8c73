//! The wire's own limit, measured in the same run as the migrations: a
//! plain TCP bulk copy from the source's side to the destination's side of
//! the benchmark's network (loopback or the two namespaces), so that a
//! migration's total time can be compared with what the link could carry.
//!
//! Both sides' buffers are memory of the guest's kind (`GuestRam`: a
//! shared memory file, or huge pages with `--huge-pages`), every page of
//! it written beforehand, as the source's guest RAM and the RAM of a
//! destination with `--prealloc` are. (The kind matters on this host: the
//! same cached copy between private heap buffers ran at 2.0-2.8 GB/s
//! against 4.3-5.3 between shared memory, minutes apart.) Two kinds of
//! copy, each run [`PROBES`] times, alternating:
//!
//! - **cached**: the first 1 MiB of each side, again and again, which
//!   stays in the CPU's caches;
//! - **RAM to RAM**: 1 GiB, each byte once: what carrying a guest's memory
//!   costs the two sides over this link, with nothing else running.
//!
//! The wire's limit is the fastest copy of either kind; each kind's best
//! is reported too.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry_engine::memory::{Backing, GuestRam, MemoryError};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileSlice, WriteVolatile};

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
    /// The buffers could not be made.
    #[error("wire probe: buffers of guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// A buffer's part could not be reached.
    #[error("wire probe: {0}")]
    Slice(String),
}

/// What the wire carried.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireFigure {
    /// The wire's limit: the best bulk rate of any probe, bytes/s.
    pub bytes_per_s: f64,
    /// Each cached probe's rate, bytes/s.
    pub probes: Vec<f64>,
    /// Best bulk rate of the RAM-to-RAM probes, bytes/s (absent in
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
    /// What the buffers were made of (absent in results from before the
    /// probe used memory of the guest's kind: private heap buffers).
    #[serde(default)]
    pub backing: Option<Backing>,
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

/// The part of `ram` that `kind` uses for the `n` bytes at `at`.
fn window(
    ram: &GuestRam,
    kind: Buffers,
    at: u64,
    n: usize,
) -> Result<VolatileSlice<'_>, WireError> {
    let at = match kind {
        Buffers::Cached => 0,
        Buffers::Ram => at,
    };
    ram.guest_memory()
        .get_slice(GuestAddress(at), n)
        .map_err(|e| WireError::Slice(format!("{n} bytes at {at}: {e}")))
}

/// `len` bytes of memory of kind `backing`, every byte written as `byte`
/// through the mapping the probes use (so that no probe pays for a page or
/// a page-table entry: written through the file instead, the first
/// RAM-to-RAM copy ran at 1.7-1.9 GB/s against 4.3-6.6 for the next ones).
fn written(len: u64, backing: Backing, byte: u8) -> Result<GuestRam, WireError> {
    let ram = GuestRam::with_backing(len, backing)?;
    let chunk = vec![byte; CHUNK];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        window(&ram, Buffers::Ram, at, n)?.copy_from(&chunk[..n]);
        at += n as u64;
    }
    Ok(ram)
}

/// A copy into or out of guest memory that failed.
fn volatile_io(e: vm_memory::VolatileMemoryError) -> WireError {
    match e {
        vm_memory::VolatileMemoryError::IOError(e) => WireError::Io(e),
        other => WireError::Slice(other.to_string()),
    }
}

/// One copy of `bytes` through `listener`; the rate is taken at the
/// receiver, from the first byte to the last. `send` and `recv` are the
/// two sides' buffers (at least `bytes` long for RAM to RAM).
fn probe(
    net: &Net,
    listener: &TcpListener,
    (bytes, kind): (u64, Buffers),
    (send, recv): (&GuestRam, &GuestRam),
    pinned: bool,
    congestion: Option<&str>,
) -> Result<f64, WireError> {
    let addr: SocketAddr = listener.local_addr()?;
    let listener = listener.try_clone()?;
    let took = std::thread::scope(|s| {
        let receiver = s.spawn(move || -> Result<Duration, WireError> {
            if pinned {
                pin(1);
            }
            let (mut conn, _) = listener.accept()?;
            let mut got = 0u64;
            let mut start = None;
            while got < bytes {
                let want = (bytes - got).min(CHUNK as u64) as usize;
                let n = conn
                    .read_volatile(&mut window(recv, kind, got, want)?)
                    .map_err(volatile_io)?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                start.get_or_insert_with(Instant::now);
                got += n as u64;
            }
            Ok(start.map_or(Duration::ZERO, |s| s.elapsed()))
        });
        let sent = (|| -> Result<(), WireError> {
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
                conn.write_all_volatile(&window(send, kind, at, n)?)
                    .map_err(volatile_io)?;
                at += n as u64;
            }
            Ok(())
        })();
        let took = receiver.join().map_err(|_| WireError::Receiver)?;
        sent?;
        took
    })?;
    Ok(bytes as f64 / took.as_secs_f64().max(1e-9))
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

/// Measures the bulk TCP rate from the source's side to the destination's
/// side of `net`, cached and RAM to RAM, between memory of kind `backing`,
/// on a thread that enters the destination's namespace; the sender uses
/// congestion control `congestion` (default: the system's).
pub fn measure(
    net: &Net,
    pinned: bool,
    congestion: Option<&str>,
    backing: Backing,
) -> Result<WireFigure, WireError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<WireFigure, WireError> {
            net.enter(Side::Dest)?;
            let listener = TcpListener::bind((net.dest_ip(), 0))?;
            // Non-zero bytes, like pages of guest memory.
            let send = written(PROBE_BYTES, backing, 0xa5)?;
            let recv = written(PROBE_BYTES, backing, 1)?;
            let copy = |kind| {
                probe(
                    net,
                    &listener,
                    (PROBE_BYTES, kind),
                    (&send, &recv),
                    pinned,
                    congestion,
                )
            };
            let (mut probes, mut ram_probes) = (Vec::new(), Vec::new());
            for _ in 0..PROBES {
                probes.push(copy(Buffers::Cached)?);
                ram_probes.push(copy(Buffers::Ram)?);
            }
            let ram = best(&ram_probes);
            Ok(WireFigure {
                bytes_per_s: best(&probes).max(ram),
                probes,
                ram_bytes_per_s: Some(ram),
                ram_probes,
                pinned,
                congestion: congestion.map(str::to_string),
                backing: Some(backing),
            })
        })
        .join()
        .map_err(|_| WireError::Receiver)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds carry every byte: cached ones land again and again in the
    /// receiver's first chunk (where in it does not matter), RAM-to-RAM
    /// ones each where it was in the sender's buffer.
    #[test]
    fn a_loopback_probe_moves_every_byte() {
        let net = Net::loopback();
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let len = 3 * CHUNK as u64 + 4096;
        let send = GuestRam::new(16 << 20).unwrap();
        for p in 0..len / 4096 {
            send.write_at(p * 4096, &[(p % 251) as u8 + 1; 4096])
                .unwrap();
        }
        let recv = written(16 << 20, Backing::Shmem, 0).unwrap();
        let page = |ram: &GuestRam, p: u64| {
            let mut b = [0u8; 4096];
            ram.read_at(p * 4096, &mut b).unwrap();
            b
        };

        let cached = (8 * CHUNK as u64, Buffers::Cached);
        let rate = probe(&net, &l, cached, (&send, &recv), false, Some("reno")).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        let chunk_pages = CHUNK as u64 / 4096;
        assert!(page(&recv, 0) != [0; 4096]);
        assert!(
            page(&recv, chunk_pages) == [0; 4096],
            "cached copies stay in the first chunk"
        );

        let rate = probe(&net, &l, (len, Buffers::Ram), (&send, &recv), false, None).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        for p in 0..len / 4096 {
            assert!(page(&recv, p) == page(&send, p), "page {p} differs");
        }
        assert!(
            page(&recv, len / 4096) == [0; 4096],
            "nothing beyond the copy"
        );
    }

    #[test]
    fn figures_from_before_ram_probes_still_load() {
        let old = r#"{"bytes_per_s": 2.0, "probes": [1.0, 2.0, 1.5], "pinned": true}"#;
        let w: WireFigure = serde_json::from_str(old).unwrap();
        assert_eq!(
            (w.ram_bytes_per_s, w.ram_probes.len(), w.backing),
            (None, 0, None)
        );
        assert_eq!(best(&w.probes), 2.0);
    }
}
