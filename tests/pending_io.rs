//! A pause completes the I/O the vCPU exited for, and the console line
//! being printed at the pause goes with the device state: a move never
//! loses, corrupts or doubles a byte of what the guest prints.
//!
//! The oracle is the workload guest's `stream=1` mode: every vCPU prints
//! `FERRY STREAM <vcpu> <seq> <payload> 0x<sum>` lines as fast as it can,
//! one port I/O exit per byte, and every line is known in advance
//! ([`ferry_guest::stream_line`]). So a console log (or the logs of the
//! VMs a guest moved through, one after the other) must be exactly that
//! stream: every line whole, `seq` up by one per vCPU, no gap, no repeat.
//!
//! In this mode the guest also checks, after every byte, that reading IIR
//! finds the byte's THR-empty interrupt (a read that takes it): a read done
//! twice finds none and the guest prints `FERRY BAD uart ...`.
//!
//! Without the completion of pending I/O, a state saved right after an I/O
//! exit still has RIP on the instruction, and the VM restored from it runs
//! it again: on hardware-assisted KVM an `out` exit leaves RIP there, and
//! the byte is printed twice; where KVM emulates port I/O (PVM, this
//! project's development host) an `out` completes before the exit but an
//! `in` does not, and the IIR read happens twice. Without the partial line
//! in the device state, the line straddling the move loses its head.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use ferry_engine::memory::is_zero;
use ferry_engine::snapshot::Snapshot;
use ferry_engine::state::MachineState;
use ferry_engine::{ConsoleOutput, PreparedVm, Vm};
use ferry_guest::{parse_line, stream_line, GuestLine, STREAM_SUM_START};

const MEM: u64 = 32 << 20;
const MEM_ARG: &str = "32M";
const VCPUS: u32 = 2;
const GUEST: &str = "ws=1M stream=1";
/// Pause → save → resume cycles in the in-process test.
const CYCLES: u32 = 500;
/// Every this many cycles, the saved state is restored into a new VM in
/// this process, which runs on in place of the old one.
const MOVE_EVERY: u32 = 2;
/// Moves through separate processes, by snapshot and by migration.
const HOPS: u32 = 4;

/// Something wrong in a stream. (The texts are read through `Debug`, in
/// failure messages.)
#[derive(Debug)]
#[allow(dead_code)]
enum Fault {
    /// The expected line with bytes repeated.
    Doubled {
        vcpu: u32,
        seq: u64,
        bytes: usize,
        text: String,
    },
    /// The expected line without some of its bytes (e.g. its head).
    Lost {
        vcpu: u32,
        seq: u64,
        bytes: usize,
        text: String,
    },
    /// Whole lines missing.
    Gap { vcpu: u32, from: u64, to: u64 },
    /// A line seen before.
    Repeat { vcpu: u32, seq: u64 },
    /// The guest saw something wrong (a `FERRY BAD` line, e.g. a UART
    /// register read that reached the device twice).
    Bad(String),
    /// Anything else.
    Garbage(String),
}

/// What [`check_stream`] found.
struct StreamCheck {
    vcpus: u32,
    /// Per vCPU: the next expected seq, and the checksum so far.
    next: Vec<(u64, u64)>,
    lines: usize,
    faults: Vec<Fault>,
}

impl StreamCheck {
    fn new(vcpus: u32) -> Self {
        Self {
            vcpus,
            next: vec![(0, STREAM_SUM_START); vcpus as usize],
            lines: 0,
            faults: Vec::new(),
        }
    }

    fn expected(&self, vcpu: u32) -> (String, u64) {
        let (seq, sum) = self.next[vcpu as usize];
        stream_line(vcpu, seq, sum)
    }

    fn advance(&mut self, vcpu: u32) {
        let (_, sum) = self.expected(vcpu);
        let n = &mut self.next[vcpu as usize];
        *n = (n.0 + 1, sum);
    }

    /// Jumps `vcpu`'s expectation to just after line `seq`.
    fn resync(&mut self, vcpu: u32, seq: u64) {
        let mut sum = STREAM_SUM_START;
        for s in 0..=seq {
            sum = stream_line(vcpu, s, sum).1;
        }
        self.next[vcpu as usize] = (seq + 1, sum);
    }

    fn feed(&mut self, text: &str) {
        match parse_line(text) {
            GuestLine::Boot { .. } | GuestLine::Ws { .. } | GuestLine::Ready { .. } => return,
            GuestLine::Bad { .. } => {
                self.faults.push(Fault::Bad(text.into()));
                return;
            }
            _ => {}
        }
        self.lines += 1;
        let vcpus = 0..self.vcpus;
        if let Some(v) = vcpus.clone().find(|&v| self.expected(v).0 == text) {
            self.advance(v);
            return;
        }
        // A damaged copy of some vCPU's next line?
        for v in vcpus.clone() {
            let (want, _) = self.expected(v);
            let seq = self.next[v as usize].0;
            let fault = if let Some(bytes) = doubled(&want, text) {
                Fault::Doubled {
                    vcpu: v,
                    seq,
                    bytes,
                    text: text.into(),
                }
            } else if let Some(bytes) = cut(&want, text) {
                Fault::Lost {
                    vcpu: v,
                    seq,
                    bytes,
                    text: text.into(),
                }
            } else {
                continue;
            };
            self.faults.push(fault);
            self.advance(v);
            return;
        }
        // A whole line, but not the next one?
        if let GuestLine::Stream { vcpu, seq, .. } = parse_line(text) {
            if vcpus.contains(&vcpu) {
                let mut sum = STREAM_SUM_START;
                for s in 0..seq {
                    sum = stream_line(vcpu, s, sum).1;
                }
                if stream_line(vcpu, seq, sum).0 == text {
                    let next = self.next[vcpu as usize].0;
                    if seq > next {
                        self.faults.push(Fault::Gap {
                            vcpu,
                            from: next,
                            to: seq - 1,
                        });
                        self.resync(vcpu, seq);
                    } else {
                        self.faults.push(Fault::Repeat { vcpu, seq });
                    }
                    return;
                }
            }
        }
        self.faults.push(Fault::Garbage(text.into()));
    }

    /// True when `partial` is the beginning of some vCPU's next line.
    fn continues_with(&self, partial: &[u8]) -> bool {
        (0..self.vcpus).any(|v| self.expected(v).0.as_bytes().starts_with(partial))
    }

    /// The sum of what `weigh` gives each fault.
    fn sum_faults(&self, weigh: impl Fn(&Fault) -> usize) -> usize {
        self.faults.iter().map(weigh).sum()
    }

    /// How many faults `is` holds for.
    fn count_faults(&self, is: impl Fn(&Fault) -> bool) -> usize {
        self.sum_faults(|f| usize::from(is(f)))
    }

    fn doubled_bytes(&self) -> usize {
        self.sum_faults(|f| match f {
            Fault::Doubled { bytes, .. } => *bytes,
            _ => 0,
        })
    }

    fn lost_bytes(&self) -> usize {
        self.sum_faults(|f| match f {
            Fault::Lost { bytes, .. } => *bytes,
            _ => 0,
        })
    }

    fn summary(&self) -> String {
        format!(
            "{} stream lines, next seq per vCPU {:?}; {} faults: {} doubled bytes, {} lost bytes, \
             {} gaps, {} repeats, {} BAD lines from the guest, {} garbage",
            self.lines,
            self.next.iter().map(|n| n.0).collect::<Vec<_>>(),
            self.faults.len(),
            self.doubled_bytes(),
            self.lost_bytes(),
            self.count_faults(|f| matches!(f, Fault::Gap { .. })),
            self.count_faults(|f| matches!(f, Fault::Repeat { .. })),
            self.count_faults(|f| matches!(f, Fault::Bad(_))),
            self.count_faults(|f| matches!(f, Fault::Garbage(_))),
        )
    }

    /// Fails unless the stream is exact and every vCPU printed at least
    /// `min` lines.
    fn assert_exact(&self, what: &str, min: u64) {
        assert!(
            self.faults.is_empty(),
            "{what}: {}; first faults: {:#?}",
            self.summary(),
            &self.faults[..self.faults.len().min(6)]
        );
        for (v, n) in self.next.iter().enumerate() {
            assert!(n.0 >= min, "{what}: vCPU {v} printed only {} lines", n.0);
        }
    }
}

/// If `got` is `want` with some bytes repeated in place, how many.
fn doubled(want: &str, got: &str) -> Option<usize> {
    let (w, g) = (want.as_bytes(), got.as_bytes());
    if g.len() <= w.len() {
        return None;
    }
    let (mut i, mut extra) = (0, 0);
    for (j, &b) in g.iter().enumerate() {
        if i < w.len() && w[i] == b {
            i += 1;
        } else if j > 0 && g[j - 1] == b {
            extra += 1;
        } else {
            return None;
        }
    }
    (i == w.len()).then_some(extra)
}

/// If `got` is `want` without one run of bytes (e.g. its head), how many.
fn cut(want: &str, got: &str) -> Option<usize> {
    let (w, g) = (want.as_bytes(), got.as_bytes());
    if g.is_empty() || g.len() >= w.len() {
        return None;
    }
    let prefix = w.iter().zip(g).take_while(|(a, b)| a == b).count();
    let suffix = w
        .iter()
        .rev()
        .zip(g.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (prefix + suffix >= g.len()).then_some(w.len() - g.len())
}

/// Checks the lines of one or more logs, in order, as one stream.
fn check_stream<'a>(logs: impl IntoIterator<Item = &'a [Logged]>) -> StreamCheck {
    let mut c = StreamCheck::new(VCPUS);
    for log in logs {
        for l in log {
            c.feed(&l.text);
        }
    }
    c
}

/// Lines of `vcpu`'s stream in a log.
fn stream_lines(log: &[Logged], vcpu: u32) -> usize {
    log.iter()
        .filter(|l| matches!(l.line, GuestLine::Stream { vcpu: v, .. } if v == vcpu))
        .count()
}

/// Waits until every vCPU has printed `n` stream lines into `path`.
fn wait_stream(path: &Path, n: usize) -> Vec<Logged> {
    wait_for(
        WAIT,
        &format!("{n} stream lines in {}", path.display()),
        || {
            let log = read_console(path);
            (0..VCPUS)
                .all(|v| stream_lines(&log, v) >= n)
                .then_some(log)
        },
    )
}

/// Restores `state` and a copy of `vm`'s memory into a new VM in this
/// process (paused), its console appending to `log`.
fn move_in_process(vm: &Vm, state: &MachineState, log: &Path) -> Vm {
    let next = PreparedVm::new(MEM, VCPUS, ConsoleOutput::File(log.into())).unwrap();
    // The new VM's memory reads as zero: copy only what is not.
    let mut chunk = vec![0u8; 64 << 10];
    for off in (0..MEM).step_by(chunk.len()) {
        vm.ram().read_at(off, &mut chunk).unwrap();
        if !is_zero(&chunk) {
            next.ram().write_at(off, &chunk).unwrap();
        }
    }
    next.restore(state).unwrap()
}

/// 500 pause → save → resume cycles at random short intervals, every
/// other one moving the VM into a new one in this process: the console log
/// is still exactly the guest's stream, and every saved partial line is the
/// beginning of the next line due. (The moves are what make an incomplete
/// saved state visible: resumed in the same VM, KVM would still complete
/// the access.)
#[test]
fn pause_save_resume_cycles_never_double_or_lose_a_byte() {
    let dir = Scratch::new("pending-io");
    let log = dir.path("stream.log");
    let mut vm = boot_guest(MEM, VCPUS, GUEST, &log);
    wait_stream(&log, 20);
    let mut rng = Rng::from_clock();
    let (mut moves, mut straddling) = (0, 0);
    let t = Instant::now();
    for cycle in 1..=CYCLES {
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        vm.pause().unwrap();
        let state = vm.save_state().unwrap();
        let partial = &state.devices.serial_line;
        if cycle % MOVE_EVERY == 0 {
            let so_far = check_stream([&read_console(&log)[..]]);
            so_far.assert_exact(&format!("before move {}", moves + 1), 1);
            assert!(
                so_far.continues_with(partial),
                "the saved partial line {:?} does not continue the stream",
                String::from_utf8_lossy(partial)
            );
            straddling += usize::from(!partial.is_empty());
            let next = move_in_process(&vm, &state, &log);
            // The old VM never prints the partial line: the new one will.
            drop(std::mem::replace(&mut vm, next));
            moves += 1;
        }
        vm.resume().unwrap();
    }
    let cycles_took = t.elapsed();
    let before_end = read_console(&log).len();
    wait_for(WAIT, "more lines after the last cycle", || {
        (read_console(&log).len() > before_end + 20).then_some(())
    });
    vm.pause().unwrap();
    let check = check_stream([&read_console(&log)[..]]);
    eprintln!(
        "{CYCLES} cycles with {moves} moves ({straddling} of them mid-line) in {cycles_took:?}: {}",
        check.summary()
    );
    check.assert_exact("after all cycles", 40);
    assert!(
        straddling > 0,
        "no move landed mid-line, so the partial line was never moved"
    );
}

/// Starts `ferry-source` on the stream guest and waits for its stream;
/// returns the process, the list of logs the stream runs through (its log
/// so far) and its API socket.
fn start_streaming(dir: &Scratch) -> (Proc, Vec<PathBuf>, PathBuf) {
    let p = spawn_guest_source(dir, MEM_ARG, VCPUS, GUEST, &[]);
    let log = dir.path("src.log");
    wait_stream(&log, 20);
    (p, vec![log], dir.path("src.sock"))
}

/// Quits the last VM of a run of hops (behind `sock`, in `proc`) and checks
/// that `logs`, one after the other, are exactly the stream.
fn finish_hops(sock: &Path, proc: &mut Proc, logs: &[PathBuf], hops: &str, what: &str) {
    ctl(sock, &["quit"]);
    assert!(wait_exit(proc, WAIT, "the last VM's process to quit"));
    let all: Vec<Vec<Logged>> = logs.iter().map(|l| read_console(l)).collect();
    let check = check_stream(all.iter().map(|l| &l[..]));
    eprintln!("{HOPS} {hops}: {}", check.summary());
    check.assert_exact(what, 60);
}

/// Pauses the VM behind `sock` and snapshots it to `path` until the
/// snapshot holds a partial console line (almost always the first time);
/// returns its bytes.
fn snapshot_mid_line(sock: &Path, path: &Path, rng: &mut Rng) -> Vec<u8> {
    for _ in 0..20 {
        ctl(sock, &["pause"]);
        ctl(sock, &["snapshot", path.to_str().unwrap()]);
        let line = Snapshot::open(path).unwrap().state.devices.serial_line;
        if !line.is_empty() {
            return line;
        }
        ctl(sock, &["resume"]);
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
    }
    panic!("20 snapshots in a row fell between two lines");
}

/// A snapshot taken mid-line by `ferry-source` and restored by `ferry-dest`
/// in new processes, [`HOPS`] times over: the logs, one after the other, are
/// exactly the stream, and each destination's first line is the one that
/// straddled the pause, whole.
#[test]
fn the_stream_is_whole_across_snapshots_restored_in_new_processes() {
    let dir = Scratch::new("pending-io-snap");
    let mut rng = Rng::from_clock();
    let (mut proc, mut logs, mut sock) = start_streaming(&dir);
    for hop in 1..=HOPS {
        let snap = dir.path(&format!("hop{hop}.snap"));
        let partial = snapshot_mid_line(&sock, &snap, &mut rng);
        ctl(&sock, &["quit"]);
        assert!(wait_exit(&mut proc, WAIT, "the old VM's process to quit"));
        let before: Vec<Vec<Logged>> = logs.iter().map(|l| read_console(l)).collect();
        let so_far = check_stream(before.iter().map(|l| &l[..]));
        so_far.assert_exact(&format!("before hop {hop}"), 1);
        assert!(
            so_far.continues_with(&partial),
            "hop {hop}: the snapshot's partial line {:?} does not continue the stream",
            String::from_utf8_lossy(&partial)
        );

        let (log, next_sock) = (
            dir.path(&format!("hop{hop}.log")),
            dir.path(&format!("hop{hop}.sock")),
        );
        proc = spawn_restore(&dir, &format!("hop{hop}"), &snap, &[]);
        let after = wait_stream(&log, 20);
        assert!(
            after[0].text.as_bytes().starts_with(&partial),
            "hop {hop}: the first line after the restore, {:?}, is not the one that \
             straddled the pause ({:?}...)",
            after[0].text,
            String::from_utf8_lossy(&partial)
        );
        logs.push(log);
        sock = next_sock;
    }
    finish_hops(
        &sock,
        &mut proc,
        &logs,
        "snapshot hops",
        "across the snapshots",
    );
}

/// A guest migrated from `ferry-source` through [`HOPS`] `ferry-dest`s in
/// turn (post-copy): the logs, one after the other, are exactly the
/// stream.
#[test]
fn the_stream_is_whole_across_migrations() {
    let dir = Scratch::new("pending-io-migrate");
    let (mut from, mut logs, mut sock) = start_streaming(&dir);
    for hop in 1..=HOPS {
        let name = format!("hop{hop}");
        let (log, next_sock) = (
            dir.path(&format!("{name}.log")),
            dir.path(&format!("{name}.sock")),
        );
        let (to, addr) = spawn_dest(&dir, &name, &strs(&console_args(&dir, &name, &[])));
        let answer = ctl(&sock, &["migrate", &addr]);
        assert!(
            wait_exit(&mut from, WAIT, "the migrated VM's old process to end"),
            "hop {hop}: {answer}"
        );
        wait_stream(&log, 20);
        logs.push(log);
        (from, sock) = (to, next_sock);
    }
    finish_hops(
        &sock,
        &mut from,
        &logs,
        "migrations",
        "across the migrations",
    );
}

#[test]
fn the_checker_names_what_is_wrong() {
    let mut lines: Vec<String> = Vec::new();
    let mut sum = [STREAM_SUM_START; 2];
    for seq in 0..6 {
        for v in 0..2 {
            let (l, s) = stream_line(v, seq, sum[v as usize]);
            sum[v as usize] = s;
            lines.push(l);
        }
    }
    let check = |ls: &[String]| {
        let mut c = StreamCheck::new(2);
        for l in ls {
            c.feed(l);
        }
        c
    };
    let good = check(&lines);
    assert!(good.faults.is_empty(), "{}", good.summary());
    assert_eq!(good.next, [(6, sum[0]), (6, sum[1])]);

    let mut bad = lines.clone();
    let twice = bad[3].as_bytes()[19] as char;
    bad[3].insert(20, twice); // a byte printed twice
    bad[4] = bad[4][4..].to_string(); // the head of a line lost
    bad.remove(7); // a whole line lost
    bad.insert(9, lines[6].clone()); // a line printed twice
    bad.push("FERRY BAD uart thre_missed=1 vcpu=0 seq=5".into());
    bad.push("FERRY STRAEM junk".into());
    let c = check(&bad);
    assert!(
        matches!(
            c.faults[..],
            [
                Fault::Doubled {
                    vcpu: 1,
                    seq: 1,
                    bytes: 1,
                    ..
                },
                Fault::Lost {
                    vcpu: 0,
                    seq: 2,
                    bytes: 4,
                    ..
                },
                Fault::Gap {
                    vcpu: 1,
                    from: 3,
                    to: 3
                },
                Fault::Repeat { vcpu: 0, seq: 3 },
                Fault::Bad(_),
                Fault::Garbage(_),
            ]
        ),
        "{:#?}",
        c.faults
    );
    assert_eq!((c.doubled_bytes(), c.lost_bytes()), (1, 4));
    assert!(good.continues_with(&stream_line(1, 6, sum[1]).0.as_bytes()[..20]));
    assert!(!good.continues_with(b"FERRY STREAM 1 5"));
}
