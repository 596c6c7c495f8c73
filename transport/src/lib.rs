//! Ferry's migration connections: one [`Conn`] type for plain TCP and for
//! mutual TLS (rustls), so the rest of the code base reads and writes
//! frames the same way whatever protects them.
//!
//! - [`Conn`]: `Plain(TcpStream)` or `Tls(Arc<TlsStream>)`. It is `Read`,
//!   `Write` (also through `&Conn`, like `TcpStream`), `AsFd`, cloneable
//!   ([`Conn::try_clone`]) so a reader and a writer (a heartbeat) can use it
//!   from two threads, with read/write timeouts and a non-blocking mode.
//! - [`tls`]: the TLS stream (userspace rustls over a non-blocking socket;
//!   this host's kernel has no kTLS).
//! - [`config`]: [`ClientTls`] and [`ServerTls`] from PEM files, the
//!   destination's allow-list of peer names, and the handshakes.

pub mod certs;
pub mod config;
pub mod tls;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

pub use config::{ClientTls, HandshakeError, ServerTls, TlsError, TlsFiles};
pub use tls::TlsStream;

/// One migration connection: plain TCP, or TLS over TCP.
#[derive(Debug)]
pub enum Conn {
    /// Unauthenticated, unencrypted TCP (loopback, or `--insecure`).
    Plain(TcpStream),
    /// Mutual TLS; clones share the one TLS session.
    Tls(Arc<TlsStream>),
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn::Plain(s)
    }
}

impl Conn {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.tcp(),
        }
    }

    /// Another handle on the same connection (both directions shared).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Plain(s) => Conn::Plain(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    /// True when the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// The peer's end-entity certificate (DER), on a TLS connection.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => t.peer_certificate(),
        }
    }

    /// Read timeout (None: wait for ever), shared by every clone.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_read_timeout(t),
            Conn::Tls(s) => s.set_read_timeout(t),
        }
    }

    /// Write timeout (None: wait for ever), shared by every clone.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_write_timeout(t),
            Conn::Tls(s) => s.set_write_timeout(t),
        }
    }

    /// In non-blocking mode reads and writes return `WouldBlock` instead of
    /// waiting; a TLS connection may then hold encrypted output that a
    /// later [`Write::flush`] (or write) sends ([`Conn::wants_write`]).
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_nonblocking(nb),
            Conn::Tls(s) => {
                s.set_nonblocking(nb);
                Ok(())
            }
        }
    }

    /// `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Closes the socket in `how`, waking any thread blocked on it.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp().shutdown(how)
    }

    /// True when a TLS connection holds encrypted bytes not yet written to
    /// the socket (only in non-blocking mode; a blocking write sends all).
    pub fn wants_write(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(t) => t.wants_write(),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).write_vectored(bufs),
            Conn::Tls(t) => t.write(bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| b)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match *self {
            Conn::Plain(s) => (&*s).flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}
