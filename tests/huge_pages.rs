//! Guest RAM in 2 MiB huge pages (`--huge-pages`), judged by the workload
//! guest and by what the destination process really mapped.
//!
//! These tests need free pages in the huge page pool, which
//! `scripts/setup.sh` reserves. Without them they fail, naming the pool:
//! a missing pool is a broken set-up, not a reason to skip.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A guest that writes a 256 MiB working set at random, 80% writes.
const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

/// The kernel page size, in KiB, of the guest RAM mapping of process
/// `pid` (its memfd `ferry-guest-ram`), from /proc/PID/smaps.
fn guest_ram_page_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_ram = false;
    for line in smaps.lines() {
        if line.contains(" /memfd:ferry-guest-ram") {
            in_ram = true;
        } else if in_ram {
            if let Some(v) = line.strip_prefix("KernelPageSize:") {
                return v.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
    }
    None
}

/// `ferry-dest --huge-pages` in `dir` (console, API, statistics named
/// `name`).
fn spawn_huge_dest(dir: &Scratch, name: &str) -> (Proc, String) {
    spawn_dest(dir, name, &strs(&io_args(dir, name, &["--huge-pages"])))
}

/// Moves a ticking source in `dir` to `to` through the API (`ferry-ctl
/// migrate`, with `extra` arguments) and waits for the move to end.
fn move_once_ticking(dir: &Scratch, to: &str, extra: &[&str]) -> bool {
    wait_exit(
        &mut migrate_once_ticking_with(dir, to, extra),
        WAIT,
        "the move to end",
    )
}

/// The destination's view after a move into huge pages: the guest goes
/// on with no BAD, the statistics say huge pages, and the process really
/// maps its guest RAM in 2 MiB pages.
fn check_moved_into_huge_pages(dir: &Scratch, name: &str, dst: &mut Proc) -> serde_json::Value {
    let f = |ext: &str| dir.path(&format!("{name}.{ext}"));
    let stats = wait_stats(&f("json"), WAIT);
    assert_eq!(stats["backing"], "huge-pages", "{stats}");
    let after = wait_ticks(&f("log"), 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    assert_eq!(
        guest_ram_page_kib(dst.0.id()),
        Some(2048),
        "the destination's guest RAM is not in 2 MiB pages"
    );
    ctl(&f("sock"), &["quit"]);
    assert!(wait_exit(dst, WAIT, "the destination to quit"));
    stats
}

/// Moves the ticking source `src` of `dir` to the huge-page destination
/// `name` at `addr` (`ferry-ctl migrate`, with `extra`), checks the result
/// ([`check_moved_into_huge_pages`]) and that the source, its VM gone,
/// then ends by itself; returns
/// the destination's statistics.
fn move_into_huge_pages(
    dir: &Scratch,
    (name, dst, addr): (&str, &mut Proc, &str),
    mut src: Proc,
    extra: &[&str],
) -> serde_json::Value {
    assert!(
        move_once_ticking(dir, addr, extra),
        "the move failed: {}",
        std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default()
    );
    let s = check_moved_into_huge_pages(dir, name, dst);
    assert!(wait_exit(
        &mut src,
        WAIT,
        "the source to end after the move"
    ));
    s
}

/// Post-copy between two huge-page VMs: every fault fetches its whole huge
/// page, the push fills the rest, and the guest verifies every page.
#[test]
fn postcopy_between_huge_page_vms() {
    need_pool(1024);
    let dir = Scratch::new("huge-pc");
    let (mut dst, addr) = spawn_huge_dest(&dir, "dst");
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &["--huge-pages"]);
    assert_eq!(
        guest_ram_page_kib(src.0.id()).or_else(|| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            guest_ram_page_kib(src.0.id())
        }),
        Some(2048),
        "the source's guest RAM is not in 2 MiB pages"
    );
    let s = move_into_huge_pages(&dir, ("dst", &mut dst, &addr), src, &[]);
    assert_eq!(s["mode"], "postcopy");
    assert_eq!(s["pages_total"], (512u64 << 20) / 4096, "{s}");
    assert_postcopy_accounting(&s, &s["source"]);
    assert!(s["pages_demand"].as_u64().unwrap() > 0, "no demand: {s}");
    // A fault asks for the rest of its huge page with it.
    assert!(s["fault_around_pages"].as_u64().unwrap() > 0, "{s}");
}

/// `ferry-dest --huge-pages --prealloc SIZE` in `dir`, named `dst`.
fn spawn_dest_ahead(dir: &Scratch, size: &str) -> (Proc, String) {
    let extra = ["--huge-pages", "--prealloc", size];
    spawn_dest(dir, "dst", &strs(&io_args(dir, "dst", &extra)))
}

/// `ferry-dest --prealloc`: the destination makes and allocates the guest's
/// RAM before it listens. A move of that size takes it (the statistics say
/// so), every page still faults until it arrives (the guest verifies every
/// page), and a move of another size gets RAM of its own.
#[test]
fn postcopy_into_ram_allocated_ahead() {
    need_pool(1024);
    let dir = Scratch::new("huge-ahead");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "512M");
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &["--huge-pages"]);
    let s = move_into_huge_pages(&dir, ("dst", &mut dst, &addr), src, &[]);
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
    assert_postcopy_accounting(&s, &s["source"]);
    assert!(s["pages_demand"].as_u64().unwrap() > 0, "no demand: {s}");

    let dir = Scratch::new("huge-ahead-other");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "256M");
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &["--huge-pages"]);
    let s = move_into_huge_pages(&dir, ("dst", &mut dst, &addr), src, &[]);
    assert_eq!(s["ram_allocated_ahead"], false, "{s}");
}

/// Stop-and-copy from ordinary RAM into huge pages: pages are written
/// through the mapping (hugetlbfs has no write(2)) and zero pages zeroed in
/// place.
#[test]
fn stop_and_copy_from_small_into_huge_pages() {
    need_pool(512);
    let dir = Scratch::new("huge-sc");
    let (mut dst, addr) = spawn_huge_dest(&dir, "dst");
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &[]);
    let stop_and_copy = ["--mode", "stop-and-copy"];
    let s = move_into_huge_pages(&dir, ("dst", &mut dst, &addr), src, &stop_and_copy);
    assert_eq!(s["mode"], "stop-and-copy", "{s}");
    assert!(s["pages_zero"].as_u64().unwrap() > 0, "{s}");
}

/// Hybrid installs single stale pages, which a huge page cannot take: the
/// destination refuses it by name and ends, the guest keeps running on the
/// source, and a new huge-page destination then takes a post-copy move.
#[test]
fn hybrid_into_huge_pages_is_refused_and_the_vm_stays() {
    need_pool(512);
    let dir = Scratch::new("huge-hy");
    let (mut dst, addr) = spawn_huge_dest(&dir, "dst");
    let src = spawn_guest_source(&dir, "256M", 1, "ws=64M report_ms=50", &[]);
    assert!(
        !move_once_ticking(&dir, &addr, &["--mode", "hybrid"]),
        "a hybrid move into huge pages went through"
    );
    let err = std::fs::read_to_string(dir.path("ctl.err")).unwrap();
    assert!(
        err.contains("huge pages take post-copy, pre-copy and stop-and-copy moves, not hybrid"),
        "{err}"
    );
    assert!(
        wait_exit_failed(&mut dst),
        "the refusing destination did not fail"
    );
    let dst_err = strip_ansi(&std::fs::read_to_string(dir.path("dst.err")).unwrap());
    assert!(dst_err.contains("not hybrid"), "{dst_err}");
    assert_source_goes_on(&dir);
    let (mut dst2, addr2) = spawn_huge_dest(&dir, "dst2");
    let s = move_into_huge_pages(&dir, ("dst2", &mut dst2, &addr2), src, &[]);
    assert_eq!(s["mode"], "postcopy", "{s}");
}

/// Waits for `p` to end, and says whether it ended in failure.
fn wait_exit_failed(p: &mut Proc) -> bool {
    wait_for(WAIT, "the process to end", || p.0.try_wait().unwrap())
        .code()
        .is_some_and(|c| c != 0)
}

/// What ferry-source says about huge-page RAM it cannot have.
fn source_refusal(dir: &Scratch, mem: &str) -> String {
    let out = Command::new(bin("ferry-source"))
        .args(["--mem", mem, "--huge-pages", "--run-for", "1s"])
        .arg("--serial")
        .arg(dir.path("src.log"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "ferry-source ran with --mem {mem}");
    strip_ansi(&String::from_utf8_lossy(&out.stderr))
}

/// Sizes the pool cannot give are refused with the reason.
#[test]
fn impossible_huge_page_ram_is_refused_with_the_reason() {
    let dir = Scratch::new("huge-no");
    let err = source_refusal(&dir, "17M");
    assert!(err.contains("is not a multiple of 2 MiB"), "{err}");
    let err = source_refusal(&dir, "1T");
    assert!(
        err.contains("the guest needs 524288 free 2 MiB huge pages and the pool has")
            && err.contains("/proc/sys/vm/nr_hugepages"),
        "{err}"
    );
    // No guest ever ran.
    assert!(
        !Path::new(&dir.path("src.log")).exists() || read_console(&dir.path("src.log")).is_empty()
    );
}

/// Post-copy between huge-page VMs through a proxy that cuts the push at a
/// random byte offset, three moves: huge pages half written when the link
/// died keep the pages written in full, every move completes after its recovery,
/// and the guest verifies every page.
#[test]
fn cut_links_during_huge_page_postcopy_recover() {
    need_pool(1024);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15u64);
    for i in 0..3 {
        let name = format!("huge-cut-{i}");
        let mut m =
            move_through_a_cut(&name, &mut rng, GUEST, &["--huge-pages"], &["--huge-pages"]);
        let s = check_moved_into_huge_pages(&m.dir, "dst", &mut m.dst);
        assert_eq!(s["recoveries"], 1, "move {i}: {s}");
        assert!(wait_exit(
            &mut m.src,
            WAIT,
            "the source to end after the move"
        ));
    }
}

/// A move through `ferry-dest --daemon --huge-pages` plus `extra` daemon
/// flags: the guest goes on ticking in the VM process the daemon started,
/// whose RAM is in 2 MiB pages; returns that process's statistics.
fn move_through_a_huge_page_daemon(name: &str, extra: &[&str]) -> serde_json::Value {
    move_through_a_huge_page_daemon_after(name, extra, |_, _, _| {})
}

/// [`move_through_a_huge_page_daemon`], once `before` had the daemon
/// (its address, run directory and log).
fn move_through_a_huge_page_daemon_after(
    name: &str,
    extra: &[&str],
    before: impl FnOnce(&str, &Path, &Path),
) -> serde_json::Value {
    need_pool(512);
    let dir = Scratch::new(name);
    let run = dir.path("run");
    let mut args = vec![
        "--daemon",
        "--run-dir",
        run.to_str().unwrap(),
        "--huge-pages",
    ];
    args.extend_from_slice(extra);
    let (mut daemon, addr) = spawn_dest(&dir, "daemon", &args);
    before(&addr, &run, &dir.path("daemon.err"));
    let mut src = spawn_guest_source(&dir, "256M", 1, "ws=64M report_ms=50", &[]);
    assert!(
        move_once_ticking(&dir, &addr, &[]),
        "the move failed: {}",
        std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default()
    );
    let vm = wait_for(WAIT, "the VM process's record", || {
        daemon_records(&run).into_iter().next()
    });
    let stats = wait_stats(Path::new(vm["stats"].as_str().unwrap()), WAIT);
    assert_eq!(stats["backing"], "huge-pages", "{stats}");
    let serial = Path::new(vm["serial"].as_str().unwrap()).to_path_buf();
    let after = wait_ticks(&serial, 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    let pid = vm["pid"].as_u64().unwrap() as u32;
    assert_eq!(guest_ram_page_kib(pid), Some(2048), "{vm}");
    ctl(Path::new(vm["api"].as_str().unwrap()), &["quit"]);
    assert!(wait_exit(
        &mut src,
        WAIT,
        "the source to end after the move"
    ));
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    stats
}

/// `ferry-dest --daemon --huge-pages`: the VM process the daemon starts
/// for an incoming move maps its guest RAM in 2 MiB pages too, made
/// during the move.
#[test]
fn a_daemon_gives_its_vm_processes_huge_pages() {
    let stats = move_through_a_huge_page_daemon("huge-daemon", &[]);
    assert_eq!(stats["ram_allocated_ahead"], false, "{stats}");
}

/// `ferry-dest --daemon --huge-pages --prealloc session`: the VM process
/// allocates the RAM its session's Hello asks for before it listens, and
/// the move takes it (the statistics say so; the guest verifies every
/// page of its working set as it goes on).
#[test]
fn a_daemon_preallocates_each_sessions_ram() {
    let stats = move_through_a_huge_page_daemon("huge-daemon-ahead", &["--prealloc", "session"]);
    assert_eq!(stats["ram_allocated_ahead"], true, "{stats}");
}

/// `ferry-dest --daemon --huge-pages --prealloc session`: a `Hello` for
/// more than the pool's free pages (read from /proc/meminfo) gets a VM
/// process that does not allocate ahead, and the daemon says why, naming
/// the size; the next move, which fits, is allocated ahead.
#[test]
fn a_daemon_preallocates_only_what_the_pool_has_room_for() {
    let stats = move_through_a_huge_page_daemon_after(
        "huge-daemon-room",
        &["--prealloc", "session"],
        |addr, run, log| {
            let free = ferry_engine::memory::huge_pages_available().expect("HugePages_Free");
            let over = (free + 64) * ferry_engine::memory::HUGE_PAGE_SIZE;
            a_hello_without_room_is_not_allocated_ahead(addr, run, log, over);
        },
    );
    assert_eq!(stats["ram_allocated_ahead"], true, "{stats}");
}

/// `--prealloc SIZE` and `--prealloc hello` are for a destination that
/// takes one move and `--prealloc session` for a daemon; each the other
/// way round is refused at start, naming the flag to use.
#[test]
fn prealloc_fits_the_way_moves_are_taken() {
    let refused = |args: &[&str], says: &str| {
        let out = Command::new(bin("ferry-dest"))
            .args(["--listen", "127.0.0.1:0", "--huge-pages"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = strip_ansi(&String::from_utf8_lossy(&out.stderr));
        assert!(err.contains(says), "{args:?}: {err}");
    };
    let run = Scratch::new("prealloc-modes");
    let run = run.path("run");
    let daemon = ["--daemon", "--run-dir", run.to_str().unwrap()];
    refused(
        &[&daemon[..], &["--prealloc", "256M"]].concat(),
        "--prealloc session",
    );
    refused(
        &[&daemon[..], &["--prealloc", "hello"]].concat(),
        "--prealloc session",
    );
    refused(&["--prealloc", "session"], "needs --daemon");
    refused(&["--prealloc", "lots"], "invalid size");
}

/// A snapshot of a VM whose RAM is in huge pages holds every page the
/// guest wrote: the snapshot writer skips never-touched huge pages by
/// asking the guest mapping (`mincore`), since hugetlbfs cannot say where
/// its holes are, and a page wrongly taken for a hole would come back as
/// zeros. The guest, restored from it into ordinary memory, checks every
/// page of its working set and goes on without BAD; the snapshot stored
/// the working set and skipped the untouched rest.
#[test]
fn a_snapshot_of_huge_page_ram_keeps_every_written_page() {
    need_pool(512);
    let dir = Scratch::new("huge-snap");
    let (log, sock) = (dir.path("src.log"), dir.path("src.sock"));
    let mut src = spawn_guest_source(&dir, "512M", 1, GUEST, &["--huge-pages"]);
    wait_ticks(&log, 1, 3, WAIT);
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    let answer = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    let before = read_console(&log);
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    let stored = answer["snapshot"]["pages_stored"].as_u64().unwrap();
    let total = answer["snapshot"]["pages_total"].as_u64().unwrap();
    // The 256 MiB working set of the 512 MiB guest, and not all of RAM.
    assert!(
        stored >= 256 * 256 && stored < total,
        "{stored} of {total} pages stored: {answer}"
    );
    let mut dst = spawn_restore(&dir, "restored", &snap, &[]);
    let after = wait_ticks(&dir.path("restored.log"), 1, 3, WAIT);
    assert_continues(&before, &after, 1);
    ctl(&dir.path("restored.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the restored VM to quit"));
}
