//! The destination side of a post-copy migration.
//!
//! ```text
//! accept control conn, Hello ──► PreparedVm::new + register userfaultfd   (before the
//! accept fault conn, Hello         (RAM mapped, vCPU fds created)           state arrives)
//! State ──► fault thread up ──► restore ──► resume ──► Resumed{downtime}
//! control conn: Pages (push) ──► install in batches; Zero runs only recorded
//! fault conn:   fault thread: uffd fault ─► PageRequest ─► Pages ─► UFFDIO_COPY
//! PushDone ──► wait until every page is present or zero ──► unregister ──► Complete
//! ```
//!
//! Pre-copy, stop-and-copy and hybrid send pages before the state; they are
//! written straight into the memory file (the VM is not running yet).
//! Hybrid then drops the pages the source reports stale (`Discard`) and
//! continues as post-copy; the other two are complete once the state is in.
//!
//! Any failure before the vCPUs resume sends `Abort`, so the source can
//! resume its own copy of the VM: no VM is lost.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{
    decode_state, features, Hello, HelloAck, MigrationMode, MsgType, ProtocolError, Resumed, Role,
    StateMeta, OPT_MODE, PROTOCOL_VERSION,
};
use tracing::{info, warn};

use super::error::{DestError, DRAIN_TIMEOUT};
use super::fault::{FaultStats, FaultThread};
use super::install::{install_push, receive_before_state, PushCounters};
use super::link::Link;
use super::stats::{Blocktime, FaultLatency, LatencySummary, MigrationStats};
use super::uffd_ram::UffdRam;
use crate::console::now_us;
use crate::layout::{valid_mem_size, PAGE_SIZE};
use crate::state;
use crate::vm::{ConsoleOutput, PreparedVm, Vm, MAX_VCPUS};

/// How long to wait for the source's second connection.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence on the control connection before giving up.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// Accepts one incoming post-copy migration on `listener` and returns the
/// running VM, with the migration's statistics.
pub fn receive(
    listener: &TcpListener,
    console: ConsoleOutput,
) -> Result<(Vm, MigrationStats), DestError> {
    let (control, peer) = listener.accept().map_err(ProtocolError::Io)?;
    info!(%peer, "incoming migration");
    control.set_nodelay(true).map_err(ProtocolError::Io)?;
    // A silent peer must not hold this process forever.
    control
        .set_read_timeout(Some(FRAME_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    let mut ctl = Link::new(control);

    // Handshake on the control connection, then prepare the VM at once.
    let hello = expect_hello(&mut ctl, Role::Control, None)?;
    let mode = hello.mode().map_err(|e| abort(&mut ctl, e.into()))?;
    let (prepared, uffd) = match prepare(&hello, mode, console) {
        Ok(p) => p,
        Err(e) => return Err(abort(&mut ctl, e)),
    };
    let accepted = hello.features & features::SUPPORTED;
    ack(&mut ctl, &hello, accepted)?;

    // The fault connection.
    let fault_conn = accept_with_timeout(listener).map_err(|e| abort(&mut ctl, e))?;
    fault_conn.set_nodelay(true).map_err(ProtocolError::Io)?;
    let mut fault_link = Link::new(fault_conn);
    let fhello = expect_hello(&mut fault_link, Role::Fault, Some(hello.session_id))
        .map_err(|e| abort(&mut ctl, e))?;
    ack(&mut fault_link, &fhello, accepted)?;

    // Pages sent before the state (pre-copy modes), then the state.
    let mut counters = PushCounters::default();
    let state_payload = match receive_before_state(
        &mut ctl,
        prepared.ram(),
        uffd.as_deref(),
        mode,
        &mut counters,
    ) {
        Ok(p) => p,
        Err(e) => return Err(abort(&mut ctl, e)),
    };
    let bytes_state = state_payload.len() as u64;
    let (meta, blob) = decode_state(&state_payload).map_err(|e| abort(&mut ctl, e.into()))?;
    let machine = state::decode(blob).map_err(|e| abort(&mut ctl, e.into()))?;
    if machine.meta.mem_size != hello.mem_size
        || machine.meta.vcpus != hello.vcpus
        || meta.mode != mode
    {
        return Err(abort(
            &mut ctl,
            DestError::Refused("state does not match the Hello".into()),
        ));
    }
    // In lazy modes the fault handler must run before anything can touch
    // guest memory; dropping the handle stops it again on any error.
    let fault = match &uffd {
        Some(ram) => {
            let (conn, buffered) = fault_link.into_parts();
            Some(
                FaultThread::start(ram.clone(), conn, buffered)
                    .map_err(|e| abort(&mut ctl, e.into()))?,
            )
        }
        None => None,
    };
    let mut vm = prepared
        .restore(&machine)
        .map_err(|e| abort(&mut ctl, e.into()))?;
    if let Some(f) = &fault {
        f.attribute_to(vm.vcpu_tids());
    }
    vm.resume().map_err(|e| abort(&mut ctl, e.into()))?;
    let resume_host_us = now_us();
    let downtime_us = resume_host_us.saturating_sub(meta.pause_host_us);
    info!(
        downtime_us,
        mode = mode.name(),
        "vCPUs running on the destination"
    );
    let resumed = Resumed {
        downtime_us,
        resume_host_us,
    };
    ctl.send(
        MsgType::Resumed,
        0,
        &serde_json::to_vec(&resumed).unwrap_or_default(),
    )?;

    // From here the VM runs here; errors are reported, the VM is kept.
    let (counters, source_stats, fault_stats) = match (uffd, fault) {
        (Some(ram), Some(fault)) => {
            let (counters, source_stats, fault_stats) =
                finish_postcopy(&mut ctl, &ram, counters, fault)?;
            (counters, source_stats, Some(fault_stats))
        }
        _ => (counters, serde_json::Value::Null, None),
    };
    let total_ms = (now_us().saturating_sub(meta.start_host_us)) as f64 / 1e3;
    info!(total_ms, "every page present");

    let stats = build_stats(
        &vm,
        &meta,
        Timing {
            downtime_us,
            total_ms,
        },
        bytes_state,
        counters,
        fault_stats,
        source_stats,
    );
    ctl.send(
        MsgType::Complete,
        0,
        &serde_json::to_vec(&stats).unwrap_or_default(),
    )?;
    Ok((vm, stats))
}

/// Installs the push until `PushDone`, waits for demand answers still in
/// flight, stops the fault thread and unregisters the RAM.
fn finish_postcopy(
    ctl: &mut Link,
    ram: &UffdRam,
    counters: PushCounters,
    fault: FaultThread,
) -> Result<(PushCounters, serde_json::Value, FaultStats), DestError> {
    let pushed = install_push(ctl, ram, counters).and_then(|done| {
        let t = Instant::now();
        while !ram.complete() {
            if t.elapsed() > DRAIN_TIMEOUT {
                let missing = ram.pages() - ram.present.count() - ram.zero.count();
                return Err(DestError::Incomplete(missing));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(done)
    });
    let fault_stats = fault.stop();
    let (counters, source_stats) = pushed?;
    let fault_stats = fault_stats?;
    ram.unregister()?;
    Ok((counters, source_stats, fault_stats))
}

/// Times of a migration, as the destination measured them.
struct Timing {
    downtime_us: u64,
    total_ms: f64,
}

/// Physical RAM of this host, if the system says.
fn host_memory() -> Option<u64> {
    use nix::unistd::{sysconf, SysconfVar};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok()??;
    let size = sysconf(SysconfVar::PAGE_SIZE).ok()??;
    u64::try_from(pages)
        .ok()?
        .checked_mul(u64::try_from(size).ok()?)
}

fn prepare(
    hello: &Hello,
    mode: MigrationMode,
    console: ConsoleOutput,
) -> Result<(PreparedVm, Option<Arc<UffdRam>>), DestError> {
    if !valid_mem_size(hello.mem_size) || hello.page_size as usize != PAGE_SIZE {
        return Err(DestError::Refused(format!(
            "memory size {} with page size {}",
            hello.mem_size, hello.page_size
        )));
    }
    if let Some(host) = host_memory() {
        if hello.mem_size > host {
            return Err(DestError::Refused(format!(
                "a {} MiB guest does not fit this host's {} MiB of RAM",
                hello.mem_size >> 20,
                host >> 20
            )));
        }
    }
    if hello.vcpus == 0 || hello.vcpus > MAX_VCPUS {
        return Err(DestError::Refused(format!("{} vCPUs", hello.vcpus)));
    }
    if let Some((tag, _)) = hello
        .options
        .iter()
        .find(|(t, _)| t & 0x8000 != 0 && *t != OPT_MODE)
    {
        return Err(DestError::Refused(format!(
            "unknown critical Hello option {tag:#06x}"
        )));
    }
    if !mode.lazy() {
        return Ok((PreparedVm::new(hello.mem_size, hello.vcpus, console)?, None));
    }
    let prepared = PreparedVm::new_for_postcopy(hello.mem_size, hello.vcpus, console)?;
    let ram = Arc::new(UffdRam::register(prepared.ram())?);
    Ok((prepared, Some(ram)))
}

fn expect_hello(link: &mut Link, role: Role, session: Option<u64>) -> Result<Hello, DestError> {
    let hello = Hello::decode(link.expect(MsgType::Hello, "Hello")?)?;
    if hello.role != role {
        return Err(ProtocolError::Handshake(format!(
            "expected a {role:?} connection, got {:?}",
            hello.role
        ))
        .into());
    }
    if session.is_some_and(|s| s != hello.session_id) {
        return Err(
            ProtocolError::Handshake("fault connection names another session".into()).into(),
        );
    }
    Ok(hello)
}

fn ack(link: &mut Link, hello: &Hello, features: u64) -> Result<(), DestError> {
    let a = HelloAck {
        version: PROTOCOL_VERSION,
        status: 0,
        features,
        session_id: hello.session_id,
    };
    link.send(MsgType::HelloAck, 0, &a.encode())?;
    Ok(())
}

fn accept_with_timeout(listener: &TcpListener) -> Result<TcpStream, DestError> {
    listener.set_nonblocking(true).map_err(ProtocolError::Io)?;
    let t = Instant::now();
    let r = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t.elapsed() > ACCEPT_TIMEOUT {
                    break Err(DestError::Refused("the fault connection never came".into()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => break Err(ProtocolError::Io(e).into()),
        }
    };
    listener.set_nonblocking(false).map_err(ProtocolError::Io)?;
    let s = r?;
    s.set_nonblocking(false).map_err(ProtocolError::Io)?;
    Ok(s)
}

/// Tells the source we give up (best effort) and passes the error on.
fn abort(link: &mut Link, e: DestError) -> DestError {
    warn!("aborting incoming migration: {e}");
    let msg = e.to_string();
    let mut end = msg.len().min(4096);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let _ = link.send(MsgType::Abort, 0, &msg.as_bytes()[..end]);
    e
}

fn build_stats(
    vm: &Vm,
    meta: &StateMeta,
    timing: Timing,
    bytes_state: u64,
    push: PushCounters,
    fault: Option<FaultStats>,
    source: serde_json::Value,
) -> MigrationStats {
    let name = |v: u32| {
        if v == u32::MAX {
            "other".to_string()
        } else {
            v.to_string()
        }
    };
    let fault = fault.unwrap_or_else(FaultStats::empty);
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
    let data = push.bytes_page_data + fault.bytes_page_data;
    let raw = push.bytes_page_raw + fault.bytes_page_raw;
    let shape = vm.meta();
    MigrationStats {
        mode: meta.mode.name().into(),
        mem_size: shape.mem_size,
        vcpus: shape.vcpus,
        downtime_us: timing.downtime_us,
        total_ms: timing.total_ms,
        pages_total: shape.mem_size / PAGE_SIZE as u64,
        pages_demand: fault.pages_demand,
        pages_pushed: push.pages_pushed,
        pages_zero: push.pages_zero,
        prefetch_hits: fault.prefetch_hits,
        zero_faults: fault.zero_faults,
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
        source,
        converged: meta.converged,
        precopy_rounds: meta.rounds.clone(),
    }
}
