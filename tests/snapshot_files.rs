//! Damaged snapshot files are refused with a clear error and never start a VM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use ferry_engine::snapshot;
use ferry_engine::{ConsoleOutput, Vm};
use ferry_guest::GUEST_ELF;

/// Runs `ferry-dest --restore FILE` and returns (success, stderr, console).
fn try_restore(dir: &Scratch, file: &std::path::Path) -> (bool, String, String) {
    let console = dir.path("console.log");
    let _ = std::fs::remove_file(&console);
    let out = Command::new(bin("ferry-dest"))
        .args(["--restore", file.to_str().unwrap(), "--run-for", "2s"])
        .args(["--serial", console.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&console).unwrap_or_default(),
    )
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    let dir = Scratch::new("damaged");
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

    // The intact file restores and ticks: the damage below is what fails.
    let (ok, err, console) = try_restore(&dir, &good);
    assert!(ok, "good snapshot failed: {err}");
    assert!(
        console.contains("FERRY TICK"),
        "restored guest did not tick"
    );

    let state_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated-in-memory",
            bytes[..bytes.len() - 4096].to_vec(),
            "truncated",
        ),
        ("truncated-in-header", bytes[..20].to_vec(), "truncated"),
        ("empty", Vec::new(), "not a Ferry snapshot"),
        (
            "too-long",
            [bytes.clone(), vec![0; 4096]].concat(),
            "too long",
        ),
        (
            "wrong-version",
            patch(&bytes, 8, &[2, 0, 0, 0]),
            "version 2 is not supported",
        ),
        (
            "bad-magic",
            patch(&bytes, 0, b"XXXX"),
            "not a Ferry snapshot",
        ),
        (
            "flip-in-state",
            flip(&bytes, 48 + state_len / 2),
            "checksum mismatch",
        ),
        (
            "flip-in-memory",
            flip(&bytes, bytes.len() - 1000),
            "memory checksum mismatch",
        ),
        (
            "huge-mem-size",
            patch(&bytes, 16, &u64::MAX.to_le_bytes()),
            "memory size",
        ),
    ];
    for (name, data, expect) in cases {
        let f = dir.path(&format!("{name}.snap"));
        std::fs::write(&f, &data).unwrap();
        let (ok, err, console) = try_restore(&dir, &f);
        assert!(!ok, "{name}: restore succeeded");
        assert!(
            err.contains(expect),
            "{name}: error {err:?} does not say {expect:?}"
        );
        assert!(!err.contains("panicked"), "{name}: panicked: {err}");
        assert!(console.is_empty(), "{name}: a guest ran: {console}");
    }
    let (ok, err, _) = try_restore(&dir, &dir.path("missing.snap"));
    assert!(!ok && err.contains("No such file"), "{err}");
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
