//! Shared helpers for Ferry's command-line tools.

use std::path::PathBuf;
use std::time::Duration;

use ferry_engine::ConsoleOutput;

pub mod archive;
pub mod bench;
pub mod daemon;
pub mod hooks;
pub mod monitor;
pub mod netns;
pub mod templates;

/// Parses a byte size such as `4096`, `64K`, `256M`, `1G` or `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: expected e.g. 4096, 64K, 256M, 1G"))
}

/// Parses a duration such as `500ms`, `3s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("invalid duration {s:?}: expected e.g. 500ms, 3s, 1.5s, 2m");
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * scale > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `--peer-timeout`: a duration of at least
/// [`ferry_protocol::MIN_PEER_TIMEOUT`] (100 ms), since a side pings every
/// quarter of it and the read and write timeouts cannot be zero.
pub fn parse_peer_timeout(s: &str) -> Result<Duration, String> {
    let t = parse_duration(s)?;
    let min = ferry_protocol::MIN_PEER_TIMEOUT;
    if t < min {
        return Err(format!(
            "peer timeout {s:?} is shorter than {} ms",
            min.as_millis()
        ));
    }
    Ok(t)
}

/// The options every VM-running binary shares: where the guest console goes,
/// the control API socket and how long to run.
#[derive(clap::Args, Debug, Clone)]
pub struct VmIoArgs {
    /// Where guest console lines go: a file, "-" for stdout, "none".
    #[arg(long)]
    pub serial: Option<String>,
    /// Unix socket for the JSON control API.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Stop after this long (e.g. 10s); default: until `quit`.
    #[arg(long, value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// A virtio-blk disk on a raw file, PATH[,readonly][,serial=ID]
    /// (repeatable; the serial defaults to ferry<N>). When booting: the
    /// VM's disks. When restoring or receiving a VM: the N-th --disk
    /// replaces the saved VM's N-th disk (a clone's own copy); without
    /// it the disks are opened at the paths in the state (shared storage).
    #[arg(long = "disk", value_name = "PATH[,readonly][,serial=ID]")]
    pub disk: Vec<String>,
    /// Do not confine the vCPU, fault-handler and page-server threads with
    /// their seccomp filters (for debugging only: a thread that makes a
    /// call outside its filter otherwise stops the process with a message
    /// naming the call).
    #[arg(long)]
    pub no_seccomp: bool,
    /// A virtio-net card on a tap, tap=NAME,mac=MAC (repeatable; after
    /// the disks in slot order). The tap is opened, or created if
    /// missing; give a VM that moves a persistent tap on a bridge. When
    /// restoring or receiving a VM: the N-th --net replaces the saved
    /// VM's N-th card's tap and MAC (a clone's own MAC).
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    pub net: Vec<String>,
}

impl VmIoArgs {
    /// Applies `--no-seccomp` (filters are on unless it is given).
    pub fn apply_seccomp(&self) {
        ferry_engine::seccomp::set_enabled(!self.no_seccomp);
    }

    /// The `--disk` options, parsed.
    pub fn disks(&self) -> Result<Vec<ferry_engine::devices::DiskConfig>, String> {
        self.disk
            .iter()
            .enumerate()
            .map(|(i, s)| ferry_engine::devices::DiskConfig::parse(s, i))
            .collect()
    }
}

impl VmIoArgs {
    /// The `--net` options, parsed.
    pub fn nets(&self) -> Result<Vec<ferry_engine::devices::NetConfig>, String> {
        self.net
            .iter()
            .map(|s| ferry_engine::devices::NetConfig::parse(s))
            .collect()
    }
}

/// How a side of a migration treats its peer: the `--peer-timeout` and
/// `--recovery-window` flags both binaries share.
#[derive(clap::Args, Debug, Clone)]
pub struct LinkArgs {
    /// A peer that sends nothing for this long (not even a heartbeat) is
    /// gone: before the switch-over commits the move rolls back; after it,
    /// recovery starts. The two sides tell each other theirs, and a move
    /// runs with the shorter (at least 100 ms).
    #[arg(long, value_parser = parse_peer_timeout, default_value = "5s")]
    pub peer_timeout: Duration,
    /// After the switch-over, how long a lost peer is waited for and
    /// reconnected to (with backoff) before the move is declared stranded;
    /// a stranded VM stays paused and never runs on missing pages or twice.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub recovery_window: Duration,
}

/// Mutual TLS on the migration connections (the same flags on
/// `ferry-source` and `ferry-dest`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This side's certificate (PEM). With --tls-key and --tls-ca, every
    /// migration connection runs mutual TLS (TLS 1.3, AES-GCM).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) the peer's certificate must be signed by.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The three files, when TLS is on.
    pub fn files(&self) -> Option<ferry_transport::TlsFiles> {
        Some(ferry_transport::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }
}

/// Maps `--serial` to a console output: `-` is stdout, `none` discards.
pub fn console_output(arg: Option<&str>) -> ConsoleOutput {
    match arg {
        None | Some("-") => ConsoleOutput::Stdout,
        Some("none") => ConsoleOutput::Discard,
        Some(p) => ConsoleOutput::File(PathBuf::from(p)),
    }
}

/// Shows a migration's progress on stderr while it runs, when stderr is a
/// terminal; returns the handle to publish into, and the display thread.
pub fn migration_progress_bar() -> Option<(
    std::sync::Arc<ferry_engine::migration::progress::Progress>,
    std::thread::JoinHandle<()>,
)> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let progress = std::sync::Arc::new(ferry_engine::migration::progress::Progress::default());
    let p = progress.clone();
    let thread = std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>20} [{bar:40}] {human_pos}/{human_len} pages, {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let mut phase = String::new();
        loop {
            let v = p.view();
            if v.phase != phase {
                phase = v.phase.clone();
                bar.reset();
                bar.set_message(phase.clone());
            }
            bar.set_length(v.total);
            bar.set_position(v.done.min(v.total));
            if v.finished {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
    });
    Some((progress, thread))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_peer_timeout("150ms"), Ok(Duration::from_millis(150)));
        let e = parse_peer_timeout("0s").unwrap_err();
        assert!(e.contains("shorter than 100 ms"), "{e}");
    }
}
