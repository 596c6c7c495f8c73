//! The source-side post-copy page server.
//!
//! Once the destination runs the VM, [`serve`] owns both connections of the
//! session and does two things on one `mio` event loop:
//!
//! * **Demand**: every `PageRequest` read on the fault connection is answered
//!   at once, on the fault connection, with a `Pages` frame carrying the same
//!   request id, before any further push work. Pages are sent again when
//!   asked, even if they were pushed already.
//! * **Push**: on the control connection, every page not yet sent is sent
//!   exactly once, in frames of [`ServerConfig::push_pages`] pages whatever
//!   the fault rate. The sweep goes from page 0 to the end (pages already
//!   sent on demand are skipped) and wraps around until every page is out.
//!   Holes and all-zero runs go as `Zero` frames. A push frame is only
//!   generated once the previous one has been handed to the kernel, and it
//!   is handed over [`PUSH_WRITE`] bytes at a time, so a demand request
//!   waits for at most one such write (or one frame's encoding) before it is
//!   read.
//!
//!   Demand does not shrink or move the push: an earlier design cut push
//!   frames to 32 pages for 20 ms after each request and restarted the sweep
//!   just past it. Under a steady fault rate that halved the push rate, and
//!   a slower push meant more faults (2G guest, 1G working set: 1.02 s with
//!   it, 0.75 s without, pinned).
//!
//! When the push is over, a `PushDone` frame with the [`ServerStats`] so far
//! follows on the control connection; demand service goes on until the
//! destination's `Complete` arrives there.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use ferry_transport::Conn as Stream;
use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use crate::pacer::Pacer;
use crate::source::PageSource;
use ferry_protocol::{
    self as protocol, MsgType, PageBitmap, PageEncoding, PageRequest, ProtocolError,
    MAX_PAGES_PER_FRAME, PAGE_SIZE,
};

mod conn;
mod sweep;

use conn::{Conn, Fill};
use sweep::Sweep;

const CONTROL: Token = Token(0);
const FAULT: Token = Token(1);
/// Requests are not read while this many answer bytes wait to be written, so
/// a destination that asks without reading cannot make the server balloon.
const FAULT_OUT_LIMIT: usize = 8 << 20;
/// How long a closed fault connection may wait for `Complete` to show up on
/// the control connection (the two streams are not ordered on the wire).
const FAULT_EOF_GRACE: Duration = Duration::from_secs(1);
/// Most bytes handed to the control socket per write: between two writes
/// the event loop reads and answers demand requests.
pub const PUSH_WRITE: usize = 256 << 10;
/// Push frames never cross a multiple of this many pages (2 MiB).
const FRAME_ALIGN_PAGES: u64 = 512;
/// After this many push frames in a row that LZ4 could not shrink, the push
/// stops trying for [`LZ4_REST`] frames (guest data that does not compress
/// would otherwise cost a compression pass per byte sent).
const LZ4_MISSES: u32 = 4;
/// Push frames sent raw without trying LZ4 after [`LZ4_MISSES`] misses.
const LZ4_REST: u32 = 64;
/// Push progress is logged every this many pages (64 MiB).
const PROGRESS_PAGES: u64 = 16 << 10;

/// How the page server sends pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// LZ4-compress a frame when that makes it smaller (feature `LZ4`).
    pub lz4: bool,
    /// Send holes and all-zero runs as markers without data (feature
    /// `ZERO_RUNS`).
    pub zero_runs: bool,
    /// Pages per push frame, clamped to `1..=512`.
    pub push_pages: u32,
    /// `SO_SNDBUF` for the control connection. On a link shared with the
    /// fault connection this bounds how much bulk data sits queued ahead of a
    /// demand answer.
    pub push_sndbuf: Option<usize>,
    /// A destination that sends nothing on the control connection for this
    /// long (not even `Ping`) is gone; the server also sends `Ping` after a
    /// quarter of it without other output.
    pub peer_timeout: Duration,
    /// Caps the background push at this many bytes per second (demand
    /// answers are never capped); never 0 (see [`Pacer`]).
    pub max_bandwidth: Option<std::num::NonZeroU64>,
    /// Holds the push back while the guest's demand faults reveal its
    /// working set (a lazy restore that records it): see [`PushHold`].
    pub push_hold: Option<PushHold>,
}

/// When a held push starts: once no demand request came for `quiet` (the
/// guest has found its working set), or `max` after the server started,
/// whichever is first. Demand requests are answered throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushHold {
    /// Silence on the fault connection that ends the hold.
    pub quiet: Duration,
    /// The longest hold.
    pub max: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            lz4: true,
            zero_runs: true,
            push_pages: 512,
            push_sndbuf: None,
            peer_timeout: Duration::from_secs(5),
            max_bandwidth: None,
            push_hold: None,
        }
    }
}

/// Percentiles of a latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencyUs {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Worst case.
    pub max: u64,
}

/// What the page server did; sent (so far) in `PushDone` and returned by
/// [`serve`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerStats {
    /// Pages sent by the background push.
    pub pages_pushed: u64,
    /// Pages sent in answer to demand requests.
    pub pages_demand: u64,
    /// Demand requests answered.
    pub requests: u64,
    /// Pages sent as zero markers (push and demand).
    pub pages_zero: u64,
    /// Pages sent LZ4-compressed (push and demand).
    pub pages_lz4: u64,
    /// Every byte written on both connections, frame headers included.
    pub bytes_wire: u64,
    /// 4096 × the non-zero pages sent.
    pub bytes_raw: u64,
    /// Milliseconds from the start of [`serve`] until every page was pushed.
    pub push_ms: f64,
    /// CPU time of the page server's thread, in milliseconds, from the
    /// start of [`serve`] until every page was pushed (on loopback the
    /// sender's socket writes also carry the receiving side's TCP work).
    #[serde(default)]
    pub push_cpu_ms: f64,
    /// Pages pushed first as the hot set (zero without one).
    #[serde(default)]
    pub pages_hot: u64,
    /// Milliseconds from the start of [`serve`] until the hot set was out.
    #[serde(default)]
    pub hot_ms: f64,
    /// Milliseconds from the start of [`serve`] until `Complete` (or until the
    /// stats were taken).
    pub total_ms: f64,
    /// Time from reading a request to its answer being fully written.
    pub demand_service_us: LatencyUs,
}

/// Why the page server stopped without a `Complete`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The peer broke the protocol, aborted, or closed a connection, or the
    /// connection failed.
    #[error("{conn} connection: {source}")]
    Protocol {
        /// `"control"` or `"fault"`.
        conn: &'static str,
        /// What went wrong.
        #[source]
        source: ProtocolError,
    },
    /// Guest memory could not be read.
    #[error("reading guest memory at page {pfn}: {source}")]
    Source {
        /// First page of the failed read.
        pfn: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Setting up the sockets, or running the event loop, failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Serves post-copy pages until the destination says `Complete`, returning
/// the final statistics and the `Complete` frame's JSON payload.
///
/// `control` and `fault` are the session's two connections (plain TCP,
/// TLS, or the ends of socketpairs), past the handshake (and, on `control`,
/// the `State`). They are switched to non-blocking mode with `TCP_NODELAY`
/// (on TCP) and closed on return.
pub fn serve(
    control: impl Into<Stream>,
    fault: impl Into<Stream>,
    source: &dyn PageSource,
    cfg: &ServerConfig,
) -> Result<(ServerStats, serde_json::Value), ServerError> {
    serve_rest(control, fault, source, cfg, Resume::default())
}

/// What [`serve_rest`] starts from besides the two connections.
#[derive(Debug, Default)]
pub struct Resume<'a> {
    /// Pages the destination already holds (hybrid's pre-copy rounds): the
    /// push skips them.
    pub have: Option<&'a PageBitmap>,
    /// Kept at the number of pages sent so far (for progress bars).
    pub sent: Option<&'a AtomicU64>,
    /// Kept at its value at the start plus the bytes sent since.
    pub sent_bytes: Option<&'a AtomicU64>,
    /// Pages to push before any other (the guest's hot set).
    pub hot: Option<&'a PageBitmap>,
    /// Bytes the caller already read from `control` past its last frame.
    pub control_buffered: Vec<u8>,
    /// The same for `fault`.
    pub fault_buffered: Vec<u8>,
    /// Buffers made ahead of time (`Backed::backed`); made here when
    /// empty.
    pub buffers: Buffers,
}

/// The page server's big buffers: one frame of pages for demand answers,
/// one for the push, and LZ4's output for one frame.
#[derive(Debug, Default)]
pub struct Buffers {
    demand: Vec<u8>,
    push: Vec<u8>,
    lz4: Vec<u8>,
}

/// One set of [`Buffers`] kept for the next move (see [`crate::spare`]):
/// made when the VM starts, a move does not spend 3-7 ms of its set-up
/// backing them, with the guest's vCPU on the same core.
pub type SpareBuffers = crate::spare::Spare<Buffers>;

impl crate::spare::Backed for Buffers {
    /// All three, written once now so that their memory is backed
    /// before the first answer needs it: the first write to fresh memory
    /// costs a page fault per 4 KiB (about 1 ms per 2 MiB here, and far
    /// more on a host that has handed recently freed memory back to its
    /// own hypervisor). Make them before the pause, off the critical path.
    fn backed() -> Self {
        let frame = MAX_PAGES_PER_FRAME as usize * PAGE_SIZE;
        Self {
            demand: protocol::backed_buffer(frame),
            push: protocol::backed_buffer(frame),
            lz4: protocol::backed_buffer(protocol::lz4_room(frame)),
        }
    }
}

/// Like [`serve`], from where `resume` says: pages the destination already
/// holds are not pushed (demand requests are answered for any page).
pub fn serve_rest(
    control: impl Into<Stream>,
    fault: impl Into<Stream>,
    source: &dyn PageSource,
    cfg: &ServerConfig,
    resume: Resume<'_>,
) -> Result<(ServerStats, serde_json::Value), ServerError> {
    let Resume {
        have,
        hot,
        sent,
        sent_bytes,
        control_buffered,
        fault_buffered,
        buffers,
    } = resume;
    let Buffers { demand, push, lz4 } = buffers;
    let demand = if demand.is_empty() {
        protocol::backed_buffer(MAX_PAGES_PER_FRAME as usize * PAGE_SIZE)
    } else {
        demand
    };
    let start = Instant::now();
    let mut poll = Poll::new().map_err(setup("creating the event loop"))?;
    let mut server = Server {
        control: Conn::new("control", control.into(), cfg.push_sndbuf, control_buffered)?,
        fault: Conn::new("fault", fault.into(), None, fault_buffered)?,
        source,
        lz4: cfg.lz4,
        zero_runs: cfg.zero_runs,
        push_pages: u64::from(cfg.push_pages.clamp(1, MAX_PAGES_PER_FRAME)),
        sweep: {
            let mut sweep = Sweep::new(source.pages());
            if let Some(have) = have {
                sweep.mark_all(have);
            }
            if let Some(hot) = hot {
                sweep.hot_first(hot);
            }
            sweep
        },
        stats: ServerStats::default(),
        service: Histogram::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| setup("creating a histogram")(io::Error::other(e)))?,
        answers: VecDeque::new(),
        buf: demand,
        push_buf: push,
        scratch: lz4,
        payload: Vec::new(),
        start,
        start_cpu: thread_cpu(),
        push_done: false,
        fault_closed: None,
        last_demand: None,
        sent,
        sent_bytes: sent_bytes.map(|b| (b, b.load(Ordering::Relaxed))),
        initial_left: 0,
        peer_timeout: cfg.peer_timeout,
        ping_every: cfg.peer_timeout / 4,
        last_control_rx: start,
        last_control_tx: start,
        pacer: cfg.max_bandwidth.map(Pacer::new),
        push_hold: cfg.push_hold,
        lz4_backoff: Lz4Backoff::default(),
        no_data: 0..0,
    };
    server.initial_left = server.sweep.left;
    for (conn, token) in [(&mut server.control, CONTROL), (&mut server.fault, FAULT)] {
        poll.registry()
            .register(
                &mut SourceFd(&conn.stream.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(setup("registering a connection"))?;
    }
    debug!(pages = source.pages(), ?cfg, "page server starting");
    let result = server.run(&mut poll);
    let stats = server.snapshot();
    match &result {
        Ok(_) => info!(
            pushed = stats.pages_pushed,
            demand = stats.pages_demand,
            requests = stats.requests,
            zero = stats.pages_zero,
            lz4 = stats.pages_lz4,
            wire_mib = stats.bytes_wire >> 20,
            push_ms = stats.push_ms,
            total_ms = stats.total_ms,
            p99_us = stats.demand_service_us.p99,
            "post-copy page server done"
        ),
        Err(e) => {
            warn!(error = %e, "post-copy page server failed");
            server.try_abort(e);
        }
    }
    result.map(|complete| (stats, complete))
}

impl ServerError {
    /// True when a connection was lost (closed, reset, timed out, or the
    /// peer went silent): the session may be resumed on new connections.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            ServerError::Protocol {
                source: ProtocolError::Closed | ProtocolError::Io(_),
                ..
            }
        )
    }
}

pub(super) fn setup(what: &'static str) -> impl Fn(io::Error) -> ServerError {
    move |source| ServerError::Setup { what, source }
}

/// The event loop's state.
struct Server<'a> {
    control: Conn<'a>,
    fault: Conn<'a>,
    source: &'a dyn PageSource,
    lz4: bool,
    zero_runs: bool,
    push_pages: u64,
    sweep: Sweep,
    stats: ServerStats,
    /// Demand service times in microseconds.
    service: Histogram<u64>,
    /// Answers not yet fully written: (end offset in the fault stream, when
    /// the request was read).
    answers: VecDeque<(u64, Instant)>,
    /// Pages read from the source for demand answers.
    buf: Vec<u8>,
    /// Pages read from the source for the push; a push frame of raw pages
    /// that fills it whole is sent from it (it swaps with the control
    /// connection's body buffer), not copied into the send queue.
    push_buf: Vec<u8>,
    /// LZ4 output.
    scratch: Vec<u8>,
    /// Payload of the frame being handled.
    payload: Vec<u8>,
    start: Instant,
    /// This thread's CPU time at `start`.
    start_cpu: Duration,
    push_done: bool,
    /// When the fault connection reached EOF.
    fault_closed: Option<Instant>,
    /// When the last demand request was read.
    last_demand: Option<Instant>,
    /// Pages sent so far, published for progress bars.
    sent: Option<&'a AtomicU64>,
    /// Bytes sent, published, and its value when this server started.
    sent_bytes: Option<(&'a AtomicU64, u64)>,
    /// Pages the push had to send when it started.
    initial_left: u64,
    /// Silence limit on the control connection, and the ping interval.
    peer_timeout: Duration,
    ping_every: Duration,
    /// When the control connection last delivered or took bytes.
    last_control_rx: Instant,
    last_control_tx: Instant,
    /// The push's bandwidth cap, if any.
    pacer: Option<Pacer>,
    /// Holds the push until the guest's demand quiets down; `None` once
    /// the push has started.
    push_hold: Option<PushHold>,
    /// When the push tries LZ4.
    lz4_backoff: Lz4Backoff,
    /// Pages the source last said hold no data. Pages do not change while
    /// they are served (the VM is paused for good), so the answer holds for
    /// the rest of the push, which asks once per hole, not once per frame:
    /// a source that has to search for data (huge-page RAM) would otherwise
    /// search the same hole again for each of its frames.
    no_data: std::ops::Range<u64>,
}

/// When the push tries LZ4: after [`LZ4_MISSES`] frames in a row that it
/// did not shrink, the next [`LZ4_REST`] go raw without trying.
#[derive(Debug, Default)]
struct Lz4Backoff {
    /// Frames in a row that LZ4 did not shrink.
    misses: u32,
    /// Push steps left to send without trying.
    rest: u32,
}

impl Lz4Backoff {
    /// Whether this push step tries LZ4 (one call per step).
    fn try_now(&mut self) -> bool {
        let now = self.rest == 0;
        self.rest = self.rest.saturating_sub(1);
        now
    }

    /// Notes whether LZ4 shrank a frame it was tried on.
    fn tried(&mut self, shrank: bool) {
        if shrank {
            self.misses = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= LZ4_MISSES {
            self.misses = 0;
            self.rest = LZ4_REST;
        }
    }
}

impl<'a> Server<'a> {
    /// How much longer a held push waits (zero once it runs).
    fn held_for(&mut self) -> Duration {
        let Some(h) = self.push_hold else {
            return Duration::ZERO;
        };
        let quiet_since = self.last_demand.unwrap_or(self.start);
        let left = h
            .quiet
            .saturating_sub(quiet_since.elapsed())
            .min(h.max.saturating_sub(self.start.elapsed()));
        if left.is_zero() {
            debug!(
                held_ms = self.start.elapsed().as_millis() as u64,
                demand = self.stats.pages_demand,
                "the held push starts"
            );
            self.push_hold = None;
        }
        left
    }

    fn run(&mut self, poll: &mut Poll) -> Result<serde_json::Value, ServerError> {
        let mut events = Events::with_capacity(16);
        loop {
            if let Some(sent) = self.sent {
                sent.store(self.initial_left - self.sweep.left, Ordering::Relaxed);
            }
            if let Some((bytes, base)) = self.sent_bytes {
                bytes.store(base + self.stats.bytes_wire, Ordering::Relaxed);
            }
            self.service_faults()?;
            if let Some(complete) = self.service_control()? {
                return Ok(complete);
            }
            let mut timeout = None;
            let hold = self
                .held_for()
                .max(self.pacer.as_ref().map_or(Duration::ZERO, Pacer::wait));
            if !self.sweep.done() && self.control.pending() == 0 && !hold.is_zero() {
                // Over the bandwidth cap, or held while a restore records
                // the working set: demand answers go on, the push waits.
                timeout = Some(hold);
            } else if !self.sweep.done() && self.control.pending() == 0 {
                let before = self.control.queued;
                self.push_step()?;
                if let Some(p) = self.pacer.as_mut() {
                    p.sent(self.control.queued - before);
                }
                if self.sweep.done() {
                    self.queue_push_done();
                }
                self.flush_control()?;
                // Look for demand before the next push frame, without waiting.
                timeout = Some(Duration::ZERO);
            } else if self.sweep.done() && !self.push_done {
                // Demand answers sent the last pages (or there were none).
                self.queue_push_done();
                self.flush_control()?;
                timeout = Some(Duration::ZERO);
            }
            if self.control.writable && self.control.pending() > 0 {
                // A flush stopped at `PUSH_WRITE`, not at a full socket: no
                // event will come for the rest.
                timeout = Some(Duration::ZERO);
            }
            if self.fault.readable && self.fault_closed.is_none() && !self.fault_blocked() {
                // More requests may be waiting in the socket.
                timeout = Some(Duration::ZERO);
            }
            if let Some(closed) = self.fault_closed {
                let left = FAULT_EOF_GRACE.saturating_sub(closed.elapsed());
                if left.is_zero() {
                    return Err(self.fault.err(ProtocolError::Closed));
                }
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
            let wake = self.keep_alive()?;
            timeout = Some(timeout.map_or(wake, |t| t.min(wake)));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(setup("waiting for events")(e));
                }
            }
            for ev in events.iter() {
                let conn = if ev.token() == CONTROL {
                    &mut self.control
                } else {
                    &mut self.fault
                };
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    conn.readable = !conn.eof;
                }
                if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                    conn.writable = true;
                }
            }
        }
    }

    /// Answers every request already read, in order, then reads once more
    /// and answers what that brought. One read per pass keeps a steady
    /// stream of requests from starving the push.
    fn service_faults(&mut self) -> Result<(), ServerError> {
        self.answer_buffered()?;
        if self.fault_closed.is_some() || !self.fault.readable || self.fault_blocked() {
            return Ok(());
        }
        match self.fault.fill()? {
            Fill::Data => self.answer_buffered(),
            Fill::Blocked => Ok(()),
            Fill::Eof => {
                debug!("fault connection closed by the destination");
                self.fault_closed = Some(Instant::now());
                Ok(())
            }
        }
    }

    /// Sends `Ping` when the control connection was quiet for a while, and
    /// fails when the destination was silent for the peer timeout. Returns
    /// how long the event loop may sleep before this needs another look.
    fn keep_alive(&mut self) -> Result<Duration, ServerError> {
        let silent = self.last_control_rx.elapsed();
        if silent > self.peer_timeout {
            return Err(self.control.err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("destination silent for {silent:?}"),
            ))));
        }
        if self.last_control_tx.elapsed() >= self.ping_every && self.control.pending() == 0 {
            let before = self.control.out.len();
            // Writing to a Vec cannot fail.
            let _ = protocol::write_frame(&mut self.control.out, MsgType::Ping, 0, &[]);
            self.control.queued_since(before);
            self.flush_control()?;
        }
        let ping_in = self
            .ping_every
            .saturating_sub(self.last_control_tx.elapsed());
        let dead_in = self.peer_timeout.saturating_sub(silent);
        Ok(ping_in.min(dead_in).max(Duration::from_millis(1)))
    }

    /// Too many answer bytes are waiting to be written to read requests.
    fn fault_blocked(&self) -> bool {
        self.fault.pending() >= FAULT_OUT_LIMIT
    }

    /// Answers the whole requests in the fault connection's input buffer.
    fn answer_buffered(&mut self) -> Result<(), ServerError> {
        while !self.fault_blocked() {
            let Some(hdr) = self.fault.next_frame(&mut self.payload)? else {
                break;
            };
            if hdr.kind != MsgType::PageRequest {
                return Err(self.fault.err(ProtocolError::Unexpected {
                    got: hdr.kind,
                    expected: "PageRequest",
                }));
            }
            let req = PageRequest::decode(&self.payload, self.sweep.pages)
                .map_err(|e| self.fault.err(e))?;
            self.answer(hdr.arg, req)?;
        }
        self.flush_fault()
    }

    /// Queues the answer to one request and tries to write it.
    fn answer(&mut self, id: u64, req: PageRequest) -> Result<(), ServerError> {
        let read_at = Instant::now();
        self.last_demand = Some(read_at);
        let count = u64::from(req.count);
        // Lent pages (a paused VM's RAM) are sent from where they are.
        let source: &'a dyn PageSource = self.source;
        let lent = source.lend(req.pfn, count);
        let data = match lent {
            Some(lent) => lent,
            None => {
                let buf = &mut self.buf[..req.count as usize * PAGE_SIZE];
                source
                    .read(req.pfn, buf)
                    .map_err(|source| ServerError::Source {
                        pfn: req.pfn,
                        source,
                    })?;
                buf
            }
        };
        // Written from `buf` (or the LZ4 output) itself, not copied into
        // the send queue first, when nothing else waits to be sent.
        // LZ4 is tried as for the push: a 2 MiB answer of incompressible
        // pages costs about 200 µs to try, a fifth of its service time.
        let try_lz4 = self.lz4 && self.lz4_backoff.try_now();
        let (enc, body) =
            protocol::choose_encoding(data, &mut self.scratch, try_lz4, self.zero_runs);
        if try_lz4 && enc != PageEncoding::Zero {
            self.lz4_backoff.tried(enc == PageEncoding::Lz4);
        }
        let mut head = Vec::with_capacity(protocol::HEADER_LEN + protocol::PAGES_PREFIX);
        protocol::append_pages_head(&mut head, id, req.pfn, req.count, enc, body.len());
        if self.fault_closed.is_none() {
            // Raw lent pages: what the socket does not take now waits
            // where it is, not copied into the send queue.
            self.stats.bytes_wire += match lent.filter(|_| enc == PageEncoding::Raw) {
                Some(lent) => self.fault.write_through_lent(&head, lent)?,
                None => self.fault.write_through(&head, body)?,
            };
        } else {
            self.fault.queue(&head, body);
        }
        self.count(enc, count);
        self.stats.pages_demand += count;
        self.stats.requests += 1;
        self.answers.push_back((self.fault.queued, read_at));
        self.sweep.mark(req.pfn, count);
        self.flush_fault()
    }

    fn flush_fault(&mut self) -> Result<(), ServerError> {
        if self.fault_closed.is_some() {
            return Ok(());
        }
        self.stats.bytes_wire += self.fault.flush(usize::MAX)?;
        while let Some(&(end, read_at)) = self.answers.front() {
            if end > self.fault.written {
                break;
            }
            let us = read_at.elapsed().as_micros();
            self.service
                .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
            self.answers.pop_front();
        }
        Ok(())
    }

    fn flush_control(&mut self) -> Result<(), ServerError> {
        let n = self.control.flush(PUSH_WRITE)?;
        if n > 0 {
            self.last_control_tx = Instant::now();
        }
        self.stats.bytes_wire += n;
        Ok(())
    }

    /// Reads the control connection; returns `Complete`'s payload once seen.
    fn service_control(&mut self) -> Result<Option<serde_json::Value>, ServerError> {
        self.flush_control()?;
        loop {
            if let Some(hdr) = self.control.next_frame(&mut self.payload)? {
                if hdr.kind == MsgType::Ping {
                    continue;
                }
                if hdr.kind != MsgType::Complete {
                    return Err(self.control.err(ProtocolError::Unexpected {
                        got: hdr.kind,
                        expected: "Complete",
                    }));
                }
                if !self.sweep.done() {
                    debug!(left = self.sweep.left, "Complete before the push was over");
                }
                let v = protocol::from_json("Complete", &self.payload)
                    .map_err(|e| self.control.err(e))?;
                return Ok(Some(v));
            }
            if !self.control.readable {
                return Ok(None);
            }
            match self.control.fill()? {
                Fill::Data => self.last_control_rx = Instant::now(),
                Fill::Blocked => return Ok(None),
                Fill::Eof => return Err(self.control.err(ProtocolError::Closed)),
            }
        }
    }

    /// Queues the next push frame(s): one run of unsent pages from the sweep
    /// cursor, at most `push_pages` pages of data or 512 pages of hole.
    fn push_step(&mut self) -> Result<(), ServerError> {
        let Some(pfn) = self.sweep.next() else {
            return Ok(());
        };
        let hot = self.sweep.in_hot();
        if !hot && self.stats.pages_hot > 0 && self.stats.hot_ms == 0.0 {
            // The last hot pages went out on demand.
            self.stats.hot_ms = ms(self.start.elapsed());
        }
        let run = self.sweep.unsent_run(pfn, u64::from(MAX_PAGES_PER_FRAME));
        let before = self.control.out.len();
        // Frames end at 2 MiB boundaries, so that for a destination whose
        // RAM is in huge pages a full frame is one whole huge page, mapped
        // straight from the frame.
        let mut n = run
            .min(self.push_pages)
            .min(FRAME_ALIGN_PAGES - pfn % FRAME_ALIGN_PAGES);
        let try_lz4 = self.lz4 && self.lz4_backoff.try_now();
        let hole = if self.zero_runs {
            if !self.no_data.contains(&pfn) {
                let data = self.source.next_data(pfn).unwrap_or(self.sweep.pages);
                self.no_data = pfn..data.max(pfn);
            }
            (self.no_data.end - pfn).min(run)
        } else {
            0
        };
        if hole > 0 {
            n = hole;
            protocol::append_zero_pages_frame(&mut self.control.out, 0, pfn, n as u32);
            self.count(PageEncoding::Zero, n);
        } else {
            let len = n as usize * PAGE_SIZE;
            let mut buf = std::mem::take(&mut self.push_buf);
            let source: &'a dyn PageSource = self.source;
            let lent = source.lend(pfn, n);
            if lent.is_none() {
                buf.resize(len, 0);
                source
                    .read(pfn, &mut buf)
                    .map_err(|source| ServerError::Source { pfn, source })?;
            }
            let pages: &[u8] = lent.unwrap_or(&buf);
            // Split into runs of zero and non-zero pages.
            let total = n as usize;
            let page = |i: usize| &pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let mut sent = [0u64; 3]; // pages per PageEncoding
            let mut whole_raw = false;
            let mut at = 0;
            while at < total {
                let zero = self.zero_runs && protocol::is_zero(page(at));
                let end = if self.zero_runs {
                    (at + 1..total)
                        .find(|&i| protocol::is_zero(page(i)) != zero)
                        .unwrap_or(total)
                } else {
                    total
                };
                let first = pfn + at as u64;
                let len = (end - at) as u64;
                let bytes = &pages[at * PAGE_SIZE..end * PAGE_SIZE];
                let enc = if zero {
                    protocol::append_zero_pages_frame(&mut self.control.out, 0, first, len as u32);
                    PageEncoding::Zero
                } else {
                    let (enc, body) =
                        protocol::choose_encoding(bytes, &mut self.scratch, try_lz4, false);
                    protocol::append_pages_head(
                        &mut self.control.out,
                        0,
                        first,
                        len as u32,
                        enc,
                        body.len(),
                    );
                    whole_raw = enc == PageEncoding::Raw && at == 0 && end == total;
                    if !whole_raw {
                        self.control.out.extend_from_slice(body);
                    }
                    enc
                };
                if try_lz4 && !zero {
                    self.lz4_backoff.tried(enc == PageEncoding::Lz4);
                }
                sent[enc as usize] += len;
                at = end;
            }
            if whole_raw {
                // The frame's head is queued; its pages go from where they
                // were lent, or from `buf`.
                match lent {
                    Some(lent) => self.control.queue_lent(lent),
                    None => buf = self.control.queue_body(buf),
                }
            }
            self.push_buf = buf;
            for enc in [PageEncoding::Raw, PageEncoding::Lz4, PageEncoding::Zero] {
                self.count(enc, sent[enc as usize]);
            }
        }
        self.control.queued_since(before);
        let pushed = self.stats.pages_pushed;
        self.stats.pages_pushed += n;
        if hot {
            self.stats.pages_hot += n;
            if !self.sweep.in_hot() {
                self.stats.hot_ms = ms(self.start.elapsed());
                debug!(
                    pages = self.stats.pages_hot,
                    ms = self.stats.hot_ms,
                    "hot set pushed"
                );
            }
        }
        self.sweep.mark(pfn, n);
        self.sweep.jump(pfn + n);
        if pushed / PROGRESS_PAGES != self.stats.pages_pushed / PROGRESS_PAGES {
            debug!(
                pushed = self.stats.pages_pushed,
                left = self.sweep.left,
                wire_mib = self.stats.bytes_wire >> 20,
                "push progress"
            );
        }
        Ok(())
    }

    fn count(&mut self, enc: PageEncoding, pages: u64) {
        match enc {
            PageEncoding::Zero => self.stats.pages_zero += pages,
            PageEncoding::Lz4 => {
                self.stats.pages_lz4 += pages;
                self.stats.bytes_raw += pages * PAGE_SIZE as u64;
            }
            PageEncoding::Raw => self.stats.bytes_raw += pages * PAGE_SIZE as u64,
        }
    }

    fn queue_push_done(&mut self) {
        self.stats.push_ms = ms(self.start.elapsed());
        self.stats.push_cpu_ms = ms(thread_cpu().saturating_sub(self.start_cpu));
        let stats = self.snapshot();
        debug!(?stats, "push done");
        let json = serde_json::to_vec(&stats).unwrap_or_default();
        let before = self.control.out.len();
        // Writing to a Vec cannot fail.
        let _ = protocol::write_frame(&mut self.control.out, MsgType::PushDone, 0, &json);
        self.control.queued_since(before);
        self.push_done = true;
    }

    /// The statistics as of now.
    fn snapshot(&self) -> ServerStats {
        let h = &self.service;
        let mut s = self.stats.clone();
        s.total_ms = ms(self.start.elapsed());
        if !h.is_empty() {
            s.demand_service_us = LatencyUs {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            };
        }
        s
    }

    /// Best effort: tells the destination why the server gives up, if the
    /// control connection is at a frame boundary and the failure is not the
    /// peer's own abort or hang-up.
    fn try_abort(&mut self, e: &ServerError) {
        if let ServerError::Protocol {
            source: ProtocolError::Aborted(_) | ProtocolError::Closed | ProtocolError::Io(_),
            ..
        } = e
        {
            return;
        }
        if self.control.pending() != 0 {
            return;
        }
        if let Some(frame) = abort_frame(e) {
            let _ = (&self.control.stream).write(&frame);
        }
    }
}

/// The `Abort` frame that tells the destination why the server gives up:
/// `e`'s text, cut at a character boundary to what an `Abort` carries.
fn abort_frame(e: &ServerError) -> Option<Vec<u8>> {
    let why = e.to_string();
    let mut frame = Vec::new();
    protocol::write_frame(&mut frame, MsgType::Abort, 0, protocol::abort_reason(&why)).ok()?;
    Some(frame)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time the calling thread has used (zero if the clock cannot be read).
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason longer than an `Abort` carries, whose cut falls inside a
    /// two-byte character (4095 ASCII bytes, then `é`), goes out cut
    /// before that character: `String::truncate` there used to panic the
    /// page server while it gave up.
    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let prefix = "control connection: handshake failed: ";
        let detail = "x".repeat(protocol::MAX_ABORT_REASON - 1 - prefix.len()) + "é and more";
        let e = ServerError::Protocol {
            conn: "control",
            source: ProtocolError::Handshake(detail),
        };
        assert!(e.to_string().starts_with(prefix));
        let frame = abort_frame(&e).expect("an Abort frame");
        let mut payload = Vec::new();
        let got = protocol::read_frame(&mut &frame[..], &mut payload);
        let why = match got {
            Err(ProtocolError::Aborted(why)) => why,
            other => panic!("not an Abort: {other:?}"),
        };
        assert_eq!(why.len(), protocol::MAX_ABORT_REASON - 1);
        assert!(why.starts_with(prefix) && why.ends_with('x'), "{why}");
    }

    #[test]
    fn buffers_are_made_whole() {
        use crate::spare::Backed;
        let frame = MAX_PAGES_PER_FRAME as usize * PAGE_SIZE;
        let b = Buffers::backed();
        assert_eq!((b.demand.len(), b.push.len()), (frame, frame));
        assert!(b.lz4.len() >= protocol::lz4_room(frame));
    }

    #[test]
    fn lz4_rests_after_misses_and_a_hit_resets_the_count() {
        let mut b = Lz4Backoff::default();
        for _ in 0..LZ4_MISSES - 1 {
            assert!(b.try_now());
            b.tried(false);
        }
        // A hit before the limit: the count starts again.
        assert!(b.try_now());
        b.tried(true);
        for _ in 0..LZ4_MISSES {
            assert!(b.try_now());
            b.tried(false);
        }
        // Now LZ4_REST steps without trying, then it tries again.
        for _ in 0..LZ4_REST {
            assert!(!b.try_now());
        }
        assert!(b.try_now());
    }
}
