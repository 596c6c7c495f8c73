//! The source side of a migration, in all four modes.
//!
//! Both connections are opened and the handshake done while the VM still
//! runs. Then, by mode:
//!
//! - post-copy: pause, send the state, serve pages until `Complete`;
//! - stop-and-copy: pause, send every page, send the state;
//! - pre-copy: with KVM dirty logging on, send every page, then rounds of
//!   the pages dirtied meanwhile until the estimated stop-and-copy time of
//!   what is left meets the target or the round limit is hit (reported as
//!   not converged); pause; send the rest; send the state;
//! - hybrid: like pre-copy for a few rounds, then pause, tell the destination
//!   which of its pages went stale (`Discard`), send the state, and serve the
//!   rest post-copy.
//!
//! If anything fails before the destination says `Resumed`, the source
//! resumes its own VM: the migration failed, the VM did not.
//!
//! [`migrate_snapshot`] is the post-copy source for a VM that is not running
//! anywhere: its state and pages come from a snapshot file (lazy restore).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_page_server::protocol::{
    self, features, read_frame, write_frame, Hello, HelloAck, MigrationMode, MsgType,
    ProtocolError, Role, OPT_MODE, PAGE_SIZE, PROTOCOL_VERSION,
};
use ferry_page_server::server::{self, ServerConfig, ServerError};
use ferry_page_server::source::{FileSource, PageSource};
use tracing::{error, info, warn};

use super::precopy;
use super::progress::Progress;
use super::rounds::{after_pause, before_pause, PreSwitch};
use super::stats::MigrationStats;
use super::wire::{encode_state, Resumed, StateMeta};
use crate::console::now_us;
use crate::snapshot::Snapshot;
use crate::state::{self, MachineMeta};
use crate::vm::{Vm, VmError};

/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a migration out failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Address resolution or connection.
    #[error("cannot reach the destination {addr}: {why}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// Wire protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Page serving after the switch-over.
    #[error("page server: {0}")]
    Server(#[from] ServerError),
    /// Failed before the destination ran the VM; the VM runs here again.
    #[error("migration failed before switch-over, the VM was resumed on the source: {0}")]
    RolledBack(Box<SourceError>),
}

/// Options for a migration out.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// How the memory moves.
    pub mode: MigrationMode,
    /// Page server tuning (post-copy and hybrid).
    pub server: ServerConfig,
    /// Features to ask for.
    pub features: u64,
    /// Pre-copy: most rounds after the first full pass.
    pub max_rounds: u32,
    /// Pre-copy: stop iterating once the rest is estimated to take this long.
    pub downtime_target: Duration,
    /// Hybrid: pre-copy rounds after the full pass before switching.
    pub hybrid_rounds: u32,
    /// Where to publish progress (for a progress bar), if anywhere.
    pub progress: Option<Arc<Progress>>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            mode: MigrationMode::Postcopy,
            server: ServerConfig::default(),
            features: features::SUPPORTED,
            max_rounds: 30,
            downtime_target: Duration::from_millis(50),
            hybrid_rounds: 2,
            progress: None,
        }
    }
}

impl SourceOptions {
    pub(super) fn phase(&self, name: impl Into<String>, total: u64) {
        if let Some(p) = &self.progress {
            p.phase(name, total);
        }
    }

    pub(super) fn sent_counter(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.progress.as_deref().map(|p| &p.done)
    }
}

/// What a completed migration reports on the source.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The destination's statistics (with ours under `source`).
    pub stats: MigrationStats,
}

fn connect(addr: &str) -> Result<TcpStream, SourceError> {
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
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(last))
}

fn handshake(s: &mut TcpStream, hello: &Hello, buf: &mut Vec<u8>) -> Result<HelloAck, SourceError> {
    write_frame(s, MsgType::Hello, 0, &hello.encode())?;
    let hdr = read_frame(s, buf)?;
    if hdr.kind != MsgType::HelloAck {
        return Err(ProtocolError::Unexpected {
            got: hdr.kind,
            expected: "HelloAck",
        }
        .into());
    }
    let ack = HelloAck::decode(buf)?;
    if ack.status != 0 || ack.session_id != hello.session_id {
        return Err(ProtocolError::Handshake(format!(
            "destination refused (status {})",
            ack.status
        ))
        .into());
    }
    Ok(ack)
}

/// Both connections of a session, past the handshake.
struct Session {
    control: TcpStream,
    fault: TcpStream,
    ack: HelloAck,
    buf: Vec<u8>,
}

/// Connects the control and then the fault connection to `addr` and does
/// the handshake on both, for a VM of shape `meta` moved in `mode`.
fn open_session(
    addr: &str,
    mode: MigrationMode,
    features: u64,
    meta: MachineMeta,
    start_host_us: u64,
) -> Result<Session, SourceError> {
    let session_id = start_host_us ^ u64::from(std::process::id()) << 32;
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id,
        features,
        mem_size: meta.mem_size,
        vcpus: meta.vcpus,
        page_size: PAGE_SIZE as u32,
        options: vec![(OPT_MODE, vec![mode as u8])],
    };
    let mut buf = Vec::new();
    let mut control = connect(addr)?;
    let ack = handshake(&mut control, &hello, &mut buf)?;
    let mut fault = connect(addr)?;
    hello.role = Role::Fault;
    handshake(&mut fault, &hello, &mut buf)?;
    info!(
        mode = mode.name(),
        features = ack.features,
        "connected to the destination"
    );
    Ok(Session {
        control,
        fault,
        ack,
        buf,
    })
}

/// The page server settings, limited to what the destination accepted.
fn negotiated(server: &ServerConfig, ack: &HelloAck) -> ServerConfig {
    let mut cfg = server.clone();
    cfg.lz4 &= ack.features & features::LZ4 != 0;
    cfg.zero_runs &= ack.features & features::ZERO_RUNS != 0;
    cfg
}

/// Sends `State` and waits for the destination's `Resumed`.
fn send_state(
    control: &mut TcpStream,
    buf: &mut Vec<u8>,
    meta: &StateMeta,
    blob: &[u8],
) -> Result<Resumed, SourceError> {
    write_frame(control, MsgType::State, 0, &encode_state(meta, blob))?;
    control.flush().map_err(ProtocolError::Io)?;
    // Unbuffered: the page server takes over this connection next.
    let hdr = read_frame(control, buf)?;
    if hdr.kind != MsgType::Resumed {
        return Err(ProtocolError::Unexpected {
            got: hdr.kind,
            expected: "Resumed",
        }
        .into());
    }
    Ok(protocol::from_json("Resumed", buf)?)
}

/// The destination's statistics from its `Complete`, with ours added.
fn final_stats(
    complete: serde_json::Value,
    server_stats: serde_json::Value,
    t0: Instant,
) -> Result<MigrationStats, SourceError> {
    let mut stats: MigrationStats =
        serde_json::from_value(complete).map_err(|e| ProtocolError::BadJson {
            what: "Complete",
            why: e.to_string(),
        })?;
    stats.source = serde_json::json!({
        "page_server": server_stats,
        "migration_ms": t0.elapsed().as_secs_f64() * 1e3,
    });
    Ok(stats)
}

/// Moves `vm` to the destination at `addr` with post-copy.
pub fn migrate_postcopy(
    vm: &mut Vm,
    addr: &str,
    opts: &SourceOptions,
) -> Result<Outcome, SourceError> {
    let opts = SourceOptions {
        mode: MigrationMode::Postcopy,
        ..opts.clone()
    };
    migrate(vm, addr, &opts)
}

/// Moves `vm` to the destination at `addr`. On success the VM runs there
/// and `vm` is left paused here, to be dropped.
pub fn migrate(vm: &mut Vm, addr: &str, opts: &SourceOptions) -> Result<Outcome, SourceError> {
    let start_host_us = now_us();
    let Session {
        mut control,
        fault,
        ack,
        mut buf,
    } = open_session(addr, opts.mode, opts.features, vm.meta(), start_host_us)?;
    let cfg = negotiated(&opts.server, &ack);
    let source = FileSource::new(vm.ram().file().clone(), vm.ram().pages());

    let was_running = vm.is_running();
    let logging = matches!(opts.mode, MigrationMode::Precopy | MigrationMode::Hybrid);
    let t0 = Instant::now();
    let pre = (|| {
        if logging {
            if was_running {
                vm.pause()?;
            }
            vm.start_dirty_log()?;
            if was_running {
                vm.resume()?;
            }
        }
        let pre = before_pause(vm, &control, &source, &cfg, opts)?;
        let pause_host_us = now_us();
        let pause = vm.pause()?;
        let pre = after_pause(vm, &control, &source, &cfg, opts, pre)?;
        let resumed = switch_over(
            vm,
            &mut control,
            &mut buf,
            opts.mode,
            start_host_us,
            pause_host_us,
            pause,
            &pre,
        )?;
        Ok::<_, SourceError>((pre, resumed))
    })();
    if logging {
        if let Err(e) = vm.stop_dirty_log() {
            warn!("cannot stop dirty logging: {e}");
        }
    }
    let (pre, resumed) = match pre {
        Ok(r) => r,
        Err(e) => {
            error!("migration failed before switch-over: {e}");
            if was_running {
                vm.resume()?;
            }
            return Err(SourceError::RolledBack(Box::new(e)));
        }
    };
    info!(downtime_us = resumed.downtime_us, "destination runs the VM");

    let (server_stats, complete) = if opts.mode.lazy() {
        let have = pre.have.as_deref().map_or(0, precopy::count);
        opts.phase("post-copy", source.pages() - have.min(source.pages()));
        let (s, c) = server::serve_rest(
            control,
            fault,
            &source,
            &cfg,
            pre.have.as_deref(),
            opts.sent_counter(),
        )?;
        (serde_json::to_value(s).unwrap_or_default(), c)
    } else {
        let hdr = read_frame(&mut control, &mut buf)?;
        if hdr.kind != MsgType::Complete {
            return Err(ProtocolError::Unexpected {
                got: hdr.kind,
                expected: "Complete",
            }
            .into());
        }
        (
            serde_json::Value::Null,
            protocol::from_json("Complete", &buf)?,
        )
    };
    let stats = final_stats(complete, server_stats, t0)?;
    info!(
        total_ms = stats.total_ms,
        "migration complete; releasing source memory"
    );
    Ok(Outcome { stats })
}

#[allow(clippy::too_many_arguments)]
fn switch_over(
    vm: &mut Vm,
    control: &mut TcpStream,
    buf: &mut Vec<u8>,
    mode: MigrationMode,
    start_host_us: u64,
    pause_host_us: u64,
    pause: Duration,
    pre: &PreSwitch,
) -> Result<Resumed, SourceError> {
    let t = Instant::now();
    let machine = vm.save_state()?;
    let save_us = t.elapsed().as_micros() as u64;
    let monitor = vm.monitor();
    let meta = StateMeta {
        mode,
        start_host_us,
        rounds: pre.rounds.clone(),
        converged: pre.converged,
        pause_host_us,
        last_ticks: monitor.last_tick.clone(),
        guest_bad: monitor.bad,
        pause_us: pause.as_micros() as u64,
        save_us,
    };
    send_state(control, buf, &meta, &state::encode(&machine))
}

/// Serves the VM saved in `snap` to the destination at `addr` as a post-copy
/// migration: the same handshake, then `State` with the snapshot's machine
/// state, then, once the destination runs the VM, the page server over the
/// snapshot's pages (stored pages from the file, the rest as zero) until
/// `Complete`. Returns the destination's statistics.
///
/// `start_host_us` (µs since the epoch) is when the restore began; it is
/// sent as both the start and the pause time, so the destination's
/// `downtime_us` is the time from then until its vCPUs run and `total_ms`
/// the time until every page is present. `opts.mode` is ignored (always
/// post-copy). Page data is served unverified: the caller checks the
/// snapshot's memory CRC (see `snapshot::restore_lazy`).
pub fn migrate_snapshot(
    snap: &Snapshot,
    addr: &str,
    opts: &SourceOptions,
    start_host_us: u64,
) -> Result<Outcome, SourceError> {
    let mode = MigrationMode::Postcopy;
    let Session {
        mut control,
        fault,
        ack,
        mut buf,
    } = open_session(addr, mode, opts.features, snap.state.meta, start_host_us)?;
    let cfg = negotiated(&opts.server, &ack);
    let t0 = Instant::now();
    let meta = StateMeta {
        mode,
        start_host_us,
        rounds: Vec::new(),
        converged: None,
        pause_host_us: start_host_us,
        last_ticks: BTreeMap::new(),
        guest_bad: 0,
        pause_us: 0,
        save_us: 0,
    };
    let resumed = send_state(&mut control, &mut buf, &meta, &state::encode(&snap.state))?;
    info!(
        downtime_us = resumed.downtime_us,
        "destination runs the snapshot's VM"
    );
    let source = snap.page_source();
    let (server_stats, complete) = server::serve(control, fault, &source, &cfg)?;
    let stats = final_stats(
        complete,
        serde_json::to_value(server_stats).unwrap_or_default(),
        t0,
    )?;
    info!(total_ms = stats.total_ms, "every snapshot page served");
    Ok(Outcome { stats })
}
