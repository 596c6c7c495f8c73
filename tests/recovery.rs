//! Post-copy recovery: links cut at random points of the push (sometimes
//! twice in one move), a destination that goes silent, and a source that
//! never comes back. The workload guest is the oracle throughout.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Cut, Dir, Proxy};
use common::*;

const GUEST: &str = "ws=256M pattern=random write=80 report_ms=20";

fn dest(dir: &Scratch, window: &str) -> (Proc, String) {
    spawn_linked_dest(dir, ("2s", window))
}

fn source(dir: &Scratch, to: &str, mem: &str, guest: &str) -> Proc {
    // The guest writes its whole working set (256 MiB) before it ticks.
    spawn_linked_source(dir, (mem, guest), to, "2s", ("2s", "30s"), &[])
}

/// Starts a slow post-copy move of a 2 GiB guest with a 1 GiB working set
/// through a proxy that cuts nothing, the destination waiting `window` for
/// a lost source; returns once the source says post-copy runs, with the
/// destination, the proxy, the source and the `ferry-ctl migrate` that
/// started the move.
fn start_postcopy(dir: &Scratch, window: &str) -> (Proc, Proxy, Proc, Proc) {
    let (dst, addr) = dest(dir, window);
    let proxy = Proxy::start(&addr, Vec::new());
    let src = spawn_linked_source(
        dir,
        ("2G", "ws=1G pattern=random write=80 report_ms=20"),
        &proxy.addr,
        "60m",
        ("2s", "30s"),
        &[],
    );
    let ctl = migrate_once_ticking(dir, &proxy.addr);
    // While post-copy runs, the source's status reports it: the stage, pages
    // left, and the bytes sent so far.
    let v = wait_stage(&dir.path("src.sock"), "postcopy");
    assert_eq!(v["run_state"], "migrating", "{v}");
    let m = &v["migration"];
    assert!(m["bytes_sent"].as_u64().unwrap() > 0, "{v}");
    assert!(m["pages_left"].as_u64().is_some(), "{v}");
    assert_eq!(m["recoveries"], 0, "{v}");
    (dst, proxy, src, ctl)
}

/// 14 post-copy moves of a 1 GiB guest with a 256 MiB working set through a
/// proxy; 8 are cut once and 6 twice, at random byte offsets of the first 121 MiB of the push
/// (20 cuts). Every move completes, the guest continues on the destination
/// with no BAD anywhere, and the statistics count each recovery.
#[test]
fn twenty_random_cuts_all_recover() {
    let mut rng = Rng(0x5eed_f3aa_0000_0001);
    let mut times = Vec::new();
    let mut cuts_total = 0;
    for i in 0..14 {
        let n = if i < 8 { 1 } else { 2 };
        // Non-zero pages are ~256 MiB, of which demand answers (more on a
        // busy host) take a share off the push: cut somewhere in the first
        // 120 MiB of each connection's push, which every move carries.
        let cuts: Vec<Cut> = (0..n)
            .map(|_| Cut::AtByte(Dir::ToDest, (1 << 20) + rng.below(120 << 20)))
            .collect();
        let dir = Scratch::new(&format!("recover-{i}"));
        let (mut dst, addr) = dest(&dir, "30s");
        let proxy = Proxy::start(&addr, cuts.clone());
        let mut src = source(&dir, &proxy.addr, "1G", GUEST);
        assert!(
            wait_exit(&mut src, WAIT, "the source to finish"),
            "move {i} {cuts:?}: {}\n{}",
            std::fs::read_to_string(dir.path("src.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default()
        );
        assert_eq!(proxy.fired(), n, "move {i}: {cuts:?} did not all fire");
        let s = wait_stats(&dir.path("dst.json"), WAIT);
        assert_eq!(s["recoveries"], n, "move {i}: {s}");
        let ms = s["recovery_ms"].as_f64().unwrap();
        times.push(ms / n as f64);
        cuts_total += n;
        let src_log = read_console(&dir.path("src.log"));
        let dst_log = wait_ticks(&dir.path("dst.log"), 1, 5, WAIT);
        assert_continues(&src_log, &dst_log, 1);
        for l in [&src_log, &dst_log] {
            assert!(bad_lines(l).is_empty(), "move {i}: {:?}", bad_lines(l));
        }
        ctl(&dir.path("dst.sock"), &["quit"]);
        assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
    }
    assert_eq!(cuts_total, 20);
    times.sort_by(f64::total_cmp);
    eprintln!(
        "recovery time per cut over {cuts_total} cuts: median {:.0} ms, max {:.0} ms",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

/// A destination stopped with SIGSTOP during post-copy is noticed by the
/// source within its peer timeout (2 s): its status says `recovering`. Once
/// the destination continues, the move completes.
#[test]
fn a_silent_destination_is_noticed_within_the_peer_timeout() {
    let dir = Scratch::new("sigstop");
    // A slow push: the stop lands while pages still move.
    let (mut dst, _proxy, mut src, _ctl) = start_postcopy(&dir, "30s");
    let noticed = stopped_until_noticed(&dst, &dir.path("src.sock"));
    eprintln!("a stopped destination was noticed after {noticed:?}");
    // Peer timeout 2 s, plus one status poll and the scheduler.
    assert!(noticed < Duration::from_secs(4), "{noticed:?}");
    assert!(wait_exit(&mut src, WAIT, "the source to finish"));
    let s = wait_stats(&dir.path("dst.json"), WAIT);
    assert!(s["recoveries"].as_u64().unwrap() >= 1, "{s}");
    assert_moved_and_quit(&dir, &mut dst);
}

/// The two sides' peer timeouts differ: the source's is 400 ms, the
/// destination's 30 s. The move runs with the shorter on both sides:
/// through a push capped to last seconds, the destination pings often
/// enough that the source never deems it gone (no recovery), and a source
/// stopped with SIGSTOP is noticed by the destination within seconds, not
/// its own 30. Once the source continues, the move completes.
#[test]
fn both_sides_run_the_move_with_the_shorter_peer_timeout() {
    let dir = Scratch::new("short-timeout");
    let (mut dst, addr) = spawn_linked_dest(&dir, ("30s", "30s"));
    let mut src = spawn_linked_source(
        &dir,
        ("2G", "ws=1G pattern=random write=80 report_ms=20"),
        &addr,
        "60m",
        ("400ms", "30s"),
        &["--max-bandwidth", "100M"],
    );
    let _ctl = migrate_once_ticking(&dir, &addr);
    let (ssock, dsock) = (dir.path("src.sock"), dir.path("dst.sock"));
    wait_stage(&ssock, "postcopy");
    // Several of the source's timeouts pass while the push runs.
    std::thread::sleep(Duration::from_millis(2000));
    let v = ctl(&ssock, &["status"]);
    assert_eq!(v["migration"]["stage"], "postcopy", "{v}");
    assert_eq!(v["migration"]["recoveries"], 0, "{v}");
    let noticed = stopped_until_noticed(&src, &dsock);
    eprintln!("a stopped source was noticed after {noticed:?}");
    // 400 ms, plus status polls and the scheduler; far from 30 s.
    assert!(noticed < Duration::from_secs(10), "{noticed:?}");
    assert!(wait_exit(&mut src, WAIT, "the source to finish"));
    let s = wait_stats(&dir.path("dst.json"), WAIT);
    assert_eq!(s["peer_timeout_ms"], 400, "{s}");
    assert!(s["recoveries"].as_u64().unwrap() >= 1, "{s}");
    assert_moved_and_quit(&dir, &mut dst);
}

/// Stops `peer` with SIGSTOP until the side whose API socket is `sock`
/// says `recovering`, then lets it continue; returns how long that took.
fn stopped_until_noticed(peer: &Proc, sock: &std::path::Path) -> Duration {
    let pid = nix::unistd::Pid::from_raw(peer.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let noticed = wait_for(WAIT, "the peer's silence to be noticed", || {
        let v = ctl(sock, &["status"]);
        (v["migration"]["stage"] == "recovering").then(|| stopped.elapsed())
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    noticed
}

/// The guest continued on the destination with no BAD; then it is quit.
fn assert_moved_and_quit(dir: &Scratch, dst: &mut Proc) {
    let dst_log = wait_ticks(&dir.path("dst.log"), 1, 5, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &dst_log, 1);
    assert!(bad_lines(&dst_log).is_empty());
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(dst, WAIT, "the destination to quit"));
}

/// The source is killed for good during post-copy. When the recovery
/// window ends, the destination keeps the VM paused with a clear error; the
/// guest never runs on a page it does not have, so it never prints BAD.
#[test]
fn when_the_window_runs_out_the_vm_waits_paused() {
    let dir = Scratch::new("window");
    let (mut dst, _proxy, mut src, _ctl) = start_postcopy(&dir, "3s");
    src.0.kill().unwrap();
    let _ = src.0.wait();
    let dsock = dir.path("dst.sock");
    let status = wait_stage(&dsock, "failed");
    assert_eq!(status["run_state"], "paused", "{status}");
    let why = status["migration"]["error"].as_str().unwrap();
    assert!(why.contains("did not reconnect"), "{why}");
    assert!(status["held"].is_string(), "{status}");
    // Resuming it is refused: it lacks pages.
    let out = std::process::Command::new(bin("ferry-ctl"))
        .args(["--api", dsock.to_str().unwrap(), "resume"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Nor can it be snapshotted (or made a template, or exported): the
    // pages it lacks would be stored as zeros, and a restore would run on
    // them.
    let snap = dir.path("held.snap");
    let why = ctl_refused(&dsock, &["snapshot", snap.to_str().unwrap()]);
    assert!(why.contains("refused: the move did not complete"), "{why}");
    assert!(
        !snap.exists(),
        "a snapshot of a VM lacking pages was written"
    );
    // It stays paused: no new output, and never a BAD line.
    let before = read_console(&dir.path("dst.log")).len();
    std::thread::sleep(Duration::from_millis(500));
    let after = read_console(&dir.path("dst.log"));
    assert_eq!(after.len(), before, "the stranded VM ran");
    assert!(bad_lines(&after).is_empty(), "{:?}", bad_lines(&after));
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(
        err.contains("will not run on pages it does not have"),
        "{err}"
    );
    ctl(&dsock, &["quit"]);
    let _ = wait_for(WAIT, "the destination to quit", || {
        dst.0.try_wait().unwrap()
    });
}

/// The link dies for longer than the source's recovery window: the source
/// declares the move stranded and keeps the VM paused (it refuses to resume
/// it: the destination may run it). `ferry-ctl recover ADDR` on the source,
/// naming the destination's direct address, finishes the move.
#[test]
fn the_source_recovers_a_stranded_move_on_request() {
    let dir = Scratch::new("src-recover");
    let (mut dst, addr) = dest(&dir, "60s");
    let proxy = Proxy::start(&addr, Vec::new());
    let mut src = spawn_linked_source(
        &dir,
        ("2G", "ws=1G pattern=random write=80 report_ms=20"),
        &proxy.addr,
        "60m",
        ("1s", "2s"),
        &[],
    );
    let _ctl = migrate_once_ticking(&dir, &proxy.addr);
    let sock = dir.path("src.sock");
    wait_stage(&sock, "postcopy");
    drop(proxy);
    let s = wait_stage(&sock, "failed");
    assert_eq!(s["run_state"], "paused", "{s}");
    assert!(s["held"].is_string(), "{s}");
    let out = std::process::Command::new(bin("ferry-ctl"))
        .args(["--api", sock.to_str().unwrap(), "resume"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a committed VM resumed on the source"
    );
    // A snapshot of it would be a second copy to restore: refused too.
    let snap = dir.path("held.snap");
    let why = ctl_refused(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(why.contains("refused:"), "{why}");
    assert!(!snap.exists());
    let r = ctl(&sock, &["recover", &addr]);
    assert!(r["recoveries"].as_u64().unwrap() >= 1, "{r}");
    assert!(wait_exit(&mut src, WAIT, "the source to finish"));
    assert_moved_and_quit(&dir, &mut dst);
}

/// The destination's window runs out while the source is down (killed,
/// with its RAM in a file). The operator asks the destination to recover,
/// then restarts the source with `--resume`: the move completes.
#[test]
fn the_destination_recovers_a_stranded_move_on_request() {
    let dir = Scratch::new("dst-recover");
    let (mut dst, addr) = dest(&dir, "2s");
    let mem_file = MemFile::new("dstrec");
    let mut src = spawn_linked_source(
        &dir,
        ("2G", "ws=1G pattern=random write=80 report_ms=20"),
        &addr,
        "60m",
        ("5s", "60s"),
        &["--mem-file", mem_file.arg()],
    );
    let _ctl = migrate_once_ticking(&dir, &addr);
    wait_stage(&dir.path("src.sock"), "postcopy");
    src.0.kill().unwrap();
    let _ = src.0.wait();
    let dsock = dir.path("dst.sock");
    // The engine publishes the hold before the failure, so the status
    // that first shows the failure already shows the VM paused and held.
    let s = wait_stage(&dsock, "failed");
    assert_eq!(s["run_state"], "paused", "{s}");
    assert!(s["held"].is_string(), "{s}");
    // Recover on the destination (it waits another window, 2 s) while the
    // source is restarted from its memory file.
    let mut resumed = spawn(
        "ferry-source",
        &["--resume", mem_file.arg(), "--recovery-window", "30s"],
        &dir.path("resumed.err"),
    );
    let r = ctl(&dsock, &["recover"]);
    let ok = wait_exit(&mut resumed, WAIT, "the resumed source to finish");
    assert!(
        ok,
        "{}",
        std::fs::read_to_string(dir.path("resumed.err")).unwrap_or_default()
    );
    assert!(r["recoveries"].as_u64().unwrap() >= 1, "{r}");
    let s = ctl(&dsock, &["status"]);
    assert_eq!(s["run_state"], "running", "{s}");
    assert!(s["held"].is_null(), "{s}");
    let dst_log = wait_ticks(&dir.path("dst.log"), 1, 5, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &dst_log, 1);
    assert!(bad_lines(&dst_log).is_empty());
    ctl(&dsock, &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}
