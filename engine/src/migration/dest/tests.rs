//! The destination's side of a resume handshake, with the test as the
//! source on socketpairs.

use std::io::Write;
use std::os::unix::net::UnixStream;

use ferry_protocol::{read_frame, write_frame, OPT_PEER_TIMEOUT, PAGE_SIZE};

use super::*;

const SESSION: u64 = 0x5e55;

/// A resume `Hello` of `SESSION` in `role` whose peer timeout option is
/// `timeout` (its raw bytes).
fn resume_hello(role: Role, timeout: &[u8]) -> Vec<u8> {
    let h = Hello {
        version: PROTOCOL_VERSION,
        role,
        session_id: SESSION,
        features: features::SUPPORTED | features::RESUME,
        mem_size: 1 << 30,
        vcpus: 1,
        page_size: PAGE_SIZE as u32,
        options: vec![(OPT_PEER_TIMEOUT, timeout.to_vec())],
    };
    let mut frame = Vec::new();
    write_frame(&mut frame, MsgType::Hello, 0, &h.encode()).unwrap();
    frame
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
