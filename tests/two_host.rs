//! Two-host moves: source and destination in two network namespaces joined
//! by a veth pair that each test creates (and removes) through
//! `ferry_tools::netns`, the same code ferry-bench uses, with the link
//! limited by tbf. Traffic stays inside the namespaces the test made.

mod common;

use std::time::Duration;

use common::*;
use ferry_tools::netns::{Net, Side};

const WAIT: Duration = Duration::from_secs(180);

/// Two namespaces `<tag>-a` (10.77.0.1) and `<tag>-b` (10.77.0.2) joined
/// by a veth pair limited to `rate`, removed on drop.
fn two_hosts(tag: &str, rate: &str) -> Net {
    Net::tagged(tag, tag, 0, Some(rate)).unwrap_or_else(|e| panic!("namespaces {tag}: {e}"))
}

/// Runs a move between the two hosts and returns the destination's stats
/// after checking the guest across it.
fn move_between(
    net: &Net,
    dir: &Scratch,
    shape: (&str, u32, &str),
    guest: &str,
    src_args: &[&str],
) -> serde_json::Value {
    let (mem, vcpus, after) = shape;
    let dst_err = dir.path("dst.err");
    let mut dst = spawn_on(
        net,
        Side::Dest,
        "ferry-dest",
        &strs(&dest_args(dir, &net.dest_ip().to_string())),
        &dst_err,
    );
    let to = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dst_err);
    let mut args = source_args(dir, mem, vcpus, guest, &to, after);
    args.extend(src_args.iter().map(|s| s.to_string()));
    let (dst_log, src_log) = (dir.path("dst.log"), dir.path("src.log"));
    let src = spawn_on(
        net,
        Side::Source,
        "ferry-source",
        &strs(&args),
        &dir.path("src.err"),
    );
    let stats = finish_source(dir, src);
    let after = wait_ticks(&dst_log, vcpus, 3, WAIT);
    assert_continues(&read_console(&src_log), &after, vcpus);
    let _ = dst.0.kill();
    let _ = dst.0.wait();
    stats
}

/// The guest dirties its 32 MiB working set far faster than a 100 Mbit/s
/// link moves it: pre-copy must give up after its rounds, say so, and still
/// move the VM correctly (stop-and-copy of the rest); hybrid must switch to
/// post-copy instead, with a short downtime.
#[test]
fn precopy_that_cannot_converge_says_so_and_hybrid_switches() {
    let net = two_hosts(&format!("fz{}", std::process::id() % 10000), "100mbit");
    let guest = "ws=32M pattern=random write=100 report_ms=50";

    let dir = Scratch::new("noconv");
    let pre = move_between(
        &net,
        &dir,
        ("512M", 1, "1s"),
        guest,
        &["--mode", "precopy", "--max-rounds", "3"],
    );
    assert_eq!(pre["converged"], false, "{pre}");
    assert_eq!(
        pre["precopy_rounds"].as_array().unwrap().len(),
        4 + 1,
        "{pre}"
    );
    let src_err = std::fs::read_to_string(dir.path("src.err")).unwrap_or_default();
    assert!(
        src_err.contains("did not converge"),
        "the source did not say so: {src_err}"
    );

    let dir = Scratch::new("hybridsw");
    let hyb = move_between(
        &net,
        &dir,
        ("512M", 1, "1s"),
        guest,
        &["--mode", "hybrid", "--hybrid-rounds", "1"],
    );
    assert_eq!(hyb["mode"], "hybrid");
    let pre_down = pre["downtime_us"].as_u64().unwrap();
    let hyb_down = hyb["downtime_us"].as_u64().unwrap();
    assert!(
        hyb_down * 5 < pre_down,
        "hybrid downtime {hyb_down} µs vs pre-copy {pre_down} µs"
    );
    eprintln!("pre-copy (not converged) downtime {pre_down} µs, hybrid {hyb_down} µs");
}

#[test]
fn postcopy_between_two_namespaces_over_1gbit() {
    let dir = Scratch::new("twohost");
    let net = two_hosts(&format!("fy{}", std::process::id() % 10000), "1gbit");
    let guest = "ws=256M pattern=random write=80 report_ms=50";
    let stats = move_between(&net, &dir, ("1G", 2, "2s"), guest, &[]);
    // The link really was the limit: no faster than 1 Gbit/s on average.
    let total_ms = stats["total_ms"].as_f64().unwrap();
    let wire = stats["bytes_wire"].as_u64().unwrap() as f64;
    assert!(
        wire * 8.0 / (total_ms / 1e3) < 1.1e9,
        "faster than the 1 Gbit/s link: {stats}"
    );
    eprintln!("two-host stats: {stats}");
}

/// `--max-bandwidth` caps the post-copy push within 10% over an uncapped
/// two-namespace link (the link itself allows 1 Gbit/s here; the cap asks
/// for 400 Mbit/s).
#[test]
fn max_bandwidth_caps_the_push_within_ten_percent() {
    let dir = Scratch::new("bwcap");
    let net = two_hosts(&format!("fw{}", std::process::id() % 10000), "1gbit");
    let guest = "ws=64M pattern=random write=80 report_ms=50";
    let stats = move_between(
        &net,
        &dir,
        ("512M", 1, "2s"),
        guest,
        &["--max-bandwidth", "400mbit"],
    );
    // The source's own counters, as of PushDone: bytes on both connections
    // minus the demand answers (page, prefix and header each) is the push.
    let src = &stats["source"];
    let wire = src["bytes_wire"].as_u64().unwrap();
    let demand = src["pages_demand"].as_u64().unwrap() * (4096 + 32);
    let push_s = src["push_ms"].as_f64().unwrap() / 1e3;
    let rate = (wire - demand.min(wire)) as f64 / push_s;
    let cap = 400e6 / 8.0;
    eprintln!(
        "push {:.1} MB/s against a cap of {:.1} MB/s ({:.1} MB in {push_s:.2} s)",
        rate / 1e6,
        cap / 1e6,
        (wire - demand.min(wire)) as f64 / 1e6
    );
    assert!(
        rate <= cap * 1.1 && rate >= cap * 0.9,
        "push at {rate:.0} B/s, cap {cap:.0} B/s: {stats}"
    );
}
