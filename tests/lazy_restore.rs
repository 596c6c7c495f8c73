//! Lazy snapshot restore (`ferry-dest --restore FILE --lazy`): the VM runs
//! at once and its memory follows through the post-copy path, served from
//! the file. Judged by the workload guest like a migration; damaged files
//! are refused before any VM runs, except for page data, which is verified
//! once it is all loaded.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use ferry_engine::snapshot;
use ferry_engine::{ConsoleOutput, Vm};
use ferry_guest::GUEST_ELF;

const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

#[test]
fn lazy_restore_of_a_1g_2_vcpu_write_heavy_guest() {
    let dir = Scratch::new("lazy");
    let (src_log, src_sock) = (dir.path("src.log"), dir.path("src.sock"));
    let mut src = spawn(
        "ferry-source",
        &[
            "--mem",
            "1G",
            "--vcpus",
            "2",
            "--guest-args",
            GUEST,
            "--serial",
            src_log.to_str().unwrap(),
            "--api",
            src_sock.to_str().unwrap(),
        ],
        &dir.path("src.err"),
    );
    // Past the fill: every vCPU has verified and rewritten pages a while.
    wait_ticks(&src_log, 2, 5, WAIT);
    ctl(&src_sock, &["pause"]);
    let snap = dir.path("vm.snap");
    let written = ctl(&src_sock, &["snapshot", snap.to_str().unwrap()]);
    let before = read_console(&src_log);
    ctl(&src_sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
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

/// Runs `ferry-dest --restore FILE --lazy` and returns (success, stderr,
/// console).
fn try_lazy(dir: &Scratch, file: &Path) -> (bool, String, String) {
    let console = dir.path("console.log");
    let _ = std::fs::remove_file(&console);
    let out = Command::new(bin("ferry-dest"))
        .args(["--restore", file.to_str().unwrap(), "--lazy"])
        .args(["--run-for", "2s", "--serial", console.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&console).unwrap_or_default(),
    )
}

#[test]
fn lazy_restore_refuses_damaged_files_and_catches_bad_page_data() {
    let dir = Scratch::new("lazy-damaged");
    let log = dir.path("boot.log");
    let mut vm = Vm::boot(
        64 << 20,
        1,
        GUEST_ELF,
        "ws=8M report_ms=50",
        ConsoleOutput::File(log.clone()),
    )
    .unwrap();
    vm.resume().unwrap();
    wait_ticks(&log, 1, 2, Duration::from_secs(60));
    vm.pause().unwrap();
    let good = dir.path("good.snap");
    let state = vm.save_state().unwrap();
    snapshot::write(&good, &state, vm.ram()).unwrap();
    drop(vm);
    let bytes = std::fs::read(&good).unwrap();

    let (ok, err, console) = try_lazy(&dir, &good);
    assert!(ok, "good snapshot failed: {err}");
    assert!(
        console.contains("FERRY TICK"),
        "restored guest did not tick"
    );
    assert!(!console.contains("FERRY BAD"), "{console}");

    // Damage outside the page data: refused before any VM runs.
    let state_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let refused: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated-in-memory",
            bytes[..bytes.len() - 4096].to_vec(),
            "truncated",
        ),
        ("empty", Vec::new(), "not a Ferry snapshot"),
        (
            "wrong-version",
            patch(&bytes, 8, &[2, 0, 0, 0]),
            "version 2 is not supported",
        ),
        (
            "flip-in-header-crc",
            flip(&bytes, 41),
            "header/state/bitmap checksum mismatch",
        ),
        (
            "flip-in-state",
            flip(&bytes, 48 + state_len / 2),
            "header/state/bitmap checksum mismatch",
        ),
        (
            "flip-in-bitmap",
            flip(&bytes, 48 + state_len + 10),
            "header/state/bitmap checksum mismatch",
        ),
        (
            "huge-mem-size",
            patch(&bytes, 16, &u64::MAX.to_le_bytes()),
            "memory size",
        ),
    ];
    for (name, data, expect) in refused {
        let f = dir.path(&format!("{name}.snap"));
        std::fs::write(&f, &data).unwrap();
        let (ok, err, console) = try_lazy(&dir, &f);
        assert!(!ok, "{name}: restore succeeded");
        assert!(
            err.contains(expect),
            "{name}: error {err:?} does not say {expect:?}"
        );
        assert!(!err.contains("panicked"), "{name}: panicked: {err}");
        assert!(console.is_empty(), "{name}: a guest ran: {console}");
    }

    // Damaged page data: the VM ran, the check after loading catches it.
    let f = dir.path("flip-in-memory.snap");
    std::fs::write(&f, flip(&bytes, bytes.len() - 1000)).unwrap();
    let (ok, err, _) = try_lazy(&dir, &f);
    assert!(!ok, "flip-in-memory: restore succeeded");
    assert!(
        err.contains("memory checksum mismatch"),
        "flip-in-memory: error {err:?}"
    );
    assert!(!err.contains("panicked"), "flip-in-memory: panicked: {err}");
}

fn patch(b: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v[at..at + with.len()].copy_from_slice(with);
    v
}

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v[at] ^= 0x04;
    v
}
