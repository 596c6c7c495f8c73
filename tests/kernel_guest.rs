//! A `--kernel` guest that prints nothing moves like any other: the
//! migration path never waits on guest output, so `Complete` follows the
//! last page at once and the source's memory is released.

mod common;

use common::*;

/// Moves the silent kernel (`ferry_guest::SILENT_ELF`) from `ferry-source
/// --kernel` to `ferry-dest`, in `mode`, and checks what a user would see.
fn silent_kernel_moves(mode: &str) {
    let dir = Scratch::new(&format!("silent-{mode}"));
    let kernel = dir.path("silent.elf");
    std::fs::write(&kernel, ferry_guest::SILENT_ELF).unwrap();
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])));
    let mut src = spawn(
        "ferry-source",
        &[
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            dir.path("src.log").to_str().unwrap(),
            "--mode",
            mode,
            "--migrate-to",
            &addr,
            "--after",
            "1s",
            "--stats-json",
            dir.path("src.json").to_str().unwrap(),
        ],
        &dir.path("src.err"),
    );
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let s = wait_stats(&dir.path("src.json"), WAIT);
    let pages = s["pages_total"].as_u64().unwrap();
    assert_eq!(pages, (256 << 20) / 4096, "{s}");
    // The kernel printed nothing on either side.
    for log in ["src.log", "dst.log"] {
        let text = std::fs::read_to_string(dir.path(log)).unwrap_or_default();
        assert!(text.is_empty(), "{log}: {text:?}");
    }
    // The source learns of completion right after the last page lands: it
    // measures from its own start to `Complete`, the destination from the
    // same start to its last page. Waiting on guest output (as the engine
    // once did, up to 10 s) would show here as seconds.
    let migration_ms = s["source"]["migration_ms"].as_f64().unwrap();
    let total_ms = s["total_ms"].as_f64().unwrap();
    assert!(
        migration_ms < total_ms + 1000.0,
        "Complete came {:.0} ms after the last page: {s}",
        migration_ms - total_ms
    );
    // The kernel's counters moved and keep moving: the destination's
    // memory holds the 4096 counter pages, non-zero, and the VM runs.
    let sock = dir.path("dst.sock");
    // The source exits on `Complete`, which the destination sends once it
    // runs the VM with every page: its status says so at once, even while
    // its side of the move is still writing statistics.
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    assert_eq!(status["migration"]["stage"], "completed", "{status}");
    // Other requests are refused as busy until that is done; the full
    // status (with the VM's shape) says it is.
    wait_status(&sock, "the move to return", |v| v["vcpus"].is_number());
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    let r = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    let stored = r["snapshot"]["pages_stored"].as_u64().unwrap();
    assert!(stored >= 4096, "counter pages stored: {stored}: {r}");
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

#[test]
fn silent_kernel_moves_postcopy() {
    silent_kernel_moves("postcopy");
}

#[test]
fn silent_kernel_moves_stop_and_copy() {
    silent_kernel_moves("stop-and-copy");
}
