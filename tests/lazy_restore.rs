//! Lazy snapshot restore (`ferry-dest --restore FILE --lazy`): the VM runs
//! at once and its memory follows through the post-copy path, served from
//! the file. Judged by the workload guest like a migration. Damaged files
//! are covered, eager and lazy alike, in `snapshot_files.rs`.

mod common;

use common::*;
use ferry_engine::layout::{gpa_to_file_offset, PAGE_SIZE};
use ferry_engine::snapshot::{self, Replay};
use ferry_engine::{ConsoleOutput, Vm};

const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

#[test]
fn lazy_restore_of_a_1g_2_vcpu_write_heavy_guest() {
    let dir = Scratch::new("lazy");
    // Past the fill: every vCPU has verified and rewritten pages a while.
    let Snapped {
        path: snap,
        answer: written,
        before,
    } = snapshot_from_source(&dir, "1G", 2, GUEST, 5);
    eprintln!("snapshot: {written}");

    let (dst_log, dst_json, dst_sock) = (
        dir.path("dst.log"),
        dir.path("dst.json"),
        dir.path("dst.sock"),
    );
    let _dst = spawn_restore(
        &dir,
        "dst",
        &snap,
        &["--lazy", "--stats-json", dst_json.to_str().unwrap()],
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
    assert_eq!(n("pages_total"), (1u64 << 30) / 4096);
    // The snapshot's page server ran to `Complete`: its counters are final.
    let server = &s["source"]["page_server"];
    assert_postcopy_accounting(&s, server);
    let sn = |k: &str| {
        server[k]
            .as_u64()
            .unwrap_or_else(|| panic!("page server lacks {k}: {s}"))
    };
    // Each page the destination counts as demanded came in one answer, and
    // each request (its faulting page plus the pages fault-around added)
    // got one answer and at most one latency sample.
    assert!(n("pages_demand") <= sn("pages_demand"), "{s}");
    assert_eq!(
        sn("pages_demand"),
        sn("requests") + n("fault_around_pages"),
        "{s}"
    );
    assert!(
        s["fault_latency_us"]["overall"]["count"].as_u64().unwrap() <= sn("requests"),
        "{s}"
    );
    // From the start of the restore (open, validate, build the VM, restore
    // the state) until the vCPUs run: no page data is read first.
    assert!(
        n("downtime_us") > 0 && n("downtime_us") < 500_000,
        "downtime: {s}"
    );
    assert!(n("pages_demand") > 0, "no demand faults: {s}");
    // The pages came from the file: data only for pages it stores, zero
    // markers for the holes (and for stored pages that are all zero).
    let stored = written["snapshot"]["pages_stored"]
        .as_u64()
        .unwrap_or_else(|| panic!("snapshot answer: {written}"));
    assert!(
        stored > 0 && n("pages_pushed") <= stored,
        "{stored} stored: {s}"
    );
    assert!(
        n("pages_zero") >= sn("pages_pushed") - stored.min(sn("pages_pushed")),
        "holes pushed as data: {stored} stored: {s}"
    );
}

/// Clones: one snapshot restored into two VMs at once (one eagerly, one
/// lazily, in this process) gives two independent guests. A page of clone
/// A's working set changed behind its back is reported by A's guest, while
/// clone B, which started from the same page, keeps ticking without a BAD
/// line and its copy of the page is untouched.
#[test]
fn one_snapshot_restores_into_two_independent_clones() {
    let dir = Scratch::new("clones");
    // A read-only working set: the guest verifies its pages and never
    // rewrites them, so a changed page stays changed until it is checked.
    let log = dir.path("orig.log");
    let mut vm = boot_guest(64 << 20, 1, "ws=256K write=0 report_ms=50", &log);
    let before = wait_ticks(&log, 1, 3, WAIT);
    let ws_pa = working_set_pa(&before);
    vm.pause().unwrap();
    let snap = dir.path("vm.snap");
    snapshot::write(&snap, &vm.save_state().unwrap(), vm.ram()).unwrap();
    let before = read_console(&log);
    drop(vm);

    let (a_log, b_log) = (dir.path("a.log"), dir.path("b.log"));
    let (mut a, _) = snapshot::restore(&snap, ConsoleOutput::File(a_log.clone())).unwrap();
    a.resume().unwrap();
    let (b, _) =
        snapshot::restore_lazy(&snap, ConsoleOutput::File(b_log.clone()), Replay::Auto).unwrap();
    for log in [&a_log, &b_log] {
        // Three reports (100 ms of the guest's time) rather than two: on a
        // busy host two can come so close together after the resume that
        // no timer interrupt falls between them.
        let after = wait_ticks(log, 1, 3, WAIT);
        assert_continues(&before, &after, 1);
    }

    // The same page of both clones, read while both run.
    let target = ws_pa + 5 * PAGE_SIZE as u64;
    let off = gpa_to_file_offset(a.ram().ranges(), target).unwrap();
    assert_eq!(
        gpa_to_file_offset(b.ram().ranges(), target).unwrap(),
        off,
        "the clones' memory layouts differ"
    );
    let page = |vm: &Vm| {
        let mut p = vec![0u8; PAGE_SIZE];
        vm.ram().read_at(off, &mut p).unwrap();
        p
    };
    let b_page = page(&b);
    assert_eq!(page(&a), b_page, "the clones started from different pages");
    // Word 12 of the page: the guest will name it in its report.
    let mark = 0xa5a5_a5a5_a5a5_a5a5u64;
    assert_ne!(
        &b_page[96..104],
        &mark.to_le_bytes(),
        "the page holds the mark"
    );

    // Change it in A only; A's guest reports exactly that change (and then
    // repairs the page, so one change is reported once).
    a.ram().write_at(off + 96, &mark.to_le_bytes()).unwrap();
    let a_bad = wait_bad(&a_log, WAIT, "clone A to report the changed page");
    assert!(
        a_bad[0].starts_with("FERRY BAD page")
            && a_bad[0].contains(" word=12 ")
            && a_bad[0].contains(&format!(" got={mark:#x} "))
            && a_bad[0].contains(" bad_words=1 "),
        "{a_bad:?}"
    );

    // B goes on: more rounds after A's report, no BAD, its page as before.
    let b_ticks = ticks(&read_console(&b_log), 0).len();
    let b_after = wait_for(WAIT, "clone B to tick on", || {
        let l = read_console(&b_log);
        (ticks(&l, 0).len() >= b_ticks + 3).then_some(l)
    });
    assert!(bad_lines(&b_after).is_empty(), "{:?}", bad_lines(&b_after));
    assert_progress(&b_after, 1);
    assert_eq!(page(&b), b_page, "clone B's page changed with A's");
    // A's repair wrote back what the page should hold: what B still holds.
    assert_eq!(page(&a), b_page, "clone A's guest did not repair its page");
    assert_eq!(
        bad_lines(&read_console(&a_log)).len(),
        1,
        "one change, one report"
    );
}

/// Record and replay (REAP): a plain lazy restore records nothing; a
/// recording one (`--replay record`) holds its push while the guest
/// faults, and records the pages it faulted on, in order, beside the
/// snapshot; the next restore (`--replay auto`, the default) loads those
/// pages before its vCPUs run. All continue with no BAD, and the replayed
/// restore's guest faults on at most a twentieth as many pages as the list
/// names.
#[test]
fn a_second_lazy_restore_replays_the_first_ones_working_set() {
    replays_the_working_set("replay", &[], 1);
}

/// The same into guest RAM in 2 MiB huge pages (`--huge-pages`): the
/// replayed restore loads the whole huge pages the list touches.
#[test]
fn a_lazy_restore_into_huge_pages_replays_whole_huge_pages() {
    need_pool(1024);
    let s = replays_the_working_set("replay-huge", &["--huge-pages"], 512);
    assert_eq!(s["backing"], "huge-pages", "{s}");
}

/// Snapshots a 1 GiB guest with a 256 MiB working set, then restores it
/// lazily (with `dest_extra`) three times: plain, recording, replayed.
/// Pages load in units of `unit` pages (512: huge pages). Returns the
/// replayed restore's statistics.
fn replays_the_working_set(name: &str, dest_extra: &[&str], unit: u64) -> serde_json::Value {
    let dir = Scratch::new(name);
    let Snapped {
        path: snap, before, ..
    } = snapshot_from_source(
        &dir,
        "1G",
        1,
        "ws=256M pattern=random write=80 report_ms=50",
        3,
    );
    let replay = std::path::PathBuf::from(format!("{}.replay", snap.display()));
    assert!(!replay.exists());
    let mut demand = Vec::new();
    let mut replayed = serde_json::Value::Null;
    for name in ["plain", "record", "replay"] {
        let json = dir.path(&format!("{name}.json"));
        let mut args = vec!["--lazy", "--stats-json", json.to_str().unwrap()];
        args.extend(dest_extra);
        if name == "record" {
            args.extend(["--replay", "record"]);
        }
        let mut dst = spawn_restore(&dir, name, &snap, &args);
        let s = wait_stats(&json, WAIT);
        let after = wait_ticks(&dir.path(&format!("{name}.log")), 1, 3, WAIT);
        assert_continues(&before, &after, 1);
        demand.push(s["pages_demand"].as_u64().unwrap());
        ctl(&dir.path(&format!("{name}.sock")), &["quit"]);
        assert!(wait_exit(&mut dst, WAIT, "the restore to quit"));
        let err = std::fs::read_to_string(dir.path(&format!("{name}.err"))).unwrap();
        match name {
            "plain" => assert!(!replay.exists(), "a plain lazy restore recorded a list"),
            "record" => {
                // The list names every page the guest asked for, in order
                // (the server may not have read the last requests before
                // Complete): with the push held, that is the working set.
                let b = std::fs::read(&replay).expect("no replay list was recorded");
                assert_eq!(&b[..8], b"FERRYRPL");
                let listed = u32::from_le_bytes(b[12..16].try_into().unwrap()) as u64;
                let asked = s["source"]["page_server"]["requests"].as_u64().unwrap();
                assert!(
                    listed >= asked && asked > 0,
                    "{listed} listed, {asked} asked: {s}"
                );
                assert!(!err.contains("recorded pages"), "{err}");
            }
            _ => {
                // The listed pages (in whole units) were loaded from the
                // snapshot file before the vCPUs ran, each once, and the
                // page server (whose counters are final at `Complete`)
                // pushed none of them.
                let b = std::fs::read(&replay).unwrap();
                let units: std::collections::HashSet<u64> = b[16..b.len() - 4]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()) / unit)
                    .collect();
                let loaded = units.len() as u64 * unit;
                assert!(
                    err.contains(&format!("loading {loaded} recorded pages")),
                    "{err}"
                );
                assert_eq!(s["mode"], "postcopy", "{s}");
                assert_eq!(s["pages_preloaded"], loaded, "{s}");
                assert_postcopy_accounting(&s, &s["source"]["page_server"]);
                replayed = s;
            }
        }
    }
    eprintln!(
        "demand faults: plain {}, recording {}, replayed {}",
        demand[0], demand[1], demand[2]
    );
    // The list is the working set: the replayed guest finds almost all of
    // it loaded (how that compares with a plain restore, whose faults vary
    // with how fast the push outruns the guest, is `ferry-bench --restore`'s).
    let listed = u32::from_le_bytes(std::fs::read(&replay).unwrap()[12..16].try_into().unwrap());
    assert!(
        demand[2] * 20 <= u64::from(listed),
        "the replayed restore faulted on {} pages; the list has {listed}",
        demand[2]
    );
    replayed
}

/// A lazy restore opens no network socket at all: its source and
/// destination halves talk over two socketpairs, so there is no port for
/// another local process to connect to. Checked on the real binary, under
/// `strace`, from its start until the restored VM quits.
#[test]
fn a_lazy_restore_opens_no_tcp_socket() {
    use std::process::{Command, Stdio};
    let dir = Scratch::new("nolisten");
    let Snapped {
        path: snap, before, ..
    } = snapshot_from_source(&dir, "256M", 1, "ws=32M write=50 report_ms=50", 3);
    let (trace, json) = (dir.path("dst.trace"), dir.path("dst.json"));
    let mut args = vec![
        "-f".to_string(),
        "-qq".into(),
        "-e".into(),
        "trace=socket,socketpair,bind,listen,connect".into(),
        "-o".into(),
        trace.to_string_lossy().into_owned(),
        bin("ferry-dest").to_string_lossy().into_owned(),
        "--restore".into(),
        snap.to_string_lossy().into_owned(),
        "--lazy".into(),
        "--stats-json".into(),
        json.to_string_lossy().into_owned(),
    ];
    args.extend(console_args(&dir, "dst", &[]));
    let mut dst = Proc(
        Command::new("strace")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("dst.err")).unwrap())
            .spawn()
            .expect("this test needs strace (apt-get install strace)"),
    );
    wait_stats(&json, WAIT);
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&before, &after, 1);
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the restore to quit"));
    let calls = std::fs::read_to_string(&trace).unwrap();
    let inet: Vec<&str> = calls.lines().filter(|l| l.contains("AF_INET")).collect();
    assert!(inet.is_empty(), "network sockets: {inet:#?}");
    // The control and fault connections, each a socketpair.
    assert!(
        calls.matches("socketpair(AF_UNIX, SOCK_STREAM").count() >= 2,
        "{calls}"
    );
    // The one listening socket is the API's, a unix socket.
    let listens: Vec<&str> = calls.lines().filter(|l| l.contains("listen(")).collect();
    assert_eq!(listens.len(), 1, "{calls}");
}
