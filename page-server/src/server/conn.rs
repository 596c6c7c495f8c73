//! One non-blocking connection of the page server, with its buffers.

use std::io::{self, Write};

use ferry_protocol::{FrameDecoder, FrameHeader, ProtocolError};
use ferry_transport::Conn as Stream;
use nix::sys::socket::{setsockopt, sockopt};

use super::{setup, ServerError};

/// What a read from a connection gave.
pub(super) enum Fill {
    Data,
    Blocked,
    Eof,
}

/// One connection: its socket, input and output buffers.
pub(super) struct Conn {
    pub(super) name: &'static str,
    /// Plain TCP, TLS or a socketpair, non-blocking; registered with the
    /// event loop by its descriptor. Under TLS every byte of `out` is
    /// encrypted on its way (no zero-copy path exists that could bypass it).
    pub(super) stream: Stream,
    pub(super) input: FrameDecoder,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    /// Bytes ever queued in `out`.
    pub(super) queued: u64,
    /// Bytes ever written.
    pub(super) written: u64,
    pub(super) readable: bool,
    pub(super) writable: bool,
    pub(super) eof: bool,
}

impl Conn {
    pub(super) fn new(
        name: &'static str,
        stream: Stream,
        sndbuf: Option<usize>,
        already_read: Vec<u8>,
    ) -> Result<Self, ServerError> {
        stream
            .set_nodelay(true)
            .map_err(setup("setting TCP_NODELAY"))?;
        stream
            .set_nonblocking(true)
            .map_err(setup("setting non-blocking mode"))?;
        if let (Some(size), Some(tcp)) = (sndbuf, stream.tcp()) {
            set_sndbuf(tcp, size).map_err(setup("setting SO_SNDBUF"))?;
        }
        Ok(Self {
            name,
            stream,
            input: FrameDecoder::with_bytes(already_read),
            out: Vec::new(),
            out_pos: 0,
            queued: 0,
            written: 0,
            readable: true,
            writable: true,
            eof: false,
        })
    }

    pub(super) fn err(&self, source: impl Into<ProtocolError>) -> ServerError {
        ServerError::Protocol {
            conn: self.name,
            source: source.into(),
        }
    }

    /// Bytes queued but not yet written (a TLS connection's ciphertext
    /// not yet taken by the socket counts as one).
    pub(super) fn pending(&self) -> usize {
        self.out.len() - self.out_pos + usize::from(self.stream.wants_write())
    }

    /// Notes bytes appended to `out` since `before` (its old length).
    pub(super) fn queued_since(&mut self, before: usize) {
        self.queued += (self.out.len() - before) as u64;
    }

    /// Writes as much of `out` as the socket takes, stopping once about
    /// `max` bytes went (each write is at most `max`); returns the byte
    /// count.
    pub(super) fn flush(&mut self, max: usize) -> Result<u64, ServerError> {
        let before = self.written;
        while self.writable && self.out_pos < self.out.len() && self.written - before < max as u64 {
            let end = self.out.len().min(self.out_pos.saturating_add(max));
            match (&self.stream).write(&self.out[self.out_pos..end]) {
                Ok(0) => return Err(self.err(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => {
                    self.out_pos += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        // TLS: ciphertext the socket did not take yet.
        if self.writable && self.stream.wants_write() {
            match (&self.stream).flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 1 << 20 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(self.written - before)
    }

    /// Queues `head` then `body`, writing them straight from the caller's
    /// buffers when nothing else waits (one `writev`, no copy into `out`);
    /// what the socket does not take is copied into `out`. Returns the
    /// bytes written now.
    pub(super) fn write_through(&mut self, head: &[u8], body: &[u8]) -> Result<u64, ServerError> {
        let mut n = 0;
        if self.writable && self.pending() == 0 {
            let bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
            loop {
                match (&self.stream).write_vectored(&bufs) {
                    Ok(0) => return Err(self.err(io::Error::from(io::ErrorKind::WriteZero))),
                    Ok(w) => n = w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.err(e)),
                }
                break;
            }
        }
        self.written += n as u64;
        let (head_left, body_left) = if n < head.len() {
            (&head[n..], body)
        } else {
            (&[][..], &body[n - head.len()..])
        };
        // Counted as queued in full: the part written counts as written.
        self.queue(head_left, body_left);
        self.queued += n as u64;
        Ok(n as u64)
    }

    /// Appends `head` then `body` to `out` (bytes written later).
    pub(super) fn queue(&mut self, head: &[u8], body: &[u8]) {
        self.out.extend_from_slice(head);
        self.out.extend_from_slice(body);
        self.queued += (head.len() + body.len()) as u64;
    }

    /// Reads once from the socket into `input`.
    pub(super) fn fill(&mut self) -> Result<Fill, ServerError> {
        let got = self.input.read_from(&mut &self.stream);
        let idle = self.input.buffered().is_empty();
        match got {
            Ok(0) if !idle => Err(self.err(ProtocolError::Closed)),
            // A reset is how a peer's close looks when our last answers were
            // still unread in its socket: treat it like EOF, so the grace
            // period for `Complete` on the other connection applies.
            Ok(0) => {
                self.eof = true;
                self.readable = false;
                Ok(Fill::Eof)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && idle => {
                self.eof = true;
                self.readable = false;
                Ok(Fill::Eof)
            }
            Ok(_) => Ok(Fill::Data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(Fill::Blocked)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::Data),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Takes the next whole frame out of `input`, its payload into `payload`.
    /// An `Abort` from the peer is an error.
    pub(super) fn next_frame(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<Option<FrameHeader>, ServerError> {
        match self.input.next_frame() {
            Ok(Some(f)) => {
                payload.clear();
                payload.extend_from_slice(f.payload);
                Ok(Some(f.header))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

pub(super) fn set_sndbuf(stream: &impl std::os::fd::AsFd, size: usize) -> io::Result<()> {
    let size = usize::try_from(i32::MAX).map_or(size, |max| size.min(max));
    setsockopt(stream, sockopt::SndBuf, &size).map_err(io::Error::from)
}
