//! virtio-net on real KVM: the workload guest (`net=1`) exchanges UDP
//! datagrams with an echo peer through a tap on a bridge, in network
//! namespaces this test makes (`ferry_tools::netns`, each side with a
//! bridge `br0` holding its end of the veth and a tap for the VM, so both
//! sides are one Ethernet). Across a post-copy move the echo stream
//! continues; the destination's announce (RARP and gratuitous ARP) is
//! captured on its bridge; a snapshot keeps the card and a clone restored
//! with `--net` uses its own MAC.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use ferry_guest::{parse_line, GuestLine};
use ferry_tools::netns::{Net, Side};

const WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 7777;
const TAP: &str = "ftap0";
const MAC: &str = "52:54:00:4e:45:01";
const MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x4e, 0x45, 0x01];

fn two_bridged_hosts(tag: &str, subnet: u8) -> Net {
    let net = Net::tagged(tag, tag, subnet, None).unwrap_or_else(|e| panic!("netns {tag}: {e}"));
    for side in [Side::Source, Side::Dest] {
        net.bridge_with_tap(side, TAP)
            .unwrap_or_else(|e| panic!("bridge {tag}: {e}"));
    }
    net
}

/// `net=1` guest arguments for subnet `s`: the guest is .50, the peer .1.
fn guest_args(s: u8) -> String {
    format!("ws=8M report_ms=100 net=1 net_ip=10.77.{s}.50 net_peer=10.77.{s}.1 net_ms=10")
}

/// What the echo peer saw.
#[derive(Debug, Default, Clone)]
struct EchoStats {
    received: u64,
    highest: Option<u64>,
    /// Numbers missing below the highest one received (gaps).
    gaps: u64,
    /// Longest run of consecutive missing numbers.
    longest_gap: u64,
}

/// A UDP echo peer on `side`'s namespace at `ip:PORT`, counting gaps in
/// the guest's sequence numbers (payload word 1).
struct Echo {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<EchoStats>>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(net: &Arc<Net>, side: Side, ip: String) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(EchoStats::default()));
        let (n, st, s) = (net.clone(), stop.clone(), stats.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            n.enter(side).unwrap();
            let sock = UdpSocket::bind((ip.as_str(), PORT)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if len >= 16 {
                    let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                    let mut e = s.lock().unwrap();
                    e.received += 1;
                    let next = e.highest.map_or(0, |h| h + 1);
                    if seq > next {
                        e.gaps += seq - next;
                        e.longest_gap = e.longest_gap.max(seq - next);
                    }
                    e.highest = Some(e.highest.map_or(seq, |h| h.max(seq)));
                }
                let _ = sock.send_to(&buf[..len], from);
            }
        });
        rx.recv_timeout(WAIT).expect("the echo peer to bind");
        Echo {
            stop,
            stats,
            thread: Some(thread),
        }
    }

    fn stats(&self) -> EchoStats {
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Announce frames from `mac` seen on `br0` of `side`: (RARP, gratuitous
/// ARP), captured with an AF_PACKET socket.
struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<(u64, u64)>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn start(net: &Arc<Net>, side: Side, mac: [u8; 6]) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((0, 0)));
        let (n, st, s) = (net.clone(), stop.clone(), seen.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            n.enter(side).unwrap();
            let fd = packet_socket("br0");
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                // SAFETY: `buf` is writable for its length; `fd` is open.
                let len = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if len < 42 {
                    continue;
                }
                let f = &buf[..len as usize];
                if f[6..12] != mac {
                    continue;
                }
                let mut s = s.lock().unwrap();
                match [f[12], f[13]] {
                    [0x80, 0x35] => s.0 += 1,
                    // Gratuitous: sender and target address are one.
                    [0x08, 0x06] if f[28..32] == f[38..42] && f[22..28] == mac => s.1 += 1,
                    _ => {}
                }
            }
            // SAFETY: `fd` is ours and closed once.
            unsafe { libc::close(fd) };
        });
        rx.recv_timeout(WAIT).expect("the capture to start");
        Capture {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> (u64, u64) {
        *self.seen.lock().unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw packet socket on interface `dev`, with a 100 ms receive timeout.
fn packet_socket(dev: &str) -> i32 {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: `name` is a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {dev}");
    // SAFETY: sockaddr_ll is plain data; all zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(r, 0);
    fd
}

/// The `FERRY NET` reports in a console log: (host µs, sent, echoed, lost).
fn net_lines(log: &[Logged]) -> Vec<(u64, u64, u64, u64)> {
    log.iter()
        .filter_map(|l| match parse_line(&l.text) {
            GuestLine::Net {
                sent, echoed, lost, ..
            } => Some((l.host_us, sent, echoed, lost)),
            _ => None,
        })
        .collect()
}

/// Waits until the log at `path` has a NET line with `echoed` above `min`.
fn wait_echoed(path: &Path, min: u64) -> (u64, u64, u64, u64) {
    wait_for(
        WAIT,
        &format!("echoes above {min} in {}", path.display()),
        || {
            net_lines(&read_console(path))
                .last()
                .copied()
                .filter(|l| l.2 > min)
        },
    )
}

/// Boots the networked guest of subnet `s` in a 64M `ferry-source` in the
/// source's namespace (console `src.log`, API `src.sock` in `dir`).
fn start_source(net: &Net, dir: &Scratch, s: u8) -> Proc {
    let guest = guest_args(s);
    let net_arg = format!("tap={TAP},mac={MAC}");
    let args = console_args(
        dir,
        "src",
        &["--mem", "64M", "--guest-args", &guest, "--net", &net_arg],
    );
    spawn_on(
        net,
        Side::Source,
        "ferry-source",
        &strs(&args),
        &dir.path("src.err"),
    )
}

fn assert_no_bad(path: &Path) {
    let bad = bad_lines(&read_console(path));
    assert!(bad.is_empty(), "{}: {bad:?}", path.display());
}

#[test]
fn guest_exchanges_datagrams_through_a_tap_on_a_bridge() {
    let net = Arc::new(two_bridged_hosts("fnet1", 211));
    let dir = Scratch::new("net-echo");
    let echo = Echo::start(&net, Side::Source, "10.77.211.1".into());
    let _src = start_source(&net, &dir, 211);
    let log = dir.path("src.log");
    let (_, sent, echoed, lost) = wait_echoed(&log, 100);
    assert_no_bad(&log);
    let e = echo.stats();
    println!("sent {sent} echoed {echoed} lost {lost}; peer: {e:?}");
    assert!(e.received >= echoed);
    let status = ctl(&dir.path("src.sock"), &["status"]);
    println!("{}", status["devices"]);
    ctl(&dir.path("src.sock"), &["quit"]);
}

/// A post-copy move from the source's namespace to the destination's: the
/// echo peer stays on the source's side, the guest's stream continues on
/// the destination's tap, and the destination's announce crosses its
/// bridge. Frames lost are reported next to what the downtime and the
/// announce explain.
#[test]
fn echo_stream_continues_across_a_postcopy_move_and_the_destination_announces() {
    let s = 212;
    let net = Arc::new(two_bridged_hosts("fnet2", s));
    let dir = Scratch::new("net-move");
    let echo = Echo::start(&net, Side::Source, format!("10.77.{s}.1"));
    let capture = Capture::start(&net, Side::Dest, MAC_BYTES);
    let dst_err = dir.path("dst.err");
    let mut dst = spawn_on(
        &net,
        Side::Dest,
        "ferry-dest",
        &strs(&dest_args(&dir, &net.dest_ip().to_string())),
        &dst_err,
    );
    let to = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dst_err);
    let guest = guest_args(s);
    let net_arg = format!("tap={TAP},mac={MAC}");
    let mut args = source_args(&dir, "64M", 1, &guest, &to, "3s");
    args.extend(["--net".to_string(), net_arg]);
    let src = spawn_on(
        &net,
        Side::Source,
        "ferry-source",
        &strs(&args),
        &dir.path("src.err"),
    );
    let stats = finish_source(&dir, src);
    let src_log = dir.path("src.log");
    let dst_log = dir.path("dst.log");
    let before = net_lines(&read_console(&src_log));
    let last_before = *before.last().expect("NET lines before the move");
    assert!(
        last_before.2 > 0,
        "no echo before the move: {last_before:?}"
    );
    // The stream goes on: 2 s more of echoes on the destination.
    let after = wait_echoed(&dst_log, last_before.2 + 200);
    // Every announce round has gone out by now (0.8 s after the resume).
    let status = ctl(&dir.path("dst.sock"), &["status"]);
    let dev = &status["devices"][0];
    println!("destination's card: {dev}");
    // The device wrote five rounds (its stats say so); the bridge drops
    // the first ones while the tap's port is still coming up (the carrier
    // rises when Ferry attaches, and the kernel reports it late), so only
    // some of them need to cross it.
    assert_eq!(dev["announce_frames"], 10, "{dev}");
    let (rarp, garp) = wait_for(WAIT, "the announce on the destination's bridge", || {
        let seen = capture.seen();
        (seen.0 >= 1 && seen.1 >= 1).then_some(seen)
    });
    assert_no_bad(&src_log);
    assert_no_bad(&dst_log);
    assert_eq!(dev["announce_rounds"], 5, "{dev}");
    assert_eq!(dev["kind"], "net");
    let e = echo.stats();
    let down_us = stats["downtime_us"].as_u64().unwrap_or(0);
    // The guest sends every 10 ms: what the downtime alone explains.
    let explained = down_us / 10_000 + 1;
    println!(
        "move: downtime {} ms; guest lost {} datagrams ({} sent, {} echoed); peer saw {} \
         gaps (longest {}); downtime explains {} at 100/s; announce: {rarp} RARP, {garp} \
         gratuitous ARP on the destination's bridge",
        down_us / 1000,
        after.3,
        after.1,
        after.2,
        e.gaps,
        e.longest_gap,
        explained
    );
    // Post-copy: the guest runs (and sends) on the destination as soon as
    // the switch-over commits; the bridge learns its MAC from its first
    // frame or the first RARP, so what is lost is what falls in the
    // downtime plus the frames in flight, with a second of slack.
    assert!(
        after.3 <= explained + 100,
        "lost {} datagrams, downtime explains {explained}",
        after.3
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    let _ = dst.0.wait();
}

/// A snapshot keeps the card: restored as it was, the guest's echo stream
/// goes on with the saved tap and MAC. A clone restored from the same
/// snapshot with `--net tap=...,mac=...` uses its own MAC: the guest reads
/// it from its card (`FERRY NETMAC`), its echoes go on, and the clone's
/// announce from that MAC crosses the bridge.
#[test]
fn a_snapshot_keeps_the_card_and_a_clone_gets_its_own_mac() {
    let s = 213;
    let net = Arc::new(two_bridged_hosts("fnet3", s));
    let dir = Scratch::new("net-snap");
    let _echo = Echo::start(&net, Side::Source, format!("10.77.{s}.1"));
    let _src = start_source(&net, &dir, s);
    let (_, _, echoed, _) = wait_echoed(&dir.path("src.log"), 50);
    let sock = dir.path("src.sock");
    ctl(&sock, &["pause"]);
    let snap = dir.path("vm.snap");
    ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    ctl(&sock, &["quit"]);
    assert_no_bad(&dir.path("src.log"));

    const CLONE_MAC: &str = "52:54:00:4e:45:02";
    const CLONE_MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x4e, 0x45, 0x02];
    for (name, extra) in [
        ("same", Vec::new()),
        ("clone", vec![format!("tap={TAP},mac={CLONE_MAC}")]),
    ] {
        let capture = Capture::start(&net, Side::Source, CLONE_MAC_BYTES);
        let mut args = vec!["--restore".to_string(), snap.to_string_lossy().into_owned()];
        for n in &extra {
            args.extend(["--net".to_string(), n.clone()]);
        }
        let args = console_args(&dir, name, &strs(&args));
        let _vm = spawn_on(
            &net,
            Side::Source,
            "ferry-dest",
            &strs(&args),
            &dir.path(&format!("{name}.err")),
        );
        let log = dir.path(&format!("{name}.log"));
        // The rounds continue from the snapshot's, and the echoes with them.
        wait_echoed(&log, echoed + 100);
        assert_no_bad(&log);
        let macs: Vec<String> = read_console(&log)
            .iter()
            .filter_map(|l| match parse_line(&l.text) {
                GuestLine::NetMac(m) => Some(m),
                _ => None,
            })
            .collect();
        if extra.is_empty() {
            assert!(macs.is_empty(), "{name}: the card's MAC changed: {macs:?}");
        } else {
            assert_eq!(macs, [CLONE_MAC], "{name}: the guest's view of its MAC");
            let (rarp, _) = wait_for(WAIT, "the clone's announce on the bridge", || {
                let seen = capture.seen();
                (seen.0 >= 1).then_some(seen)
            });
            println!("clone: {rarp} RARP from {CLONE_MAC} on the bridge");
        }
        ctl(&dir.path(&format!("{name}.sock")), &["quit"]);
    }
}
