//! Lazy snapshot restore (`ferry-dest --restore FILE --lazy`): the VM runs
//! at once and its memory follows through the post-copy path, served from
//! the file. Judged by the workload guest like a migration. Damaged files
//! are covered, eager and lazy alike, in `snapshot_files.rs`.

mod common;

use common::*;

const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

#[test]
fn lazy_restore_of_a_1g_2_vcpu_write_heavy_guest() {
    let dir = Scratch::new("lazy");
    // Past the fill: every vCPU has verified and rewritten pages a while.
    let Snapped {
        path: snap,
        answer: written,
        before,
    } = snapshot_from_source(&dir, "1G", 2, GUEST, 5);
    eprintln!("snapshot: {written}");

    let (dst_log, dst_json, dst_sock) = (
        dir.path("dst.log"),
        dir.path("dst.json"),
        dir.path("dst.sock"),
    );
    let _dst = spawn(
        "ferry-dest",
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--lazy",
            "--stats-json",
            dst_json.to_str().unwrap(),
            "--serial",
            dst_log.to_str().unwrap(),
            "--api",
            dst_sock.to_str().unwrap(),
        ],
        &dir.path("dst.err"),
    );
    let s = wait_stats(&dst_json, WAIT);
    eprintln!("lazy restore stats: {s}");
    let after = wait_ticks(&dst_log, 2, 3, WAIT);
    let status = ctl(&dst_sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    assert_continues(&before, &after, 2);
    ctl(&dst_sock, &["quit"]);

    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("stats lack {k}: {s}"))
    };
    assert_eq!(s["mode"], "postcopy");
    assert_eq!(n("guest_bad"), 0, "{s}");
    assert_eq!(n("pages_total"), (1u64 << 30) / 4096);
    assert!(
        n("pages_demand") + n("pages_pushed") + n("pages_zero") >= n("pages_total"),
        "{s}"
    );
    // From the start of the restore (open, validate, build the VM, restore
    // the state) until the vCPUs run: no page data is read first.
    assert!(
        n("downtime_us") > 0 && n("downtime_us") < 500_000,
        "downtime: {s}"
    );
    assert!(n("pages_demand") > 0, "no demand faults: {s}");
    assert!(s["fault_latency_us"]["overall"]["p50"].as_u64().unwrap() > 0);
    // The pages came from the file: data for the pages it stores, zero
    // markers (no data) for the others.
    let stored = written["snapshot"]["pages_stored"]
        .as_u64()
        .unwrap_or_else(|| panic!("snapshot answer: {written}"));
    assert!(
        stored > 0 && n("pages_pushed") <= stored,
        "{stored} stored: {s}"
    );
    assert!(
        n("pages_zero") <= n("pages_total") - stored,
        "{stored} stored: {s}"
    );
    assert!(
        n("pages_pushed") + n("pages_demand") >= stored,
        "{stored} stored: {s}"
    );
}

/// Clones: one snapshot restored into two VMs at once (one eagerly, one
/// lazily) gives two independent guests that both continue from it.
#[test]
fn one_snapshot_restores_into_two_running_clones() {
    let dir = Scratch::new("clones");
    let Snapped {
        path: snap, before, ..
    } = snapshot_from_source(
        &dir,
        "256M",
        1,
        "ws=64M pattern=random write=80 report_ms=50",
        3,
    );

    let mut clones = Vec::new();
    for (name, lazy) in [("eager", false), ("lazy", true)] {
        let log = dir.path(&format!("{name}.log"));
        let mut args = vec!["--restore", snap.to_str().unwrap(), "--run-for", "3s"];
        args.extend(["--serial", log.to_str().unwrap()]);
        if lazy {
            args.push("--lazy");
        }
        let clone = spawn("ferry-dest", &args, &dir.path(&format!("{name}.err")));
        clones.push((clone, log));
    }
    for (_, log) in &clones {
        let after = wait_ticks(log, 1, 4, WAIT);
        assert_continues(&before, &after, 1);
    }
}
