//! `ferry-dest`: receives a VM. For now from a snapshot file (`--restore`);
//! later from a migrating `ferry-source`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_engine::{api, controller, snapshot};
use ferry_tools::{console_output, init_tracing, parse_duration};
use tracing::{error, info};

/// Restore a VM and serve its control API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Restore this snapshot file (eagerly: all memory is loaded first).
    #[arg(long)]
    restore: PathBuf,
    /// Leave the restored VM paused until the API resumes it.
    #[arg(long)]
    paused: bool,
    /// Where guest console lines go: a file, "-" for stdout, "none".
    #[arg(long)]
    serial: Option<String>,
    /// Unix socket for the JSON control API.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Stop after this long (e.g. 10s); default: until `quit`.
    #[arg(long, value_parser = parse_duration)]
    run_for: Option<std::time::Duration>,
}

fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("ferry-dest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (mut vm, stats) = snapshot::restore(&args.restore, console_output(args.serial.as_deref()))?;
    info!(
        path = %args.restore.display(),
        millis = stats.millis,
        pages_stored = stats.pages_stored,
        "snapshot restored"
    );
    let api_rx = args.api.as_deref().map(api::serve).transpose()?;
    if !args.paused {
        vm.resume()?;
    }
    controller::serve(&mut vm, api_rx, args.run_for);
    if let Some(p) = &args.api {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
