//! Work before the switch-over: the pre-copy rounds while the guest runs,
//! hybrid's discard rounds, and what is sent once it is paused.

use ferry_page_server::server::ServerConfig;
use ferry_protocol::{MigrationMode, MsgType, PageBitmap, RoundStats};
use tracing::{info, warn};

use super::disk_space::PageSpace;
use super::error::SourceError;
use super::link::Link;
use super::options::SourceOptions;
use super::precopy::{self, PageSender};
use crate::vm::Vm;

/// The part of a migration before the destination resumes.
pub(super) struct PreSwitch {
    pub(super) rounds: Vec<RoundStats>,
    pub(super) converged: Option<bool>,
    /// Hybrid: pages the destination holds current copies of.
    pub(super) have: Option<PageBitmap>,
    /// Pages dirtied during the last round, not sent yet.
    pub(super) pending: Option<PageBitmap>,
    /// Hybrid: every page discarded on the destination so far.
    pub(super) stale: PageBitmap,
}

/// Work done while the guest still runs: the pre-copy rounds.
pub(super) fn before_pause(
    vm: &Vm,
    control: &mut Link,
    space: &PageSpace,
    cfg: &ServerConfig,
    opts: &SourceOptions,
) -> Result<PreSwitch, SourceError> {
    let mut pre = PreSwitch {
        rounds: Vec::new(),
        converged: None,
        have: None,
        pending: None,
        stale: PageBitmap::new(space.pages()),
    };
    if !matches!(opts.mode, MigrationMode::Precopy | MigrationMode::Hybrid) {
        return Ok(pre);
    }
    let limit = match opts.mode {
        MigrationMode::Hybrid => opts.hybrid_rounds,
        _ => opts.max_rounds,
    };
    let target_ms = opts.downtime_target.as_secs_f64() * 1e3;
    let mut sender = PageSender::new(&control.stream, &*space.source, cfg.lz4, cfg.zero_runs);
    sender.progress = opts.sent_counter();
    sender.pacer = cfg.max_bandwidth.map(ferry_page_server::pacer::Pacer::new);
    sender.bytes_progress = opts.bytes_counter();
    sender.cancel = opts.cancel_gate();
    let mut dirty: Option<PageBitmap> = None;
    for round in 0..=limit {
        let total = dirty.as_ref().map_or(space.pages(), PageBitmap::count);
        opts.phase(format!("pre-copy round {round}"), total);
        let before = sender.bytes;
        let data_before = sender.pages_data;
        let (sent, ms) = precopy::timed(|| match &dirty {
            None => sender.send_all(),
            Some(d) => sender.send_set(d),
        });
        let sent = sent?;
        sender.flush()?;
        let d = space.take_dirty(vm)?;
        let dirty_after = d.count();
        // Time per data page this round, applied to what is dirty now.
        let data_pages = (sender.pages_data - data_before).max(1);
        let est = dirty_after as f64 * ms / data_pages as f64;
        info!(
            round,
            sent,
            dirty_after,
            ms,
            est_downtime_ms = est,
            "pre-copy round"
        );
        pre.rounds.push(RoundStats {
            round,
            pages: sent,
            bytes: sender.bytes - before,
            ms,
            dirty_after,
            est_downtime_ms: est,
        });
        dirty = Some(d);
        if est <= target_ms {
            pre.converged = Some(true);
            break;
        }
    }
    drop(sender);
    if pre.converged.is_none() {
        pre.converged = Some(false);
        if opts.mode == MigrationMode::Precopy {
            warn!(rounds = limit, target_ms, "pre-copy did not converge: the guest dirties memory faster than the link moves it; finishing with stop-and-copy of the rest");
        } else {
            info!("hybrid: switching to post-copy after {limit} pre-copy rounds");
        }
    }
    pre.pending = dirty;
    if opts.mode == MigrationMode::Hybrid {
        discard_rounds(vm, space, control, &mut pre)?;
    }
    Ok(pre)
}

/// Work done with the guest paused, before the state goes out.
pub(super) fn after_pause(
    vm: &Vm,
    control: &mut Link,
    space: &PageSpace,
    cfg: &ServerConfig,
    opts: &SourceOptions,
    mut pre: PreSwitch,
) -> Result<PreSwitch, SourceError> {
    let mut sender = PageSender::new(&control.stream, &*space.source, cfg.lz4, cfg.zero_runs);
    sender.progress = opts.sent_counter();
    sender.pacer = cfg.max_bandwidth.map(ferry_page_server::pacer::Pacer::new);
    sender.bytes_progress = opts.bytes_counter();
    sender.cancel = opts.cancel_gate();
    match opts.mode {
        MigrationMode::Postcopy => {}
        MigrationMode::StopAndCopy => {
            opts.phase("stop-and-copy", space.pages());
            let (sent, ms) = precopy::timed(|| sender.send_all());
            pre.rounds.push(RoundStats {
                round: 0,
                pages: sent?,
                bytes: sender.bytes,
                ms,
                ..Default::default()
            });
        }
        MigrationMode::Precopy => {
            let dirty = final_dirty(vm, space, pre.pending.take())?;
            opts.phase("pre-copy, paused", dirty.count());
            let (sent, ms) = precopy::timed(|| sender.send_set(&dirty));
            pre.rounds.push(RoundStats {
                round: pre.rounds.len() as u32,
                pages: sent?,
                bytes: sender.bytes,
                ms,
                ..Default::default()
            });
        }
        MigrationMode::Hybrid => {
            let dirty = final_dirty(vm, space, pre.pending.take())?;
            sender.flush()?;
            drop(sender);
            send_discard(control, &dirty, false)?;
            pre.stale.or_with(&dirty);
            let have = PageBitmap::full(space.pages());
            have.clear_those_in(&pre.stale);
            pre.have = Some(have);
            return Ok(pre);
        }
    }
    sender.flush()?;
    Ok(pre)
}

/// Most discard rounds while the guest runs (hybrid).
const MAX_DISCARD_ROUNDS: u32 = 4;
/// Stop discarding while running once a round names fewer pages.
const DISCARD_SMALL: u64 = 1024;

/// Sends a `Discard`; with `ack`, waits until the destination applied it.
fn send_discard(control: &mut Link, stale: &PageBitmap, ack: bool) -> Result<(), SourceError> {
    control.send(MsgType::Discard, u64::from(ack), &stale.to_le_bytes())?;
    if ack {
        control.expect(MsgType::DiscardDone, "DiscardDone")?;
    }
    Ok(())
}

/// Hybrid, still running: instead of resending what the last rounds found
/// dirty, tell the destination to drop it (cheaper than sending, and done
/// before the pause), and repeat on what changed meanwhile. Punching a page
/// out costs ~4.5 µs here, so each round shrinks the set left for the pause.
fn discard_rounds(
    vm: &Vm,
    space: &PageSpace,
    control: &mut Link,
    pre: &mut PreSwitch,
) -> Result<(), SourceError> {
    for round in 0..MAX_DISCARD_ROUNDS {
        let dirty = final_dirty(vm, space, pre.pending.take())?;
        let n = dirty.count();
        let (sent, ms) = precopy::timed(|| send_discard(control, &dirty, true));
        sent?;
        pre.stale.or_with(&dirty);
        info!(
            round,
            pages = n,
            ms,
            "hybrid: discarded stale pages while running"
        );
        if n < DISCARD_SMALL {
            break;
        }
    }
    Ok(())
}

/// What is still to send once paused: the pages dirtied in the last round
/// (found after it was sent) plus those dirtied since.
fn final_dirty(
    vm: &Vm,
    space: &PageSpace,
    pending: Option<PageBitmap>,
) -> Result<PageBitmap, SourceError> {
    let dirty = space.take_dirty(vm)?;
    if let Some(p) = pending {
        dirty.or_with(&p);
    }
    Ok(dirty)
}
