//! `ferry-dest --listen ADDR --daemon --run-dir DIR`: one listener takes
//! migration after migration, and each incoming VM runs in a process of
//! its own with its own API socket; strangers never start a process.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use ferry_protocol::{features, read_frame, write_frame, Hello, MsgType, Redirect};

const GUEST: &str = "ws=32M write=50 report_ms=50";

/// Runs the workload guest in a `ferry-source` (console `dir/NAME.log`,
/// stderr `dir/NAME.err`) that moves it to `addr` after 1 s, and waits
/// until that source finished the move; returns the two paths.
fn move_one_vm(dir: &Scratch, name: &str, addr: &str) -> (PathBuf, PathBuf) {
    let (log, err) = (
        dir.path(&format!("{name}.log")),
        dir.path(&format!("{name}.err")),
    );
    let args = [
        "--mem",
        "256M",
        "--vcpus",
        "1",
        "--guest-args",
        GUEST,
        "--serial",
        log.to_str().unwrap(),
        "--migrate-to",
        addr,
        "--after",
        "1s",
    ];
    let mut src = spawn("ferry-source", &args, &err);
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "{name}: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    (log, err)
}

#[test]
fn hostile_connections_then_three_migrations_each_in_its_own_process() {
    let dir = Scratch::new("daemon");
    let run = dir.path("run");
    let (mut daemon, addr) = spawn_dest(
        &dir,
        "daemon",
        &["--daemon", "--run-dir", run.to_str().unwrap()],
    );
    let daemon_err = dir.path("daemon.err");

    // Strangers: 200 hostile connections (half of them held open, silent,
    // through the migrations below), a hand-built Hello from a peer that
    // does not follow redirects, and one for a guest larger than the host.
    let held = hostile::hostile_connections(&addr, 200);
    assert!(held.len() >= 90, "only {} silent connections", held.len());
    let no_redirect = hand_built(features::LZ4 | features::ZERO_RUNS, 256 << 20);
    let e = send_hello(&addr, &no_redirect).unwrap_err();
    assert!(e.contains("does not follow redirects"), "{e}");
    let too_big = hand_built(features::SUPPORTED, 1 << 40);
    let e = send_hello(&addr, &too_big).unwrap_err();
    assert!(e.contains("does not fit this host"), "{e}");
    assert!(
        daemon_records(&run).is_empty(),
        "a stranger got a VM process"
    );
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon died");
    let mode = std::fs::metadata(&run).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");

    // Three migrations in a row, each to a VM process of its own.
    let mut vms: Vec<serde_json::Value> = Vec::new();
    for i in 0..3 {
        let (log, err) = move_one_vm(&dir, &format!("src{i}"), &addr);
        let source_err = std::fs::read_to_string(&err).unwrap();
        assert!(
            source_err.contains("sent this session to the VM's own process"),
            "{source_err}"
        );
        let vm = wait_for(WAIT, "the new VM's record", || {
            daemon_records(&run)
                .into_iter()
                .find(|r| !vms.iter().any(|v| v["vm"] == r["vm"]))
        });
        eprintln!("migration {i}: {vm}");
        let serial = Path::new(vm["serial"].as_str().unwrap()).to_path_buf();
        let after = wait_ticks(&serial, 1, 3, WAIT);
        assert_continues(&read_console(&log), &after, 1);
        wait_stats(Path::new(vm["stats"].as_str().unwrap()), WAIT);
        vms.push(vm);
    }
    drop(held);

    // Three processes, three API sockets (0600), each answering `status`
    // for a running guest that ticks on and never saw a BAD line.
    let pids: Vec<u64> = vms.iter().map(|v| v["pid"].as_u64().unwrap()).collect();
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );
    assert!(!pids.contains(&u64::from(daemon.0.id())), "{pids:?}");
    for vm in &vms {
        let sock = Path::new(vm["api"].as_str().unwrap());
        let mode = std::fs::metadata(sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", sock.display());
        let ticks_before = ctl(sock, &["status"])["guest"]["ticks"].as_u64().unwrap();
        let status = wait_status(sock, "the guest to tick on", |s| {
            s["guest"]["ticks"].as_u64().unwrap_or(0) > ticks_before
        });
        assert_eq!(status["run_state"], "running", "{status}");
        assert_eq!(status["guest"]["bad"], 0, "{status}");
        let serial = read_console(Path::new(vm["serial"].as_str().unwrap()));
        assert!(bad_lines(&serial).is_empty(), "{:?}", bad_lines(&serial));
    }
    // What an operator lists.
    let out = std::process::Command::new(bin("ferry-ctl"))
        .args(["vms", run.to_str().unwrap()])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    let ours: Vec<&str> = vms.iter().map(|v| v["vm"].as_str().unwrap()).collect();
    assert_eq!(listed, ours, "ferry-ctl vms");
    let log = std::fs::read_to_string(&daemon_err).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.matches("incoming migration handed to a VM process")
            .count(),
        3,
        "{log}"
    );
    assert!(
        log.matches("refused a connection").count() >= 50,
        "the hostile connections were not refused: {log}"
    );

    // The VMs end with `quit`; the daemon removes their records.
    for vm in &vms {
        ctl(Path::new(vm["api"].as_str().unwrap()), &["quit"]);
    }
    wait_for(WAIT, "the daemon to reap the VM processes", || {
        daemon_records(&run).is_empty().then_some(())
    });
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon died");
}

/// A destination that answers every control Hello with a redirect to
/// itself: the source follows one redirect, refuses the second as a loop,
/// and keeps running its VM.
#[test]
fn a_redirect_loop_is_refused_and_the_source_keeps_its_vm() {
    let dir = Scratch::new("redirloop");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let mut answered = 0;
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            if read_frame(&mut s, &mut buf).is_err() {
                continue;
            }
            let hello = Hello::decode(&buf).unwrap();
            let r = Redirect {
                session_id: hello.session_id,
                port: addr.port(),
            };
            write_frame(&mut s, MsgType::Redirect, 0, &r.encode()).unwrap();
            answered += 1;
        }
        answered
    });
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(
        &dir,
        "256M",
        1,
        GUEST,
        &["--migrate-to", &addr.to_string(), "--after", "1s"],
    );
    assert_eq!(fake.join().unwrap(), 2);
    let err = dir.path("src.err");
    wait_for(WAIT, "the source to refuse the loop", || {
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        e.contains("redirect loop").then_some(())
    });
    let at = read_console(&log).len();
    let after = wait_lines(&log, at + 4, WAIT, "ticks after the refused redirect");
    assert!(bad_lines(&after).is_empty(), "{:?}", bad_lines(&after));
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    let e = std::fs::read_to_string(&err).unwrap();
    assert!(!e.contains("panicked"), "{e}");
    ctl(&sock, &["quit"]);
}

/// A source killed after the switch-over finishes the move from its
/// memory file with the VM's own process: the session record names that
/// process's address (the redirect's), and a record that names the daemon
/// instead (an operator who only knows the daemon) is redirected there too.
#[test]
fn a_killed_source_resumes_with_the_vm_process_through_the_daemon() {
    let dir = Scratch::new("daemoncrash");
    let run = dir.path("run");
    let (_daemon, addr) = spawn_dest(
        &dir,
        "daemon",
        &[
            "--daemon",
            "--run-dir",
            run.to_str().unwrap(),
            "--peer-timeout",
            "2s",
            "--recovery-window",
            "30s",
        ],
    );
    let mem_file = MemFile::new("daemon-ram");
    let record = mem_file.record();
    let (mut src, _ctl) = start_postcopy_from_file(
        &dir,
        ("1G", "ws=512M pattern=random write=80 report_ms=20"),
        &mem_file,
        &addr,
    );
    src.0.kill().unwrap();
    let _ = src.0.wait();
    let vm = wait_for(WAIT, "the VM's record", || daemon_records(&run).pop());
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("no session record")).unwrap();
    let port = vm["port"].as_u64().unwrap();
    assert_eq!(rec["addr"], format!("127.0.0.1:{port}"), "{rec}");
    // The operator knows only the daemon: it sends the source on.
    rec["addr"] = addr.clone().into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let mut resumed = spawn(
        "ferry-source",
        &["--resume", mem_file.arg()],
        &dir.path("resumed.err"),
    );
    let ok = wait_exit(&mut resumed, WAIT, "the resumed source to finish");
    let err = std::fs::read_to_string(dir.path("resumed.err")).unwrap_or_default();
    assert!(ok, "{err}");
    assert!(
        err.contains("sent this session to the VM's own process"),
        "{err}"
    );
    let stats = wait_stats(std::path::Path::new(vm["stats"].as_str().unwrap()), WAIT);
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
    let serial = std::path::Path::new(vm["serial"].as_str().unwrap()).to_path_buf();
    let dst_log = wait_ticks(&serial, 1, 5, WAIT);
    let src_log = read_console(&dir.path("src.log"));
    assert_continues(&src_log, &dst_log, 1);
    assert!(bad_lines(&dst_log).is_empty(), "{:?}", bad_lines(&dst_log));
    let api = std::path::Path::new(vm["api"].as_str().unwrap());
    assert_eq!(ctl(api, &["status"])["run_state"], "running");
    ctl(api, &["quit"]);
}

/// `ferry-dest --daemon --prealloc session` weighs each session's RAM by
/// the rule of `--prealloc hello` before it starts the VM process that
/// would allocate it: a `Hello` for more than three quarters of the host's
/// available memory (sized from /proc/meminfo, and nothing that large is
/// allocated) gets a VM process that does not allocate ahead, and the
/// daemon says why, naming the size. It then takes a real move whose RAM
/// it does allocate ahead, and the guest goes on.
#[test]
fn a_daemon_allocates_ahead_only_what_the_host_has_room_for() {
    let dir = Scratch::new("daemon-room");
    let run = dir.path("run");
    let (mut daemon, addr) = spawn_dest(
        &dir,
        "daemon",
        &[
            "--daemon",
            "--run-dir",
            run.to_str().unwrap(),
            "--prealloc",
            "session",
        ],
    );
    let available = ferry_engine::memory::memory_available().expect("MemAvailable");
    let huge = ferry_engine::memory::HUGE_PAGE_SIZE;
    let over = (available / 4 * 3 + (1 << 30)).next_multiple_of(huge);
    a_hello_without_room_is_not_allocated_ahead(&addr, &run, &dir.path("daemon.err"), over);

    let (log, _) = move_one_vm(&dir, "src", &addr);
    let vm = wait_for(WAIT, "the VM's record", || daemon_records(&run).pop());
    let stats = wait_stats(Path::new(vm["stats"].as_str().unwrap()), WAIT);
    assert_eq!(stats["ram_allocated_ahead"], true, "{stats}");
    let serial = Path::new(vm["serial"].as_str().unwrap()).to_path_buf();
    let after = wait_ticks(&serial, 1, 3, WAIT);
    assert_continues(&read_console(&log), &after, 1);
    ctl(Path::new(vm["api"].as_str().unwrap()), &["quit"]);
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon died");
}
