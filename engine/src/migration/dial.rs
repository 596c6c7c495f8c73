//! [`Dial`]: where the source's connections come from.
//!
//! A source dials the destination's address over TCP, for the first
//! connections and for every reconnection after a lost link. A
//! `ferry-dest --daemon` may answer the first `Hello` with a `Redirect`
//! to the port of the process it started for this VM: the dial then
//! points there for good (same host, new port), so reconnections reach
//! the VM's own process. A lazy restore instead hands the source the ends
//! of two socketpairs, which are used once and cannot be dialled again.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use ferry_transport::{congestion, Conn};

use super::error::SourceError;

/// How long connecting to the destination may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the source's connections come from.
#[derive(Debug)]
pub struct Dial {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
enum Inner {
    /// TCP to this address (`host:port`); `redirected` once a daemon sent
    /// the session elsewhere; `congestion`: the algorithm asked for, and
    /// `in_use` the one the last connection reported.
    Tcp {
        addr: String,
        redirected: bool,
        congestion: Option<String>,
        in_use: Option<String>,
    },
    /// Connected streams handed out in order (control, then fault).
    Given(VecDeque<Conn>),
}

impl Dial {
    /// Dials `addr` over TCP.
    pub fn tcp(addr: &str) -> Self {
        Self {
            inner: Mutex::new(Inner::Tcp {
                addr: addr.to_string(),
                redirected: false,
                congestion: None,
                in_use: None,
            }),
        }
    }

    /// Makes every TCP connection of this dial use congestion control
    /// `name` (see `ferry_transport::congestion`); `None` keeps the
    /// system's. A connection that cannot use it fails.
    pub fn with_congestion(self, name: Option<String>) -> Self {
        if let Inner::Tcp { congestion, .. } = &mut *self.lock() {
            *congestion = name;
        }
        self
    }

    /// The congestion control the last TCP connection reported using.
    pub fn congestion_in_use(&self) -> Option<String> {
        match &*self.lock() {
            Inner::Tcp { in_use, .. } => in_use.clone(),
            Inner::Given(_) => None,
        }
    }

    /// Uses `control` and then `fault`, already connected (the source's
    /// ends of two socketpairs); any further connection fails.
    pub fn given(control: Conn, fault: Conn) -> Self {
        Self {
            inner: Mutex::new(Inner::Given(VecDeque::from([control, fault]))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address dialled now (after any redirect), for logs and the
    /// session record.
    pub fn addr(&self) -> String {
        match &*self.lock() {
            Inner::Tcp { addr, .. } => addr.clone(),
            Inner::Given(_) => "socketpair".into(),
        }
    }

    /// A new connection to the destination.
    pub(super) fn connect(&self) -> Result<Conn, SourceError> {
        let (addr, congestion) = match &mut *self.lock() {
            Inner::Tcp {
                addr, congestion, ..
            } => (addr.clone(), congestion.clone()),
            Inner::Given(streams) => {
                return streams.pop_front().ok_or_else(|| SourceError::Connect {
                    addr: "socketpair".into(),
                    why: "an in-process session cannot reconnect".into(),
                })
            }
        };
        let s = connect_tcp(&addr, congestion.as_deref())?;
        if let Inner::Tcp { in_use, .. } = &mut *self.lock() {
            *in_use = congestion::get(&s).ok();
        }
        Ok(Conn::Plain(s))
    }

    /// Points this dial at `port` on the host it dialled (a daemon's
    /// `Redirect`). A session is redirected at most once, and never to
    /// port 0: anything else is an error, so two daemons cannot bounce a
    /// source between them.
    pub(super) fn redirect(&self, port: u16) -> Result<String, SourceError> {
        let mut inner = self.lock();
        let Inner::Tcp {
            addr, redirected, ..
        } = &mut *inner
        else {
            return Err(SourceError::Connect {
                addr: "socketpair".into(),
                why: "an in-process session was redirected".into(),
            });
        };
        let fail = |why: String| SourceError::Connect {
            addr: addr.clone(),
            why,
        };
        if *redirected {
            return Err(fail(format!(
                "redirected again (to port {port}): a redirect loop"
            )));
        }
        if port == 0 {
            return Err(fail("redirected to port 0".into()));
        }
        let host = host_of(addr).ok_or_else(|| fail("no host part to redirect".into()))?;
        let new = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        *addr = new.clone();
        *redirected = true;
        Ok(new)
    }
}

/// The host part of `host:port` or `[v6]:port`, without brackets.
fn host_of(addr: &str) -> Option<&str> {
    let (host, _port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

fn connect_tcp(addr: &str, congestion: Option<&str>) -> Result<TcpStream, SourceError> {
    let fail = |why: String| SourceError::Connect {
        addr: addr.to_string(),
        why,
    };
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .collect();
    let mut last = "no addresses".to_string();
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
                if let Some(name) = congestion {
                    congestion::set(&s, name).map_err(|e| fail(e.to_string()))?;
                }
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_keeps_the_host_and_happens_once() {
        let d = Dial::tcp("127.0.0.1:7000");
        assert_eq!(d.redirect(41000).unwrap(), "127.0.0.1:41000");
        assert_eq!(d.addr(), "127.0.0.1:41000");
        let e = d.redirect(42000).unwrap_err().to_string();
        assert!(e.contains("redirect loop"), "{e}");
        let v6 = Dial::tcp("[::1]:7000");
        assert_eq!(v6.redirect(5).unwrap(), "[::1]:5");
        let e = Dial::tcp("h:1").redirect(0).unwrap_err().to_string();
        assert!(e.contains("port 0"), "{e}");
    }

    #[test]
    fn given_streams_are_used_once() {
        let (a, _a) = Conn::pair().unwrap();
        let (b, _b) = Conn::pair().unwrap();
        let d = Dial::given(a, b);
        assert!(d.connect().is_ok());
        assert!(d.connect().is_ok());
        let e = d.connect().unwrap_err().to_string();
        assert!(e.contains("cannot reconnect"), "{e}");
        assert!(d.redirect(1).is_err());
    }
}
