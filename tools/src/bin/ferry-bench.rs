//! `ferry-bench`: downtime and latency benchmarks of Ferry's migration
//! modes, with QEMU as a peer. See `ferry_tools::bench`.

use std::process::ExitCode;

use clap::Parser;
use ferry_tools::bench::{cli::Args, runner};
use ferry_tools::init_tracing;

fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    if let Some(dir) = &args.replot {
        return match runner::replot(dir) {
            Ok(report) => {
                println!("{}", report.markdown);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let bin_dir = match std::env::current_exe() {
        Ok(p) => p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
        Err(e) => {
            eprintln!("ferry-bench: cannot find its own path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = match args.config(&bin_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if args.restore {
        return match runner::run_restore(&cfg) {
            Ok(md) => {
                println!("{md}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runner::run(&cfg) {
        Ok(report) => {
            println!("{}", report.markdown);
            println!(
                "{} runs, {} failed; results in {}",
                report.runs,
                report.failed,
                report.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
