//! `ferry-dest`: receives a VM, from a migrating `ferry-source` (`--listen`)
//! or from a snapshot file (`--restore`), then runs it as an ordinary VM
//! that can be moved again.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_engine::controller::ServeContext;
use ferry_engine::memory::Backing;
use ferry_engine::migration::progress::Progress;
use ferry_engine::{api, controller, migration, snapshot};
use ferry_tools::hooks::{HookArgs, Shape};
use ferry_tools::{
    archive, console_output, daemon, init_tracing, monitor, parse_size, templates, LinkArgs,
    TlsArgs, VmIoArgs,
};
use tracing::{error, info, warn};

/// Receive a VM from a migrating ferry-source or restore it from a snapshot
/// file, then run it
#[derive(Parser, Debug)]
#[command(version, long_about = None)]
struct Args {
    /// Wait for one incoming migration on this address (e.g. 127.0.0.1:7000;
    /// port 0 picks a free port, see --listen-addr-file).
    #[arg(
        long,
        conflicts_with = "snapshot_file",
        required_unless_present = "snapshot_file"
    )]
    listen: Option<String>,
    /// With --listen: once listening, write the bound address (e.g.
    /// 127.0.0.1:43210) to this file, atomically (a temporary file renamed
    /// into place), so a script can wait for it instead of guessing a port.
    #[arg(long, requires = "listen", conflicts_with = "restore")]
    listen_addr_file: Option<PathBuf>,
    /// Allow --listen without TLS on an address other than loopback.
    /// Migration traffic is then unauthenticated and unencrypted: anyone
    /// who reaches the port can hand this host a VM, and anyone on the path
    /// can read guest memory. Use only on a network you trust. With
    /// --tls-* any address may be used without it.
    #[arg(long, requires = "listen")]
    insecure: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// With --tls-*: a source's certificate must name NAME (a DNS name or
    /// IP address among its subject alternative names) to send a VM here.
    /// Repeatable; without it any certificate signed by --tls-ca may.
    #[arg(long = "tls-allow", value_name = "NAME", requires = "tls_cert")]
    tls_allow: Vec<String>,
    /// With --listen: take one migration after another, each VM in a
    /// `ferry-dest` process of its own (started with this binary's link,
    /// hook and seccomp flags), listed in --run-dir with its API socket.
    /// Sources are sent to their VM's process with a `Redirect`.
    #[arg(long, requires_all = ["listen", "run_dir"], conflicts_with_all = ["api", "serial", "stats_json"])]
    daemon: bool,
    /// With --daemon: the directory (created mode 0700) where each VM
    /// process has its API socket `vm-ID.sock` (mode 0600), its record
    /// `vm-ID.json` (pid, port, files) while it runs, its console
    /// `vm-ID.serial`, its log `vm-ID.log` and its statistics.
    #[arg(long, requires = "daemon")]
    run_dir: Option<PathBuf>,
    /// With --daemon: VM processes at most; later sessions are refused.
    #[arg(long, requires = "daemon", default_value_t = 16)]
    max_vms: usize,
    /// With --listen: give up when no migration has begun within this
    /// long (default: wait for ever; a --daemon's VM processes wait 30s).
    #[arg(long, requires = "listen", value_parser = ferry_tools::parse_duration)]
    accept_timeout: Option<std::time::Duration>,
    /// How the demand-fault thread asks to be scheduled, so a fault's
    /// answer is installed at once even while the push keeps the core busy:
    /// auto (real-time `SCHED_FIFO` 1 if permitted, else a 0.1 ms time
    /// slice), realtime, slice or normal.
    #[arg(long, default_value = "auto", env = "FERRY_FAULT_PRIORITY")]
    fault_priority: ferry_engine::sched::FaultPriority,
    /// Back the incoming VM's RAM with 2 MiB pages from the huge page pool
    /// (/proc/sys/vm/nr_hugepages; the VM's memory size must be a multiple
    /// of 2 MiB): post-copy then installs a whole 2 MiB page at a time.
    /// Post-copy, pre-copy and stop-and-copy moves (not hybrid), and lazy
    /// restores (--restore or --import with --lazy; a replay list then
    /// loads the whole huge pages it touches).
    #[arg(long)]
    huge_pages: bool,
    /// With --listen: make the incoming VM's RAM now, SIZE bytes, and
    /// allocate every page of it, so that a move of a VM of that size does
    /// not allocate and zero pages inside its post-copy phase, where it
    /// then writes each page in place (QEMU's -m with -mem-prealloc on
    /// the incoming side). A VM of another size, or a hybrid move, gets RAM
    /// made for it during its move, as without.
    /// `hello`: when the move's Hello arrives, allocate the RAM it asks
    /// for before answering it, while the source still runs the VM (and
    /// waits, kept from its peer timeout by Pings); for a destination that
    /// does not know the size in advance. RAM that the host's available
    /// memory or huge page pool cannot hold is not allocated ahead.
    /// With --daemon, `session`: each VM process allocates the RAM its
    /// session's Hello asks for before it listens, while the source still
    /// runs the VM; by the rule of `hello`, RAM the host has no room for
    /// is not allocated ahead.
    #[arg(long, value_name = "SIZE|hello|session", value_parser = parse_prealloc)]
    prealloc: Option<Prealloc>,
    /// Restore this snapshot file (eagerly: all memory is loaded first,
    /// unless --lazy).
    #[arg(long, group = "snapshot_file")]
    restore: Option<PathBuf>,
    /// Import a VM archive written by `ferry-ctl export` (its descriptor,
    /// member names, sizes and SHA-256 sums are checked before any VM is
    /// built), then restore it as --restore would (eagerly, or --lazy).
    #[arg(long, group = "snapshot_file")]
    import: Option<PathBuf>,
    /// Start a clone of template NAME: --restore TEMPLATE_DIR/NAME.snap.
    #[arg(long, group = "snapshot_file")]
    from_template: Option<String>,
    /// With --from-template. Default: $FERRY_TEMPLATE_DIR, else
    /// /var/lib/ferry/templates.
    #[arg(long, requires = "from_template")]
    template_dir: Option<PathBuf>,
    /// With --restore, --import or --from-template: run the VM at once and
    /// load its memory afterwards, on demand and in the background
    /// (post-copy from the file). The page data's checksum is verified once
    /// all of it is loaded.
    #[arg(long, requires = "snapshot_file")]
    lazy: bool,
    /// With --lazy: `auto` loads the pages that a recording restore of the
    /// snapshot listed (SNAPSHOT.replay) before the vCPUs run, if there is
    /// such a list; `record` writes that list (this restore is slower: the
    /// background push waits while the guest's faults reveal its working
    /// set); `off` neither reads nor writes one.
    #[arg(long, requires = "lazy", default_value = "auto", value_parser = parse_replay)]
    replay: snapshot::Replay,
    /// With --listen or --restore --lazy: write the migration statistics
    /// (JSON) here.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Leave the restored VM paused until the API resumes it (eager restore
    /// only).
    #[arg(long, conflicts_with = "lazy")]
    paused: bool,
    #[command(flatten)]
    io: VmIoArgs,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    hook: HookArgs,
}

/// `--prealloc`: RAM of one size now, of the size a move's Hello asks for
/// when it comes, or (with --daemon) of each session's size in its VM
/// process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Size(u64),
    Hello,
    Session,
}

fn parse_prealloc(s: &str) -> Result<Prealloc, String> {
    match s {
        "session" => Ok(Prealloc::Session),
        "hello" => Ok(Prealloc::Hello),
        size => parse_size(size)
            .map(Prealloc::Size)
            .map_err(|e| format!("{e} (or `hello`, or `session` with --daemon)")),
    }
}

/// What the incoming VM's RAM is made of (`--huge-pages`).
fn backing_of(args: &Args) -> Backing {
    Backing::of_huge_pages(args.huge_pages)
}

/// `--prealloc` fits the way this process takes moves: SIZE or `hello`
/// without --daemon, `session` with it.
fn check_prealloc(prealloc: Option<Prealloc>, daemon: bool) -> Result<(), String> {
    match (prealloc, daemon) {
        (Some(Prealloc::Size(_) | Prealloc::Hello), true) => Err("--prealloc SIZE and \
             --prealloc hello are for a destination that takes one move; a --daemon's VM \
             processes take theirs with --prealloc session"
            .into()),
        (Some(Prealloc::Session), false) => Err("--prealloc session needs --daemon: \
             only a daemon knows a session's size before its VM process listens"
            .into()),
        _ => Ok(()),
    }
}

fn parse_replay(s: &str) -> Result<snapshot::Replay, String> {
    match s {
        "auto" => Ok(snapshot::Replay::Auto),
        "record" => Ok(snapshot::Replay::Record),
        "off" => Ok(snapshot::Replay::Off),
        other => Err(format!("{other:?} is not auto, record or off")),
    }
}

fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    args.io.apply_seccomp();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("ferry-dest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(name) = &args.from_template {
        let dir = templates::resolve_dir(args.template_dir.as_deref());
        let path = templates::path_of(&dir, name)?;
        check_clone_disks(&path, args.io.disk.len())?;
        args.restore = Some(path);
    }
    check_prealloc(args.prealloc, args.daemon)?;
    if let Some(p) = &args.stats_json {
        // Refused now: once a VM runs here, nothing may fail on it.
        controller::check_stats_path(p)?;
    }
    let hooks = args.hook.hooks(args.stats_json.as_deref());
    let shape = |vm: &ferry_engine::Vm| Shape {
        mem: vm.meta().mem_size,
        vcpus: vm.meta().vcpus,
    };
    // The move's vCPU count is not known yet: at most the engine's.
    let (console, monitor) = monitor::watch(
        console_output(args.io.serial.as_deref()),
        ferry_engine::layout::MAX_VCPUS,
    );
    let guest = || monitor::status_json(&monitor);
    // The listener outlives the move: a stranded move can be recovered on
    // it later (`ferry-ctl recover`).
    let tls = match args.tls.files() {
        Some(files) => Some(ferry_transport::ServerTls::load(
            &files,
            args.tls_allow.clone(),
        )?),
        None => None,
    };
    // Guest RAM made and allocated ahead, for a move of its size; before
    // the port opens, so that no move waits for it.
    let ram_ahead = match (args.prealloc, &args.listen) {
        (Some(Prealloc::Size(size)), Some(_)) => {
            let (ahead, took) = migration::ram_ahead::RamAhead::make(size, backing_of(&args))
                .map_err(|e| format!("--prealloc {size}: {e}"))?;
            info!(
                mib = size >> 20,
                ms = took.as_millis() as u64,
                "guest RAM allocated ahead"
            );
            ahead
        }
        _ => Default::default(),
    };
    let listener = args
        .listen
        .as_deref()
        .map(|a| listen(a, args.insecure, tls.as_ref()))
        .transpose()?;
    if let (Some(listener), Some(p)) = (&listener, &args.listen_addr_file) {
        let bound = listener.local_addr()?;
        ferry_engine::os::write_atomically(p, bound.to_string().as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    if let (Some(listener), true) = (&listener, args.daemon) {
        daemon::run(listener, &daemon_config(&args, tls.clone())?)?;
        return Ok(());
    }
    // The socket goes when `_api_socket` drops (if it is still ours).
    let (api_rx, _api_socket) = args.io.api.as_deref().map(api::serve).transpose()?.unzip();
    let progress = std::sync::Arc::new(Progress::default());
    let disks = args.io.disks()?;
    let nets = args.io.nets()?;
    let opts = migration::DestOptions {
        disk_overrides: disks.clone(),
        net_overrides: nets.clone(),
        peer_timeout: args.link.peer_timeout,
        recovery_window: args.link.recovery_window,
        progress: Some(progress.clone()),
        tls: tls.clone(),
        accept_timeout: args.accept_timeout,
        expect_session: expected_session()?,
        fault_priority: args.fault_priority,
        // A network move has no local page source to load from.
        preload: None,
        backing: backing_of(&args),
        fault_buffers: Default::default(),
        ram_ahead,
        allocate_on_hello: args.prealloc == Some(Prealloc::Hello),
    };
    // The first demand answers' buffers, made now rather than inside the
    // pause of a move. Only a process that waits for a move uses them (a
    // restore, lazy or not, makes its own move in process).
    if listener.is_some() {
        opts.fault_buffers.fill();
    }
    let mut ctx = ServeContext {
        guest: Some(&guest),
        ..Default::default()
    };
    // An archive is checked and unpacked first; its snapshot is then
    // restored like --restore's (and removed once the VM no longer needs it).
    let unpacked = args
        .import
        .as_deref()
        .map(|f| archive::unpack(f, &std::env::temp_dir()))
        .transpose()?;
    if let Some(u) = &unpacked {
        info!(vm = ?u.descriptor.vm, "archive verified");
        check_archive_devices(&u.snapshot(), args.io.disk.len(), args.io.net.len())?;
    }
    let restore = unpacked
        .as_ref()
        .map(|u| u.snapshot())
        .or(args.restore.clone());
    let mut vm = if let Some(listener) = &listener {
        ctx.migration = Some(progress.clone());
        let watch = hooks.watch_resumed(progress.clone());
        let received = controller::answer_while(api_rx.as_ref(), ctx.guest, &progress, || {
            migration::receive(listener, console, &opts)
        });
        let received = match received {
            Ok(r) => r,
            Err(e) => {
                watch.finish(&hooks, false, None);
                return Err(e.into());
            }
        };
        if let Some(stats) = &received.stats {
            // Best effort: the VM runs here now, whatever fails to print.
            controller::report_stats(stats, args.stats_json.as_deref());
        }
        let done = received.stats.is_some() && received.failure.is_none();
        watch.finish(&hooks, done, Some(shape(&received.vm)));
        if let Some(e) = &received.failure {
            eprintln!("ferry-dest: {e}; the VM is kept here, paused");
            ctx.hold = Some(format!("the move did not complete: {e}"));
        }
        if let Some(mut mv) = received.resume {
            let (window, stats_json) = (args.link.recovery_window, args.stats_json.clone());
            ctx.recover_hook = Some(Box::new(move |vm| {
                let stats = mv.recover(vm, window).map_err(|e| e.to_string())?;
                controller::report_stats(&stats, stats_json.as_deref());
                Ok(stats)
            }));
        }
        received.vm
    } else if let Some(path) = restore.as_ref().filter(|_| args.lazy) {
        let (vm, stats) = snapshot::restore_lazy_with_devices(
            path,
            console,
            args.replay,
            &disks,
            &nets,
            opts.backing,
        )?;
        info!(path = %path.display(), "snapshot restored lazily");
        controller::report_stats(&stats, args.stats_json.as_deref());
        // The engine publishes no stage for a lazy restore: both hooks run
        // once all memory is loaded.
        hooks.fire_both(shape(&vm));
        vm
    } else if let Some(path) = &restore {
        if args.huge_pages {
            return Err("--huge-pages restores a snapshot lazily only: add --lazy".into());
        }
        let (mut vm, stats) = snapshot::restore_with_devices(path, console, &disks, &nets)?;
        info!(
            path = %path.display(),
            millis = stats.millis,
            pages_stored = stats.pages_stored,
            "snapshot restored"
        );
        if !args.paused {
            vm.resume()?;
            hooks.fire_both(shape(&vm));
        }
        vm
    } else {
        return Err("give --listen ADDR, --restore FILE or --import FILE".into());
    };
    // Eager restore copied every page, and lazy restore returns once every
    // page is present: the unpacked snapshot is no longer needed.
    drop(unpacked);
    controller::serve(&mut vm, api_rx.as_ref(), args.io.run_for, &mut ctx);
    Ok(())
}

/// Clones of a template are many VMs from one state: a writable disk of
/// the template needs a `--disk` per clone (its own copy), or the clones
/// would all write one file.
fn check_clone_disks(template: &std::path::Path, given: usize) -> Result<(), String> {
    let snap = ferry_engine::snapshot::Snapshot::open(template).map_err(|e| e.to_string())?;
    let writable = unreplaced(&snap, given, usize::MAX)
        .into_iter()
        .filter(|d| d.writable)
        .count();
    if writable == 0 {
        return Ok(());
    }
    Err(format!(
        "the template has a writable disk ({writable} of them without --disk); give each clone \
         its own copy with --disk PATH, or clones would share one file"
    ))
}

/// A device of a saved VM that no `--disk`/`--net` replaces: it would be
/// opened where the saved state says.
struct Unreplaced {
    what: String,
    writable: bool,
}

/// The devices of `snap` beyond the first `disks` disks and `nets` cards
/// (those the command line replaces, in order).
fn unreplaced(
    snap: &ferry_engine::snapshot::Snapshot,
    disks: usize,
    nets: usize,
) -> Vec<Unreplaced> {
    use ferry_engine::state::VirtioBackendConfig;
    let (mut nth_disk, mut nth_net) = (0, 0);
    let mut out = Vec::new();
    for d in &snap.state.devices.virtio {
        match &d.backend {
            VirtioBackendConfig::Blk(c) => {
                if nth_disk >= disks {
                    out.push(Unreplaced {
                        what: format!("disk {}", c.path.display()),
                        writable: !c.readonly,
                    });
                }
                nth_disk += 1;
            }
            VirtioBackendConfig::Net(c) => {
                if nth_net >= nets {
                    out.push(Unreplaced {
                        what: format!("tap {}", c.tap),
                        writable: true,
                    });
                }
                nth_net += 1;
            }
        }
    }
    out
}

/// An archive comes from elsewhere, and its checksums are its author's: the
/// disk paths and tap names its VM's state names are that author's word,
/// not this host's. Each must be replaced on the command line (`--disk`,
/// `--net`, in order), as a QEMU destination names its own devices.
fn check_archive_devices(
    snapshot: &std::path::Path,
    disks: usize,
    nets: usize,
) -> Result<(), String> {
    let snap = ferry_engine::snapshot::Snapshot::open(snapshot).map_err(|e| e.to_string())?;
    let named: Vec<String> = unreplaced(&snap, disks, nets)
        .into_iter()
        .map(|d| d.what)
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the archive's VM names devices of the host it came from ({}): an archive is not \
         trusted to choose this host's files and interfaces; give each its --disk or --net here",
        named.join(", ")
    ))
}

/// The session a `--daemon` started this process for, from its
/// environment (never the command line, which any local user can read).
fn expected_session() -> Result<Option<u64>, String> {
    match std::env::var(daemon::EXPECT_SESSION_ENV) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{} is not a session id: {v:?}", daemon::EXPECT_SESSION_ENV)),
        Err(_) => Ok(None),
    }
}

/// What a `--daemon` gives each VM process: this binary, and the flags of
/// this process that a VM process shares (the TLS flags belong here too).
fn daemon_config(
    args: &Args,
    tls: Option<ferry_transport::ServerTls>,
) -> Result<daemon::DaemonConfig, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    let mut fwd: Vec<std::ffi::OsString> = vec![
        "--peer-timeout".into(),
        ms(args.link.peer_timeout).into(),
        "--recovery-window".into(),
        ms(args.link.recovery_window).into(),
        "--fault-priority".into(),
        args.fault_priority.to_string().into(),
    ];
    if args.huge_pages {
        fwd.push("--huge-pages".into());
    }
    if args.insecure {
        fwd.push("--insecure".into());
    }
    if args.io.no_seccomp {
        fwd.push("--no-seccomp".into());
    }
    if let Some(files) = args.tls.files() {
        fwd.extend([
            "--tls-cert".into(),
            files.cert.into(),
            "--tls-key".into(),
            files.key.into(),
            "--tls-ca".into(),
            files.ca.into(),
        ]);
        for name in &args.tls_allow {
            fwd.extend(["--tls-allow".into(), name.into()]);
        }
    }
    if let Some(d) = args.io.run_for {
        fwd.extend(["--run-for".into(), ms(d).into()]);
    }
    for (flag, value) in [
        ("--on-resumed", &args.hook.on_resumed),
        ("--on-complete", &args.hook.on_complete),
    ] {
        if let Some(v) = value {
            fwd.extend([flag.into(), v.into()]);
        }
    }
    fwd.extend(["--hook-timeout".into(), ms(args.hook.hook_timeout).into()]);
    Ok(daemon::DaemonConfig {
        prealloc: (args.prealloc == Some(Prealloc::Session)).then_some(backing_of(args)),
        run_dir: args.run_dir.clone().ok_or("--daemon needs --run-dir")?,
        max_vms: args.max_vms,
        peer_timeout: args.link.peer_timeout,
        tls,
        exe,
        forwarded: fwd,
        accept_timeout: args
            .accept_timeout
            .unwrap_or(std::time::Duration::from_secs(30)),
    })
}

/// Binds the migration listener: any address with TLS; without it,
/// loopback only, unless `insecure`.
fn listen(
    addr: &str,
    insecure: bool,
    tls: Option<&ferry_transport::ServerTls>,
) -> Result<std::net::TcpListener, String> {
    use std::net::ToSocketAddrs;
    let resolved: Vec<std::net::SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --listen {addr}: {e}"))?
        .collect();
    match tls {
        Some(tls) if tls.allowed().is_empty() => warn!(
            "mutual TLS on {addr}: any source with a certificate signed by --tls-ca \
             may send a VM (no --tls-allow)"
        ),
        Some(tls) => info!(allowed = ?tls.allowed(), "mutual TLS on {addr}"),
        None => {
            if !insecure && resolved.iter().any(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "refusing to listen on {addr}: without --tls-cert/--tls-key/--tls-ca \
                     migration traffic is unauthenticated and unencrypted, so off \
                     loopback it needs --insecure"
                ));
            }
            warn!("migration traffic on {addr} is unauthenticated and unencrypted");
        }
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the address bound for {addr}: {e}"))?;
    info!(%bound, "waiting for an incoming migration");
    Ok(listener)
}
