//! Post-copy page server benchmark over loopback TCP.
//!
//! 1. Push throughput: guest MiB/s and wire MiB/s for 256 MiB of zero,
//!    compressible and random pages (and of a never-touched memfd).
//! 2. Demand latency, request sent → answer fully received at the fake
//!    destination, for random single-page requests while the background push
//!    runs on the control connection, and after it is over.
//!
//! `cargo bench -p ferry-page-server` runs the full sizes; without `--bench`
//! (as under `cargo test --benches`) it runs a quick smoke version.
//! `FERRY_BENCH_PUSH_PAGES` sets the pages per push frame (default 256).

use std::fs::File;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use ferry_page_server::{serve, FileSource, ServerConfig, ServerStats};
use ferry_protocol::{
    decode_pages, read_frame, write_frame, MsgType, PageRequest, HEADER_LEN, PAGE_SIZE,
};
use hdrhistogram::Histogram;
use serde_json::json;

#[path = "../page-server/tests/support/mod.rs"]
mod support;
use support::{loopback_connections, memfd_of_pages};

const MIB: f64 = (1 << 20) as f64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hole,
    Zero,
    Text,
    Random,
    Mixed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Hole => "hole",
            Kind::Zero => "zero",
            Kind::Text => "compressible",
            Kind::Random => "random",
            Kind::Mixed => "mixed",
        }
    }
}

/// A memfd of `pages` pages filled with `kind`.
fn guest(pages: u64, kind: Kind) -> Arc<File> {
    let file = memfd_of_pages(c"ferry-bench", pages);
    if kind != Kind::Hole {
        let chunk_pages = 256u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; chunk_pages as usize * PAGE_SIZE];
        for (i, first) in (0..pages).step_by(chunk_pages as usize).enumerate() {
            let random = kind == Kind::Random || (kind == Kind::Mixed && i % 2 == 0);
            let text = kind == Kind::Text || (kind == Kind::Mixed && i % 2 == 1);
            if random {
                for w in chunk.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            } else if text {
                for (p, page) in chunk.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    let line = format!(
                        "pfn {:010} guest page cache: lorem ipsum dolor\n",
                        first + p as u64
                    );
                    for (d, s) in page.iter_mut().zip(line.bytes().cycle()) {
                        *d = s;
                    }
                }
            }
            let n = chunk_pages.min(pages - first) as usize * PAGE_SIZE;
            file.write_all_at(&chunk[..n], first * PAGE_SIZE as u64)
                .unwrap();
        }
    }
    Arc::new(file)
}

/// Pages per push frame: `FERRY_BENCH_PUSH_PAGES`, default 256.
fn push_pages() -> u32 {
    std::env::var("FERRY_BENCH_PUSH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A running server and the destination's ends of its connections.
struct Session {
    control: TcpStream,
    fault: TcpStream,
    server: JoinHandle<ServerStats>,
}

fn start(file: Arc<File>, pages: u64) -> Session {
    let [(control, src_control), (fault, src_fault)] = loopback_connections();
    fault.set_nodelay(true).unwrap();
    let server = thread::spawn(move || {
        let source = FileSource::new(file, pages);
        let cfg = ServerConfig {
            push_pages: push_pages(),
            ..ServerConfig::default()
        };
        serve(src_control, src_fault, &source, &cfg).unwrap().0
    });
    Session {
        control,
        fault,
        server,
    }
}

impl Session {
    fn complete(mut self) -> ServerStats {
        write_frame(&mut self.control, MsgType::Complete, 0, b"{}").unwrap();
        self.server.join().unwrap()
    }
}

/// Reads and decodes push frames until `PushDone`; returns the wire bytes.
fn drain_push(mut control: TcpStream, pages: u64, done: &AtomicBool) -> u64 {
    let (mut buf, mut data) = (Vec::new(), Vec::new());
    let mut wire = 0;
    loop {
        let h = read_frame(&mut control, &mut buf).unwrap();
        wire += (HEADER_LEN + buf.len()) as u64;
        match h.kind {
            MsgType::Pages => {
                decode_pages(&buf, pages, &mut data).unwrap();
            }
            MsgType::PushDone => {
                done.store(true, Ordering::SeqCst);
                return wire;
            }
            k => panic!("unexpected {k:?}"),
        }
    }
}

struct PushResult {
    kind: Kind,
    secs: f64,
    wire: u64,
    stats: ServerStats,
}

fn bench_push(pages: u64, kind: Kind) -> PushResult {
    let file = guest(pages, kind);
    let t = Instant::now();
    let s = start(file, pages);
    let wire = drain_push(
        s.control.try_clone().unwrap(),
        pages,
        &AtomicBool::new(false),
    );
    let secs = t.elapsed().as_secs_f64();
    let stats = s.complete();
    PushResult {
        kind,
        secs,
        wire,
        stats,
    }
}

/// One request → answer round trip, in microseconds.
fn round_trip(fault: &mut TcpStream, id: u64, pfn: u64, buf: &mut Vec<u8>) -> u64 {
    let mut frame = Vec::with_capacity(32);
    let req = PageRequest {
        pfn,
        count: 1,
        vcpu: 0,
    };
    write_frame(&mut frame, MsgType::PageRequest, id, &req.encode()).unwrap();
    let t = Instant::now();
    fault.write_all(&frame).unwrap();
    let h = read_frame(fault, buf).unwrap();
    let us = t.elapsed().as_micros() as u64;
    assert_eq!((h.kind, h.arg), (MsgType::Pages, id));
    us.max(1)
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "n": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    })
}

/// Demand latency with the push running, then with it over.
fn bench_demand(pages: u64, want: u64) -> (Histogram<u64>, Histogram<u64>, u32, ServerStats) {
    let file = guest(pages, Kind::Mixed);
    let mut busy = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let mut idle = busy.clone();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next_pfn = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % pages
    };
    let mut buf = Vec::new();
    let mut runs = 0;
    loop {
        runs += 1;
        let mut s = start(file.clone(), pages);
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (control, done) = (s.control.try_clone().unwrap(), done.clone());
            thread::spawn(move || drain_push(control, pages, &done))
        };
        let mut id = 0;
        while !done.load(Ordering::SeqCst) {
            id += 1;
            let us = round_trip(&mut s.fault, id, next_pfn(), &mut buf);
            // Only answers that arrived while the push was still going.
            if !done.load(Ordering::SeqCst) {
                busy.record(us).unwrap();
            }
        }
        reader.join().unwrap();
        let last = busy.len() >= want || runs >= 20;
        if last {
            while idle.len() < want {
                id += 1;
                idle.record(round_trip(&mut s.fault, id, next_pfn(), &mut buf))
                    .unwrap();
            }
        }
        let stats = s.complete();
        if last {
            return (busy, idle, runs, stats);
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (mib, requests) = if full { (256u64, 2000u64) } else { (8, 200) };
    let pages = mib << 20 >> 12;
    println!(
        "page server bench: {mib} MiB guests over loopback TCP (lz4, zero runs, {}-page frames)\n",
        push_pages()
    );

    println!(
        "{:<14} {:>9} {:>13} {:>12} {:>11} {:>10}",
        "push", "secs", "guest MiB/s", "wire MiB/s", "wire MiB", "push_ms"
    );
    let mut push_json = Vec::new();
    for kind in [Kind::Hole, Kind::Zero, Kind::Text, Kind::Random] {
        let r = bench_push(pages, kind);
        assert_eq!(
            r.stats.bytes_wire, r.wire,
            "server and destination disagree"
        );
        let guest = mib as f64 / r.secs;
        let wire = r.wire as f64 / MIB / r.secs;
        println!(
            "{:<14} {:>9.3} {:>13.0} {:>12.0} {:>11.2} {:>10.1}",
            r.kind.name(),
            r.secs,
            guest,
            wire,
            r.wire as f64 / MIB,
            r.stats.push_ms
        );
        push_json.push(json!({
            "kind": r.kind.name(),
            "mib": mib,
            "secs": r.secs,
            "guest_mib_s": guest,
            "wire_mib_s": wire,
            "wire_bytes": r.wire,
            "pages_zero": r.stats.pages_zero,
            "pages_lz4": r.stats.pages_lz4,
        }));
    }

    let (busy, idle, runs, stats) = bench_demand(pages, requests);
    let ratio = busy.value_at_quantile(0.99) as f64 / idle.value_at_quantile(0.99).max(1) as f64;
    println!(
        "\n{:<30} {:>7} {:>8} {:>8} {:>8}",
        "demand latency (1 page, µs)", "n", "p50", "p99", "max"
    );
    for (name, h) in [
        ("no background push", &idle),
        ("during background push", &busy),
    ] {
        println!(
            "{:<30} {:>7} {:>8} {:>8} {:>8}",
            name,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    println!(
        "p99 ratio (push / no push): {ratio:.2}  ({runs} push run(s) of {mib} MiB mixed pages)"
    );
    let sv = stats.demand_service_us;
    println!(
        "server-side service time of the last run: p50 {} µs, p99 {} µs, max {} µs",
        sv.p50, sv.p99, sv.max
    );
    let line = json!({
        "bench": "page_server",
        "mib": mib,
        "push_pages": push_pages(),
        "push": push_json,
        "demand": {
            "no_push": summary(&idle),
            "during_push": summary(&busy),
            "p99_ratio": ratio,
            "push_runs": runs,
            "server_service_us": sv,
        },
    });
    println!("\n{line}");
}
