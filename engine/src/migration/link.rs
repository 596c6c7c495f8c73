//! [`Link`]: one blocking migration connection with its frame decoder, its
//! liveness rules and an optional heartbeat.
//!
//! Every frame read on a control or fault connection outside the page
//! server goes through the link's [`FrameDecoder`], so bytes read past one
//! frame are never lost: they stay in the decoder for the next read, or are
//! handed on with [`Link::into_parts`] to whoever takes the connection over.
//!
//! Liveness: reads and writes time out after the peer timeout, and `Ping`
//! frames (sent by a [`Heartbeat`] when a side would otherwise be quiet) are
//! consumed here, so a peer that vanishes or stops (SIGSTOP) is noticed
//! within the timeout while a slow but live one is not.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_protocol::{write_frame, Frame, FrameDecoder, MsgType, PartialFrame, ProtocolError};
use ferry_transport::Conn;

/// A connection and the frames buffered from it.
#[derive(Debug)]
pub struct Link {
    /// The connection (blocking; TCP, TLS or a socketpair), for reading.
    pub stream: Conn,
    /// What has been read from it and not yet handed out.
    pub rx: FrameDecoder,
    /// The writing half, shared with a heartbeat so frames never interleave.
    writer: Arc<Mutex<Conn>>,
    /// No bytes for this long means the peer is gone.
    peer_timeout: Duration,
}

impl Link {
    /// A link over `stream` with `peer_timeout` as its read and write
    /// timeout; nothing read yet.
    pub fn new(stream: impl Into<Conn>, peer_timeout: Duration) -> Result<Self, ProtocolError> {
        let stream = stream.into();
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(peer_timeout))?;
        stream.set_write_timeout(Some(peer_timeout))?;
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        Ok(Self {
            stream,
            rx: FrameDecoder::new(),
            writer,
            peer_timeout,
        })
    }

    /// Changes the peer timeout (e.g. from the handshake's to the session's).
    pub fn set_peer_timeout(&mut self, t: Duration) -> Result<(), ProtocolError> {
        self.stream.set_read_timeout(Some(t))?;
        self.stream.set_write_timeout(Some(t))?;
        self.peer_timeout = t;
        Ok(())
    }

    /// The peer timeout this link enforces.
    pub fn peer_timeout(&self) -> Duration {
        self.peer_timeout
    }

    /// The peer's certificate (DER) on a TLS link: who is at the other end.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        self.stream.peer_certificate()
    }

    /// Writes one frame and flushes it.
    pub fn send(&self, kind: MsgType, arg: u64, payload: &[u8]) -> Result<(), ProtocolError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, kind, arg, payload)?;
        w.flush()?;
        Ok(())
    }

    /// Blocks until the next frame other than `Ping`. Silence for the peer
    /// timeout is an error ([`is_link_failure`] says yes to it).
    pub fn recv(&mut self) -> Result<Frame<'_>, ProtocolError> {
        loop {
            if self.rx.recv(&mut self.stream)?.header.kind != MsgType::Ping {
                break;
            }
        }
        // The frame is still the decoder's last: hand it out again without
        // a second parse of the stream.
        self.rx.last_frame().ok_or(ProtocolError::Closed)
    }

    /// The next frame, whatever its type (a `Ping` too), read whole by
    /// `deadline`: before every read the read timeout is set to the time
    /// left, so a peer that trickles its bytes (each read well within any
    /// per-read timeout) cannot stretch the wait past it. A passed deadline
    /// is an I/O error of kind `TimedOut`. The link's peer timeout applies
    /// again afterwards.
    pub fn recv_by(&mut self, deadline: Instant) -> Result<Frame<'_>, ProtocolError> {
        let got = loop {
            match self.rx.next_frame() {
                Ok(Some(_)) => break Ok(()),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ProtocolError::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "no whole frame by the deadline",
                )));
            }
            if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                break Err(e.into());
            }
            match self.rx.read_from(&mut self.stream) {
                Ok(0) => break Err(ProtocolError::Closed),
                Ok(_) => {}
                // The deadline is looked at again before the next read.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                    ) => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.stream.set_read_timeout(Some(self.peer_timeout))?;
        got?;
        // The frame is still the decoder's last.
        self.rx.last_frame().ok_or(ProtocolError::Closed)
    }

    /// Like [`Link::recv`], but a frame of which only the header and the
    /// first `head` payload bytes are here comes back at once as
    /// [`Received::Partial`] when `take` accepts it: the caller then takes
    /// its buffered part, calls `self.rx.skip_partial()` and reads its
    /// `rest` from `self.stream` itself.
    pub fn recv_or_partial(
        &mut self,
        head: usize,
        take: impl Fn(&PartialFrame<'_>) -> bool,
    ) -> Result<Received<'_>, ProtocolError> {
        loop {
            if self.rx.recv_or_partial(&mut self.stream, head, &take)? {
                let p = self.rx.partial_frame(head).ok_or(ProtocolError::Closed)?;
                return Ok(Received::Partial(p));
            }
            let kind = self
                .rx
                .next_frame()?
                .ok_or(ProtocolError::Closed)?
                .header
                .kind;
            if kind != MsgType::Ping {
                break;
            }
        }
        Ok(Received::Frame(
            self.rx.last_frame().ok_or(ProtocolError::Closed)?,
        ))
    }

    /// Like [`Link::recv`], but returns `None` after `wait` without a frame
    /// (the peer timeout still applies to the silence as a whole, counted
    /// from `last_heard`, which is updated whenever any frame arrives).
    pub fn poll(
        &mut self,
        wait: Duration,
        last_heard: &mut Instant,
    ) -> Result<Option<Frame<'_>>, ProtocolError> {
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let got = loop {
            match self.rx.recv(&mut self.stream) {
                Ok(f) if f.header.kind == MsgType::Ping => *last_heard = Instant::now(),
                Ok(_) => break Ok(true),
                Err(ProtocolError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    break Ok(false)
                }
                Err(e) => break Err(e),
            }
        };
        self.stream.set_read_timeout(Some(self.peer_timeout))?;
        if got? {
            *last_heard = Instant::now();
            return Ok(self.rx.last_frame());
        }
        if last_heard.elapsed() > self.peer_timeout {
            return Err(ProtocolError::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("peer silent for {:?}", self.peer_timeout),
            )));
        }
        Ok(None)
    }

    /// Blocks until the next frame, which must be of type `kind`; returns
    /// its payload.
    pub fn expect(
        &mut self,
        kind: MsgType,
        expected: &'static str,
    ) -> Result<&[u8], ProtocolError> {
        let f = self.recv()?;
        if f.header.kind != kind {
            return Err(ProtocolError::Unexpected {
                got: f.header.kind,
                expected,
            });
        }
        Ok(f.payload)
    }

    /// Sends `Ping` every `interval` while the returned guard lives.
    pub fn heartbeat(&self, interval: Duration) -> Heartbeat {
        Heartbeat::start(self.writer.clone(), interval)
    }

    /// Closes both directions, so a thread blocked reading this connection
    /// (or the peer) sees the end at once.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The socket and the bytes read from it but not yet decoded.
    pub fn into_parts(self) -> (Conn, Vec<u8>) {
        (self.stream, self.rx.into_buffered())
    }
}

/// What [`Link::recv_or_partial`] received.
#[derive(Debug)]
pub enum Received<'a> {
    /// A whole frame.
    Frame(Frame<'a>),
    /// The head of a frame whose rest is still in the stream.
    Partial(PartialFrame<'a>),
}

/// True when `e` means the connection is gone (closed, reset, timed out or
/// silent), as opposed to a peer that said something wrong.
pub fn is_link_failure(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(_) | ProtocolError::Closed)
}

/// A thread that writes `Ping` on a connection at a fixed interval.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    fn start(writer: Arc<Mutex<Conn>>, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let step = Duration::from_millis(20).min(interval);
                let mut last = Instant::now();
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(step);
                    if last.elapsed() < interval {
                        continue;
                    }
                    last = Instant::now();
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if write_frame(&mut *w, MsgType::Ping, 0, &[])
                        .and_then(|()| w.flush().map_err(Into::into))
                        .is_err()
                    {
                        // The reader of this link will notice too.
                        return;
                    }
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
