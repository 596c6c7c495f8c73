//! The destination side of a migration, in all four modes.
//!
//! ```text
//! accept control conn, Hello ──► PreparedVm::new (+ userfaultfd in lazy modes)
//! accept fault conn, Hello (same session id, else refused)
//! [Pages / Discard before the state: pre-copy modes]
//! State ──► restore (vCPUs do not run) ──► Ready
//! Commit ──► vCPUs run ──► Resumed                      (the switch-over)
//! lazy: push installed, faults answered ──► every page present ──► Complete
//! ```
//!
//! The rules that keep exactly one copy of the VM running (see
//! `docs/protocol.md`, "Failures"):
//!
//! - Before `Ready` is sent, any failure aborts: nothing ran here.
//! - Between `Ready` and `Commit` the VM is restored but paused. A lost link
//!   is waited out for the recovery window: a source that reconnects with
//!   the session id learns "prepared" and sends `Commit` again. When the
//!   window ends the VM is discarded; it never ran, and a source asking
//!   later hears "unknown session", which lets it resume its own copy.
//! - After `Commit` the VM is this side's. A lost link (either connection,
//!   or a silent peer) is waited out: vCPUs that touch a missing page wait
//!   in their fault, the userfaultfd and every received page are kept, and
//!   the listener takes the source's reconnection. The source learns which
//!   pages are here (`RecvBitmap`) and the move continues. When the window
//!   ends the VM is paused and kept, with the error: it never runs on a
//!   page it does not have.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{
    abort_reason, decode_state, features, session_peer_timeout, Hello, MigrationMode, MsgType,
    PageBitmap, ProtocolError, ResumeStatus, Resumed, Role, StateMeta,
};
use tracing::{error, info, warn};

use super::acceptor::{Acceptor, HELLO_TIMEOUT};
use super::error::{DestError, DRAIN_TIMEOUT};
use super::fault::{FaultStats, FaultThread};
use super::install::{install_push, receive_before_state, PushCounters};
use super::link::{is_link_failure, Heartbeat, Link};
use super::progress::{Progress, Stage, VmHere};
use super::stats::{Blocktime, FaultLatency, LatencySummary, MigrationStats, Recovery};
use super::uffd_ram::UffdRam;
use crate::console::now_us;
use crate::devices::migrated::{DiskSet, MigratedHandle};
use crate::layout::PAGE_SIZE;
use crate::memory::Backing;
use crate::state;
use crate::vm::{ConsoleOutput, PreparedVm, Vm};

mod accept;

use accept::{accept_new, accept_resume, accept_role, ack, answer, tell_discarded, Peer};

/// How often the installer looks up from a quiet control connection.
const POLL: Duration = Duration::from_millis(50);

/// How the destination waits for its peer.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// A source that sends nothing for this long is gone.
    pub peer_timeout: Duration,
    /// How long a lost source is waited for after `Ready`.
    pub recovery_window: Duration,
    /// Where to publish the stage, for the API's `status`.
    pub progress: Option<Arc<Progress>>,
    /// How long to wait for a session to begin (None: for ever).
    pub accept_timeout: Option<Duration>,
    /// Accept only this session id (an in-process lazy restore, whose
    /// source shares it); any other `Hello` is refused.
    pub expect_session: Option<u64>,
    /// Mutual TLS on every connection (None: plain TCP). The fault
    /// connection and every reconnection must then come from the control
    /// connection's certificate.
    pub tls: Option<ferry_transport::ServerTls>,
    /// `--disk` given here: the `i`-th replaces the moved VM's `i`-th
    /// disk (another path to the same storage, or a copy for a clone).
    /// Empty: the disks are opened where the state says (shared storage).
    pub disk_overrides: Vec<crate::devices::DiskConfig>,
    /// `--net` given here: the `i`-th replaces the moved VM's `i`-th
    /// network card's tap and MAC. Empty: the taps named in the state.
    pub net_overrides: Vec<crate::devices::NetConfig>,
    /// How the fault thread asks to be scheduled (see [`crate::sched`]).
    pub fault_priority: crate::sched::FaultPriority,
    /// Pages to load from a page source in this process before the vCPUs
    /// run (a lazy restore's replay list; see [`super::preload`]).
    pub preload: Option<super::preload::Preload>,
    /// What the incoming VM's RAM is made of (`--huge-pages`).
    pub backing: Backing,
    /// The fault connection's buffers, made ahead (see
    /// [`super::fault_buffers`]); a lazy move takes them, or makes its own.
    pub fault_buffers: super::fault_buffers::SpareFaultBuffers,
    /// Guest RAM made and allocated ahead (`--prealloc`, see
    /// [`super::ram_ahead`]); a move of its size and kind takes it.
    pub ram_ahead: super::ram_ahead::RamAhead,
    /// Allocate the RAM a `Hello` asks for before answering it
    /// (`--prealloc hello`), unless `ram_ahead` holds it already.
    pub allocate_on_hello: bool,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            peer_timeout: Duration::from_secs(5),
            recovery_window: Duration::from_secs(60),
            progress: None,
            accept_timeout: None,
            expect_session: None,
            tls: None,
            disk_overrides: Vec::new(),
            net_overrides: Vec::new(),
            fault_priority: crate::sched::FaultPriority::default(),
            preload: None,
            backing: Backing::Shmem,
            fault_buffers: Default::default(),
            ram_ahead: Default::default(),
            allocate_on_hello: false,
        }
    }
}

impl DestOptions {
    fn stage(&self, s: Stage) {
        if let Some(p) = &self.progress {
            p.stage(s);
        }
    }

    fn vm_here(&self, here: VmHere) {
        if let Some(p) = &self.progress {
            p.vm_here(here);
        }
    }
}

/// What [`receive`] gives back.
pub struct Received<'a> {
    /// The VM, running; or paused when `failure` is set.
    pub vm: Vm,
    /// The migration's statistics (None when it did not complete).
    pub stats: Option<MigrationStats>,
    /// Why the move could not complete after `Commit`. The VM is kept,
    /// paused, and never runs on a page it does not have.
    pub failure: Option<DestError>,
    /// With `failure`: the move, to try again ([`DestMove::recover`]).
    pub resume: Option<DestMove<'a>>,
}

/// Accepts one incoming migration on `listener` and returns the VM. An
/// error means no VM ever ran here.
pub fn receive<'a>(
    listener: &'a TcpListener,
    console: ConsoleOutput,
    opts: &'a DestOptions,
) -> Result<Received<'a>, DestError> {
    receive_from(
        Acceptor::new(listener, opts.peer_timeout, opts.tls.clone())?,
        console,
        opts,
    )
}

/// Like [`receive`], from the connections `acceptor` hands out (a TCP
/// listener's, or a lazy restore's socketpairs).
pub fn receive_from<'a>(
    acceptor: Acceptor,
    console: ConsoleOutput,
    opts: &'a DestOptions,
) -> Result<Received<'a>, DestError> {
    let (mut ctl, hello) = accept_new(&acceptor, opts)?;
    opts.stage(Stage::Precopy);
    let mode = hello.mode().map_err(|e| abort(&ctl, e.into()))?;
    // The session runs with the shorter of the two sides' peer timeouts
    // (admission checked the option).
    let told = hello.peer_timeout_ms().map_err(|e| abort(&ctl, e.into()))?;
    ctl.set_peer_timeout(session_peer_timeout(opts.peer_timeout, told))?;
    let (prepared, uffd, disks) = match prepare(&ctl, &hello, mode, console, opts) {
        Ok(p) => p,
        Err(e) => return Err(abort(&ctl, e)),
    };
    let mut counters = PushCounters::default();
    if let (Some(p), Some(ram)) = (&opts.preload, &uffd) {
        let t = Instant::now();
        counters.pages_preloaded = super::preload::load(p, ram).map_err(|e| abort(&ctl, e))?;
        info!(
            pages = counters.pages_preloaded,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "preloaded the recorded working set"
        );
    }
    let accepted = hello.features & features::SUPPORTED;
    ack(&ctl, &hello, accepted, ResumeStatus::Accepted)?;
    let session = hello.session_id;
    // Who the session's peer is: every later connection must be it.
    let peer = Peer(ctl.peer_certificate().map(<[u8]>::to_vec));
    // The source opens the fault connection right after the control one.
    let deadline = Instant::now() + HELLO_TIMEOUT.max(opts.peer_timeout) * 2;
    let (mut fault_link, fhello) =
        accept_role(&acceptor, Role::Fault, session, &peer, deadline, false)
            .map_err(|e| abort(&ctl, e))?;
    answer(
        &mut fault_link,
        ctl.peer_timeout(),
        &fhello,
        accepted,
        ResumeStatus::Accepted,
    )?;
    // In lazy modes the first demand answers arrive into backed memory,
    // made ahead when the process filled the spare (`fault_buffers`).
    let mut fault_decode = Vec::new();
    if mode.lazy() {
        let b = opts.fault_buffers.take();
        fault_link
            .rx
            .reserve_backed_from(b.rx, super::fault_buffers::RX_ROOM);
        fault_decode = b.decode;
    }
    let mut beat = ctl.heartbeat(ctl.peer_timeout() / 4);

    // Pages sent before the state (pre-copy modes), then the state.
    let state_payload = match receive_before_state(
        &mut ctl,
        prepared.ram(),
        uffd.as_deref(),
        disks.as_deref(),
        mode,
        &mut counters,
    ) {
        Ok(p) => p,
        Err(e) => return Err(abort(&ctl, e)),
    };
    opts.stage(Stage::Switching);
    let bytes_state = state_payload.len() as u64;
    let (meta, blob) = decode_state(&state_payload).map_err(|e| abort(&ctl, e.into()))?;
    let mut machine = state::decode(blob).map_err(|e| abort(&ctl, e.into()))?;
    crate::devices::override_disks(&mut machine.devices.virtio, &opts.disk_overrides)
        .and_then(|()| {
            crate::devices::override_nets(&mut machine.devices.virtio, &opts.net_overrides)
        })
        .map_err(|e| abort(&ctl, DestError::Refused(e)))?;
    if let Some(d) = &disks {
        attach_disks(&mut machine, d, mode).map_err(|e| abort(&ctl, e))?;
    }
    if machine.meta.mem_size != hello.mem_size
        || machine.meta.vcpus != hello.vcpus
        || meta.mode != mode
    {
        return Err(abort(
            &ctl,
            DestError::Refused("state does not match the Hello".into()),
        ));
    }
    // In lazy modes the fault handler must run before anything can touch
    // guest memory; dropping the handle stops it again on any error.
    let (fault_conn, fault_buffered) = fault_link.into_parts();
    let mut fault_spare = None;
    let fault = match &uffd {
        Some(ram) => Some(
            FaultThread::start(
                ram.clone(),
                disks.clone(),
                fault_conn,
                fault_buffered,
                ctl.stream.try_clone().ok(),
                opts.fault_priority,
                fault_decode,
            )
            .map_err(|e| abort(&ctl, e.into()))?,
        ),
        None => {
            fault_spare = Some(fault_conn);
            None
        }
    };
    let restore_t = Instant::now();
    let mut vm = prepared
        .restore(&machine)
        .map_err(|e| abort(&ctl, e.into()))?;
    if let Some(f) = &fault {
        f.attribute_to(vm.vcpu_tids());
    }
    let ready = serde_json::json!({ "restore_us": restore_t.elapsed().as_micros() as u64 });
    ctl.send(MsgType::Ready, 0, ready.to_string().as_bytes())?;
    let ready_at = Instant::now();

    // Prepared: the VM runs only when `Commit` arrives.
    let mut recovery = Recovery::default();
    let commit_wait = wait_for_commit(
        &acceptor,
        opts,
        &mut ctl,
        &mut beat,
        (session, &peer),
        &mut recovery,
        fault.as_ref(),
    );
    if let Err(e) = commit_wait {
        warn!("the switch-over did not commit; the VM is discarded here: {e}");
        if matches!(e, DestError::RecoveryTimeout(_)) {
            // The source may still try to settle the move: it must hear
            // that the VM never ran here (or it strands it).
            drop((vm, fault, beat));
            tell_discarded(&acceptor, session, &peer, opts.recovery_window);
        }
        return Err(e);
    }
    // What the two-phase switch-over adds to the downtime: one round trip.
    let commit_wait_us = ready_at.elapsed().as_micros() as u64;
    drop(fault_spare);
    if let Some(ram) = &uffd {
        // The userfaultfd must outlive every vCPU thread.
        vm.keep_alive(Box::new(ram.clone()));
    }
    // Downtime ends as the vCPUs are let go: stamped before, so no guest
    // output on this side can precede it, whatever the scheduler does next.
    let resume_host_us = now_us();
    // Migrated disks go into place now that the VM is this side's; then
    // the devices start, before any vCPU.
    let started = match &disks {
        Some(d) => d.commit().map_err(DestError::from),
        None => Ok(()),
    }
    .and_then(|()| vm.resume_devices().map_err(DestError::from));
    if let Err(e) = started {
        // No vCPU ran: the VM is discarded here, and the source, which
        // wrote `Commit`, is told so when it reconnects, to run its own
        // copy (it would otherwise strand it).
        error!("the VM's devices cannot start here; it is discarded without having run: {e}");
        ctl.shutdown();
        drop((vm, fault, beat, ctl));
        tell_discarded(&acceptor, session, &peer, opts.recovery_window);
        return Err(e);
    }
    vm.resume_vcpus()?;
    opts.vm_here(VmHere::Running);
    let downtime_us = resume_host_us.saturating_sub(meta.pause_host_us);
    info!(
        downtime_us,
        mode = mode.name(),
        "committed: vCPUs running on the destination"
    );
    opts.stage(if mode.lazy() {
        Stage::Postcopy
    } else {
        Stage::Completed
    });
    let resumed = Resumed {
        downtime_us,
        resume_host_us,
    };
    let resumed = serde_json::to_vec(&resumed).unwrap_or_default();
    // From here the VM is this side's: a lost link is recovered, never fatal.
    let sent = ctl.send(MsgType::Resumed, 0, &resumed);
    let mut mv = DestMove {
        session: Session {
            acceptor,
            opts,
            window: opts.recovery_window,
            session,
            peer,
            ctl,
            beat,
            recovery,
            disks: disks.clone(),
        },
        uffd: uffd.zip(fault),
        counters,
        source_stats: serde_json::Value::Null,
        meta,
        bytes_state,
        downtime_us,
        commit_wait_us,
        resumed_lost: false,
    };
    if let Err(e) = sent {
        if !is_link_failure(&e) {
            return Ok(mv.strand(vm, e.into()));
        }
        mv.resumed_lost = true;
    }
    match mv.finish(&vm) {
        Ok(stats) => Ok(Received {
            vm,
            stats: Some(stats),
            failure: None,
            resume: None,
        }),
        Err(e) => Ok(mv.strand(vm, e)),
    }
}

/// A committed move on the destination: everything needed to finish it,
/// or to try again after it was stranded (`ferry-ctl recover`).
pub struct DestMove<'a> {
    session: Session<'a>,
    /// Lazy modes: the RAM behind userfaultfd and its fault thread.
    uffd: Option<(Arc<UffdRam>, FaultThread)>,
    counters: PushCounters,
    source_stats: serde_json::Value,
    meta: StateMeta,
    bytes_state: u64,
    downtime_us: u64,
    commit_wait_us: u64,
    /// `Resumed` could not be sent: the link must be recovered first.
    resumed_lost: bool,
}

impl DestMove<'_> {
    /// Drives the move to `Complete`, through lost links.
    fn finish(&mut self, vm: &Vm) -> Result<MigrationStats, DestError> {
        if self.resumed_lost {
            let fault = self.uffd.as_ref().map(|(r, f)| (f, r));
            self.session.recover(fault, ResumeStatus::Running)?;
            self.resumed_lost = false;
        }
        if let Some((ram, fault)) = &self.uffd {
            self.source_stats = self
                .session
                .finish_postcopy(ram, &mut self.counters, fault)?;
        }
        let in_place = self.uffd.as_ref().is_some_and(|(r, _)| r.fills_in_place());
        let fault_stats = match self.uffd.take() {
            Some((ram, fault)) => {
                let f = fault.stop()?;
                ram.unregister()?;
                Some(f)
            }
            None => None,
        };
        let total_ms = (now_us().saturating_sub(self.meta.start_host_us)) as f64 / 1e3;
        info!(total_ms, "every page present");
        self.session.opts.stage(Stage::Completed);
        let mut stats = build_stats(
            vm,
            &self.meta,
            Timing {
                downtime_us: self.downtime_us,
                total_ms,
                commit_wait_us: self.commit_wait_us,
            },
            self.bytes_state,
            std::mem::take(&mut self.counters),
            fault_stats,
            std::mem::take(&mut self.source_stats),
            self.session.recovery.clone(),
            self.session.disks.as_deref(),
        );
        stats.ram_allocated_ahead = self.session.opts.ram_ahead.was_taken();
        stats.ram_allocated_on_hello_ms = self
            .session
            .opts
            .ram_ahead
            .made_on_hello()
            .map(|d| d.as_secs_f64() * 1e3);
        stats.filled_in_place = in_place;
        stats.peer_timeout_ms = self.session.ctl.peer_timeout().as_millis() as u64;
        let complete = serde_json::to_vec(&stats).unwrap_or_default();
        self.session.send_complete(&complete);
        Ok(stats)
    }

    /// Tries again after the move was stranded: waits up to `window` for
    /// the source to reconnect, resumes the VM (vCPUs on missing pages wait
    /// in their faults) and finishes the move.
    pub fn recover(&mut self, vm: &mut Vm, window: Duration) -> Result<MigrationStats, DestError> {
        self.session.window = window;
        let fault = self.uffd.as_ref().map(|(r, f)| (f, r));
        self.session.recover(fault, ResumeStatus::Running)?;
        self.resumed_lost = false;
        vm.resume()?;
        self.session.opts.vm_here(VmHere::Running);
        self.finish(vm)
    }

    /// The move cannot complete now: pause the VM and keep it, with the
    /// reason, and this move to try again.
    fn strand<'a>(self, mut vm: Vm, e: DestError) -> Received<'a>
    where
        Self: 'a,
    {
        if let Err(pe) = vm.pause() {
            // vCPUs blocked on missing pages stay blocked: the userfaultfd
            // lives as long as the VM.
            warn!("pausing the stranded VM: {pe}");
        }
        tracing::error!(
            "the move could not complete: {e}; the VM is kept here, paused, \
             and will not run on pages it does not have"
        );
        // The hold is published before the failure: a status that shows the
        // failure also shows the VM held.
        self.session
            .opts
            .vm_here(VmHere::Held(format!("the move did not complete: {e}")));
        if let Some(p) = &self.session.opts.progress {
            p.fail(e.to_string());
        }
        // Tell the source, and close the link: its heartbeat would
        // otherwise keep a source that waits for pages or `Complete`
        // waiting for ever. The source then strands the move too, and
        // either side's `recover` tries again.
        let why = format!("the destination holds the VM paused: the move did not complete: {e}");
        let _ = self.session.ctl.send(MsgType::Abort, 0, abort_reason(&why));
        self.session.ctl.shutdown();
        Received {
            vm,
            stats: None,
            failure: Some(e),
            resume: Some(self),
        }
    }
}

/// Waits for `Commit` on the control link. A lost link before it is waited
/// out for the recovery window (a source that wrote `Commit` reconnects and
/// writes it again); an `Abort`, or the window's end, is an error.
fn wait_for_commit(
    acceptor: &Acceptor,
    opts: &DestOptions,
    ctl: &mut Link,
    beat: &mut Heartbeat,
    (session, peer): (u64, &Peer),
    recovery: &mut Recovery,
    fault: Option<&FaultThread>,
) -> Result<(), DestError> {
    loop {
        let got = ctl.recv().map(|f| f.header.kind);
        match got {
            Ok(MsgType::Commit) => return Ok(()),
            Ok(other) => {
                return Err(abort(
                    ctl,
                    ProtocolError::Unexpected {
                        got: other,
                        expected: "Commit",
                    }
                    .into(),
                ))
            }
            Err(e) if is_link_failure(&e) => {
                warn!("link lost before Commit: {e}; waiting for the source to settle it");
                let t = Instant::now();
                if let Some(f) = fault {
                    f.mark_down();
                }
                let deadline = t + opts.recovery_window;
                let (new_ctl, new_fault) =
                    accept_resume(acceptor, session, peer, deadline, ResumeStatus::Prepared)?;
                // Nothing goes on the fault connection before the VM runs;
                // in lazy modes the fault thread takes the new one for the
                // faults after `Commit` (the old one is dead: kept, it
                // cost a second recovery once the VM ran).
                match fault {
                    Some(f) => {
                        let (conn, buffered) = new_fault.into_parts();
                        f.reconnect(conn, buffered, new_ctl.stream.try_clone().ok());
                    }
                    None => drop(new_fault),
                }
                *ctl = new_ctl;
                *beat = ctl.heartbeat(ctl.peer_timeout() / 4);
                recovery.record(t, opts.progress.as_deref());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A committed session on this side: what recovery needs.
struct Session<'a> {
    acceptor: Acceptor,
    opts: &'a DestOptions,
    /// How long a lost source is waited for (the options', or what an
    /// operator's `recover` asked for).
    window: Duration,
    session: u64,
    /// The certificate the session's connections come with (TLS).
    peer: Peer,
    ctl: Link,
    beat: Heartbeat,
    recovery: Recovery,
    /// Migrated local disks (`--migrate-disk`), after RAM in the page space.
    disks: Option<Arc<DiskSet>>,
}

impl Session<'_> {
    /// Installs the push until `PushDone`, then waits for the last demand
    /// answers; a lost link on the way is recovered and the move goes on.
    fn finish_postcopy(
        &mut self,
        ram: &Arc<UffdRam>,
        counters: &mut PushCounters,
        fault: &FaultThread,
    ) -> Result<serde_json::Value, DestError> {
        loop {
            match self.push_then_drain(ram, counters, fault) {
                Ok(s) => return Ok(s.unwrap_or_default()),
                Err(DestError::Protocol(e)) if is_link_failure(&e) => {
                    self.recover(Some((fault, ram)), ResumeStatus::Running)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One connection's worth of the push and the drain after it: returns
    /// the source's stats from `PushDone` once every page is present.
    fn push_then_drain(
        &mut self,
        ram: &UffdRam,
        counters: &mut PushCounters,
        fault: &FaultThread,
    ) -> Result<Option<serde_json::Value>, DestError> {
        let disks = self.disks.clone();
        let source = install_push(&mut self.ctl, ram, disks.as_deref(), counters)?;
        let t = Instant::now();
        let mut last_heard = Instant::now();
        let mut last_polled = Instant::now();
        let complete = || ram.complete() && disks.as_ref().is_none_or(|d| d.complete());
        // The last pages come as demand answers to the fault thread: wake
        // as it installs them, and look at the control connection (for
        // pings, a frame out of place, a lost link) every `POLL`.
        loop {
            let seen = fault.progress();
            if complete() {
                break;
            }
            if fault.is_down() {
                return Err(ProtocolError::Closed.into());
            }
            if fault.has_ended() {
                return Err(DestError::Refused("the fault handler ended".into()));
            }
            if t.elapsed() > DRAIN_TIMEOUT {
                let missing = ram.pages() - ram.present.count() - ram.zero.count()
                    + disks.as_ref().map_or(0, |d| d.missing());
                return Err(DestError::Incomplete(missing));
            }
            if last_polled.elapsed() >= POLL {
                if let Some(f) = self.ctl.poll(Duration::ZERO, &mut last_heard)? {
                    return Err(ProtocolError::Unexpected {
                        got: f.header.kind,
                        expected: "nothing but Ping after PushDone",
                    }
                    .into());
                }
                last_polled = Instant::now();
            }
            fault.wait_for_progress(seen, POLL.saturating_sub(last_polled.elapsed()));
        }
        Ok(Some(source))
    }

    /// Waits for the source to come back after a lost link, for at most the
    /// recovery window, and resumes the session on its new connections:
    /// `RecvBitmap` tells it which pages are here (lazy modes), and the
    /// fault thread asks again for every page still pending.
    fn recover(
        &mut self,
        fault: Option<(&FaultThread, &Arc<UffdRam>)>,
        status: ResumeStatus,
    ) -> Result<(), DestError> {
        let t = Instant::now();
        if let Some((f, _)) = fault {
            f.mark_down();
        }
        self.ctl.shutdown();
        self.opts.stage(Stage::Recovering);
        warn!(
            window = ?self.window,
            "link to the source lost; the VM waits for it to reconnect"
        );
        let deadline = t + self.window;
        let (ctl, fault_link) =
            accept_resume(&self.acceptor, self.session, &self.peer, deadline, status)?;
        self.ctl = ctl;
        self.beat = self.ctl.heartbeat(self.ctl.peer_timeout() / 4);
        if let Some((f, ram)) = fault {
            let total = self.disks.as_ref().map_or(ram.pages(), |d| d.total_pages());
            let have = PageBitmap::new(total);
            have.or_with(&ram.present);
            have.or_with(&ram.zero);
            if let Some(d) = &self.disks {
                d.mark_present_in(&have);
            }
            self.ctl.send(MsgType::RecvBitmap, 0, &have.to_le_bytes())?;
            let (conn, buffered) = fault_link.into_parts();
            f.reconnect(conn, buffered, self.ctl.stream.try_clone().ok());
        }
        self.recovery.record(t, self.opts.progress.as_deref());
        self.opts.stage(Stage::Postcopy);
        info!(
            recoveries = self.recovery.count,
            ms = t.elapsed().as_millis() as u64,
            "source reconnected; the move continues"
        );
        Ok(())
    }

    /// Sends `Complete`. If the link is gone, a source that reconnects
    /// within the window is told the move completed and gets it again. A
    /// `Complete` that was written can still be lost on the way, so for the
    /// recovery window a thread keeps answering the session's resumes with
    /// it (the source holds the VM's memory until it hears it).
    fn send_complete(&mut self, complete: &[u8]) {
        loop {
            match self.ctl.send(MsgType::Complete, 0, complete) {
                Ok(()) => {
                    self.linger(complete.to_vec());
                    return;
                }
                Err(e) => {
                    warn!("cannot send Complete: {e}; waiting for the source to ask again");
                    let deadline = Instant::now() + self.opts.recovery_window;
                    match accept_resume(
                        &self.acceptor,
                        self.session,
                        &self.peer,
                        deadline,
                        ResumeStatus::Completed,
                    ) {
                        Ok((ctl, _)) => self.ctl = ctl,
                        Err(e) => {
                            warn!("the source never asked again: {e}; every page is here");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Answers resumes of this completed session with `Complete` until the
    /// recovery window ends, on a thread of its own.
    fn linger(&self, complete: Vec<u8>) {
        let (acceptor, session, peer) = (self.acceptor.clone(), self.session, self.peer.clone());
        let deadline = Instant::now() + self.window;
        let _ = std::thread::Builder::new()
            .name("completed-session".into())
            .spawn(move || {
                while let Ok((ctl, _)) =
                    accept_resume(&acceptor, session, &peer, deadline, ResumeStatus::Completed)
                {
                    info!("a source asked again after Complete; answering it");
                    let _ = ctl.send(MsgType::Complete, 0, &complete);
                }
            });
    }
}

/// Times of a migration, as the destination measured them.
struct Timing {
    downtime_us: u64,
    total_ms: f64,
    commit_wait_us: u64,
}

/// What [`prepare`] builds before the state arrives.
type Prepared = (PreparedVm, Option<Arc<UffdRam>>, Option<Arc<DiskSet>>);

fn prepare(
    ctl: &Link,
    hello: &Hello,
    mode: MigrationMode,
    console: ConsoleOutput,
    opts: &DestOptions,
) -> Result<Prepared, DestError> {
    let disks = prepare_disks(hello, opts)?;
    let backing = opts.backing;
    if backing == Backing::HugePages && mode == MigrationMode::Hybrid {
        // Hybrid installs pages before the state and drops single stale
        // pages, with 4 KiB granularity, which a 2 MiB page mapped through
        // userfaultfd cannot take. (A replayed restore's preload loads
        // whole huge pages: see `super::preload`.)
        return Err(DestError::Refused(
            "huge pages take post-copy, pre-copy and stop-and-copy moves, not hybrid".into(),
        ));
    }
    let lazy = mode.lazy();
    // Hybrid drops single stale pages of RAM it filled before the state,
    // which RAM allocated ahead (mapped a unit at a time) cannot take.
    let ahead = if mode == MigrationMode::Hybrid {
        None
    } else {
        if opts.allocate_on_hello {
            allocate_on_hello(ctl, hello, opts)?;
        }
        opts.ram_ahead.take(hello.mem_size, backing)
    };
    let prepared = match ahead {
        Some(ram) => {
            info!(mib = hello.mem_size >> 20, "guest RAM made ahead taken");
            PreparedVm::in_ram(ram, hello.vcpus, console, lazy)?
        }
        None if lazy => {
            PreparedVm::new_for_postcopy(hello.mem_size, hello.vcpus, console, backing)?
        }
        None => PreparedVm::new_backed(hello.mem_size, hello.vcpus, console, backing)?,
    };
    if !lazy {
        return Ok((prepared, None, disks));
    }
    let ram = Arc::new(UffdRam::register(prepared.ram())?);
    Ok((prepared, Some(ram), disks))
}

/// The longest gap between two `Ping`s while the RAM a `Hello` asks for is
/// allocated, for a source that does not say its peer timeout: one with a
/// peer timeout of 100 ms still hears one.
const HELLO_PING_EVERY: Duration = Duration::from_millis(20);

/// Allocates the RAM `hello` asks for now, before the `HelloAck`
/// (`--prealloc hello`): the source still runs the VM and waits for the
/// answer, and `Ping`s on `ctl` keep it from deeming this side gone while
/// the host backs the pages (about 0.8 s per GiB of 4 KiB pages here).
/// The pings come every quarter of the session's peer timeout (`ctl`'s);
/// a source that does not say its own may have a shorter one, so then
/// they come at least every [`HELLO_PING_EVERY`].
fn allocate_on_hello(ctl: &Link, hello: &Hello, opts: &DestOptions) -> Result<(), DestError> {
    let every = match hello.peer_timeout_ms() {
        Ok(Some(_)) => ctl.peer_timeout() / 4,
        _ => (ctl.peer_timeout() / 4).min(HELLO_PING_EVERY),
    };
    let _beat = ctl.heartbeat(every);
    let made = opts
        .ram_ahead
        .make_now(hello.mem_size, opts.backing)
        .map_err(|e| DestError::Refused(format!("allocating the guest's RAM ahead: {e}")))?;
    if let Some(took) = made {
        info!(
            mib = hello.mem_size >> 20,
            ms = took.as_millis() as u64,
            "guest RAM allocated on the Hello"
        );
    }
    Ok(())
}

/// The migrated local disks the `Hello` names: each gets an empty file of
/// its size at the path the `--disk` of its slot gives on this side. A
/// migrated disk without one is refused (the state's path is the source's
/// file, which may be on this very host).
fn prepare_disks(hello: &Hello, opts: &DestOptions) -> Result<Option<Arc<DiskSet>>, DestError> {
    let named = hello.disks()?;
    if named.is_empty() {
        return Ok(None);
    }
    let mut specs = Vec::new();
    for d in &named {
        let Some(target) = opts.disk_overrides.get(d.slot as usize) else {
            return Err(DestError::Refused(format!(
                "the source migrates the disk in slot {} ({} MiB): give its local file \
                 with --disk (one per disk, in slot order)",
                d.slot,
                (d.blocks * 4096) >> 20
            )));
        };
        if target.readonly {
            return Err(DestError::Refused(format!(
                "--disk {}: a migrated disk's file must be writable here",
                target.path.display()
            )));
        }
        specs.push((d.slot, d.blocks, target.path.as_path()));
    }
    let ram_pages = hello.mem_size / PAGE_SIZE as u64;
    Ok(Some(Arc::new(DiskSet::create(ram_pages, &specs)?)))
}

/// Checks that every migrated disk is a disk of the state, and hands its
/// device the disk's blocks (lazy modes: missing ones are fetched on
/// demand). In the other modes every block came before the state.
fn attach_disks(
    machine: &mut state::MachineState,
    disks: &DiskSet,
    mode: MigrationMode,
) -> Result<(), DestError> {
    for d in &disks.disks {
        let Some(dev) = machine.devices.virtio.get_mut(d.slot as usize) else {
            return Err(DestError::Refused(format!(
                "the migrated disk of slot {} is not a device of the state ({} devices)",
                d.slot,
                machine.devices.virtio.len()
            )));
        };
        let crate::state::VirtioBackendConfig::Blk(cfg) = &mut dev.backend else {
            return Err(DestError::Refused(format!(
                "the migrated disk of slot {} is not a disk in the state",
                d.slot
            )));
        };
        if cfg.readonly {
            return Err(DestError::Refused(format!(
                "the migrated disk of slot {} is read-only here",
                d.slot
            )));
        }
        if mode.lazy() {
            cfg.migrated = Some(MigratedHandle(d.clone()));
        } else if !d.present.is_full() {
            return Err(DestError::Refused(format!(
                "{} blocks of the migrated disk of slot {} never came",
                d.blocks() - d.present.count(),
                d.slot
            )));
        }
    }
    Ok(())
}

/// Tells the source we give up (best effort) and passes the error on.
fn abort(link: &Link, e: DestError) -> DestError {
    warn!("aborting incoming migration: {e}");
    let _ = link.send(MsgType::Abort, 0, abort_reason(&e.to_string()));
    e
}

#[allow(clippy::too_many_arguments)]
fn build_stats(
    vm: &Vm,
    meta: &StateMeta,
    timing: Timing,
    bytes_state: u64,
    push: PushCounters,
    fault: Option<FaultStats>,
    source: serde_json::Value,
    recovery: Recovery,
    disks: Option<&DiskSet>,
) -> MigrationStats {
    let name = |v: u32| {
        if v == u32::MAX {
            "other".to_string()
        } else {
            v.to_string()
        }
    };
    let mut fault = fault.unwrap_or_else(FaultStats::empty);
    let demand_order = std::mem::take(&mut fault.demand_order);
    let per_vcpu = fault
        .per_vcpu
        .iter()
        .map(|(v, h)| {
            let mut l = LatencySummary::of(h);
            l.cdf.clear();
            (name(*v), l)
        })
        .collect();
    let per_vcpu_ms = fault
        .blocktime_us
        .iter()
        .map(|(v, us)| (name(*v), *us as f64 / 1e3))
        .collect();
    let disk = disks.map(|d| super::stats::DiskStats {
        blocks: d.blocks(),
        blocks_pushed: push.disk_blocks,
        demand_requests: d.requests.asked.load(std::sync::atomic::Ordering::Relaxed),
        demand_blocks: fault.disk_demand,
        wait_ms: d
            .requests
            .wait_us
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e3,
        dropped_after_guest_write: d
            .requests
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
    });
    let data = push.bytes_page_data + fault.bytes_page_data;
    let raw = push.bytes_page_raw + fault.bytes_page_raw;
    let shape = vm.meta();
    MigrationStats {
        mode: meta.mode.name().into(),
        mem_size: shape.mem_size,
        vcpus: shape.vcpus,
        downtime_us: timing.downtime_us,
        commit_wait_us: timing.commit_wait_us,
        total_ms: timing.total_ms,
        pages_total: shape.mem_size / PAGE_SIZE as u64,
        pages_demand: fault.pages_demand,
        pages_pushed: push.pages_pushed,
        pages_zero: push.pages_zero,
        pages_preloaded: push.pages_preloaded,
        prefetch_hits: fault.prefetch_hits,
        zero_faults: fault.zero_faults,
        fault_priority: fault.priority,
        fault_around_pages: fault.pages_around,
        backing: vm.ram().backing(),
        // Set by the caller, which knows where the RAM came from.
        ram_allocated_ahead: false,
        ram_allocated_on_hello_ms: None,
        peer_timeout_ms: 0,
        filled_in_place: false,
        push_install: push.install,
        bytes_wire: push.bytes_wire + fault.bytes_wire + bytes_state,
        bytes_state,
        compression_ratio: if data == 0 {
            1.0
        } else {
            ((raw as f64 / data as f64) * 100.0).round() / 100.0
        },
        fault_latency_us: FaultLatency {
            overall: LatencySummary::of(&fault.overall),
            per_vcpu,
        },
        blocktime: Blocktime {
            total_ms: fault.blocktime_us.values().sum::<u64>() as f64 / 1e3,
            per_vcpu_ms,
        },
        recoveries: recovery.count,
        recovery_ms: recovery.ms,
        demand_order,
        disk,
        source,
        converged: meta.converged,
        precopy_rounds: meta.rounds.clone(),
    }
}

#[cfg(test)]
mod tests;
