//! The VMM and the workload guest on real KVM: boot, the oracle, pause,
//! snapshot and restore (in this process and in a new one).

mod common;

use std::time::Duration;

use common::*;
use ferry_engine::layout::{gpa_to_file_offset, PAGE_SIZE};
use ferry_engine::snapshot;
use ferry_engine::state::{self, codec, MachineState};
use ferry_engine::{ConsoleOutput, Vm};

const TICK_WAIT: Duration = Duration::from_secs(60);

fn boot(dir: &Scratch, name: &str, mem: u64, vcpus: u32, args: &str) -> (Vm, std::path::PathBuf) {
    let log = dir.path(name);
    (boot_guest(mem, vcpus, args, &log), log)
}

/// Boots a 128 MiB, 2-vCPU guest with `args`, lets every vCPU tick `n`
/// times and pauses it.
fn boot_ticked_and_paused(dir: &Scratch, name: &str, args: &str, n: usize) -> Vm {
    let (mut vm, log) = boot(dir, name, 128 << 20, 2, args);
    wait_ticks(&log, 2, n, TICK_WAIT);
    vm.pause().unwrap();
    vm
}

#[test]
fn guest_boots_and_ticks_across_sizes_and_vcpus() {
    let dir = Scratch::new("boot");
    for (vcpus, mem, ws) in [
        (1, 64u64 << 20, "16M"),
        (2, 64 << 20, "16M"),
        (1, 1 << 30, "256M"),
        (2, 4 << 30, "64M"),
    ] {
        let name = format!("boot-{vcpus}-{mem}.log");
        let (vm, log) = boot(&dir, &name, mem, vcpus, &format!("ws={ws} report_ms=50"));
        let lines = wait_ticks(&log, vcpus, 4, TICK_WAIT);
        assert_progress(&lines, vcpus);
        assert!(vm.stopped_reason().is_none(), "{:?}", vm.stopped_reason());
        let ready = lines
            .iter()
            .filter(|l| l.text.starts_with("FERRY READY"))
            .count();
        assert_eq!(ready, vcpus as usize, "every vCPU filled its working set");
        assert_eq!(bad_lines(&lines), Vec::<String>::new());
    }
}

/// The oracle can fail: a page changed behind the guest's back is reported.
#[test]
fn guest_reports_a_page_corrupted_behind_its_back() {
    let dir = Scratch::new("corrupt");
    let (vm, log) = boot(&dir, "c.log", 64 << 20, 1, "ws=256K write=0 report_ms=50");
    let lines = wait_ticks(&log, 1, 2, TICK_WAIT);
    // The guest prints where its working set lives.
    let ws_pa = working_set_pa(&lines);
    let target = ws_pa + 5 * PAGE_SIZE as u64;
    let off = gpa_to_file_offset(vm.ram().ranges(), target).unwrap();
    vm.ram().write_at(off + 100, &[0xa5; 8]).unwrap();
    let bad = wait_bad(&log, TICK_WAIT, "a BAD page report");
    assert!(bad[0].starts_with("FERRY BAD page"), "{bad:?}");
}

/// Replaces every field that is derived from the passing of time.
fn without_clocks(s: &MachineState) -> Vec<u8> {
    let mut s = s.clone();
    s.vm.clock = Default::default();
    for ch in s.vm.pit.channels.iter_mut() {
        ch.count_load_time = 0;
    }
    for v in &mut s.vcpus {
        // LAPIC timer current count (TMCCT) counts down in real time.
        for b in &mut v.lapic.regs[0x390..0x394] {
            *b = 0;
        }
        for m in &mut v.msrs {
            if matches!(
                m.index,
                state::vcpu::MSR_IA32_TSC | state::vcpu::MSR_IA32_TSC_DEADLINE
            ) {
                m.data = 0;
            }
        }
    }
    state::encode(&s)
}

#[test]
fn snapshot_restore_snapshot_gives_the_same_state() {
    let dir = Scratch::new("same");
    let vm = boot_ticked_and_paused(&dir, "a.log", "ws=32M report_ms=50", 3);
    let first = vm.save_state().unwrap();
    let snap = dir.path("vm.snap");
    snapshot::write(&snap, &first, vm.ram()).unwrap();
    drop(vm);

    let (restored, _) = snapshot::restore(&snap, ConsoleOutput::File(dir.path("b.log"))).unwrap();
    let second = restored.save_state().unwrap();
    let (a, b) = (state::encode(&first), state::encode(&second));
    let raw_diff = codec::differing_sections(&a, &b).unwrap();
    assert_eq!(
        without_clocks(&first),
        without_clocks(&second),
        "state changed beyond clock fields; differing sections: {raw_diff:?}"
    );
    // And the guest's memory is bit-identical.
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let reopened = snapshot::Snapshot::open(&snap).unwrap();
    let fresh = ferry_engine::memory::GuestRam::new(128 << 20).unwrap();
    reopened.load_memory(&fresh).unwrap();
    for off in (0..128u64 << 20).step_by(1 << 20) {
        fresh.read_at(off, &mut x).unwrap();
        restored.ram().read_at(off, &mut y).unwrap();
        assert!(x == y, "memory differs in the MiB at {off:#x}");
    }
}

/// Pause, snapshot, restore into a new process: the guest continues from its
/// counters, timers still tick, registers intact (the guest checks them).
#[test]
fn pause_snapshot_restore_in_a_new_process() {
    let dir = Scratch::new("newproc");
    let Snapped {
        path: snap,
        answer,
        before,
    } = snapshot_from_source(
        &dir,
        "256M",
        2,
        "ws=64M pattern=random write=80 report_ms=50",
        4,
    );
    assert!(answer["snapshot"]["pages_stored"].as_u64().unwrap() > 64 * 256 / 2);

    let (dst_sock, dst_log) = (dir.path("dst.sock"), dir.path("dst.log"));
    let _dst = spawn_restore(&dir, "dst", &snap, &[]);
    let after = wait_ticks(&dst_log, 2, 4, TICK_WAIT);
    assert_progress(&after, 2);
    for v in 0..2 {
        let last_before = ticks(&before, v).last().copied().unwrap();
        let first_after = ticks(&after, v)[0];
        assert!(
            first_after.0 > last_before.0,
            "vCPU {v} restarted its rounds: {last_before:?} then {first_after:?}"
        );
        assert!(
            first_after.1 >= last_before.1,
            "vCPU {v} timer count went back"
        );
    }
    assert!(bad_lines(&after).is_empty());
    let status = ctl(&dst_sock, &["status"]);
    assert_eq!(status["run_state"], "running");
    assert_eq!(status["guest"]["bad"], 0);
    ctl(&dst_sock, &["quit"]);
}

/// KVM's dirty log, which pre-copy relies on, names every page the guest
/// changed: compare memory before and after a run with the log.
#[test]
fn dirty_log_names_every_page_the_guest_changed() {
    let dir = Scratch::new("dirty");
    let mut vm = boot_ticked_and_paused(&dir, "d.log", "ws=32M write=80 report_ms=50", 2);
    let size = vm.ram().size() as usize;
    let mut before = vec![0u8; size];
    vm.ram().read_at(0, &mut before).unwrap();
    vm.start_dirty_log().unwrap();
    vm.resume().unwrap();
    // Pre-copy takes the log while the guest runs, then once more paused:
    // together the two must name every change.
    let mut dirty = vec![0u64; (size / PAGE_SIZE).div_ceil(64)];
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        for (d, w) in dirty.iter_mut().zip(vm.take_dirty_log().unwrap().words()) {
            *d |= w;
        }
    }
    vm.pause().unwrap();
    for (d, w) in dirty.iter_mut().zip(vm.take_dirty_log().unwrap().words()) {
        *d |= w;
    }
    let mut after = vec![0u8; size];
    vm.ram().read_at(0, &mut after).unwrap();
    let (mut changed, mut missed) = (0, Vec::new());
    for (p, (a, b)) in before
        .chunks(PAGE_SIZE)
        .zip(after.chunks(PAGE_SIZE))
        .enumerate()
    {
        if a != b {
            changed += 1;
            if dirty[p / 64] & (1 << (p % 64)) == 0 {
                missed.push(p);
            }
        }
    }
    assert!(changed > 100, "the guest changed only {changed} pages");
    assert!(
        missed.is_empty(),
        "{} of {changed} changed pages not in the dirty log, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(8)]
    );
}

/// The guest's other checks can fail too: its self-test injects one fault of
/// each kind (a register clobbered mid-check, an MSR changed, the timer
/// stopped), and each must come out as the matching BAD line.
#[test]
fn guest_reports_register_msr_and_timer_faults() {
    let dir = Scratch::new("inject");
    for kind in ["reg", "msr", "timer"] {
        let name = format!("{kind}.log");
        let (_vm, log) = boot(
            &dir,
            &name,
            64 << 20,
            1,
            &format!("ws=1M report_ms=50 inject={kind}"),
        );
        let bad = wait_bad(&log, TICK_WAIT, &format!("BAD {kind}"));
        assert!(
            bad[0].starts_with(&format!("FERRY BAD {kind}")),
            "{kind}: {bad:?}"
        );
    }
}

/// A paused VM prints nothing and makes no progress; resumed, it continues
/// from where it stopped.
#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = Scratch::new("pause");
    let (mut vm, log) = boot(&dir, "p.log", 128 << 20, 2, "ws=16M report_ms=50");
    wait_ticks(&log, 2, 3, TICK_WAIT);
    let took = vm.pause().unwrap();
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    assert!(!vm.is_running());
    let at_pause = read_console(&log).len();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        read_console(&log).len(),
        at_pause,
        "the guest printed while paused"
    );
    let before = read_console(&log);
    vm.resume().unwrap();
    let after = wait_lines(&log, at_pause + 6, TICK_WAIT, "ticks after resume");
    assert_continues(&before, &after[at_pause..], 2);
}

/// `--api PATH` takes only a free path or a stale socket. A file that is
/// not a socket is left alone, and so is the socket of a VM that still
/// runs: the second VM refuses to start, and when it is gone the first
/// still answers on its socket. A socket left by a killed process is
/// replaced.
#[test]
fn an_api_path_is_taken_only_when_free_or_stale() {
    let dir = Scratch::new("api-path");
    let run = |name: &str, api: &std::path::Path| {
        let log = dir.path(&format!("{name}.log"));
        let args = [
            "--mem",
            "64M",
            "--guest-args",
            "ws=4M report_ms=50",
            "--api",
            api.to_str().unwrap(),
            "--serial",
            log.to_str().unwrap(),
        ];
        spawn("ferry-source", &args, &dir.path(&format!("{name}.err")))
    };
    let precious = dir.path("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let mut p = run("file", &precious);
    assert!(!wait_exit(&mut p, WAIT, "a VM given a file as its API"));
    let err = std::fs::read_to_string(dir.path("file.err")).unwrap();
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let sock = dir.path("vm.sock");
    let mut first = run("first", &sock);
    wait_ticks(&dir.path("first.log"), 1, 1, WAIT);
    let mut second = run("second", &sock);
    assert!(!wait_exit(
        &mut second,
        WAIT,
        "a second VM on a live socket"
    ));
    let err = std::fs::read_to_string(dir.path("second.err")).unwrap();
    assert!(err.contains("a running process serves it"), "{err}");
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");

    // Killed, the first VM leaves its socket behind: a stale one.
    first.0.kill().unwrap();
    let _ = first.0.wait();
    assert!(sock.exists());
    let mut third = run("third", &sock);
    wait_ticks(&dir.path("third.log"), 1, 1, WAIT);
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut third, WAIT, "the third VM to quit"));
    assert!(!sock.exists(), "the socket outlived its VM");
}
