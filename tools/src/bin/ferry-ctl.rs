//! `ferry-ctl`: a client for a VM's JSON control API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_engine::api::{self, ApiRequest};
use ferry_tools::archive;
use ferry_tools::bench::serial;
use ferry_tools::templates;

/// Send one command to a running Ferry VM's control API and print the JSON answer
#[derive(Parser, Debug)]
#[command(version, long_about = None)]
struct Args {
    /// The VM's API socket (for the commands that talk to a VM).
    #[arg(long)]
    api: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run state, machine shape and what the guest reported.
    Status,
    /// Stop the vCPUs.
    Pause,
    /// Continue the vCPUs.
    Resume,
    /// Write a snapshot of the paused VM.
    Snapshot {
        /// Destination file.
        path: PathBuf,
    },
    /// Migrate the VM to a `ferry-dest --listen` at TO.
    Migrate {
        /// Destination `host:port` (what `ferry-dest --listen-addr-file`
        /// wrote, when it listens on port 0).
        to: String,
        /// Also write the statistics (JSON) here.
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// postcopy (default), stop-and-copy, precopy or hybrid.
        #[arg(long)]
        mode: Option<ferry_protocol::MigrationMode>,
        /// Cap the background push, e.g. 200mbit or 25M (bytes/s); demand
        /// answers are never capped.
        #[arg(long, value_parser = ferry_page_server::pacer::parse_rate)]
        max_bandwidth: Option<std::num::NonZeroU64>,
        /// TCP congestion control for the move's connections, e.g. reno
        /// (default: the source's --tcp-congestion, else the system's).
        #[arg(long, value_name = "NAME")]
        tcp_congestion: Option<String>,
        /// Mutual TLS: the source's certificate (PEM), with --tls-key and
        /// --tls-ca.
        #[arg(long, requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// Mutual TLS: its private key (PEM).
        #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
        tls_key: Option<PathBuf>,
        /// Mutual TLS: the CA that signed the destination (PEM).
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_ca: Option<PathBuf>,
        /// Mutual TLS: the name the destination's certificate must carry
        /// (default: the host part of TO).
        #[arg(long, requires = "tls_cert")]
        tls_server_name: Option<String>,
    },
    /// Write a CA and two peer certificates for tests and demos into DIR:
    /// ca.pem, dest.pem + dest.key (names dest, localhost, 127.0.0.1, ::1
    /// and each --san), source.pem + source.key (name source). Keys are
    /// mode 0600. No VM needed.
    GenCerts {
        /// Where to write them (created if missing; files are replaced).
        dir: PathBuf,
        /// Another name (DNS name or IP address) for the destination's
        /// certificate, e.g. its address on the migration network.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
    /// Try a stranded move again. On the source: reconnect to the
    /// destination, at ADDR if it moved. On the destination: wait for the
    /// source for another recovery window.
    Recover {
        /// The destination's new address (source side).
        addr: Option<String>,
    },
    /// Cancel the migration out in progress, before its switch-over
    /// commits: the VM goes on running here and the destination discards
    /// its copy. Refused once the switch-over has committed
    Cancel,
    /// Stop the VM and its process.
    Quit,
    /// Export the VM as one archive file (a tar with a descriptor and its
    /// snapshot): pauses it if it runs and leaves it paused (quit it for a
    /// cold move; resume it to keep it, and the archive is then a copy).
    Export {
        /// The archive to write.
        file: PathBuf,
    },
    /// Make template NAME from the VM: pause it if it runs, snapshot it
    /// into DIR/NAME.snap (read-only), resume it.
    Template {
        /// The template's name (no '/' or '..').
        name: String,
        /// Default: $FERRY_TEMPLATE_DIR, else /var/lib/ferry/templates.
        #[arg(long)]
        template_dir: Option<PathBuf>,
    },
    /// List the templates (JSON: name, path, size, mtime); no VM needed.
    Templates {
        /// Default: $FERRY_TEMPLATE_DIR, else /var/lib/ferry/templates.
        #[arg(long)]
        template_dir: Option<PathBuf>,
    },
    /// List the VM processes of a `ferry-dest --daemon` (JSON: vm, pid,
    /// port, api socket, files, shape, start time); no VM needed.
    Vms {
        /// The daemon's --run-dir.
        run_dir: PathBuf,
    },
    /// What the workload guest saw across a move, from the two serial logs
    /// (no VM needed): the longest TICK gap, BAD lines, and the guest work
    /// lost until it is back at 90% of its rate (JSON).
    GuestReport {
        /// The source's `--serial` log.
        src_log: PathBuf,
        /// The destination's `--serial` log.
        dst_log: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let req = match args.cmd {
        Cmd::Status => ApiRequest::Status,
        Cmd::Pause => ApiRequest::Pause,
        Cmd::Resume => ApiRequest::Resume,
        Cmd::Snapshot { path } => ApiRequest::Snapshot {
            path: std::path::absolute(&path).unwrap_or(path),
        },
        Cmd::Migrate {
            to,
            stats_json,
            mode,
            max_bandwidth,
            tcp_congestion,
            tls_cert,
            tls_key,
            tls_ca,
            tls_server_name,
        } => {
            let abs = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
            ApiRequest::Migrate {
                to,
                mode,
                max_bandwidth: max_bandwidth.map(std::num::NonZeroU64::get),
                tcp_congestion,
                stats_json: abs(stats_json),
                tls_cert: abs(tls_cert),
                tls_key: abs(tls_key),
                tls_ca: abs(tls_ca),
                tls_server_name,
            }
        }
        Cmd::GenCerts { dir, san } => {
            return print_result(ferry_transport::certs::generate(&dir, &san).map(|g| {
                serde_json::json!({
                    "ca": g.ca,
                    "dest": { "cert": g.dest.0, "key": g.dest.1, "names": g.dest_names },
                    "source": {
                        "cert": g.source.0,
                        "key": g.source.1,
                        "names": [ferry_transport::certs::SOURCE_NAME],
                    },
                })
            }));
        }
        Cmd::Quit => ApiRequest::Quit,
        Cmd::Cancel => ApiRequest::Cancel,
        Cmd::Recover { addr } => ApiRequest::Recover { to: addr },
        Cmd::Export { file } => {
            let Some(sock) = args.api.as_deref() else {
                eprintln!("ferry-ctl: export needs --api SOCKET");
                return ExitCode::FAILURE;
            };
            return print_result(export(sock, &file).map_err(|e| format!("export: {e}")));
        }
        Cmd::Template { name, template_dir } => {
            let Some(sock) = args.api.as_deref() else {
                eprintln!("ferry-ctl: this command needs --api SOCKET");
                return ExitCode::FAILURE;
            };
            let dir = templates::resolve_dir(template_dir.as_deref());
            return print_result(templates::create(sock, &dir, &name));
        }
        Cmd::Vms { run_dir } => {
            return print_result(
                ferry_tools::daemon::list(&run_dir)
                    .map(serde_json::Value::from)
                    .map_err(|e| format!("{}: {e}", run_dir.display())),
            );
        }
        Cmd::Templates { template_dir } => {
            let dir = templates::resolve_dir(template_dir.as_deref());
            return print_result(templates::list(&dir));
        }
        Cmd::GuestReport { src_log, dst_log } => {
            let figures =
                serial::guest_figures(&serial::read_log(&src_log), &serial::read_log(&dst_log));
            println!(
                "{}",
                serde_json::to_string_pretty(&figures).unwrap_or_default()
            );
            return ExitCode::SUCCESS;
        }
    };
    let Some(sock) = args.api else {
        eprintln!("ferry-ctl: this command needs --api SOCKET");
        return ExitCode::FAILURE;
    };
    print_result(api::call(&sock, &req).map_err(|e| e.to_string()))
}

/// Pauses the VM behind `sock` (if it runs), snapshots it and writes the
/// archive `file`; the VM stays paused.
fn export(sock: &std::path::Path, file: &std::path::Path) -> Result<serde_json::Value, String> {
    let file = std::path::absolute(file).map_err(|e| e.to_string())?;
    let status = api::call(sock, &ApiRequest::Status).map_err(|e| e.to_string())?;
    if status["run_state"] == "running" {
        api::call(sock, &ApiRequest::Pause).map_err(|e| e.to_string())?;
    }
    let shape = |key: &str| {
        status[key]
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("the VM's status has no {key}: {status}"))
    };
    let vm = archive::VmConfig {
        mem_size: shape("mem_size")?,
        vcpus: u32::try_from(shape("vcpus")?).map_err(|e| format!("vcpus: {e}"))?,
        devices: Vec::new(),
    };
    // The snapshot goes beside the archive under a name of its own (never a
    // file the user has), and is removed once the archive holds it.
    let mut snap = file.as_os_str().to_owned();
    let tag = ferry_engine::os::random_u64().map_err(|e| e.to_string())?;
    snap.push(format!(".{tag:016x}.snap"));
    let snap = PathBuf::from(snap);
    api::call(sock, &ApiRequest::Snapshot { path: snap.clone() }).map_err(|e| e.to_string())?;
    let written = archive::write(&file, vm, &snap);
    let _ = std::fs::remove_file(&snap);
    let desc = written.map_err(|e| e.to_string())?;
    Ok(serde_json::json!({ "file": file, "descriptor": desc, "vm": "paused" }))
}

/// Prints a JSON answer, or the error on stderr.
fn print_result(r: Result<serde_json::Value, String>) -> ExitCode {
    match r {
        Ok(v) => {
            use std::io::Write as _;
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            // A closed standard output is an error to report, not a panic.
            match writeln!(std::io::stdout(), "{text}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry-ctl: cannot print the answer: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("ferry-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}
