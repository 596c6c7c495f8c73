//! One non-blocking connection of the page server, with its buffers.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use mio::net::TcpStream;

use super::{setup, ServerError, READ_CHUNK};
use crate::protocol::{FrameHeader, MsgType, ProtocolError, HEADER_LEN};

/// What a read from a connection gave.
pub(super) enum Fill {
    Data,
    Blocked,
    Eof,
}

/// One connection: its socket, input and output buffers.
pub(super) struct Conn {
    pub(super) name: &'static str,
    pub(super) stream: TcpStream,
    pub(super) input: Vec<u8>,
    pub(super) in_start: usize,
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
        stream: std::net::TcpStream,
        sndbuf: Option<usize>,
    ) -> Result<Self, ServerError> {
        stream
            .set_nodelay(true)
            .map_err(setup("setting TCP_NODELAY"))?;
        stream
            .set_nonblocking(true)
            .map_err(setup("setting non-blocking mode"))?;
        if let Some(size) = sndbuf {
            set_sndbuf(&stream, size).map_err(setup("setting SO_SNDBUF"))?;
        }
        Ok(Self {
            name,
            stream: TcpStream::from_std(stream),
            input: Vec::new(),
            in_start: 0,
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

    /// Bytes queued but not yet written.
    pub(super) fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Notes bytes appended to `out` since `before` (its old length).
    pub(super) fn queued_since(&mut self, before: usize) {
        self.queued += (self.out.len() - before) as u64;
    }

    /// Writes as much of `out` as the socket takes; returns the byte count.
    pub(super) fn flush(&mut self) -> Result<u64, ServerError> {
        let before = self.written;
        while self.writable && self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
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
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 1 << 20 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(self.written - before)
    }

    /// Reads once from the socket into `input`.
    pub(super) fn fill(&mut self) -> Result<Fill, ServerError> {
        if self.in_start == self.input.len() {
            self.input.clear();
            self.in_start = 0;
        } else if self.in_start > READ_CHUNK {
            self.input.drain(..self.in_start);
            self.in_start = 0;
        }
        let old = self.input.len();
        self.input.resize(old + READ_CHUNK, 0);
        let got = self.stream.read(&mut self.input[old..]);
        self.input.truncate(old + *got.as_ref().unwrap_or(&0));
        match got {
            Ok(0) if self.in_start < self.input.len() => Err(self.err(ProtocolError::Closed)),
            // A reset is how a peer's close looks when our last answers were
            // still unread in its socket: treat it like EOF, so the grace
            // period for `Complete` on the other connection applies.
            Ok(0) => {
                self.eof = true;
                self.readable = false;
                Ok(Fill::Eof)
            }
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionReset
                    && self.in_start == self.input.len() =>
            {
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
        let avail = &self.input[self.in_start..];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let hdr = FrameHeader::decode(head).map_err(|e| self.err(e))?;
        let end = HEADER_LEN + hdr.len as usize;
        let Some(body) = avail.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        payload.clear();
        payload.extend_from_slice(body);
        self.in_start += end;
        if hdr.kind == MsgType::Abort {
            let why = String::from_utf8_lossy(payload).into_owned();
            return Err(self.err(ProtocolError::Aborted(why)));
        }
        Ok(Some(hdr))
    }
}

pub(super) fn set_sndbuf(stream: &std::net::TcpStream, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket owned by `stream`, reading a c_int that
    // lives for the call, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
