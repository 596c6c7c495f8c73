//! A migration that fails before the switch-over loses nothing: the source
//! resumes its VM and keeps running it. The destination here is a fake that
//! speaks the real protocol up to the State frame, then aborts.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use ferry_protocol::{read_frame, write_frame, Hello, HelloAck, MsgType, PROTOCOL_VERSION};

/// Accepts both connections, acknowledges both Hellos, waits for the State
/// (the source is paused by then), and aborts.
fn aborting_destination(listener: TcpListener) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let h = read_frame(&mut s, &mut buf).unwrap();
            assert_eq!(h.kind, MsgType::Hello);
            let hello = Hello::decode(&buf).unwrap();
            let ack = HelloAck {
                version: PROTOCOL_VERSION,
                status: 0,
                features: 0,
                session_id: hello.session_id,
                peer_timeout_ms: None,
            };
            write_frame(&mut s, MsgType::HelloAck, 0, &ack.encode()).unwrap();
            conns.push(s);
        }
        let control = &mut conns[0];
        let got_state = loop {
            match read_frame(control, &mut buf) {
                Ok(h) if h.kind == MsgType::State => break true,
                Ok(_) => continue,
                Err(_) => break false,
            }
        };
        write_frame(control, MsgType::Abort, 0, b"destination out of memory").unwrap();
        got_state
    })
}

#[test]
fn failed_switch_over_resumes_the_vm_on_the_source() {
    let dir = Scratch::new("rollback");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = aborting_destination(listener);
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(
        &dir,
        "256M",
        2,
        "ws=32M write=80 report_ms=50",
        &["--migrate-to", &addr, "--after", "1s"],
    );
    assert!(fake.join().unwrap(), "the source never sent its state");
    let err = dir.path("src.err");
    wait_for(WAIT, "the source to report the failure", || {
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        e.contains("the VM was resumed on the source").then_some(())
    });
    let aborted_at = read_console(&log).len();
    // The guest goes on ticking on the source, with nothing lost.
    let after = wait_lines(
        &log,
        aborted_at + 8,
        Duration::from_secs(30),
        "ticks after the rollback",
    );
    assert!(bad_lines(&after).is_empty(), "{:?}", bad_lines(&after));
    assert_progress(&after, 2);
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    assert!(std::fs::read_to_string(&err)
        .unwrap()
        .contains("destination out of memory"));
    ctl(&sock, &["quit"]);
}

/// Garbage on the migration port is refused with a clear reason, not a
/// panic, and the listener keeps listening: a real migration afterwards
/// goes through.
#[test]
fn destination_refuses_garbage_and_keeps_listening() {
    use std::io::Write;
    let dir = Scratch::new("garbage");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    for (name, bytes, why) in [
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "unknown frame type",
        ),
        (
            "huge-frame",
            [1u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0].to_vec(),
            "Hello frame with 4294967295-byte payload",
        ),
        (
            "short-hello",
            [
                1u8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'F', b'E', b'R', b'R', b'Y',
                b'M', b'I', b'G',
            ]
            .to_vec(),
            "Hello frame with 8-byte payload",
        ),
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        let mut buf = Vec::new();
        let err = read_frame(&mut s, &mut buf).unwrap_err().to_string();
        assert!(err.contains(why), "{name}: {err}");
        assert!(
            dst.0.try_wait().unwrap().is_none(),
            "{name}: the listener died"
        );
    }
    // The real migration still gets through.
    migrate_through(&dir, &addr);
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("refused a connection").count(), 3, "{err}");
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

/// Hellos this host cannot take are refused before any VM is built, each
/// with a clear error, and the destination keeps listening: a guest larger
/// than the host, and a peer timeout option of the wrong size. A real
/// migration then gets through.
#[test]
fn destination_refuses_a_guest_larger_than_the_host() {
    use ferry_protocol::{features, Role, OPT_PEER_TIMEOUT, PAGE_SIZE};
    let dir = Scratch::new("toolarge");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id: 1,
        features: features::LZ4 | features::ZERO_RUNS,
        mem_size: 1 << 40,
        vcpus: 1,
        page_size: PAGE_SIZE as u32,
        options: Vec::new(),
    };
    let bad_timeout = Hello {
        mem_size: 64 << 20,
        features: features::SUPPORTED,
        options: vec![(OPT_PEER_TIMEOUT, vec![0, 1, 0])],
        ..hello.clone()
    };
    for (hello, why) in [
        (hello, "does not fit this host"),
        (bad_timeout, "peer timeout option of 3 bytes (4)"),
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write_frame(&mut s, MsgType::Hello, 0, &hello.encode()).unwrap();
        let mut buf = Vec::new();
        let err = read_frame(&mut s, &mut buf).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
    migrate_through(&dir, &addr);
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert_eq!(err.matches("refused a connection").count(), 2, "{err}");
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

/// 200 hostile connections at once (half of them silent and held open, the
/// rest garbage, hand-built Hellos that resume sessions this side does not
/// hold, fault connections with no session, or closed at once) are all
/// refused, and a real migration right after them goes through.
#[test]
fn two_hundred_hostile_connections_then_a_real_migration() {
    let dir = Scratch::new("flood");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let held = common::hostile::hostile_connections(&addr, 200);
    assert!(held.len() >= 90, "only {} silent connections", held.len());
    migrate_through(&dir, &addr);
    drop(held);
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.matches("refused a connection").count() >= 50,
        "the hostile connections were not refused: {err}"
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

/// As many slow strangers as there are handshake slots (64), one in two
/// trickling a `Hello` a byte every 500 ms and the others sending a `Ping`
/// every 1.5 s, each well within a 2 s wait per read, are cut off at the
/// 2 s handshake deadline (or at their first `Ping`) with an `Abort` that
/// says why, and a real migration that connects after them goes through.
/// They used to keep their slots for as long as they went on, and the
/// source's `Hello` waited in the backlog until it gave up.
#[test]
fn slow_strangers_in_every_handshake_slot_then_a_real_migration() {
    let dir = Scratch::new("slow-hello");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let slow = common::hostile::slow_hello_connections(&addr, 64, Duration::from_secs(40));
    assert_eq!(slow.len(), 64);
    migrate_through(&dir, &addr);
    for peer in slow {
        let why = peer.join().unwrap().expect("an answer to a slow stranger");
        assert!(
            why.contains("too slow to send its Hello")
                || why.contains("unexpected Ping frame, expected Hello"),
            "{why}"
        );
    }
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.matches("too slow to send its Hello").count(),
        32,
        "{err}"
    );
    assert_eq!(err.matches("unexpected Ping frame").count(), 32, "{err}");
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

/// Without TLS, `ferry-dest` listens only on loopback: any other address
/// needs `--insecure`, and the error says why.
#[test]
fn destination_refuses_a_public_listen_address_without_insecure() {
    let dir = Scratch::new("insecure");
    let mut dst = spawn(
        "ferry-dest",
        &["--listen", "0.0.0.0:0"],
        &dir.path("dst.err"),
    );
    let st = wait_for(WAIT, "ferry-dest to refuse", || dst.0.try_wait().unwrap());
    assert!(!st.success());
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("needs --insecure"), "{err}");
    let (mut ok, _) = spawn_dest(&dir, "ok", &["--insecure"]);
    assert!(
        ok.0.try_wait().unwrap().is_none(),
        "loopback with --insecure"
    );
    let _ = ok.0.kill();
}

/// The control API socket is the owner's alone (mode 0600).
#[test]
fn api_socket_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("apimode");
    let (mut dst, _) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let sock = dir.path("dst.sock");
    let mode = wait_for(WAIT, "the API socket", || {
        std::fs::metadata(&sock)
            .ok()
            .map(|m| m.permissions().mode())
    });
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let _ = dst.0.kill();
}

/// A real migration to the destination at `addr` (whose logs are in `dir`)
/// goes through: the source finishes and the guest continues there.
fn migrate_through(dir: &Scratch, addr: &str) {
    let args = source_args(dir, "256M", 1, "ws=32M report_ms=50", addr, "1s");
    run_source_move(dir, &args);
}

/// `ferry-source --migrate-to ADDR --after DUR` also takes API requests
/// while it waits: a `migrate` request that moves the VM before DUR is up
/// ends the process (it used to go on serving a VM that ran elsewhere), and
/// so does a `quit` (it used to be ignored until DUR was up).
#[test]
fn requests_before_after_is_up_end_the_source() {
    // A source in `dir` that would move to `addr` only after an hour.
    let waiting_source = |dir: &Scratch, addr: &str| {
        let mut args = source_args(dir, "256M", 1, "ws=32M report_ms=50", addr, "60m");
        args.extend(["--api".into(), dir.path("src.sock").display().to_string()]);
        let src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
        (src, wait_ticks(&dir.path("src.log"), 1, 2, WAIT))
    };
    let err = |dir: &Scratch| std::fs::read_to_string(dir.path("src.err")).unwrap_or_default();

    let dir = Scratch::new("early-migrate");
    let (_dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let (mut src, before) = waiting_source(&dir, &addr);
    ctl(&dir.path("src.sock"), &["migrate", &addr]);
    assert!(
        wait_exit(&mut src, WAIT, "the moved source to exit"),
        "{}",
        err(&dir)
    );
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&before, &after, 1);
    assert_eq!(
        ctl(&dir.path("dst.sock"), &["status"])["run_state"],
        "running"
    );

    let dir = Scratch::new("early-quit");
    let (mut src, _) = waiting_source(&dir, "127.0.0.1:9");
    ctl(&dir.path("src.sock"), &["quit"]);
    assert!(
        wait_exit(&mut src, WAIT, "the source to quit"),
        "{}",
        err(&dir)
    );
}
