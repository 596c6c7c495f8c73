//! The source side of a post-copy migration.
//!
//! Connect both connections and shake hands while the VM still runs, then
//! pause, capture the state, send it, and wait for the destination to say
//! its vCPUs run. From then on the destination owns the VM and the source
//! is only its page server, until the destination says `Complete`. If
//! anything fails before `Resumed`, the source resumes its own VM.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ferry_page_server::protocol::{
    self, features, read_frame, write_frame, Hello, HelloAck, MsgType, ProtocolError, Role,
    PAGE_SIZE, PROTOCOL_VERSION,
};
use ferry_page_server::server::{self, ServerConfig, ServerError};
use ferry_page_server::source::FileSource;
use tracing::{error, info};

use super::stats::MigrationStats;
use super::wire::{encode_state, Resumed, StateMeta};
use crate::console::now_us;
use crate::state;
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
    /// Page server tuning.
    pub server: ServerConfig,
    /// Features to ask for.
    pub features: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            features: features::SUPPORTED,
        }
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

/// Moves `vm` to the destination at `addr` with post-copy. On success the
/// VM runs there and `vm` is left paused here, to be dropped.
pub fn migrate_postcopy(
    vm: &mut Vm,
    addr: &str,
    opts: &SourceOptions,
) -> Result<Outcome, SourceError> {
    let meta = vm.meta();
    let session_id = now_us() ^ u64::from(std::process::id()) << 32;
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id,
        features: opts.features,
        mem_size: meta.mem_size,
        vcpus: meta.vcpus,
        page_size: PAGE_SIZE as u32,
        options: Vec::new(),
    };
    let mut buf = Vec::new();
    // Everything up to the pause happens while the guest runs.
    let mut control = connect(addr)?;
    let ack = handshake(&mut control, &hello, &mut buf)?;
    let mut fault = connect(addr)?;
    hello.role = Role::Fault;
    handshake(&mut fault, &hello, &mut buf)?;
    info!(features = ack.features, "connected to the destination");

    let was_running = vm.is_running();
    let t0 = Instant::now();
    let pause_host_us = now_us();
    let pause = vm.pause()?;
    let switched = switch_over(vm, &mut control, &mut buf, pause_host_us, pause);
    let resumed = match switched {
        Ok(r) => r,
        Err(e) => {
            error!("switch-over failed: {e}");
            if was_running {
                vm.resume()?;
            }
            return Err(SourceError::RolledBack(Box::new(e)));
        }
    };
    info!(
        downtime_us = resumed.downtime_us,
        "destination runs the VM; serving pages"
    );

    let mut cfg = opts.server.clone();
    cfg.lz4 &= ack.features & features::LZ4 != 0;
    cfg.zero_runs &= ack.features & features::ZERO_RUNS != 0;
    let source = FileSource::new(vm.ram().file().clone(), vm.ram().pages());
    let (server_stats, complete) = server::serve(control, fault, &source, &cfg)?;
    let mut stats: MigrationStats = protocol::from_json(
        "Complete",
        &serde_json::to_vec(&complete).unwrap_or_default(),
    )?;
    stats.source = serde_json::json!({
        "page_server": server_stats,
        "switch_over_ms": t0.elapsed().as_secs_f64() * 1e3,
    });
    info!(
        total_ms = stats.total_ms,
        "migration complete; releasing source memory"
    );
    Ok(Outcome { stats })
}

fn switch_over(
    vm: &mut Vm,
    control: &mut TcpStream,
    buf: &mut Vec<u8>,
    pause_host_us: u64,
    pause: Duration,
) -> Result<Resumed, SourceError> {
    let t = Instant::now();
    let machine = vm.save_state()?;
    let save_us = t.elapsed().as_micros() as u64;
    let monitor = vm.monitor();
    let meta = StateMeta {
        pause_host_us,
        last_ticks: monitor.last_tick.clone(),
        guest_bad: monitor.bad,
        pause_us: pause.as_micros() as u64,
        save_us,
    };
    let payload = encode_state(&meta, &state::encode(&machine));
    write_frame(control, MsgType::State, 0, &payload)?;
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
