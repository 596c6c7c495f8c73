//! Post-copy live migration on real KVM and userfaultfd, judged by the
//! workload guest: it must keep ticking, continue its rounds, and never
//! print BAD; the statistics must show how the pages moved.

mod common;

use common::*;
use std::process::Command;

/// The destination's statistics of a post-copy move; `stats["source"]` is
/// the page server's count as of `PushDone`.
fn check_stats(s: &serde_json::Value, mem: u64) {
    assert_eq!(s["mode"], "postcopy");
    assert_eq!(s["pages_total"], mem / 4096, "{s}");
    assert_postcopy_accounting(s, &s["source"]);
    let down = s["downtime_us"].as_u64().unwrap();
    assert!(down > 0 && down < 5_000_000, "{s}");
}

/// The reference move: 1 GiB, a write-heavy random 256 MiB working
/// set, over loopback; checked from the guest's side and by the stats.
fn loopback_1g(vcpus: u32) -> Move {
    let dir = Scratch::new(&format!("pc{vcpus}"));
    let guest = "ws=256M pattern=random write=80 report_ms=50";
    let m = migrate(&dir, "1G", vcpus, guest, "2s", &[]);
    check_stats(&m.stats, 1 << 30);
    assert!(
        m.stats["pages_demand"].as_u64().unwrap() > 0,
        "no demand faults: {}",
        m.stats
    );
    assert_continues(&m.src_log, &m.dst_log, vcpus);
    assert_stall_covers_downtime(&m.src_log, &m.dst_log, vcpus, &m.stats);
    // A destination that may use more than one CPU installs the push on a
    // thread of its own.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expected = if cpus > 1 { "pipelined" } else { "inline" };
    assert_eq!(
        m.stats["push_install"], expected,
        "{cpus} CPUs: {}",
        m.stats
    );
    m
}

/// A destination allowed onto one CPU only installs each push frame on the
/// thread that reads it, straight from the connection's buffer (no second
/// thread could run beside it): the guest still finds every page it wrote.
#[test]
fn a_destination_on_one_cpu_installs_the_push_as_it_reads_it() {
    let dir = Scratch::new("pc-inline");
    let guest = "ws=256M pattern=random write=80 report_ms=50";
    let m = migrate_to(&dir, ("1G", 1, guest), "2s", &[], Some(0));
    check_stats(&m.stats, 1 << 30);
    assert_eq!(m.stats["push_install"], "inline", "{}", m.stats);
    assert!(
        m.stats["pages_pushed"].as_u64().unwrap() > 0,
        "nothing pushed: {}",
        m.stats
    );
    assert_continues(&m.src_log, &m.dst_log, 1);
}

#[test]
fn loopback_postcopy_1_vcpu_1g_write_heavy() {
    loopback_1g(1);
}

#[test]
fn loopback_postcopy_2_vcpus_1g_write_heavy() {
    let m = loopback_1g(2);
    // Faults are attributed to the vCPU that took them: both vCPUs touch
    // their part of the working set at once, so both fault.
    let per = m.stats["fault_latency_us"]["per_vcpu"].as_object().unwrap();
    for v in ["0", "1"] {
        let count = per.get(v).and_then(|l| l["count"].as_u64()).unwrap_or(0);
        assert!(count > 0, "no faults attributed to vCPU {v}: {per:?}");
    }
}

#[test]
fn mostly_zero_4g_guest_moves_only_what_it_touched() {
    let dir = Scratch::new("zero4g");
    let m = migrate(
        &dir,
        "4G",
        1,
        "ws=64M pattern=random write=50 report_ms=50",
        "1s",
        &[],
    );
    check_stats(&m.stats, 4 << 30);
    let wire = m.stats["bytes_wire"].as_u64().unwrap();
    // 64 MiB working set + the guest image and page tables; not 4 GiB.
    assert!(
        wire < 96 << 20,
        "moved {} MiB for a 64 MiB working set",
        wire >> 20
    );
    assert!(m.stats["pages_zero"].as_u64().unwrap() > (4u64 << 30) / 4096 * 9 / 10);
    assert_continues(&m.src_log, &m.dst_log, 1);
    assert_stall_covers_downtime(&m.src_log, &m.dst_log, 1, &m.stats);
}

/// A → B → A → B: each hop's destination is an ordinary VM that moves again.
#[test]
fn ping_pong_three_hops() {
    let dir = Scratch::new("pingpong");
    let guest = "ws=128M pattern=random write=80 report_ms=50";
    let (mut dests, addrs) = spawn_hops(&dir, 3);
    let src_log = dir.path("src.log");
    let args = source_args(&dir, "512M", 2, guest, &addrs[0], "1s");
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    assert!(
        wait_exit(&mut src, WAIT, "hop 0"),
        "{}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let mut prev = read_console(&src_log);
    for i in 0..3 {
        let stats = wait_stats(&dir.path(&format!("hop{i}.json")), WAIT);
        check_stats(&stats, 512 << 20);
        let log = wait_ticks(&dir.path(&format!("hop{i}.log")), 2, 5, WAIT);
        assert_continues(&prev, &log, 2);
        assert_stall_covers_downtime(&prev, &log, 2, &stats);
        if i < 2 {
            let sock = dir.path(&format!("hop{i}.sock"));
            ctl(&sock, &["migrate", &addrs[i + 1]]);
            assert!(
                wait_exit(&mut dests[i], WAIT, "hop to exit"),
                "hop {i} did not exit cleanly"
            );
            prev = read_console(&dir.path(&format!("hop{i}.log")));
        } else {
            ctl(&dir.path(&format!("hop{i}.sock")), &["quit"]);
        }
    }
}

/// Hot-first push (`--hot-window`): the pages the guest wrote in the
/// window before the pause go first, in dense chunks. The guest's hot
/// tenth sits at the top of its working set, where a page-order sweep
/// arrives last; the hot set is out well before the push ends, and the
/// guest never reads a wrong page.
#[test]
fn a_hot_window_pushes_the_pages_written_last_first() {
    let dir = Scratch::new("hot");
    let guest = "ws=256M pattern=hotcold hot_pct=99 hot_last=1 write=80 report_ms=50";
    let m = migrate(&dir, "1G", 1, guest, "2s", &["--hot-window", "100ms"]);
    check_stats(&m.stats, 1 << 30);
    let ps = &m.stats["source"];
    let hot = ps["pages_hot"].as_u64().unwrap();
    // The hot tenth of 256 MiB is 6,553 pages, all written in 100 ms; with
    // the guest's other writes (its generation table, stacks) and whole
    // 64-page chunks, a little more. Not the working set (65,536).
    assert!((6_000..20_000).contains(&hot), "pages_hot {hot}: {ps}");
    let (hot_ms, push_ms) = (
        ps["hot_ms"].as_f64().unwrap(),
        ps["push_ms"].as_f64().unwrap(),
    );
    assert!(
        hot_ms > 0.0 && hot_ms < push_ms / 2.0,
        "hot set out at {hot_ms} ms of a {push_ms} ms push: {ps}"
    );
    assert_continues(&m.src_log, &m.dst_log, 1);
    assert_stall_covers_downtime(&m.src_log, &m.dst_log, 1, &m.stats);
}

/// Fault-around: a guest that walks its working set in order faults on
/// consecutive pages, so each demand request grows to fetch the pages
/// after the faulting one (up to 32); the guest sees every page right.
#[test]
fn a_sequential_guest_gets_its_next_pages_with_each_fault() {
    let dir = Scratch::new("seq");
    let guest = "ws=256M pattern=seq write=80 report_ms=50";
    let m = migrate(&dir, "1G", 1, guest, "2s", &[]);
    check_stats(&m.stats, 1 << 30);
    let (around, demand) = (
        m.stats["fault_around_pages"].as_u64().unwrap(),
        m.stats["pages_demand"].as_u64().unwrap(),
    );
    assert!(demand > 0, "{}", m.stats);
    // Windows of up to 32 pages: well over one extra page per fault.
    assert!(
        around > 4 * demand,
        "around {around}, demand {demand}: {}",
        m.stats
    );
    assert_continues(&m.src_log, &m.dst_log, 1);
}

/// The system's TCP congestion control, and another one this kernel has
/// (so that a move that reports it cannot have kept the system's).
fn another_congestion_control() -> (String, String) {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
            .unwrap()
            .trim()
            .to_string()
    };
    let system = read("tcp_congestion_control");
    let available = read("tcp_available_congestion_control");
    let other = available
        .split_whitespace()
        .find(|a| *a != system)
        .unwrap_or_else(|| panic!("only {system:?} here: no other algorithm to ask for"))
        .to_string();
    (system, other)
}

/// `ferry-source --tcp-congestion NAME`: the move's connections use NAME
/// (the source's statistics read it back from the socket, and it is not
/// the system's), and the guest moves as it does with the system's.
#[test]
fn the_source_sends_with_the_congestion_control_asked_for() {
    let (system, other) = another_congestion_control();
    let dir = Scratch::new("cc");
    let guest = "ws=64M pattern=random write=80 report_ms=50";
    let m = migrate(&dir, "512M", 1, guest, "1s", &["--tcp-congestion", &other]);
    check_stats(&m.stats, 512 << 20);
    assert_continues(&m.src_log, &m.dst_log, 1);
    let src = wait_stats(&dir.path("src.json"), WAIT);
    assert_eq!(
        src["source"]["tcp_congestion"],
        other.as_str(),
        "asked for {other} (the system's is {system}): {src}"
    );
}

/// A congestion control this kernel lacks ends the move before the
/// pause: `ferry-ctl migrate` fails naming it, and the guest goes on
/// running on the source. A name that cannot be one is refused by the
/// API before anything happens.
#[test]
fn a_congestion_control_the_kernel_lacks_leaves_the_vm_running_here() {
    let dir = Scratch::new("cc-missing");
    let (_dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let _src = spawn_guest_source(&dir, "256M", 1, "ws=64M report_ms=50", &[]);
    let mut ctl_run = migrate_once_ticking_with(&dir, &addr, &["--tcp-congestion", "nosuchalgo"]);
    let status = wait_for(WAIT, "ferry-ctl migrate to end", || {
        ctl_run.0.try_wait().unwrap()
    });
    assert!(!status.success(), "a move with nosuchalgo went through");
    let err = std::fs::read_to_string(dir.path("ctl.err")).unwrap();
    assert!(
        err.contains("nosuchalgo") && err.contains("no such algorithm"),
        "{err}"
    );
    assert_source_goes_on(&dir);
    let sock = dir.path("src.sock");

    let out = Command::new(bin("ferry-ctl"))
        .arg("--api")
        .arg(&sock)
        .args(["migrate", &addr, "--tcp-congestion", "Not A Name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a TCP congestion control name"), "{err}");
    assert_eq!(ctl(&sock, &["status"])["run_state"], "running");
}
