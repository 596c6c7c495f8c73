//! How the destination takes connections: a new session's control
//! connection (admission), a session's fault connection, a source's resume
//! of both, and the answers to everyone else. The rule that keeps one copy
//! of a VM running lives here: only [`tell_discarded`] ever answers
//! `UnknownSession`.

use std::time::{Duration, Instant};

use ferry_protocol::{
    abort_reason, features, peer_timeout_ms, session_peer_timeout, Hello, HelloAck, MsgType,
    ResumeStatus, Role, PROTOCOL_VERSION,
};
use ferry_transport::Conn;
use tracing::{info, warn};

use super::super::acceptor::Acceptor;
use super::super::admission::check_hello;
use super::super::error::DestError;
use super::super::link::Link;
use super::DestOptions;

/// Waits for the control connection of a new session whose `Hello` passes
/// admission ([`check_hello`]). Stray connections (garbage, resumes of
/// sessions this side does not hold, `Hello`s this host cannot take) are
/// answered and dropped; they never end the wait.
pub(super) fn accept_new(
    acceptor: &Acceptor,
    opts: &DestOptions,
) -> Result<(Link, Hello), DestError> {
    let deadline = opts.accept_timeout.map(|t| Instant::now() + t);
    loop {
        let Some((link, hello)) = acceptor.next_hello(deadline)? else {
            return Err(DestError::Refused("no migration arrived".into()));
        };
        if hello.features & features::RESUME != 0 {
            warn!(
                session = hello.session_id,
                "a source asks to resume a session this side does not hold"
            );
            refuse_stranger(&link, &hello, "no session is open here");
            continue;
        }
        if hello.role != Role::Control {
            warn!("refused a {:?} connection with no session", hello.role);
            let _ = link.send(MsgType::Abort, 0, b"no session is open");
            continue;
        }
        if opts.expect_session.is_some_and(|s| s != hello.session_id) {
            warn!(
                session = hello.session_id,
                "refused a session this side does not expect"
            );
            let _ = link.send(MsgType::Abort, 0, b"unexpected session");
            continue;
        }
        if let Err(e) = check_hello(&hello) {
            let _ = link.send(MsgType::Abort, 0, e.to_string().as_bytes());
            // The one session this side expects (an in-process lazy
            // restore's) ends the wait with the reason; a listener goes on.
            if opts.expect_session.is_some() {
                return Err(e);
            }
            warn!(peer = %link.stream.peer(), "refused a connection: {e}");
            continue;
        }
        let over = match &link.stream {
            Conn::Tls(_) => "mutual TLS",
            Conn::Plain(_) => "plain TCP",
            Conn::Local(_) => "a socketpair",
        };
        info!(peer = %link.stream.peer(), "incoming migration over {over}");
        return Ok((link, hello));
    }
}

/// The certificate of a session's peer (None without TLS).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Peer(pub(super) Option<Vec<u8>>);

impl Peer {
    /// True when `link` comes from this peer: the same certificate.
    pub(super) fn is(&self, link: &Link) -> bool {
        self.0.as_deref() == link.peer_certificate()
    }
}

/// Waits for a connection of `role` in `session`, from `peer`; others are
/// refused and logged, and never replace it. With `restarts` (a resume
/// waiting for its fault connection), a resume `Hello` of the session's
/// control connection from `peer` is handed back as well: the source
/// started its resume over.
pub(super) fn accept_role(
    acceptor: &Acceptor,
    role: Role,
    session: u64,
    peer: &Peer,
    deadline: Instant,
    restarts: bool,
) -> Result<(Link, Hello), DestError> {
    loop {
        let Some((link, hello)) = acceptor.next_hello(Some(deadline))? else {
            return Err(DestError::Refused(format!(
                "the {role:?} connection of the session never came"
            )));
        };
        // The caller tells a restarted resume apart by its role.
        let restart =
            restarts && hello.role == Role::Control && hello.features & features::RESUME != 0;
        if (hello.role == role || restart) && hello.session_id == session {
            if peer.is(&link) {
                return Ok((link, hello));
            }
            warn!(
                session,
                role = ?hello.role,
                "refused a connection naming this session from another certificate"
            );
            refuse_stranger(&link, &hello, "the session's peer had another certificate");
            continue;
        }
        warn!(
            session = hello.session_id,
            role = ?hello.role,
            "refused a connection that is not this session's {role:?} connection"
        );
        refuse_stranger(&link, &hello, "this side is busy with another session");
    }
}

/// Waits until `deadline` for the source of `session` to reconnect both
/// connections with resume `Hello`s, from `peer`'s certificate; answers
/// each with `status`. A resume that breaks off half-way (its control
/// connection answered, its fault connection never opened, or a link that
/// fails while it is answered) is dropped, and the source's next attempt
/// is taken: it is never told `UnknownSession`, which would make a source
/// that did not see `Resumed` run its own copy of a VM this side holds.
pub(super) fn accept_resume(
    acceptor: &Acceptor,
    session: u64,
    peer: &Peer,
    deadline: Instant,
    status: ResumeStatus,
) -> Result<(Link, Link), DestError> {
    let window = deadline.saturating_duration_since(Instant::now());
    // A control connection that came while an earlier attempt waited for
    // its fault connection: the source started over.
    let mut restarted = None;
    loop {
        let next = match restarted.take() {
            Some(c) => Some(c),
            None => acceptor.next_hello(Some(deadline))?,
        };
        let Some((ctl, hello)) = next else {
            return Err(DestError::RecoveryTimeout(window));
        };
        let named = hello.session_id == session && hello.features & features::RESUME != 0;
        let ours = named && peer.is(&ctl);
        if named && !ours {
            warn!(
                session,
                "refused a resume of this session from another certificate"
            );
            refuse_stranger(&ctl, &hello, "the session's peer had another certificate");
            continue;
        }
        if !ours || hello.role != Role::Control {
            warn!(
                session = hello.session_id,
                "refused a connection while waiting for session {session} to resume"
            );
            refuse_stranger(&ctl, &hello, "this side is busy with another session");
            continue;
        }
        let told = match hello.peer_timeout_ms() {
            Ok(t) => t,
            Err(e) => {
                // Not `UnknownSession`: that would tell the source to run
                // its own copy of a VM this side holds.
                warn!(session, "refused a resume of this session: {e}");
                let _ = ctl.send(MsgType::Abort, 0, e.to_string().as_bytes());
                continue;
            }
        };
        let mut ctl = ctl;
        let accepted = hello.features & features::SUPPORTED;
        let agreed = session_peer_timeout(ctl.peer_timeout(), told);
        if let Err(e) = answer(&mut ctl, agreed, &hello, accepted, status) {
            warn!(session, "a resume's control connection failed: {e}");
            continue;
        }
        let (mut fault, fhello) =
            match accept_role(acceptor, Role::Fault, session, peer, deadline, true) {
                Ok((link, h)) if h.role == Role::Control => {
                    info!(session, "the source started its resume over");
                    restarted = Some((link, h));
                    continue;
                }
                Ok(f) => f,
                Err(e) => {
                    warn!("the resumed session's fault connection never came: {e}");
                    continue;
                }
            };
        if let Err(e) = answer(&mut fault, agreed, &fhello, accepted, status) {
            warn!(session, "a resume's fault connection failed: {e}");
            continue;
        }
        info!(session, ?status, "source reconnected to the session");
        return Ok((ctl, fault));
    }
}

/// Refuses a connection that is not the one awaited (a resume of a session
/// this process does not hold, or holds for another peer; a new session
/// while one runs) with `Abort` and why, never with `UnknownSession`. That
/// answer tells a source its VM never ran here, which lets it run its own
/// copy, and this process cannot know it of a session it does not hold:
/// it may have been restarted since it ran it. Only [`tell_discarded`]
/// says it, of the one session this process discarded itself.
pub(super) fn refuse_stranger(link: &Link, hello: &Hello, why: &str) {
    let why = format!(
        "session {:#x} is not taken here: {why} (this is no word on whether the VM ran here)",
        hello.session_id
    );
    let _ = link.send(MsgType::Abort, 0, abort_reason(&why));
}

/// After this process discarded `session`'s VM without any vCPU having run
/// it (the switch-over never committed, or its devices could not start):
/// for up to `window`, answers the session's source, a resume of its
/// control connection from `peer`, with `UnknownSession`, so that it runs
/// its own copy rather than wait out its recovery window and strand. Returns
/// once the source has been told, or when the window ends; anything else
/// that comes meanwhile is refused.
pub(super) fn tell_discarded(acceptor: &Acceptor, session: u64, peer: &Peer, window: Duration) {
    let deadline = Instant::now() + window;
    loop {
        let (link, hello) = match acceptor.next_hello(Some(deadline)) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                warn!(
                    session,
                    "stopped waiting for the source of the discarded VM: {e}"
                );
                return;
            }
        };
        let resume = hello.features & features::RESUME != 0;
        if resume && hello.session_id == session && hello.role == Role::Control && peer.is(&link) {
            match ack(&link, &hello, 0, ResumeStatus::UnknownSession) {
                Ok(()) => {
                    info!(
                        session,
                        "told the source that the VM never ran here: it runs its own copy"
                    );
                    return;
                }
                Err(e) => warn!(session, "could not tell the source: {e}"),
            }
            continue;
        }
        refuse_stranger(&link, &hello, "its VM was discarded here");
    }
}

/// Gives `link` the session's peer timeout `agreed`, then answers `hello`
/// on it ([`ack`], which tells the source that timeout).
pub(super) fn answer(
    link: &mut Link,
    agreed: Duration,
    hello: &Hello,
    features: u64,
    status: ResumeStatus,
) -> Result<(), DestError> {
    link.set_peer_timeout(agreed)?;
    ack(link, hello, features, status)
}

/// Answers `hello` on `link`; with `PEER_TIMEOUT` among `features` the
/// answer carries the link's peer timeout (this side's, or already the
/// session's: the source takes the shorter of it and its own either way).
pub(super) fn ack(
    link: &Link,
    hello: &Hello,
    features: u64,
    status: ResumeStatus,
) -> Result<(), DestError> {
    let a = HelloAck {
        version: PROTOCOL_VERSION,
        status: status as u32,
        features,
        session_id: hello.session_id,
        peer_timeout_ms: (features & features::PEER_TIMEOUT != 0)
            .then(|| peer_timeout_ms(link.peer_timeout())),
    };
    link.send(MsgType::HelloAck, 0, &a.encode())?;
    Ok(())
}
