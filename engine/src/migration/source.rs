//! The source side of a migration, in all four modes.
//!
//! Both connections are opened and the handshake done while the VM still
//! runs. Then, by mode:
//!
//! - post-copy: pause, send the state, serve pages until `Complete`;
//! - stop-and-copy: pause, send every page, send the state;
//! - pre-copy: with KVM dirty logging on, send every page, then rounds of
//!   the pages dirtied meanwhile until the estimated stop-and-copy time of
//!   what is left meets the target or the round limit is hit (reported as
//!   not converged); pause; send the rest; send the state;
//! - hybrid: like pre-copy for a few rounds, then pause, tell the destination
//!   which of its pages went stale (`Discard`), send the state, and serve the
//!   rest post-copy.
//!
//! The switch-over is a commit both sides agree on: the destination restores
//! the state and answers `Ready` without running it; the source writes
//! `Commit`, and from that moment never runs its own copy again. Anything
//! that fails before `Commit` is written rolls back: the source resumes its
//! VM (the destination, which never ran it, discards it). After `Commit`,
//! [`super::committed`] finishes the move through lost links.
//!
//! [`migrate_machine`] is the post-copy source for a VM that is not running
//! anywhere: a machine state and a source of its pages (lazy restore gives
//! it a snapshot's).

use std::time::{Duration, Instant};

use ferry_page_server::source::PageSource;
use ferry_protocol::{abort_reason, MigrationMode, MsgType, PageBitmap, StateMeta};
use tracing::{error, info, warn};

use super::committed::{Committed, End};
use super::dial::Dial;
use super::disk_space::PageSpace;
use super::error::SourceError;
use super::link::Link;
use super::options::SourceOptions;
use super::progress::{Stage, VmHere};
use super::record::SessionRecord;
use super::rounds::{after_pause, before_pause, PreSwitch};
use super::session::{final_stats, negotiated, open_session, send_state, Session};
use super::stats::MigrationStats;
use crate::console::now_us;
use crate::state::{self, MachineState};
use crate::vm::Vm;

/// What a completed migration reports on the source.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The destination's statistics (with ours under `source`).
    pub stats: MigrationStats,
}

/// Moves `vm` to the destination at `addr` with post-copy.
pub fn migrate_postcopy(
    vm: &mut Vm,
    addr: &str,
    opts: &SourceOptions,
) -> Result<Outcome, SourceError> {
    let opts = SourceOptions {
        mode: MigrationMode::Postcopy,
        ..opts.clone()
    };
    migrate(vm, addr, &opts)
}

/// Moves `vm` to the destination at `addr`. On success the VM runs there
/// and `vm` is left paused here, to be dropped. On
/// [`SourceError::RolledBack`] it runs here again; on
/// [`SourceError::Stranded`] it stays paused here with its memory, because
/// the destination may run it.
pub fn migrate(vm: &mut Vm, addr: &str, opts: &SourceOptions) -> Result<Outcome, SourceError> {
    let start_host_us = now_us();
    opts.stage(Stage::Precopy);
    let space = PageSpace::of(vm, opts.migrate_disks)?;
    // The page server's buffers, made when the VM started if its owner
    // asked, else backed now rather than at the first fault.
    let buffers = opts.mode.lazy().then(|| opts.spare_buffers.take());
    let peer_timeout = opts.server.peer_timeout;
    let dial = Dial::tcp(addr).with_congestion(opts.tcp_congestion.clone());
    let Session {
        mut control,
        fault,
        ack,
        hello,
    } = open_session(
        &dial,
        opts.mode,
        opts.features,
        vm.meta(),
        peer_timeout,
        opts.session_id,
        opts.tls.as_ref(),
        space.hello_options(),
    )
    .inspect_err(|e| opts.fail(e.to_string()))?;
    let cfg = negotiated(&opts.server, &ack);
    let source = &*space.source;

    let was_running = vm.is_running();
    // Post-copy with a hot window logs writes just before the pause.
    let hot_logging = opts.mode == MigrationMode::Postcopy && !opts.hot_window.is_zero();
    let logging =
        matches!(opts.mode, MigrationMode::Precopy | MigrationMode::Hybrid) || hot_logging;
    let t0 = Instant::now();
    let mut hot = None;
    let pre = (|| {
        if logging {
            if was_running {
                vm.pause()?;
            }
            vm.start_dirty_log()?;
            if was_running {
                vm.resume()?;
            }
        }
        let pre = before_pause(vm, &mut control, &space, &cfg, opts)?;
        if hot_logging && was_running {
            std::thread::sleep(opts.hot_window);
        }
        opts.check_cancel()?;
        opts.stage(Stage::Switching);
        let pause = vm.pause()?;
        // Downtime starts once every vCPU has stopped (docs/protocol.md).
        let pause_host_us = now_us();
        if hot_logging {
            let h = space.take_dirty(vm)?;
            info!(
                pages = h.count(),
                window_ms = opts.hot_window.as_millis() as u64,
                "hot set: pages written just before the pause, pushed first"
            );
            hot = Some(h);
        }
        let pre = after_pause(vm, &mut control, &space, &cfg, opts, pre)?;
        send_machine_state(
            vm,
            &mut control,
            opts,
            start_host_us,
            pause_host_us,
            pause,
            &pre,
        )?;
        Ok::<_, SourceError>(pre)
    })();
    if logging {
        if let Err(e) = vm.stop_dirty_log() {
            warn!("cannot stop dirty logging: {e}");
        }
    }
    // The commit point: once `Commit` is written, this copy never runs
    // again. A cancel accepted before it rolls the move back; from it on,
    // cancels are refused. The session record is written before `Commit`:
    // a crash after it must find the record.
    let pre = pre
        .and_then(|pre| opts.commit().map(|()| pre))
        .and_then(|pre| match &opts.session_record {
            Some(path) => SessionRecord::of(&dial.addr(), &hello, opts.mode)
                .write(path)
                .map(|()| pre)
                .map_err(SourceError::Record),
            None => Ok(pre),
        })
        // Handed over only now, when nothing but a lost `Commit` can stop
        // the move: the destination takes the disks' locks when it starts
        // its devices after `Commit`. A migrated disk stays locked shared,
        // since the page server still reads it. A roll-back from here on
        // (the destination discarded the VM unrun) takes them back in its
        // resume.
        .and_then(|pre| {
            vm.hand_over_disks(opts.migrate_disks)
                .map(|()| pre)
                .map_err(SourceError::from)
        });
    let pre = match pre {
        Ok(r) => r,
        Err(e) => {
            error!("migration failed before switch-over: {e}");
            let e = roll_back(vm, was_running, opts, e);
            tell_discard(&control, &e);
            return Err(e);
        }
    };
    let commit_sent = match control.send(MsgType::Commit, 0, &[]) {
        Ok(()) => true,
        Err(e) => {
            warn!("writing Commit failed ({e}); settling the outcome with the destination");
            false
        }
    };
    info!("switch-over committed");
    let record = SessionRecord::of(&dial.addr(), &hello, opts.mode);
    let mut committed = Committed::new(&dial, hello, opts, cfg, source, opts.mode.lazy());
    committed.hot = hot;
    committed.buffers = buffers;
    let end = committed.run(Some((control, fault)), commit_sent, pre.have);
    let (complete, server_stats) = match end {
        Ok(End::Complete { complete, server }) => (complete, server),
        Ok(End::Unknown {
            resumed_seen: false,
        }) => {
            // The destination never ran it and never will: this copy is the VM.
            warn!("the destination discarded the VM before running it; resuming it here");
            return Err(roll_back(vm, was_running, opts, SourceError::Unknown));
        }
        Ok(End::Unknown { resumed_seen: true }) => {
            return Err(stranded(
                opts,
                SourceError::stranded("the destination lost the VM after running it"),
                record,
            ))
        }
        Err(e) => return Err(stranded(opts, e, record)),
    };
    let stats = final_stats(complete, server_stats, t0, &committed.recovery, &dial)?;
    opts.vm_here(VmHere::Held("it moved: the destination runs it".into()));
    opts.stage(Stage::Completed);
    info!(
        total_ms = stats.total_ms,
        "migration complete; releasing source memory"
    );
    Ok(Outcome { stats })
}

/// A move that failed before `Commit`: this copy is the VM, and it runs
/// again if it ran before.
fn roll_back(vm: &mut Vm, was_running: bool, opts: &SourceOptions, e: SourceError) -> SourceError {
    // The disks' locks first (handed over if the move got to its commit
    // point), then the vCPUs.
    let back = vm.take_back_disks().and_then(|()| match was_running {
        true => vm.resume(),
        false => Ok(()),
    });
    if let Err(re) = back {
        // E.g. a disk whose lock was handed over at the commit point and
        // that another VM or process took meanwhile: no vCPU runs on a
        // disk this VM does not hold. It waits here, paused, and a
        // `resume` once the disk is free takes the locks again.
        let e = SourceError::NotResumed(format!("{e}; {re}"));
        error!("{e}");
        opts.vm_here(VmHere::Paused);
        opts.fail(e.to_string());
        return e;
    }
    // What the VM does is published before the failure, so a status that
    // shows the failure also shows the VM back.
    opts.vm_here(if was_running {
        VmHere::Running
    } else {
        VmHere::Paused
    });
    opts.fail(e.to_string());
    SourceError::RolledBack(Box::new(e))
}

/// How long a rolled-back source tries to tell the destination.
const DISCARD_NOTICE_WITHIN: Duration = Duration::from_secs(1);

/// Tells the destination of a move rolled back before `Commit` to discard
/// its copy now (`Abort` with why), rather than keep it for the recovery
/// window in case a `Commit` were still on its way. The VM already runs
/// here again; a link that is gone or full just misses the notice.
fn tell_discard(control: &Link, e: &SourceError) {
    let _ = control
        .stream
        .set_write_timeout(Some(DISCARD_NOTICE_WITHIN));
    if let Err(send) = control.send(MsgType::Abort, 0, abort_reason(&e.to_string())) {
        warn!("could not tell the destination to discard its copy: {send}");
    }
}

/// A committed move that cannot finish: the VM stays paused here.
fn stranded(opts: &SourceOptions, e: SourceError, record: SessionRecord) -> SourceError {
    let why = match e {
        SourceError::Stranded { why, .. } => why,
        other => other.to_string(),
    };
    let e = SourceError::Stranded {
        why,
        record: Some(Box::new(record)),
    };
    error!("{e}");
    opts.vm_here(VmHere::Held(e.to_string()));
    opts.fail(e.to_string());
    e
}

/// Captures the paused VM's state and sends it; returns once the
/// destination says `Ready`.
fn send_machine_state(
    vm: &mut Vm,
    control: &mut super::link::Link,
    opts: &SourceOptions,
    start_host_us: u64,
    pause_host_us: u64,
    pause: Duration,
    pre: &PreSwitch,
) -> Result<(), SourceError> {
    let t = Instant::now();
    let machine = vm.save_state()?;
    let save_us = t.elapsed().as_micros() as u64;
    let meta = StateMeta {
        mode: opts.mode,
        start_host_us,
        rounds: pre.rounds.clone(),
        converged: pre.converged,
        pause_host_us,
        pause_us: pause.as_micros() as u64,
        save_us,
    };
    send_state(control, &meta, &state::encode(&machine), opts.cancel_gate())
}

/// Serves a VM that runs nowhere, given as its machine state and a source
/// of its pages, to the destination `dial` reaches (TCP, or a lazy
/// restore's socketpairs) as a post-copy migration: the
/// same handshake and commit, then the page server until `Complete`.
/// Returns the destination's statistics.
///
/// `start_host_us` (µs since the epoch) is when the caller began; it is
/// sent as both the start and the pause time, so the destination's
/// `downtime_us` is the time from then until its vCPUs run and `total_ms`
/// the time until every page is present. `opts.mode` is ignored (always
/// post-copy). Pages are served as the source gives them: verifying them is
/// the caller's business.
pub fn migrate_machine(
    machine: &MachineState,
    pages: &dyn PageSource,
    dial: &Dial,
    opts: &SourceOptions,
    start_host_us: u64,
) -> Result<Outcome, SourceError> {
    let mode = MigrationMode::Postcopy;
    let Session {
        mut control,
        fault,
        ack,
        hello,
    } = open_session(
        dial,
        mode,
        opts.features,
        machine.meta,
        opts.server.peer_timeout,
        opts.session_id,
        opts.tls.as_ref(),
        Vec::new(),
    )?;
    let cfg = negotiated(&opts.server, &ack);
    let t0 = Instant::now();
    // The destination loads these itself: the push skips them.
    let have = opts
        .preloaded
        .as_ref()
        .map(|set| PageBitmap::from_words(set.pages(), set.words()));
    let meta = StateMeta {
        mode,
        start_host_us,
        rounds: Vec::new(),
        converged: None,
        pause_host_us: start_host_us,
        pause_us: 0,
        save_us: 0,
    };
    send_state(&mut control, &meta, &state::encode(machine), None)?;
    let commit_sent = control.send(MsgType::Commit, 0, &[]).is_ok();
    let mut committed = Committed::new(dial, hello, opts, cfg, pages, true);
    let (complete, server) = match committed.run(Some((control, fault)), commit_sent, have)? {
        End::Complete { complete, server } => (complete, server),
        End::Unknown { .. } => return Err(SourceError::Unknown),
    };
    let stats = final_stats(complete, server, t0, &committed.recovery, dial)?;
    info!(total_ms = stats.total_ms, "every page served");
    Ok(Outcome { stats })
}

/// Finishes a committed move whose source process died: `record` names
/// the session and `pages` is the guest RAM file it left. Reconnects to
/// the destination, serves what it still lacks and returns its statistics
/// once it says `Complete`.
pub fn finish_after_crash(
    record: &SessionRecord,
    pages: &dyn PageSource,
    opts: &SourceOptions,
) -> Result<Outcome, SourceError> {
    if pages.pages() * ferry_protocol::PAGE_SIZE as u64 != record.mem_size {
        return Err(SourceError::stranded(format!(
            "the memory file holds {} pages, the session {} bytes",
            pages.pages(),
            record.mem_size
        )));
    }
    let t0 = Instant::now();
    let dial = Dial::tcp(&record.addr).with_congestion(opts.tcp_congestion.clone());
    let mut committed = Committed::new(
        &dial,
        record.hello(),
        opts,
        opts.server.clone(),
        pages,
        record.mode.lazy(),
    );
    let (complete, server) = match committed.run(None, false, None)? {
        End::Complete { complete, server } => (complete, server),
        End::Unknown { .. } => {
            return Err(SourceError::stranded(
                "the destination does not hold the session",
            ))
        }
    };
    let stats = final_stats(complete, server, t0, &committed.recovery, &dial)?;
    Ok(Outcome { stats })
}
