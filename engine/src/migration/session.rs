//! The source's side of a session: connecting both connections, the
//! handshake, the switch-over message exchange and the final statistics.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ferry_page_server::server::ServerConfig;
use ferry_protocol::{
    encode_state, features, from_json, Hello, HelloAck, MigrationMode, MsgType, ProtocolError,
    Resumed, Role, StateMeta, OPT_MODE, PAGE_SIZE, PROTOCOL_VERSION,
};
use tracing::info;

use super::error::SourceError;
use super::link::Link;
use super::stats::MigrationStats;
use crate::state::MachineMeta;

/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Both connections of a session, past the handshake.
pub(super) struct Session {
    pub(super) control: Link,
    pub(super) fault: Link,
    pub(super) ack: HelloAck,
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

fn handshake(link: &mut Link, hello: &Hello) -> Result<HelloAck, SourceError> {
    link.send(MsgType::Hello, 0, &hello.encode())?;
    let ack = HelloAck::decode(link.expect(MsgType::HelloAck, "HelloAck")?)?;
    if ack.status != 0 || ack.session_id != hello.session_id {
        return Err(ProtocolError::Handshake(format!(
            "destination refused (status {})",
            ack.status
        ))
        .into());
    }
    Ok(ack)
}

/// Connects the control and then the fault connection to `addr` and does
/// the handshake on both, for a VM of shape `meta` moved in `mode`.
pub(super) fn open_session(
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
    let mut control = Link::new(connect(addr)?);
    let ack = handshake(&mut control, &hello)?;
    let mut fault = Link::new(connect(addr)?);
    hello.role = Role::Fault;
    handshake(&mut fault, &hello)?;
    info!(
        mode = mode.name(),
        features = ack.features,
        "connected to the destination"
    );
    Ok(Session {
        control,
        fault,
        ack,
    })
}

/// The page server settings, limited to what the destination accepted.
pub(super) fn negotiated(server: &ServerConfig, ack: &HelloAck) -> ServerConfig {
    let mut cfg = server.clone();
    cfg.lz4 &= ack.features & features::LZ4 != 0;
    cfg.zero_runs &= ack.features & features::ZERO_RUNS != 0;
    cfg
}

/// Sends `State` and waits for the destination's `Resumed`.
pub(super) fn send_state(
    control: &mut Link,
    meta: &StateMeta,
    blob: &[u8],
) -> Result<Resumed, SourceError> {
    control.send(MsgType::State, 0, &encode_state(meta, blob))?;
    let payload = control.expect(MsgType::Resumed, "Resumed")?;
    Ok(from_json("Resumed", payload)?)
}

/// The destination's statistics from its `Complete`, with ours added.
pub(super) fn final_stats(
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
