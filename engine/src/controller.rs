//! Serves one VM: applies API requests to it until told to quit.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{error, info, warn};

use std::sync::Arc;

use crate::api::{ApiRequest, ApiResponse, PendingRequest};
use crate::migration::cancel::CancelRefused;
use crate::migration::progress::Progress;
use crate::migration::record::SessionRecord;
use crate::vm::{Vm, VmError};
use crate::{migration, snapshot};

/// Errors from serving a VM.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// Migrating out failed.
    #[error(transparent)]
    Migrate(#[from] migration::SourceError),
    /// The TLS settings of a `migrate` request are incomplete or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A `migrate` request's `tcp_congestion` names no algorithm.
    #[error("tcp_congestion: {0}")]
    Congestion(String),
    /// A `migrate` request's `max_bandwidth` is 0.
    #[error("max_bandwidth: {0}")]
    Bandwidth(String),
    /// A `cancel` request with nothing it could cancel.
    #[error(transparent)]
    Cancel(#[from] CancelRefused),
    /// The VM must not run here (see [`ServeContext::hold`]).
    #[error("refused: {0}")]
    Held(String),
    /// Writing the statistics failed.
    #[error("cannot write statistics to {path}: {source}")]
    Stats {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Writes migration statistics as pretty JSON.
pub fn write_stats(path: &Path, stats: &migration::MigrationStats) -> Result<(), ControllerError> {
    let json = serde_json::to_string_pretty(stats).unwrap_or_default();
    std::fs::write(path, json + "\n").map_err(|source| ControllerError::Stats {
        path: path.to_path_buf(),
        source,
    })
}

/// Reports a finished move: its table on standard output and, with
/// `stats_json`, its statistics in that file. Both are best effort: the
/// move has already happened, and a report that cannot be written must not
/// undo it (a source that took it for a failed move would let its copy
/// run again; a destination would drop the VM it now runs). A failure is
/// logged and returned, for the caller to pass on.
pub fn report_stats(
    stats: &migration::MigrationStats,
    stats_json: Option<&Path>,
) -> Option<String> {
    use std::io::Write as _;
    // A closed standard output must not end the process holding the VM.
    if let Err(e) = writeln!(std::io::stdout(), "{}", stats.table()) {
        warn!("cannot print the statistics table: {e}");
    }
    let e = write_stats(stats_json?, stats).err()?;
    warn!("{e}; the move itself completed");
    Some(e.to_string())
}

/// Refuses a `stats_json` path whose directory does not exist, before a
/// move starts (afterwards the move could no longer fail on it).
pub fn check_stats_path(path: &Path) -> Result<(), ControllerError> {
    let dir = crate::os::parent_dir(path);
    if dir.is_dir() {
        return Ok(());
    }
    Err(ControllerError::Stats {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a directory", dir.display()),
        ),
    })
}

/// Why a source whose move finished holds its VM.
fn moved_to(addr: &str) -> String {
    format!("the VM moved to {addr} and runs there")
}

/// What the serving loop knows besides the VM itself.
#[derive(Default)]
pub struct ServeContext<'a> {
    /// Reports what the guest has said, for `status` (under `"guest"`).
    /// Whoever runs the VM and knows its guest supplies it; the engine
    /// itself never reads guest output.
    pub guest: Option<&'a dyn Fn() -> Value>,
    /// The last (or current) migration's progress, for `status`.
    pub migration: Option<Arc<Progress>>,
    /// Options for a `migrate` request (its `mode` overrides).
    pub migrate_defaults: migration::SourceOptions,
    /// Why the VM must not be resumed here, if it must not: it was
    /// committed to a destination that may run it, or it lacks pages.
    pub hold: Option<String>,
    /// Source side: the stranded session, for a `recover` request.
    pub stranded: Option<SessionRecord>,
    /// Destination side: tries a stranded move again (see
    /// [`migration::DestMove::recover`]); for a `recover` request.
    pub recover_hook: Option<RecoverHook<'a>>,
}

/// How a destination tries a stranded move again.
pub type RecoverHook<'a> =
    Box<dyn FnMut(&mut Vm) -> Result<migration::MigrationStats, String> + Send + 'a>;

/// Migrates the VM out, answering `status` requests on `api` meanwhile
/// (other requests are refused as busy); on success it runs elsewhere and
/// this process should end. On [`migration::SourceError::Stranded`] the VM
/// stays paused and `ctx.hold` says why it must not run here.
pub fn migrate_to(
    vm: &mut Vm,
    to: &str,
    opts: &migration::SourceOptions,
    stats_json: Option<&Path>,
    api: Option<&Receiver<PendingRequest>>,
    ctx: &mut ServeContext<'_>,
) -> Result<Value, ControllerError> {
    if let Some(p) = stats_json {
        check_stats_path(p)?;
    }
    let progress = opts.progress.clone().unwrap_or_default();
    let opts = migration::SourceOptions {
        progress: Some(progress.clone()),
        ..opts.clone()
    };
    ctx.migration = Some(progress.clone());
    // Cancels are taken from here until the move commits.
    progress.cancel.open();
    let outcome = answer_while(api, ctx.guest, &progress, || {
        migration::migrate(vm, to, &opts)
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            if let migration::SourceError::Stranded { record, .. } = &e {
                ctx.hold = Some(e.to_string());
                ctx.stranded = record.as_deref().cloned();
            }
            return Err(e.into());
        }
    };
    // The VM runs at the destination now: from here nothing may let it
    // run here again, whatever fails below.
    ctx.hold = Some(moved_to(to));
    let unwritten = report_stats(&outcome.stats, stats_json);
    let mut v = serde_json::to_value(&outcome.stats).unwrap_or(Value::Null);
    if let (Some(e), Some(o)) = (unwritten, v.as_object_mut()) {
        o.insert("stats_json_error".into(), Value::String(e));
    }
    Ok(v)
}

/// Runs `work` on a helper thread while this thread answers `status`
/// requests on `api` with the migration's progress (anything else is
/// refused as busy).
pub fn answer_while<T: Send>(
    api: Option<&Receiver<PendingRequest>>,
    guest: Option<&dyn Fn() -> Value>,
    progress: &Progress,
    work: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|s| {
        let job = s.spawn(work);
        while !job.is_finished() {
            let Some(rx) = api else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok((ApiRequest::Status, reply)) => {
                    // Once the migration has settled the VM (resumed it,
                    // rolled it back or held it), that is what it does, even
                    // while `work` still writes its statistics.
                    let here = progress.current_vm_here();
                    reply.send(ApiResponse::ok(json!({
                        "run_state": here.as_ref().map_or("migrating", |h| h.run_state()),
                        "held": here.as_ref().and_then(|h| h.held()),
                        "migration": progress.report(),
                        "guest": guest.map_or(Value::Null, |g| g()),
                    })));
                }
                Ok((ApiRequest::Cancel, reply)) => {
                    reply.send(match progress.cancel.cancel() {
                        Ok(()) => {
                            info!("cancel accepted: the move rolls back before its switch-over");
                            ApiResponse::ok(json!({ "cancelled": true }))
                        }
                        Err(e) => ApiResponse::err(e),
                    });
                }
                Ok((_, reply)) => {
                    reply.send(ApiResponse::err("busy: a migration is in progress"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        match job.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// The VM's status as the API reports it.
pub fn status(vm: &Vm, ctx: &ServeContext<'_>) -> Value {
    let meta = vm.meta();
    let stopped = vm.stopped_reason();
    let run_state = match (&stopped, vm.is_running()) {
        (Some(_), _) => "stopped",
        (None, true) => "running",
        (None, false) => "paused",
    };
    json!({
        "run_state": run_state,
        "stopped_reason": stopped,
        "held": ctx.hold,
        "vcpus": meta.vcpus,
        "mem_size": meta.mem_size,
        "tsc_khz": meta.tsc_khz,
        "guest": ctx.guest.map_or(Value::Null, |g| g()),
        "migration": ctx.migration.as_ref().map(|p| p.report()),
        "devices": vm.device_stats(),
    })
}

/// Writes a snapshot of the paused VM (a running VM is refused, as in
/// Firecracker: pause first); the VM stays paused.
pub fn snapshot_to(vm: &mut Vm, path: &Path) -> Result<Value, ControllerError> {
    if vm.is_running() {
        return Err(VmError::WrongRunState("running; pause it first").into());
    }
    let t = Instant::now();
    let state = vm.save_state()?;
    let save_ms = t.elapsed().as_secs_f64() * 1e3;
    let stats = snapshot::write(path, &state, vm.ram())?;
    info!(path = %path.display(), ?stats, "snapshot written");
    Ok(json!({ "path": path, "state_save_ms": save_ms, "snapshot": stats }))
}

/// Applies one request. Returns the response and whether to quit.
pub fn handle(
    vm: &mut Vm,
    req: &ApiRequest,
    api: Option<&Receiver<PendingRequest>>,
    ctx: &mut ServeContext<'_>,
) -> (ApiResponse, bool) {
    let r = match req {
        ApiRequest::Status => Ok(status(vm, ctx)),
        ApiRequest::Pause => vm
            .pause()
            .map(|d| json!({ "pause_us": d.as_micros() as u64 }))
            .map_err(ControllerError::from),
        ApiRequest::Resume => match &ctx.hold {
            Some(why) => Err(ControllerError::Held(why.clone())),
            None => vm
                .resume()
                .map(|_| json!({}))
                .map_err(ControllerError::from),
        },
        // A held VM lacks pages (a stranded destination: the snapshot would
        // store the missing ones as zeros) or may run elsewhere (a
        // committed source: a restore would be a second copy). Templates
        // and exports snapshot through here too.
        ApiRequest::Snapshot { path } => match &ctx.hold {
            Some(why) => Err(ControllerError::Held(why.clone())),
            None => snapshot_to(vm, path),
        },
        ApiRequest::Quit => return (ApiResponse::ok(json!({})), true),
        ApiRequest::Cancel => Err(ControllerError::Cancel(CancelRefused::Nothing)),
        ApiRequest::Recover { to } => return recover(vm, to.as_deref(), api, ctx),
        ApiRequest::Migrate { to, stats_json, .. } => {
            if let Some(why) = &ctx.hold {
                return (ApiResponse::err(ControllerError::Held(why.clone())), false);
            }
            let opts = match migrate_options(req, &ctx.migrate_defaults) {
                Ok(o) => o,
                Err(e) => return (ApiResponse::err(e), false),
            };
            return match migrate_to(vm, to, &opts, stats_json.as_deref(), api, ctx) {
                Ok(v) => (ApiResponse::ok(v), true),
                Err(e) => {
                    error!("migration failed: {e}");
                    (ApiResponse::err(e), false)
                }
            };
        }
    };
    match r {
        Ok(v) => (ApiResponse::ok(v), false),
        Err(e) => {
            error!("{req:?} failed: {e}");
            (ApiResponse::err(e), false)
        }
    }
}

/// The options of a `migrate` request: `defaults` with what it sets
/// instead, each checked before anything moves (a `max_bandwidth` of 0 is
/// refused, as on the command line). Other requests get `defaults`.
fn migrate_options(
    req: &ApiRequest,
    defaults: &migration::SourceOptions,
) -> Result<migration::SourceOptions, ControllerError> {
    let mut opts = defaults.clone();
    let ApiRequest::Migrate {
        mode,
        max_bandwidth,
        tcp_congestion,
        tls_cert,
        tls_key,
        tls_ca,
        tls_server_name,
        ..
    } = req
    else {
        return Ok(opts);
    };
    if let Some(tls) = client_tls(tls_cert, tls_key, tls_ca, tls_server_name)? {
        opts.tls = Some(tls);
    }
    if let Some(m) = mode {
        opts.mode = *m;
    }
    if let Some(b) = max_bandwidth {
        let b = ferry_page_server::pacer::check_rate(*b).map_err(ControllerError::Bandwidth)?;
        opts.server.max_bandwidth = Some(b);
    }
    if let Some(name) = tcp_congestion {
        ferry_transport::congestion::check_name(name).map_err(ControllerError::Congestion)?;
        opts.tcp_congestion = Some(name.clone());
    }
    Ok(opts)
}

/// The TLS settings of a `migrate` request: all three files or none.
fn client_tls(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    ca: &Option<PathBuf>,
    server_name: &Option<String>,
) -> Result<Option<ferry_transport::ClientTls>, ControllerError> {
    match (cert, key, ca) {
        (None, None, None) if server_name.is_none() => Ok(None),
        (Some(cert), Some(key), Some(ca)) => {
            let files = ferry_transport::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            ferry_transport::ClientTls::load(&files, server_name.clone())
                .map(Some)
                .map_err(|e| ControllerError::Tls(e.to_string()))
        }
        _ => Err(ControllerError::Tls(
            "give all of tls_cert, tls_key and tls_ca, or none".into(),
        )),
    }
}

/// Applies a `recover` request; returns the response and whether to quit
/// (a source whose move then completed).
fn recover(
    vm: &mut Vm,
    to: Option<&str>,
    api: Option<&Receiver<PendingRequest>>,
    ctx: &mut ServeContext<'_>,
) -> (ApiResponse, bool) {
    let progress = Arc::new(Progress::default());
    // A recovery finishes a committed move: nothing to cancel.
    progress.cancel.commit();
    ctx.migration = Some(progress.clone());
    if let Some(mut record) = ctx.stranded.clone() {
        if let Some(to) = to {
            record.addr = to.to_string();
        }
        let opts = migration::SourceOptions {
            progress: Some(progress.clone()),
            ..ctx.migrate_defaults.clone()
        };
        let pages = crate::ram_pages::RamPages::new(vm.ram());
        let r = answer_while(api, ctx.guest, &progress, || {
            migration::finish_after_crash(&record, &pages, &opts)
        });
        return match r {
            Ok(outcome) => {
                progress.stage(migration::progress::Stage::Completed);
                // Finished: the VM runs at the destination, never here.
                ctx.hold = Some(moved_to(&record.addr));
                ctx.stranded = None;
                report_stats(&outcome.stats, None);
                (ApiResponse::ok(json!(outcome.stats)), true)
            }
            Err(e) => {
                progress.fail(e.to_string());
                error!("recovery failed: {e}");
                (ApiResponse::err(e), false)
            }
        };
    }
    let Some(hook) = ctx.recover_hook.as_mut() else {
        return (
            ApiResponse::err("there is no stranded move to recover"),
            false,
        );
    };
    progress.stage(migration::progress::Stage::Recovering);
    let r = answer_while(api, ctx.guest, &progress, || hook(vm));
    match r {
        Ok(stats) => {
            progress.stage(migration::progress::Stage::Completed);
            ctx.hold = None;
            ctx.recover_hook = None;
            (ApiResponse::ok(json!(stats)), false)
        }
        Err(e) => {
            progress.fail(e.clone());
            error!("recovery failed: {e}");
            (ApiResponse::err(e), false)
        }
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// A `quit` request, or the API went away.
    Quit,
    /// The VM moved elsewhere (`migrate` succeeded).
    Migrated,
    /// `run_for` elapsed.
    TimeUp,
}

/// Serves `vm` until a `quit` request, a successful `migrate`, or until
/// `run_for` elapses.
pub fn serve(
    vm: &mut Vm,
    api: Option<&Receiver<PendingRequest>>,
    run_for: Option<Duration>,
    ctx: &mut ServeContext<'_>,
) -> ServeEnd {
    let deadline = run_for.map(|d| Instant::now() + d);
    let mut reported_stop = false;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            info!("run time elapsed");
            return ServeEnd::TimeUp;
        }
        if !reported_stop {
            if let Some(reason) = vm.stopped_reason() {
                error!("guest stopped: {reason}");
                reported_stop = true;
            }
        }
        let Some(rx) = api else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((req, reply)) => {
                let migrated =
                    matches!(req, ApiRequest::Migrate { .. } | ApiRequest::Recover { .. });
                let (resp, end) = handle(vm, &req, api, ctx);
                if !end {
                    reply.send(resp);
                } else {
                    // The caller may end the process next: the answer
                    // must be in the client's socket first.
                    if !reply.send_and_flush(resp, crate::api::FLUSH_WITHIN) {
                        warn!("the answer to {req:?} was not written to its client");
                    }
                    return if migrated {
                        ServeEnd::Migrated
                    } else {
                        ServeEnd::Quit
                    };
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return ServeEnd::Quit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `migrate` request as a client sends it.
    fn migrate(extra: Value) -> ApiRequest {
        let mut req = json!({ "cmd": "migrate", "to": "127.0.0.1:1" });
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(req).unwrap()
    }

    /// `max_bandwidth: 0` is refused before anything moves, with the
    /// reason (the command line refuses it too): the pacer would have
    /// made it 1 byte/s, for days with the VM paused in stop-and-copy.
    #[test]
    fn a_migrate_request_with_max_bandwidth_0_is_refused() {
        let defaults = migration::SourceOptions::default();
        let e = migrate_options(&migrate(json!({ "max_bandwidth": 0 })), &defaults).unwrap_err();
        let said = ApiResponse::err(e);
        let said = serde_json::to_string(&said).unwrap();
        assert!(
            said.contains("max_bandwidth: 0 bytes/s would never send a page"),
            "{said}"
        );
        let opts = migrate_options(&migrate(json!({ "max_bandwidth": 1 })), &defaults).unwrap();
        assert_eq!(opts.server.max_bandwidth, Some(std::num::NonZeroU64::MIN));
        let opts = migrate_options(&migrate(json!({})), &defaults).unwrap();
        assert_eq!(opts.server.max_bandwidth, None);
    }
}
