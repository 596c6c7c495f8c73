//! Wire protocol encode/decode cost, in memory (no I/O).
//!
//! 1. `Pages` frames of zero, compressible (repeating text and small
//!    integers) and random pages, 1, 64 and 512 pages per frame, with LZ4
//!    and zero runs on: `encode_pages` (allocates the payload),
//!    `append_pages_frame` (into a reused buffer) and `decode_pages` (into a
//!    reused buffer). Throughput is guest bytes (4 KiB per page) per second.
//! 2. The small messages: `FrameHeader`, `PageRequest` and `Hello`
//!    encode/decode, in ns per operation.
//!
//! Inputs are the same cache-warm buffers on every iteration. Each figure is
//! the median of several timed samples.
//!
//! `cargo bench -p ferry-page-server --bench protocol_codec` runs the full
//! version; without `--bench` (as under `cargo test --benches`) it runs a
//! quick smoke version.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ferry_protocol::{
    append_pages_frame, decode_pages, encode_pages, features, FrameHeader, Hello, MsgType,
    PageEncoding, PageRequest, Role, HEADER_LEN, PAGE_SIZE, PROTOCOL_VERSION,
};
use serde_json::json;

const FRAME_PAGES: [usize; 3] = [1, 64, 512];
/// Bounds page numbers in `decode_pages`: any frame here is in range.
const MEM_PAGES: u64 = 1 << 40;

#[derive(Clone, Copy)]
enum Kind {
    Zero,
    Text,
    Ints,
    Random,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Zero => "zero",
            Kind::Text => "text",
            Kind::Ints => "small-ints",
            Kind::Random => "random",
        }
    }
}

/// `pages` pages of `kind`.
fn pages_of(kind: Kind, pages: usize) -> Vec<u8> {
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        Kind::Zero => {}
        Kind::Text => {
            for (p, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                let line = format!("pfn {p:010} guest page cache: lorem ipsum dolor\n");
                for (d, s) in page.iter_mut().zip(line.bytes().cycle()) {
                    *d = s;
                }
            }
        }
        Kind::Ints => {
            // Little-endian u32s below 256: a typical table of counters.
            for w in buf.chunks_exact_mut(4) {
                w.copy_from_slice(&((next() % 256) as u32).to_le_bytes());
            }
        }
        Kind::Random => {
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&next().to_le_bytes());
            }
        }
    }
    buf
}

/// Timing settings: samples per measurement and the target time of each.
#[derive(Clone, Copy)]
struct Timing {
    samples: usize,
    sample: Duration,
}

/// Median ns per call of `f`.
fn time_ns(t: Timing, mut f: impl FnMut()) -> f64 {
    // Calibrate: double the iterations until one batch takes 1/10 sample.
    let mut iters = 1u64;
    loop {
        let s = Instant::now();
        for _ in 0..iters {
            f();
        }
        if s.elapsed() * 10 >= t.sample || iters >= 1 << 30 {
            break;
        }
        iters *= 2;
    }
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let per = start.elapsed().as_secs_f64() / iters as f64;
    let iters = ((t.sample.as_secs_f64() / per.max(1e-10)) as u64).max(1);
    let mut samples: Vec<f64> = (0..t.samples)
        .map(|_| {
            let s = Instant::now();
            for _ in 0..iters {
                f();
            }
            s.elapsed().as_secs_f64() * 1e9 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn encoding_name(e: PageEncoding) -> &'static str {
    match e {
        PageEncoding::Raw => "raw",
        PageEncoding::Lz4 => "lz4",
        PageEncoding::Zero => "zero",
    }
}

/// Times `encode` of `msg`, and `decode` of the bytes it gives: the
/// `NAME::encode` and `NAME::decode` rows.
fn time_codec<M, B, D>(
    t: Timing,
    name: &str,
    msg: &M,
    encode: impl Fn(&M) -> B,
    decode: impl Fn(&B) -> D,
) -> [(String, f64); 2] {
    let bytes = encode(msg);
    [
        (
            format!("{name}::encode"),
            time_ns(t, || {
                black_box(encode(black_box(msg)));
            }),
        ),
        (
            format!("{name}::decode"),
            time_ns(t, || {
                black_box(decode(black_box(&bytes)));
            }),
        ),
    ]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let t = if full {
        Timing {
            samples: 5,
            sample: Duration::from_millis(50),
        }
    } else {
        Timing {
            samples: 1,
            sample: Duration::from_millis(2),
        }
    };
    println!(
        "protocol codec bench: in-memory, LZ4 + zero runs, median of {} x {} ms samples\n",
        t.samples,
        t.sample.as_millis()
    );

    println!(
        "{:<11} {:>6} {:>5} {:>7} {:>21} {:>21} {:>21}",
        "pages", "/frame", "enc", "ratio", "encode_pages", "append_pages_frame", "decode_pages"
    );
    println!(
        "{:<11} {:>6} {:>5} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "", "", "", "GB/s", "µs/frame", "GB/s", "µs/frame", "GB/s", "µs/frame"
    );
    let mut frames_json = Vec::new();
    for kind in [Kind::Zero, Kind::Text, Kind::Ints, Kind::Random] {
        let all = pages_of(kind, *FRAME_PAGES.iter().max().unwrap_or(&1));
        for n in FRAME_PAGES {
            let data = &all[..n * PAGE_SIZE];
            let bytes = data.len() as f64;

            let payload = encode_pages(7, data, true, true);
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            let encoding = append_pages_frame(&mut out, &mut scratch, 0, 7, data, true, true);
            assert_eq!(&out[HEADER_LEN..], &payload[..], "encoders disagree");
            let mut decoded = Vec::new();
            let h = decode_pages(&payload, MEM_PAGES, &mut decoded).expect("decode");
            assert_eq!((h.first_pfn, h.count, h.encoding), (7, n as u32, encoding));
            if encoding != PageEncoding::Zero {
                assert_eq!(&decoded[..], data, "round trip changed the pages");
            }
            let ratio = bytes / payload.len() as f64;

            let enc = time_ns(t, || {
                black_box(encode_pages(7, black_box(data), true, true));
            });
            let app = time_ns(t, || {
                out.clear();
                black_box(append_pages_frame(
                    &mut out,
                    &mut scratch,
                    0,
                    7,
                    black_box(data),
                    true,
                    true,
                ));
            });
            let dec = time_ns(t, || {
                black_box(decode_pages(black_box(&payload), MEM_PAGES, &mut decoded).ok());
            });
            // bytes per ns is GB/s.
            println!(
                "{:<11} {:>6} {:>5} {:>7.1} {:>10.2} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>10.3}",
                kind.name(),
                n,
                encoding_name(encoding),
                ratio,
                bytes / enc,
                enc / 1e3,
                bytes / app,
                app / 1e3,
                bytes / dec,
                dec / 1e3,
            );
            frames_json.push(json!({
                "kind": kind.name(),
                "pages": n,
                "encoding": encoding_name(encoding),
                "payload_bytes": payload.len(),
                "ratio": ratio,
                "encode_pages": { "ns": enc, "gb_s": bytes / enc },
                "append_pages_frame": { "ns": app, "gb_s": bytes / app },
                "decode_pages": { "ns": dec, "gb_s": bytes / dec },
            }));
        }
    }

    let header = FrameHeader {
        kind: MsgType::Pages,
        flags: 0,
        len: 4096,
        arg: 0x1234_5678,
    };
    let header_bytes = header.encode();
    let req = PageRequest {
        pfn: 123_456,
        count: 1,
        vcpu: 3,
    };
    let req_bytes = req.encode();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id: 0xfeed_f00d,
        features: features::LZ4 | features::ZERO_RUNS,
        mem_size: 4 << 30,
        vcpus: 4,
        page_size: PAGE_SIZE as u32,
        options: Vec::new(),
    };
    let hello_bytes = hello.encode();
    assert_eq!(FrameHeader::decode(&header_bytes).expect("header"), header);
    assert_eq!(
        PageRequest::decode(&req_bytes, MEM_PAGES).expect("req"),
        req
    );
    assert_eq!(Hello::decode(&hello_bytes).expect("hello"), hello);

    let small: Vec<(String, f64)> = [
        time_codec(t, "FrameHeader", &header, FrameHeader::encode, |b| {
            FrameHeader::decode(b).ok()
        }),
        time_codec(t, "PageRequest", &req, PageRequest::encode, |b| {
            PageRequest::decode(b, MEM_PAGES).ok()
        }),
        time_codec(t, "Hello", &hello, Hello::encode, |b| Hello::decode(b).ok()),
    ]
    .concat();
    println!("\n{:<22} {:>8}", "message", "ns/op");
    for (name, ns) in &small {
        println!("{name:<22} {ns:>8.1}");
    }

    let line = json!({
        "bench": "protocol_codec",
        "samples": t.samples,
        "sample_ms": t.sample.as_millis() as u64,
        "frames": frames_json,
        "messages": small
            .iter()
            .map(|(name, ns)| json!({ "op": name, "ns": ns }))
            .collect::<Vec<_>>(),
    });
    println!("\n{line}");
}
