//! The destination's side of a resume handshake, with the test as the
//! source on socketpairs.

use std::io::Write;
use std::os::unix::net::UnixStream;

use ferry_protocol::{
    read_frame, write_frame, HelloAck, OPT_PEER_TIMEOUT, PAGE_SIZE, PROTOCOL_VERSION,
};
use ferry_transport::Conn;

use super::*;

const SESSION: u64 = 0x5e55;

/// A `Hello` frame of session `id` in `role` with every feature this build
/// has, and `RESUME` when `resume`, carrying `options`.
fn hello_frame(id: u64, role: Role, resume: bool, options: Vec<(u16, Vec<u8>)>) -> Vec<u8> {
    let h = Hello {
        version: PROTOCOL_VERSION,
        role,
        session_id: id,
        features: features::SUPPORTED | if resume { features::RESUME } else { 0 },
        mem_size: 64 << 20,
        vcpus: 1,
        page_size: PAGE_SIZE as u32,
        options,
    };
    let mut frame = Vec::new();
    write_frame(&mut frame, MsgType::Hello, 0, &h.encode()).unwrap();
    frame
}

/// A resume `Hello` of `SESSION` in `role` whose peer timeout option is
/// `timeout` (its raw bytes).
fn resume_hello(role: Role, timeout: &[u8]) -> Vec<u8> {
    hello_frame(
        SESSION,
        role,
        true,
        vec![(OPT_PEER_TIMEOUT, timeout.to_vec())],
    )
}

/// A `Hello` of session `id` in `role`, resuming or not, without options.
fn hello_of(id: u64, role: Role, resume: bool) -> Vec<u8> {
    hello_frame(id, role, resume, Vec::new())
}

/// Waits (10 s at most) for `SESSION`'s source to resume both connections
/// through `acceptor`, answering `Running` as a committed move's
/// destination does; returns the control and the fault link.
fn resume_running(acceptor: &Acceptor) -> (Link, Link) {
    let deadline = Instant::now() + Duration::from_secs(10);
    accept_resume(
        acceptor,
        SESSION,
        &Peer(None),
        deadline,
        ResumeStatus::Running,
    )
    .unwrap()
}

/// A resume whose peer timeout option is malformed is refused with an
/// `Abort` naming it, never `UnknownSession` (which would tell the source
/// to run its own copy of a VM this side holds); the source's next,
/// sound resume is answered `Running` with the session's peer timeout,
/// the shorter of the two sides' (300 ms against this side's 5 s), which
/// both of its links then enforce.
#[test]
fn a_resume_runs_with_the_shorter_peer_timeout_and_a_malformed_one_is_refused() {
    let pair = || UnixStream::pair().unwrap();
    let ((bad, mut bad_src), (ctl, mut ctl_src), (fault, mut fault_src)) = (pair(), pair(), pair());
    let acceptor = Acceptor::given(
        vec![Conn::Local(bad), Conn::Local(ctl), Conn::Local(fault)],
        Duration::from_secs(5),
    )
    .unwrap();
    bad_src
        .write_all(&resume_hello(Role::Control, &[1, 2, 3]))
        .unwrap();
    let ms = 300u32.to_le_bytes();
    ctl_src
        .write_all(&resume_hello(Role::Control, &ms))
        .unwrap();
    fault_src
        .write_all(&resume_hello(Role::Fault, &ms))
        .unwrap();
    let (ctl, fault) = resume_running(&acceptor);

    let mut buf = Vec::new();
    let refused = read_frame(&mut bad_src, &mut buf).unwrap_err().to_string();
    assert!(
        refused.contains("peer timeout option of 3 bytes"),
        "{refused}"
    );
    for src in [&mut ctl_src, &mut fault_src] {
        let head = read_frame(src, &mut buf).unwrap();
        assert_eq!(head.kind, MsgType::HelloAck);
        let ack = HelloAck::decode(&buf).unwrap();
        assert_eq!(ack.status, ResumeStatus::Running as u32);
        assert_eq!(ack.peer_timeout_ms, Some(300));
    }
    let agreed = Duration::from_millis(300);
    assert_eq!((ctl.peer_timeout(), fault.peer_timeout()), (agreed, agreed));
}

/// A resume that breaks off after its control connection was answered
/// (the source never opened the fault connection, say because the link
/// died again) is dropped when the source starts over: the new control
/// connection is answered `Running`, not `UnknownSession`, which would make
/// a source that never saw `Resumed` run its own copy of the VM this side
/// runs. The new attempt's fault connection completes the resume.
#[test]
fn a_resume_started_over_is_taken_not_refused() {
    let pair = || UnixStream::pair().unwrap();
    let ((first, mut first_src), (again, mut again_src), (fault, mut fault_src)) =
        (pair(), pair(), pair());
    let acceptor = Acceptor::given(
        vec![Conn::Local(first), Conn::Local(again), Conn::Local(fault)],
        Duration::from_secs(5),
    )
    .unwrap();
    // The source: each step after the destination answered the last one.
    let source = std::thread::spawn(move || {
        let ms = 5000u32.to_le_bytes();
        let mut statuses = Vec::new();
        let mut buf = Vec::new();
        for (src, role) in [
            (&mut first_src, Role::Control),
            (&mut again_src, Role::Control),
            (&mut fault_src, Role::Fault),
        ] {
            src.write_all(&resume_hello(role, &ms)).unwrap();
            let head = read_frame(src, &mut buf).unwrap();
            assert_eq!(head.kind, MsgType::HelloAck);
            statuses.push(HelloAck::decode(&buf).unwrap().status);
        }
        (statuses, again_src)
    });
    let (mut ctl, _fault) = resume_running(&acceptor);
    let (statuses, mut again_src) = source.join().unwrap();
    assert_eq!(statuses, [ResumeStatus::Running as u32; 3]);
    // The link handed back is the second attempt's (`recv` skips pings).
    write_frame(&mut again_src, MsgType::Commit, 0, &[]).unwrap();
    assert_eq!(ctl.recv().unwrap().header.kind, MsgType::Commit);
}

/// What the destination answered on `src`: the `HelloAck`'s status, or the
/// `Abort`'s reason.
fn answer_on(src: &mut UnixStream) -> Result<u32, String> {
    let mut buf = Vec::new();
    match read_frame(src, &mut buf) {
        Ok(h) => {
            assert_eq!(h.kind, MsgType::HelloAck);
            Ok(HelloAck::decode(&buf).unwrap().status)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A process that holds no session cannot know that a session it is asked
/// to resume never ran here (it may have been restarted since), so it
/// refuses with `Abort` and never says `UnknownSession`, which would make
/// that session's source run its own copy. The listener then takes a new
/// session as usual.
#[test]
fn a_resume_of_a_session_this_process_never_held_is_refused_not_denied() {
    let pair = || UnixStream::pair().unwrap();
    let ((resume, mut resume_src), (new, mut new_src)) = (pair(), pair());
    let acceptor = Acceptor::given(
        vec![Conn::Local(resume), Conn::Local(new)],
        Duration::from_secs(5),
    )
    .unwrap();
    resume_src
        .write_all(&hello_of(SESSION, Role::Control, true))
        .unwrap();
    new_src
        .write_all(&hello_of(7, Role::Control, false))
        .unwrap();
    let (_link, hello) = accept_new(&acceptor, &DestOptions::default()).unwrap();
    assert_eq!(hello.session_id, 7);
    let refused = answer_on(&mut resume_src).unwrap_err();
    assert!(
        refused.contains("session 0x5e55 is not taken here")
            && refused.contains("no word on whether the VM ran here"),
        "{refused}"
    );
}

/// After discarding a VM that never ran, the destination tells that
/// session's source so (`UnknownSession`: it then runs its own copy) and
/// only it: a resume of another session is refused with `Abort`.
#[test]
fn a_discarded_session_hears_unknown_session_and_only_it() {
    let pair = || UnixStream::pair().unwrap();
    let ((other, mut other_src), (ours, mut ours_src)) = (pair(), pair());
    let acceptor = Acceptor::given(
        vec![Conn::Local(other), Conn::Local(ours)],
        Duration::from_secs(5),
    )
    .unwrap();
    other_src
        .write_all(&hello_of(SESSION + 1, Role::Control, true))
        .unwrap();
    ours_src
        .write_all(&hello_of(SESSION, Role::Control, true))
        .unwrap();
    let t = Instant::now();
    tell_discarded(&acceptor, SESSION, &Peer(None), Duration::from_secs(30));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "it waited out the window after telling the source"
    );
    let refused = answer_on(&mut other_src).unwrap_err();
    assert!(refused.contains("its VM was discarded here"), "{refused}");
    assert_eq!(
        answer_on(&mut ours_src),
        Ok(ResumeStatus::UnknownSession as u32)
    );
}
