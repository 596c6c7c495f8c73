//! Per-thread seccomp filters (the `seccompiler` crate), the way Firecracker
//! and Cloud Hypervisor confine their threads.
//!
//! The threads that handle what a guest or a peer controls install a filter
//! on themselves when they start, before they touch any of it:
//!
//! | thread | [`Thread`] | allowed besides the common set |
//! |---|---|---|
//! | each vCPU (`vcpuN`) | `Vcpu` | `ioctl` on KVM (type `0xAE`) only |
//! | the destination's demand-fault thread (`uffd-fault`) | `Fault` | `ioctl` on userfaultfd (type `0xAA`) and `FIONBIO`; `poll`; socket I/O and `shutdown` |
//! | the source's page server (`page-server`) | `PageServer` | `epoll_*`; `pread64`, `lseek` and `mincore`; socket I/O, `setsockopt`, `FIONBIO` |
//! | the destination's push installer (`installer`) | `Installer` | as `Fault` |
//! | the control API (`api`, `api-conn`) | `Api` | `accept4`; `clone` of a thread (`CLONE_THREAD`) and what a new thread sets up; socket I/O; `fcntl` |
//!
//! The common set ([`filters`]) is memory management without `PROT_EXEC`,
//! futexes, clocks and sleeps, `read`/`write`, `getrandom`, signal return
//! and masks, and thread exit. No filtered thread can open a file, create a
//! socket, connect, execute a program, create a thread or process, or map
//! memory executable.
//!
//! A disallowed system call traps ([`sigsys`]): the process prints which
//! thread made which call to stderr and exits with status
//! [`BAD_SYSCALL_EXIT`]. The one exception is `openat`, which fails with
//! `EACCES` instead (glibc's allocator opens two `/proc` and `/sys` files
//! lazily from whatever thread needs them first, and copes with a refusal;
//! see [`filters::compile`]). The filters are on by default; `--no-seccomp` on
//! the binaries (or [`set_enabled`]) turns them off for debugging.

mod filters;
mod sigsys;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::BpfProgram;

pub use sigsys::BAD_SYSCALL_EXIT;

/// The kinds of confined thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// A vCPU thread: KVM_RUN and the vCPU's state ioctls.
    Vcpu,
    /// The destination's demand-fault thread: userfaultfd and its socket.
    Fault,
    /// The source's post-copy page server: its event loop and page reads.
    PageServer,
    /// The control API's listener and its connection threads: accept,
    /// start a connection thread, read and answer requests.
    Api,
    /// The destination's push installer: `UFFDIO_COPY` of the pages the
    /// receive thread decoded (the fault thread's allow-list).
    Installer,
}

impl Thread {
    /// The name used in logs and in the SIGSYS report.
    pub fn name(self) -> &'static str {
        match self {
            Thread::Vcpu => "vcpu",
            Thread::Fault => "uffd-fault",
            Thread::PageServer => "page-server",
            Thread::Api => "api",
            Thread::Installer => "installer",
        }
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled to BPF.
    #[error("seccomp filter for the {thread} thread: {why}")]
    Build {
        /// Which thread's filter.
        thread: &'static str,
        /// What seccompiler said.
        why: String,
    },
    /// The kernel refused the filter, or the SIGSYS handler.
    #[error("installing the seccomp filter of the {thread} thread: {why}")]
    Install {
        /// Which thread's filter.
        thread: &'static str,
        /// What failed.
        why: String,
    },
    /// The confined thread could not be started or panicked.
    #[error("the {0} thread could not start or panicked")]
    Thread(&'static str),
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the filters on or off for threads started from now on (on by
/// default). Off is for debugging only (`--no-seccomp`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
    if !on {
        tracing::warn!("seccomp filters are off (--no-seccomp): threads are not confined");
    }
}

/// Whether new threads are confined.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Confines the calling thread with `kind`'s filter, for the rest of its
/// life (a no-op when filters are off).
pub fn apply(kind: Thread) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let program = program(kind)?;
    prepare_process();
    sigsys::install(kind).map_err(|why| SeccompError::Install {
        thread: kind.name(),
        why,
    })?;
    for p in program {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install {
            thread: kind.name(),
            why: e.to_string(),
        })?;
    }
    Ok(())
}

/// Settles, while the calling thread is still free to, what glibc would
/// otherwise look up lazily from a confined thread: the first thread that
/// needs a new malloc arena past the eighth asks for the number of CPUs,
/// which opens `/sys/devices/system/cpu/online`. With the arena limit set
/// (to glibc's own default, 8 per CPU) it never asks.
fn prepare_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a malloc tunable.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
            tracing::warn!("cannot set M_ARENA_MAX; a confined thread may trap in malloc");
        }
    });
}

/// Runs `work` on a new thread named `name`, confined by `kind`'s filter,
/// and returns its result.
pub fn run_confined<T: Send>(
    kind: Thread,
    name: &str,
    work: impl FnOnce() -> T + Send,
) -> Result<T, SeccompError> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(s, || apply(kind).map(|()| work()))
            .map_err(|_| SeccompError::Thread(kind.name()))?;
        t.join().map_err(|_| SeccompError::Thread(kind.name()))?
    })
}

/// `kind`'s filter, compiled once per process.
fn program(kind: Thread) -> Result<&'static [BpfProgram], SeccompError> {
    static VCPU: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    static FAULT: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    static PAGE_SERVER: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    static API: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    let cell = match kind {
        Thread::Vcpu => &VCPU,
        Thread::Fault | Thread::Installer => &FAULT,
        Thread::PageServer => &PAGE_SERVER,
        Thread::Api => &API,
    };
    cell.get_or_init(|| filters::compile(kind))
        .as_deref()
        .map_err(|why| SeccompError::Build {
            thread: kind.name(),
            why: why.clone(),
        })
}
