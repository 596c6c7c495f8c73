//! A source killed with SIGKILL after the switch-over is not the end of the
//! VM: its guest RAM lives in a file (`--mem-file`) with a session record,
//! and `ferry-source --resume FILE` finishes the move.

mod common;

use common::*;

#[test]
fn a_killed_source_is_resumed_from_its_memory_file() {
    let dir = Scratch::new("srccrash");
    let p = |f: &str| dir.path(f).to_string_lossy().into_owned();
    let mem_file = MemFile::new("ram");
    let record = mem_file.record();
    let (mut dst, addr) = spawn_dest(
        &dir,
        "dst",
        &[
            "--serial",
            &p("dst.log"),
            "--stats-json",
            &p("dst.json"),
            "--api",
            &p("dst.sock"),
            "--peer-timeout",
            "2s",
            "--recovery-window",
            "30s",
        ],
    );
    let (mut src, _ctl) = start_postcopy_from_file(
        &dir,
        ("2G", "ws=1G pattern=random write=80 report_ms=20"),
        &mem_file,
        &addr,
    );
    assert!(record.exists(), "no session record");
    src.0.kill().unwrap();
    let _ = src.0.wait();
    // A new process finishes the move from the file.
    let mut resumed = spawn(
        "ferry-source",
        &[
            "--resume",
            mem_file.arg(),
            "--stats-json",
            &p("resumed.json"),
        ],
        &dir.path("resumed.err"),
    );
    let ok = wait_exit(&mut resumed, WAIT, "the resumed source to finish");
    let errs = format!(
        "{}\n{}",
        std::fs::read_to_string(dir.path("resumed.err")).unwrap_or_default(),
        std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default()
    );
    assert!(ok, "{errs}");
    // The resumed source removes both once the destination has every page.
    assert!(!mem_file.path().exists(), "the memory file stays behind");
    assert!(!record.exists(), "the session record stays behind");
    let s = wait_stats(&dir.path("dst.json"), WAIT);
    assert!(s["recoveries"].as_u64().unwrap() >= 1, "{s}");
    let r = wait_stats(&dir.path("resumed.json"), WAIT);
    assert!(r["source"]["recoveries"].as_u64().unwrap() >= 1, "{r}");
    let dst_log = wait_ticks(&dir.path("dst.log"), 1, 5, WAIT);
    let src_log = read_console(&dir.path("src.log"));
    assert_continues(&src_log, &dst_log, 1);
    for l in [&src_log, &dst_log] {
        assert!(bad_lines(l).is_empty(), "{:?}", bad_lines(l));
    }
    assert_eq!(
        ctl(&dir.path("dst.sock"), &["status"])["run_state"],
        "running"
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}
