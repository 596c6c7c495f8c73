//! Child processes for a run: killed on drop, waited for with timeouts,
//! and checked for a listening socket in their own network namespace.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Errors driving child processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A program could not be started.
    #[error("cannot start {name}: {source}")]
    Spawn {
        /// Which program.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs:.0} s waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        secs: f64,
    },
    /// Waiting on a child failed.
    #[error("waiting for {name}: {source}")]
    Wait {
        /// Which program.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// A log file could not be created.
    #[error("cannot create {path}: {source}")]
    Log {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A child process, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Child {
    /// The process.
    pub child: std::process::Child,
    /// A name for messages.
    pub name: String,
}

impl Child {
    /// Starts `cmd` with stdin closed, stdout discarded and stderr to `err_log`.
    pub fn spawn(mut cmd: Command, name: &str, err_log: &Path) -> Result<Child, ProcError> {
        let err = std::fs::File::create(err_log).map_err(|source| ProcError::Log {
            path: err_log.display().to_string(),
            source,
        })?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        Self::spawn_raw(cmd, name)
    }

    /// Starts `cmd` as configured by the caller.
    pub fn spawn_raw(mut cmd: Command, name: &str) -> Result<Child, ProcError> {
        let child = cmd.spawn().map_err(|source| ProcError::Spawn {
            name: name.into(),
            source,
        })?;
        Ok(Child {
            child,
            name: name.into(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited? (Some(status) if so.)
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, ProcError> {
        self.child.try_wait().map_err(|source| ProcError::Wait {
            name: self.name.clone(),
            source,
        })
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcError> {
        let what = format!("{} to exit", self.name);
        let mut err = None;
        let r = wait_until(timeout, &what, || match self.exited() {
            Ok(s) => s,
            Err(e) => {
                err = Some(e);
                None
            }
        });
        match err {
            Some(e) => Err(e),
            None => r,
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, ProcError> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= end {
            return Err(ProcError::Timeout {
                what: what.into(),
                secs: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is a TCP socket listening on `ip:port` in `pid`'s network namespace?
/// (Reads `/proc/<pid>/net/tcp`, so it works inside namespaces and never
/// connects, which would use up a one-shot listener.)
pub fn listening(pid: u32, ip: Ipv4Addr, port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    // /proc shows the address as the in-memory u32 in hex (little-endian here).
    let want_ip = format!("{:08X}", u32::from_le_bytes(ip.octets()));
    let any = "00000000";
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[3] == "0A"
            && f[1].split_once(':').is_some_and(|(a, p)| {
                (a == want_ip || a == any) && u16::from_str_radix(p, 16) == Ok(port)
            })
    })
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(std::process::id(), Ipv4Addr::LOCALHOST, port));
        drop(l);
        assert!(!listening(std::process::id(), Ipv4Addr::LOCALHOST, port));
        assert!(wait_until(Duration::from_millis(30), "nothing", || None::<()>).is_err());
    }
}
