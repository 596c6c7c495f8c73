//! The destination's demand-fault handler thread.
//!
//! One thread owns both the userfaultfd and the fault connection, so a fault
//! goes out as a request and its answer is installed without any hand-off
//! between threads. On this host a blocking uffd read costs ~60 µs per fault
//! and a polling one ~20 µs, so the loop spins (non-blocking reads of both
//! fds) for a short while after any activity before it sleeps in `poll`.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_protocol::{
    decode_pages, FrameDecoder, MsgType, PageEncoding, PageRequest, ProtocolError,
};
use hdrhistogram::Histogram;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use userfaultfd::{Event, EventBuffer};

use super::stats::latency_histogram;
use super::uffd_ram::{UffdRam, UffdRamError};

/// How long the handler busy-polls after activity before sleeping.
const SPIN: Duration = Duration::from_micros(200);
/// Longest sleep in `poll`, so a stop request is noticed.
const POLL_MS: u16 = 20;

/// Errors that end the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The fault connection failed.
    #[error("fault connection: {0}")]
    Protocol(#[from] ProtocolError),
    /// Installing a page failed.
    #[error(transparent)]
    Install(#[from] UffdRamError),
    /// The thread could not be started.
    #[error("cannot spawn the fault thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Reading the userfaultfd failed.
    #[error("reading userfaultfd: {0}")]
    Uffd(String),
}

/// What the fault handler measured.
pub struct FaultStats {
    /// Demand faults answered over the network.
    pub pages_demand: u64,
    /// Faults resolved by pages the push had already delivered.
    pub prefetch_hits: u64,
    /// Faults on zero pages, resolved locally.
    pub zero_faults: u64,
    /// Latency of network-resolved faults, all vCPUs.
    pub overall: Histogram<u64>,
    /// Latency per vCPU index (u32::MAX: a non-vCPU thread).
    pub per_vcpu: HashMap<u32, Histogram<u64>>,
    /// Blocked time per vCPU, µs.
    pub blocktime_us: HashMap<u32, u64>,
    /// Bytes read and written on the fault connection.
    pub bytes_wire: u64,
    /// Bytes of page data (compressed or not) received.
    pub bytes_page_data: u64,
    /// Uncompressed bytes of data pages received.
    pub bytes_page_raw: u64,
}

impl FaultStats {
    /// No faults at all (modes without userfaultfd).
    pub fn empty() -> Self {
        Self {
            pages_demand: 0,
            prefetch_hits: 0,
            zero_faults: 0,
            overall: latency_histogram(),
            per_vcpu: HashMap::new(),
            blocktime_us: HashMap::new(),
            bytes_wire: 0,
            bytes_page_data: 0,
            bytes_page_raw: 0,
        }
    }
}

struct Pending {
    since: Instant,
    vcpu: u32,
}

/// Runs the fault handler until `stop` is set; returns what it measured.
pub fn run(
    ram: Arc<UffdRam>,
    mut conn: TcpStream,
    buffered: Vec<u8>,
    vcpu_tids: Arc<OnceLock<Vec<i32>>>,
    stop: Arc<AtomicBool>,
) -> Result<FaultStats, FaultError> {
    conn.set_nonblocking(true).map_err(ProtocolError::Io)?;
    let mut st = FaultStats::empty();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut events = EventBuffer::new(64);
    let mut rx = FrameDecoder::with_bytes(buffered);
    let mut pages = Vec::new();
    let mut last_activity = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let mut active = false;

        // 1. New faults.
        let evs = ram
            .uffd()
            .read_events(&mut events)
            .map_err(|e| FaultError::Uffd(e.to_string()))?;
        let mut faults = Vec::new();
        for ev in evs {
            if let Ok(Event::Pagefault {
                addr, thread_id, ..
            }) = ev
            {
                faults.push((addr as usize, thread_id.as_raw()));
            }
        }
        for (addr, tid) in faults {
            active = true;
            let Some(pfn) = ram.pfn_of(addr) else {
                warn!(addr = format_args!("{addr:#x}"), "fault outside guest RAM");
                continue;
            };
            let vcpu = vcpu_tids
                .get()
                .and_then(|t| t.iter().position(|&x| x == tid))
                .map_or(u32::MAX, |i| i as u32);
            if vcpu == u32::MAX {
                debug!(tid, "fault from a non-vCPU thread");
            }
            if ram.present.get(pfn) {
                st.prefetch_hits += 1;
                ram.wake(pfn);
            } else if ram.zero.get(pfn) {
                st.zero_faults += 1;
                ram.install_zero(pfn)?;
            } else if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(pfn) {
                e.insert(Pending {
                    since: Instant::now(),
                    vcpu,
                });
                let req = PageRequest {
                    pfn,
                    count: 1,
                    vcpu,
                };
                let frame = req.frame(pfn);
                write_all_nonblocking(&mut conn, &frame)?;
                st.bytes_wire += frame.len() as u64;
            }
        }

        // 2. Answers.
        loop {
            match rx.read_from(&mut conn) {
                Ok(0) => return Err(ProtocolError::Closed.into()),
                Ok(n) => {
                    st.bytes_wire += n as u64;
                    active = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::Io(e).into()),
            }
        }
        while let Some(frame) = rx.next_frame()? {
            let payload = frame.payload;
            match frame.header.kind {
                MsgType::Pages => {
                    let ph = decode_pages(payload, ram.pages(), &mut pages)?;
                    let mut newly = 0;
                    if ph.encoding == PageEncoding::Zero {
                        for p in ph.first_pfn..ph.first_pfn + u64::from(ph.count) {
                            newly += u64::from(ram.install_zero(p)?);
                        }
                    } else {
                        st.bytes_page_data += payload.len() as u64 - 16;
                        st.bytes_page_raw += pages.len() as u64;
                        newly = ram.install(ph.first_pfn, &pages)?;
                    }
                    for p in ph.first_pfn..ph.first_pfn + u64::from(ph.count) {
                        if let Some(w) = pending.remove(&p) {
                            let us = w.since.elapsed().as_micros() as u64;
                            let _ = st.overall.record(us.max(1));
                            let _ = st
                                .per_vcpu
                                .entry(w.vcpu)
                                .or_insert_with(latency_histogram)
                                .record(us.max(1));
                            *st.blocktime_us.entry(w.vcpu).or_default() += us;
                            if newly == 0 {
                                st.prefetch_hits += 1;
                            } else {
                                st.pages_demand += 1;
                            }
                        }
                    }
                }
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other,
                        expected: "Pages on the fault connection",
                    }
                    .into())
                }
            }
        }

        // 3. Spin briefly after activity, then sleep in poll.
        if active {
            last_activity = Instant::now();
        } else if last_activity.elapsed() > SPIN {
            wait_readable(ram.uffd(), &conn, POLL_MS);
        }
    }
    debug!(pending = pending.len(), "fault handler stopping");
    Ok(st)
}

fn write_all_nonblocking(conn: &mut TcpStream, mut buf: &[u8]) -> Result<(), ProtocolError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !buf.is_empty() {
        match conn.write(buf) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => buf = &buf[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if Instant::now() > deadline {
                    return Err(ProtocolError::Io(e));
                }
                std::thread::yield_now();
            }
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(())
}

/// Sleeps until the userfaultfd or the connection is readable, or
/// `timeout_ms` passes.
fn wait_readable(uffd: &impl AsFd, conn: &impl AsFd, timeout_ms: u16) {
    let mut fds = [
        PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
        PollFd::new(conn.as_fd(), PollFlags::POLLIN),
    ];
    // EINTR or a spurious wake-up only ends the nap early.
    let _ = poll(&mut fds, PollTimeout::from(timeout_ms));
}

/// The demand-fault thread of a lazy migration.
pub(super) struct FaultThread {
    tids: Arc<OnceLock<Vec<i32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<FaultStats, FaultError>>>,
}

impl FaultThread {
    pub(super) fn start(
        ram: Arc<UffdRam>,
        conn: TcpStream,
        buffered: Vec<u8>,
    ) -> Result<Self, FaultError> {
        let tids = Arc::new(OnceLock::new());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tids, stop) = (tids.clone(), stop.clone());
            std::thread::Builder::new()
                .name("uffd-fault".into())
                .spawn(move || run(ram, conn, buffered, tids, stop))
                .map_err(FaultError::Spawn)?
        };
        Ok(Self {
            tids,
            stop,
            thread: Some(thread),
        })
    }

    /// Lets faults be attributed to vCPUs by thread id.
    pub(super) fn attribute_to(&self, vcpu_tids: Vec<i32>) {
        let _ = self.tids.set(vcpu_tids);
    }

    /// Stops the thread and returns what it measured.
    pub(super) fn stop(mut self) -> Result<FaultStats, FaultError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(FaultError::Uffd("fault handler panicked".into())),
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
