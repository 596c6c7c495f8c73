//! `ferry-source`: runs a VM (the built-in workload guest by default) with a
//! control API, and migrates it out (`--migrate-to`, or the API's `migrate`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ferry_engine::controller::{ServeContext, ServeEnd};
use ferry_engine::memory::Backing;
use ferry_engine::migration::record::SessionRecord;
use ferry_engine::migration::{self, SourceOptions};
use ferry_engine::{api, controller, PreparedVm};
use ferry_page_server::{FileSource, ServerConfig};
use ferry_protocol::MigrationMode;
use ferry_tools::{
    console_output, init_tracing, migration_progress_bar, monitor, parse_duration, parse_size,
    LinkArgs, TlsArgs, VmIoArgs,
};
use tracing::{error, info};

/// Run a VM (the built-in workload guest by default) with a control API,
/// and migrate it to a ferry-dest
#[derive(Parser, Debug)]
#[command(version, long_about = None)]
struct Args {
    /// Guest RAM, e.g. 256M, 1G, 4G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest command line, e.g. "ws=64M pattern=random write=50 report_ms=100".
    #[arg(long, default_value = "")]
    guest_args: String,
    /// A PVH ELF to boot instead of the built-in workload guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[command(flatten)]
    io: VmIoArgs,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// With --tls-*: the name the destination's certificate must carry
    /// (default: the host part of the destination's address).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    tls_server_name: Option<String>,
    /// Migrate the VM to a `ferry-dest --listen` at this address.
    #[arg(long)]
    migrate_to: Option<String>,
    /// How the memory moves: postcopy, stop-and-copy, precopy or hybrid.
    #[arg(long, default_value = "postcopy")]
    mode: MigrationMode,
    /// Move the VM's disks (--disk) with its memory instead of sharing
    /// them: their blocks go through the page server (pre-copy rounds
    /// with a dirty-block bitmap, or post-copy with reads on demand), and
    /// the destination writes them into the files its own --disk names.
    #[arg(long, conflicts_with = "resume")]
    migrate_disk: bool,
    /// Pre-copy: most rounds after the first full pass.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Pre-copy: stop iterating once the rest would take this long to copy.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    downtime_target: std::time::Duration,
    /// Hybrid: pre-copy rounds after the full pass before switching to post-copy.
    #[arg(long, default_value_t = 2)]
    hybrid_rounds: u32,
    /// With --migrate-to: run this long first (e.g. 3s).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    after: std::time::Duration,
    /// Cap the background push (pre-copy rounds and the post-copy push),
    /// e.g. 200mbit or 25M (bytes/s); demand answers are never capped.
    #[arg(long, value_parser = ferry_page_server::pacer::parse_rate)]
    max_bandwidth: Option<std::num::NonZeroU64>,
    /// TCP congestion control for the connections to the destination,
    /// e.g. reno or cubic (default: the system's,
    /// net.ipv4.tcp_congestion_control). The source sends the pages, so
    /// its choice is the one that counts; the statistics report the one
    /// used (source.tcp_congestion).
    #[arg(long, value_name = "NAME", value_parser = ferry_transport::congestion::parse_name)]
    tcp_congestion: Option<String>,
    /// Post-copy: log the guest's writes for this long before the pause
    /// (KVM's dirty log) and push those pages first, e.g. 200ms. 0 turns
    /// it off.
    #[arg(long, value_parser = parse_duration, default_value = "0s", env = "FERRY_HOT_WINDOW")]
    hot_window: std::time::Duration,
    /// Write the migration statistics (JSON) here.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Write the built-in guest ELF to this file and exit.
    #[arg(long)]
    write_guest: Option<PathBuf>,
    /// Keep guest RAM in this new file (on tmpfs such as /dev/shm, or
    /// hugetlbfs) instead of anonymous memory, with a session record
    /// beside it (FILE.session) once a move commits: if this process dies
    /// after the switch-over, `--resume FILE` finishes the move.
    #[arg(long, conflicts_with = "resume")]
    mem_file: Option<PathBuf>,
    /// Back guest RAM with 2 MiB pages from the huge page pool
    /// (/proc/sys/vm/nr_hugepages; --mem must be a multiple of 2 MiB).
    #[arg(long, conflicts_with_all = ["resume", "mem_file"])]
    huge_pages: bool,
    /// Finish the committed move of a source that died: serve the guest
    /// RAM it left in FILE (its --mem-file) to the destination named in
    /// FILE.session, then remove both files.
    #[arg(long)]
    resume: Option<PathBuf>,
}

fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    args.io.apply_seccomp();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            eprintln!("ferry-source: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut exit_code = ExitCode::SUCCESS;
    if let Some(path) = &args.write_guest {
        std::fs::write(path, ferry_guest::GUEST_ELF)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        info!(path = %path.display(), bytes = ferry_guest::GUEST_ELF.len(), "guest ELF written");
        return Ok(exit_code);
    }
    if let Some(mem_file) = &args.resume {
        return resume_crashed(&args, mem_file);
    }
    let elf = match &args.kernel {
        Some(p) => std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        None => ferry_guest::GUEST_ELF.to_vec(),
    };
    // The socket goes when `_api_socket` drops (if it is still ours).
    let (api_rx, _api_socket) = args.io.api.as_deref().map(api::serve).transpose()?.unzip();
    let (console, monitor) = monitor::watch(console_output(args.io.serial.as_deref()), args.vcpus);
    let guest = || monitor::status_json(&monitor);
    let disks = args.io.disks()?;
    let nets = args.io.nets()?;
    let mut vm = match &args.mem_file {
        Some(path) => PreparedVm::new_in_file(args.mem, args.vcpus, console, path)
            .map_err(|e| format!("guest RAM in {}: {e}", path.display()))?,
        None if args.huge_pages => {
            PreparedVm::new_backed(args.mem, args.vcpus, console, Backing::HugePages)?
        }
        None => PreparedVm::new(args.mem, args.vcpus, console)?,
    }
    .with_disks(disks)
    .with_nets(nets)
    .boot(&elf, &args.guest_args)?;
    vm.resume()?;
    info!(mem = args.mem, vcpus = args.vcpus, "VM running");
    let tls = client_tls(&args)?;
    let defaults = SourceOptions {
        mode: args.mode,
        max_rounds: args.max_rounds,
        downtime_target: args.downtime_target,
        hybrid_rounds: args.hybrid_rounds,
        recovery_window: args.link.recovery_window,
        session_record: args.mem_file.as_deref().map(SessionRecord::path_for),
        tls,
        migrate_disks: args.migrate_disk,
        hot_window: args.hot_window,
        tcp_congestion: args.tcp_congestion.clone(),
        server: ServerConfig {
            peer_timeout: args.link.peer_timeout,
            max_bandwidth: args.max_bandwidth,
            ..Default::default()
        },
        ..Default::default()
    };
    // The page server's buffers, made now rather than in the first
    // milliseconds of a move (a `migrate` request may ask for post-copy
    // whatever --mode says).
    defaults.spare_buffers.fill();
    let mut ctx = ServeContext {
        guest: Some(&guest),
        migrate_defaults: defaults.clone(),
        ..Default::default()
    };
    // Whether this process is done serving: the VM moved, or `quit`.
    let mut done = false;
    if let Some(to) = &args.migrate_to {
        let waited = controller::serve(&mut vm, api_rx.as_ref(), Some(args.after), &mut ctx);
        // A `migrate` request may move the VM, or a `quit` end the process,
        // before --after is up.
        done = waited != ServeEnd::TimeUp;
        if waited == ServeEnd::TimeUp {
            let bar = migration_progress_bar();
            let opts = SourceOptions {
                progress: bar.as_ref().map(|(p, _)| p.clone()),
                ..defaults
            };
            let result = controller::migrate_to(
                &mut vm,
                to,
                &opts,
                args.stats_json.as_deref(),
                api_rx.as_ref(),
                &mut ctx,
            );
            if let Some((p, thread)) = bar {
                p.finish();
                let _ = thread.join();
            }
            match result {
                Ok(_) => done = true,
                Err(e) => {
                    error!("{e}");
                    exit_code = ExitCode::from(3);
                    if ctx.hold.is_some() {
                        // Committed but not finished: the destination may
                        // run the VM, so it must not run here, and its
                        // memory must stay for a recovery.
                        eprintln!("ferry-source: {e}; the VM stays paused here with its memory");
                    } else if !vm.is_running() {
                        eprintln!("ferry-source: {e}; the VM stays paused here");
                    } else {
                        eprintln!("ferry-source: {e}; the VM keeps running here");
                    }
                }
            }
        }
    }
    if !done
        && controller::serve(&mut vm, api_rx.as_ref(), args.io.run_for, &mut ctx)
            == ServeEnd::Migrated
    {
        // A `migrate` or `recover` request finished a move.
        exit_code = ExitCode::SUCCESS;
    }
    if let Some(path) = &args.mem_file {
        if ctx.stranded.is_some() {
            // A committed move that did not finish: keep the memory and the
            // record for `--resume`.
            eprintln!(
                "ferry-source: guest RAM and session record kept in {} for --resume",
                path.display()
            );
        } else {
            let _ = std::fs::remove_file(SessionRecord::path_for(path));
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(exit_code)
}

/// The source's TLS settings from `--tls-*`, when given.
fn client_tls(args: &Args) -> Result<Option<ferry_transport::ClientTls>, String> {
    args.tls
        .files()
        .map(|f| ferry_transport::ClientTls::load(&f, args.tls_server_name.clone()))
        .transpose()
        .map_err(|e| e.to_string())
}

/// `--resume FILE`: finishes the committed move a dead source left behind.
fn resume_crashed(args: &Args, mem_file: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let record_path = SessionRecord::path_for(mem_file);
    let record = SessionRecord::read(&record_path)?;
    let file = std::fs::File::open(mem_file)
        .map_err(|e| format!("cannot open the memory file {}: {e}", mem_file.display()))?;
    let len = file.metadata()?.len();
    if len != record.mem_size {
        return Err(format!(
            "{} holds {len} bytes but the session moves {}",
            mem_file.display(),
            record.mem_size
        )
        .into());
    }
    let pages = FileSource::new(std::sync::Arc::new(file), len / 4096);
    let opts = SourceOptions {
        recovery_window: args.link.recovery_window,
        tls: client_tls(args)?,
        tcp_congestion: args.tcp_congestion.clone(),
        server: ServerConfig {
            peer_timeout: args.link.peer_timeout,
            max_bandwidth: args.max_bandwidth,
            ..Default::default()
        },
        ..Default::default()
    };
    info!(addr = %record.addr, session = record.session_id, "finishing the move of a source that died");
    if let Some(p) = &args.stats_json {
        controller::check_stats_path(p)?;
    }
    let outcome = migration::finish_after_crash(&record, &pages, &opts)?;
    controller::report_stats(&outcome.stats, args.stats_json.as_deref());
    std::fs::remove_file(&record_path)?;
    std::fs::remove_file(mem_file)?;
    info!("move finished; memory file and session record removed");
    Ok(ExitCode::SUCCESS)
}
