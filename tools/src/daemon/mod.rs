//! `ferry-dest --listen ADDR --daemon --run-dir DIR`: a listener that
//! takes one migration after another and runs each incoming VM in a
//! process of its own.
//!
//! ```text
//! source ── control Hello ──► daemon: Acceptor (concurrent, time-limited handshakes)
//!                               admit: role, features, session, --max-vms,
//!                                      check_hello (size, vCPUs, options, mode)
//!                               start: ferry-dest --listen IP:0 (same binary,
//!                                      same link/TLS flags), session id in its
//!                                      environment, API socket DIR/vm-ID.sock
//!        ◄── Redirect{port} ──  once the VM process listens
//! source ── control + fault Hellos ──► the VM's process (and every
//!                                      reconnection during recovery)
//! ```
//!
//! The daemon reads and checks each `Hello` itself, so garbage, silence,
//! floods, fault connections without a session and resumes of sessions it
//! does not hold never start a process or allocate guest memory: they get
//! what the single listener gives them (an `Abort` with the reason). The VM processes outlive the daemon, like libvirt's QEMU
//! processes; each is listed in `DIR/vm-ID.json` while it runs.

mod admit;
mod child;
mod run_dir;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_engine::migration::acceptor::Acceptor;
use ferry_engine::migration::link::Link;
use ferry_protocol::{Hello, MsgType, Redirect};
use tracing::{info, warn};

use admit::Decision;
use child::VmProcess;
pub use child::EXPECT_SESSION_ENV;
pub use run_dir::{list, RunDir};

/// How often the daemon looks up from the listener to reap ended VMs.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// What the daemon needs besides its listener.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where each VM's API socket, record, console and log go.
    pub run_dir: PathBuf,
    /// VM processes at most (running or starting).
    pub max_vms: usize,
    /// The handshake's peer timeout (`--peer-timeout`).
    pub peer_timeout: Duration,
    /// The `ferry-dest` binary to start for each VM.
    pub exe: PathBuf,
    /// Arguments every VM process gets besides its own listener, API
    /// socket, console and statistics: the link, hook, seccomp and (once
    /// they exist) TLS flags of the daemon.
    pub forwarded: Vec<OsString>,
    /// How long a VM process waits for its source before it gives up.
    pub accept_timeout: Duration,
    /// Each VM process allocates its session's RAM, of this kind, before
    /// it listens (`--prealloc session`; `forwarded` holds `--huge-pages`
    /// for huge pages).
    pub prealloc: Option<ferry_engine::memory::Backing>,
    /// Mutual TLS on the daemon's listener (its VM processes get the same
    /// files through `forwarded`).
    pub tls: Option<ferry_transport::ServerTls>,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The run directory could not be prepared.
    #[error("run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The listener failed.
    #[error("listener: {0}")]
    Listener(#[from] ferry_protocol::ProtocolError),
}

/// Runs the daemon on `listener` until the process is stopped.
pub fn run(listener: &TcpListener, cfg: &DaemonConfig) -> Result<(), DaemonError> {
    let dir = RunDir::create(&cfg.run_dir).map_err(|source| DaemonError::RunDir {
        path: cfg.run_dir.clone(),
        source,
    })?;
    let ip = listener
        .local_addr()
        .map_err(|e| DaemonError::Listener(e.into()))?
        .ip();
    let acceptor = Acceptor::new(listener, cfg.peer_timeout, cfg.tls.clone())?;
    let mut vms: HashMap<u64, VmProcess> = HashMap::new();
    info!(run_dir = %cfg.run_dir.display(), max_vms = cfg.max_vms, "daemon: each incoming VM runs in a process of its own");
    loop {
        vms.retain(|_, vm| !vm.reap_if_ended());
        let Some((link, hello)) = acceptor.next_hello(Some(Instant::now() + REAP_EVERY))? else {
            continue;
        };
        let peer = link.stream.peer();
        match admit::decide(&hello, &vms, cfg.max_vms) {
            Decision::Redirect(port) => {
                info!(%peer, port, "a source resumes a session of a VM process here; redirecting it");
                redirect(&link, &hello, port);
            }
            Decision::Refuse(why) => {
                warn!(%peer, "refused a connection: {why}");
                let _ = link.send(MsgType::Abort, 0, why.as_bytes());
            }
            Decision::Start => match VmProcess::start(&dir, cfg, ip, &hello, held_ahead(&vms)) {
                Ok(vm) => {
                    info!(%peer, vm = %vm.id, pid = vm.pid(), port = vm.port, "incoming migration handed to a VM process");
                    redirect(&link, &hello, vm.port);
                    vms.insert(hello.session_id, vm);
                }
                Err(e) => {
                    warn!(%peer, "cannot start a VM process: {e}");
                    let _ = link.send(
                        MsgType::Abort,
                        0,
                        format!("cannot start a VM process: {e}").as_bytes(),
                    );
                }
            },
        }
    }
}

/// RAM the running VM processes allocated ahead (`--prealloc session`),
/// which counts against the room for the next one's.
fn held_ahead(vms: &HashMap<u64, VmProcess>) -> u64 {
    vms.values().map(|vm| vm.ahead).fold(0, u64::saturating_add)
}

fn redirect(link: &Link, hello: &Hello, port: u16) {
    let r = Redirect {
        session_id: hello.session_id,
        port,
    };
    if let Err(e) = link.send(MsgType::Redirect, 0, &r.encode()) {
        warn!("could not send the redirect: {e}");
    }
}
