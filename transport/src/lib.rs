//! Ferry's migration connections: one [`Conn`] type for plain TCP and for
//! mutual TLS (rustls), so the rest of the code base reads and writes
//! frames the same way whatever protects them.
//!
//! - [`Conn`]: `Plain(TcpStream)`, `Tls(Arc<TlsStream>)`, or `Local`, one
//!   end of a socketpair (a lazy restore: a migration inside one process,
//!   with no port that another local process could race for). It is `Read`,
//!   `Write` (also through `&Conn`, like `TcpStream`), `AsFd`, cloneable
//!   ([`Conn::try_clone`]) so a reader and a writer (a heartbeat) can use it
//!   from two threads, with read/write timeouts and a non-blocking mode.
//! - [`tls`]: the TLS stream (userspace rustls over a non-blocking socket;
//!   this host's kernel has no kTLS).
//! - [`config`]: [`ClientTls`] and [`ServerTls`] from PEM files, the
//!   destination's allow-list of peer names, and the handshakes.

pub mod certs;
pub mod config;
pub mod congestion;
pub mod tls;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
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
    /// One end of a `socketpair(AF_UNIX, SOCK_STREAM)`, in-process.
    Local(UnixStream),
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Conn::Local(s)
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn::Plain(s)
    }
}

impl Conn {
    /// Two connected ends of a new socketpair.
    pub fn pair() -> io::Result<(Conn, Conn)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Conn::Local(a), Conn::Local(b)))
    }

    /// The TCP socket underneath (none for a socketpair).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Conn::Plain(s) => Some(s),
            Conn::Tls(t) => Some(t.tcp()),
            Conn::Local(_) => None,
        }
    }

    /// Who is at the other end, for logs: the peer's address, or
    /// `socketpair`.
    pub fn peer(&self) -> String {
        match self.peer_addr() {
            Ok(a) => a.to_string(),
            Err(_) if matches!(self, Conn::Local(_)) => "socketpair".into(),
            Err(e) => format!("unknown peer ({e})"),
        }
    }

    /// The peer's IP address, over TCP.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        self.peer_addr().ok().map(|a| a.ip())
    }

    /// Another handle on the same connection (both directions shared).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Plain(s) => Conn::Plain(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
            Conn::Local(s) => Conn::Local(s.try_clone()?),
        })
    }

    /// The socket whose bytes are the stream's own (plain TCP or a
    /// socketpair), for a reader that moves them straight into their
    /// destination; `None` under TLS, where the socket carries ciphertext.
    pub fn plain_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Conn::Plain(s) => Some(s.as_fd()),
            Conn::Local(s) => Some(s.as_fd()),
            Conn::Tls(_) => None,
        }
    }

    /// True when the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// The peer's end-entity certificate (DER), on a TLS connection.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Conn::Plain(_) | Conn::Local(_) => None,
            Conn::Tls(t) => t.peer_certificate(),
        }
    }

    /// Read timeout (None: wait for ever), shared by every clone.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_read_timeout(t),
            Conn::Tls(s) => s.set_read_timeout(t),
            Conn::Local(s) => s.set_read_timeout(t),
        }
    }

    /// Write timeout (None: wait for ever), shared by every clone.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_write_timeout(t),
            Conn::Tls(s) => s.set_write_timeout(t),
            Conn::Local(s) => s.set_write_timeout(t),
        }
    }

    /// In non-blocking mode reads and writes return `WouldBlock` instead of
    /// waiting; a TLS connection may then hold encrypted output that a
    /// later [`Write::flush`] (or write) sends ([`Conn::wants_write`]).
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_nonblocking(nb),
            Conn::Local(s) => s.set_nonblocking(nb),
            Conn::Tls(s) => {
                s.set_nonblocking(nb);
                Ok(())
            }
        }
    }

    /// `TCP_NODELAY` (a socketpair has no Nagle to turn off).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().map_or(Ok(()), |t| t.set_nodelay(on))
    }

    /// The peer's address (an error for a socketpair).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self.tcp() {
            Some(t) => t.peer_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a socketpair has no peer address",
            )),
        }
    }

    /// Closes the socket in `how`, waking any thread blocked on it.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Local(s) => s.shutdown(how),
            _ => self.tcp().map_or(Ok(()), |t| t.shutdown(how)),
        }
    }

    /// True when a TLS connection holds encrypted bytes not yet written to
    /// the socket (only in non-blocking mode; a blocking write sends all).
    pub fn wants_write(&self) -> bool {
        match self {
            Conn::Plain(_) | Conn::Local(_) => false,
            Conn::Tls(t) => t.wants_write(),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).read(buf),
            Conn::Local(s) => (&*s).read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).write(buf),
            Conn::Local(s) => (&*s).write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Conn::Plain(s) => (&*s).write_vectored(bufs),
            Conn::Local(s) => (&*s).write_vectored(bufs),
            Conn::Tls(t) => t.write(bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| b)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match *self {
            Conn::Plain(s) => (&*s).flush(),
            Conn::Local(s) => (&*s).flush(),
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
        match self {
            Conn::Plain(s) => s.as_fd(),
            Conn::Tls(t) => t.tcp().as_fd(),
            Conn::Local(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_carries_bytes_both_ways() {
        let (mut a, mut b) = Conn::pair().unwrap();
        a.set_nodelay(true).unwrap();
        a.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        b.try_clone().unwrap().write_all(b"pong").unwrap();
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(a.peer(), "socketpair");
        assert!(a.peer_ip().is_none() && a.peer_certificate().is_none());
        a.shutdown(Shutdown::Both).unwrap();
        assert_eq!(b.read(&mut got).unwrap(), 0);
    }
}
