//! A Ferry run: `ferry-dest --listen` and `ferry-source --api` as separate
//! processes, the move asked for through the source's API once the guest
//! ticks; the destination's stats JSON (plus keys only the source's has),
//! both serial logs, and the guest figures that ferry-bench derives from
//! them (as for QEMU: the engine's stats have none).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::matrix::{Mode, Peer, RunSpec};
use super::netns::{Net, Side};
use super::procs::{listening, tail, wait_until, Child, ProcError};
use super::record::Outcome;
use super::serial::{guest_figures, read_log, ready_to_move, settled, SETTLE_LIMIT};

/// Errors of a Ferry run.
#[derive(Debug, thiserror::Error)]
pub enum FerryError {
    /// A process could not be driven.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// The source failed.
    #[error("ferry-source exited with {status}: {stderr}")]
    Source {
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The destination exited before it had statistics.
    #[error("ferry-dest exited with {status} before writing statistics: {stderr}")]
    Dest {
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The stats file was not JSON.
    #[error("statistics {path} are not valid JSON: {msg}")]
    Stats {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
    /// No free port.
    #[error("no free TCP port: {0}")]
    Port(std::io::Error),
    /// A TLS run without certificates.
    #[error("no certificates for the TLS runs")]
    NoCerts,
    /// The run's disk file could not be made.
    #[error("cannot create the bench disk {0}")]
    Disk(String),
    /// The source's control API did not take the move request.
    #[error("cannot ask ferry-source to move through its API {sock}: {source}")]
    StartMove {
        /// The API socket.
        sock: String,
        /// Why.
        source: std::io::Error,
    },
    /// The guest reported no tick on the destination.
    #[error("the guest did not tick on the destination after the move")]
    NoDestTicks,
}

/// How to run Ferry.
#[derive(Debug, Clone)]
pub struct FerryTools {
    /// `ferry-source`.
    pub source: PathBuf,
    /// `ferry-dest`.
    pub dest: PathBuf,
    /// `--max-rounds` for the pre-copy modes, when given.
    pub max_rounds: Option<u32>,
    /// `--downtime-target` for the pre-copy modes, when given.
    pub downtime_target: Option<String>,
    /// `--hot-window` for post-copy, when given.
    pub hot_window: Option<String>,
    /// `--hybrid-rounds` for the hybrid mode, when given.
    pub hybrid_rounds: Option<u32>,
    /// Where `gen-certs` wrote the certificates for the TLS runs.
    pub tls_certs: Option<PathBuf>,
    /// Run with a shared virtio-blk disk and the guest's disk workload.
    pub disk: bool,
    /// Back both sides' guest RAM with 2 MiB huge pages.
    pub huge_pages: bool,
    /// The destination allocates the guest's RAM before it listens
    /// (`ferry-dest --prealloc`).
    pub prealloc: bool,
    /// The destination allocates the guest's RAM on the move's Hello
    /// (`ferry-dest --prealloc hello`).
    pub prealloc_on_hello: bool,
    /// `ferry-source --tcp-congestion`, when given.
    pub tcp_congestion: Option<String>,
}

/// Size of the bench's disk: the guest's disk workload uses 1 MiB of it.
const BENCH_DISK_BYTES: u64 = 64 << 20;

impl FerryTools {
    /// The mode flags for `ferry-source`: nothing for post-copy (the
    /// default, so older binaries work), else `--mode` and the tunables.
    pub fn mode_args(&self, mode: Mode) -> Vec<String> {
        let mut a = Vec::new();
        if mode == Mode::Postcopy {
            if let Some(w) = &self.hot_window {
                a.extend(["--hot-window".to_string(), w.clone()]);
            }
            return a;
        }
        a.extend(["--mode".to_string(), mode.as_str().to_string()]);
        if let Some(n) = self.max_rounds.filter(|_| mode != Mode::StopAndCopy) {
            a.extend(["--max-rounds".into(), n.to_string()]);
        }
        if let Some(d) = self
            .downtime_target
            .as_ref()
            .filter(|_| mode != Mode::StopAndCopy)
        {
            a.extend(["--downtime-target".into(), d.clone()]);
        }
        if let Some(n) = self.hybrid_rounds.filter(|_| mode == Mode::Hybrid) {
            a.extend(["--hybrid-rounds".into(), n.to_string()]);
        }
        a
    }
}

fn read_json(path: &Path) -> Option<Result<Value, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    if text.trim().is_empty() {
        return None;
    }
    Some(serde_json::from_str(&text).map_err(|e| e.to_string()))
}

/// Asks a Ferry VM to quit through its control API.
fn quit(sock: &Path) {
    if let Ok(mut s) = UnixStream::connect(sock) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"{\"cmd\":\"quit\"}\n");
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
    }
}

/// Longest wait for the guest's first TICK on the source (its working set
/// written): 4 KiB pages of a 1.5 GiB working set took 5-9 s here.
const SETUP_LIMIT: Duration = Duration::from_secs(60);

/// Asks the source to move its VM to `to` through its control API, with
/// its statistics in `stats`; returns the connection, on which the reply
/// comes once the move is over (an error there shows in the source's exit
/// status and stderr).
fn start_move(sock: &Path, to: &str, stats: &str) -> Result<UnixStream, FerryError> {
    let failed = |source| FerryError::StartMove {
        sock: sock.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(sock).map_err(failed)?;
    let req = serde_json::json!({ "cmd": "migrate", "to": to, "stats_json": stats });
    s.write_all(format!("{req}\n").as_bytes()).map_err(failed)?;
    Ok(s)
}

/// Runs one Ferry migration in `dir`.
pub fn run(
    tools: &FerryTools,
    spec: &RunSpec,
    net: &Net,
    index: usize,
    dir: &Path,
    after: Duration,
    timeout: Duration,
) -> Result<Outcome, FerryError> {
    let p = &spec.point;
    let (ip, port) = (
        net.dest_ip(),
        net.dest_port(index).map_err(FerryError::Port)?,
    );
    let addr = format!("{ip}:{port}");
    let f = |n: &str| dir.join(n);
    let path = |n: &str| f(n).display().to_string();
    let tls = match (spec.peer, &tools.tls_certs) {
        (Peer::FerryTls, Some(d)) => Some(d),
        (Peer::FerryTls, None) => return Err(FerryError::NoCerts),
        _ => None,
    };
    let tls_args = |who: &str| -> Vec<String> {
        let Some(d) = tls else { return Vec::new() };
        let p = |f: String| d.join(f).display().to_string();
        vec![
            "--tls-cert".into(),
            p(format!("{who}.pem")),
            "--tls-key".into(),
            p(format!("{who}.key")),
            "--tls-ca".into(),
            p("ca.pem".into()),
        ]
    };
    let mut cmd = net.command_on(Side::Dest, &tools.dest, p.cpu(Side::Dest));
    // Plain runs: the bench's namespaces carry plain TCP on purpose.
    cmd.args(["--listen", &addr, "--serial", &path("dst.log")])
        .args(if tls.is_some() {
            let mut a = tls_args("dest");
            a.extend(["--tls-allow".into(), "source".into()]);
            a
        } else {
            vec!["--insecure".into()]
        })
        .args([
            "--stats-json",
            &path("dst.json"),
            "--api",
            &path("dst.sock"),
        ]);
    if tools.huge_pages {
        cmd.arg("--huge-pages");
    }
    if tools.prealloc {
        cmd.args(["--prealloc", &spec.point.mem.to_string()]);
    }
    if tools.prealloc_on_hello {
        cmd.args(["--prealloc", "hello"]);
    }
    let mut dst = Child::spawn(cmd, "ferry-dest", &f("dst.err"))?;
    let pid = dst.pid();
    wait_until(Duration::from_secs(20), "ferry-dest to listen", || {
        if let Ok(Some(_)) = dst.exited() {
            return Some(false);
        }
        listening(pid, ip, port).then_some(true)
    })?;
    if let Some(status) = dst.exited()? {
        return Err(FerryError::Dest {
            status: status.to_string(),
            stderr: tail(&f("dst.err"), 3),
        });
    }
    let mut cmd = net.command_on(Side::Source, &tools.source, p.cpu(Side::Source));
    let mut guest_args = p.guest_args();
    if tools.disk {
        let disk = f("disk.img");
        std::fs::File::create(&disk)
            .and_then(|d| d.set_len(BENCH_DISK_BYTES))
            .map_err(|e| FerryError::Disk(format!("{}: {e}", disk.display())))?;
        cmd.args(["--disk", &path("disk.img")]);
        guest_args.push_str(" disk=1");
    }
    cmd.args(["--mem", &p.mem.to_string(), "--vcpus", &p.vcpus.to_string()])
        .args(["--guest-args", &guest_args, "--serial", &path("src.log")])
        .args(["--api", &path("src.sock")])
        .args(tools.mode_args(p.mode))
        .args(tls_args("source"));
    if tls.is_some() {
        // The certificate names `dest` (and the namespaces' address).
        cmd.args(["--tls-server-name", "dest"]);
    }
    if tools.huge_pages {
        cmd.arg("--huge-pages");
    }
    if let Some(name) = &tools.tcp_congestion {
        cmd.args(["--tcp-congestion", name]);
    }
    let mut src = Child::spawn(cmd, "ferry-source", &f("src.err"))?;
    // The move starts by the rule QEMU's does: `after` since the start,
    // and once the guest has ticked for the steady-rate window of
    // `guest_lost_ms`. Its working set is written by then, however long
    // this host took to back the guest's fresh pages (4 KiB pages came at
    // 0.3 GB/s here when another process had just taken the backed ones).
    let start = Instant::now();
    let ticking = wait_until(
        SETUP_LIMIT + after,
        "the guest to tick on the source",
        || {
            if let Ok(Some(_)) = src.exited() {
                return Some(false);
            }
            ready_to_move(&read_log(&f("src.log")), start, after).then_some(true)
        },
    )?;
    // Held until the source exits: the reply comes when the move is over.
    // (A source that exited before it ticked fails below, with its stderr.)
    let _request = match ticking {
        true => Some(start_move(&f("src.sock"), &addr, &path("src.json"))?),
        false => None,
    };
    let status = src.wait_exit(timeout)?;
    if !status.success() {
        return Err(FerryError::Source {
            status: status.to_string(),
            stderr: tail(&f("src.err"), 3),
        });
    }
    let stats = wait_until(Duration::from_secs(30), "ferry-dest's statistics", || {
        if let Ok(Some(status)) = dst.exited() {
            if read_json(&f("dst.json")).is_none() {
                return Some(Err(FerryError::Dest {
                    status: status.to_string(),
                    stderr: tail(&f("dst.err"), 3),
                }));
            }
        }
        read_json(&f("dst.json")).map(|r| {
            r.map_err(|msg| FerryError::Stats {
                path: path("dst.json"),
                msg,
            })
        })
    })??;
    // Let the moved guest run a little and get back to its steady rate,
    // for the progress plot and the lost work.
    let _ = wait_until(SETTLE_LIMIT, "the guest to settle", || {
        settled(&f("src.log"), &f("dst.log"), 12).then_some(())
    });
    quit(&f("dst.sock"));
    let _ = dst.wait_exit(Duration::from_secs(5));
    let mut stats = stats;
    if let (Value::Object(m), Some(Ok(Value::Object(s)))) = (&mut stats, read_json(&f("src.json")))
    {
        for (k, v) in s {
            m.entry(k).or_insert(v);
        }
    }
    let (src_log, dst_log) = (read_log(&f("src.log")), read_log(&f("dst.log")));
    if dst_log.ticks.is_empty() {
        return Err(FerryError::NoDestTicks);
    }
    if let Value::Object(m) = &mut stats {
        m.extend(guest_figures(&src_log, &dst_log));
    }
    Ok(Outcome {
        stats,
        src: src_log,
        dst: dst_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_args_only_for_new_modes() {
        let t = FerryTools {
            disk: false,
            source: "s".into(),
            dest: "d".into(),
            max_rounds: Some(10),
            downtime_target: Some("20ms".into()),
            hybrid_rounds: Some(3),
            tls_certs: None,
            hot_window: None,
            huge_pages: false,
            prealloc: false,
            prealloc_on_hello: false,
            tcp_congestion: None,
        };
        assert!(t.mode_args(Mode::Postcopy).is_empty());
        let hot = FerryTools {
            hot_window: Some("200ms".into()),
            ..t.clone()
        };
        assert_eq!(hot.mode_args(Mode::Postcopy), ["--hot-window", "200ms"]);
        assert!(!hot
            .mode_args(Mode::Precopy)
            .contains(&"--hot-window".into()));
        assert_eq!(t.mode_args(Mode::StopAndCopy), ["--mode", "stop-and-copy"]);
        assert_eq!(
            t.mode_args(Mode::Precopy),
            [
                "--mode",
                "precopy",
                "--max-rounds",
                "10",
                "--downtime-target",
                "20ms"
            ]
        );
        assert_eq!(t.mode_args(Mode::Hybrid).len(), 8);
    }

    /// A source whose API cannot be reached fails the run at once, naming
    /// the socket; one that listens gets one `migrate` request line.
    #[test]
    fn the_move_is_asked_for_through_the_api_or_fails_at_once() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("src.sock");
        let _ = std::fs::remove_file(&sock);
        let e = start_move(&sock, "127.0.0.1:1", "s.json").unwrap_err();
        assert!(matches!(e, FerryError::StartMove { .. }), "{e}");
        assert!(e.to_string().contains("src.sock"), "{e}");

        let api = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let held = start_move(&sock, "127.0.0.1:1", "s.json").unwrap();
        let (conn, _) = api.accept().unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        let req: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            req,
            serde_json::json!({"cmd": "migrate", "to": "127.0.0.1:1", "stats_json": "s.json"})
        );
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
