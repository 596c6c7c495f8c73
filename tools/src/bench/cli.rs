//! `ferry-bench`'s command line, checked into a [`Config`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::ferry::FerryTools;
use super::matrix::{
    parse_ints, parse_modes, parse_pin, parse_sizes, parse_ws, Matrix, MatrixError, Mode, WsSpec,
};
use super::netns::{check_rate, NetError};
use crate::parse_duration;

/// Errors in the command line (untrusted input).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A matrix option is wrong.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// A duration is wrong.
    #[error("--{opt}: {msg}")]
    Duration {
        /// The option.
        opt: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The link rate is wrong.
    #[error("--link-rate: {0}")]
    Rate(#[from] NetError),
    /// A number is out of range.
    #[error("--{opt} must be in {lo}..={hi}, not {v}")]
    Range {
        /// The option.
        opt: &'static str,
        /// Lower bound.
        lo: u64,
        /// Upper bound.
        hi: u64,
        /// Value given.
        v: u64,
    },
    /// A Ferry binary is not next to ferry-bench.
    #[error("{0} not found next to ferry-bench (build the workspace: cargo build --release)")]
    Missing(String),
    /// The executable's own path is unknown.
    #[error("cannot find ferry-bench's own path: {0}")]
    Exe(std::io::Error),
    /// --qemu names a file that does not exist.
    #[error("--qemu {0}: no such file")]
    Qemu(String),
    /// --out names a directory that already holds something: the runs'
    /// serial logs would be appended to an earlier run's.
    #[error("--out {0}: the directory is not empty (choose a new one)")]
    OutNotEmpty(String),
}

/// Benchmark Ferry's migration modes (and QEMU's) for downtime, total time,
/// guest stall, bytes and fault latency over a matrix of guests.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// A small matrix that runs in under three minutes: modes
    /// postcopy,stop-and-copy,precopy, mem 256M,1G, ws 64M, 1 vCPU, 1 repeat,
    /// plus post-copy of a 2G guest with a 1G working set (other options
    /// still override; --mem or --ws drop that large point).
    #[arg(long)]
    pub quick: bool,
    /// Modes: postcopy, precopy, stop-and-copy, hybrid [default: postcopy].
    #[arg(long)]
    pub modes: Option<String>,
    /// Guest memory sizes, e.g. 256M,1G,4G [default: 1G].
    #[arg(long)]
    pub mem: Option<String>,
    /// Working-set sizes, e.g. 64M,256M, or percentages of memory, e.g. 25% [default: 256M].
    #[arg(long)]
    pub ws: Option<String>,
    /// Guest dirty rates in pages/s, 0 = unlimited, e.g. 0,20000 [default: 0].
    #[arg(long)]
    pub rate: Option<String>,
    /// vCPU counts, e.g. 1,2 [default: 1].
    #[arg(long)]
    pub vcpus: Option<String>,
    /// Runs per matrix point [default: 3; --quick: 1].
    #[arg(long)]
    pub repeat: Option<u64>,
    /// How long the guest runs before it is moved [default: 2s; --quick: 1s].
    #[arg(long)]
    pub after: Option<String>,
    /// Give up on a run after this long.
    #[arg(long, default_value = "180s")]
    pub timeout: String,
    /// Output directory [default: results/<UTC timestamp>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run source and destination in two network namespaces joined by a
    /// veth pair (created and removed by ferry-bench) instead of loopback.
    #[arg(long)]
    pub netns: bool,
    /// Limit the veth link with tbf, e.g. 1gbit (implies --netns).
    #[arg(long)]
    pub link_rate: Option<String>,
    /// Skip the QEMU peer rows.
    #[arg(long)]
    pub no_qemu: bool,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH, if any].
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Passed to ferry-source for precopy/hybrid.
    #[arg(long)]
    pub max_rounds: Option<u32>,
    /// Passed to ferry-source for precopy/hybrid; also QEMU's downtime-limit
    /// [ferry-source's default: 50ms].
    #[arg(long)]
    pub downtime_target: Option<String>,
    /// Passed to ferry-source for hybrid.
    #[arg(long)]
    pub hybrid_rounds: Option<u32>,
    /// Give each Ferry VM a virtio-blk disk (a new raw file in its run
    /// directory, on the same path for both sides: shared storage) and run
    /// the guest's disk workload, so the downtime figures include the
    /// device drain and the device state. QEMU rows have no disk.
    #[arg(long)]
    pub disk: bool,
    /// Pin the source to CPU 0 and the destination to CPU 1 (Ferry's and
    /// QEMU's alike): off, on, or both (every point twice) [default: off].
    #[arg(long)]
    pub pin: Option<String>,
    /// The guest's access pattern: random (uniform over the working set),
    /// hotcold (90% of accesses to a hot tenth of it) or skewed (99%).
    #[arg(long, default_value = "random")]
    pub pattern: super::matrix::Pattern,
    /// Passed to ferry-source as --hot-window (post-copy: log writes this
    /// long before the pause and push those pages first), e.g. 200ms.
    #[arg(long)]
    pub hot_window: Option<String>,
    /// Back guest RAM with 2 MiB huge pages on both sides (Ferry's
    /// `--huge-pages`; QEMU's RAM becomes a hugetlb memfd backend). The
    /// pool (/proc/sys/vm/nr_hugepages) must hold both sides' RAM.
    #[arg(long)]
    pub huge_pages: bool,
    /// Ferry's destination makes and allocates the guest's RAM before it
    /// listens (`ferry-dest --prealloc`), so no move allocates and zeroes
    /// pages on its critical path, and post-copy writes them in place.
    /// (QEMU's destination discards its RAM when post-copy starts, so
    /// `prealloc=on` would not help it.)
    #[arg(long, conflicts_with = "prealloc_on_hello")]
    pub prealloc: bool,
    /// Ferry's destination allocates the guest's RAM when the move's Hello
    /// asks for it, before answering (`ferry-dest --prealloc hello`): as
    /// --prealloc, for a destination that does not know the size ahead.
    #[arg(long)]
    pub prealloc_on_hello: bool,
    /// TCP congestion control for Ferry's connections
    /// (`ferry-source --tcp-congestion`) and for the wire probe's copies,
    /// e.g. reno (default: the system's). QEMU keeps the system's: it has
    /// no such setting.
    #[arg(long, value_name = "NAME", value_parser = ferry_transport::congestion::parse_name)]
    pub tcp_congestion: Option<String>,
    /// Also run every Ferry point over mutual TLS (certificates made with
    /// `gen-certs` in the output directory), alternating with the plain
    /// runs, and add a TLS cost section: push throughput TLS ÷ plain and
    /// the demand-fault p50 difference.
    #[arg(long)]
    pub tls: bool,
    /// Instead of migrations: snapshot a guest per memory size and working
    /// set, then restore it lazily: once recording its working set
    /// (`--replay record`), then --repeat times each plainly and replayed.
    /// Writes restore.md and restore.json.
    #[arg(long)]
    pub restore: bool,
    /// Only re-render results.md and the plots of an earlier run directory
    /// from its results.json; runs nothing.
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

/// A checked benchmark configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The matrix.
    pub matrix: Matrix,
    /// The guest runs this long before the move.
    pub after: Duration,
    /// Per-run limit.
    pub timeout: Duration,
    /// Output directory, if given.
    pub out: Option<PathBuf>,
    /// Use network namespaces.
    pub netns: bool,
    /// tbf rate.
    pub link_rate: Option<String>,
    /// The QEMU binary, when QEMU rows are wanted and it is installed.
    pub qemu: Option<PathBuf>,
    /// QEMU's downtime-limit.
    pub qemu_downtime_ms: u64,
    /// Ferry's binaries and tunables.
    pub ferry: FerryTools,
    /// Every Ferry run also over mutual TLS.
    pub tls: bool,
}

fn duration(opt: &'static str, s: &str) -> Result<Duration, CliError> {
    parse_duration(s).map_err(|msg| CliError::Duration { opt, msg })
}

/// `qemu-system-x86_64` on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

impl Args {
    /// Checks everything and finds the binaries in `bin_dir`.
    pub fn config(&self, bin_dir: &Path) -> Result<Config, CliError> {
        let q = self.quick;
        let pick = |v: &Option<String>, normal: &'static str, quick: &'static str| -> String {
            v.clone()
                .unwrap_or_else(|| if q { quick } else { normal }.to_string())
        };
        let vcpus = parse_ints(
            "vcpus",
            &pick(&self.vcpus, "1", "1"),
            1,
            ferry_guest::MAX_VCPUS as u64,
        )?;
        let repeat = self.repeat.unwrap_or(if q { 1 } else { 3 });
        if !(1..=100).contains(&repeat) {
            return Err(CliError::Range {
                opt: "repeat",
                lo: 1,
                hi: 100,
                v: repeat,
            });
        }
        let matrix = Matrix {
            modes: parse_modes(&pick(
                &self.modes,
                "postcopy",
                "postcopy,stop-and-copy,precopy",
            ))?,
            mem: parse_sizes("mem", &pick(&self.mem, "1G", "256M,1G"), 64 << 20)?,
            ws: parse_ws(&pick(&self.ws, "256M", "64M"))?,
            rate: parse_ints("rate", &pick(&self.rate, "0", "0"), 0, 1 << 40)?,
            vcpus: vcpus.into_iter().map(|v| v as u32).collect(),
            repeat: repeat as u32,
            extra: if q && self.mem.is_none() && self.ws.is_none() {
                vec![(Mode::Postcopy, 2 << 30, WsSpec::Bytes(1 << 30))]
            } else {
                Vec::new()
            },
            pin: parse_pin(self.pin.as_deref().unwrap_or("off"))?,
            pattern: self.pattern,
        };
        if let Some(out) = &self.out {
            if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
                return Err(CliError::OutNotEmpty(out.display().to_string()));
            }
        }
        let after = duration("after", &pick(&self.after, "2s", "1s"))?;
        let timeout = duration("timeout", &self.timeout)?;
        if timeout < Duration::from_secs(5) {
            return Err(CliError::Duration {
                opt: "timeout",
                msg: "must be at least 5s".into(),
            });
        }
        let target = self
            .downtime_target
            .as_deref()
            .map(|s| duration("downtime-target", s))
            .transpose()?;
        if let Some(r) = &self.link_rate {
            check_rate(r)?;
        }
        for (opt, v) in [
            ("max-rounds", self.max_rounds),
            ("hybrid-rounds", self.hybrid_rounds),
        ] {
            if let Some(v) = v.filter(|v| !(1..=10_000).contains(v)) {
                return Err(CliError::Range {
                    opt,
                    lo: 1,
                    hi: 10_000,
                    v: v as u64,
                });
            }
        }
        let bin = |n: &str| {
            let p = bin_dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(CliError::Missing(p.display().to_string()))
            }
        };
        let qemu = match (&self.qemu, self.no_qemu) {
            (_, true) => None,
            (Some(p), false) if p.is_file() => Some(p.clone()),
            (Some(p), false) => return Err(CliError::Qemu(p.display().to_string())),
            (None, false) => find_in_path("qemu-system-x86_64"),
        };
        Ok(Config {
            matrix,
            after,
            timeout,
            out: self.out.clone(),
            netns: self.netns || self.link_rate.is_some(),
            link_rate: self.link_rate.clone(),
            qemu,
            qemu_downtime_ms: target.map_or(50, |d| d.as_millis().max(1) as u64),
            ferry: FerryTools {
                source: bin("ferry-source")?,
                dest: bin("ferry-dest")?,
                max_rounds: self.max_rounds,
                downtime_target: target.map(|d| format!("{}ms", d.as_millis())),
                hybrid_rounds: self.hybrid_rounds,
                tls_certs: None,
                disk: self.disk,
                hot_window: self.hot_window.clone(),
                huge_pages: self.huge_pages,
                prealloc: self.prealloc,
                prealloc_on_hello: self.prealloc_on_hello,
                tcp_congestion: self.tcp_congestion.clone(),
            },
            tls: self.tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-bench-cli-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for b in ["ferry-source", "ferry-dest"] {
            std::fs::write(d.join(b), "").unwrap();
        }
        d
    }

    fn cfg(args: &[&str]) -> Result<Config, CliError> {
        let a = Args::try_parse_from(std::iter::once("ferry-bench").chain(args.iter().copied()))
            .unwrap();
        a.config(&bins())
    }

    #[test]
    fn quick_and_overrides() {
        let c = cfg(&["--quick", "--no-qemu"]).unwrap();
        assert_eq!(c.matrix.modes.len(), 3);
        assert_eq!(c.matrix.mem, vec![256 << 20, 1 << 30]);
        assert_eq!(c.matrix.repeat, 1);
        assert!(c.qemu.is_none());
        // The large working set: post-copy of 2G with ws 1G (≥ 50%).
        let big: Vec<_> = c
            .matrix
            .points()
            .into_iter()
            .filter(|p| p.mem == 2 << 30)
            .collect();
        assert_eq!(big.len(), 1);
        assert_eq!((big[0].mode, big[0].ws), (Mode::Postcopy, 1 << 30));
        assert_eq!(c.matrix.runs(false, false).unwrap().len(), 7);
        let c = cfg(&[
            "--quick",
            "--no-qemu",
            "--mem",
            "512M",
            "--link-rate",
            "1gbit",
        ])
        .unwrap();
        assert_eq!(c.matrix.mem, vec![512 << 20]);
        assert!(c.matrix.extra.is_empty());
        assert!(c.netns);
        let c = cfg(&["--no-qemu", "--downtime-target", "20ms"]).unwrap();
        assert_eq!(c.matrix.repeat, 3);
        assert_eq!(c.qemu_downtime_ms, 20);
        assert_eq!(c.ferry.downtime_target.as_deref(), Some("20ms"));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for (args, want) in [
            (vec!["--modes", "teleport"], "unknown mode"),
            (vec!["--mem", "lots"], "--mem"),
            (vec!["--vcpus", "99"], "--vcpus"),
            (vec!["--repeat", "0"], "--repeat"),
            (vec!["--after", "soon"], "--after"),
            (vec!["--timeout", "1s"], "--timeout"),
            (vec!["--link-rate", "fast"], "--link-rate"),
            (vec!["--qemu", "/nonexistent/qemu"], "--qemu"),
            (vec!["--max-rounds", "0"], "--max-rounds"),
        ] {
            let e = cfg(&args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let e = Args::try_parse_from(["ferry-bench"])
            .unwrap()
            .config(Path::new("/nonexistent"));
        assert!(matches!(e, Err(CliError::Missing(_))));
        // An --out that holds an earlier run is refused; a new or empty
        // one is taken.
        let used = bins();
        let e = cfg(&["--out", used.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        let empty = used.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(cfg(&["--out", empty.to_str().unwrap()]).is_ok());
        assert!(cfg(&["--out", used.join("new").to_str().unwrap()]).is_ok());
    }
}
