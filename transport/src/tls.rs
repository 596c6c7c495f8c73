//! [`TlsStream`]: a rustls session over a non-blocking TCP socket, usable
//! from two threads at once (a reader and a writer) and from event loops.
//!
//! The socket itself is always non-blocking. The session sits behind a
//! mutex that is only ever held for non-blocking work (decrypting what the
//! kernel has, encrypting a write, handing ciphertext to the kernel); a
//! call that must wait drops the lock and sleeps in `poll` on the socket,
//! honouring the read or write timeout. So a link's reader can block for
//! the next frame while its heartbeat thread writes `Ping`s.
//!
//! In blocking mode a read returns buffered plaintext first, else reads
//! and decrypts more; a write encrypts and sends everything before it
//! returns. In non-blocking mode both return `WouldBlock` exactly when the
//! socket did (the edge-triggered contract of `mio`): a read drains the
//! socket until then, and a write may leave ciphertext queued in the
//! session ([`TlsStream::wants_write`]) for a later flush.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::Connection;

/// Ciphertext a session may queue before a write waits for the socket.
pub(crate) const BUFFER_LIMIT: usize = 256 << 10;
/// Ciphertext read from the socket per `read` (rustls itself would read at
/// most 4 KiB at a time: a system call per quarter record).
const READ_CHUNK: usize = 256 << 10;

/// The session and the ciphertext read from the socket but not yet handed
/// to it.
#[derive(Debug)]
struct State {
    tls: Connection,
    cin: Vec<u8>,
    cin_start: usize,
    cin_end: usize,
    /// The socket reached its end (no more ciphertext will come).
    eof: bool,
    /// The peer closed the session (close_notify).
    closed: bool,
}

/// A TLS session over TCP, past its handshake.
#[derive(Debug)]
pub struct TlsStream {
    sock: TcpStream,
    state: Mutex<State>,
    nonblocking: AtomicBool,
    /// Timeouts in nanoseconds; 0 is none.
    read_timeout: AtomicU64,
    write_timeout: AtomicU64,
    peer_cert: Option<Vec<u8>>,
}

impl TlsStream {
    /// Wraps an established session (`sock` is made non-blocking).
    pub(crate) fn new(sock: TcpStream, mut tls: Connection) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        tls.set_buffer_limit(Some(BUFFER_LIMIT));
        let peer_cert = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        Ok(Self {
            sock,
            state: Mutex::new(State {
                tls,
                cin: vec![0; READ_CHUNK],
                cin_start: 0,
                cin_end: 0,
                eof: false,
                closed: false,
            }),
            nonblocking: AtomicBool::new(false),
            read_timeout: AtomicU64::new(0),
            write_timeout: AtomicU64::new(0),
            peer_cert,
        })
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    /// The peer's end-entity certificate (DER).
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        self.peer_cert.as_deref()
    }

    /// See [`crate::Conn::set_read_timeout`].
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.read_timeout.store(nanos(t)?, Ordering::Release);
        Ok(())
    }

    /// See [`crate::Conn::set_write_timeout`].
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.write_timeout.store(nanos(t)?, Ordering::Release);
        Ok(())
    }

    /// See [`crate::Conn::set_nonblocking`].
    pub fn set_nonblocking(&self, nb: bool) {
        self.nonblocking.store(nb, Ordering::Release);
    }

    /// Ciphertext is queued that the socket has not taken yet.
    pub fn wants_write(&self) -> bool {
        self.lock().tls.wants_write()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Acquire)
    }

    fn deadline(t: &AtomicU64) -> Option<Instant> {
        match t.load(Ordering::Acquire) {
            0 => None,
            n => Some(Instant::now() + Duration::from_nanos(n)),
        }
    }

    /// Hands queued ciphertext to the socket until it is all out or the
    /// socket is full; true when all is out.
    fn send_queued(&self, tls: &mut Connection) -> io::Result<bool> {
        while tls.wants_write() {
            match tls.write_tls(&mut &self.sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads plaintext.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = Self::deadline(&self.read_timeout);
        loop {
            let mut st = self.lock();
            let n = self.decrypt_buffered(&mut st, buf)?;
            // The socket ended without close_notify. Ferry's frames carry
            // their own lengths, so a cut inside a frame is still an error
            // to the frame decoder; at a frame boundary this is the end,
            // as on plain TCP.
            if n > 0 || st.closed || st.eof {
                return Ok(n);
            }
            // Everything buffered is consumed: read more ciphertext.
            let got = {
                let st = &mut *st;
                st.cin_start = 0;
                st.cin_end = 0;
                (&self.sock).read(&mut st.cin)
            };
            match got {
                Ok(0) => st.eof = true,
                Ok(n) => st.cin_end = n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Never wait holding the session: a writer needs it.
                    drop(st);
                    if self.is_nonblocking() {
                        return Err(e);
                    }
                    wait(&self.sock, PollFlags::POLLIN, deadline)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `buf` with plaintext from what is already here: decrypted
    /// records first, then the ciphertext read but not yet decrypted. No
    /// system call but the answers the session may owe (alerts).
    fn decrypt_buffered(&self, st: &mut State, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        loop {
            match st.tls.reader().read(&mut buf[filled..]) {
                Ok(0) => {
                    st.closed = true;
                    return Ok(filled);
                }
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        return Ok(filled);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if filled > 0 => {
                    tracing::debug!("TLS read after {filled} bytes: {e}");
                    return Ok(filled);
                }
                Err(e) => return Err(e),
            }
            if st.cin_start == st.cin_end {
                return Ok(filled);
            }
            let fed = st.tls.read_tls(&mut &st.cin[st.cin_start..st.cin_end])?;
            if fed == 0 {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "TLS record buffer full",
                ));
            }
            st.cin_start += fed;
            if let Err(e) = st.tls.process_new_packets() {
                // Tell the peer (best effort): the alert is queued.
                let _ = self.send_queued(&mut st.tls);
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
            // Key updates and alerts the session wants to answer.
            if st.tls.wants_write() {
                self.send_queued(&mut st.tls)?;
            }
        }
    }

    /// Encrypts and sends plaintext; returns how much was taken.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = Self::deadline(&self.write_timeout);
        loop {
            let mut st = self.lock();
            let tls = &mut st.tls;
            self.send_queued(tls)?;
            let n = tls.writer().write(buf)?;
            if n > 0 {
                let all_out = self.send_queued(tls)?;
                drop(st);
                if !all_out && !self.is_nonblocking() {
                    self.flush_until(deadline)?;
                }
                return Ok(n);
            }
            // The session's queue is full and the socket takes nothing.
            drop(st);
            if self.is_nonblocking() {
                return Err(ErrorKind::WouldBlock.into());
            }
            wait(&self.sock, PollFlags::POLLOUT, deadline)?;
        }
    }

    /// Sends every queued byte (non-blocking mode: as much as the socket
    /// takes, then `WouldBlock`).
    pub fn flush(&self) -> io::Result<()> {
        self.flush_until(Self::deadline(&self.write_timeout))
    }

    fn flush_until(&self, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            if self.send_queued(&mut self.lock().tls)? {
                return Ok(());
            }
            if self.is_nonblocking() {
                return Err(ErrorKind::WouldBlock.into());
            }
            wait(&self.sock, PollFlags::POLLOUT, deadline)?;
        }
    }
}

fn nanos(t: Option<Duration>) -> io::Result<u64> {
    match t {
        None => Ok(0),
        Some(d) if d.is_zero() => Err(io::Error::new(
            ErrorKind::InvalidInput,
            "a zero timeout is not a timeout",
        )),
        Some(d) => Ok(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    }
}

/// Sleeps until `sock` is ready for `flags` or `deadline` passes; a passed
/// deadline is `WouldBlock`, as a timed-out `TcpStream` read reports it.
pub(crate) fn wait(
    sock: &TcpStream,
    flags: PollFlags,
    deadline: Option<Instant>,
) -> io::Result<()> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        ErrorKind::WouldBlock,
                        "timed out waiting for the peer",
                    ));
                }
                // Rounded up, so a sub-millisecond rest still sleeps.
                let ms = left.as_millis().saturating_add(1).min(60_000) as u16;
                PollTimeout::from(ms)
            }
        };
        let mut fds = [PollFd::new(sock.as_fd(), flags)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
