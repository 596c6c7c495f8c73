//! Site hooks run by `ferry-dest` after a move (`--on-resumed`,
//! `--on-complete`), in the style of libvirt's hooks: a shell command run
//! with `sh -c`, told about the VM through `FERRY_*` environment variables.
//!
//! A hook never affects the VM: a failing hook is logged with its exit
//! code, a hook still running after the timeout is killed (its whole
//! process group) and logged, and hooks run on their own threads, so the VM
//! and its API keep going meanwhile.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_engine::migration::progress::{Progress, Stage};
use tracing::{info, warn};

/// What a hook is run for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The switch-over committed: the VM runs on this host (pages may
    /// still be arriving).
    Resumed,
    /// Every page arrived: the move is over.
    Complete,
}

impl Event {
    /// The value of `FERRY_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Event::Resumed => "resumed",
            Event::Complete => "complete",
        }
    }
}

/// The VM's shape, when it is known (`FERRY_MEM`, `FERRY_VCPUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Guest memory, bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// The hooks configured on a `ferry-dest`.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// `--on-resumed`.
    pub on_resumed: Option<String>,
    /// `--on-complete`.
    pub on_complete: Option<String>,
    /// `--hook-timeout`.
    pub timeout: Duration,
    /// `--vm-id` (or a generated one): `FERRY_VM_ID`.
    pub vm_id: String,
    /// `--stats-json`: `FERRY_STATS_JSON`.
    pub stats_json: Option<PathBuf>,
}

/// `ferry-dest`'s hook flags.
#[derive(clap::Args, Debug, Clone)]
pub struct HookArgs {
    /// Run this shell command (`sh -c`) once the switch-over committed and
    /// the VM runs on this host. See README "Templates and hooks" for its
    /// FERRY_* environment.
    #[arg(long)]
    pub on_resumed: Option<String>,
    /// Run this shell command once every page arrived (after --on-resumed).
    #[arg(long)]
    pub on_complete: Option<String>,
    /// Kill a hook still running after this long (it is logged; the VM is
    /// never affected).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub hook_timeout: Duration,
    /// The VM's name for hooks (FERRY_VM_ID); default: a random id.
    #[arg(long)]
    pub vm_id: Option<String>,
}

impl HookArgs {
    /// The configured hooks, `stats_json` being `--stats-json`.
    pub fn hooks(&self, stats_json: Option<&std::path::Path>) -> Arc<Hooks> {
        Arc::new(Hooks {
            on_resumed: self.on_resumed.clone(),
            on_complete: self.on_complete.clone(),
            timeout: self.hook_timeout,
            vm_id: self.vm_id.clone().unwrap_or_else(generated_vm_id),
            stats_json: stats_json.map(|p| std::path::absolute(p).unwrap_or(p.to_path_buf())),
        })
    }
}

/// How one hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// Exited with this code (None: killed by a signal).
    Failed(Option<i32>),
    /// Still running after the timeout; killed.
    TimedOut,
    /// Could not be started.
    SpawnError(String),
}

/// A VM id for `FERRY_VM_ID` when none was given: 16 hex digits from
/// /dev/urandom (falling back to the time and pid).
pub fn generated_vm_id() -> String {
    let id = ferry_engine::os::random_u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ u64::from(std::process::id()) << 32
    });
    format!(
        "vm-{}",
        id.to_le_bytes()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

impl Hooks {
    /// Whether any hook is configured.
    pub fn any(&self) -> bool {
        self.on_resumed.is_some() || self.on_complete.is_some()
    }

    /// The environment a hook gets for `event`.
    pub fn env(&self, event: Event, shape: Option<Shape>) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("FERRY_VM_ID", self.vm_id.clone()),
            ("FERRY_EVENT", event.name().to_string()),
            // VMs have no network devices yet: no MAC, no addresses.
            ("FERRY_VM_MAC", String::new()),
            ("FERRY_VM_ADDRS", String::new()),
            (
                "FERRY_MEM",
                shape.map_or(String::new(), |s| s.mem.to_string()),
            ),
            (
                "FERRY_VCPUS",
                shape.map_or(String::new(), |s| s.vcpus.to_string()),
            ),
        ];
        if let Some(p) = &self.stats_json {
            env.push(("FERRY_STATS_JSON", p.to_string_lossy().into_owned()));
        }
        env
    }

    /// Runs the hook for `event`, if one is configured, and waits for it
    /// (at most the timeout). Logs how it ended.
    pub fn run(&self, event: Event, shape: Option<Shape>) -> Option<Outcome> {
        let cmd = match event {
            Event::Resumed => self.on_resumed.as_ref(),
            Event::Complete => self.on_complete.as_ref(),
        }?;
        Some(run_command(
            cmd,
            event,
            &self.env(event, shape),
            self.timeout,
        ))
    }

    /// Watches a migration's progress and runs `--on-resumed` once it
    /// first reaches `Postcopy` or `Completed` (the switch-over committed).
    /// The watcher ends then, or when the move fails, or once
    /// [`ResumedWatch::finish`] says the move ended without committing.
    pub fn watch_resumed(self: &Arc<Self>, progress: Arc<Progress>) -> ResumedWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (hooks, stop2) = (self.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            // Read `stop` first: once it is set the stage is final.
            let stopping = stop2.load(Ordering::Acquire);
            match progress.current_stage() {
                Stage::Postcopy | Stage::Completed => {
                    hooks.run(Event::Resumed, None);
                    return true;
                }
                Stage::Failed => return false,
                _ if stopping => return false,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        });
        ResumedWatch { stop, thread }
    }

    /// For a VM this process started itself (a restore): runs
    /// `--on-resumed` then `--on-complete` on a background thread.
    pub fn fire_both(self: &Arc<Self>, shape: Shape) -> JoinHandle<()> {
        let hooks = self.clone();
        std::thread::spawn(move || {
            hooks.run(Event::Resumed, Some(shape));
            hooks.run(Event::Complete, Some(shape));
        })
    }
}

/// The thread of [`Hooks::watch_resumed`].
pub struct ResumedWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<bool>,
}

impl ResumedWatch {
    /// Call once the receive returned. When the move `completed`, runs
    /// `--on-complete` (after `--on-resumed` has finished) on a background
    /// thread, with the VM's `shape`.
    pub fn finish(
        self,
        hooks: &Arc<Hooks>,
        completed: bool,
        shape: Option<Shape>,
    ) -> JoinHandle<()> {
        self.stop.store(true, Ordering::Release);
        let hooks = hooks.clone();
        std::thread::spawn(move || {
            let resumed = self.thread.join().unwrap_or(false);
            if completed && resumed {
                hooks.run(Event::Complete, shape);
            }
        })
    }
}

/// Runs `sh -c cmd` with `env`, in its own process group, for at most
/// `timeout`; logs the outcome.
pub fn run_command(
    cmd: &str,
    event: Event,
    env: &[(&'static str, String)],
    timeout: Duration,
) -> Outcome {
    use std::os::unix::process::CommandExt;
    let ev = event.name();
    let started = Instant::now();
    let child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!(event = ev, %cmd, error = %e, "hook could not be started");
            return Outcome::SpawnError(e.to_string());
        }
    };
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break Outcome::Ok,
            Ok(Some(status)) => break Outcome::Failed(status.code()),
            Ok(None) if started.elapsed() >= timeout => {
                // The whole group: `sh -c` may have children of its own.
                let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                break Outcome::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Outcome::SpawnError(e.to_string());
            }
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    match &outcome {
        Outcome::Ok => info!(event = ev, ms, "hook ran"),
        Outcome::Failed(code) => {
            warn!(event = ev, %cmd, exit_code = ?code, ms, "hook failed (the VM is not affected)")
        }
        Outcome::TimedOut => warn!(
            event = ev,
            %cmd,
            timeout_ms = timeout.as_millis() as u64,
            "hook timed out and was killed (the VM is not affected)"
        ),
        Outcome::SpawnError(_) => {}
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        let env = [("FERRY_EVENT", "resumed".to_string())];
        let t = Duration::from_secs(5);
        assert_eq!(
            run_command("test \"$FERRY_EVENT\" = resumed", Event::Resumed, &env, t),
            Outcome::Ok
        );
        assert_eq!(
            run_command("exit 3", Event::Resumed, &env, t),
            Outcome::Failed(Some(3))
        );
        let start = Instant::now();
        assert_eq!(
            run_command(
                "sleep 30",
                Event::Complete,
                &env,
                Duration::from_millis(200)
            ),
            Outcome::TimedOut
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn ids() {
        let (a, b) = (generated_vm_id(), generated_vm_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 16);
    }
}
