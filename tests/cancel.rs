//! `ferry-ctl cancel` (QEMU's `migrate_cancel`): a migration out that has
//! not committed its switch-over rolls back. The VM goes on running on the
//! source with nothing lost, and the destination is told to discard its
//! copy at once. From `Commit` on a cancel is refused and the move
//! finishes.

mod common;

use std::net::TcpListener;
use std::sync::mpsc;

use common::*;
use ferry_protocol::{read_frame, write_frame, Hello, HelloAck, MsgType, PROTOCOL_VERSION};

/// A stand-in destination: acknowledges both Hellos, reads up to the
/// `State` (the source's VM is paused by then and waits for `Ready`), says
/// so on `got_state`, never sends `Ready`, and returns the reason of the
/// `Abort` the source sends next.
fn destination_that_never_gets_ready(
    listener: TcpListener,
    got_state: mpsc::Sender<()>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(read_frame(&mut s, &mut buf).unwrap().kind, MsgType::Hello);
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
        loop {
            match read_frame(control, &mut buf) {
                Ok(h) if h.kind == MsgType::State => break,
                Ok(_) => {}
                Err(e) => panic!("the source closed before its state: {e}"),
            }
        }
        got_state.send(()).unwrap();
        // The source's peer timeout is 30 s: it stays for the cancel.
        match read_frame(control, &mut buf) {
            Err(e) => e.to_string(),
            Ok(h) => panic!("the source sent {:?} instead of Abort", h.kind),
        }
    })
}

/// The hardest point to cancel at: the VM is paused and its state is with
/// the destination, which has not answered `Ready`. The cancel is taken at
/// once, the VM runs again on the source with its memory intact, and the
/// destination hears `Abort` naming the cancel.
#[test]
fn a_cancel_while_the_destination_restores_rolls_back() {
    let dir = Scratch::new("cancel-ready");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, got_state) = mpsc::channel();
    let fake = destination_that_never_gets_ready(listener, tx);
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(
        &dir,
        "256M",
        2,
        "ws=32M write=80 report_ms=50",
        &["--peer-timeout", "30s"],
    );
    wait_ticks(&log, 2, 2, WAIT);
    let mut migrate = migrate_once_ticking(&dir, &addr);
    let ctl_err = dir.path("ctl.err");
    got_state.recv_timeout(WAIT).unwrap();
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "migrating", "{status}");
    assert_eq!(status["migration"]["stage"], "switching", "{status}");
    let cancel = ctl(&sock, &["cancel"]);
    assert_eq!(cancel["cancelled"], true, "{cancel}");

    let told = fake.join().unwrap();
    assert!(
        told.contains("peer aborted the migration")
            && told.contains("cancelled before the switch-over"),
        "{told}"
    );
    assert!(!wait_exit(&mut migrate, WAIT, "the migrate call to end"));
    let why = std::fs::read_to_string(&ctl_err).unwrap();
    assert!(
        why.contains("the VM was resumed on the source: cancelled"),
        "{why}"
    );
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    assert_eq!(status["migration"]["stage"], "failed", "{status}");
    let seen = read_console(&log).len();
    let after = wait_lines(&log, seen + 8, WAIT, "ticks after the cancel");
    assert!(bad_lines(&after).is_empty(), "{:?}", bad_lines(&after));
    assert_progress(&after, 2);
    // Nothing is left to cancel.
    let refused = ctl_refused(&sock, &["cancel"]);
    assert!(refused.contains("no migration out to cancel"), "{refused}");
    ctl(&sock, &["quit"]);
}

/// A pre-copy move cancelled in its rounds: the real destination discards
/// its copy and ends at once (it does not wait out its recovery window),
/// the VM runs on, and a later move of the same VM goes through with its
/// memory intact.
#[test]
fn a_cancelled_precopy_leaves_the_vm_running_and_it_moves_later() {
    let dir = Scratch::new("cancel-precopy");
    let (mut first, first_addr) = spawn_dest(
        &dir,
        "first",
        &strs(&io_args(&dir, "first", &["--recovery-window", "10m"])),
    );
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(&dir, "512M", 1, "ws=128M write=80 report_ms=50", &[]);
    wait_ticks(&log, 1, 2, WAIT);
    let mut migrate = migrate_once_ticking_with(
        &dir,
        &first_addr,
        &["--mode", "precopy", "--max-bandwidth", "20M"],
    );
    let ctl_err = dir.path("ctl.err");
    // Under way: some pages of the first pass have gone.
    wait_status(&sock, "pre-copy under way", |s| {
        s["migration"]["stage"] == "precopy"
            && s["migration"]["pages_done"].as_u64().unwrap_or(0) > 1000
    });
    let cancel = ctl(&sock, &["cancel"]);
    assert_eq!(cancel["cancelled"], true, "{cancel}");
    assert!(!wait_exit(&mut migrate, WAIT, "the migrate call to end"));
    let why = std::fs::read_to_string(&ctl_err).unwrap();
    assert!(why.contains("cancelled before the switch-over"), "{why}");
    // The destination ends with the source's reason, well inside its
    // ten-minute recovery window.
    assert!(!wait_exit(&mut first, WAIT, "the first destination to end"));
    let dst_err = std::fs::read_to_string(dir.path("first.err")).unwrap();
    assert!(
        dst_err.contains("peer aborted the migration")
            && dst_err.contains("cancelled before the switch-over"),
        "{dst_err}"
    );
    assert_source_goes_on(&dir);

    // The same VM moves afterwards, and its guest finds every page it
    // wrote (no BAD) on the new host.
    let (mut second, second_addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let mut moved = migrate_once_ticking(&dir, &second_addr);
    assert!(wait_exit(&mut moved, WAIT, "the second move"));
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&read_console(&log), &after, 1);
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut second, WAIT, "the destination to quit"));
}

/// A stop-and-copy move under a cap of 1 byte/s, its VM paused for a copy
/// that would take years, is cancelled: the sender, which naps at most
/// 100 ms at a time while over its cap and looks for a cancel between
/// naps, rolls back at once and the VM runs on here. It used to sleep
/// until the cap allowed its next frame (12 days after the first 1 MiB):
/// the cancel was taken, and the VM stayed paused.
#[test]
fn a_cancel_reaches_a_paused_copy_held_back_by_a_tiny_bandwidth_cap() {
    let dir = Scratch::new("cancel-capped");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(&dir, "256M", 1, "ws=32M write=80 report_ms=50", &[]);
    wait_ticks(&log, 1, 2, WAIT);
    let mut migrate = migrate_once_ticking_with(
        &dir,
        &addr,
        &["--mode", "stop-and-copy", "--max-bandwidth", "1"],
    );
    let ctl_err = dir.path("ctl.err");
    let status = wait_status(&sock, "the paused copy under way", |s| {
        s["migration"]["phase"] == "stop-and-copy"
            && s["migration"]["pages_done"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(status["run_state"], "migrating", "{status}");
    let cancel = ctl(&sock, &["cancel"]);
    assert_eq!(cancel["cancelled"], true, "{cancel}");
    assert!(!wait_exit(&mut migrate, WAIT, "the migrate call to end"));
    let why = std::fs::read_to_string(&ctl_err).unwrap();
    assert!(
        why.contains("the VM was resumed on the source: cancelled"),
        "{why}"
    );
    assert_source_goes_on(&dir);
    assert!(!wait_exit(&mut dst, WAIT, "the destination to end"));
    let dst_err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(
        dst_err.contains("cancelled before the switch-over"),
        "{dst_err}"
    );
    ctl(&sock, &["quit"]);
}

/// Once the switch-over has committed, the destination runs the VM: a
/// cancel is refused, saying so, and the move completes with the guest
/// intact.
#[test]
fn a_cancel_after_the_switch_over_is_refused() {
    let dir = Scratch::new("cancel-late");
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let mut src = spawn_guest_source(&dir, "512M", 1, "ws=256M write=80 report_ms=50", &[]);
    wait_ticks(&log, 1, 2, WAIT);
    let mut moved = migrate_once_ticking_with(&dir, &addr, &["--max-bandwidth", "40M"]);
    wait_stage(&sock, "postcopy");
    let refused = ctl_refused(&sock, &["cancel"]);
    assert!(
        refused.contains("too late to cancel: the switch-over has committed"),
        "{refused}"
    );
    assert!(wait_exit(&mut moved, WAIT, "the move to complete"));
    assert!(wait_exit(&mut src, WAIT, "the source to end"));
    let stats = wait_stats(&dir.path("dst.json"), WAIT);
    assert_eq!(stats["recoveries"], 0, "{stats}");
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&read_console(&log), &after, 1);
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}
