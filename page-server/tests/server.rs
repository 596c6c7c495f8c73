//! The page server against a fake destination over loopback TCP.

use std::fs::File;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_page_server::{serve, FileSource, PageSource, ServerConfig, ServerError, ServerStats};
use ferry_protocol::{
    self as protocol, decode_pages, read_frame, write_frame, MsgType, PageEncoding, PageRequest,
    ProtocolError, PAGE_SIZE,
};

mod support;
use support::{loopback_connections, memfd_of_pages};

type Outcome = Result<(ServerStats, serde_json::Value), ServerError>;

/// A memfd of `pages` pages with `fill(pfn)` written to every page that
/// returns `Some`; the others stay holes. Returns the file and its contents.
fn memfd(pages: u64, fill: impl Fn(u64) -> Option<Vec<u8>>) -> (Arc<File>, Vec<u8>) {
    let file = memfd_of_pages(c"ferry-test", pages);
    let mut image = vec![0u8; pages as usize * PAGE_SIZE];
    for pfn in 0..pages {
        if let Some(page) = fill(pfn) {
            let at = pfn as usize * PAGE_SIZE;
            image[at..at + PAGE_SIZE].copy_from_slice(&page);
            file.write_all_at(&page, at as u64).unwrap();
        }
    }
    (Arc::new(file), image)
}

fn random_page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PAGE_SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn text_page(seed: u64) -> Vec<u8> {
    let line = format!("page {seed:08} of the guest: the quick brown fox jumps\n");
    line.bytes().cycle().take(PAGE_SIZE).collect()
}

const PAGES: u64 = 4096;

/// The test guest: compressible, random, written-zero and hole regions, and
/// a mixed region where single zero pages sit between data pages. The
/// compressible pages come first, where the push surely tries LZ4: after
/// the random ones it may be resting from it (see the server's `LZ4_REST`).
fn pattern(pfn: u64) -> Option<Vec<u8>> {
    match pfn {
        0..76 => Some(text_page(pfn)),
        76..1100 | 3000..3200 | 4095 => Some(random_page(pfn)),
        1100..1400 => Some(vec![0; PAGE_SIZE]),
        2400..3000 => Some(match pfn % 5 {
            0 => vec![0; PAGE_SIZE],
            1 => text_page(pfn),
            _ => random_page(pfn),
        }),
        _ => None, // holes: 1400..2400, 3200..4095
    }
}

/// A server on one end of two loopback connections; the other ends, and the
/// server's outcome.
fn start(
    source: impl PageSource + 'static,
    cfg: ServerConfig,
) -> (TcpStream, TcpStream, mpsc::Receiver<Outcome>) {
    let [(dest_control, control), (dest_fault, fault)] = loopback_connections();
    for s in [&dest_control, &dest_fault] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(serve(control, fault, &source, &cfg));
    });
    (dest_control, dest_fault, rx)
}

/// A pushed frame as the destination saw it.
#[derive(Debug, Clone, Copy)]
struct Frame {
    first: u64,
    count: u64,
    encoding: PageEncoding,
}

/// What the control-connection reader saw.
#[derive(Default)]
struct Pushed {
    frames: Vec<Frame>,
    bytes: u64,
    /// From `PushDone`.
    stats: Option<ServerStats>,
}

/// Reads push frames into `seen` until `PushDone`, or until `stop` says so,
/// checking every page's contents.
fn read_push_until(
    control: &mut TcpStream,
    image: &[u8],
    pages: u64,
    seen: &mut Pushed,
    stop: impl Fn(&[Frame]) -> bool,
) {
    let (mut buf, mut data) = (Vec::new(), Vec::new());
    while !stop(&seen.frames) {
        let h = read_frame(control, &mut buf).unwrap();
        seen.bytes += (protocol::HEADER_LEN + buf.len()) as u64;
        match h.kind {
            MsgType::Pages => {
                let p = decode_pages(&buf, pages, &mut data).unwrap();
                let at = p.first_pfn as usize * PAGE_SIZE;
                let want = &image[at..at + p.count as usize * PAGE_SIZE];
                if p.encoding == PageEncoding::Zero {
                    assert!(protocol::is_zero(want), "zero frame at {}", p.first_pfn);
                } else {
                    assert!(
                        data == want,
                        "contents of pages {}+{}",
                        p.first_pfn,
                        p.count
                    );
                }
                seen.frames.push(Frame {
                    first: p.first_pfn,
                    count: u64::from(p.count),
                    encoding: p.encoding,
                });
            }
            MsgType::PushDone => {
                seen.stats = Some(protocol::from_json("PushDone", &buf).unwrap());
                return;
            }
            other => panic!("unexpected {other:?} on the control connection"),
        }
    }
}

/// Reads push frames until `PushDone`.
fn read_push(mut control: TcpStream, image: Arc<Vec<u8>>, pages: u64) -> Pushed {
    let mut seen = Pushed::default();
    read_push_until(&mut control, &image, pages, &mut seen, |_| false);
    seen
}

/// What the answers to some demand requests brought.
#[derive(Debug, Default)]
struct Answers {
    /// Bytes received, frame headers included.
    bytes: u64,
    /// Pages answered with a zero marker.
    zero: u64,
    /// Pages answered LZ4-compressed.
    lz4: u64,
}

impl Answers {
    fn add(&mut self, o: Answers) {
        self.bytes += o.bytes;
        self.zero += o.zero;
        self.lz4 += o.lz4;
    }
}

/// Sends the requests `(id, pfn, count)` back to back, then reads and checks
/// their answers in order.
fn demand(fault: &mut TcpStream, image: &[u8], reqs: &[(u64, u64, u32)]) -> Answers {
    let mut wire = Vec::new();
    for &(id, pfn, count) in reqs {
        let req = PageRequest {
            pfn,
            count,
            vcpu: 0,
        };
        write_frame(&mut wire, MsgType::PageRequest, id, &req.encode()).unwrap();
    }
    fault.write_all(&wire).unwrap();
    let (mut buf, mut data) = (Vec::new(), Vec::new());
    let mut got = Answers::default();
    for &(id, pfn, count) in reqs {
        let h = read_frame(fault, &mut buf).unwrap();
        got.bytes += (protocol::HEADER_LEN + buf.len()) as u64;
        assert_eq!((h.kind, h.arg), (MsgType::Pages, id));
        let p = decode_pages(&buf, PAGES, &mut data).unwrap();
        assert_eq!((p.first_pfn, p.count), (pfn, count));
        let want = &image[pfn as usize * PAGE_SIZE..(pfn + u64::from(count)) as usize * PAGE_SIZE];
        match p.encoding {
            PageEncoding::Zero => got.zero += u64::from(count),
            PageEncoding::Lz4 => got.lz4 += u64::from(count),
            PageEncoding::Raw => {}
        }
        if protocol::is_zero(want) {
            assert_eq!(
                p.encoding,
                PageEncoding::Zero,
                "zero page {pfn} answered with data"
            );
        } else {
            assert!(data == want, "answer for {pfn}+{count}");
        }
    }
    got
}

#[test]
fn push_and_demand_deliver_every_page() {
    let (file, image) = memfd(PAGES, pattern);
    let image = Arc::new(image);
    let cfg = ServerConfig {
        push_pages: 16,
        // Keeps the sweep from running far ahead of a destination that does
        // not read, so the locality check below is deterministic.
        push_sndbuf: Some(64 << 10),
        ..ServerConfig::default()
    };
    let started = Instant::now();
    let (mut control, mut fault, outcome) = start(FileSource::new(file, PAGES), cfg);

    // Demand does not move the push: a request for 3001..3003 while the
    // sweep is stuck in the first 4 MiB, nearly all random (the destination reads
    // nothing on the control connection) is answered on the fault
    // connection, and the sweep later steps over those pages. (Sent once
    // the push has begun.)
    control.peek(&mut [0u8; 1]).unwrap();
    let mut answers = demand(&mut fault, &image, &[(1, 3001, 2)]);
    let reader = {
        let (mut control, image) = (control.try_clone().unwrap(), image.clone());
        thread::spawn(move || {
            let mut pushed = Pushed::default();
            read_push_until(&mut control, &image, PAGES, &mut pushed, |_| false);
            (pushed, started.elapsed())
        })
    };

    // Demand during the push: one at a time, then a pipelined burst, over
    // data, zero pages, holes and the last page.
    let mut reqs = Vec::new();
    let mut id = 2;
    for i in 0..40u64 {
        let pfn = (i * 997 + 13) % PAGES;
        let count = (1 + i % 4).min(PAGES - pfn) as u32;
        answers.add(demand(&mut fault, &image, &[(id, pfn, count)]));
        reqs.push((pfn, count));
        id += 1;
    }
    let burst: Vec<(u64, u64, u32)> = (0..20u64)
        .map(|i| (id + i, (i * 211 + 7) % PAGES, 1))
        .collect();
    answers.add(demand(&mut fault, &image, &burst));
    let ends = [(id + 20, PAGES - 1, 1), (id + 21, 0, 512)];
    answers.add(demand(&mut fault, &image, &ends));
    reqs.extend(
        burst
            .iter()
            .chain(&ends)
            .map(|&(_, pfn, count)| (pfn, count)),
    );
    let (pushed, push_seen) = reader.join().unwrap();
    // After the push, demand is still served.
    let late = [(999, 1500, 3), (1000, 42, 1)];
    answers.add(demand(&mut fault, &image, &late));
    reqs.extend(late.iter().map(|&(_, pfn, count)| (pfn, count)));
    reqs.push((3001, 2));
    let requests = reqs.len() as u64;

    write_frame(
        &mut control,
        MsgType::Complete,
        0,
        br#"{"pages_received":4096}"#,
    )
    .unwrap();
    let (stats, complete) = outcome
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let served = started.elapsed();
    // `serve` hands back the destination's Complete payload.
    assert_eq!(complete["pages_received"], 4096);

    // One sweep from 0 upwards: no frame goes back (no jump, no wrap), and
    // the push skipped the pages sent on demand before it got there.
    let f = &pushed.frames;
    assert_eq!(f[0].first, 0);
    assert!(
        f.windows(2).all(|w| w[1].first >= w[0].first + w[0].count),
        "the push went back"
    );
    assert!(
        f.iter()
            .all(|fr| fr.first + fr.count <= 3001 || fr.first >= 3003),
        "pages sent on demand were pushed again"
    );

    // Every page pushed at most once, and pushed or asked for.
    let mut times = vec![0u32; PAGES as usize];
    for fr in f {
        for p in fr.first..fr.first + fr.count {
            times[p as usize] += 1;
            let at = p as usize * PAGE_SIZE;
            if protocol::is_zero(&image[at..at + PAGE_SIZE]) {
                assert_eq!(
                    fr.encoding,
                    PageEncoding::Zero,
                    "zero page {p} pushed as data"
                );
            }
        }
    }
    let mut asked = vec![false; PAGES as usize];
    for &(pfn, count) in &reqs {
        for p in pfn..pfn + u64::from(count) {
            asked[p as usize] = true;
        }
    }
    for p in 0..PAGES as usize {
        assert!(times[p] <= 1, "page {p} pushed {} times", times[p]);
        assert!(times[p] == 1 || asked[p], "page {p} never sent");
    }
    // The first request was answered while the sweep was still in the
    // first 1024 pages: its pages went as demand answers, never pushed.
    assert_eq!((times[3001], times[3002]), (0, 0), "demanded pages pushed");
    assert!(f.iter().any(|fr| fr.encoding == PageEncoding::Lz4));
    assert!(f.iter().any(|fr| fr.encoding == PageEncoding::Raw));

    // The server's accounting matches what arrived, exactly.
    let on = |e: PageEncoding| -> u64 {
        f.iter()
            .filter(|fr| fr.encoding == e)
            .map(|fr| fr.count)
            .sum()
    };
    let pushed_pages: u64 = f.iter().map(|fr| fr.count).sum();
    assert_eq!(stats.pages_pushed, pushed_pages);
    let done = pushed.stats.unwrap();
    assert_eq!(done.pages_pushed, pushed_pages, "PushDone's count");
    let demanded: u64 = reqs.iter().map(|&(_, c)| u64::from(c)).sum();
    assert_eq!(stats.pages_demand, demanded, "{stats:?}");
    assert_eq!(stats.requests, requests);
    assert_eq!(stats.bytes_wire, pushed.bytes + answers.bytes);
    assert_eq!(
        stats.pages_zero,
        on(PageEncoding::Zero) + answers.zero,
        "{stats:?}"
    );
    assert_eq!(
        stats.pages_lz4,
        on(PageEncoding::Lz4) + answers.lz4,
        "{stats:?}"
    );
    assert_eq!(
        stats.bytes_raw,
        (pushed_pages - on(PageEncoding::Zero) + demanded - answers.zero) * PAGE_SIZE as u64,
        "{stats:?}"
    );
    // Times: every answer was timed, and none took longer than this whole
    // session (µs, not some other unit). Not bounded by this side's round
    // trips: the server stamps an answer after its write call returns, which
    // a client on another core can beat by a scheduling delay.
    let s = stats.demand_service_us;
    assert!(s.p50 >= 1, "demand answers not timed: {s:?}");
    assert!(
        s.max as u128 <= served.as_micros(),
        "service time {s:?} µs, longer than the {served:?} session"
    );
    // (PushDone carries it as JSON, which may round the last digit.)
    assert!(
        (done.push_ms - stats.push_ms).abs() < 1e-6,
        "push time changed after PushDone: {} then {}",
        done.push_ms,
        stats.push_ms
    );
    assert!(stats.push_ms <= push_seen.as_secs_f64() * 1e3, "{stats:?}");
    // The push's CPU time is the server thread's own: some, and no more
    // than the push's wall time (one thread cannot run faster than the
    // clock; 1 ms for the two clocks' granularity).
    assert!(
        stats.push_cpu_ms > 0.0 && stats.push_cpu_ms <= stats.push_ms + 1.0,
        "push CPU {} ms against a {} ms push",
        stats.push_cpu_ms,
        stats.push_ms
    );
    assert!(stats.total_ms <= served.as_secs_f64() * 1e3, "{stats:?}");
}

#[test]
fn without_lz4_or_zero_runs_every_page_is_raw() {
    let pages = 300;
    let (file, image) = memfd(pages, |p| (p % 3 != 0).then(|| text_page(p)));
    let cfg = ServerConfig {
        lz4: false,
        zero_runs: false,
        push_pages: 64,
        push_sndbuf: None,
        ..Default::default()
    };
    let (mut control, _fault, outcome) = start(FileSource::new(file, pages), cfg);
    let pushed = read_push(control.try_clone().unwrap(), Arc::new(image), pages);
    write_frame(&mut control, MsgType::Complete, 0, b"{}").unwrap();
    let (stats, _) = outcome
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert!(pushed
        .frames
        .iter()
        .all(|f| f.encoding == PageEncoding::Raw));
    assert_eq!(pushed.frames.iter().map(|f| f.count).sum::<u64>(), pages);
    assert_eq!(pushed.frames.len(), 5); // 64-page frames
    assert_eq!(stats.bytes_raw, pages * PAGE_SIZE as u64);
    assert_eq!(
        (stats.pages_zero, stats.pages_lz4, stats.requests),
        (0, 0, 0)
    );
}

#[test]
fn empty_source_sends_push_done_at_once() {
    let (file, image) = memfd(0, |_| None);
    let (mut control, _fault, outcome) = start(FileSource::new(file, 0), ServerConfig::default());
    let pushed = read_push(control.try_clone().unwrap(), Arc::new(image), 0);
    assert!(pushed.frames.is_empty());
    write_frame(&mut control, MsgType::Complete, 0, b"null").unwrap();
    let (stats, v) = outcome
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert!(v.is_null());
    // PushDone came with no page before it, and it is all that was sent.
    assert!(pushed.stats.is_some(), "no PushDone");
    assert_eq!(stats.bytes_wire, pushed.bytes);
}

#[test]
fn file_source_finds_holes_and_refuses_out_of_range_reads() {
    let (file, image) = memfd(1000, |p| matches!(p, 10 | 600..602).then(|| random_page(p)));
    let src = FileSource::from_file(file).unwrap();
    assert_eq!(src.pages(), 1000);
    assert_eq!(src.next_data(0), Some(10));
    assert_eq!(src.next_data(10), Some(10));
    assert_eq!(src.next_data(11), Some(600));
    assert_eq!(src.next_data(602), None);
    assert_eq!(src.next_data(5000), None);
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    src.read(600, &mut buf).unwrap();
    assert!(buf == image[600 * PAGE_SIZE..602 * PAGE_SIZE]);
    assert!(src.read(999, &mut buf).is_err());
    assert!(src.read(u64::MAX, &mut buf).is_err());
    assert!(src.read(0, &mut buf[..100]).is_err());
}

/// Runs a server over a small guest, lets `attack` misbehave on the
/// destination's ends, and returns the server's error.
fn hostile(attack: impl FnOnce(&mut TcpStream, &mut TcpStream)) -> ServerError {
    let (file, _) = memfd(64, |p| Some(random_page(p)));
    let (mut control, mut fault, outcome) =
        start(FileSource::new(file, 64), ServerConfig::default());
    attack(&mut control, &mut fault);
    let r = outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("server hung");
    drop((control, fault));
    r.expect_err("server accepted hostile input")
}

fn frame(kind: MsgType, arg: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, kind, arg, payload).unwrap();
    v
}

fn request(pfn: u64, count: u32) -> Vec<u8> {
    frame(
        MsgType::PageRequest,
        1,
        &PageRequest {
            pfn,
            count,
            vcpu: 0,
        }
        .encode(),
    )
}

fn is_protocol(e: &ServerError, conn: &str, f: impl Fn(&ProtocolError) -> bool) -> bool {
    matches!(e, ServerError::Protocol { conn: c, source } if *c == conn && f(source))
}

/// Runs [`hostile`] with `attack` and checks that the server failed with a
/// protocol error on `conn` that `is` accepts.
#[track_caller]
fn assert_refused(
    conn: &str,
    attack: impl FnOnce(&mut TcpStream, &mut TcpStream),
    is: impl Fn(&ProtocolError) -> bool,
) {
    let e = hostile(attack);
    assert!(is_protocol(&e, conn, is), "{e}");
}

#[test]
fn hostile_fault_connection_is_an_error() {
    assert_refused(
        "fault",
        |_, f| f.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
        |p| matches!(p, ProtocolError::UnknownType(_)),
    );

    assert_refused(
        "fault",
        |_, f| f.write_all(&request(63, 2)).unwrap(),
        |p| matches!(p, ProtocolError::BadPages(_)),
    );

    assert_refused(
        "fault",
        |_, f| f.write_all(&request(u64::MAX - 1, 512)).unwrap(),
        |p| matches!(p, ProtocolError::BadPages(_)),
    );

    let mut long = request(0, 1);
    long[4] = 17; // a 17-byte PageRequest
    assert_refused(
        "fault",
        |_, f| f.write_all(&long).unwrap(),
        |p| matches!(p, ProtocolError::Length { .. }),
    );

    assert_refused(
        "fault",
        |_, f| f.write_all(&frame(MsgType::Complete, 0, b"{}")).unwrap(),
        |p| matches!(p, ProtocolError::Unexpected { .. }),
    );

    let e = hostile(|_, f| {
        f.write_all(&frame(MsgType::Abort, 0, b"out of memory"))
            .unwrap()
    });
    assert!(e.to_string().contains("out of memory"), "{e}");

    // A frame cut short by the peer closing the connection.
    assert_refused(
        "fault",
        |_, f| {
            f.write_all(&request(0, 1)[..20]).unwrap();
            f.shutdown(std::net::Shutdown::Write).unwrap();
        },
        |p| matches!(p, ProtocolError::Closed),
    );

    // The fault connection closes and no Complete follows.
    assert_refused(
        "fault",
        |_, f| f.shutdown(std::net::Shutdown::Write).unwrap(),
        |p| matches!(p, ProtocolError::Closed),
    );
}

#[test]
fn hostile_control_connection_is_an_error() {
    assert_refused(
        "control",
        |c, _| c.write_all(&[0xff; 40]).unwrap(),
        |p| matches!(p, ProtocolError::UnknownType(_)),
    );

    assert_refused(
        "control",
        |c, _| c.write_all(&request(0, 1)).unwrap(),
        |p| matches!(p, ProtocolError::Unexpected { .. }),
    );

    assert_refused(
        "control",
        |c, _| {
            c.write_all(&frame(MsgType::Abort, 0, b"disk full"))
                .unwrap()
        },
        |p| matches!(p, ProtocolError::Aborted(w) if w == "disk full"),
    );

    assert_refused(
        "control",
        |c, _| {
            c.write_all(&frame(MsgType::Complete, 0, b"{not json"))
                .unwrap()
        },
        |p| matches!(p, ProtocolError::BadJson { .. }),
    );

    let mut huge = frame(MsgType::Complete, 0, b"");
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_refused(
        "control",
        |c, _| c.write_all(&huge).unwrap(),
        |p| matches!(p, ProtocolError::Length { .. }),
    );

    assert_refused(
        "control",
        |c, _| c.shutdown(std::net::Shutdown::Write).unwrap(),
        |p| matches!(p, ProtocolError::Closed),
    );
}
