//! `ferry-bench --restore`: record and replay for lazy restore, measured.
//!
//! Per memory size and working set: one guest runs under `ferry-source`
//! and is snapshotted through its API; then `ferry-dest --restore --lazy`
//! restores the snapshot once with `--replay record` (which writes the
//! replay list), and `repeat` times each plainly (`--replay off`) and with
//! the list (`--replay auto`), alternating. Each restore's demand faults,
//! downtime, total time, and the time from the restore's start until the
//! guest is back at 90% of its steady rate (from its TICK lines, as for
//! `guest_lost_ms`) go into `restore.json` and `restore.md`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use super::cli::Config;
use super::matrix::{size_arg, Mode, Point};
use super::procs::{wait_until, Child, ProcError};
use super::serial::{lost_work, now_us, read_log, settled, SETTLE_LIMIT};
use super::summary::Spread;

/// Errors of the restore benchmark.
#[derive(Debug, thiserror::Error)]
pub enum RestoreBenchError {
    /// A process could not be driven.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// The source's API refused or failed a request.
    #[error("ferry-source's API: {0}")]
    Api(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A restore wrote no usable statistics.
    #[error("the {0} restore's statistics are missing or not JSON")]
    Stats(String),
}

/// How one restore ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `--replay off`.
    Plain,
    /// `--replay record`.
    Record,
    /// `--replay auto` with a recorded list.
    Replay,
}

impl Kind {
    fn flag(self) -> &'static str {
        match self {
            Kind::Plain => "off",
            Kind::Record => "record",
            Kind::Replay => "auto",
        }
    }
}

/// One restore's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreRun {
    /// Guest memory, bytes.
    pub mem_size: u64,
    /// Working set, bytes.
    pub ws_size: u64,
    /// How it ran.
    pub kind: Kind,
    /// Repetition.
    pub repeat: u32,
    /// Pages the guest faulted on.
    pub pages_demand: u64,
    /// Start of the restore until the vCPUs ran, ms.
    pub downtime_ms: f64,
    /// Start of the restore until every page was present, ms.
    pub total_ms: f64,
    /// Start of the restore until the guest was back at 90% of its steady
    /// rate, ms (`None`: it never was before the log ended).
    pub steady_ms: Option<f64>,
}

fn api(sock: &Path, req: &str) -> Result<Value, RestoreBenchError> {
    let mut s = UnixStream::connect(sock).map_err(|e| RestoreBenchError::Api(e.to_string()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| RestoreBenchError::Api(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| RestoreBenchError::Api(e.to_string()))?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| RestoreBenchError::Api(format!("{e}: {line}")))?;
    if v.get("error").is_some() {
        return Err(RestoreBenchError::Api(format!("{req}: {v}")));
    }
    Ok(v)
}

/// Boots the guest, lets it tick for `cfg.after`, snapshots it.
fn snapshot(cfg: &Config, p: &Point, dir: &Path) -> Result<(), RestoreBenchError> {
    let sock = dir.join("src.sock");
    let mut cmd = std::process::Command::new(&cfg.ferry.source);
    cmd.args(["--mem", &p.mem.to_string(), "--vcpus", &p.vcpus.to_string()])
        .args(["--guest-args", &p.guest_args()])
        .arg("--serial")
        .arg(dir.join("src.log"))
        .arg("--api")
        .arg(&sock);
    let mut src = Child::spawn(cmd, "ferry-source", &dir.join("src.err"))?;
    let allowance = cfg.after + p.setup_allowance();
    wait_until(
        allowance + Duration::from_secs(30),
        "the guest to tick",
        || {
            let ticks = read_log(&dir.join("src.log")).ticks;
            let first = ticks.first()?.host_us;
            (now_us().saturating_sub(first) >= cfg.after.as_micros() as u64).then_some(())
        },
    )?;
    api(&sock, r#"{"cmd":"pause"}"#)?;
    let path = dir.join("vm.snap");
    api(
        &sock,
        &serde_json::json!({"cmd": "snapshot", "path": path}).to_string(),
    )?;
    let _ = api(&sock, r#"{"cmd":"quit"}"#);
    let _ = src.wait_exit(Duration::from_secs(10));
    Ok(())
}

/// One lazy restore of `dir/vm.snap`.
fn restore(
    cfg: &Config,
    p: &Point,
    dir: &Path,
    kind: Kind,
    repeat: u32,
) -> Result<RestoreRun, RestoreBenchError> {
    let name = format!("{}-{repeat}", kind.flag());
    let f = |ext: &str| dir.join(format!("{name}.{ext}"));
    let mut cmd = std::process::Command::new(&cfg.ferry.dest);
    cmd.arg("--restore")
        .arg(dir.join("vm.snap"))
        .args(["--lazy", "--replay", kind.flag()])
        .args(cfg.ferry.huge_pages.then_some("--huge-pages"))
        .arg("--serial")
        .arg(f("log"))
        .arg("--stats-json")
        .arg(f("json"))
        .arg("--api")
        .arg(f("sock"));
    let start_us = now_us();
    let mut dst = Child::spawn(cmd, "ferry-dest", &f("err"))?;
    let stats: Value = wait_until(cfg.timeout, "the restore's statistics", || {
        let text = std::fs::read_to_string(f("json")).ok()?;
        serde_json::from_str(&text).ok()
    })?;
    let src_log = dir.join("src.log");
    let _ = wait_until(SETTLE_LIMIT, "the guest to settle", || {
        settled(&src_log, &f("log"), 12).then_some(())
    });
    let _ = api(&f("sock"), r#"{"cmd":"quit"}"#);
    let _ = dst.wait_exit(Duration::from_secs(10));
    let num = |k: &str| stats.get(k).and_then(Value::as_f64);
    let lost = lost_work(&read_log(&src_log), &read_log(&f("log")));
    Ok(RestoreRun {
        mem_size: p.mem,
        ws_size: p.ws,
        kind,
        repeat,
        pages_demand: num("pages_demand").ok_or_else(|| RestoreBenchError::Stats(name.clone()))?
            as u64,
        downtime_ms: num("downtime_us").unwrap_or(f64::NAN) / 1e3,
        total_ms: num("total_ms").unwrap_or(f64::NAN),
        steady_ms: lost
            .filter(|l| l.recovered)
            .map(|l| l.back_us.saturating_sub(start_us) as f64 / 1e3),
    })
}

/// Runs the restore benchmark over `cfg`'s memory sizes and working sets
/// (1 vCPU) and returns the Markdown table; writes `restore.json` and
/// `restore.md` in `out`.
pub fn run(cfg: &Config, out: &Path) -> Result<String, RestoreBenchError> {
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text).map_err(|source| RestoreBenchError::File {
            path: out.join(name).display().to_string(),
            source,
        })
    };
    let mut runs: Vec<RestoreRun> = Vec::new();
    for &mem in &cfg.matrix.mem {
        for spec in &cfg.matrix.ws {
            let ws = spec.resolve(mem);
            if ws >= mem || ws < 1 << 20 {
                continue;
            }
            let p = Point {
                mode: Mode::Postcopy,
                mem,
                ws,
                ws_spec: *spec,
                rate: 0,
                vcpus: 1,
                pinned: false,
                pattern: Default::default(),
            };
            let dir = out.join(format!("restore-{}-ws{}", size_arg(mem), size_arg(ws)));
            std::fs::create_dir_all(&dir).map_err(|source| RestoreBenchError::File {
                path: dir.display().to_string(),
                source,
            })?;
            info!(mem = size_arg(mem), ws = size_arg(ws), "snapshotting");
            snapshot(cfg, &p, &dir)?;
            let mut order = vec![(Kind::Record, 0)];
            for r in 0..cfg.matrix.repeat {
                order.extend([(Kind::Plain, r), (Kind::Replay, r)]);
            }
            for (kind, r) in order {
                match restore(cfg, &p, &dir, kind, r) {
                    Ok(run) => {
                        info!(?kind, demand = run.pages_demand, steady_ms = ?run.steady_ms, "restored");
                        runs.push(run);
                    }
                    Err(e) => warn!(?kind, "restore failed: {e}"),
                }
            }
        }
    }
    write(
        "restore.json",
        &serde_json::to_string_pretty(&runs).unwrap_or_default(),
    )?;
    let md = table(&runs);
    write("restore.md", &md)?;
    Ok(md)
}

fn median(v: Vec<f64>) -> Option<Spread> {
    Spread::of(&v).ok().flatten()
}

/// The Markdown table: per point and kind, medians (min–max), and the
/// replayed restore's figures over the plain one's.
pub fn table(runs: &[RestoreRun]) -> String {
    let mut s = String::from(
        "# Lazy restore: plain, recording, replayed (1 vCPU)\n\n\
         | mem | ws | restore | runs | demand faults | downtime ms | back at 90% ms | total ms |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    let mut points: Vec<(u64, u64)> = runs.iter().map(|r| (r.mem_size, r.ws_size)).collect();
    points.dedup();
    let mut ratios = String::new();
    for (mem, ws) in points {
        let of = |k: Kind| -> Vec<&RestoreRun> {
            runs.iter()
                .filter(|r| r.mem_size == mem && r.ws_size == ws && r.kind == k)
                .collect()
        };
        let cell = |v: Option<Spread>, d: usize| v.map_or_else(|| "—".into(), |s| s.cell(d));
        let mut med = |k: Kind| {
            let rs = of(k);
            let faults = median(rs.iter().map(|r| r.pages_demand as f64).collect());
            let steady = median(rs.iter().filter_map(|r| r.steady_ms).collect());
            let _ = writeln!(
                s,
                "| {} | {} | {:?} | {} | {} | {} | {} | {} |",
                size_arg(mem),
                size_arg(ws),
                k,
                rs.len(),
                cell(faults, 0),
                cell(median(rs.iter().map(|r| r.downtime_ms).collect()), 1),
                cell(steady, 0),
                cell(median(rs.iter().map(|r| r.total_ms).collect()), 0),
            );
            (faults.map(|f| f.median), steady.map(|f| f.median))
        };
        let plain = med(Kind::Plain);
        med(Kind::Record);
        let replay = med(Kind::Replay);
        let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}%", 100.0 * (1.0 - a / b)),
            _ => "—".into(),
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "—".into(),
        };
        let _ = writeln!(
            ratios,
            "- {} / {}: replayed vs plain: demand faults down **{}** (goal ≥ 90%), \
             time until back at 90% × **{}** (goal ≤ 0.5).",
            size_arg(mem),
            size_arg(ws),
            pct(replay.0, plain.0),
            ratio(replay.1, plain.1),
        );
    }
    let _ = writeln!(
        s,
        "\n{ratios}\nMedians with (min–max). Plain is `--replay off`; the recording restore \
         (`--replay record`, once) holds its push while the guest faults, to list its whole \
         working set; replayed (`--replay auto`) loads that list before the vCPUs run. \
         \"Back at 90%\" runs from the start of `ferry-dest` until a TICK interval runs at 90% of \
         the guest's rate in the second before the snapshot."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: Kind, repeat: u32, demand: u64, steady: f64) -> RestoreRun {
        RestoreRun {
            mem_size: 1 << 30,
            ws_size: 256 << 20,
            kind,
            repeat,
            pages_demand: demand,
            downtime_ms: 5.0,
            total_ms: 500.0,
            steady_ms: Some(steady),
        }
    }

    #[test]
    fn the_table_compares_replayed_with_plain() {
        let t = table(&[
            run(Kind::Record, 0, 60000, 3000.0),
            run(Kind::Plain, 0, 1000, 400.0),
            run(Kind::Replay, 0, 50, 150.0),
            run(Kind::Plain, 1, 1200, 600.0),
            run(Kind::Replay, 1, 30, 250.0),
        ]);
        assert!(
            t.contains("| 1G | 256M | Plain | 2 | 1100 (1000–1200) | 5.0 | 500 (400–600) | 500 |"),
            "{t}"
        );
        assert!(t.contains("demand faults down **96.4%**"), "{t}");
        assert!(t.contains("× **0.40**"), "{t}");
    }
}
