//! Stop-and-copy, pre-copy and hybrid moves, judged by the workload guest
//! like post-copy: it keeps ticking, continues its rounds, never prints BAD.

mod common;

use common::*;

const GUEST: &str = "ws=128M pattern=random write=80 report_ms=50";

fn check(m: &Move, mode: &str, vcpus: u32) {
    let s = &m.stats;
    assert_eq!(s["mode"], mode, "{s}");
    assert_eq!(s["guest_bad"], 0, "{s}");
    assert_continues(&m.src_log, &m.dst_log, vcpus);
}

#[test]
fn stop_and_copy_moves_everything_while_paused() {
    let dir = Scratch::new("sac");
    let m = migrate(&dir, "512M", 2, GUEST, "1s", &["--mode", "stop-and-copy"]);
    check(&m, "stop-and-copy", 2);
    let s = &m.stats;
    assert_eq!(s["pages_demand"], 0);
    // Every page went before the switch: data or a zero marker.
    let total = s["pages_pushed"].as_u64().unwrap() + s["pages_zero"].as_u64().unwrap();
    assert_eq!(total, s["pages_total"].as_u64().unwrap(), "{s}");
}

#[test]
fn precopy_iterates_with_dirty_logging() {
    let dir = Scratch::new("pre");
    let m = migrate(
        &dir,
        "512M",
        2,
        GUEST,
        "1s",
        &["--mode", "precopy", "--max-rounds", "10"],
    );
    check(&m, "precopy", 2);
    let s = &m.stats;
    let rounds = s["precopy_rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{s}");
    // Round 0 is the full pass; later rounds resend what the guest dirtied.
    assert_eq!(rounds[0]["pages"], s["pages_total"]);
    assert!(rounds[1]["pages"].as_u64().unwrap() > 0, "{s}");
    assert!(s["converged"].is_boolean());
    assert_eq!(s["pages_demand"], 0);
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
    assert!(!s["precopy_rounds"].as_array().unwrap().is_empty(), "{s}");
    // The pages dirtied after the last round came post-copy: by push or demand.
    // `source` is the page server's own count, sent when its push finished.
    let page_server = &s["source"];
    let post = page_server["pages_pushed"].as_u64().unwrap()
        + page_server["pages_demand"].as_u64().unwrap();
    assert!(post > 0, "nothing moved after the switch: {s}");
}
