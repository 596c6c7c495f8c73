//! Fault injection: a proxy between `ferry-source` and `ferry-dest` cuts the
//! link at every step of the protocol, in every mode, and the outcome must
//! be the one `docs/protocol.md` promises:
//!
//! - a cut before the source writes `Commit` rolls back: the VM keeps
//!   running on the source, and the destination, which never ran it,
//!   discards it;
//! - a cut after it is recovered: the source reconnects, the move
//!   completes, and the VM runs on the destination only.
//!
//! In every case exactly one copy of the VM runs, and the guest (the
//! workload oracle) never prints BAD on either side.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Cut, Dir, Proxy};
use common::*;
use ferry_protocol::MsgType;

/// What a cut must lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The VM runs on the source; the destination gave up without running it.
    RolledBack,
    /// The VM runs on the destination; the source is gone.
    Moved,
}

/// How one case ended, as a user would see it.
#[derive(Debug)]
struct Seen {
    outcome: Expect,
    recoveries: u64,
}

/// Cuts close the sockets, so they are noticed at once; the peer timeout
/// only guards against a slow, loaded host being taken for a dead one.
const PEER_TIMEOUT: &str = "5s";
const DEST_WINDOW: &str = "4s";
const SOURCE_WINDOW: &str = "15s";

/// Runs one move in `mode` through a proxy that cuts at `cuts`, checks the
/// rules, and returns what happened.
fn run_case(mode: &str, cuts: Vec<Cut>, guest: &str, mem: &str) -> Seen {
    run_case_with(mode, cuts, guest, mem, &[])
}

/// [`run_case`] with `extra` arguments for the source.
fn run_case_with(mode: &str, cuts: Vec<Cut>, guest: &str, mem: &str, extra: &[&str]) -> Seen {
    let name = format!("{mode}-{cuts:?}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(60)
        .collect::<String>();
    // Unique among the cases: the cuts' count (a socket path is short).
    let name = format!("{name}-{}", cuts.len());
    let dir = Scratch::new(&format!("fi-{name}"));
    let (mut dst, dst_addr) = spawn_linked_dest(&dir, (PEER_TIMEOUT, DEST_WINDOW));
    let proxy = Proxy::start(&dst_addr, cuts.clone());
    let mut src = spawn_linked_source(
        &dir,
        (mem, guest),
        &proxy.addr,
        "1500ms",
        (PEER_TIMEOUT, SOURCE_WINDOW),
        &[&["--mode", mode, "--max-rounds", "3"], extra].concat(),
    );
    let errs = || {
        format!(
            "source: {}\ndestination: {}",
            std::fs::read_to_string(dir.path("src.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default()
        )
    };
    // Wait until one side clearly holds the VM: the source finished the
    // move, or it says the move failed and its VM runs.
    let t = Instant::now();
    let outcome = loop {
        assert!(t.elapsed() < WAIT, "{name}: no outcome\n{}", errs());
        if let Some(st) = src.0.try_wait().unwrap() {
            assert!(st.success(), "{name}: source exited with {st}\n{}", errs());
            break Expect::Moved;
        }
        if dir.path("src.sock").exists() {
            if let Some(s) = try_status(&dir.path("src.sock")) {
                let failed = s["migration"]["stage"] == "failed";
                if failed && s["run_state"] == "running" {
                    break Expect::RolledBack;
                }
                assert!(
                    !(failed && s["held"].is_string()),
                    "{name}: stranded: {s}\n{}",
                    errs()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        proxy.fired() >= 1,
        "{name}: the cut never fired ({outcome:?})\n{}",
        errs()
    );
    let src_log = read_console(&dir.path("src.log"));
    let mut recoveries = 0;
    match outcome {
        Expect::Moved => {
            // The destination runs the VM and completed the move.
            let stats = wait_stats(&dir.path("src.json"), WAIT);
            recoveries = stats["source"]["recoveries"].as_u64().unwrap();
            // The destination may still be answering a reconnected source
            // (after a cut near the commit) for a moment after the source
            // has exited; then the move completes there.
            let status = wait_for(
                WAIT,
                &format!("{name}: the destination to settle the move"),
                || {
                    let s = ctl(&dir.path("dst.sock"), &["status"]);
                    let stage = &s["migration"]["stage"];
                    (stage == "completed" || stage == "failed").then_some(s)
                },
            );
            assert_eq!(status["run_state"], "running", "{name}: {status}");
            assert_eq!(
                status["migration"]["stage"], "completed",
                "{name}: {status}"
            );
            let dst_log = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
            assert_continues(&src_log, &dst_log, 1);
            ctl(&dir.path("dst.sock"), &["quit"]);
            assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
        }
        Expect::RolledBack => {
            // The destination gives up without ever running the VM, or,
            // when the cut came before any session reached it, it never
            // started one and still listens.
            let limit = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(st) = dst.0.try_wait().unwrap() {
                    assert!(!st.success(), "{name}: the destination claims success");
                    break;
                }
                if Instant::now() > limit {
                    let s = ctl(&dir.path("dst.sock"), &["status"]);
                    assert_eq!(s["migration"]["stage"], "idle", "{name}: {s}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let dst_log = read_console(&dir.path("dst.log"));
            assert!(
                dst_log.is_empty(),
                "{name}: the discarded VM ran on the destination: {:?}",
                &dst_log[..dst_log.len().min(3)]
            );
            // The source's VM keeps going, from where it was.
            let n = src_log.len();
            let after = wait_lines(
                &dir.path("src.log"),
                n + 5,
                WAIT,
                "ticks after the rollback",
            );
            assert_progress(&after, 1);
            ctl(&dir.path("src.sock"), &["quit"]);
            // Exit code 3: the migration failed, the VM ran on here.
            let st = wait_for(WAIT, "the source to quit", || src.0.try_wait().unwrap());
            assert_eq!(st.code(), Some(3), "{name}");
        }
    }
    for log in ["src.log", "dst.log"] {
        let l = read_console(&dir.path(log));
        assert!(
            bad_lines(&l).is_empty(),
            "{name}: {log}: {:?}",
            bad_lines(&l)
        );
    }
    Seen {
        outcome,
        recoveries,
    }
}

const GUEST: &str = "ws=32M pattern=random write=80 report_ms=20";

/// The cut points of the protocol that every mode passes, and what each
/// must lead to.
fn common_cuts() -> Vec<(Cut, Expect)> {
    use Dir::*;
    use Expect::*;
    use MsgType::*;
    vec![
        (Cut::Before(ToDest, Hello, 1), RolledBack),
        (Cut::Before(ToSource, HelloAck, 1), RolledBack),
        (Cut::After(ToSource, HelloAck, 2), RolledBack),
        (Cut::Before(ToDest, State, 1), RolledBack),
        (Cut::After(ToDest, State, 1), RolledBack),
        (Cut::Before(ToSource, Ready, 1), RolledBack),
        (Cut::After(ToSource, Ready, 1), Moved),
        (Cut::Before(ToDest, Commit, 1), Moved),
        (Cut::After(ToDest, Commit, 1), Moved),
        (Cut::Before(ToSource, Resumed, 1), Moved),
        (Cut::After(ToSource, Resumed, 1), Moved),
        (Cut::Before(ToSource, Complete, 1), Moved),
    ]
}

/// The cut points that only `mode` passes, and what each must lead to.
fn mode_cuts(mode: &str) -> Vec<(Cut, Expect)> {
    use Dir::*;
    use Expect::*;
    use MsgType::*;
    match mode {
        "postcopy" => vec![
            (Cut::Before(ToDest, Pages, 1), Moved),
            (Cut::AtByte(ToDest, 5 << 20), Moved),
            (Cut::AtByte(ToDest, 20 << 20), Moved),
            (Cut::Before(ToDest, PushDone, 1), Moved),
            (Cut::After(ToDest, PushDone, 1), Moved),
        ],
        "stop-and-copy" | "precopy" => vec![
            (Cut::Before(ToDest, Pages, 1), RolledBack),
            (Cut::AtByte(ToDest, 10 << 20), RolledBack),
        ],
        "hybrid" => vec![
            (Cut::Before(ToDest, Discard, 1), RolledBack),
            (Cut::Before(ToSource, DiscardDone, 1), RolledBack),
            (Cut::After(ToDest, PushDone, 1), Moved),
        ],
        other => panic!("no cuts for mode {other}"),
    }
}

/// Runs every cut of [`common_cuts`] and [`mode_cuts`] in `mode`, checks
/// each outcome and prints the table.
fn matrix(mode: &str) {
    let mut table = Vec::new();
    for (cut, expect) in common_cuts().into_iter().chain(mode_cuts(mode)) {
        let seen = run_case(mode, vec![cut], GUEST, "256M");
        assert_eq!(seen.outcome, expect, "{mode} {cut:?}");
        table.push(format!(
            "| {mode} | {cut:?} | {:?} | {} |",
            seen.outcome, seen.recoveries
        ));
    }
    eprintln!("| mode | cut | outcome | recoveries |\n|---|---|---|---|");
    for row in table {
        eprintln!("{row}");
    }
}

#[test]
fn cuts_in_postcopy() {
    matrix("postcopy");
}

#[test]
fn cuts_in_stop_and_copy() {
    matrix("stop-and-copy");
}

#[test]
fn cuts_in_precopy() {
    matrix("precopy");
}

#[test]
fn cuts_in_hybrid() {
    matrix("hybrid");
}

/// `Commit` is lost and the source cannot reach the destination again
/// within the destination's recovery window (its next seven resumes are
/// cut, over some 5 s of backoff, against a 4 s window). The destination
/// discards the VM, which never ran there, and then waits one more window
/// to tell the source so (`UnknownSession`) when it comes back: the source
/// runs its own copy. Before, the destination exited with the discard and
/// the source, finding no one, stranded a VM that had run nowhere else.
#[test]
fn a_source_back_after_the_destination_gave_up_runs_its_own_copy() {
    use Dir::*;
    use MsgType::*;
    let mut cuts = vec![Cut::Before(ToDest, Commit, 1)];
    cuts.extend([Cut::Before(ToDest, Hello, 1); 7]);
    let seen = run_case("postcopy", cuts, GUEST, "256M");
    assert_eq!(seen.outcome, Expect::RolledBack);
}

/// A `Commit` lost on its way costs one recovery, not two: the resume that
/// settles it (`Prepared`, then `Commit` again) also hands the
/// destination's fault thread the new fault connection. It kept the dead
/// one before, so the first faults after the switch-over failed and the
/// move recovered a second time, with the guest waiting in its faults.
#[test]
fn a_lost_commit_costs_one_recovery() {
    let cut = Cut::Before(Dir::ToDest, MsgType::Commit, 1);
    // A slow push, so that the guest's faults need demand answers.
    let slow = ["--max-bandwidth", "10M"];
    let seen = run_case_with("postcopy", vec![cut], GUEST, "256M", &slow);
    assert_eq!(seen.outcome, Expect::Moved);
    assert_eq!(seen.recoveries, 1, "{seen:?}");
}
