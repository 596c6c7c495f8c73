//! The per-VM control API: JSON lines over a unix socket.
//!
//! Each request is one JSON object on one line; each gets one JSON line back:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"result":{"run_state":"running",...}}
//! -> {"cmd":"snapshot","path":"/tmp/vm.snap"}
//! <- {"ok":false,"error":"the VM is running; pause it first"}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `snapshot` (`path`),
//! `migrate` (`to`, optional `stats_json`, `mode`, `max_bandwidth`,
//! `tcp_congestion` and `tls_cert`/`tls_key`/`tls_ca`/`tls_server_name`),
//! `cancel` (a migration out, before its switch-over commits), `recover`
//! (`to`), `quit`.
//! Requests are untrusted: malformed or oversized lines get an error
//! response, never a panic, and the connection stays usable.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long the client waits for an answer (snapshots of big guests take a while).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors from the API transport.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Socket setup or I/O.
    #[error("API socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The API thread could not be confined.
    #[error(transparent)]
    Seccomp(crate::seccomp::SeccompError),
    /// The server answered something that is not a response.
    #[error("malformed API response: {0}")]
    BadResponse(String),
    /// The server refused the request.
    #[error("{0}")]
    Refused(String),
}

/// A request to the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiRequest {
    /// Run state, machine shape and what the guest reported.
    Status,
    /// Stop the vCPUs.
    Pause,
    /// Continue the vCPUs.
    Resume,
    /// Write a snapshot of the paused VM.
    Snapshot {
        /// Destination file.
        path: PathBuf,
    },
    /// Move the VM to a `ferry-dest --listen` at `to` (post-copy); the
    /// process exits once the destination has every page.
    Migrate {
        /// `host:port` of the destination.
        to: String,
        /// Also write the migration statistics here.
        #[serde(default)]
        stats_json: Option<PathBuf>,
        /// `postcopy` (default), `stop-and-copy`, `precopy` or `hybrid`.
        #[serde(default)]
        mode: Option<ferry_protocol::MigrationMode>,
        /// Cap on the background push, bytes per second, at least 1
        /// (demand answers are never capped).
        #[serde(default)]
        max_bandwidth: Option<u64>,
        /// TCP congestion control for the move's connections (e.g.
        /// `reno`); checked before anything moves.
        #[serde(default)]
        tcp_congestion: Option<String>,
        /// Mutual TLS: this side's certificate (PEM file). All three of
        /// `tls_cert`, `tls_key` and `tls_ca` or none.
        #[serde(default)]
        tls_cert: Option<PathBuf>,
        /// Mutual TLS: its private key (PEM file).
        #[serde(default)]
        tls_key: Option<PathBuf>,
        /// Mutual TLS: the CA that signed the destination (PEM file).
        #[serde(default)]
        tls_ca: Option<PathBuf>,
        /// Mutual TLS: the name the destination's certificate must carry
        /// (default: the host part of `to`).
        #[serde(default)]
        tls_server_name: Option<String>,
    },
    /// Try a stranded move again: on the source, reconnect to the
    /// destination (at `to`, if it moved; else where it was); on the
    /// destination, wait for the source's reconnection for another
    /// recovery window.
    Recover {
        /// The destination's address, when it changed (source side only).
        #[serde(default)]
        to: Option<String>,
    },
    /// Cancel the migration out in progress before its switch-over
    /// commits: it rolls back, the VM goes on running here, and the
    /// destination discards its copy. Refused once `Commit` is written.
    Cancel,
    /// Stop the VM and the process.
    Quit,
}

/// The answer to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ApiResponse {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    /// A failure.
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        }
    }
}

/// A request waiting for the VM's controller to answer it.
pub type PendingRequest = (ApiRequest, Reply);

/// How long [`Reply::send_and_flush`] waits for the connection thread.
pub const FLUSH_WITHIN: Duration = Duration::from_secs(2);

/// Where the controller's answer to one request goes: the connection
/// thread that read the request writes it to the client.
#[derive(Debug)]
pub struct Reply {
    tx: Sender<(ApiResponse, Option<SyncSender<()>>)>,
}

impl Reply {
    /// Hands `r` to the connection thread, which writes it when it can.
    pub fn send(self, r: ApiResponse) {
        let _ = self.tx.send((r, None));
    }

    /// Hands `r` to the connection thread and waits, at most `within`,
    /// until it has written it to the client's socket. For an answer after
    /// which the process may end (`quit`, a finished `migrate`): without
    /// the wait the process can exit first and the client reads nothing.
    /// Returns whether the answer was written.
    pub fn send_and_flush(self, r: ApiResponse, within: Duration) -> bool {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send((r, Some(done_tx))).is_err() {
            return false;
        }
        done_rx.recv_timeout(within).is_ok()
    }
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<ApiRequest, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("invalid request: {e}"))
}

/// The API socket this process bound: removed when dropped, if the path
/// still names it (another process may have replaced it since).
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        if file_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The device and inode of what `path` names (not following a link).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Makes way for a new socket at `path`: nothing may be there but a stale
/// socket, one no process listens on (left by a process that died), which
/// is removed. A socket a live process serves, or anything that is not a
/// socket, is refused and left alone.
fn clear_stale_socket(path: &Path) -> Result<(), std::io::Error> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            "exists and is not a socket; not replaced",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::new(
            ErrorKind::AddrInUse,
            "a running process serves it (another VM's API?); not replaced",
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Listens on `path` (replacing a stale socket, never a live one or another
/// file) and forwards requests; the returned [`ApiSocket`] removes the
/// socket when dropped.
pub fn serve(path: &Path) -> Result<(Receiver<PendingRequest>, ApiSocket), ApiError> {
    let sock_err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    clear_stale_socket(path).map_err(sock_err)?;
    // Owner-only from the start (0600), as Firecracker and Cloud Hypervisor
    // do: the socket is full control of the VM. The umask is set around the
    // bind rather than chmod after it, so there is no window.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(sock_err)?;
    let socket = ApiSocket {
        path: path.to_path_buf(),
        id: file_id(path).unwrap_or_default(),
    };
    let (tx, rx) = channel();
    let (confined_tx, confined_rx) = channel();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Its connection threads inherit the filter.
            let confined = crate::seccomp::apply(crate::seccomp::Thread::Api);
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if !ok {
                return;
            }
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let tx = tx.clone();
                        let _ = std::thread::Builder::new()
                            .name("api-conn".into())
                            .spawn(move || handle_connection(stream, tx));
                    }
                    Err(e) => warn!("API accept failed: {e}"),
                }
            }
        })
        .map_err(sock_err)?;
    match confined_rx.recv() {
        Ok(Ok(())) => Ok((rx, socket)),
        Ok(Err(e)) => Err(ApiError::Seccomp(e)),
        Err(_) => Err(ApiError::Seccomp(crate::seccomp::SeccompError::Thread(
            "api",
        ))),
    }
}

fn handle_connection(stream: UnixStream, tx: Sender<PendingRequest>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        // Bound the line so a client cannot make us buffer without limit.
        let n = match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                let _ = send(
                    &mut writer,
                    &ApiResponse::err(format!("unreadable request: {e}")),
                );
                return;
            }
        };
        let response = if n > MAX_REQUEST || !line.ends_with('\n') && n == MAX_REQUEST + 1 {
            let r = ApiResponse::err(format!("request longer than {MAX_REQUEST} bytes"));
            let _ = send(&mut writer, &r);
            return;
        } else if line.trim().is_empty() {
            continue;
        } else {
            match parse_request(&line) {
                Ok(req) => {
                    debug!(?req, "API request");
                    let (rtx, rrx) = channel();
                    if tx.send((req, Reply { tx: rtx })).is_err() {
                        (ApiResponse::err("the VM is shutting down"), None)
                    } else {
                        rrx.recv()
                            .unwrap_or_else(|_| (ApiResponse::err("the VM is shutting down"), None))
                    }
                }
                Err(e) => (ApiResponse::err(e), None),
            }
        };
        let (response, written) = response;
        let sent = send(&mut writer, &response);
        if let Some(written) = written {
            // Only now may the controller let the process end.
            let _ = written.send(());
        }
        if sent.is_err() {
            return;
        }
    }
}

fn send(w: &mut UnixStream, r: &ApiResponse) -> std::io::Result<()> {
    let mut s = serde_json::to_string(r)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable response"}"#.into());
    s.push('\n');
    w.write_all(s.as_bytes())
}

/// Sends one request and returns the result, or the server's error.
pub fn call(path: &Path, req: &ApiRequest) -> Result<serde_json::Value, ApiError> {
    let sock_err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(sock_err)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(sock_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| ApiError::BadResponse(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(sock_err)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(sock_err)?;
    let r: ApiResponse = serde_json::from_str(&answer)
        .map_err(|e| ApiError::BadResponse(format!("{e}: {answer:?}")))?;
    if r.ok {
        Ok(r.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ApiError::Refused(
            r.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        assert_eq!(parse_request(r#"{"cmd":"pause"}"#), Ok(ApiRequest::Pause));
        assert_eq!(parse_request(r#"{"cmd":"cancel"}"#), Ok(ApiRequest::Cancel));
        assert_eq!(
            parse_request(r#"{"cmd":"snapshot","path":"/tmp/x"}"#),
            Ok(ApiRequest::Snapshot {
                path: "/tmp/x".into()
            })
        );
        for bad in [
            "",
            "{",
            r#"{"cmd":"fly"}"#,
            r#"{"cmd":"snapshot"}"#,
            "[1,2]",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("invalid request"), "{bad}: {e}");
        }
    }

    #[test]
    fn server_answers_garbage_with_errors() {
        let dir = std::env::temp_dir().join(format!("ferry-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let (rx, _sock) = serve(&sock).unwrap();
        std::thread::spawn(move || {
            while let Ok((req, reply)) = rx.recv() {
                reply.send(ApiResponse::ok(
                    serde_json::json!({ "echo": format!("{req:?}") }),
                ));
            }
        });
        let v = call(&sock, &ApiRequest::Status).unwrap();
        assert_eq!(v["echo"], "Status");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"not json\n{\"cmd\":\"pause\"}\n").unwrap();
        let mut r = BufReader::new(s);
        let mut l1 = String::new();
        r.read_line(&mut l1).unwrap();
        assert!(
            l1.contains("\"ok\":false") && l1.contains("invalid request"),
            "{l1}"
        );
        let mut l2 = String::new();
        r.read_line(&mut l2).unwrap();
        assert!(l2.contains("Pause"), "{l2}");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let mut l3 = String::new();
        BufReader::new(s).read_line(&mut l3).unwrap();
        assert!(l3.contains("longer than"), "{l3}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The `quit` race: the controller answers and the process ends. The
    /// answer must already be in the client's socket when the controller
    /// goes on, or the client reads an empty reply.
    #[test]
    fn a_flushed_answer_is_in_the_socket_before_the_controller_goes_on() {
        let dir = std::env::temp_dir().join(format!("ferry-api-flush-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let (rx, _sock) = serve(&sock).unwrap();
        for round in 0..50 {
            let mut client = UnixStream::connect(&sock).unwrap();
            client.write_all(b"{\"cmd\":\"quit\"}\n").unwrap();
            let (req, reply) = rx.recv().unwrap();
            assert_eq!(req, ApiRequest::Quit);
            assert!(reply.send_and_flush(
                ApiResponse::ok(serde_json::json!({ "round": round })),
                FLUSH_WITHIN
            ));
            // The process would exit here. Whatever the client can read
            // now is all it would ever get.
            client.set_nonblocking(true).unwrap();
            let mut got = [0u8; 256];
            let n = client.read(&mut got).unwrap_or(0);
            let line = String::from_utf8_lossy(&got[..n]);
            assert!(
                line.ends_with('\n') && line.contains(&format!("\"round\":{round}")),
                "round {round}: the client had {line:?} when the controller went on"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
