//! Templates (`ferry-ctl template/templates`, `ferry-dest --from-template
//! NAME --lazy`): a read-only snapshot of a running guest, from which ten
//! lazy clones start at once and run independently, while the template
//! file stays unchanged. Prints start times and memory figures.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const GUEST: &str = "ws=32M pattern=random write=80 report_ms=50";
const CLONES: usize = 10;

/// FNV-1a over the file: enough to see that it did not change.
fn checksum(path: &Path) -> u64 {
    std::fs::read(path)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// `ferry-ctl ARGS...` without a VM: its exit status and stdout/stderr.
fn ctl_raw(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("ferry-ctl")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Pss and Rss (kB) of a process, from /proc/PID/smaps_rollup.
fn pss_rss_kb(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Rss:"))
}

#[test]
fn ten_lazy_clones_of_one_template_run_independently() {
    let dir = Scratch::new("templates");
    let tdir = dir.path("templates");
    let td = tdir.to_str().unwrap();
    let (src_log, src_sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(&dir, "256M", 1, GUEST, &[]);
    wait_ticks(&src_log, 1, 5, WAIT);
    let before = read_console(&src_log);

    // Make the template from the running guest: it runs on afterwards.
    let made = ctl(&src_sock, &["template", "base", "--template-dir", td]);
    eprintln!("template: {made}");
    assert_eq!(made["resumed"], true, "{made}");
    let tpl = tdir.join("base.snap");
    assert_eq!(made["path"], tpl.to_str().unwrap(), "{made}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&tpl).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444, "template mode {mode:o}");
    }
    assert_eq!(ctl(&src_sock, &["status"])["run_state"], "running");
    let n = ticks(&read_console(&src_log), 0).len();
    wait_ticks(&src_log, 1, n + 2, WAIT);
    // No second template of that name, no names outside the directory; no
    // temporary files left behind.
    for bad in ["base", "../x", "a/b", ".."] {
        let (ok, _, err) = ctl_raw(&[
            "--api",
            src_sock.to_str().unwrap(),
            "template",
            bad,
            "--template-dir",
            td,
        ]);
        assert!(!ok, "template {bad:?} was accepted");
        eprintln!("template {bad:?} refused: {}", err.trim());
    }
    assert_eq!(ctl(&src_sock, &["status"])["run_state"], "running");
    let (ok, out, err) = ctl_raw(&["templates", "--template-dir", td]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "base", "{listed}");
    assert_eq!(
        listed[0]["size"].as_u64().unwrap(),
        std::fs::metadata(&tpl).unwrap().len()
    );
    assert!(listed[0]["mtime"].as_u64().unwrap() > 0, "{listed}");
    assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 1, "stray files");
    ctl(&src_sock, &["quit"]);
    let sum_before = checksum(&tpl);

    // Ten lazy clones at once.
    let spawned_us = ferry_engine::console::now_us();
    let clones: Vec<Proc> = (0..CLONES)
        .map(|i| {
            let name = format!("c{i}");
            let args = console_args(
                &dir,
                &name,
                &[
                    "--from-template",
                    "base",
                    "--lazy",
                    "--template-dir",
                    td,
                    "--vm-id",
                    &name,
                ],
            );
            spawn(
                "ferry-dest",
                &strs(&args),
                &dir.path(&format!("{name}.err")),
            )
        })
        .collect();
    let mut starts = Vec::new();
    for i in 0..CLONES {
        let log = dir.path(&format!("c{i}.log"));
        let after = wait_ticks(&log, 1, 3, WAIT);
        assert_continues(&before, &after, 1);
        let first = ticks(&after, 0)[0].2;
        starts.push(first.saturating_sub(spawned_us));
    }
    let mut sorted = starts.clone();
    sorted.sort_unstable();
    eprintln!(
        "spawn to first TICK per clone (ms): {:?}",
        starts.iter().map(|u| u / 1000).collect::<Vec<_>>()
    );
    eprintln!(
        "Nth clone to tick (ms after the spawn of all {CLONES}): {:?}",
        sorted.iter().map(|u| u / 1000).collect::<Vec<_>>()
    );
    // Let every clone load its memory and run a while.
    std::thread::sleep(Duration::from_secs(3));
    let (mut pss, mut rss) = (0, 0);
    for c in &clones {
        let (p, r) = pss_rss_kb(c.0.id());
        pss += p;
        rss += r;
    }
    eprintln!(
        "{CLONES} clones of a 256M guest: Pss {} MiB, Rss {} MiB in all",
        pss / 1024,
        rss / 1024
    );
    match Command::new("fincore").arg(&tpl).output() {
        Ok(o) if o.status.success() => eprintln!(
            "template page cache (fincore):\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        _ => eprintln!("fincore not available: template page-cache residency not measured"),
    }

    // Independence: two clones' memory, snapshotted after they ran,
    // differs; the template file did not change.
    let mut snaps = Vec::new();
    for i in 0..2 {
        let sock = dir.path(&format!("c{i}.sock"));
        let status = ctl(&sock, &["status"]);
        assert_eq!(status["run_state"], "running", "clone {i}: {status}");
        ctl(&sock, &["pause"]);
        let snap = dir.path(&format!("c{i}.snap"));
        ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
        ferry_engine::snapshot::Snapshot::open(&snap)
            .unwrap()
            .verify_memory()
            .unwrap();
        snaps.push(std::fs::read(&snap).unwrap());
        ctl(&sock, &["resume"]);
    }
    let differing = snaps[0]
        .chunks(4096)
        .zip(snaps[1].chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    eprintln!("the two clones' snapshots differ in {differing} 4K blocks");
    // The guest rewrites ~80% of 32M with random data: far more than the
    // few blocks of machine state.
    assert!(differing > 64, "clones did not diverge: {differing} blocks");
    for i in 0..CLONES {
        let log = read_console(&dir.path(&format!("c{i}.log")));
        assert!(
            bad_lines(&log).is_empty(),
            "clone {i}: {:?}",
            bad_lines(&log)
        );
        ctl(&dir.path(&format!("c{i}.sock")), &["quit"]);
    }
    assert_eq!(checksum(&tpl), sum_before, "the template file changed");
    drop(clones);
}
