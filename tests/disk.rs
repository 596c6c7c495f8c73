//! virtio-blk disks that survive every move, judged by the workload guest
//! (`disk=1`) and by an offline check of the disk file.
//!
//! The guest writes 4 KiB blocks tagged with (block, generation), reads
//! them back, checks them against the generations it keeps in RAM, and
//! checks that every used-ring entry completes exactly one request in
//! flight. With `disk_ops=N` it stops after N requests and prints every
//! block's generation (`DISKGEN`), so the test can read the disk file and
//! find each block at exactly that generation (`ferry_guest::disk_block`).
//! Shared storage: source and destination open the same path.

mod common;

use std::path::Path;

use common::disk_log::final_gens;
use common::*;
use ferry_guest::{disk_block, GuestLine, DISK_BLOCK};

/// 2 MiB disks: 256 blocks of 4 KiB, what the guest uses by default.
const DISK_BYTES: u64 = 2 << 20;

/// Starts `ferry-source` with `args` (see `source_args`), the disk `disk`
/// and its API on `dir/src.sock`, its stderr in `dir/src.err`.
fn spawn_disk_source(dir: &Scratch, mut args: Vec<String>, disk: &Path) -> Proc {
    let sock = dir.path("src.sock");
    args.extend(
        [
            "--disk",
            disk.to_str().unwrap(),
            "--api",
            sock.to_str().unwrap(),
        ]
        .map(String::from),
    );
    spawn("ferry-source", &strs(&args), &dir.path("src.err"))
}

fn new_disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
}

/// Waits for `DISKEND` in the console log at `path` (no BAD meanwhile).
fn wait_disk_end(path: &Path) -> (Vec<Logged>, Vec<u32>) {
    wait_disk_end_within(path, WAIT)
}

fn wait_disk_end_within(path: &Path, wait: std::time::Duration) -> (Vec<Logged>, Vec<u32>) {
    let end = std::time::Instant::now() + wait;
    loop {
        let log = read_console(path);
        let bad = bad_lines(&log);
        assert!(bad.is_empty(), "guest reported BAD: {bad:?}");
        if log
            .iter()
            .any(|l| matches!(l.line, GuestLine::DiskEnd { .. }))
        {
            let g = final_gens(&log).unwrap_or_default();
            return (log, g);
        }
        if std::time::Instant::now() > end {
            let err = path.with_extension("err");
            let tail: Vec<_> = log.iter().rev().take(6).map(|l| l.text.clone()).collect();
            panic!(
                "no DISKEND in {}; last lines {tail:?}; {}: {}",
                path.display(),
                err.display(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every block of the disk file holds the generation the guest last wrote.
fn check_disk_file(path: &Path, gens: &[u32]) {
    assert!(
        !gens.is_empty(),
        "no generations to check {}",
        path.display()
    );
    let data = std::fs::read(path).unwrap();
    for (b, &g) in gens.iter().enumerate() {
        let got = &data[b * DISK_BLOCK..(b + 1) * DISK_BLOCK];
        if got != disk_block(b as u64, g).as_slice() {
            let word = |i: usize| u64::from_le_bytes(got[i * 8..i * 8 + 8].try_into().unwrap());
            panic!(
                "{}: block {b} is not at generation {g} (holds block {} generation {})",
                path.display(),
                word(1),
                word(2)
            );
        }
    }
    assert!(gens.iter().all(|&g| g >= 1), "every block is written first");
}

/// Waits until the guest whose console log is `log` reports more than
/// `above` disk operations.
fn wait_disk_ops(log: &Path, above: u64, what: &str) {
    wait_for(WAIT, what, || {
        disk_reports(&read_console(log))
            .last()
            .filter(|r| r.0 > above)
            .map(|_| ())
    });
}

/// The `DISK` reports of a log: (ops, errors, malformed, rejected).
fn disk_reports(log: &[Logged]) -> Vec<(u64, u64, u64, u64)> {
    log.iter()
        .filter_map(|l| match l.line {
            GuestLine::Disk {
                ops,
                errors,
                malformed,
                rejected,
            } => Some((ops, errors, malformed, rejected)),
            _ => None,
        })
        .collect()
}

/// How many requests the source's drain completed at its pause, from its
/// log (reported, not asserted: it depends on where the pause lands).
fn drained(err_log: &Path) -> Vec<u64> {
    std::fs::read_to_string(err_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("devices drained"))
        .filter_map(|l| {
            let plain = strip_ansi(l);
            let at = plain.find("requests=")? + "requests=".len();
            plain[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Moves a guest running the disk workload at full speed from
/// `ferry-source` to `ferry-dest` on a shared disk, in `mode`; checks the
/// guest's disk checks continue across the move with no BAD, and the file
/// afterwards. Returns what the source's drain completed at each pause.
fn move_with_disk(name: &str, mode: &str, extra: &[&str]) -> Vec<u64> {
    move_with(name, mode, "disk_ops=400000", "", "1s", extra)
}

fn move_with(
    name: &str,
    mode: &str,
    guest_extra: &str,
    disk_opts: &str,
    after: &str,
    extra: &[&str],
) -> Vec<u64> {
    let dir = Scratch::new(name);
    let disk = dir.path("shared.img");
    new_disk(&disk);
    let disk_arg = format!("{}{disk_opts}", disk.display());
    let mut dst = spawn(
        "ferry-dest",
        &strs(&dest_args(&dir, "127.0.0.1")),
        &dir.path("dst.err"),
    );
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let guest = format!("ws=64M report_ms=50 disk=1 disk_batch=8 {guest_extra}");
    let mut args = source_args(&dir, "256M", 2, &guest, &addr, after);
    args.extend(
        ["--mode", mode, "--disk", &disk_arg]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let stats = run_source(&dir, &args);
    assert_eq!(stats["mode"], mode, "{stats}");
    let (after, _) = wait_disk_end(&dir.path("dst.log"));
    let before = read_console(&dir.path("src.log"));
    assert!(bad_lines(&before).is_empty(), "{:?}", bad_lines(&before));
    assert!(
        final_gens(&before).is_none(),
        "the disk workload finished before the move"
    );
    // One console stream across the move: no line lost or doubled.
    let whole: Vec<Logged> = before.iter().chain(&after).cloned().collect();
    let gens = final_gens(&whole).expect("a DISKGEN line is missing");
    // The disk workload ran on the source and went on on the destination:
    // the counters continue (the guest's own state moved with its RAM).
    let src_ops = disk_reports(&before);
    let dst_ops = disk_reports(&after);
    let last_src = src_ops.last().expect("no DISK report before the move").0;
    let first_dst = dst_ops.first().expect("no DISK report after the move").0;
    assert!(last_src > 0, "the guest did no disk I/O before the move");
    assert!(
        first_dst >= last_src,
        "disk ops went back: {last_src} then {first_dst}"
    );
    assert!(dst_ops.iter().all(|r| r.1 == 0), "{dst_ops:?}");
    check_disk_file(&disk, &gens);
    // The destination's device served the requests after the move.
    let status = ctl(&dir.path("dst.sock"), &["status"]);
    let dev = &status["devices"][0];
    assert_eq!(dev["kind"], "blk", "{status}");
    assert_eq!(dev["path"], disk.to_str().unwrap(), "{status}");
    assert!(dev["writes"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(dev["errors"], 0, "{status}");
    assert_eq!(dev["malformed"], 0, "{status}");
    let drained = drained(&dir.path("src.err"));
    eprintln!(
        "{mode}: {last_src} disk ops before the move, {} in all; requests completed by the \
         source's drain at its pauses: {drained:?}; downtime {} us",
        dst_ops.last().unwrap().0,
        stats["downtime_us"]
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    drained
}

#[test]
fn shared_disk_survives_postcopy() {
    move_with_disk("disk-post", "postcopy", &[]);
}

#[test]
fn shared_disk_survives_precopy() {
    move_with_disk("disk-pre", "precopy", &["--max-rounds", "5"]);
}

#[test]
fn shared_disk_survives_stop_and_copy() {
    move_with_disk("disk-sac", "stop-and-copy", &[]);
}

#[test]
fn shared_disk_survives_hybrid() {
    move_with_disk("disk-hyb", "hybrid", &["--hybrid-rounds", "1"]);
}

/// The guest keeps 8 requests in flight while it is paused, and the
/// device serves each batch 50 ms after it is notified, so a pause usually
/// stops the vCPUs while a batch waits: the drain at the pause completes
/// it (the writes reach the file, then fdatasync) before any state is
/// saved. The source is paused and resumed through the API ten times
/// while the guest writes, then moved (post-copy); the destination must
/// neither redo nor lose a request: the guest checks that every used-ring
/// entry completes exactly one request in flight and every read against
/// its generations, and the file is checked offline. Some pause must have
/// found requests in flight (each does with high probability; the count
/// of each is reported).
#[test]
fn requests_in_flight_at_the_pause_complete_exactly_once() {
    let dir = Scratch::new("disk-pause");
    let disk = dir.path("shared.img");
    new_disk(&disk);
    let mut dst = spawn(
        "ferry-dest",
        &strs(&dest_args(&dir, "127.0.0.1")),
        &dir.path("dst.err"),
    );
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let guest = "ws=16M report_ms=50 disk=1 disk_batch=8 disk_ops=2500";
    let sock = dir.path("src.sock");
    let mut args = source_args(&dir, "256M", 1, guest, &addr, "5s");
    let disk_arg = format!("{},latency_us=50000", disk.display());
    args.extend(
        ["--disk", &disk_arg, "--api", sock.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    let log = dir.path("src.log");
    wait_disk_ops(&log, 0, "disk ops on the source");
    for _ in 0..10 {
        ctl(&sock, &["pause"]);
        ctl(&sock, &["resume"]);
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let stats = wait_stats(&dir.path("dst.json"), WAIT);
    let (after, _) = wait_disk_end(&dir.path("dst.log"));
    let before = read_console(&log);
    assert!(bad_lines(&before).is_empty(), "{:?}", bad_lines(&before));
    assert!(final_gens(&before).is_none(), "finished before the move");
    let whole: Vec<Logged> = before.iter().chain(&after).cloned().collect();
    let gens = final_gens(&whole).expect("a DISKGEN line is missing");
    check_disk_file(&disk, &gens);
    let drained = drained(&dir.path("src.err"));
    eprintln!(
        "requests completed by the drain at each pause (the last is the move's): {drained:?}; \
         downtime {} us",
        stats["downtime_us"]
    );
    assert_eq!(drained.len(), 11, "{drained:?}");
    assert!(
        drained.iter().sum::<u64>() > 0,
        "no request was in flight at any pause: {drained:?}"
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
}

/// A guest that submits malformed descriptor chains gets error statuses
/// for all of them, its good requests keep working, and the VMM runs on.
#[test]
fn malformed_chains_get_error_statuses() {
    let dir = Scratch::new("disk-bad");
    let disk = dir.path("d.img");
    new_disk(&disk);
    let _src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_bad=1 disk_ops=40000",
        &["--disk", disk.to_str().unwrap()],
    );
    let (log, gens) = wait_disk_end(&dir.path("src.log"));
    check_disk_file(&disk, &gens);
    let (_, errors, malformed, rejected) = *disk_reports(&log).last().unwrap();
    assert_eq!(errors, 0);
    assert!(malformed >= 10, "every kind at least once: {malformed}");
    assert_eq!(malformed, rejected, "a malformed chain was not refused");
    let status = ctl(&dir.path("src.sock"), &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    let dev = &status["devices"][0];
    // Chains with a status byte got IOERR/UNSUPP; the others came back
    // empty. Either way the device counted them.
    let counted = dev["errors"].as_u64().unwrap() + dev["malformed"].as_u64().unwrap();
    assert_eq!(counted, malformed, "{status}");
    assert!(dev["errors"].as_u64().unwrap() > 0, "{status}");
    assert!(dev["malformed"].as_u64().unwrap() > 0, "{status}");
    // The guest keeps running after its disk workload.
    wait_ticks(&dir.path("src.log"), 1, 3, WAIT);
    ctl(&dir.path("src.sock"), &["quit"]);
}

/// A snapshot keeps the disk device's state; two VMs restored from it each
/// get their own disk (`--disk` at restore overrides the path), and each
/// ends with its own disk file at the generations its guest wrote.
#[test]
fn snapshot_restore_keeps_disk_state_and_a_clone_gets_its_own_disk() {
    let dir = Scratch::new("disk-snap");
    let disk = dir.path("d.img");
    new_disk(&disk);
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let mut src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_batch=8 disk_ops=200000",
        &["--disk", disk.to_str().unwrap()],
    );
    wait_disk_ops(&log, 1000, "disk ops before the snapshot");
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    // The pause drained and flushed the device: the file is the disk at
    // the snapshot. Each clone gets a copy.
    let pristine = std::fs::read(&disk).unwrap();
    let clone_disk = dir.path("clone.img");
    std::fs::write(&clone_disk, &pristine).unwrap();
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    let before = read_console(&log);
    let snap_ops = disk_reports(&before).last().unwrap().0;
    assert!(
        final_gens(&before).is_none(),
        "the guest finished too early"
    );

    // The clone, on its own copy: the original file is not touched.
    let mut clone = spawn_restore(
        &dir,
        "clone",
        &snap,
        &["--disk", clone_disk.to_str().unwrap()],
    );
    let (clone_log, clone_gens) = wait_disk_end(&dir.path("clone.log"));
    assert!(disk_reports(&clone_log).first().unwrap().0 >= snap_ops);
    check_disk_file(&clone_disk, &clone_gens);
    let status = ctl(&dir.path("clone.sock"), &["status"]);
    assert_eq!(status["devices"][0]["path"], clone_disk.to_str().unwrap());
    assert_eq!(status["devices"][0]["serial"], "ferry0");
    ctl(&dir.path("clone.sock"), &["quit"]);
    assert!(wait_exit(&mut clone, WAIT, "the clone to quit"));
    assert!(
        std::fs::read(&disk).unwrap() == pristine,
        "the clone wrote to the original disk"
    );

    // A lazy restore (memory loaded on demand) of the same snapshot, on a
    // copy of its own too.
    let lazy_disk = dir.path("lazy.img");
    std::fs::write(&lazy_disk, &pristine).unwrap();
    let mut lazy = spawn_restore(
        &dir,
        "lazy",
        &snap,
        &["--lazy", "--disk", lazy_disk.to_str().unwrap()],
    );
    let (_, lazy_gens) = wait_disk_end(&dir.path("lazy.log"));
    check_disk_file(&lazy_disk, &lazy_gens);
    ctl(&dir.path("lazy.sock"), &["quit"]);
    assert!(wait_exit(&mut lazy, WAIT, "the lazy clone to quit"));
    assert!(std::fs::read(&disk).unwrap() == pristine);

    // The same snapshot on the original disk (the path in the state).
    let _again = spawn_restore(&dir, "again", &snap, &[]);
    let (_, gens) = wait_disk_end(&dir.path("again.log"));
    check_disk_file(&disk, &gens);
    ctl(&dir.path("again.sock"), &["quit"]);
}

/// A destination that cannot open the disk refuses the move before the
/// switch-over: the source keeps running its VM, disk workload included.
#[test]
fn a_destination_without_the_disk_refuses_and_the_source_keeps_the_vm() {
    let dir = Scratch::new("disk-missing");
    refused_for_its_disk(&dir, &dir.path("no-such-dir/d.img"));
}

/// The same for a disk path that is a directory: `access(2)` allows it, the
/// open after the commit would not (and the VM, committed, would be lost
/// with it), so the restore's check refuses it before `Ready`.
#[test]
fn a_destination_whose_disk_is_a_directory_refuses_before_the_switch_over() {
    let dir = Scratch::new("disk-dir");
    let not_a_file = dir.path("a-directory");
    std::fs::create_dir(&not_a_file).unwrap();
    refused_for_its_disk(&dir, &not_a_file);
}

/// Moves a guest with a disk to a destination whose `--disk` is `unusable`,
/// and checks the move rolls back: the destination refuses and ends, the
/// source's guest goes on with its disk workload.
fn refused_for_its_disk(dir: &Scratch, unusable: &std::path::Path) {
    let disk = dir.path("d.img");
    new_disk(&disk);
    let mut dargs = dest_args(dir, "127.0.0.1");
    dargs.extend(["--disk".to_string(), unusable.display().to_string()]);
    let mut dst = spawn("ferry-dest", &strs(&dargs), &dir.path("dst.err"));
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let guest = "ws=16M report_ms=50 disk=1";
    let args = source_args(dir, "256M", 1, guest, &addr, "1s");
    let _src = spawn_disk_source(dir, args, &disk);
    let sock = dir.path("src.sock");
    wait_for(WAIT, "the source to give up the move", || {
        std::fs::read_to_string(dir.path("src.err"))
            .ok()
            .filter(|e| e.contains("keeps running here"))
    });
    let status = wait_for(WAIT, "the destination to give up", || {
        dst.0.try_wait().unwrap()
    });
    assert!(
        !status.success(),
        "the destination took a VM without its disk"
    );
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("cannot open disk"), "{err}");
    let ops = |log: &[Logged]| disk_reports(log).last().map(|r| r.0).unwrap_or(0);
    let at_failure = ops(&read_console(&dir.path("src.log")));
    wait_for(WAIT, "more disk ops on the source", || {
        let log = read_console(&dir.path("src.log"));
        assert!(bad_lines(&log).is_empty(), "{:?}", bad_lines(&log));
        (ops(&log) > at_failure).then_some(())
    });
    assert_eq!(ctl(&sock, &["status"])["run_state"], "running");
    ctl(&sock, &["quit"]);
}

/// The disk keeps working across three hops (source → hop0 → hop1 →
/// hop2, post-copy, pre-copy, post-copy): a restored device is drained,
/// saved and moved again like a booted one.
#[test]
fn shared_disk_survives_three_hops() {
    // Enough disk work to outlast two hops of any length here; the last
    // hop waits for the end.
    let dir = Scratch::new("disk-hops");
    let disk = dir.path("shared.img");
    new_disk(&disk);
    let (mut dests, addrs) = spawn_hops(&dir, 3);
    let guest = "ws=32M report_ms=50 disk=1 disk_batch=8 disk_ops=2000000";
    let mut args = source_args(&dir, "256M", 1, guest, &addrs[0], "1s");
    args.extend(["--disk".to_string(), disk.display().to_string()]);
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    assert!(
        wait_exit(&mut src, WAIT, "hop 0"),
        "{}",
        std::fs::read_to_string(dir.path("src.err")).unwrap_or_default()
    );
    let mut whole = read_console(&dir.path("src.log"));
    let modes = ["precopy", "postcopy"];
    for i in 0..3 {
        let log_path = dir.path(&format!("hop{i}.log"));
        wait_stats(&dir.path(&format!("hop{i}.json")), WAIT);
        let sock = dir.path(&format!("hop{i}.sock"));
        if i < 2 {
            // Some disk work here first.
            let start = disk_reports(&whole).last().map(|r| r.0).unwrap_or(0);
            wait_for(WAIT, "disk ops on this hop", || {
                let log = read_console(&log_path);
                assert!(bad_lines(&log).is_empty(), "{:?}", bad_lines(&log));
                assert!(final_gens(&log).is_none(), "finished before the last hop");
                disk_reports(&log)
                    .last()
                    .filter(|r| r.0 > start + 1000)
                    .map(|_| ())
            });
            ctl(&sock, &["migrate", &addrs[i + 1], "--mode", modes[i]]);
            assert!(
                wait_exit(&mut dests[i], WAIT, "hop to exit"),
                "hop {i} did not exit cleanly"
            );
            whole.extend(read_console(&log_path));
        } else {
            let (log, _) = wait_disk_end_within(&log_path, WAIT * 4);
            whole.extend(log);
            let gens = final_gens(&whole).expect("a DISKGEN line is missing");
            check_disk_file(&disk, &gens);
            ctl(&sock, &["quit"]);
        }
    }
    assert!(bad_lines(&whole).is_empty(), "{:?}", bad_lines(&whole));
}

/// Clones of a template with a writable disk must each get their own copy:
/// without `--disk` the clone is refused, with it it runs on its copy.
#[test]
fn template_clones_need_their_own_disk() {
    let dir = Scratch::new("disk-template");
    let disk = dir.path("d.img");
    new_disk(&disk);
    let td = dir.path("templates");
    std::fs::create_dir_all(&td).unwrap();
    let td = td.to_str().unwrap();
    let sock = dir.path("src.sock");
    let _src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_ops=100000",
        &["--disk", disk.to_str().unwrap()],
    );
    wait_disk_ops(&dir.path("src.log"), 0, "disk ops");
    // Paused first, so the VM stays paused after the template is made and
    // the disk copied below is the disk at the template.
    ctl(&sock, &["pause"]);
    ctl(&sock, &["template", "base", "--template-dir", td]);
    let copy = dir.path("c1.img");
    std::fs::copy(&disk, &copy).unwrap();
    ctl(&sock, &["quit"]);
    let from = ["--from-template", "base", "--template-dir", td];
    let mut refused = spawn(
        "ferry-dest",
        &strs(&console_args(&dir, "c0", &from)),
        &dir.path("c0.err"),
    );
    let status = wait_for(WAIT, "the clone to be refused", || {
        refused.0.try_wait().unwrap()
    });
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.path("c0.err")).unwrap();
    assert!(err.contains("own copy"), "{err}");
    let mut args = from.to_vec();
    args.extend(["--disk", copy.to_str().unwrap()]);
    let _clone = spawn(
        "ferry-dest",
        &strs(&console_args(&dir, "c1", &args)),
        &dir.path("c1.err"),
    );
    let (_, gens) = wait_disk_end(&dir.path("c1.log"));
    check_disk_file(&copy, &gens);
    ctl(&dir.path("c1.sock"), &["quit"]);
}

/// Waits for `p` to end unsuccessfully and returns its stderr (`err`),
/// which must say the disk is in use.
fn refused_in_use(p: &mut Proc, err: &Path, what: &str) -> String {
    assert!(!wait_exit(p, WAIT, what), "{what}: it ran");
    let err = std::fs::read_to_string(err).unwrap();
    assert!(
        err.contains("in use by another VM or process"),
        "{what}: {err}"
    );
    err
}

/// Two restores of one snapshot whose disk is writable: the second finds
/// the disk locked by the first (QEMU's image locking) and is refused
/// instead of both guests writing one file; the first runs on to the end
/// of its workload with no BAD, and the file holds exactly its writes.
#[test]
fn a_second_restore_of_one_snapshot_is_refused_its_disk() {
    let dir = Scratch::new("disk-lock-restores");
    let disk = dir.path("d.img");
    new_disk(&disk);
    let sock = dir.path("src.sock");
    let mut src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_batch=8 disk_ops=150000",
        &["--disk", disk.to_str().unwrap()],
    );
    wait_disk_ops(&dir.path("src.log"), 1000, "disk ops before the snapshot");
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));

    let _first = spawn_restore(&dir, "first", &snap, &[]);
    wait_for(WAIT, "the first restore's disk ops", || {
        disk_reports(&read_console(&dir.path("first.log")))
            .first()
            .map(|_| ())
    });
    let mut second = spawn_restore(&dir, "second", &snap, &[]);
    let err = refused_in_use(&mut second, &dir.path("second.err"), "the second restore");
    assert!(err.contains(disk.to_str().unwrap()), "{err}");
    assert!(
        disk_reports(&read_console(&dir.path("second.log"))).is_empty(),
        "the second restore's guest ran"
    );
    let (_, gens) = wait_disk_end(&dir.path("first.log"));
    check_disk_file(&disk, &gens);
    ctl(&dir.path("first.sock"), &["quit"]);
}

/// A VM that runs on its disk, and a `ferry-dest --restore` of its
/// snapshot without `--disk` (the state names the same file): refused, and
/// the running VM's guest goes on without a BAD.
#[test]
fn a_restore_of_a_running_vms_snapshot_is_refused_its_disk() {
    let dir = Scratch::new("disk-lock-running");
    let disk = dir.path("d.img");
    new_disk(&disk);
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let _src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_batch=8",
        &["--disk", disk.to_str().unwrap()],
    );
    let ops = |log: &[Logged]| disk_reports(log).last().map(|r| r.0).unwrap_or(0);
    wait_for(WAIT, "disk ops", || {
        (ops(&read_console(&log)) > 1000).then_some(())
    });
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    ctl(&sock, &["resume"]);
    let mut restore = spawn_restore(&dir, "copy", &snap, &[]);
    refused_in_use(&mut restore, &dir.path("copy.err"), "the restore");
    let at_refusal = ops(&read_console(&log));
    wait_for(WAIT, "more disk ops on the running VM", || {
        let l = read_console(&log);
        assert!(bad_lines(&l).is_empty(), "{:?}", bad_lines(&l));
        (ops(&l) > at_refusal + 1000).then_some(())
    });
    assert_eq!(ctl(&sock, &["status"])["run_state"], "running");
    ctl(&sock, &["quit"]);
}

/// A read-only disk takes a shared lock: two VMs run on it at once. A VM
/// that wants it writable is refused while they hold it; so is one VM
/// naming a writable disk twice.
#[test]
fn a_read_only_disk_is_shared_and_a_writable_one_is_not() {
    let dir = Scratch::new("disk-lock-shared");
    let disk = dir.path("ro.img");
    new_disk(&disk);
    let ro = format!("{},readonly", disk.display());
    let vm = |name: &str, disks: &[&str]| {
        let mut args = vec!["--mem", "128M", "--guest-args", "ws=8M report_ms=50"];
        for d in disks {
            args.extend(["--disk", d]);
        }
        spawn(
            "ferry-source",
            &strs(&console_args(&dir, name, &args)),
            &dir.path(&format!("{name}.err")),
        )
    };
    let _a = vm("a", &[&ro]);
    let _b = vm("b", &[&ro]);
    for name in ["a", "b"] {
        wait_ticks(&dir.path(&format!("{name}.log")), 1, 3, WAIT);
        let status = ctl(&dir.path(&format!("{name}.sock")), &["status"]);
        assert_eq!(status["run_state"], "running", "{name}");
        assert_eq!(status["devices"][0]["readonly"], true, "{name}");
    }
    let mut writer = vm("w", &[disk.to_str().unwrap()]);
    refused_in_use(&mut writer, &dir.path("w.err"), "a writer beside readers");

    let rw = dir.path("rw.img");
    new_disk(&rw);
    let mut twice = vm("t", &[rw.to_str().unwrap(), rw.to_str().unwrap()]);
    assert!(!wait_exit(&mut twice, WAIT, "a VM naming its disk twice"));
    let err = std::fs::read_to_string(dir.path("t.err")).unwrap();
    assert!(err.contains("given twice"), "{err}");
    ctl(&dir.path("a.sock"), &["quit"]);
    ctl(&dir.path("b.sock"), &["quit"]);
}

/// The hand-over in a move that rolls back after its commit point: the
/// destination's `--disk` is held by another VM, so its devices cannot
/// start after `Commit` (the source had let go of its own disk's lock at
/// its commit point). The destination discards the VM unrun and tells the
/// source, which takes its disk's lock back and runs on: the other VM is
/// untouched, and a third VM on the source's disk is refused.
#[test]
fn a_move_rolled_back_after_its_commit_point_takes_the_disk_lock_back() {
    let dir = Scratch::new("disk-lock-rollback");
    let (disk, held) = (dir.path("d.img"), dir.path("held.img"));
    new_disk(&disk);
    new_disk(&held);
    let other = spawn(
        "ferry-source",
        &strs(&console_args(
            &dir,
            "other",
            &[
                "--mem",
                "128M",
                "--guest-args",
                "ws=8M report_ms=50",
                "--disk",
                held.to_str().unwrap(),
            ],
        )),
        &dir.path("other.err"),
    );
    wait_ticks(&dir.path("other.log"), 1, 3, WAIT);

    let mut dargs = dest_args(&dir, "127.0.0.1");
    dargs.extend(["--disk".to_string(), held.display().to_string()]);
    let mut dst = spawn("ferry-dest", &strs(&dargs), &dir.path("dst.err"));
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let args = source_args(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_batch=8",
        &addr,
        "1s",
    );
    let _src = spawn_disk_source(&dir, args, &disk);
    let sock = dir.path("src.sock");
    wait_for(WAIT, "the source to take its VM back", || {
        std::fs::read_to_string(dir.path("src.err"))
            .ok()
            .filter(|e| e.contains("keeps running here"))
    });
    let err = std::fs::read_to_string(dir.path("src.err")).unwrap();
    assert!(err.contains("disk lock handed over"), "{err}");
    assert!(err.contains("disk lock taken back"), "{err}");
    let dst_err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(
        dst_err.contains("in use by another VM or process"),
        "{dst_err}"
    );
    let ops = |log: &[Logged]| disk_reports(log).last().map(|r| r.0).unwrap_or(0);
    let log = dir.path("src.log");
    let back = ops(&read_console(&log));
    wait_for(WAIT, "more disk ops on the source", || {
        let l = read_console(&log);
        assert!(bad_lines(&l).is_empty(), "{:?}", bad_lines(&l));
        (ops(&l) > back + 1000).then_some(())
    });
    assert_eq!(ctl(&sock, &["status"])["run_state"], "running");

    let mut third = spawn(
        "ferry-source",
        &strs(&console_args(
            &dir,
            "third",
            &["--mem", "128M", "--disk", disk.to_str().unwrap()],
        )),
        &dir.path("third.err"),
    );
    refused_in_use(&mut third, &dir.path("third.err"), "a third VM on the disk");
    assert_eq!(
        ctl(&dir.path("other.sock"), &["status"])["run_state"],
        "running"
    );
    ctl(&sock, &["quit"]);
    ctl(&dir.path("other.sock"), &["quit"]);
    drop(other);
}
