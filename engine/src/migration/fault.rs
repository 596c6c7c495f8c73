//! The destination's demand-fault handler thread.
//!
//! One thread owns both the userfaultfd and the fault connection, so a fault
//! goes out as a request and its answer is installed without any hand-off
//! between threads. It reads both fds without blocking while there is work
//! and sleeps in `poll` when a pass finds none (see `run`, step 3). The
//! owner is woken as answers are installed ([`FaultThread::wait_for_progress`]),
//! and the thread is woken at once to stop or to take a new connection.
//!
//! The connection can be lost and replaced (post-copy recovery). Losing it
//! never ends the thread and never releases the userfaultfd: faults keep
//! being read and recorded as pending (the vCPUs that took them simply
//! wait), the link is marked down so the receive thread starts recovery,
//! and once a new connection is handed over every pending request is sent
//! again on it.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_protocol::{
    decode_pages_ref, FrameDecoder, MsgType, PageEncoding, PageRequest, ProtocolError,
    PAGES_PREFIX, PAGE_SIZE,
};
use ferry_transport::Conn as Stream;
use hdrhistogram::Histogram;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use userfaultfd::{Event, EventBuffer};
use vmm_sys_util::eventfd::EventFd;

use super::fault_around::FaultAround;
use super::link::is_link_failure;
use super::stats::latency_histogram;
use super::uffd_ram::{Local, UffdRam, UffdRamError};
use crate::devices::migrated::{DiskSet, MigratedError};
use crate::sched::{Applied, FaultPriority};

/// Demand faults this slow (µs) are logged at debug level, for tail hunts.
const SLOW_FAULT_US: u64 = 4_000;

/// Longest sleep in `poll` (a stop request or a new connection wakes it
/// at once; this only bounds a missed wake-up).
const POLL_MS: u16 = 20;

/// Longest wait, once stopped, for answers still owed by the source.
const STOP_DRAIN: Duration = Duration::from_millis(500);

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
    /// Writing a migrated disk's block failed.
    #[error(transparent)]
    Disk(#[from] MigratedError),
    /// Reading the userfaultfd failed.
    #[error("reading userfaultfd: {0}")]
    Uffd(String),
    /// The thread could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
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
    /// Pages asked for over the network, in the order of their first fault.
    pub demand_order: Vec<u64>,
    /// Migrated-disk blocks fetched on demand for guest disk reads.
    pub disk_demand: u64,
    /// The scheduling the fault thread got.
    pub priority: Option<Applied>,
    /// Pages asked for after a faulting page (fault-around), in all
    /// requests.
    pub pages_around: u64,
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
            demand_order: Vec::new(),
            disk_demand: 0,
            priority: None,
            pages_around: 0,
        }
    }
}

struct Pending {
    since: Instant,
    vcpu: u32,
}

/// What the fault thread shares with its owner.
struct Shared {
    tids: OnceLock<Vec<i32>>,
    stop: AtomicBool,
    /// Set when the connection failed; cleared when a new one is taken.
    down: AtomicBool,
    /// The replacement connection, when recovery found one.
    next: Mutex<Option<(Stream, Vec<u8>)>>,
    /// Shut down when the fault connection fails, so the receive thread
    /// (blocked on it) notices at once.
    control: Mutex<Option<Stream>>,
    /// Written by the owner to wake the thread from `poll` (stop, a new
    /// connection).
    wake: EventFd,
    /// Counts the thread's passes that installed answers, lost the link or
    /// ended it; the owner waits on `progressed` for it to move.
    progress: Mutex<u64>,
    progressed: Condvar,
}

impl Shared {
    /// Tells the owner something changed (pages installed, link lost, the
    /// thread ended).
    fn notify(&self) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.progressed.notify_all();
    }

    /// Wakes the thread from its `poll`.
    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// The connection side of the fault loop (non-blocking; under TLS every
/// read drains the socket until `WouldBlock`, so no decrypted bytes wait
/// unseen behind a `poll`).
struct Conn {
    stream: Stream,
    rx: FrameDecoder,
    /// The socket's `SO_RCVLOWAT` as last set.
    lowat: usize,
    /// The answer being read into guest RAM, when one is (see `in_place`).
    in_place: Option<in_place::Answer>,
}

/// Sets `SO_RCVLOWAT`: `poll` reports a TCP socket readable only once this
/// many bytes are queued (a read still returns whatever is there).
fn set_rcvlowat(sock: &impl AsFd, bytes: usize) -> std::io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `sock` is an open socket for the call's duration, and the
    // option value is a live `c_int` whose size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A frame still this many bytes short (or more) makes `poll` wait for
/// all of them (see [`Conn::wait_for_whole_frames`]).
const LOWAT_FROM: usize = 64 << 10;

impl Conn {
    fn new(stream: Stream, buffered: Vec<u8>) -> Result<Self, ProtocolError> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            rx: FrameDecoder::with_bytes(buffered),
            lowat: 1,
            in_place: None,
        })
    }

    /// While an answer of a huge page arrives (2 MiB, in some thirty
    /// pieces on loopback), `poll` would wake the thread for every piece;
    /// at real-time priority each wake-up also preempts the push on its
    /// core. So once the frame's header is here, the socket's low-water
    /// mark is set to the bytes still missing: one wake-up per answer, or
    /// earlier for a new fault on the userfaultfd. Those bytes are sure to
    /// come. Plain TCP only: under TLS the socket carries ciphertext, and
    /// part of the frame may already wait inside the TLS session.
    fn wait_for_whole_frames(&mut self) {
        if self.stream.is_tls() {
            return;
        }
        let Some(tcp) = self.stream.tcp() else {
            return;
        };
        let want = match &self.in_place {
            Some(a) => a.wake_at(),
            None => match self.rx.missing() {
                m if m >= LOWAT_FROM => m,
                _ => 1,
            },
        };
        if want != self.lowat && set_rcvlowat(tcp, want).is_ok() {
            self.lowat = want;
        }
    }
}

fn send_request(
    conn: &mut Conn,
    pfn: u64,
    count: u32,
    vcpu: u32,
    st: &mut FaultStats,
) -> Result<(), ProtocolError> {
    let frame = PageRequest { pfn, count, vcpu }.frame(pfn);
    write_all_nonblocking(&conn.stream, &frame)?;
    st.bytes_wire += frame.len() as u64;
    Ok(())
}

/// The `vcpu` of a request made for a guest disk read.
const DISK_READER: u32 = u32::MAX - 1;
/// The `vcpu` of a page asked for around another's fault (no one waits
/// for it yet).
const AROUND: u32 = u32::MAX - 2;

/// Runs the fault handler until stopped; returns what it measured.
fn run(
    ram: Arc<UffdRam>,
    disks: Option<Arc<DiskSet>>,
    first: Conn,
    shared: Arc<Shared>,
    decode: Vec<u8>,
) -> Result<FaultStats, FaultError> {
    let mut conn = Some(first);
    let mut st = FaultStats::empty();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut events = EventBuffer::new(64);
    let mut pages = decode;
    let mut around = FaultAround::default();
    let mut stopping: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            // End once no answer is owed: a socket closed while bytes are
            // still on their way is reset by TCP, which the source takes
            // for a lost link (and recovers from, needlessly).
            let since = *stopping.get_or_insert_with(Instant::now);
            if pending.is_empty() || conn.is_none() || since.elapsed() >= STOP_DRAIN {
                break;
            }
        }
        let mut active = false;

        // 0. The owner gave up on the connection (the control connection
        // failed): drop it. A replacement: ask again for everything pending.
        if conn.is_some() && shared.down.load(Ordering::Acquire) {
            conn = None;
        }
        if conn.is_none() {
            let next = shared.next.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((stream, buffered)) = next {
                let mut c = Conn::new(stream, buffered)?;
                let again: Vec<(u64, u32)> = pending.iter().map(|(p, w)| (*p, w.vcpu)).collect();
                let sent = again
                    .iter()
                    .try_for_each(|&(pfn, vcpu)| send_request(&mut c, pfn, 1, vcpu, &mut st));
                if sent.is_ok() {
                    debug!(requests = again.len(), "fault connection replaced");
                    shared.down.store(false, Ordering::Release);
                    conn = Some(c);
                } else {
                    link_lost(&shared, "the new fault connection failed at once");
                }
            }
        }

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
            let vcpu = shared
                .tids
                .get()
                .and_then(|t| t.iter().position(|&x| x == tid))
                .map_or(u32::MAX, |i| i as u32);
            if vcpu == u32::MAX {
                debug!(tid, "fault from a non-vCPU thread");
            }
            match ram.resolve_local(pfn)? {
                Local::Hit => st.prefetch_hits += 1,
                Local::Zero => st.zero_faults += 1,
                Local::Missing => {
                    let ask = if ram.fills_in_place() {
                        plan_unit(&ram, &mut pending, vcpu, pfn, &mut st)
                    } else {
                        plan_small(&ram, &mut pending, &mut around, vcpu, pfn, &mut st)
                    };
                    if let (Some((first, n)), Some(c)) = (ask, conn.as_mut()) {
                        if let Err(e) = send_request(c, first, n as u32, vcpu, &mut st) {
                            conn = None;
                            link_lost(&shared, &e.to_string());
                        }
                    }
                }
            }
        }

        // 1b. Blocks that guest disk reads wait for.
        if let Some(d) = &disks {
            for pfn in d.requests.take() {
                active = true;
                if d.present(pfn) {
                    continue;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(pfn) {
                    e.insert(Pending {
                        since: Instant::now(),
                        vcpu: DISK_READER,
                    });
                    if let Some(c) = conn.as_mut() {
                        if let Err(e) = send_request(c, pfn, 1, DISK_READER, &mut st) {
                            conn = None;
                            link_lost(&shared, &e.to_string());
                        }
                    }
                }
            }
        }

        // 2. Answers.
        if let Some(c) = conn.as_mut() {
            match receive(c, &ram, disks.as_deref(), &mut pending, &mut pages, &mut st) {
                Ok(got) => {
                    if got {
                        shared.notify();
                    }
                    active |= got;
                }
                Err(FaultError::Protocol(e)) if is_link_failure(&e) => {
                    conn = None;
                    link_lost(&shared, &e.to_string());
                }
                Err(e) => return Err(e),
            }
        }

        // 3. Sleep in poll when a pass found nothing. No busy-polling:
        // on a shared core a spinning fault thread takes the CPU from the
        // push (2G guest, 1G working set, pinned: 1.14 s with a 200 µs spin
        // after activity, 1.02 s without). Latency comes from priority
        // instead (`crate::sched`).
        if !active {
            if let Some(c) = conn.as_mut() {
                c.wait_for_whole_frames();
            }
            wait_readable(
                ram.uffd(),
                conn.as_ref().map(|c| &c.stream),
                [Some(&shared.wake), disks.as_ref().map(|d| d.requests.fd())],
                POLL_MS,
            );
            // Consumed here only: a wake-up written while the thread
            // worked makes the next `poll` return at once.
            let _ = shared.wake.read();
        }
    }
    debug!(pending = pending.len(), "fault handler stopping");
    Ok(st)
}

/// Records a vCPU waiting on missing page `pfn` (4 KiB RAM) and returns
/// the request to send, if any: the page and, after it, the pages that are
/// neither here nor asked for, up to the vCPU's fault-around window.
fn plan_small(
    ram: &UffdRam,
    pending: &mut HashMap<u64, Pending>,
    around: &mut FaultAround,
    vcpu: u32,
    pfn: u64,
    st: &mut FaultStats,
) -> Option<(u64, u64)> {
    if let Some(w) = pending.get_mut(&pfn) {
        // Asked for already: around another fault, or by another vCPU. A
        // page fetched around a fault now has a waiter.
        if w.vcpu == AROUND {
            around.window(vcpu, pfn);
            *w = Pending {
                since: Instant::now(),
                vcpu,
            };
            st.demand_order.push(pfn);
        }
        return None;
    }
    let now = Instant::now();
    pending.insert(pfn, Pending { since: now, vcpu });
    st.demand_order.push(pfn);
    let window = around.window(vcpu, pfn);
    let mut n = 1;
    while n < window
        && pfn + n < ram.pages()
        && !ram.present.get(pfn + n)
        && !ram.zero.get(pfn + n)
        && !pending.contains_key(&(pfn + n))
    {
        pending.insert(
            pfn + n,
            Pending {
                since: now,
                vcpu: AROUND,
            },
        );
        n += 1;
    }
    around.asked(vcpu, pfn, n);
    st.pages_around += n - 1;
    Some((pfn, n))
}

/// RAM filled in place: a fault waits for its whole unit (a huge page, or
/// 512 KiB), so this asks for every page of it that is neither here nor
/// asked for, in one request spanning them. The vCPU's wait is recorded on
/// the last missing page.
fn plan_unit(
    ram: &UffdRam,
    pending: &mut HashMap<u64, Pending>,
    vcpu: u32,
    pfn: u64,
    st: &mut FaultStats,
) -> Option<(u64, u64)> {
    let missing: Vec<u64> = ram.missing_in_unit(pfn).collect();
    // The vCPU waits for the whole unit, which is complete when the last
    // of its missing pages arrives (answers come in page order).
    let wait = *missing.last()?;
    let now = Instant::now();
    // Pages nobody asked for yet, `wait` included when it is one of them.
    let ask: Vec<u64> = missing
        .into_iter()
        .filter(|q| !pending.contains_key(q))
        .collect();
    match pending.get_mut(&wait) {
        Some(w) if w.vcpu == AROUND => {
            *w = Pending { since: now, vcpu };
            st.demand_order.push(wait);
        }
        Some(_) => {}
        None => {
            pending.insert(wait, Pending { since: now, vcpu });
            st.demand_order.push(wait);
        }
    }
    let (&first, &last) = (ask.first()?, ask.last()?);
    for &q in &ask {
        pending.entry(q).or_insert(Pending {
            since: now,
            vcpu: AROUND,
        });
    }
    st.pages_around += ask.len() as u64 - 1;
    Some((first, last - first + 1))
}

/// Marks the link down and wakes the receive thread.
fn link_lost(shared: &Shared, why: &str) {
    warn!("fault connection lost: {why}; faults wait for recovery");
    shared.down.store(true, Ordering::Release);
    shared.notify();
    if let Some(c) = shared
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads what arrived on the fault connection and installs the answers;
/// returns whether anything arrived. Into huge-page RAM over a plain
/// socket, a large raw answer is read straight into guest RAM once all of
/// it has arrived (see `in_place`).
fn receive(
    c: &mut Conn,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    pending: &mut HashMap<u64, Pending>,
    pages: &mut Vec<u8>,
    st: &mut FaultStats,
) -> Result<bool, FaultError> {
    let total = disks.map_or(ram.pages(), DiskSet::total_pages);
    let fill_in_place = ram.fills_in_place() && c.stream.plain_fd().is_some();
    c.rx.set_head_reads(fill_in_place.then_some(PAGES_PREFIX));
    let mut active = false;
    loop {
        while let Some(frame) = c.rx.next_frame()? {
            let (header, payload) = (frame.header, frame.payload);
            if header.kind != MsgType::Pages {
                return Err(ProtocolError::Unexpected {
                    got: header.kind,
                    expected: "Pages on the fault connection",
                }
                .into());
            }
            // Raw answers are installed straight from the frame.
            let (ph, data) = decode_pages_ref(payload, total, pages)?;
            let (first, n) = (ph.first_pfn, u64::from(ph.count));
            // The part in guest RAM, then the part on migrated disks.
            let in_ram = ram.pages().saturating_sub(first).min(n);
            let mut newly = 0;
            if ph.encoding == PageEncoding::Zero {
                newly += ram.install_zeros(first, in_ram)?;
                if let Some(d) = disks.filter(|_| in_ram < n) {
                    newly += d.install_zero(first + in_ram, n - in_ram)?;
                }
            } else {
                st.bytes_page_data += payload.len() as u64 - PAGES_PREFIX as u64;
                st.bytes_page_raw += data.len() as u64;
                let split = (in_ram as usize) * PAGE_SIZE;
                if in_ram > 0 {
                    newly = ram.install(first, &data[..split])?;
                }
                if let Some(d) = disks.filter(|_| in_ram < n) {
                    newly += d.install(first + in_ram, &data[split..])?;
                }
            }
            record_answer(first, n, newly, pending, st);
        }
        if fill_in_place {
            match in_place::fill_ready(c, ram, total, pages)? {
                in_place::Ready::Filled(a, read) => {
                    st.bytes_wire += read as u64;
                    st.bytes_page_data += a.count * PAGE_SIZE as u64;
                    st.bytes_page_raw += a.count * PAGE_SIZE as u64;
                    record_answer(a.first, a.count, a.newly, pending, st);
                    active = true;
                    continue;
                }
                in_place::Ready::Progress(read) => {
                    st.bytes_wire += read as u64;
                    active = true;
                    continue;
                }
                // The rest of the answer is on its way: `poll` wakes the
                // thread as it arrives.
                in_place::Ready::Waiting => break,
                in_place::Ready::No => {}
            }
        }
        match c.rx.read_from(&mut &c.stream) {
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
    Ok(active)
}

/// Accounts an answer of pages `first..first+n`, `newly` of them new: the
/// faults that waited on them are served.
fn record_answer(
    first: u64,
    n: u64,
    newly: u64,
    pending: &mut HashMap<u64, Pending>,
    st: &mut FaultStats,
) {
    for p in first..first + n {
        let Some(w) = pending.remove(&p) else {
            continue;
        };
        if w.vcpu == DISK_READER {
            st.disk_demand += 1;
            continue;
        }
        if w.vcpu == AROUND {
            // Fetched around a fault; nobody faulted on it before it came.
            continue;
        }
        let us = w.since.elapsed().as_micros() as u64;
        if us >= SLOW_FAULT_US {
            debug!(pfn = p, us, newly, "slow demand fault");
        }
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

fn write_all_nonblocking(mut conn: &Stream, mut buf: &[u8]) -> Result<(), ProtocolError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !buf.is_empty() {
        match conn.write(buf) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => buf = &buf[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if Instant::now() > deadline {
                    return Err(ProtocolError::Io(e));
                }
                wait_writable(conn);
            }
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    // TLS: the request's ciphertext may still wait in the session.
    loop {
        match conn.flush() {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if Instant::now() > deadline {
                    return Err(ProtocolError::Io(e));
                }
                wait_writable(conn);
            }
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
}

/// Sleeps until `conn` can take more bytes, or 10 ms pass. (Never a
/// busy loop: the fault thread may run at real-time priority, where
/// spinning would starve the core's other threads, softirq work included.)
fn wait_writable(conn: &Stream) {
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLOUT)];
    // EINTR or a spurious wake-up only ends the nap early.
    let _ = poll(&mut fds, PollTimeout::from(10u16));
}

/// Sleeps until the userfaultfd, the connection or one of the eventfds
/// is readable, or `timeout_ms` passes.
fn wait_readable(
    uffd: &impl AsFd,
    conn: Option<&Stream>,
    events: [Option<&EventFd>; 2],
    timeout_ms: u16,
) {
    let mut fds = vec![PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
    if let Some(c) = conn {
        fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
    }
    for e in events.into_iter().flatten() {
        // SAFETY: the eventfd outlives this call (the caller holds it
        // borrowed), so its descriptor stays open while `fds` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(e.as_raw_fd()) };
        fds.push(PollFd::new(fd, PollFlags::POLLIN));
    }
    // EINTR or a spurious wake-up only ends the nap early.
    let _ = poll(&mut fds, PollTimeout::from(timeout_ms));
}

/// The demand-fault thread of a lazy migration.
pub(super) struct FaultThread {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<Result<FaultStats, FaultError>>>,
}

impl FaultThread {
    /// Starts the thread on the fault connection (and the bytes already
    /// read from it). `control` is shut down whenever the fault connection
    /// fails, so the thread reading it notices too. `decode` is where
    /// compressed answers are decoded: made backed ahead of time, so the
    /// first ones after the resume do not pay for fresh memory.
    pub(super) fn start(
        ram: Arc<UffdRam>,
        disks: Option<Arc<DiskSet>>,
        conn: Stream,
        buffered: Vec<u8>,
        control: Option<Stream>,
        priority: FaultPriority,
        decode: Vec<u8>,
    ) -> Result<Self, FaultError> {
        let shared = Arc::new(Shared {
            tids: OnceLock::new(),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
            next: Mutex::new(None),
            control: Mutex::new(control),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(FaultError::Spawn)?,
            progress: Mutex::new(0),
            progressed: Condvar::new(),
        });
        let first = Conn::new(conn, buffered)?;
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("uffd-fault".into())
                .spawn(move || {
                    let applied = match priority.apply() {
                        Ok(got) => {
                            debug!(?priority, ?got, "fault thread priority");
                            got
                        }
                        Err(e) => {
                            warn!(?priority, error = %e, "cannot set the fault thread's priority");
                            Applied::Normal
                        }
                    };
                    crate::seccomp::apply(crate::seccomp::Thread::Fault)?;
                    let ran = run(ram, disks, first, shared.clone(), decode);
                    shared.notify();
                    let mut st = ran?;
                    st.priority = Some(applied);
                    Ok(st)
                })
                .map_err(FaultError::Spawn)?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Lets faults be attributed to vCPUs by thread id.
    pub(super) fn attribute_to(&self, vcpu_tids: Vec<i32>) {
        let _ = self.shared.tids.set(vcpu_tids);
    }

    /// True while the fault connection is lost and not yet replaced.
    pub(super) fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::Acquire)
    }

    /// Gives up on the current connection (the control connection failed):
    /// faults wait until [`FaultThread::reconnect`].
    pub(super) fn mark_down(&self) {
        self.shared.down.store(true, Ordering::Release);
        *self.shared.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.shared.wake();
    }

    /// Hands the thread a new fault connection (after a resume handshake)
    /// and a new control connection to shut down on failure.
    pub(super) fn reconnect(&self, conn: Stream, buffered: Vec<u8>, control: Option<Stream>) {
        *self
            .shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = control;
        *self.shared.next.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn, buffered));
        self.shared.wake();
    }

    /// Where the thread's progress count stands (see
    /// [`FaultThread::wait_for_progress`]).
    pub(super) fn progress(&self) -> u64 {
        *self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the progress count moves past `seen` (answers were
    /// installed, the link was lost, or the thread ended), or `timeout`
    /// passes. Read `seen` before checking what the wait is for, so that
    /// progress made in between ends the wait at once.
    pub(super) fn wait_for_progress(&self, seen: u64, timeout: Duration) {
        let count = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = self
            .shared
            .progressed
            .wait_timeout_while(count, timeout, |c| *c == seen);
    }

    /// True when the thread ended (an error it could not wait out).
    pub(super) fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread and returns what it measured.
    pub(super) fn stop(mut self) -> Result<FaultStats, FaultError> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(FaultError::Uffd("fault handler panicked".into())),
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

mod in_place;

#[cfg(test)]
mod tests;
