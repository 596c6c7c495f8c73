//! Damaged snapshot files are refused with a clear error, eagerly and
//! lazily restored alike: damage outside the page data is found before any
//! VM runs; damaged page data is found before an eager restore runs the VM,
//! and by the check after loading in a lazy one. Never a panic.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use ferry_engine::snapshot;

/// Runs `ferry-dest --restore FILE [--lazy]`; returns (success, stderr, console).
fn try_restore(dir: &Scratch, file: &std::path::Path, lazy: bool) -> (bool, String, String) {
    let console = dir.path("console.log");
    let _ = std::fs::remove_file(&console);
    let out = Command::new(bin("ferry-dest"))
        .args(["--restore", file.to_str().unwrap(), "--run-for", "2s"])
        .args(["--serial", console.to_str().unwrap()])
        .args(if lazy { &["--lazy"][..] } else { &[] })
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&console).unwrap_or_default(),
    )
}

/// A snapshot of a small running guest, as bytes.
fn good_snapshot(dir: &Scratch) -> Vec<u8> {
    let log = dir.path("boot.log");
    let mut vm = boot_guest(64 << 20, 1, "ws=8M report_ms=50", &log);
    wait_ticks(&log, 1, 2, Duration::from_secs(60));
    vm.pause().unwrap();
    let good = dir.path("good.snap");
    let state = vm.save_state().unwrap();
    snapshot::write(&good, &state, vm.ram()).unwrap();
    std::fs::read(&good).unwrap()
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    let dir = Scratch::new("damaged");
    let bytes = good_snapshot(&dir);
    let good = dir.path("good.snap");
    let state_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let checksum = "header/state/bitmap checksum mismatch";
    let before_any_vm: Vec<(&str, Vec<u8>, &str)> = vec![
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
        ("flip-in-header-crc", flip(&bytes, 41), checksum),
        ("flip-in-state", flip(&bytes, 48 + state_len / 2), checksum),
        (
            "flip-in-bitmap",
            flip(&bytes, 48 + state_len + 10),
            checksum,
        ),
        (
            "huge-mem-size",
            patch(&bytes, 16, &u64::MAX.to_le_bytes()),
            "memory size",
        ),
    ];
    for lazy in [false, true] {
        let how = if lazy { "lazy" } else { "eager" };
        // The intact file restores and ticks: the damage below is what fails.
        let (ok, err, console) = try_restore(&dir, &good, lazy);
        assert!(ok, "{how}: good snapshot failed: {err}");
        assert!(
            console.contains("FERRY TICK"),
            "{how}: restored guest did not tick"
        );
        assert!(!console.contains("FERRY BAD"), "{how}: {console}");

        for (name, data, expect) in &before_any_vm {
            let f = dir.path(&format!("{name}.snap"));
            std::fs::write(&f, data).unwrap();
            let (ok, err, console) = try_restore(&dir, &f, lazy);
            assert!(!ok, "{how} {name}: restore succeeded");
            assert!(
                err.contains(expect),
                "{how} {name}: error {err:?} does not say {expect:?}"
            );
            assert!(!err.contains("panicked"), "{how} {name}: panicked: {err}");
            assert!(console.is_empty(), "{how} {name}: a guest ran: {console}");
        }

        let f = dir.path("flip-in-memory.snap");
        std::fs::write(&f, flip(&bytes, bytes.len() - 1000)).unwrap();
        let (ok, err, console) = try_restore(&dir, &f, lazy);
        assert!(!ok, "{how} flip-in-memory: restore succeeded");
        assert!(
            err.contains("memory checksum mismatch"),
            "{how} flip-in-memory: {err:?}"
        );
        assert!(
            !err.contains("panicked"),
            "{how} flip-in-memory: panicked: {err}"
        );
        if !lazy {
            assert!(
                console.is_empty(),
                "eager flip-in-memory: a guest ran: {console}"
            );
        }
    }
    let (ok, err, _) = try_restore(&dir, &dir.path("missing.snap"), false);
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

/// A snapshot replaces the file at its path whole, or not at all: a lazy
/// restore (or a template's clones) reading the old file while a new
/// snapshot is written over its path goes on reading the old one intact,
/// and a snapshot that cannot be written leaves the old file as it was
/// and no temporary file behind.
#[test]
fn a_snapshot_replaces_its_file_whole_or_not_at_all() {
    let dir = Scratch::new("snap-replace");
    let log = dir.path("boot.log");
    let mut vm = boot_guest(64 << 20, 1, "ws=8M report_ms=50", &log);
    wait_ticks(&log, 1, 2, Duration::from_secs(60));
    vm.pause().unwrap();
    let path = dir.path("vm.snap");
    snapshot::write(&path, &vm.save_state().unwrap(), vm.ram()).unwrap();
    let first = std::fs::read(&path).unwrap();
    let old = snapshot::Snapshot::open(&path).unwrap();

    // The guest runs on and writes other pages; a second snapshot goes to
    // the same path while the first is open.
    vm.resume().unwrap();
    let seen = read_console(&log).len();
    wait_lines(&log, seen + 4, Duration::from_secs(60), "more ticks");
    vm.pause().unwrap();
    snapshot::write(&path, &vm.save_state().unwrap(), vm.ram()).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), first);
    old.verify_memory()
        .expect("the open snapshot changed under its reader");

    // A write that fails (the directory is read-only, say: here a path
    // under a file) leaves no trace; one whose rename fails (the path is a
    // directory) leaves the directory and no temporary file.
    let blocked = dir.path("vm.snap/sub.snap");
    assert!(snapshot::write(&blocked, &vm.save_state().unwrap(), vm.ram()).is_err());
    let taken = dir.path("taken");
    std::fs::create_dir(&taken).unwrap();
    assert!(snapshot::write(&taken, &vm.save_state().unwrap(), vm.ram()).is_err());
    assert!(taken.is_dir());
    let left: Vec<_> = std::fs::read_dir(dir.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    snapshot::Snapshot::open(&path)
        .unwrap()
        .verify_memory()
        .unwrap();
}
