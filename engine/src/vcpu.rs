//! vCPU threads: one per vCPU, each owning its `VcpuFd`.
//!
//! A vCPU thread runs KVM_RUN in a loop and services port I/O exits. The
//! controller talks to it over a command channel. To stop a running vCPU it
//! queues [`VcpuCommand::Pause`] and *kicks* the thread with a real-time
//! signal whose handler sets `kvm_run.immediate_exit`: if the signal lands
//! inside KVM_RUN, the ioctl returns EINTR; if it lands just before, the
//! flag makes the next KVM_RUN return EINTR at once, so no kick is lost.
//!
//! A pause can also land right after an I/O exit. KVM finishes a port I/O
//! or MMIO access (the value of an `in` lands in RAX, RIP moves past the
//! instruction) only on the next KVM_RUN: until then the registers may
//! still point at the instruction, and a state saved now would run it again
//! where it is restored (a UART byte printed twice, a register read that
//! has side effects done twice). So before a vCPU reports itself paused it
//! re-enters KVM_RUN once with `immediate_exit` set, which completes the
//! access and returns EINTR without running the guest (what KVM's API
//! documentation asks of a VMM, and what KVM's own selftests do before
//! saving state). Every pause does this, so a paused vCPU's state is
//! always consistent and saveable.
//!
//! Each command carries a tag that its reply echoes; the handle drops
//! replies whose tag is not the one it waits for, so an answer that comes
//! after its waiter gave up can never answer a later command.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error, trace, warn};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::console::Console;
use crate::devices::MmioBus;
use crate::state::vcpu as vcpu_state;
use crate::state::VcpuState;

/// How long the controller waits for a vCPU to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most KVM_RUN calls spent completing one pending access. One is the norm;
/// string I/O and MMIO split across pages may need userspace a few more
/// times.
const MAX_COMPLETION_RUNS: u32 = 16;

/// Errors from vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
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
    /// [`VcpuHandle::wait_paused`] without a [`VcpuHandle::request_pause`].
    #[error("vCPU {0}: waited for a pause that was never requested")]
    NoPauseRequested(u32),
    /// The thread answered with a reply of the wrong kind.
    #[error("vCPU {0} answered a command with the wrong reply")]
    WrongReply(u32),
}

/// What the controller can ask of a vCPU thread.
#[derive(Debug)]
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

/// A command or reply with its tag: a reply carries its command's tag.
pub type Tagged<T> = (u64, T);

/// Why [`await_reply`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitError {
    /// No reply with the wanted tag within the timeout.
    Timeout,
    /// The other end is gone.
    Disconnected,
}

/// Receives from `rx` until the reply tagged `want` arrives, within
/// `timeout`. Replies with other tags are dropped: they answer commands
/// whose waiter already gave up (a timeout), and must not answer this one.
fn await_reply<T>(rx: &Receiver<Tagged<T>>, want: u64, timeout: Duration) -> Result<T, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((tag, reply)) if tag == want => return Ok(reply),
            Ok((tag, _)) if tag < want => {
                debug!(tag, want, "dropping the late reply to an earlier command");
            }
            Ok((tag, _)) => warn!(tag, want, "dropping a reply to a command not yet sent"),
            Err(RecvTimeoutError::Timeout) => return Err(WaitError::Timeout),
            Err(RecvTimeoutError::Disconnected) => return Err(WaitError::Disconnected),
        }
    }
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
    commands: Sender<Tagged<VcpuCommand>>,
    replies: Receiver<Tagged<VcpuReply>>,
    stopped: Arc<Mutex<Option<String>>>,
    tid: i32,
    /// Tag of the last command sent; tags start at 1.
    last_tag: AtomicU64,
    /// Tag of the pause [`Self::request_pause`] asked for, 0 if none.
    pause_tag: AtomicU64,
}

impl VcpuHandle {
    /// Starts the thread for `fd`; the vCPU starts paused.
    pub fn spawn(
        index: u32,
        fd: VcpuFd,
        console: Arc<Console>,
        bus: Arc<MmioBus>,
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
            bus,
            msr_indices,
            commands: cmd_rx,
            replies: reply_tx,
            stopped: stopped.clone(),
            pending: None,
        };
        let (tid_tx, tid_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Confined before it runs a single guest instruction.
                let confined = crate::seccomp::apply(crate::seccomp::Thread::Vcpu);
                let ok = confined.is_ok();
                let _ = tid_tx.send((nix::unistd::gettid().as_raw(), confined));
                if ok {
                    worker.run()
                }
            })
            .map_err(VcpuError::Spawn)?;
        let (tid, confined) = tid_rx.recv().map_err(|_| VcpuError::Gone(index))?;
        confined?;
        Ok(Self {
            index,
            thread: Some(thread),
            commands: cmd_tx,
            replies: reply_rx,
            stopped,
            tid,
            last_tag: AtomicU64::new(0),
            pause_tag: AtomicU64::new(0),
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

    /// Sends `cmd`; returns the tag its reply will carry.
    fn send(&self, cmd: VcpuCommand) -> Result<u64, VcpuError> {
        let tag = self.last_tag.fetch_add(1, Ordering::Relaxed) + 1;
        self.commands
            .send((tag, cmd))
            .map_err(|_| VcpuError::Gone(self.index))?;
        Ok(tag)
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH only means the thread already exited.
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits for the reply to the command tagged `tag`.
    fn reply(&self, tag: u64) -> Result<VcpuReply, VcpuError> {
        await_reply(&self.replies, tag, REPLY_TIMEOUT).map_err(|e| match e {
            WaitError::Timeout => VcpuError::Timeout(self.index),
            WaitError::Disconnected => VcpuError::Gone(self.index),
        })
    }

    /// Asks the vCPU to pause, without waiting. Pair with [`Self::wait_paused`].
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        let tag = self.send(VcpuCommand::Pause)?;
        self.pause_tag.store(tag, Ordering::Relaxed);
        self.kick();
        Ok(())
    }

    /// Waits until a requested pause took effect: the vCPU is out of
    /// KVM_RUN and any I/O it exited for is complete.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        let tag = self.pause_tag.swap(0, Ordering::Relaxed);
        if tag == 0 {
            return Err(VcpuError::NoPauseRequested(self.index));
        }
        match self.reply(tag)? {
            VcpuReply::Paused => Ok(()),
            _ => Err(VcpuError::WrongReply(self.index)),
        }
    }

    /// Resumes the vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        let tag = self.send(VcpuCommand::Resume)?;
        match self.reply(tag)? {
            VcpuReply::Resumed => Ok(()),
            _ => Err(VcpuError::WrongReply(self.index)),
        }
    }

    /// Captures the state of the paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let tag = self.send(VcpuCommand::Save)?;
        match self.reply(tag)? {
            VcpuReply::Saved(r) => (*r).map_err(|source| VcpuError::State {
                index: self.index,
                source,
            }),
            _ => Err(VcpuError::WrongReply(self.index)),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.send(VcpuCommand::Exit);
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
    bus: Arc<MmioBus>,
    msr_indices: Arc<Vec<u32>>,
    commands: Receiver<Tagged<VcpuCommand>>,
    replies: Sender<Tagged<VcpuReply>>,
    stopped: Arc<Mutex<Option<String>>>,
    /// The access of the last exit, until a KVM_RUN has completed it.
    pending: Option<PendingIo>,
}

/// An I/O access KVM completes only on the next KVM_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingIo {
    PortIn(u16),
    PortOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
}

impl fmt::Display for PendingIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingIo::PortIn(p) => write!(f, "port read from {p:#x}"),
            PendingIo::PortOut(p) => write!(f, "port write to {p:#x}"),
            PendingIo::MmioRead(a) => write!(f, "MMIO read from {a:#x}"),
            PendingIo::MmioWrite(a) => write!(f, "MMIO write to {a:#x}"),
        }
    }
}

/// What serving one exit came to.
enum Served {
    /// Nothing left to do.
    Done,
    /// An access served here that KVM completes on the next KVM_RUN.
    Io(PendingIo),
    /// KVM could not emulate an instruction; the caller adds the RIP.
    InternalError,
    /// The vCPU cannot go on.
    Stop(String),
}

/// Serves one exit: port accesses go to the console, MMIO accesses to the
/// virtio-mmio bus (register accesses only: queue work is the devices'
/// I/O threads'), anything else nowhere.
fn serve_exit(console: &Console, bus: &MmioBus, exit: VcpuExit<'_>) -> Served {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if Console::claims(port) {
                if let Err(e) = console.pio_write(port, data) {
                    warn!("console: {e}");
                }
            } else {
                trace!(port, ?data, "unhandled port write");
            }
            Served::Io(PendingIo::PortOut(port))
        }
        VcpuExit::IoIn(port, data) => {
            if Console::claims(port) {
                console.pio_read(port, data);
            } else {
                data.fill(0xff);
            }
            Served::Io(PendingIo::PortIn(port))
        }
        VcpuExit::MmioRead(addr, data) => {
            if !bus.read(addr, data) {
                debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO read");
                data.fill(0);
            }
            Served::Io(PendingIo::MmioRead(addr))
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !bus.write(addr, data) {
                debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO write");
            }
            Served::Io(PendingIo::MmioWrite(addr))
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Served::Done,
        VcpuExit::Shutdown => Served::Stop("guest shut down (triple fault)".into()),
        VcpuExit::FailEntry(reason, cpu) => Served::Stop(format!(
            "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
        )),
        VcpuExit::InternalError => Served::InternalError,
        VcpuExit::SystemEvent(kind, _) => Served::Stop(format!("guest system event {kind}")),
        other => Served::Stop(format!("unexpected vCPU exit {other:?}")),
    }
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
    fn command(&mut self, tag: u64, cmd: VcpuCommand, running: &mut bool) -> bool {
        let reply = match cmd {
            VcpuCommand::Pause => {
                *running = false;
                self.complete_pending_io();
                VcpuReply::Paused
            }
            VcpuCommand::Resume => {
                *running = self.stopped.lock().map(|s| s.is_none()).unwrap_or(false);
                VcpuReply::Resumed
            }
            VcpuCommand::Save => {
                // A paused vCPU has nothing pending; this only matters if
                // completing it failed, and then the state is refused.
                self.complete_pending_io();
                VcpuReply::Saved(Box::new(match self.pending {
                    None => vcpu_state::save(&self.fd, &self.msr_indices),
                    Some(io) => Err(vcpu_state::VcpuStateError::IncompleteIo(io.to_string())),
                }))
            }
            VcpuCommand::Exit => return false,
        };
        self.replies.send((tag, reply)).is_ok()
    }

    fn serve(&mut self) {
        let mut running = false;
        loop {
            if !running {
                match self.commands.recv() {
                    Ok((tag, cmd)) => {
                        if !self.command(tag, cmd, &mut running) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            if let Next::Stop(reason) = self.run_once() {
                self.stop(reason);
                running = false;
            }
            while let Ok((tag, cmd)) = self.commands.try_recv() {
                if !self.command(tag, cmd, &mut running) {
                    return;
                }
            }
        }
    }

    /// Records why this vCPU cannot run any more (the first reason stays:
    /// later failures usually follow from it).
    fn stop(&mut self, reason: String) {
        error!(vcpu = self.index, "{reason}");
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        self.console.flush();
    }

    fn run_once(&mut self) -> Next {
        let served = match self.fd.run() {
            Ok(exit) => serve_exit(&self.console, &self.bus, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Served::Done
            }
            Err(e) => return Next::Stop(format!("KVM_RUN failed: {e}")),
        };
        self.settle(served)
    }

    /// Records what a KVM_RUN that returned came to. KVM_RUN first
    /// completes the previous access, so whatever was pending is done.
    fn settle(&mut self, served: Served) -> Next {
        self.pending = None;
        match served {
            Served::Done => Next::Continue,
            Served::Io(io) => {
                self.pending = Some(io);
                Next::Continue
            }
            Served::InternalError => {
                let regs = self.fd.get_regs().ok();
                Next::Stop(format!(
                    "KVM internal error (emulation failure) at rip {:#x}",
                    regs.map(|r| r.rip).unwrap_or(0)
                ))
            }
            Served::Stop(reason) => Next::Stop(reason),
        }
    }

    /// Completes the access of the last exit, if it has one, without
    /// running the guest: KVM_RUN with `immediate_exit` set finishes it
    /// (an `in` value lands in RAX, RIP moves on) and then returns EINTR.
    /// Should finishing it need userspace again (string I/O, an access
    /// split across pages), the new exit is served and the step repeated.
    /// A failure stops the vCPU, and its state is then refused.
    fn complete_pending_io(&mut self) {
        let mut runs = 0;
        while let Some(io) = self.pending {
            if runs == MAX_COMPLETION_RUNS {
                self.stop(format!(
                    "{io} still incomplete after {runs} KVM_RUN calls; state not consistent"
                ));
                return;
            }
            runs += 1;
            self.fd.set_kvm_immediate_exit(1);
            let result = self.fd.run();
            let next = match result {
                Err(e) if e.errno() == libc::EINTR => {
                    self.pending = None;
                    Next::Continue
                }
                // Not entered; the access is still pending. Try again.
                Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Stop(format!("KVM_RUN to complete a {io} failed: {e}")),
                Ok(exit) => {
                    let served = serve_exit(&self.console, &self.bus, exit);
                    self.settle(served)
                }
            };
            self.fd.set_kvm_immediate_exit(0);
            if let Next::Stop(reason) = next {
                self.stop(reason);
                return;
            }
        }
        if runs > 0 {
            trace!(vcpu = self.index, runs, "completed a pending access");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn the_reply_with_the_wanted_tag_is_returned() {
        let (tx, rx) = channel();
        tx.send((7, "seven")).unwrap();
        assert_eq!(await_reply(&rx, 7, SHORT), Ok("seven"));
    }

    #[test]
    fn late_replies_to_earlier_commands_are_dropped() {
        let (tx, rx) = channel();
        // Replies to commands 3 and 4 came after their waiters timed out.
        tx.send((3, "paused")).unwrap();
        tx.send((4, "saved")).unwrap();
        tx.send((5, "resumed")).unwrap();
        assert_eq!(await_reply(&rx, 5, SHORT), Ok("resumed"));
        // Nothing stale is left to answer the next command.
        assert_eq!(await_reply(&rx, 6, SHORT), Err(WaitError::Timeout));
    }

    #[test]
    fn a_reply_after_a_timeout_never_answers_the_next_command() {
        let (tx, rx) = channel::<Tagged<&str>>();
        // Command 1 times out; its reply only comes afterwards.
        assert_eq!(await_reply(&rx, 1, SHORT), Err(WaitError::Timeout));
        tx.send((1, "paused")).unwrap();
        // Command 2 must not take it: it times out too...
        assert_eq!(await_reply(&rx, 2, SHORT), Err(WaitError::Timeout));
        // ...and takes its own reply when that comes.
        tx.send((1, "paused again")).unwrap();
        tx.send((2, "resumed")).unwrap();
        assert_eq!(await_reply(&rx, 2, SHORT), Ok("resumed"));
    }

    #[test]
    fn stale_replies_do_not_extend_the_wait_forever() {
        let (tx, rx) = channel();
        let feeder = std::thread::spawn(move || {
            for _ in 0..40 {
                if tx.send((1, "stale")).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let t = Instant::now();
        assert_eq!(await_reply(&rx, 2, SHORT), Err(WaitError::Timeout));
        assert!(t.elapsed() < SHORT * 4, "waited {:?}", t.elapsed());
        drop(rx);
        feeder.join().unwrap();
    }

    #[test]
    fn a_gone_thread_is_reported() {
        let (tx, rx) = channel::<Tagged<&str>>();
        tx.send((1, "stale")).unwrap();
        drop(tx);
        assert_eq!(await_reply(&rx, 2, SHORT), Err(WaitError::Disconnected));
    }
}
