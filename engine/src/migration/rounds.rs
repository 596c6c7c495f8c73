//! Work before the switch-over: the pre-copy rounds while the guest runs,
//! hybrid's discard rounds, and what is sent once it is paused.

use std::net::TcpStream;

use ferry_page_server::protocol::{read_frame, write_frame, MigrationMode, MsgType, ProtocolError};
use ferry_page_server::server::ServerConfig;
use ferry_page_server::source::{FileSource, PageSource};
use tracing::{info, warn};

use super::precopy::{self, PageSender, RoundStats};
use super::source::{SourceError, SourceOptions};
use crate::vm::Vm;

/// The part of a migration before the destination resumes.
pub(super) struct PreSwitch {
    pub(super) rounds: Vec<RoundStats>,
    pub(super) converged: Option<bool>,
    /// Hybrid: pages the destination holds current copies of.
    pub(super) have: Option<Vec<u64>>,
    /// Pages dirtied during the last round, not sent yet.
    pub(super) pending: Option<Vec<u64>>,
    /// Hybrid: every page discarded on the destination so far.
    pub(super) stale: Vec<u64>,
}

/// Work done while the guest still runs: the pre-copy rounds.
pub(super) fn before_pause(
    vm: &Vm,
    control: &TcpStream,
    source: &FileSource,
    cfg: &ServerConfig,
    opts: &SourceOptions,
) -> Result<PreSwitch, SourceError> {
    let mut pre = PreSwitch {
        rounds: Vec::new(),
        converged: None,
        have: None,
        pending: None,
        stale: Vec::new(),
    };
    if !matches!(opts.mode, MigrationMode::Precopy | MigrationMode::Hybrid) {
        return Ok(pre);
    }
    let limit = match opts.mode {
        MigrationMode::Hybrid => opts.hybrid_rounds,
        _ => opts.max_rounds,
    };
    let target_ms = opts.downtime_target.as_secs_f64() * 1e3;
    let mut sender = PageSender::new(control, source, cfg.lz4, cfg.zero_runs);
    sender.progress = opts.sent_counter();
    let mut dirty: Option<Vec<u64>> = None;
    for round in 0..=limit {
        let total = dirty.as_deref().map_or(source.pages(), precopy::count);
        opts.phase(format!("pre-copy round {round}"), total);
        let before = sender.bytes;
        let data_before = sender.pages_data;
        let (sent, ms) = precopy::timed(|| match &dirty {
            None => sender.send_all(),
            Some(d) => sender.send_set(d),
        });
        let sent = sent?;
        sender.flush()?;
        let d = vm.take_dirty_log()?;
        let dirty_after = precopy::count(&d);
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
        discard_rounds(vm, control, &mut pre)?;
    }
    Ok(pre)
}

/// Work done with the guest paused, before the state goes out.
pub(super) fn after_pause(
    vm: &Vm,
    control: &TcpStream,
    source: &FileSource,
    cfg: &ServerConfig,
    opts: &SourceOptions,
    mut pre: PreSwitch,
) -> Result<PreSwitch, SourceError> {
    let mut sender = PageSender::new(control, source, cfg.lz4, cfg.zero_runs);
    sender.progress = opts.sent_counter();
    match opts.mode {
        MigrationMode::Postcopy => {}
        MigrationMode::StopAndCopy => {
            opts.phase("stop-and-copy", source.pages());
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
            let dirty = final_dirty(vm, pre.pending.take())?;
            opts.phase("pre-copy, paused", precopy::count(&dirty));
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
            let dirty = final_dirty(vm, pre.pending.take())?;
            sender.flush()?;
            send_discard(control, &dirty, false)?;
            merge(&mut pre.stale, &dirty);
            pre.have = Some(pre.stale.iter().map(|w| !w).collect());
        }
    }
    sender.flush()?;
    Ok(pre)
}

/// Most discard rounds while the guest runs (hybrid).
const MAX_DISCARD_ROUNDS: u32 = 4;
/// Stop discarding while running once a round names fewer pages.
const DISCARD_SMALL: u64 = 1024;

/// ORs `add` into `into`, growing it as needed.
pub(super) fn merge(into: &mut Vec<u64>, add: &[u64]) {
    if into.len() < add.len() {
        into.resize(add.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(add) {
        *a |= b;
    }
}

/// Sends a `Discard`; with `ack`, waits until the destination applied it.
pub(super) fn send_discard(
    control: &TcpStream,
    stale: &[u64],
    ack: bool,
) -> Result<(), SourceError> {
    let mut payload = Vec::with_capacity(stale.len() * 8);
    for w in stale {
        payload.extend_from_slice(&w.to_le_bytes());
    }
    let mut c = control;
    write_frame(&mut c, MsgType::Discard, u64::from(ack), &payload)?;
    if ack {
        let mut buf = Vec::new();
        let hdr = read_frame(&mut c, &mut buf)?;
        if hdr.kind != MsgType::DiscardDone {
            return Err(ProtocolError::Unexpected {
                got: hdr.kind,
                expected: "DiscardDone",
            }
            .into());
        }
    }
    Ok(())
}

/// Hybrid, still running: instead of resending what the last rounds found
/// dirty, tell the destination to drop it (cheaper than sending, and done
/// before the pause), and repeat on what changed meanwhile. Punching a page
/// out costs ~4.5 µs here, so each round shrinks the set left for the pause.
pub(super) fn discard_rounds(
    vm: &Vm,
    control: &TcpStream,
    pre: &mut PreSwitch,
) -> Result<(), SourceError> {
    for round in 0..MAX_DISCARD_ROUNDS {
        let dirty = final_dirty(vm, pre.pending.take())?;
        let n = precopy::count(&dirty);
        let (sent, ms) = precopy::timed(|| send_discard(control, &dirty, true));
        sent?;
        merge(&mut pre.stale, &dirty);
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
pub(super) fn final_dirty(vm: &Vm, pending: Option<Vec<u64>>) -> Result<Vec<u64>, SourceError> {
    let mut dirty = vm.take_dirty_log()?;
    for (d, p) in dirty.iter_mut().zip(pending.unwrap_or_default()) {
        *d |= p;
    }
    Ok(dirty)
}
