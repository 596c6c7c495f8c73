//! The source's side of a session: connecting both connections, the
//! handshake, the switch-over message exchange and the final statistics.

use std::time::{Duration, Instant};

use ferry_page_server::server::ServerConfig;
use ferry_protocol::{
    encode_state, features, peer_timeout_ms, session_peer_timeout, Hello, HelloAck, MigrationMode,
    MsgType, ProtocolError, ResumeStatus, Role, StateMeta, OPT_MODE, OPT_PEER_TIMEOUT, PAGE_SIZE,
    PROTOCOL_VERSION,
};
use ferry_transport::{ClientTls, Conn};
use tracing::info;

use super::cancel::CancelGate;
use super::dial::Dial;
use super::error::SourceError;
use super::link::Link;
use super::options::check_cancel;
use super::stats::{MigrationStats, Recovery};
use crate::state::MachineMeta;

/// Both connections of a session, past the handshake.
pub(super) struct Session {
    pub(super) control: Link,
    pub(super) fault: Link,
    pub(super) ack: HelloAck,
    /// What identifies the session to the destination (and to a resume).
    pub(super) hello: Hello,
}

/// A session id from the OS's random number source: unguessable, so only
/// the source that opened a session can resume it.
pub fn random_session_id() -> Result<u64, SourceError> {
    crate::os::random_u64().map_err(|e| SourceError::Connect {
        addr: "/dev/urandom".into(),
        why: format!("no random session id: {e}"),
    })
}

/// A new connection from `dial`, then the TLS handshake when `tls` is
/// given (checking the destination's certificate against the CA and the
/// name; an in-process socketpair needs none).
fn connect(dial: &Dial, tls: Option<&ClientTls>) -> Result<Conn, SourceError> {
    match (dial.connect()?, tls) {
        (Conn::Plain(tcp), Some(tls)) => {
            let addr = dial.addr();
            let name = tls.name_for(&addr);
            tls.connect(
                tcp,
                &name,
                std::time::Instant::now() + super::dial::CONNECT_TIMEOUT,
            )
            .map_err(|e| SourceError::Connect {
                addr,
                why: format!("{e} (destination name {name:?})"),
            })
        }
        (conn, _) => Ok(conn),
    }
}

/// What a destination answered to a `Hello`.
enum Answer {
    /// `HelloAck`, with the status it carries.
    Ack(HelloAck, ResumeStatus),
    /// `Redirect`: a daemon sends the session to this port.
    Redirect(u16),
}

/// Sends `hello` and reads the `HelloAck` (or, for a control connection, a
/// daemon's `Redirect`); returns it with the status it carries (anything
/// but `Accepted` only answers a resume).
fn handshake(link: &mut Link, hello: &Hello) -> Result<Answer, SourceError> {
    link.send(MsgType::Hello, 0, &hello.encode())?;
    let f = link.recv()?;
    if f.header.kind == MsgType::Redirect && hello.role == Role::Control {
        let r = ferry_protocol::Redirect::decode(f.payload)?;
        if r.session_id != hello.session_id {
            return Err(ProtocolError::Handshake("Redirect for another session".into()).into());
        }
        return Ok(Answer::Redirect(r.port));
    }
    if f.header.kind != MsgType::HelloAck {
        return Err(ProtocolError::Unexpected {
            got: f.header.kind,
            expected: "HelloAck",
        }
        .into());
    }
    let ack = HelloAck::decode(f.payload)?;
    let status = ResumeStatus::from_u32(ack.status);
    let resume = hello.features & features::RESUME != 0;
    match status {
        Some(s)
            if ack.session_id == hello.session_id && (resume || s == ResumeStatus::Accepted) =>
        {
            Ok(Answer::Ack(ack, s))
        }
        _ => Err(
            ProtocolError::Handshake(format!("destination refused (status {})", ack.status)).into(),
        ),
    }
}

/// Connects the control and then the fault connection through `dial` and does
/// the handshake on both, for a VM of shape `meta` moved in `mode`;
/// `extra_options` go into the `Hello` after the mode and `peer_timeout`
/// (migrated disks). Both links run with the session's peer timeout, the
/// shorter of `peer_timeout` and the destination's.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_session(
    dial: &Dial,
    mode: MigrationMode,
    features: u64,
    meta: MachineMeta,
    peer_timeout: Duration,
    session_id: Option<u64>,
    tls: Option<&ClientTls>,
    extra_options: Vec<(u16, Vec<u8>)>,
) -> Result<Session, SourceError> {
    let session_id = match session_id {
        Some(id) => id,
        None => random_session_id()?,
    };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id,
        features: (features | features::PEER_TIMEOUT) & !features::RESUME,
        mem_size: meta.mem_size,
        vcpus: meta.vcpus,
        page_size: PAGE_SIZE as u32,
        options: [
            (OPT_MODE, vec![mode as u8]),
            (
                OPT_PEER_TIMEOUT,
                peer_timeout_ms(peer_timeout).to_le_bytes().to_vec(),
            ),
        ]
        .into_iter()
        .chain(extra_options)
        .collect(),
    };
    let (session, _) = connect_both(dial, hello, peer_timeout, tls)?;
    info!(
        mode = mode.name(),
        tls = tls.is_some(),
        features = session.ack.features,
        peer_timeout_ms = session.control.peer_timeout().as_millis() as u64,
        "connected to the destination"
    );
    Ok(session)
}

/// Reconnects to the session `first` opened, after a lost link: both
/// connections say `RESUME`, and the destination's answer says what it
/// holds. `UnknownSession` comes back without a fault connection.
pub(super) fn resume_session(
    dial: &Dial,
    first: &Hello,
    peer_timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<(Option<Session>, ResumeStatus), SourceError> {
    let mut hello = first.clone();
    hello.role = Role::Control;
    hello.features |= features::RESUME;
    match connect_both(dial, hello, peer_timeout, tls) {
        Ok((s, status)) => Ok((Some(s), status)),
        Err(SourceError::Unknown) => Ok((None, ResumeStatus::UnknownSession)),
        Err(e) => Err(e),
    }
}

fn connect_both(
    dial: &Dial,
    mut hello: Hello,
    peer_timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<(Session, ResumeStatus), SourceError> {
    // A daemon redirects the control connection once, to the VM's own
    // process; `dial` refuses a second redirect, so this ends.
    let (mut control, ack, status) = loop {
        let mut control = Link::new(connect(dial, tls)?, peer_timeout)?;
        match handshake(&mut control, &hello)? {
            Answer::Ack(ack, status) => break (control, ack, status),
            Answer::Redirect(port) => {
                let to = dial.redirect(port)?;
                info!(%to, "the destination daemon sent this session to the VM's own process");
            }
        }
    };
    if status == ResumeStatus::UnknownSession {
        return Err(SourceError::Unknown);
    }
    let mut fault = Link::new(connect(dial, tls)?, peer_timeout)?;
    hello.role = Role::Fault;
    // Only a control connection may be redirected (`handshake` refuses it).
    handshake(&mut fault, &hello)?;
    hello.role = Role::Control;
    let agreed = session_peer_timeout(peer_timeout, ack.peer_timeout_ms);
    control.set_peer_timeout(agreed)?;
    fault.set_peer_timeout(agreed)?;
    Ok((
        Session {
            control,
            fault,
            ack,
            hello,
        },
        status,
    ))
}

/// The page server settings, limited to what the destination accepted,
/// with the session's peer timeout.
pub(super) fn negotiated(server: &ServerConfig, ack: &HelloAck) -> ServerConfig {
    let mut cfg = server.clone();
    cfg.peer_timeout = session_peer_timeout(cfg.peer_timeout, ack.peer_timeout_ms);
    cfg.lz4 &= ack.features & features::LZ4 != 0;
    cfg.zero_runs &= ack.features & features::ZERO_RUNS != 0;
    cfg
}

/// Sends `State` and waits for the destination's `Ready`: it restored the
/// VM, which does not run until `Commit`.
pub(super) fn send_state(
    control: &mut Link,
    meta: &StateMeta,
    blob: &[u8],
    cancel: Option<&CancelGate>,
) -> Result<(), SourceError> {
    control.send(MsgType::State, 0, &encode_state(meta, blob))?;
    wait_for_ready(control, cancel)
}

/// How often the wait for `Ready` looks for a cancel.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Waits for `Ready` in short steps, so that a cancel accepted meanwhile
/// rolls the move back at once rather than after the destination answers
/// (the peer timeout still bounds the silence as a whole).
fn wait_for_ready(control: &mut Link, cancel: Option<&CancelGate>) -> Result<(), SourceError> {
    let mut last_heard = Instant::now();
    loop {
        check_cancel(cancel)?;
        if let Some(f) = control.poll(CANCEL_POLL, &mut last_heard)? {
            if f.header.kind == MsgType::Ready {
                return Ok(());
            }
            return Err(ProtocolError::Unexpected {
                got: f.header.kind,
                expected: "Ready",
            }
            .into());
        }
    }
}

/// The destination's statistics from its `Complete`, with ours added.
pub(super) fn final_stats(
    complete: serde_json::Value,
    server_stats: serde_json::Value,
    t0: Instant,
    recovery: &Recovery,
    dial: &Dial,
) -> Result<MigrationStats, SourceError> {
    let mut stats: MigrationStats =
        serde_json::from_value(complete).map_err(|e| ProtocolError::BadJson {
            what: "Complete",
            why: e.to_string(),
        })?;
    stats.source = serde_json::json!({
        "page_server": server_stats,
        "migration_ms": t0.elapsed().as_secs_f64() * 1e3,
        "recoveries": recovery.count,
        "recovery_ms": recovery.ms,
        "tcp_congestion": dial.congestion_in_use(),
    });
    Ok(stats)
}
