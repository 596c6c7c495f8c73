//! Once a move has committed, nothing that fails afterwards may undo it: a
//! statistics file that cannot be written must neither let the source's
//! copy run again nor make the destination drop the VM it now runs.

mod common;

use common::*;

/// Both sides' `--stats-json` name a directory, so the files cannot be
/// written once the move is done (the directory they are in exists, so the
/// check before the move passes). The `migrate` call still succeeds, says
/// what could not be written, and the source process ends (its VM moved);
/// the destination keeps running the guest, which finds every page.
#[test]
fn an_unwritable_stats_file_after_the_move_neither_resumes_the_source_nor_drops_the_vm() {
    let dir = Scratch::new("stats-after-commit");
    let (src_stats, dst_stats) = (dir.path("src-stats"), dir.path("dst-stats"));
    std::fs::create_dir(&src_stats).unwrap();
    std::fs::create_dir(&dst_stats).unwrap();
    let (mut dst, addr) = spawn_dest(
        &dir,
        "dst",
        &strs(&console_args(
            &dir,
            "dst",
            &["--stats-json", dst_stats.to_str().unwrap()],
        )),
    );
    let mut src = spawn_guest_source(&dir, "256M", 1, "ws=64M write=80 report_ms=50", &[]);
    let (src_log, src_sock) = (dir.path("src.log"), dir.path("src.sock"));
    wait_ticks(&src_log, 1, 2, WAIT);
    let answer = ctl(
        &src_sock,
        &[
            "migrate",
            &addr,
            "--stats-json",
            src_stats.to_str().unwrap(),
        ],
    );
    let unwritten = answer["stats_json_error"].as_str().unwrap_or_default();
    assert!(
        unwritten.contains("cannot write statistics") && unwritten.contains("src-stats"),
        "{answer}"
    );
    assert_eq!(answer["mode"], "postcopy", "{answer}");
    // The source's VM moved: its process ends rather than serve a VM that
    // runs elsewhere (a `resume` there would be a second copy).
    assert!(wait_exit(
        &mut src,
        WAIT,
        "the source to end after the move"
    ));
    let err = std::fs::read_to_string(dir.path("src.err")).unwrap();
    assert!(!err.contains("keeps running here"), "{err}");
    // The destination runs the VM, its guest intact.
    let status = ctl(&dir.path("dst.sock"), &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    assert!(status["held"].is_null(), "{status}");
    let after = wait_ticks(&dir.path("dst.log"), 1, 4, WAIT);
    assert_continues(&read_console(&src_log), &after, 1);
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("cannot write statistics"), "{err}");
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}

/// A `--stats-json` in a directory that does not exist is refused before
/// anything moves: the VM goes on running on the source.
#[test]
fn a_stats_file_in_a_missing_directory_is_refused_before_the_move() {
    let dir = Scratch::new("stats-missing-dir");
    let (_dst, addr) = spawn_dest(&dir, "dst", &strs(&console_args(&dir, "dst", &[])));
    let _src = spawn_guest_source(&dir, "256M", 1, "ws=32M write=80 report_ms=50", &[]);
    wait_ticks(&dir.path("src.log"), 1, 2, WAIT);
    let missing = dir.path("no-such-dir/s.json");
    let why = ctl_refused(
        &dir.path("src.sock"),
        &["migrate", &addr, "--stats-json", missing.to_str().unwrap()],
    );
    assert!(
        why.contains("no-such-dir") && why.contains("is not a directory"),
        "{why}"
    );
    assert_source_goes_on(&dir);
}
