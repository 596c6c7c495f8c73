//! Runs the matrix run by run (failures are recorded, not fatal), keeps
//! `results.json` up to date, then writes `results.md` and the plots.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_engine::memory::Backing;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, warn};

use super::cli::Config;
use super::ferry;
use super::goals;
use super::markdown::{self, MarkdownError};
use super::matrix::{MatrixError, Peer, RunSpec};
use super::netns::{Net, NetError};
use super::plots::{self, PlotError};
use super::qemu::{self, QemuTools};
use super::record::{self, RecordError, RunRecord};
use super::restore;
use super::serial::{guest_figures, read_log};
use super::tls_cost;
use super::wire::{self, WireFigure};

/// Errors that stop the whole benchmark (a failed run does not).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The huge page pool could not be warmed (`--huge-pages`).
    #[error("huge page pool: {0}")]
    HugePool(String),
    /// The matrix is empty.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The namespaces could not be made.
    #[error(transparent)]
    Net(#[from] NetError),
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// results.json could not be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The table could not be made.
    #[error(transparent)]
    Markdown(#[from] MarkdownError),
    /// A plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The TLS runs' certificates could not be made.
    #[error("certificates for --tls: {0}")]
    Certs(String),
    /// A run's control socket would have a path longer than a Unix
    /// socket's address can hold.
    #[error(
        "--out is too long: a run's socket would be {path} ({len} bytes), over the \
         {SOCKET_PATH_MAX} a Unix socket path may have; choose a shorter --out"
    )]
    OutTooLong {
        /// The socket path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// Longest path a Unix socket may have (`sun_path`, less its final zero).
const SOCKET_PATH_MAX: usize = 107;
/// The longest name of a socket in a run directory (`dst.sock`, `src.sock`,
/// QEMU's `dst.qmp`, `src.qmp`).
const LONGEST_SOCKET_NAME: &str = "dst.sock";

/// A run's directory, relative to the output directory.
fn run_rel(i: usize, label: &str) -> String {
    format!("runs/{i:03}-{label}")
}

/// Checks, before anything runs, that every run's sockets under `out`
/// (absolute) fit in a Unix socket address: else every run would fail
/// at its start.
fn check_socket_paths(out: &Path, labels: impl Iterator<Item = String>) -> Result<(), RunnerError> {
    for (i, label) in labels.enumerate() {
        let p = out.join(run_rel(i, &label)).join(LONGEST_SOCKET_NAME);
        let len = p.as_os_str().len();
        if len > SOCKET_PATH_MAX {
            return Err(RunnerError::OutTooLong {
                path: p.display().to_string(),
                len,
            });
        }
    }
    Ok(())
}

/// What a benchmark produced.
#[derive(Debug)]
pub struct Report {
    /// The output directory.
    pub out: PathBuf,
    /// The Markdown table.
    pub markdown: String,
    /// Runs done / failed.
    pub runs: usize,
    /// Runs that failed.
    pub failed: usize,
}

/// `YYYYMMDDTHHMMSSZ` for a time in seconds since the epoch (UTC).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn write(path: &Path, text: &str) -> Result<(), RunnerError> {
    std::fs::write(path, text).map_err(|source| RunnerError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), RunnerError> {
    std::fs::create_dir_all(path).map_err(|source| RunnerError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Writes the guest ELF for QEMU with `ferry-source --write-guest`.
fn write_guest(cfg: &Config, path: &Path) -> Result<(), String> {
    let out = std::process::Command::new(&cfg.ferry.source)
        .arg("--write-guest")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run ferry-source --write-guest: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ferry-source --write-guest failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The output directory: `cfg.out`, or `results/<UTC timestamp>`.
fn out_dir(cfg: &Config) -> PathBuf {
    cfg.out.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("results").join(utc_stamp(secs))
    })
}

/// Runs `--restore` (see [`restore`]) into the output directory.
pub fn run_restore(cfg: &Config) -> Result<String, Box<dyn std::error::Error>> {
    let out = out_dir(cfg);
    mkdir(&out)?;
    if cfg.ferry.huge_pages {
        let (pages, took) = super::hugepool::warm().map_err(RunnerError::HugePool)?;
        info!(pages, ms = took.as_millis() as u64, "huge page pool warmed");
    }
    let out = std::fs::canonicalize(&out)?;
    Ok(restore::run(cfg, &out)?)
}

/// Runs the benchmark.
pub fn run(cfg: &Config) -> Result<Report, RunnerError> {
    let mut qemu_tools = None;
    let out = out_dir(cfg);
    mkdir(&out.join("runs"))?;
    if cfg.ferry.huge_pages {
        let (pages, took) = super::hugepool::warm().map_err(RunnerError::HugePool)?;
        info!(pages, ms = took.as_millis() as u64, "huge page pool warmed");
    }
    if let Some(q) = &cfg.qemu {
        let guest = std::fs::canonicalize(&out)
            .unwrap_or_else(|_| out.clone())
            .join("guest.elf");
        match write_guest(cfg, &guest) {
            Ok(()) => {
                qemu_tools = Some(QemuTools {
                    qemu: q.clone(),
                    guest,
                    downtime_limit_ms: cfg.qemu_downtime_ms,
                    max_rounds: u64::from(cfg.ferry.max_rounds.unwrap_or(30)),
                    huge_pages: cfg.ferry.huge_pages,
                })
            }
            Err(e) => warn!("no QEMU rows: {e}"),
        }
    } else {
        info!("no QEMU rows (qemu-system-x86_64 not found or --no-qemu)");
    }
    let runs = cfg.matrix.runs(qemu_tools.is_some(), cfg.tls)?;
    let net = if cfg.netns {
        Net::namespaces(cfg.link_rate.as_deref())?
    } else {
        Net::loopback()
    };
    let out_abs = std::fs::canonicalize(&out).unwrap_or_else(|_| out.clone());
    check_socket_paths(&out_abs, runs.iter().map(|r| r.label()))?;
    let mut with_certs;
    let cfg = if cfg.tls {
        // A CA and both peers' certificates, for this run only.
        let dir = out_abs.join("certs");
        ferry_transport::certs::generate(&dir, &[net.dest_ip().to_string()])
            .map_err(RunnerError::Certs)?;
        with_certs = cfg.clone();
        with_certs.ferry.tls_certs = Some(dir);
        &with_certs
    } else {
        cfg
    };
    info!(runs = runs.len(), out = %out.display(), net = %net.describe(), "starting");
    let pinned = cfg.matrix.pin.contains(&true);
    let congestion = cfg.ferry.tcp_congestion.as_deref();
    let backing = Backing::of_huge_pages(cfg.ferry.huge_pages);
    let wire = match wire::measure(&net, pinned, congestion, backing) {
        Ok(w) => {
            info!(
                gb_per_s = format!("{:.2}", w.bytes_per_s / 1e9),
                "the wire's bulk TCP rate"
            );
            let text = serde_json::to_string_pretty(&w).unwrap_or_default();
            write(&out.join("wire.json"), &text)?;
            Some(w)
        }
        Err(e) => {
            warn!("the wire was not measured: {e}");
            None
        }
    };
    let bar = ProgressBar::new(runs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut records: Vec<RunRecord> = Vec::new();
    for (i, spec) in runs.iter().enumerate() {
        bar.set_message(spec.label());
        let rel = run_rel(i, &spec.label());
        let dir = out_abs.join(&rel);
        let host_before = super::host::HostCounters::read();
        let mut rec = match mkdir(&dir) {
            Ok(()) => run_one(cfg, spec, &net, qemu_tools.as_ref(), i, &dir, &rel),
            Err(e) => {
                let mut r = RunRecord::new(spec, &net.describe(), &rel);
                r.error = Some(e.to_string());
                r
            }
        };
        rec.stats
            .extend(super::host::HostCounters::read().since(&host_before));
        let line = match &rec.error {
            None => format!(
                "{}: downtime {} ms, stall {} ms, lost {} ms, total {} ms",
                spec.label(),
                rec.num("downtime_us")
                    .map_or("—".into(), |v| format!("{:.2}", v / 1e3)),
                rec.num("guest_stall_ms")
                    .map_or("—".into(), |v| format!("{v:.1}")),
                rec.num("guest_lost_ms")
                    .map_or("—".into(), |v| format!("{v:.1}")),
                rec.num("total_ms")
                    .map_or("—".into(), |v| format!("{v:.0}")),
            ),
            Some(e) => format!(
                "{}: FAILED: {}",
                spec.label(),
                e.chars().take(200).collect::<String>()
            ),
        };
        if bar.is_hidden() {
            info!("{line}");
        } else {
            bar.println(line);
        }
        records.push(rec);
        record::save(&out.join("results.json"), &records)?;
        bar.inc(1);
        // Let the previous guests' memory go back to the host.
        std::thread::sleep(Duration::from_millis(300));
    }
    bar.finish_and_clear();
    drop(net);
    let title = format!(
        "ferry-bench results ({}, guest runs {} ms before the move, and ≥ 1.1 s after its \
         first TICK (its working set written){}{})",
        if cfg.netns {
            match &cfg.link_rate {
                Some(r) => format!("two network namespaces, {r} veth"),
                None => "two network namespaces".into(),
            }
        } else {
            "loopback".into()
        },
        cfg.after.as_millis(),
        if cfg.ferry.disk {
            "; Ferry VMs with a shared virtio-blk disk and the guest's disk workload \
             (device drain and state included in the downtime; QEMU rows without)"
        } else {
            ""
        },
        if cfg.ferry.huge_pages {
            "; guest RAM in 2 MiB huge pages on both sides of both peers (Ferry's \
             `--huge-pages`, QEMU's hugetlb memfd backend), from a pool warmed first"
        } else {
            ""
        }
    );
    render(&out, &out_abs, &records, wire.as_ref(), &title)
}

/// Writes `results.md` and the plots for `records`.
fn render(
    out: &Path,
    out_abs: &Path,
    records: &[RunRecord],
    wire: Option<&WireFigure>,
    title: &str,
) -> Result<Report, RunnerError> {
    let md = markdown::table(records, title)?
        + &goals::section(records, wire)
        + &tls_cost::section(records);
    let md_full = format!(
        "{md}\nPlots: `fault_cdf.svg`, `progress.svg`, `downtime_vs_mem.svg`, `stall_vs_mem.svg`, `lost_vs_ws.svg`. \
         Per-run logs and statistics are under `runs/`.\n"
    );
    write(&out.join("results.md"), &md_full)?;
    write_plots(out, out_abs, records)?;
    Ok(Report {
        out: out.to_path_buf(),
        markdown: md,
        runs: records.len(),
        failed: records.iter().filter(|r| !r.ok()).count(),
    })
}

/// Re-renders `results.md` and the plots of an earlier run from its
/// `results.json` (and the run logs under `runs/`), without running anything.
/// Guest figures that a record lacks (results from before ferry-bench
/// computed them, e.g. `guest_lost_ms`) are filled in from its logs.
pub fn replot(dir: &Path) -> Result<Report, RunnerError> {
    let mut records = record::load(&dir.join("results.json"))?;
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    for r in records.iter_mut().filter(|r| r.ok()) {
        // QEMU's figures are read again from its saved `query-migrate`, so
        // that what ferry-bench now knows about them applies here too.
        if r.peer == Peer::Qemu.as_str() {
            if let Some(qm) = r.stats.get("source").cloned() {
                r.stats
                    .insert("total_ms".into(), serde_json::json!(qemu::total_ms(&qm)));
            }
        }
        let run = abs.join(&r.run_dir);
        let (src, dst) = (
            read_log(&run.join("src.log")),
            read_log(&run.join("dst.log")),
        );
        if dst.ticks.is_empty() {
            continue;
        }
        for (k, v) in guest_figures(&src, &dst) {
            r.stats.entry(k).or_insert(v);
        }
    }
    let wire: Option<WireFigure> = std::fs::read_to_string(dir.join("wire.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    render(
        dir,
        &abs,
        &records,
        wire.as_ref(),
        "ferry-bench results (re-rendered from results.json)",
    )
}

fn run_one(
    cfg: &Config,
    spec: &RunSpec,
    net: &Net,
    qemu_tools: Option<&QemuTools>,
    index: usize,
    dir: &Path,
    rel: &str,
) -> RunRecord {
    let mut rec = RunRecord::new(spec, &net.describe(), rel);
    let outcome = match (spec.peer, qemu_tools) {
        (Peer::Ferry | Peer::FerryTls, _) => {
            ferry::run(&cfg.ferry, spec, net, index, dir, cfg.after, cfg.timeout)
                .map_err(|e| e.to_string())
        }
        (Peer::Qemu, Some(q)) => {
            qemu::run(q, spec, net, index, dir, cfg.after, cfg.timeout).map_err(|e| e.to_string())
        }
        (Peer::Qemu, None) => Err("QEMU is not available".to_string()),
    };
    match outcome {
        Ok(o) => {
            if let Err(e) = rec.set_stats(o.stats) {
                rec.error = Some(e.to_string());
            }
        }
        Err(e) => {
            warn!(run = %spec.label(), "{e}");
            rec.error = Some(e);
        }
    }
    rec
}

fn write_plots(out: &Path, out_abs: &Path, records: &[RunRecord]) -> Result<(), RunnerError> {
    write(&out.join("fault_cdf.svg"), &plots::cdf_svg(records)?)?;
    let progress: Vec<plots::Progress> = plots::representatives(records)
        .into_iter()
        .filter_map(|r| {
            let dir = out_abs.join(&r.run_dir);
            plots::progress(
                r,
                &read_log(&dir.join("src.log")),
                &read_log(&dir.join("dst.log")),
            )
        })
        .collect();
    write(&out.join("progress.svg"), &plots::progress_svg(&progress)?)?;
    let metrics = [
        (
            "downtime_vs_mem.svg",
            plots::Metric {
                path: "downtime_us",
                scale: 1e-3,
                title: "Downtime vs memory",
                ylabel: "downtime (ms, log scale)",
                by: plots::By::Mem,
                log_y: true,
            },
        ),
        (
            "stall_vs_mem.svg",
            plots::Metric {
                path: "guest_stall_ms",
                scale: 1.0,
                title: "Guest stall (max TICK gap) vs memory",
                ylabel: "guest stall (ms, log scale)",
                by: plots::By::Mem,
                log_y: true,
            },
        ),
        (
            "lost_vs_ws.svg",
            plots::Metric {
                path: "guest_lost_ms",
                scale: 1.0,
                title: "Guest work lost across the move vs working set",
                ylabel: "work lost (ms at the steady rate)",
                by: plots::By::Ws,
                log_y: false,
            },
        ),
    ];
    for (file, m) in &metrics {
        write(&out.join(file), &plots::metric_svg(records, m)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_796_028_175), "20261130T084255Z");
    }

    #[test]
    fn an_out_dir_whose_sockets_cannot_fit_is_refused_before_any_run() {
        let label = || "ferry-postcopy-2G-ws1536M-r0-v1-pin-4".to_string();
        let short = Path::new("/work/r");
        assert!(check_socket_paths(short, std::iter::repeat_with(label).take(80)).is_ok());
        // The path that made every Ferry run of a matrix fail at its start.
        let long = Path::new("/work/main/docs/results/goals-huge-2026-12-03-system-reno");
        let e = check_socket_paths(long, std::iter::repeat_with(label).take(80))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--out is too long")
                && e.contains("000-ferry-postcopy")
                && e.contains("dst.sock"),
            "{e}"
        );
    }

    /// `--replot` reads QEMU's totals again from the saved `query-migrate`:
    /// a run recorded with QEMU's `total-time` of 0 drops out of the
    /// QEMU column instead of passing for its fastest run.
    #[test]
    fn replot_drops_a_zero_qemu_total_recorded_before() {
        use super::super::matrix::{test_spec, Mode};
        let dir = std::env::temp_dir().join(format!("ferry-bench-replot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let qemu_run = |repeat: u32, total: u64| {
            let spec = test_spec(Peer::Qemu, Mode::Postcopy, 2 << 30, repeat);
            let mut r = RunRecord::new(&spec, "loopback", &format!("runs/{repeat}"));
            let qm = serde_json::json!({"status": "completed", "total-time": total, "ram": {}});
            // As ferry-bench recorded it before: `total_ms` straight from QEMU.
            let mut stats = qemu::stats_of(&spec, &qm);
            stats["total_ms"] = serde_json::json!(total);
            r.set_stats(stats).unwrap();
            r
        };
        let records = vec![qemu_run(0, 0), qemu_run(1, 900), qemu_run(2, 1100)];
        record::save(&dir.join("results.json"), &records).unwrap();
        let report = replot(&dir).unwrap();
        let row = report
            .markdown
            .lines()
            .find(|l| l.starts_with("| postcopy | qemu |"))
            .unwrap()
            .to_string();
        assert!(row.contains("1000 (900–1100)"), "{row}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
