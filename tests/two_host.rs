//! A two-host post-copy move: source and destination in two network
//! namespaces joined by a veth pair that this test creates (and removes),
//! with the link limited to 1 Gbit/s by tbf. Traffic stays inside the
//! namespaces the test made.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(180);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces `<tag>-a` (10.77.0.1) and `<tag>-b` (10.77.0.2).
struct TwoHosts {
    a: String,
    b: String,
}

impl TwoHosts {
    fn new(tag: &str, rate: &str) -> Self {
        let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
        let _ = Command::new("ip")
            .args(["netns", "del", &a])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &b])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &a]);
        sh(&["ip", "netns", "add", &b]);
        let hosts = TwoHosts { a, b };
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        sh(&[
            "ip", "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb,
            "netns", &hosts.b,
        ]);
        for (ns, dev, ip) in [
            (&hosts.a, &va, "10.77.0.1/24"),
            (&hosts.b, &vb, "10.77.0.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                rate, "burst", "256kb", "latency", "50ms",
            ]);
        }
        hosts
    }

    fn spawn_in(&self, ns: &str, name: &str, args: &[&str], log: &std::path::Path) -> Proc {
        let err = std::fs::File::create(log).unwrap();
        Proc(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(bin(name))
                .args(args)
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// Runs a move between the two hosts and returns the destination's stats
/// after checking the guest across it.
fn move_between(
    hosts: &TwoHosts,
    dir: &Scratch,
    shape: (&str, u32, &str),
    guest: &str,
    src_args: &[&str],
) -> serde_json::Value {
    let (mem, vcpus, after) = shape;
    let mut dst = hosts.spawn_in(
        &hosts.b.clone(),
        "ferry-dest",
        &strs(&dest_args(dir, "10.77.0.2:7000")),
        &dir.path("dst.err"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut args = source_args(dir, mem, vcpus, guest, "10.77.0.2:7000", after);
    args.extend(src_args.iter().map(|s| s.to_string()));
    let (dst_log, dst_json, src_log) = (
        dir.path("dst.log"),
        dir.path("dst.json"),
        dir.path("src.log"),
    );
    let mut src = hosts.spawn_in(
        &hosts.a.clone(),
        "ferry-source",
        &strs(&args),
        &dir.path("src.err"),
    );
    assert!(
        wait_exit(&mut src, WAIT, "the source"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let stats = wait_stats(&dst_json, WAIT);
    assert_eq!(stats["guest_bad"], 0, "{stats}");
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
    let hosts = TwoHosts::new(&format!("fz{}", std::process::id() % 10000), "100mbit");
    let guest = "ws=32M pattern=random write=100 report_ms=50";

    let dir = Scratch::new("noconv");
    let pre = move_between(
        &hosts,
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
        &hosts,
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
    let hosts = TwoHosts::new(&format!("fy{}", std::process::id() % 10000), "1gbit");
    let guest = "ws=256M pattern=random write=80 report_ms=50";
    let stats = move_between(&hosts, &dir, ("1G", 2, "2s"), guest, &[]);
    // The link really was the limit: no faster than 1 Gbit/s on average.
    let total_ms = stats["total_ms"].as_f64().unwrap();
    let wire = stats["bytes_wire"].as_u64().unwrap() as f64;
    assert!(
        wire * 8.0 / (total_ms / 1e3) < 1.1e9,
        "faster than the 1 Gbit/s link: {stats}"
    );
    eprintln!("two-host stats: {stats}");
}
