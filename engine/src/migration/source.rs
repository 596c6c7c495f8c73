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
//! If anything fails before the destination says `Resumed`, the source
//! resumes its own VM: the migration failed, the VM did not.
//!
//! [`migrate_machine`] is the post-copy source for a VM that is not running
//! anywhere: a machine state and a source of its pages (lazy restore gives
//! it a snapshot's).

use std::time::{Duration, Instant};

use ferry_page_server::server::{self, Resume};
use ferry_page_server::source::{FileSource, PageSource};
use ferry_protocol::{from_json, MigrationMode, MsgType, StateMeta};
use tracing::{error, info, warn};

use super::error::SourceError;
use super::options::SourceOptions;
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
/// and `vm` is left paused here, to be dropped.
pub fn migrate(vm: &mut Vm, addr: &str, opts: &SourceOptions) -> Result<Outcome, SourceError> {
    let start_host_us = now_us();
    let Session {
        mut control,
        fault,
        ack,
    } = open_session(addr, opts.mode, opts.features, vm.meta(), start_host_us)?;
    let cfg = negotiated(&opts.server, &ack);
    let source = FileSource::new(vm.ram().file().clone(), vm.ram().pages());

    let was_running = vm.is_running();
    let logging = matches!(opts.mode, MigrationMode::Precopy | MigrationMode::Hybrid);
    let t0 = Instant::now();
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
        let pre = before_pause(vm, &mut control, &source, &cfg, opts)?;
        let pause_host_us = now_us();
        let pause = vm.pause()?;
        let pre = after_pause(vm, &mut control, &source, &cfg, opts, pre)?;
        let resumed = switch_over(
            vm,
            &mut control,
            opts.mode,
            start_host_us,
            pause_host_us,
            pause,
            &pre,
        )?;
        Ok::<_, SourceError>((pre, resumed))
    })();
    if logging {
        if let Err(e) = vm.stop_dirty_log() {
            warn!("cannot stop dirty logging: {e}");
        }
    }
    let (pre, resumed) = match pre {
        Ok(r) => r,
        Err(e) => {
            error!("migration failed before switch-over: {e}");
            if was_running {
                vm.resume()?;
            }
            return Err(SourceError::RolledBack(Box::new(e)));
        }
    };
    info!(downtime_us = resumed.downtime_us, "destination runs the VM");

    let (server_stats, complete) = if opts.mode.lazy() {
        let have = pre.have.as_ref().map_or(0, |h| h.count());
        opts.phase("post-copy", source.pages() - have.min(source.pages()));
        let (control, control_buffered) = control.into_parts();
        let (fault, fault_buffered) = fault.into_parts();
        let (s, c) = server::serve_rest(
            control,
            fault,
            &source,
            &cfg,
            Resume {
                have: pre.have.as_ref(),
                sent: opts.sent_counter(),
                control_buffered,
                fault_buffered,
            },
        )?;
        (serde_json::to_value(s).unwrap_or_default(), c)
    } else {
        let payload = control.expect(MsgType::Complete, "Complete")?;
        (serde_json::Value::Null, from_json("Complete", payload)?)
    };
    let stats = final_stats(complete, server_stats, t0)?;
    info!(
        total_ms = stats.total_ms,
        "migration complete; releasing source memory"
    );
    Ok(Outcome { stats })
}

fn switch_over(
    vm: &mut Vm,
    control: &mut super::link::Link,
    mode: MigrationMode,
    start_host_us: u64,
    pause_host_us: u64,
    pause: Duration,
    pre: &PreSwitch,
) -> Result<ferry_protocol::Resumed, SourceError> {
    let t = Instant::now();
    let machine = vm.save_state()?;
    let save_us = t.elapsed().as_micros() as u64;
    let meta = StateMeta {
        mode,
        start_host_us,
        rounds: pre.rounds.clone(),
        converged: pre.converged,
        pause_host_us,
        pause_us: pause.as_micros() as u64,
        save_us,
    };
    send_state(control, &meta, &state::encode(&machine))
}

/// Serves a VM that runs nowhere, given as its machine state and a source
/// of its pages, to the destination at `addr` as a post-copy migration: the
/// same handshake, then `State`, then, once the destination runs the VM, the
/// page server until `Complete`. Returns the destination's statistics.
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
    addr: &str,
    opts: &SourceOptions,
    start_host_us: u64,
) -> Result<Outcome, SourceError> {
    let mode = MigrationMode::Postcopy;
    let Session {
        mut control,
        fault,
        ack,
    } = open_session(addr, mode, opts.features, machine.meta, start_host_us)?;
    let cfg = negotiated(&opts.server, &ack);
    let t0 = Instant::now();
    let meta = StateMeta {
        mode,
        start_host_us,
        rounds: Vec::new(),
        converged: None,
        pause_host_us: start_host_us,
        pause_us: 0,
        save_us: 0,
    };
    let resumed = send_state(&mut control, &meta, &state::encode(machine))?;
    info!(downtime_us = resumed.downtime_us, "destination runs the VM");
    let (control, control_buffered) = control.into_parts();
    let (fault, fault_buffered) = fault.into_parts();
    let (server_stats, complete) = server::serve_rest(
        control,
        fault,
        pages,
        &cfg,
        Resume {
            control_buffered,
            fault_buffered,
            ..Resume::default()
        },
    )?;
    let stats = final_stats(
        complete,
        serde_json::to_value(server_stats).unwrap_or_default(),
        t0,
    )?;
    info!(total_ms = stats.total_ms, "every page served");
    Ok(Outcome { stats })
}
