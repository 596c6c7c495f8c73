//! Helpers shared by the integration tests: spawning Ferry's binaries,
//! reading the guest's timestamped console log, and waiting for the guest.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_guest::{parse_line, GuestLine};

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "ferry-source" => env!("CARGO_BIN_EXE_ferry-source").into(),
        "ferry-dest" => env!("CARGO_BIN_EXE_ferry-dest").into(),
        "ferry-ctl" => env!("CARGO_BIN_EXE_ferry-ctl").into(),
        other => panic!("unknown binary {other}"),
    }
}

pub fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(bin(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}")),
    )
}

/// Runs `ferry-ctl --api SOCK ARGS...` and returns its JSON output.
pub fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("ferry-ctl"))
        .arg("--api")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One console line: host time (µs) and the parsed guest line.
#[derive(Debug, Clone)]
pub struct Logged {
    pub host_us: u64,
    pub line: GuestLine,
    pub text: String,
}

/// Reads a console log written by Ferry (`<secs>.<micros> <text>` lines).
pub fn read_console(path: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (stamp, rest) = l.split_once(' ')?;
            let (s, us) = stamp.split_once('.')?;
            let host_us = s.parse::<u64>().ok()? * 1_000_000 + us.parse::<u64>().ok()?;
            Some(Logged {
                host_us,
                line: parse_line(rest),
                text: rest.to_string(),
            })
        })
        .collect()
}

pub fn bad_lines(log: &[Logged]) -> Vec<String> {
    log.iter()
        .filter(|l| matches!(l.line, GuestLine::Bad { .. }))
        .map(|l| l.text.clone())
        .collect()
}

/// (round, timer_irqs) of each TICK from `vcpu`, in order.
pub fn ticks(log: &[Logged], vcpu: u32) -> Vec<(u64, u64, u64)> {
    log.iter()
        .filter_map(|l| match l.line {
            GuestLine::Tick {
                vcpu: v,
                round,
                timer_irqs,
                ..
            } if v == vcpu => Some((round, timer_irqs, l.host_us)),
            _ => None,
        })
        .collect()
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every vCPU in `0..vcpus` has printed at least `n` TICKs.
pub fn wait_ticks(path: &Path, vcpus: u32, n: usize, timeout: Duration) -> Vec<Logged> {
    wait_for(
        timeout,
        &format!("{n} ticks from {vcpus} vCPUs in {}", path.display()),
        || {
            let log = read_console(path);
            let bad = bad_lines(&log);
            assert!(bad.is_empty(), "guest reported BAD: {bad:?}");
            (0..vcpus).all(|v| ticks(&log, v).len() >= n).then_some(log)
        },
    )
}

/// Asserts that rounds and timer interrupts strictly grow across a log.
pub fn assert_progress(log: &[Logged], vcpus: u32) {
    for v in 0..vcpus {
        let t = ticks(log, v);
        assert!(t.len() >= 2, "vCPU {v} ticked {} times", t.len());
        for w in t.windows(2) {
            assert!(w[1].0 > w[0].0, "vCPU {v} round did not grow: {w:?}");
            assert!(w[1].1 >= w[0].1, "vCPU {v} timer count went back: {w:?}");
        }
        assert!(
            t.last().unwrap().1 > t[0].1,
            "vCPU {v}: no timer interrupts"
        );
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for a process to exit and returns whether it succeeded.
pub fn wait_exit(p: &mut Proc, timeout: Duration, what: &str) -> bool {
    wait_for(timeout, what, || p.0.try_wait().unwrap()).success()
}

/// Reads a stats JSON file once it exists and parses.
pub fn wait_stats(path: &Path, timeout: Duration) -> serde_json::Value {
    wait_for(timeout, &format!("stats in {}", path.display()), || {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    })
}

/// Checks a move from the guest's point of view: the destination's rounds
/// continue above the source's last ones, timers tick, no BAD anywhere.
pub fn assert_continues(before: &[Logged], after: &[Logged], vcpus: u32) {
    assert!(
        bad_lines(before).is_empty(),
        "BAD before the move: {:?}",
        bad_lines(before)
    );
    assert!(
        bad_lines(after).is_empty(),
        "BAD after the move: {:?}",
        bad_lines(after)
    );
    assert_progress(after, vcpus);
    for v in 0..vcpus {
        let last = *ticks(before, v).last().expect("source ticks");
        let first = ticks(after, v)[0];
        assert!(
            first.0 > last.0,
            "vCPU {v} rounds went back: {last:?} then {first:?}"
        );
        assert!(first.1 >= last.1, "vCPU {v} timer count went back");
    }
}

/// How long a whole move may take in a test.
pub const WAIT: Duration = Duration::from_secs(120);

/// A finished move: the destination's statistics and both console logs.
pub struct Move {
    pub stats: serde_json::Value,
    pub src_log: Vec<Logged>,
    pub dst_log: Vec<Logged>,
}

/// Boots a guest in `ferry-source`, migrates it to a `ferry-dest` after
/// `after`, and waits for the destination to tick a few times.
pub fn migrate(
    dir: &Scratch,
    mem: &str,
    vcpus: u32,
    guest: &str,
    after: &str,
    source_args_extra: &[&str],
) -> Move {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _dst = spawn(
        "ferry-dest",
        &strs(&dest_args(dir, &addr)),
        &dir.path("dst.err"),
    );
    let mut args = source_args(dir, mem, vcpus, guest, &addr, after);
    args.extend(source_args_extra.iter().map(|s| s.to_string()));
    let (dst_log, dst_json, dst_sock, src_log) = (
        dir.path("dst.log"),
        dir.path("dst.json"),
        dir.path("dst.sock"),
        dir.path("src.log"),
    );
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let stats = wait_stats(&dst_json, WAIT);
    let before = read_console(&src_log);
    let after_log = wait_ticks(&dst_log, vcpus, 3, WAIT);
    let status = ctl(&dst_sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    ctl(&dst_sock, &["quit"]);
    Move {
        stats,
        src_log: before,
        dst_log: after_log,
    }
}

/// `ferry-dest --listen ADDR` with the serial log, stats and API socket in
/// `dir` (`dst.log`, `dst.json`, `dst.sock`).
pub fn dest_args(dir: &Scratch, listen: &str) -> Vec<String> {
    let p = |f: &str| dir.path(f).to_string_lossy().into_owned();
    vec![
        "--listen".into(),
        listen.into(),
        "--serial".into(),
        p("dst.log"),
        "--stats-json".into(),
        p("dst.json"),
        "--api".into(),
        p("dst.sock"),
    ]
}

/// `ferry-source` running `guest` and migrating to `to` after `after`, its
/// serial log in `dir/src.log`.
pub fn source_args(
    dir: &Scratch,
    mem: &str,
    vcpus: u32,
    guest: &str,
    to: &str,
    after: &str,
) -> Vec<String> {
    [
        "--mem",
        mem,
        "--vcpus",
        &vcpus.to_string(),
        "--guest-args",
        guest,
        "--serial",
        &dir.path("src.log").to_string_lossy(),
        "--migrate-to",
        to,
        "--after",
        after,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Borrows a list of owned arguments.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A snapshot taken from a guest that ran in `ferry-source`.
pub struct Snapped {
    /// The snapshot file (`dir/vm.snap`).
    pub path: PathBuf,
    /// The API's answer to `snapshot` (sizes and times).
    pub answer: serde_json::Value,
    /// The source's console log up to the pause.
    pub before: Vec<Logged>,
}

/// Runs `guest` in `ferry-source` until every vCPU ticked `ticks` times,
/// pauses it (checked through `status`), snapshots it through the API and
/// quits the source.
pub fn snapshot_from_source(
    dir: &Scratch,
    mem: &str,
    vcpus: u32,
    guest: &str,
    ticks: usize,
) -> Snapped {
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let vcpus_s = vcpus.to_string();
    let mut src = spawn(
        "ferry-source",
        &[
            "--mem",
            mem,
            "--vcpus",
            &vcpus_s,
            "--guest-args",
            guest,
            "--serial",
            log.to_str().unwrap(),
            "--api",
            sock.to_str().unwrap(),
        ],
        &dir.path("src.err"),
    );
    wait_ticks(&log, vcpus, ticks, WAIT);
    ctl(&sock, &["pause"]);
    assert_eq!(ctl(&sock, &["status"])["run_state"], "paused");
    let path = dir.path("vm.snap");
    let answer = ctl(&sock, &["snapshot", path.to_str().unwrap()]);
    let before = read_console(&log);
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    Snapped {
        path,
        answer,
        before,
    }
}
