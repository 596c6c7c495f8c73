//! [`Acceptor`]: the destination's listener, hardened against strangers.
//!
//! Every accepted connection gets its TLS handshake (when the listener has
//! TLS settings) and then its `Hello` read on a handshake thread of its
//! own, both within one deadline ([`HELLO_TIMEOUT`]) for the whole
//! exchange, not per read, so a peer that connects and sends nothing (or
//! trickles its bytes) holds up nobody for longer: the next connection is
//! accepted at once. At most [`MAX_HANDSHAKES`] handshakes run at a time;
//! while that many run, new connections wait in the kernel's backlog until
//! a slot frees. A connection whose first frame is not a valid `Hello` (a
//! `Ping` included: a source sends its `Hello` first), or that has not
//! sent all of it by the deadline, is answered with `Abort` naming the
//! problem and closed. A peer
//! that fails the TLS handshake (no TLS at all, a certificate the CA did
//! not sign, a name not allowed) gets nothing from Ferry, not even an
//! `Abort`: the refusal is logged with its reason and the connection
//! closed, before any `Hello` is read. Only parsed `Hello`s, from
//! authenticated peers when TLS is on, reach the caller, which decides
//! whether they belong to the session it waits for.
//!
//! The caller waits in `poll` on the listener and on an eventfd that each
//! handshake thread writes when it is done, so a new connection and a
//! finished `Hello` are both taken at once, not at the next tick of a
//! timer (a 2 ms sleep between looks cost a move 1-2 ms per connection).
//!
//! An in-process session (lazy restore) has no listener: its connections
//! are the ends of socketpairs, handed in with [`Acceptor::given`] and
//! handshaken one per call, as if accepted (no TLS: nothing leaves the
//! process).

use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{abort_reason, Hello, MsgType, ProtocolError};
use ferry_transport::{Conn, ServerTls};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::link::Link;

/// Handshakes in flight at most; more connections wait in the backlog.
pub const MAX_HANDSHAKES: usize = 64;
/// How long a connection may take to send its `Hello` (a source sends it
/// as soon as it is connected).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait in `poll` between looks at the deadline (a connection or a
/// finished handshake wakes the wait at once; this only bounds a missed
/// wake-up).
const POLL_MAX_MS: u16 = 100;

/// A listener whose connections are handshaken concurrently.
#[derive(Clone)]
pub struct Acceptor {
    inner: Arc<Inner>,
}

struct Inner {
    incoming: Incoming,
    done_tx: Mutex<Sender<(Link, Hello)>>,
    done_rx: Mutex<Receiver<(Link, Hello)>>,
    in_flight: Arc<AtomicUsize>,
    /// Written by a handshake thread when it is done (whatever came of it).
    done_wake: Arc<EventFd>,
    peer_timeout: Duration,
    tls: Option<ServerTls>,
}

impl Acceptor {
    /// Accepts on (a duplicate of) `listener`; sessions then use
    /// `peer_timeout` on the links it hands out. With `tls`, every
    /// connection must complete a mutual TLS handshake first.
    pub fn new(
        listener: &TcpListener,
        peer_timeout: Duration,
        tls: Option<ServerTls>,
    ) -> Result<Self, ProtocolError> {
        let listener = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        Self::with(Incoming::Listener(listener), peer_timeout, tls)
    }

    /// Hands out `streams` (already connected, e.g. socketpair ends) as
    /// if accepted, one per [`Acceptor::next_hello`] call that finds no
    /// finished handshake.
    pub fn given(streams: Vec<Conn>, peer_timeout: Duration) -> Result<Self, ProtocolError> {
        Self::with(
            Incoming::Given(Mutex::new(streams.into())),
            peer_timeout,
            None,
        )
    }

    fn with(
        incoming: Incoming,
        peer_timeout: Duration,
        tls: Option<ServerTls>,
    ) -> Result<Self, ProtocolError> {
        let (tx, rx) = channel();
        Ok(Self {
            inner: Arc::new(Inner {
                incoming,
                done_tx: Mutex::new(tx),
                done_rx: Mutex::new(rx),
                in_flight: Arc::new(AtomicUsize::new(0)),
                done_wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
                peer_timeout,
                tls,
            }),
        })
    }

    /// The next connection that sent a valid `Hello`, waiting until
    /// `deadline` (for ever when `None`).
    pub fn next_hello(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Link, Hello)>, ProtocolError> {
        let rx = self.inner.done_rx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Ok(done) = rx.try_recv() {
                return Ok(Some(done));
            }
            let full =
                self.inner.in_flight.load(Ordering::Acquire) >= self.inner.incoming.max_in_flight();
            let accepted = if full {
                Err(std::io::ErrorKind::WouldBlock.into())
            } else {
                self.inner.incoming.accept()
            };
            match accepted {
                Ok(conn) => self.start(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now > d) {
                        return Ok(None);
                    }
                    if let Ok(done) = rx.try_recv() {
                        return Ok(Some(done));
                    }
                    let left = deadline.map_or(Duration::MAX, |d| d - now);
                    self.wait(full, left);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors and the like: back off, keep listening.
                Err(e) => {
                    warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Sleeps until a connection may be waiting (unless `full`, when only
    /// a finished handshake can change anything), a handshake thread is
    /// done, or `left` (at most [`POLL_MAX_MS`]) passes.
    fn wait(&self, full: bool, left: Duration) {
        let wake = &self.inner.done_wake;
        // SAFETY: the eventfd lives in `self.inner`, which outlives this
        // call, so its descriptor stays open while `fds` lives.
        let wake_fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
        let mut fds = vec![PollFd::new(wake_fd, PollFlags::POLLIN)];
        if let (Incoming::Listener(l), false) = (&self.inner.incoming, full) {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(left.as_millis().saturating_add(1))
            .unwrap_or(u16::MAX)
            .min(POLL_MAX_MS);
        // EINTR or a spurious wake-up only ends the nap early.
        let _ = poll(&mut fds, PollTimeout::from(ms));
        // Consume the wake-ups; the channel holds what they announced.
        let _ = wake.read();
    }

    /// Reads `conn`'s `Hello` on a thread of its own, if a slot is free.
    fn start(&self, conn: Conn) {
        let peer = conn.peer();
        let in_flight = self.inner.in_flight.clone();
        in_flight.fetch_add(1, Ordering::AcqRel);
        let tx = self
            .inner
            .done_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let peer_timeout = self.inner.peer_timeout;
        let tls = self.inner.tls.clone();
        let wake = self.inner.done_wake.clone();
        let spawned = std::thread::Builder::new()
            .name("handshake".into())
            .spawn(move || {
                if let Some(done) = handshake(conn, peer_timeout, tls.as_ref()) {
                    let _ = tx.send(done);
                }
                in_flight.fetch_sub(1, Ordering::AcqRel);
                let _ = wake.write(1);
            });
        if spawned.is_err() {
            self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, "refused a connection: no thread for its handshake");
        }
    }
}

/// Where connections come from.
enum Incoming {
    /// A TCP listener (non-blocking).
    Listener(TcpListener),
    /// Connected streams not yet handed out.
    Given(Mutex<VecDeque<Conn>>),
}

impl Incoming {
    /// Handshakes that may run at once. Given streams are taken one at a
    /// time, when the caller asks for the next `Hello`: the next one (the
    /// fault connection) sends its `Hello` only after the previous one was
    /// answered, so its handshake deadline must not start earlier.
    fn max_in_flight(&self) -> usize {
        match self {
            Incoming::Listener(_) => MAX_HANDSHAKES,
            Incoming::Given(_) => 1,
        }
    }

    /// The next connection; `WouldBlock` when there is none now.
    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Incoming::Listener(l) => l.accept().map(|(s, _)| Conn::Plain(s)),
            Incoming::Given(q) => q
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
                .ok_or_else(|| std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Runs the TLS handshake (with `tls`, on TCP) and reads one `Hello`, all
/// within [`HELLO_TIMEOUT`] (or `peer_timeout` when shorter) in all: the
/// time a peer may take to send its first frame is counted across reads,
/// so sending it a byte at a time does not stretch it. A failed TLS
/// handshake is logged and closed; any other first frame (a `Ping` too),
/// a `Hello` that does not decode, or none in time is answered with
/// `Abort` naming the problem and logged.
fn handshake(conn: Conn, peer_timeout: Duration, tls: Option<&ServerTls>) -> Option<(Link, Hello)> {
    let peer = conn.peer();
    let limit = HELLO_TIMEOUT.min(peer_timeout);
    let deadline = Instant::now() + limit;
    let conn = match (tls, conn) {
        (Some(tls), Conn::Plain(tcp)) => match tls.accept(tcp, deadline) {
            Ok(c) => {
                debug!(%peer, "TLS peer authenticated");
                c
            }
            Err(e) => {
                warn!(%peer, "refused a connection before its Hello: {e}");
                return None;
            }
        },
        (_, conn) => {
            if conn.set_nonblocking(false).is_err() {
                return None;
            }
            conn
        }
    };
    // What is left of the deadline is the Hello's.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut link = match Link::new(conn, left) {
        Ok(l) => l,
        Err(e) => {
            warn!(%peer, "refused a connection: {e}");
            return None;
        }
    };
    let hello = match link.recv_by(deadline) {
        Ok(f) if f.header.kind == MsgType::Hello => Hello::decode(f.payload),
        // A source sends its Hello first; nothing else (not even a Ping)
        // may keep a handshake slot.
        Ok(f) => Err(ProtocolError::Unexpected {
            got: f.header.kind,
            expected: "Hello as the connection's first frame",
        }),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Err(ProtocolError::Handshake(format!(
                "the peer was too slow to send its Hello (not all here within {limit:?})"
            )))
        }
        Err(e) => Err(e),
    };
    match hello {
        Ok(h) if link.set_peer_timeout(peer_timeout).is_ok() => Some((link, h)),
        Ok(_) => None,
        Err(e) => {
            warn!(%peer, "refused a connection: {e}");
            let _ = link.send(MsgType::Abort, 0, abort_reason(&e.to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    use ferry_protocol::{write_frame, Role, PAGE_SIZE, PROTOCOL_VERSION};

    fn hello(session_id: u64) -> Vec<u8> {
        let h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Control,
            session_id,
            features: 0,
            mem_size: 1 << 20,
            vcpus: 1,
            page_size: PAGE_SIZE as u32,
            options: Vec::new(),
        };
        let mut frame = Vec::new();
        write_frame(&mut frame, MsgType::Hello, 0, &h.encode()).unwrap();
        frame
    }

    #[test]
    fn a_hello_is_handed_over_while_a_silent_peer_holds_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(&listener, Duration::from_secs(5), None).unwrap();
        // A stranger connects and says nothing; the source connects later.
        let _silent = TcpStream::connect(addr).unwrap();
        let source = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&hello(7)).unwrap();
            s
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (_, got) = acceptor
            .next_hello(Some(deadline))
            .unwrap()
            .expect("the source's Hello");
        assert_eq!(got.session_id, 7);
        drop(source.join().unwrap());
    }

    /// How a [`slow_peer`] holds its connection.
    #[derive(Clone, Copy)]
    enum Slow {
        /// Sends a `Hello` one byte at a time.
        Trickle,
        /// Sends `Ping`s and no `Hello`.
        Ping,
    }

    /// A peer that connects to `addr` and sends a little every `every` ms
    /// (each send well within any per-read timeout) for `for_ms` ms, or
    /// until the listener answers; returns the listener's answer (the
    /// error `read_frame` makes of it) and how long after connecting it
    /// came, if it came.
    fn slow_peer(
        addr: std::net::SocketAddr,
        how: Slow,
        every: u64,
        for_ms: u64,
    ) -> std::thread::JoinHandle<Option<(String, Duration)>> {
        use std::io::Read;
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let start = Instant::now();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(every)))
                .unwrap();
            let mut ping = Vec::new();
            write_frame(&mut ping, MsgType::Ping, 0, &[]).unwrap();
            let hello = hello(99);
            let mut got = Vec::new();
            let mut answered = None;
            let mut sent = 0;
            let mut buf = [0; 4096];
            while start.elapsed() < Duration::from_millis(for_ms) {
                if answered.is_none() {
                    let chunk = match how {
                        Slow::Trickle => &hello[sent.min(hello.len() - 1)..][..1],
                        Slow::Ping => &ping[..],
                    };
                    if s.write_all(chunk).is_err() {
                        break;
                    }
                    sent += 1;
                }
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        answered.get_or_insert(start.elapsed());
                        got.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            let why = ferry_protocol::read_frame(&mut &got[..], &mut Vec::new())
                .err()?
                .to_string();
            Some((why, answered?))
        })
    }

    /// A peer that trickles its `Hello` a byte at a time, each byte well
    /// within the per-read timeout, and one that sends `Ping`s instead of
    /// a `Hello`, are both cut off (with an `Abort` saying why) within the
    /// handshake deadline, which counts the whole first frame; their
    /// `Hello`s are never handed over.
    #[test]
    fn a_trickled_hello_and_pings_before_it_are_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The handshake deadline is the shorter of 2 s and the peer timeout.
        let acceptor = Acceptor::new(&listener, Duration::from_millis(400), None).unwrap();
        // 64 bytes of Hello at one per 50 ms: all of it after 3.2 s.
        let trickler = slow_peer(addr, Slow::Trickle, 50, 5_000);
        let pinger = slow_peer(addr, Slow::Ping, 100, 5_000);
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = acceptor.next_hello(Some(deadline)).unwrap();
        assert!(
            got.is_none(),
            "a Hello trickled over {:?} was handed over",
            Duration::from_millis(50 * hello(99).len() as u64)
        );
        for (peer, why) in [
            (trickler, "the peer was too slow to send its Hello"),
            (pinger, "unexpected Ping frame, expected Hello"),
        ] {
            let (got, after) = peer.join().unwrap().expect("an Abort");
            assert!(got.contains(why), "{got}");
            assert!(
                after < Duration::from_millis(1500),
                "cut off after {after:?}"
            );
        }
    }

    /// [`MAX_HANDSHAKES`] slow peers (trickling a `Hello`, or sending
    /// `Ping`s) hold every handshake slot; a real source that connects
    /// after them still has its `Hello` taken within the deadline.
    #[test]
    fn slow_peers_in_every_slot_hold_up_a_real_hello_only_until_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(&listener, Duration::from_millis(400), None).unwrap();
        let slow: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| {
                let how = if i % 2 == 0 {
                    Slow::Trickle
                } else {
                    Slow::Ping
                };
                slow_peer(addr, how, 100, 8_000)
            })
            .collect();
        // Let the listener take them all first.
        let taken = Instant::now() + Duration::from_millis(200);
        assert!(acceptor.next_hello(Some(taken)).unwrap().is_none());
        let connected = Instant::now();
        let mut source = TcpStream::connect(addr).unwrap();
        source.write_all(&hello(7)).unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(8));
        let (_, got) = acceptor
            .next_hello(deadline)
            .unwrap()
            .expect("the source's Hello");
        let waited = connected.elapsed();
        assert_eq!(got.session_id, 7);
        assert!(
            waited < Duration::from_secs(2),
            "the source waited {waited:?}"
        );
        for peer in slow {
            let (why, _) = peer.join().unwrap().expect("an Abort");
            assert!(why.contains("Hello"), "{why}");
        }
    }

    #[test]
    fn no_connection_means_none_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let acceptor = Acceptor::new(&listener, Duration::from_secs(5), None).unwrap();
        let deadline = Instant::now() + Duration::from_millis(150);
        assert!(acceptor.next_hello(Some(deadline)).unwrap().is_none());
        assert!(Instant::now() >= deadline, "returned before its deadline");
    }

    #[test]
    fn given_streams_are_handshaken_one_after_the_other() {
        let (a, mut a_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (b, mut b_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let acceptor =
            Acceptor::given(vec![Conn::Local(a), Conn::Local(b)], Duration::from_secs(5)).unwrap();
        a_peer.write_all(&hello(1)).unwrap();
        b_peer.write_all(&hello(2)).unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let first = acceptor.next_hello(deadline).unwrap().expect("first");
        let second = acceptor.next_hello(deadline).unwrap().expect("second");
        assert_eq!((first.1.session_id, second.1.session_id), (1, 2));
    }
}
