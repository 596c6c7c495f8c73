//! Helpers shared by the integration tests: spawning Ferry's binaries,
//! reading the guest's timestamped console log, and waiting for the guest.
#![allow(dead_code)]

pub mod disk_log;
pub mod hostile;
pub mod proxy;
pub mod tap;

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

/// A source's `--mem-file`: guest RAM in `/dev/shm` (tmpfs, as a
/// deployment would use), named uniquely for this run, and its session
/// record. Both are removed on drop: a test that fails or is killed before
/// the source finishes must not leave a guest's RAM in memory.
pub struct MemFile(PathBuf);

impl MemFile {
    /// A new, unused name tagged `tag`.
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self(PathBuf::from(format!(
            "/dev/shm/ferry-test-{tag}-{}-{nanos}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }

    /// Where the source writes its session record.
    pub fn record(&self) -> PathBuf {
        let mut record = self.0.as_os_str().to_owned();
        record.push(".session");
        record.into()
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.record());
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
    spawn_command(Command::new(bin(name)), name, args, log)
}

/// Spawns Ferry's `name` in the network namespace of `side`, its stderr in
/// `log`.
pub fn spawn_on(
    net: &ferry_tools::netns::Net,
    side: ferry_tools::netns::Side,
    name: &str,
    args: &[&str],
    log: &Path,
) -> Proc {
    spawn_command(net.command(side, &bin(name)), name, args, log)
}

/// Spawns Ferry's `name` allowed onto CPU `cpu` only (`taskset`), its
/// stderr in `log`.
pub fn spawn_pinned(cpu: usize, name: &str, args: &[&str], log: &Path) -> Proc {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(bin(name));
    spawn_command(cmd, name, args, log)
}

fn spawn_command(mut cmd: Command, name: &str, args: &[&str], log: &Path) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    Proc(
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}")),
    )
}

/// What `ferry-ctl --api SOCK ARGS...` did.
fn ctl_output(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("ferry-ctl"))
        .arg("--api")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `ferry-ctl --api SOCK ARGS...` and returns its JSON output.
pub fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl_output(sock, args);
    assert!(
        out.status.success(),
        "ferry-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ferry-ctl --api SOCK ARGS...`, which must fail; returns its stderr.
pub fn ctl_refused(sock: &Path, args: &[&str]) -> String {
    let out = ctl_output(sock, args);
    assert!(
        !out.status.success(),
        "ferry-ctl {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ferry-ctl --api SOCK status`, or None while it cannot answer (the
/// socket not there yet, the process gone).
pub fn try_status(sock: &Path) -> Option<serde_json::Value> {
    let out = Command::new(bin("ferry-ctl"))
        .arg("--api")
        .arg(sock)
        .arg("status")
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `ferry-ctl status` on `sock` until `done` holds for the answer,
/// and returns that answer.
pub fn wait_status(
    sock: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(WAIT, what, || try_status(sock).filter(|s| done(s)))
}

/// Boots `guest` in a `mem` VM whose RAM lives in `mem_file` (a
/// `ferry-source` in `dir`: console `src.log`, API `src.sock`), moves it to
/// `to` once the guest ticks, and returns once post-copy runs: the source
/// and the `ferry-ctl migrate` (see [`migrate_once_ticking`]).
pub fn start_postcopy_from_file(
    dir: &Scratch,
    (mem, guest): (&str, &str),
    mem_file: &MemFile,
    to: &str,
) -> (Proc, Proc) {
    let args = console_args(
        dir,
        "src",
        &[
            "--mem",
            mem,
            "--guest-args",
            guest,
            "--mem-file",
            mem_file.arg(),
            "--migrate-to",
            to,
            "--after",
            "60m",
        ],
    );
    let src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    let ctl = migrate_once_ticking(dir, to);
    wait_stage(&dir.path("src.sock"), "postcopy");
    (src, ctl)
}

/// Runs `ferry-source ARGS` (stderr in `dir/src.err`) until its move ends,
/// which it must end successfully, and returns the destination's
/// statistics (`dir/dst.json`).
pub fn run_source(dir: &Scratch, args: &[String]) -> serde_json::Value {
    finish_source(
        dir,
        spawn("ferry-source", &strs(args), &dir.path("src.err")),
    )
}

/// Waits for `src`, a `ferry-source` in `dir`, to end its move
/// successfully, and returns the destination's statistics (`dir/dst.json`).
pub fn finish_source(dir: &Scratch, mut src: Proc) -> serde_json::Value {
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    wait_stats(&dir.path("dst.json"), WAIT)
}

/// Runs `ferry-source ARGS` (console `dir/src.log`) until its move ends,
/// and checks the guest continues on the destination (console
/// `dir/dst.log`, statistics `dir/dst.json`) with no BAD; returns those
/// statistics.
pub fn run_source_move(dir: &Scratch, args: &[String]) -> serde_json::Value {
    let stats = run_source(dir, args);
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    stats
}

/// `s` without its terminal colour sequences (`ESC [ ... m`), as a user
/// reads a log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts `n` listening destinations `hop0`, `hop1`, ... in `dir`, each
/// with its console, API socket and statistics named after it; returns
/// them and their addresses.
pub fn spawn_hops(dir: &Scratch, n: usize) -> (Vec<Proc>, Vec<String>) {
    (0..n)
        .map(|i| {
            let name = format!("hop{i}");
            spawn_dest(dir, &name, &strs(&io_args(dir, &name, &[])))
        })
        .unzip()
}

/// Waits until the migration stage in `sock`'s status is `stage`.
pub fn wait_stage(sock: &Path, stage: &str) -> serde_json::Value {
    wait_status(sock, stage, |v| v["migration"]["stage"] == stage)
}

/// Starts the move of the source in `dir` (API socket `src.sock`, console
/// `src.log`) to `to` with `ferry-ctl migrate`, once its guest has ticked
/// twice. The workload guest writes its whole working set before it ticks,
/// seconds for a large one on a loaded host, so a fixed `--after` could
/// start the move before the source has any tick to compare with. The
/// source's statistics go to `src.json`; the returned `ferry-ctl` exits
/// when the move ends.
pub fn migrate_once_ticking(dir: &Scratch, to: &str) -> Proc {
    migrate_once_ticking_with(dir, to, &[])
}

/// [`migrate_once_ticking`] with `extra` arguments to `ferry-ctl migrate`
/// (`--mode stop-and-copy`, say).
pub fn migrate_once_ticking_with(dir: &Scratch, to: &str, extra: &[&str]) -> Proc {
    wait_ticks(&dir.path("src.log"), 1, 2, WAIT);
    let (sock, json) = (dir.path("src.sock"), dir.path("src.json"));
    let mut args = vec![
        "--api",
        sock.to_str().unwrap(),
        "migrate",
        to,
        "--stats-json",
        json.to_str().unwrap(),
    ];
    args.extend(extra);
    spawn("ferry-ctl", &args, &dir.path("ctl.err"))
}

/// `--serial NAME.log --api NAME.sock` in `dir` (where a `ferry-source` or
/// `ferry-dest` prints the guest's console and takes API calls), then
/// `extra`.
pub fn console_args(dir: &Scratch, name: &str, extra: &[&str]) -> Vec<String> {
    let p = |ext: &str| {
        dir.path(&format!("{name}.{ext}"))
            .to_string_lossy()
            .into_owned()
    };
    let mut args = vec!["--serial".into(), p("log"), "--api".into(), p("sock")];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// [`console_args`] with the statistics in `dir/NAME.json` too.
pub fn io_args(dir: &Scratch, name: &str, extra: &[&str]) -> Vec<String> {
    let json = dir.path(&format!("{name}.json"));
    let mut args = console_args(dir, name, &["--stats-json", json.to_str().unwrap()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts `ferry-dest --restore SNAP` with `extra` arguments, its console
/// and API socket named `name` in `dir` ([`console_args`]) and its stderr in
/// `dir/NAME.err`.
pub fn spawn_restore(dir: &Scratch, name: &str, snap: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--restore", snap.to_str().unwrap()];
    args.extend(extra);
    spawn(
        "ferry-dest",
        &strs(&console_args(dir, name, &args)),
        &dir.path(&format!("{name}.err")),
    )
}

/// Boots the workload guest with `args` in a VM in this process, its
/// console in `log`, and lets it run.
pub fn boot_guest(mem: u64, vcpus: u32, args: &str, log: &Path) -> ferry_engine::Vm {
    let mut vm = ferry_engine::Vm::boot(
        mem,
        vcpus,
        ferry_guest::GUEST_ELF,
        args,
        ferry_engine::ConsoleOutput::File(log.into()),
    )
    .unwrap();
    vm.resume().unwrap();
    vm
}

/// One console line: host time (µs) and the parsed guest line.
#[derive(Debug, Clone)]
pub struct Logged {
    pub host_us: u64,
    pub line: GuestLine,
    pub text: String,
}

/// Where the guest's working set starts (guest physical), from its
/// `FERRY WS ... pa=0x...` line.
pub fn working_set_pa(log: &[Logged]) -> u64 {
    log.iter()
        .find_map(|l| {
            let rest = l.text.strip_prefix("FERRY WS ")?;
            let pa = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("pa=0x"))?;
            u64::from_str_radix(pa, 16).ok()
        })
        .expect("FERRY WS line")
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

/// Waits until the console log in `path` holds at least `n` lines.
pub fn wait_lines(path: &Path, n: usize, timeout: Duration, what: &str) -> Vec<Logged> {
    wait_for(timeout, what, || {
        let l = read_console(path);
        (l.len() >= n).then_some(l)
    })
}

/// Waits until the guest whose console log is `path` reports something
/// wrong, and returns its BAD lines.
pub fn wait_bad(path: &Path, timeout: Duration, what: &str) -> Vec<String> {
    wait_for(timeout, what, || {
        let b = bad_lines(&read_console(path));
        (!b.is_empty()).then_some(b)
    })
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

/// Waits until the `ferry-dest` in `p` has written the address it listens
/// on to `file` (its `--listen-addr-file`) and returns that address. Fails
/// at once, with its stderr (`err`), if the process exits first.
pub fn wait_listen_addr(p: &mut Proc, file: &Path, err: &Path) -> String {
    wait_for(WAIT, &format!("the address in {}", file.display()), || {
        if let Some(status) = p.0.try_wait().unwrap() {
            panic!(
                "ferry-dest exited ({status}) before listening: {}",
                std::fs::read_to_string(err).unwrap_or_default()
            );
        }
        let addr = std::fs::read_to_string(file).ok()?;
        addr.parse::<std::net::SocketAddr>()
            .unwrap_or_else(|e| panic!("{}: {addr:?}: {e}", file.display()));
        Some(addr)
    })
}

/// Starts `ferry-dest --listen 127.0.0.1:0` with `extra` arguments, its
/// stderr in `dir/<name>.err`, and waits until it listens; returns the
/// process and the address it bound.
pub fn spawn_dest(dir: &Scratch, name: &str, extra: &[&str]) -> (Proc, String) {
    let (file, err) = (
        dir.path(&format!("{name}.addr")),
        dir.path(&format!("{name}.err")),
    );
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--listen-addr-file",
        file.to_str().unwrap(),
    ];
    args.extend(extra);
    let mut p = spawn("ferry-dest", &args, &err);
    let addr = wait_listen_addr(&mut p, &file, &err);
    (p, addr)
}

/// Starts `ferry-dest` ([`spawn_dest`], named `dst`) with [`io_args`] and a
/// peer timeout and recovery window: `link` is `(--peer-timeout,
/// --recovery-window)`.
pub fn spawn_linked_dest(dir: &Scratch, link: (&str, &str)) -> (Proc, String) {
    let args = io_args(
        dir,
        "dst",
        &["--peer-timeout", link.0, "--recovery-window", link.1],
    );
    spawn_dest(dir, "dst", &strs(&args))
}

/// Starts `ferry-source` running `guest` in `mem` and moving it to `to`
/// after `after`, with [`io_args`] named `src` (stderr in `src.err`), a peer
/// timeout and recovery window (`link`, as for [`spawn_linked_dest`]) and
/// `extra` arguments.
pub fn spawn_linked_source(
    dir: &Scratch,
    (mem, guest): (&str, &str),
    to: &str,
    after: &str,
    link: (&str, &str),
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "--mem",
        mem,
        "--guest-args",
        guest,
        "--migrate-to",
        to,
        "--after",
        after,
        "--peer-timeout",
        link.0,
        "--recovery-window",
        link.1,
    ];
    args.extend(extra);
    spawn(
        "ferry-source",
        &strs(&io_args(dir, "src", &args)),
        &dir.path("src.err"),
    )
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

/// Per vCPU, the host time from its last TICK before a move to its first
/// TICK after it, in µs.
pub fn tick_gaps_us(before: &[Logged], after: &[Logged], vcpus: u32) -> Vec<u64> {
    (0..vcpus)
        .map(|v| {
            let last = ticks(before, v).last().expect("ticks before the move").2;
            let first = ticks(after, v).first().expect("ticks after the move").2;
            first.saturating_sub(last)
        })
        .collect()
}

/// The guest's stall across a move, from its logs: the largest TICK gap, µs.
pub fn stall_us(before: &[Logged], after: &[Logged], vcpus: u32) -> u64 {
    tick_gaps_us(before, after, vcpus)
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// No vCPU ticks while the VM is paused for the switch-over, so every
/// vCPU's TICK gap across the move spans the reported downtime (both sides
/// stamp lines with this host's clock).
pub fn assert_stall_covers_downtime(
    before: &[Logged],
    after: &[Logged],
    vcpus: u32,
    stats: &serde_json::Value,
) {
    let down = stats["downtime_us"].as_u64().expect("downtime_us");
    let gaps = tick_gaps_us(before, after, vcpus);
    assert!(
        gaps.iter().all(|&g| g >= down),
        "TICK gaps across the move {gaps:?} µs shorter than the {down} µs downtime"
    );
    eprintln!("TICK gaps across the move {gaps:?} µs, downtime {down} µs");
}

/// Checks the page accounting of a post-copy move (or lazy restore) in the
/// destination's statistics `s`, against `server`, the page server's own
/// counters (taken once its push was over, so its `pages_pushed` is final).
/// What each relation rests on is in `engine/src/migration/{dest,fault,
/// install}.rs` and the page server's sweep.
pub fn assert_postcopy_accounting(s: &serde_json::Value, server: &serde_json::Value) {
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("stats lack {k}: {s}"))
    };
    let server_pushed = server["pages_pushed"]
        .as_u64()
        .unwrap_or_else(|| panic!("no page-server count in {server}: {s}"));
    // Every push frame the server sent was received and counted once, as
    // data or as a zero run.
    assert_eq!(
        n("pages_pushed") + n("pages_zero"),
        server_pushed,
        "push frames lost or double-counted: {s}"
    );
    // The push sends each page at most once and never one the destination
    // preloaded itself (a replayed lazy restore), and a page it never
    // pushed was first sent in a demand answer (the faulting page or one
    // fetched around it), which installed it: so every page is counted at
    // least once. Not exactly once: a page demanded while its push frame
    // is on the wire is counted by both when the demand answer lands first.
    let preloaded = n("pages_preloaded");
    assert!(server_pushed + preloaded <= n("pages_total"), "{s}");
    assert!(
        n("pages_demand") + n("fault_around_pages") >= n("pages_total") - server_pushed - preloaded,
        "pages neither preloaded, pushed nor demanded: {s}"
    );
    // One latency sample per answered request; an answer that finds its
    // page already pushed counts as a prefetch hit instead of a demand page.
    let lat = &s["fault_latency_us"];
    let o = |k: &str| {
        lat["overall"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency lacks {k}: {s}"))
    };
    assert!(
        o("count") >= n("pages_demand") && o("count") - n("pages_demand") <= n("prefetch_hits"),
        "latency samples vs demand faults: {s}"
    );
    if o("count") > 0 {
        assert!(
            1 <= o("p50")
                && o("p50") <= o("p90")
                && o("p90") <= o("p99")
                && o("p99") <= o("p999")
                && o("p999") <= o("max"),
            "percentiles out of order: {s}"
        );
    }
    let per: u64 = lat["per_vcpu"]
        .as_object()
        .unwrap_or_else(|| panic!("no per-vCPU latency: {s}"))
        .values()
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!(per, o("count"), "per-vCPU samples do not add up: {s}");
    // Every data page pushed crossed the wire after the state, compressed
    // at most by the reported ratio (rounded to 0.01).
    let ratio = s["compression_ratio"].as_f64().unwrap();
    let floor = n("bytes_state") as f64 + (n("pages_pushed") * 4096) as f64 / (ratio + 0.005);
    assert!(
        n("bytes_wire") as f64 >= floor,
        "{} bytes on the wire, fewer than the {floor:.0} pushed: {s}",
        n("bytes_wire")
    );
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
    migrate_to(dir, (mem, vcpus, guest), after, source_args_extra, None)
}

/// [`migrate`] with the destination allowed onto CPU `dest_cpu` only, when
/// given; `vm` is the guest's `(mem, vcpus, args)`.
pub fn migrate_to(
    dir: &Scratch,
    (mem, vcpus, guest): (&str, u32, &str),
    after: &str,
    source_args_extra: &[&str],
    dest_cpu: Option<usize>,
) -> Move {
    let (args, err) = (dest_args(dir, "127.0.0.1"), dir.path("dst.err"));
    let mut dst = match dest_cpu {
        Some(cpu) => spawn_pinned(cpu, "ferry-dest", &strs(&args), &err),
        None => spawn("ferry-dest", &strs(&args), &err),
    };
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let mut args = source_args(dir, mem, vcpus, guest, &addr, after);
    args.extend(source_args_extra.iter().map(|s| s.to_string()));
    let (dst_log, dst_json, dst_sock, src_log, src_json) = (
        dir.path("dst.log"),
        dir.path("dst.json"),
        dir.path("dst.sock"),
        dir.path("src.log"),
        dir.path("src.json"),
    );
    args.extend(["--stats-json".into(), src_json.to_string_lossy().into()]);
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let stats = wait_stats(&dst_json, WAIT);
    // Nothing cut the links, so neither side may have lost one: a side
    // that closes a connection with bytes still coming makes TCP reset it.
    let src_stats = wait_stats(&src_json, WAIT);
    for (side, s) in [("source", &src_stats), ("destination", &stats)] {
        assert_eq!(
            s["recoveries"],
            0,
            "the {side} recovered a link no one cut: {s}\n{}",
            std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
        );
    }
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

/// The VM of a `ferry-source` in `dir` (API `src.sock`, console
/// `src.log`) still runs there after a refused move: its status says so
/// and its guest prints three more lines.
pub fn assert_source_goes_on(dir: &Scratch) {
    let status = ctl(&dir.path("src.sock"), &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    let seen = read_console(&dir.path("src.log")).len();
    wait_lines(
        &dir.path("src.log"),
        seen + 3,
        WAIT,
        "source ticks after the refusal",
    );
}

/// `ferry-dest --listen IP:0` writing the port it got to `dir/dst.addr`,
/// with the serial log, stats and API socket in `dir` (`dst.log`,
/// `dst.json`, `dst.sock`). An address off loopback takes `--insecure`:
/// the tests' namespaces carry plain TCP.
pub fn dest_args(dir: &Scratch, ip: &str) -> Vec<String> {
    let addr = dir.path("dst.addr");
    let listen = format!("{ip}:0");
    let mut args = vec![
        "--listen",
        &listen,
        "--listen-addr-file",
        addr.to_str().unwrap(),
    ];
    if !ip.starts_with("127.") {
        args.push("--insecure");
    }
    io_args(dir, "dst", &args)
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

/// Starts `ferry-source` running `guest`, with `extra` arguments, its
/// console, API socket and stderr in `dir` (`src.log`, `src.sock`,
/// `src.err`).
pub fn spawn_guest_source(
    dir: &Scratch,
    mem: &str,
    vcpus: u32,
    guest: &str,
    extra: &[&str],
) -> Proc {
    let vcpus = vcpus.to_string();
    let mut args = vec!["--mem", mem, "--vcpus", &vcpus, "--guest-args", guest];
    args.extend(extra);
    spawn(
        "ferry-source",
        &strs(&console_args(dir, "src", &args)),
        &dir.path("src.err"),
    )
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
    let mut src = spawn_guest_source(dir, mem, vcpus, guest, &[]);
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

/// The VM records a `ferry-dest --daemon` lists in its run directory `run`
/// (`vm-*.json`, not the statistics beside them).
pub fn daemon_records(run: &Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(run) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("vm-") && name.ends_with(".json") && !name.ends_with(".stats.json") {
            if let Some(v) = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                out.push(v);
            }
        }
    }
    out
}

/// Sends `hello` on a new connection to `addr`; returns what came back
/// (an error for `Abort`).
pub fn send_hello(
    addr: &str,
    hello: &ferry_protocol::Hello,
) -> Result<ferry_protocol::MsgType, String> {
    use ferry_protocol::{read_frame, write_frame, MsgType};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write_frame(&mut s, MsgType::Hello, 0, &hello.encode()).unwrap();
    let mut buf = Vec::new();
    read_frame(&mut s, &mut buf)
        .map(|h| h.kind)
        .map_err(|e| e.to_string())
}

/// A control `Hello` for session 0x5eed of one vCPU and `mem_size` bytes,
/// offering `features`.
pub fn hand_built(features: u64, mem_size: u64) -> ferry_protocol::Hello {
    ferry_protocol::Hello {
        version: ferry_protocol::PROTOCOL_VERSION,
        role: ferry_protocol::Role::Control,
        session_id: 0x5eed,
        features,
        mem_size,
        vcpus: 1,
        page_size: ferry_protocol::PAGE_SIZE as u32,
        options: Vec::new(),
    }
}

/// A `Hello` for `mem_size` bytes, more than the host has room to allocate
/// ahead, to a `ferry-dest --daemon --prealloc session` at `addr` (run
/// directory `run`, log `daemon_err`): the daemon still starts a VM process
/// for it, without `--prealloc` (nothing is allocated ahead), and says why,
/// naming the size; the VM process is then ended.
pub fn a_hello_without_room_is_not_allocated_ahead(
    addr: &str,
    run: &Path,
    daemon_err: &Path,
    mem_size: u64,
) {
    let hello = hand_built(ferry_protocol::features::SUPPORTED, mem_size);
    assert_eq!(
        send_hello(addr, &hello),
        Ok(ferry_protocol::MsgType::Redirect),
        "{}",
        std::fs::read_to_string(daemon_err).unwrap_or_default()
    );
    let vm = wait_for(WAIT, "the VM process's record", || {
        daemon_records(run).into_iter().next()
    });
    let pid = vm["pid"].as_u64().unwrap() as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains("--prealloc"), "{cmdline}");
    let log = strip_ansi(&std::fs::read_to_string(daemon_err).unwrap());
    let said = format!(
        "no room to allocate the guest's {} MiB of RAM ahead",
        mem_size >> 20
    );
    assert!(log.contains(&said), "{log}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(WAIT, "the daemon to reap the VM process", || {
        daemon_records(run).is_empty().then_some(())
    });
}

/// Fails with a clear reason when the pool cannot hold `mib` MiB.
pub fn need_pool(mib: u64) {
    let free = ferry_engine::memory::huge_pages_available()
        .expect("HugePages_Free and HugePages_Rsvd in /proc/meminfo");
    assert!(
        free * 2 >= mib,
        "these tests need {mib} MiB of free 2 MiB huge pages and the pool has {} MiB: \
         run scripts/setup.sh (or raise /proc/sys/vm/nr_hugepages)",
        free * 2
    );
}

/// One post-copy move of a 512 MiB guest (`guest`) through a proxy that cut
/// its push once, over: the scratch directory, the destination (`dst`)
/// and the source, both still running.
pub struct CutMove {
    /// The move's scratch directory.
    pub dir: Scratch,
    /// `ferry-dest`, named `dst` in `dir`.
    pub dst: Proc,
    /// `ferry-source`.
    pub src: Proc,
}

/// Moves a 512 MiB guest writing `guest` through a proxy that cuts the push
/// at a byte offset in its first 120 MiB drawn from `rng`, with a 2 s peer timeout and a 30 s recovery window,
/// plus `dest_extra` and `source_extra` flags: the cut fires once and the
/// move still completes (after a recovery). `name` names the scratch
/// directory.
pub fn move_through_a_cut(
    name: &str,
    rng: &mut Rng,
    guest: &str,
    dest_extra: &[&str],
    source_extra: &[&str],
) -> CutMove {
    use proxy::{Cut, Dir, Proxy};
    // The push carries ~256 MiB of non-zero pages; cut in its first 120.
    let cut = Cut::AtByte(Dir::ToDest, (1 << 20) + rng.below(120 << 20));
    let dir = Scratch::new(name);
    let mut dest_args = vec!["--peer-timeout", "2s", "--recovery-window", "30s"];
    dest_args.extend_from_slice(dest_extra);
    let (dst, addr) = spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &dest_args)));
    let proxy = Proxy::start(&addr, vec![cut]);
    let src = spawn_linked_source(
        &dir,
        ("512M", guest),
        &proxy.addr,
        "60m",
        ("2s", "30s"),
        source_extra,
    );
    let mut ctl_proc = migrate_once_ticking(&dir, &proxy.addr);
    assert!(
        wait_exit(&mut ctl_proc, WAIT, "the move to end"),
        "{name} {cut:?}: {}\n{}",
        std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default(),
        std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default()
    );
    assert_eq!(proxy.fired(), 1, "{name}: {cut:?} did not fire");
    CutMove { dir, dst, src }
}

/// A small xorshift generator: a test's randomness, from a seed it names or
/// prints.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock; the seed is printed, to replay a failure.
    pub fn from_clock() -> Self {
        let seed = ferry_engine::console::now_us() | 1;
        eprintln!("random seed {seed}");
        Rng(seed)
    }

    /// The next number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
