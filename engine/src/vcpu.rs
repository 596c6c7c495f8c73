//! vCPU threads: one per vCPU, each owning its `VcpuFd`.
//!
//! A vCPU thread runs KVM_RUN in a loop and services port I/O exits. The
//! controller talks to it over a command channel. To stop a running vCPU it
//! queues [`VcpuCommand::Pause`] and *kicks* the thread with a real-time
//! signal whose handler sets `kvm_run.immediate_exit`: if the signal lands
//! inside KVM_RUN, the ioctl returns EINTR; if it lands just before, the
//! flag makes the next KVM_RUN return EINTR at once, so no kick is lost.
//! KVM completes any pending port I/O before honouring `immediate_exit`,
//! so a vCPU paused this way has a consistent, saveable state.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error, trace, warn};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::console::Console;
use crate::state::vcpu as vcpu_state;
use crate::state::VcpuState;

/// How long the controller waits for a vCPU to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread is gone.
    #[error("vCPU {0} thread has exited")]
    Gone(u32),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {REPLY_TIMEOUT:?}")]
    Timeout(u32),
    /// Saving state failed.
    #[error("vCPU {index}: {source}")]
    State {
        /// The vCPU.
        index: u32,
        /// What failed.
        #[source]
        source: vcpu_state::VcpuStateError,
    },
    /// The guest stopped the vCPU (triple fault, emulation failure...).
    #[error("vCPU {index} stopped: {reason}")]
    Stopped {
        /// The vCPU.
        index: u32,
        /// Why.
        reason: String,
    },
}

/// What the controller can ask of a vCPU thread.
pub enum VcpuCommand {
    /// Leave KVM_RUN and wait for further commands.
    Pause,
    /// Run the guest.
    Resume,
    /// Capture state (only while paused).
    Save,
    /// End the thread.
    Exit,
}

/// What a vCPU thread answers.
pub enum VcpuReply {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The captured state.
    Saved(Box<Result<VcpuState, vcpu_state::VcpuStateError>>),
}

thread_local! {
    /// This thread's kvm_run mapping, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a const-initialized TLS read and a
    // volatile byte store.
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread from its own VcpuFd's
        // kvm_run mapping, which stays mapped until the thread clears the
        // pointer before dropping the VcpuFd. Writing `immediate_exit` is
        // the documented way to abort KVM_RUN from a signal handler.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    let installed = INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), kick_handler));
    (*installed).map_err(VcpuError::Signal)
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    index: u32,
    thread: Option<JoinHandle<()>>,
    commands: Sender<VcpuCommand>,
    replies: Receiver<VcpuReply>,
    stopped: Arc<Mutex<Option<String>>>,
    tid: i32,
}

impl VcpuHandle {
    /// Starts the thread for `fd`; the vCPU starts paused.
    pub fn spawn(
        index: u32,
        fd: VcpuFd,
        console: Arc<Console>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let (cmd_tx, cmd_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let stopped = Arc::new(Mutex::new(None));
        let worker = VcpuThread {
            index,
            fd,
            console,
            msr_indices,
            commands: cmd_rx,
            replies: reply_tx,
            stopped: stopped.clone(),
        };
        let (tid_tx, tid_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                worker.run()
            })
            .map_err(VcpuError::Spawn)?;
        let tid = tid_rx.recv().map_err(|_| VcpuError::Gone(index))?;
        Ok(Self {
            index,
            thread: Some(thread),
            commands: cmd_tx,
            replies: reply_rx,
            stopped,
            tid,
        })
    }

    /// The kernel thread id of this vCPU's thread, to attribute page faults.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Why the guest stopped this vCPU, if it did.
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.index))
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH only means the thread already exited.
            let _ = t.kill(kick_signal());
        }
    }

    fn reply(&self) -> Result<VcpuReply, VcpuError> {
        self.replies
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::Timeout(self.index),
                RecvTimeoutError::Disconnected => VcpuError::Gone(self.index),
            })
    }

    /// Asks the vCPU to pause, without waiting. Pair with [`Self::wait_paused`].
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Pause)?;
        self.kick();
        Ok(())
    }

    /// Waits until a requested pause took effect.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        match self.reply()? {
            VcpuReply::Paused => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Resumes the vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Resume)?;
        match self.reply()? {
            VcpuReply::Resumed => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Captures the state of the paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        self.send(VcpuCommand::Save)?;
        match self.reply()? {
            VcpuReply::Saved(r) => (*r).map_err(|source| VcpuError::State {
                index: self.index,
                source,
            }),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(VcpuCommand::Exit);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    console: Arc<Console>,
    msr_indices: Arc<Vec<u32>>,
    commands: Receiver<VcpuCommand>,
    replies: Sender<VcpuReply>,
    stopped: Arc<Mutex<Option<String>>>,
}

/// What the run loop should do after one exit.
enum Next {
    Continue,
    Stop(String),
}

impl VcpuThread {
    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        self.serve();
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Handles one command; returns false when the thread must end.
    fn command(&mut self, cmd: VcpuCommand, running: &mut bool) -> bool {
        let reply = match cmd {
            VcpuCommand::Pause => {
                *running = false;
                VcpuReply::Paused
            }
            VcpuCommand::Resume => {
                *running = self.stopped.lock().map(|s| s.is_none()).unwrap_or(false);
                VcpuReply::Resumed
            }
            VcpuCommand::Save => {
                VcpuReply::Saved(Box::new(vcpu_state::save(&self.fd, &self.msr_indices)))
            }
            VcpuCommand::Exit => return false,
        };
        self.replies.send(reply).is_ok()
    }

    fn serve(&mut self) {
        let mut running = false;
        loop {
            if !running {
                match self.commands.recv() {
                    Ok(cmd) => {
                        if !self.command(cmd, &mut running) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            let next = self.run_once();
            if let Next::Stop(reason) = next {
                error!(vcpu = self.index, "{reason}");
                *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                self.console.flush();
                running = false;
            }
            while let Ok(cmd) = self.commands.try_recv() {
                if !self.command(cmd, &mut running) {
                    return;
                }
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Next::Continue;
            }
            Err(e) => return Next::Stop(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                if Console::claims(port) {
                    if let Err(e) = self.console.pio_write(port, data) {
                        warn!("console: {e}");
                    }
                } else {
                    trace!(port, ?data, "unhandled port write");
                }
                Next::Continue
            }
            VcpuExit::IoIn(port, data) => {
                if Console::claims(port) {
                    self.console.pio_read(port, data);
                } else {
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO read");
                data.fill(0);
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, _) => {
                debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO write");
                Next::Continue
            }
            VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Next::Continue,
            VcpuExit::Shutdown => Next::Stop("guest shut down (triple fault)".into()),
            VcpuExit::FailEntry(reason, cpu) => Next::Stop(format!(
                "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
            )),
            VcpuExit::InternalError => {
                let regs = self.fd.get_regs().ok();
                Next::Stop(format!(
                    "KVM internal error (emulation failure) at rip {:#x}",
                    regs.map(|r| r.rip).unwrap_or(0)
                ))
            }
            VcpuExit::SystemEvent(kind, _) => Next::Stop(format!("guest system event {kind}")),
            other => Next::Stop(format!("unexpected vCPU exit {other:?}")),
        }
    }
}
