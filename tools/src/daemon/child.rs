//! One VM process: a `ferry-dest` started for one incoming session,
//! listening on a port of its own on the daemon's address.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_engine::memory::{Backing, HUGE_PAGE_SIZE};
use ferry_engine::migration::ram_ahead::check_room;
use ferry_protocol::Hello;
use tracing::{info, warn};

use super::run_dir::{RunDir, VmFiles};
use super::DaemonConfig;

/// The environment variable that gives a VM process its session id (the
/// environment, unlike the command line, is readable by the owner only).
pub const EXPECT_SESSION_ENV: &str = "FERRY_EXPECT_SESSION";
/// How long a VM process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A VM process started by the daemon.
pub(super) struct VmProcess {
    /// The VM's id (`vm-` and 16 hex digits), naming its files.
    pub(super) id: String,
    /// The port it listens on.
    pub(super) port: u16,
    /// Bytes of RAM it allocated ahead (`--prealloc session`), else 0.
    pub(super) ahead: u64,
    child: Child,
    files: VmFiles,
}

/// Why a VM process could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM process exited with {status} before listening (its log: {log})")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the VM process did not listen within {START_TIMEOUT:?}")]
    Timeout,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// `--prealloc SIZE` for a VM process of `hello`'s size, when the daemon
/// preallocates, the size is one its RAM can have (whole 2 MiB pages
/// for huge pages; any other size is refused by the VM process itself,
/// with its reason, once it reads the `Hello`) and the host has room for
/// it now (`ram_ahead::check_room`, the rule of `--prealloc hello`, with
/// the `held` bytes the daemon's running VM processes allocated ahead
/// counted too): RAM that does not fit is not allocated ahead, and the
/// move allocates it as it goes, as without `--prealloc`.
fn prealloc_args(prealloc: Option<Backing>, hello: &Hello, held: u64) -> Vec<String> {
    let size = hello.mem_size;
    let Some(backing) = prealloc else {
        return Vec::new();
    };
    if !ferry_engine::layout::valid_mem_size(size)
        || (backing == Backing::HugePages && !size.is_multiple_of(HUGE_PAGE_SIZE))
    {
        return Vec::new();
    }
    if let Err(no_room) = check_room(size, backing, held) {
        warn!("{no_room}; the session's VM process allocates as the move goes");
        return Vec::new();
    }
    vec!["--prealloc".into(), size.to_string()]
}

impl VmProcess {
    /// Starts `ferry-dest` for `hello`'s session, listening on `ip` port 0,
    /// and waits until it listens (having allocated its RAM ahead, when it
    /// does). `held`: the RAM the daemon's other VM processes allocated
    /// ahead.
    pub(super) fn start(
        dir: &RunDir,
        cfg: &DaemonConfig,
        ip: IpAddr,
        hello: &Hello,
        held: u64,
    ) -> Result<Self, StartError> {
        let id = format!(
            "vm-{:016x}",
            ferry_engine::os::random_u64().map_err(io("a random VM id"))?
        );
        let files = dir.files(&id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)
            .map_err(io("creating the VM's log"))?;
        let prealloc = prealloc_args(cfg.prealloc, hello, held);
        let mut cmd = Command::new(&cfg.exe);
        cmd.arg("--listen")
            .arg(SocketAddr::new(ip, 0).to_string())
            .arg("--listen-addr-file")
            .arg(&files.addr)
            .arg("--accept-timeout")
            .arg(format!("{}ms", cfg.accept_timeout.as_millis()))
            .arg("--api")
            .arg(&files.api)
            .arg("--serial")
            .arg(&files.serial)
            .arg("--stats-json")
            .arg(&files.stats)
            .arg("--vm-id")
            .arg(&id)
            .args(&cfg.forwarded)
            .args(&prealloc)
            .env(EXPECT_SESSION_ENV, hello.session_id.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("the VM's log"))?)
            .stderr(log);
        let child = cmd.spawn().map_err(io("starting ferry-dest"))?;
        let mut vm = Self {
            id,
            port: 0,
            ahead: if prealloc.is_empty() {
                0
            } else {
                hello.mem_size
            },
            child,
            files,
        };
        match vm.wait_listening() {
            Ok(addr) => vm.port = addr.port(),
            Err(e) => {
                vm.stop();
                return Err(e);
            }
        }
        vm.write_record(hello)
            .map_err(io("writing the VM's record"))?;
        Ok(vm)
    }

    /// The VM process's pid.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the address file the VM process writes once it listens.
    fn wait_listening(&mut self) -> Result<SocketAddr, StartError> {
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.files.addr) {
                if let Ok(a) = s.trim().parse::<SocketAddr>() {
                    let _ = std::fs::remove_file(&self.files.addr);
                    if a.port() != 0 {
                        return Ok(a);
                    }
                }
            }
            if let Some(status) = self.child.try_wait().map_err(io("waiting for the VM"))? {
                return Err(StartError::Exited {
                    status,
                    log: self.files.log.display().to_string(),
                });
            }
            if t.elapsed() > START_TIMEOUT {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn write_record(&self, hello: &Hello) -> std::io::Result<()> {
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let record = serde_json::json!({
            "vm": self.id,
            "pid": self.pid(),
            "port": self.port,
            "api": self.files.api,
            "serial": self.files.serial,
            "log": self.files.log,
            "stats": self.files.stats,
            "mem_size": hello.mem_size,
            "vcpus": hello.vcpus,
            "mode": hello.mode().map(|m| m.name()).unwrap_or("?"),
            "started_unix_ms": started_unix_ms,
        });
        ferry_engine::os::write_atomically(&self.files.record, record.to_string().as_bytes())
    }

    /// True once the process has ended (its record is then removed).
    pub(super) fn reap_if_ended(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(None) => false,
            Ok(Some(status)) => {
                info!(vm = %self.id, %status, "VM process ended");
                self.remove_files();
                true
            }
            Err(e) => {
                warn!(vm = %self.id, "cannot wait for the VM process: {e}");
                false
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_files();
    }

    fn remove_files(&self) {
        for p in [&self.files.record, &self.files.addr, &self.files.api] {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control `Hello` for a 1-vCPU guest of `mem_size` bytes.
    fn hello(mem_size: u64) -> Hello {
        Hello {
            version: ferry_protocol::PROTOCOL_VERSION,
            role: ferry_protocol::Role::Control,
            session_id: 7,
            features: 0,
            mem_size,
            vcpus: 1,
            page_size: ferry_protocol::PAGE_SIZE as u32,
            options: Vec::new(),
        }
    }

    #[test]
    fn a_session_gets_prealloc_for_ram_its_kind_can_have() {
        let args = |p, mem| prealloc_args(p, &hello(mem), 0);
        assert_eq!(
            args(Some(Backing::Shmem), 100 << 20),
            ["--prealloc", "104857600"]
        );
        assert_eq!(
            args(Some(Backing::HugePages), 256 << 20),
            ["--prealloc", "268435456"]
        );
        // 101 MiB is not whole huge pages; 4 KiB RAM can have it.
        assert!(args(Some(Backing::HugePages), 101 << 20).is_empty());
        assert_eq!(args(Some(Backing::Shmem), 101 << 20).len(), 2);
        // No size a VM can have, or no --prealloc session.
        assert!(args(Some(Backing::Shmem), 0).is_empty());
        assert!(args(Some(Backing::Shmem), (100 << 20) + 1).is_empty());
        assert!(args(None, 256 << 20).is_empty());
    }

    /// RAM the host has no room to allocate ahead now (by the rule of
    /// `--prealloc hello`) gets a VM process that does not allocate it
    /// ahead; the sizes come from /proc/meminfo, and nothing is allocated.
    #[test]
    fn a_session_the_host_has_no_room_for_gets_no_prealloc() {
        let available = ferry_engine::memory::memory_available().expect("MemAvailable");
        let over = (available + HUGE_PAGE_SIZE) & !(HUGE_PAGE_SIZE - 1);
        assert!(check_room(over, Backing::Shmem, 0).is_err());
        assert!(prealloc_args(Some(Backing::Shmem), &hello(over), 0).is_empty());
        let free = ferry_engine::memory::huge_pages_available().expect("HugePages_Free");
        let over_pool = (free + 1).max(16) * HUGE_PAGE_SIZE;
        assert!(prealloc_args(Some(Backing::HugePages), &hello(over_pool), 0).is_empty());
        assert_eq!(
            prealloc_args(Some(Backing::Shmem), &hello(64 << 20), 0),
            ["--prealloc", "67108864"]
        );
        // What the daemon's running VM processes hold ahead counts: beside
        // three times what the host has available, not even 64 MiB fits.
        assert!(prealloc_args(Some(Backing::Shmem), &hello(64 << 20), 3 * available).is_empty());
    }
}
