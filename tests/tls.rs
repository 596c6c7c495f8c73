//! Mutual TLS on every migration connection, with `ferry-ctl gen-certs`
//! certificates: authenticated moves (post-copy, pre-copy, and a recovery
//! after a cut link, which handshakes again), strangers refused before
//! anything is allocated, and what crosses the wire. The workload guest is
//! the oracle.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::tap::Tap;
use common::*;
use ferry_protocol::{features, read_frame, write_frame, Hello, MsgType, Role, PROTOCOL_VERSION};
use ferry_transport::{ClientTls, TlsFiles};

/// `ferry-ctl gen-certs DIR` (extra arguments after it).
fn gen_certs(dir: &Path, extra: &[&str]) {
    let out = std::process::Command::new(bin("ferry-ctl"))
        .arg("gen-certs")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gen-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--tls-cert D/WHO.pem --tls-key D/WHO.key --tls-ca D/ca.pem`.
fn tls_args(certs: &Path, who: &str) -> Vec<String> {
    let p = |f: String| certs.join(f).to_string_lossy().into_owned();
    vec![
        "--tls-cert".into(),
        p(format!("{who}.pem")),
        "--tls-key".into(),
        p(format!("{who}.key")),
        "--tls-ca".into(),
        p("ca.pem".into()),
    ]
}

/// A TLS `ferry-dest` (`dst.*` in `dir`) that lets only `source` send it a
/// VM; `extra` arguments after.
fn tls_dest(dir: &Scratch, certs: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = tls_args(certs, "dest");
    args.extend(["--tls-allow".into(), "source".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args = io_args(dir, "dst", &strs(&args));
    spawn_dest(dir, "dst", &strs(&args))
}

/// Starts `ferry-source` running `guest` in `mem` (console, API socket and
/// stderr `src.*` in `dir`, `extra` arguments), waits until its guest
/// ticks, then moves it to `to` through the API (`ferry-ctl migrate` with
/// the source's certificate and `ctl_extra`), on a thread that returns
/// ferry-ctl's output. The source exits once the move completes.
fn start_move(
    dir: &Scratch,
    certs: &Path,
    to: &str,
    (mem, guest): (&str, &str),
    (extra, ctl_extra): (&[&str], &[&str]),
) -> (Proc, std::thread::JoinHandle<std::process::Output>) {
    let mut args = vec!["--mem", mem, "--guest-args", guest];
    args.extend(extra);
    let src = spawn(
        "ferry-source",
        &strs(&console_args(dir, "src", &args)),
        &dir.path("src.err"),
    );
    wait_ticks(&dir.path("src.log"), 1, 2, WAIT);
    let mut cmd = std::process::Command::new(bin("ferry-ctl"));
    cmd.arg("--api")
        .arg(dir.path("src.sock"))
        .args(["migrate", to])
        .args(tls_args(certs, "source"))
        // The certificate names `dest`; the tap and the listener are loopback.
        .args(["--tls-server-name", "dest"])
        .args(ctl_extra);
    (src, std::thread::spawn(move || cmd.output().unwrap()))
}

/// Starts a slow post-copy move (the push capped at 40 MB/s, so a cut falls
/// inside post-copy) of a 1G guest writing all over 512M, from a TLS
/// `ferry-source` (`extra`: more of its arguments) to `to`; returns once
/// post-copy runs, with the source and `ferry-ctl migrate`.
fn start_slow_postcopy(
    dir: &Scratch,
    certs: &Path,
    to: &str,
    extra: &[&str],
) -> (Proc, std::thread::JoinHandle<std::process::Output>) {
    let mut args = vec!["--peer-timeout", "2s", "--recovery-window", "30s"];
    args.extend(extra);
    let started = start_move(
        dir,
        certs,
        to,
        ("1G", "ws=512M pattern=random write=80 report_ms=20"),
        (&args, &["--max-bandwidth", "40M"]),
    );
    wait_stage(&dir.path("src.sock"), "postcopy");
    started
}

/// Moves a `mem` guest running `guest` from a TLS `ferry-source` to the
/// destination at `to` (`ctl_extra`: more `ferry-ctl migrate` arguments)
/// and checks the guest continues there with no BAD; returns the
/// destination's stats.
fn move_guest(
    dir: &Scratch,
    certs: &Path,
    to: &str,
    (mem, guest): (&str, &str),
    ctl_extra: &[&str],
) -> serde_json::Value {
    let (src, ctl) = start_move(dir, certs, to, (mem, guest), (&[], ctl_extra));
    finish_move(dir, src, ctl)
}

/// Waits for a move that `start_move` began to end: `ferry-ctl migrate`
/// succeeds, the source exits, and the guest continues on the destination
/// with no BAD; returns the destination's stats.
fn finish_move(
    dir: &Scratch,
    mut src: Proc,
    ctl: std::thread::JoinHandle<std::process::Output>,
) -> serde_json::Value {
    let log = |name: &str| std::fs::read_to_string(dir.path(name)).unwrap_or_default();
    let out = ctl.join().unwrap();
    assert!(
        out.status.success(),
        "migrate: {}\nsource: {}\ndestination: {}",
        String::from_utf8_lossy(&out.stderr),
        log("src.err"),
        log("dst.err")
    );
    assert!(
        wait_exit(&mut src, WAIT, "the source to finish"),
        "source failed: {}",
        log("src.err")
    );
    let stats = wait_stats(&dir.path("dst.json"), WAIT);
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    stats
}

fn quit(dir: &Scratch, dst: &mut Proc) {
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(dst, WAIT, "the destination to quit"));
}

fn authenticated_move(name: &str, mode: &str) {
    let dir = Scratch::new(name);
    let certs = dir.path("certs");
    gen_certs(&certs, &[]);
    let (mut dst, addr) = tls_dest(&dir, &certs, &[]);
    let stats = move_guest(
        &dir,
        &certs,
        &addr,
        ("256M", "ws=64M write=50 report_ms=50"),
        &["--mode", mode],
    );
    assert_eq!(stats["mode"], mode, "{stats}");
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("incoming migration over mutual TLS"), "{err}");
    assert!(!err.contains("unauthenticated"), "{err}");
    quit(&dir, &mut dst);
}

/// A post-copy move with `gen-certs` certificates on both sides.
#[test]
fn authenticated_postcopy_move() {
    authenticated_move("tls-postcopy", "postcopy");
}

/// A pre-copy move with `gen-certs` certificates on both sides.
#[test]
fn authenticated_precopy_move() {
    authenticated_move("tls-precopy", "precopy");
}

/// What the destination process holds: resident KiB, shared-memory KiB
/// (guest RAM is a memfd) and how many memfds it has open.
fn footprint(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{key} in {status}"))
    };
    let memfds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("/memfd:"))
        .count();
    (kb("VmRSS:"), kb("RssShmem:"), memfds)
}

/// The control `Hello` of an 8 GiB, 2-vCPU guest, as the stranger
/// sent it.
fn stranger_hello() -> Vec<u8> {
    Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id: 0x5eed,
        features: features::LZ4 | features::ZERO_RUNS,
        mem_size: 8 << 30,
        vcpus: 2,
        page_size: 4096,
        options: Vec::new(),
    }
    .encode()
}

/// Sends the stranger's `Hello` on `conn` and returns what came back: the
/// error that ended the read (never a `HelloAck`).
fn hello_gets_nothing(mut conn: impl std::io::Read + std::io::Write, what: &str) -> String {
    let _ = write_frame(&mut conn, MsgType::Hello, 0, &stranger_hello());
    let _ = conn.flush();
    let mut buf = Vec::new();
    match read_frame(&mut conn, &mut buf) {
        Ok(h) => panic!("{what}: got a {:?} frame", h.kind),
        Err(e) => e.to_string(),
    }
}

/// Each stranger is refused before anything is allocated, with the reason
/// in the log; then the real, authenticated migration goes through.
#[test]
fn strangers_are_refused_before_anything_is_allocated() {
    let dir = Scratch::new("tls-refuse");
    let (certs, other) = (dir.path("certs"), dir.path("other-ca"));
    gen_certs(&certs, &[]);
    gen_certs(&other, &[]);
    let (mut dst, addr) = tls_dest(&dir, &certs, &[]);
    let pid = dst.0.id();
    // Let it settle (API thread, listener) before the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, shmem0, memfds0) = footprint(pid);
    assert_eq!(memfds0, 0, "guest memory before any migration");
    let soon = || Instant::now() + Duration::from_secs(5);
    let tcp = || std::net::TcpStream::connect(&addr).unwrap();
    let client = |cert_dir: &Path, who: &str| {
        ClientTls::load(
            &TlsFiles {
                cert: cert_dir.join(format!("{who}.pem")),
                key: cert_dir.join(format!("{who}.key")),
                // The strangers know the real CA, so they accept the
                // destination: only their own certificate is wrong.
                ca: certs.join("ca.pem"),
            },
            None,
        )
        .unwrap()
    };

    // 1. A certificate from another CA.
    let c = client(&other, "source").connect(tcp(), "dest", soon());
    let got = match c {
        Ok(c) => hello_gets_nothing(c, "another CA"),
        Err(e) => e.to_string(),
    };
    println!("another CA: {got}");
    // 2. The right CA, a name not in --tls-allow (the destination's own
    // certificate, which names `dest`).
    let c = client(&certs, "dest").connect(tcp(), "dest", soon());
    let got = match c {
        Ok(c) => hello_gets_nothing(c, "wrong name"),
        Err(e) => e.to_string(),
    };
    println!("wrong name: {got}");
    // 3. Plain TCP: bytes that are not TLS.
    let mut s = tcp();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: dest\r\n\r\n");
    let mut buf = Vec::new();
    assert!(
        read_frame(&mut s, &mut buf).is_err(),
        "plain TCP got a frame"
    );
    // 4. A hand-built Hello in the clear.
    let got = hello_gets_nothing(tcp(), "plaintext Hello");
    println!("plaintext Hello: {got}");

    // Each refusal is logged with its reason, before any Hello was read.
    let err = wait_for(WAIT, "four refusals in the log", || {
        let e = std::fs::read_to_string(dir.path("dst.err")).ok()?;
        (e.matches("refused a connection before its Hello").count() >= 4).then_some(e)
    });
    assert_eq!(
        err.matches("refused a connection before its Hello").count(),
        4,
        "{err}"
    );
    assert!(err.contains("unknown CA"), "{err}");
    assert!(err.contains("none of the allowed peers (source)"), "{err}");
    assert_eq!(err.matches("not TLS").count(), 2, "{err}");
    assert!(
        !err.contains("incoming migration over"),
        "a VM was started: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was allocated for them: no guest memory file, no growth.
    let (rss, shmem, memfds) = footprint(pid);
    println!("VmRSS {rss0} -> {rss} KiB, RssShmem {shmem0} -> {shmem} KiB, memfds {memfds}");
    assert_eq!(memfds, 0, "a memfd exists: guest memory was allocated");
    assert!(shmem <= shmem0 + 1024, "RssShmem {shmem0} -> {shmem} KiB");
    assert!(rss <= rss0 + 16 * 1024, "VmRSS {rss0} -> {rss} KiB");
    assert!(dst.0.try_wait().unwrap().is_none(), "the listener died");

    // The listener then takes the real migration.
    move_guest(&dir, &certs, &addr, ("256M", "ws=32M report_ms=50"), &[]);
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert_eq!(err.matches("incoming migration over").count(), 1, "{err}");
    quit(&dir, &mut dst);
}

/// Post-copy under TLS, the link cut (through a tap) while the push runs:
/// the source reconnects, handshakes again, and the move completes.
#[test]
fn a_cut_link_recovers_under_tls() {
    let dir = Scratch::new("tls-recover");
    let certs = dir.path("certs");
    gen_certs(&certs, &[]);
    let (mut dst, addr) = tls_dest(
        &dir,
        &certs,
        &["--peer-timeout", "2s", "--recovery-window", "30s"],
    );
    let tap = Tap::start(&addr, false);
    let (src, ctl) = start_slow_postcopy(&dir, &certs, &tap.addr, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = tap.connections();
    tap.cut();
    let stats = finish_move(&dir, src, ctl);
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
    // Both connections were opened again, each with a new handshake.
    assert!(tap.connections() >= before + 2, "{}", tap.connections());
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("source reconnected"), "{err}");
    quit(&dir, &mut dst);
}

/// A peer with a valid, allowed certificate that is not the session's
/// names the session (its id read from the source's session record) while
/// post-copy runs, as a resumed control connection and as a fault
/// connection; then the link is cut. Both are refused as coming from
/// another certificate, and the real source's reconnection finishes the
/// move.
#[test]
fn another_certificate_cannot_take_over_a_session() {
    use ferry_engine::migration::record::SessionRecord;
    let dir = Scratch::new("tls-binding");
    let certs = dir.path("certs");
    gen_certs(&certs, &[]);
    // `dest` is allowed too, so the stranger (with dest.pem) gets past the
    // handshake: only the session binding can stop it.
    let (mut dst, addr) = tls_dest(
        &dir,
        &certs,
        &[
            "--tls-allow",
            "dest",
            "--peer-timeout",
            "2s",
            "--recovery-window",
            "30s",
        ],
    );
    let tap = Tap::start(&addr, false);
    let mem_file = MemFile::new("tls-binding");
    let (src, ctl) = start_slow_postcopy(&dir, &certs, &tap.addr, &["--mem-file", mem_file.arg()]);
    let record = SessionRecord::read(&SessionRecord::path_for(mem_file.path())).unwrap();
    let stranger = ClientTls::load(
        &TlsFiles {
            cert: certs.join("dest.pem"),
            key: certs.join("dest.key"),
            ca: certs.join("ca.pem"),
        },
        None,
    )
    .unwrap();
    // The listener takes connections only while the session looks for
    // some (here: after the cut), so the strangers wait in its backlog,
    // ahead of the source's reconnection.
    let strangers: Vec<_> = [Role::Control, Role::Fault]
        .into_iter()
        .map(|role| {
            let stranger = stranger.clone();
            let tcp = std::net::TcpStream::connect(&addr).unwrap();
            let session_id = record.session_id;
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let c = stranger.connect(tcp, "dest", deadline).unwrap();
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    role,
                    session_id,
                    features: features::RESUME | features::LZ4,
                    mem_size: 1 << 30,
                    vcpus: 1,
                    page_size: 4096,
                    options: Vec::new(),
                };
                write_frame(&mut &c, MsgType::Hello, 0, &hello.encode()).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut buf = Vec::new();
                match read_frame(&mut &c, &mut buf) {
                    Ok(h) => panic!("a stranger got {:?}", h.kind),
                    Err(e) => e.to_string(),
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    tap.cut();
    let stats = finish_move(&dir, src, ctl);
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
    // The strangers were refused with the reason (never `UnknownSession`,
    // which would tell a source its VM never ran here), and the session
    // went on without them.
    for t in strangers {
        let why = t.join().unwrap();
        assert!(
            why.contains("the session's peer had another certificate"),
            "{why}"
        );
    }
    let err = std::fs::read_to_string(dir.path("dst.err")).unwrap();
    assert!(err.contains("from another certificate"), "{err}");
    assert!(err.contains("source reconnected"), "{err}");
    quit(&dir, &mut dst);
}

/// splitmix64's finaliser, as the workload guest computes it.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The first 32 bytes of working-set page `p` at generation 0.
fn page_head(p: u64) -> Vec<u8> {
    let seed = mix64(p << 32);
    (0..4u64)
        .flat_map(|i| mix64(seed.wrapping_add(i)).to_le_bytes())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Moves a guest that never rewrites its pages (so they keep their
/// generation-0 pattern) through a recording tap, with or without TLS;
/// returns how many of the first 64 working-set pages' patterns and how
/// many `FERRYMIG` magics appear in what crossed the wire.
fn capture(tls: bool) -> (usize, usize, u64) {
    let dir = Scratch::new(if tls { "tls-wire" } else { "plain-wire" });
    let certs = dir.path("certs");
    let (mut dst, addr) = if tls {
        gen_certs(&certs, &[]);
        tls_dest(&dir, &certs, &[])
    } else {
        spawn_dest(&dir, "dst", &strs(&io_args(&dir, "dst", &[])))
    };
    let tap = Tap::start(&addr, true);
    let guest = "ws=16M pattern=random write=0 report_ms=50";
    let mut args = source_args(&dir, "128M", 1, guest, &tap.addr, "1s");
    if tls {
        args.extend(tls_args(&certs, "source"));
        args.extend(["--tls-server-name".into(), "dest".into()]);
    }
    run_source_move(&dir, &args);
    quit(&dir, &mut dst);
    let streams = tap.captured();
    let total: u64 = streams.iter().map(|(_, b)| b.len() as u64).sum();
    let pages = (0..64u64)
        .filter(|&p| {
            let head = page_head(p);
            streams.iter().any(|(_, b)| contains(b, &head))
        })
        .count();
    let magic = streams
        .iter()
        .map(|(_, b)| b.windows(8).filter(|w| w == b"FERRYMIG").count())
        .sum();
    (pages, magic, total)
}

/// Without TLS the guest's page pattern and the Hello magic cross the wire
/// in the clear (so the check can fail); with TLS neither does.
#[test]
fn the_wire_shows_no_guest_memory_under_tls() {
    let (pages, magic, total) = capture(false);
    println!("plain: {pages}/64 page patterns, {magic} FERRYMIG, {total} bytes");
    assert!(pages >= 32, "plaintext capture lacks the pattern: {pages}");
    assert!(magic >= 2, "plaintext capture lacks FERRYMIG: {magic}");
    let (pages, magic, total) = capture(true);
    println!("TLS: {pages}/64 page patterns, {magic} FERRYMIG, {total} bytes");
    assert!(total > 16 << 20, "the TLS capture is too small: {total}");
    assert_eq!(pages, 0, "guest memory in the clear under TLS");
    assert_eq!(magic, 0, "FERRYMIG in the clear under TLS");
}
