//! Serves one VM: applies API requests to it until told to quit.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{error, info};

use crate::api::{ApiRequest, ApiResponse, PendingRequest};
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

/// Migrates the VM out; on success it runs elsewhere and this process
/// should end.
pub fn migrate_to(
    vm: &mut Vm,
    to: &str,
    opts: &migration::SourceOptions,
    stats_json: Option<&Path>,
) -> Result<Value, ControllerError> {
    let outcome = migration::migrate(vm, to, opts)?;
    println!("{}", outcome.stats.table());
    if let Some(p) = stats_json {
        write_stats(p, &outcome.stats)?;
    }
    Ok(serde_json::to_value(&outcome.stats).unwrap_or(Value::Null))
}

/// Reports what the guest has said, for the API's `status` (under
/// `"guest"`). Whoever runs the VM and knows its guest supplies it; the
/// engine itself never reads guest output.
pub type GuestStatus<'a> = Option<&'a dyn Fn() -> Value>;

/// The VM's status as the API reports it.
pub fn status(vm: &Vm, guest: GuestStatus<'_>) -> Value {
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
        "vcpus": meta.vcpus,
        "mem_size": meta.mem_size,
        "tsc_khz": meta.tsc_khz,
        "guest": guest.map_or(Value::Null, |g| g()),
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
pub fn handle(vm: &mut Vm, req: &ApiRequest, guest: GuestStatus<'_>) -> (ApiResponse, bool) {
    let r = match req {
        ApiRequest::Status => Ok(status(vm, guest)),
        ApiRequest::Pause => vm
            .pause()
            .map(|d| json!({ "pause_us": d.as_micros() as u64 }))
            .map_err(ControllerError::from),
        ApiRequest::Resume => vm
            .resume()
            .map(|_| json!({}))
            .map_err(ControllerError::from),
        ApiRequest::Snapshot { path } => snapshot_to(vm, path),
        ApiRequest::Quit => return (ApiResponse::ok(json!({})), true),
        ApiRequest::Migrate {
            to,
            stats_json,
            mode,
        } => {
            let opts = migration::SourceOptions {
                mode: mode.unwrap_or(ferry_protocol::MigrationMode::Postcopy),
                ..Default::default()
            };
            return match migrate_to(vm, to, &opts, stats_json.as_deref()) {
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
    guest: GuestStatus<'_>,
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
                let migrated = matches!(req, ApiRequest::Migrate { .. });
                let (resp, end) = handle(vm, &req, guest);
                let _ = reply.send(resp);
                if end {
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
