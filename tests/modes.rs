//! Stop-and-copy, pre-copy and hybrid moves, judged by the workload guest
//! like post-copy: it keeps ticking, continues its rounds, never prints BAD.
//! The statistics are checked against what each mode guarantees (see
//! `engine/src/migration/rounds.rs`): which rounds ran, how many pages each
//! sent, and that every page sent was received and counted once.

mod common;

use common::*;

const GUEST: &str = "ws=128M pattern=random write=80 report_ms=50";

fn n(s: &serde_json::Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("stats lack {k}: {s}"))
}

fn check(m: &Move, mode: &str, vcpus: u32) {
    let s = &m.stats;
    assert_eq!(s["mode"], mode, "{s}");
    assert_eq!(n(s, "pages_total"), (512u64 << 20) / 4096, "{s}");
    assert_continues(&m.src_log, &m.dst_log, vcpus);
    assert_stall_covers_downtime(&m.src_log, &m.dst_log, vcpus, s);
}

/// The pre-copy rounds, checked to be numbered 0, 1, ... with round 0 the
/// full pass; returns them with their page counts.
fn rounds(s: &serde_json::Value) -> Vec<(u64, u64)> {
    let r: Vec<(u64, u64)> = s["precopy_rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no rounds: {s}"))
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r["round"], i as u64, "round numbers: {s}");
            (
                r["pages"].as_u64().unwrap(),
                r["dirty_after"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(!r.is_empty(), "{s}");
    assert_eq!(
        r[0].0,
        n(s, "pages_total"),
        "round 0 is not the full pass: {s}"
    );
    r
}

/// Nothing went through userfaultfd: no demand fault of any kind.
fn assert_no_faults(s: &serde_json::Value) {
    for k in ["pages_demand", "prefetch_hits", "zero_faults"] {
        assert_eq!(n(s, k), 0, "{k}: {s}");
    }
    assert_eq!(s["fault_latency_us"]["overall"]["count"], 0, "{s}");
}

#[test]
fn stop_and_copy_moves_everything_while_paused() {
    let dir = Scratch::new("sac");
    let m = migrate(&dir, "512M", 2, GUEST, "1s", &["--mode", "stop-and-copy"]);
    check(&m, "stop-and-copy", 2);
    let s = &m.stats;
    assert_no_faults(s);
    // One pass, while paused, and no page server afterwards.
    let r = rounds(s);
    assert_eq!(r.len(), 1, "{s}");
    assert!(s["converged"].is_null(), "{s}");
    assert!(s["source"].is_null(), "{s}");
    // Every page went exactly once before the switch: data or a zero marker.
    assert_eq!(
        n(s, "pages_pushed") + n(s, "pages_zero"),
        n(s, "pages_total"),
        "{s}"
    );
}

#[test]
fn precopy_iterates_with_dirty_logging() {
    let dir = Scratch::new("pre");
    let max_rounds = 10;
    let m = migrate(
        &dir,
        "512M",
        2,
        GUEST,
        "1s",
        &["--mode", "precopy", "--max-rounds", &max_rounds.to_string()],
    );
    check(&m, "precopy", 2);
    let s = &m.stats;
    assert_no_faults(s);
    assert!(s["source"].is_null(), "{s}");
    let r = rounds(s);
    // Rounds while running (the full pass, then up to `max_rounds` more),
    // then one final round while paused.
    let running = r.len() - 1;
    assert!(running >= 1 && running <= max_rounds + 1, "{s}");
    match s["converged"].as_bool() {
        Some(true) => {}
        // Not converged: every round allowed was used.
        Some(false) => assert_eq!(running, max_rounds + 1, "{s}"),
        None => panic!("pre-copy does not say whether it converged: {s}"),
    }
    // Each running round resends exactly what the dirty log named after
    // the one before; the paused round sends that and whatever was dirtied
    // since.
    for i in 1..running {
        assert_eq!(r[i].0, r[i - 1].1, "round {i} vs the dirty log: {s}");
    }
    assert!(r[running].0 >= r[running - 1].1, "paused round: {s}");
    // The guest writes all the time: the paused round has pages to send.
    assert!(r[running].0 > 0, "{s}");
    // Every page of every round was received and counted once.
    let sent: u64 = r.iter().map(|x| x.0).sum();
    assert_eq!(n(s, "pages_pushed") + n(s, "pages_zero"), sent, "{s}");
}

#[test]
fn hybrid_switches_to_postcopy_after_its_rounds() {
    let dir = Scratch::new("hyb");
    let m = migrate(
        &dir,
        "512M",
        2,
        GUEST,
        "1s",
        &["--mode", "hybrid", "--hybrid-rounds", "1"],
    );
    check(&m, "hybrid", 2);
    let s = &m.stats;
    // Rounds while running only (the full pass, at most one more), then
    // post-copy: no round while paused.
    let r = rounds(s);
    assert!(r.len() <= 2, "{s}");
    match s["converged"].as_bool() {
        Some(true) => {}
        Some(false) => assert_eq!(r.len(), 2, "{s}"),
        None => panic!("hybrid does not say whether its rounds converged: {s}"),
    }
    if r.len() == 2 {
        assert_eq!(r[1].0, r[0].1, "round 1 vs the dirty log: {s}");
    }
    // `source` is the page server's own count, sent when its push finished.
    let server = |k: &str| {
        s["source"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no page-server {k}: {s}"))
    };
    // The destination counted every page of the rounds and of the push once.
    let sent: u64 = r.iter().map(|x| x.0).sum();
    assert_eq!(
        n(s, "pages_pushed") + n(s, "pages_zero"),
        sent + server("pages_pushed"),
        "{s}"
    );
    // What the guest dirtied after the last round went stale on the
    // destination, so post-copy sent at least that much, by push or demand.
    let stale = r.last().unwrap().1;
    assert!(stale > 0, "the guest dirtied nothing after the rounds: {s}");
    assert!(
        server("pages_pushed") + server("pages_demand") >= stale,
        "{stale} stale pages, fewer sent after the switch: {s}"
    );
}
