//! Fuzzing of every parser of untrusted input, on the stable toolchain.
//!
//! Each target is a function from bytes to `Ok`/`Err` that must never panic.
//! Inputs are mutations of valid encodings made by the real encoders: bit
//! flips, interesting bytes and integers written over length fields, byte
//! insertion, deletion, duplication, truncation and splicing of seeds, and
//! (for the JSON parsers) JSON tokens. Checksummed formats are often
//! re-sealed after mutation (structure-aware fix-ups) so that the parser,
//! not the CRC, has to cope. Inputs that the parser accepts or that make it
//! answer with an error of a kind not seen before join the corpus (a cheap
//! behaviour-guided search).
//!
//! A counting global allocator records the largest single allocation made
//! while a target runs; it must stay within a limit derived from the input:
//! `max(64 KiB, 4 x input length)` plus the sizes that the format declares
//! and the parser checks (e.g. a frame's length, a `Pages` frame's page
//! count). See `docs/security.md`.
//!
//! Environment: `FERRY_FUZZ_ITERS` (inputs per target, default 20000),
//! `FERRY_FUZZ_SEED` (default fixed), `FERRY_FUZZ_REPLAY=FILE` (run one saved
//! input through the selected target). A failure saves its input and prints
//! the command that replays it.
//!
//! Long run: `FERRY_FUZZ_ITERS=1000000 cargo test --release -p ferry-engine
//! --test fuzz_parsers -- --nocapture --test-threads 2`.

use std::collections::HashSet;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use ferry_engine::api::{self, ApiRequest, ApiResponse, MAX_REQUEST};
use ferry_engine::memory::GuestRam;
use ferry_engine::migration::record::SessionRecord;
use ferry_engine::snapshot::{self, Snapshot};
use ferry_engine::state::{
    self, codec, DeviceState, MachineMeta, MachineState, VcpuState, VmState,
};
use ferry_protocol::{
    append_pages_frame, decode_pages, decode_state, encode_pages, encode_state, features,
    read_frame, write_frame, FrameDecoder, FrameHeader, Hello, HelloAck, MigrationMode, MsgType,
    PageBitmap, PageRequest, Role, RoundStats, StateMeta, HEADER_LEN, MAX_PAGES_PER_FRAME,
    OPT_MODE, PAGE_SIZE, PROTOCOL_VERSION,
};

mod fuzz_support;
use fuzz_support::{base_seed, fxhash, iters, measured, save, Rng};

/// The allowance every input gets.
fn base_limit(data: &[u8]) -> usize {
    (64 << 10).max(4 * data.len())
}

// ---------------------------------------------------------------------------
// Randomness and mutation

const INTERESTING: [u64; 24] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xfff,
    0x1000,
    0x1001,
    0x7fff,
    0xffff,
    0x1_0000,
    16 << 20,
    (16 << 20) + 1,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

const JSON_TOKENS: [&str; 24] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "18446744073709551616",
    "\\u0000",
    "\\ud800",
    "\"cmd\":",
    "\"migrate\"",
    "\"snapshot\"",
    "\"to\":",
    "\"mode\":\"hybrid\"",
    "\"path\":",
    "\"rounds\":[",
    " ",
];

/// Most bytes a mutated input may grow to.
const MAX_INPUT: usize = 1 << 20;

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], json: bool) {
    let ops = if rng.chance(8) {
        1 + rng.below(32)
    } else {
        1 + rng.below(4)
    };
    for _ in 0..ops {
        let len = data.len();
        match rng.below(if json { 13 } else { 11 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let k = rng.below(10);
                data[i] = [0, 1, 0x7f, 0x80, 0xff, b'\n', b'\r', b'"', b'{', b'0'][k];
            }
            3 if len > 0 => {
                // A length field that lies: an interesting integer, or the
                // old one nudged, at a random (often aligned) offset.
                let width = [1, 2, 4, 8][rng.below(4)];
                let mut at = rng.below(len);
                if rng.chance(2) {
                    at &= !(width - 1);
                }
                let end = (at + width).min(len);
                let mut old = [0u8; 8];
                old[..end - at].copy_from_slice(&data[at..end]);
                let v = match rng.below(4) {
                    0 => u64::from_le_bytes(old).wrapping_add(1 + rng.below(16) as u64),
                    1 => u64::from_le_bytes(old).wrapping_sub(1 + rng.below(16) as u64),
                    2 => len as u64 - rng.below(64).min(len) as u64,
                    _ => INTERESTING[rng.below(INTERESTING.len())],
                };
                data[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            4 => {
                let i = rng.below(len + 1);
                let n = if rng.chance(4) {
                    1 + rng.below(4096)
                } else {
                    1 + rng.below(16)
                };
                let b = rng.next() as u8;
                let fill: Vec<u8> = if rng.chance(2) {
                    vec![b; n]
                } else {
                    (0..n).map(|_| rng.next() as u8).collect()
                };
                data.splice(i..i, fill);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let most = if rng.chance(4) { 4096 } else { 16 };
                let n = 1 + rng.below((len - i).min(most));
                data.drain(i..i + n);
            }
            6 => data.truncate(rng.below(len + 1)),
            7 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            8 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            9 if !corpus.is_empty() && len > 0 => {
                // Overwrite with bytes from the same place in another input.
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len);
                let n = rng
                    .below(64)
                    .min(len - at)
                    .min(other.len().saturating_sub(at));
                if n > 0 {
                    data[at..at + n].copy_from_slice(&other[at..at + n]);
                }
            }
            10 if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            11 | 12 => {
                let t = JSON_TOKENS[rng.below(JSON_TOKENS.len())].as_bytes();
                let i = rng.below(len + 1);
                if rng.chance(2) || len == 0 {
                    data.splice(i..i, t.iter().copied());
                } else {
                    let end = (i + 1 + rng.below(8)).min(len);
                    data.splice(i..end, t.iter().copied());
                }
            }
            _ => {}
        }
    }
    data.truncate(MAX_INPUT);
}

// ---------------------------------------------------------------------------
// The driver

/// A parser under test: `Err` carries its error text.
type Parser = Box<dyn FnMut(&[u8]) -> Result<(), String>>;

/// One fuzz target.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    json: bool,
    /// Structure-aware repair after mutation (re-seal checksums, lengths).
    fixup: fn(&mut Rng, &mut Vec<u8>),
    /// The parser under test. `Err` carries the error text.
    run: Parser,
    /// Largest single allocation allowed for this input.
    limit: fn(&[u8]) -> usize,
}

fn no_fixup(_: &mut Rng, _: &mut Vec<u8>) {}

/// An error's kind: its text without numbers, quoted input or the scratch
/// file's path, cut short.
fn class(e: &str) -> String {
    let e = e
        .rsplit(&format!("fuzz-scratch-{}/", std::process::id()))
        .next()
        .unwrap_or(e);
    let mut quoted = false;
    e.chars()
        .filter(|&c| {
            if c == '`' || c == '"' {
                quoted = !quoted;
            }
            !quoted && !c.is_ascii_digit()
        })
        .take(64)
        .collect()
}

fn fuzz(mut t: Target) {
    if let Ok(file) = std::env::var("FERRY_FUZZ_REPLAY") {
        let data = std::fs::read(&file).unwrap();
        let (r, max) = measured(|| (t.run)(&data));
        let limit = (t.limit)(&data);
        println!(
            "replay {}: {r:?}, largest allocation {max} (limit {limit})",
            t.name
        );
        assert!(max <= limit, "allocation over the limit");
        return;
    }
    let seed = base_seed();
    let n = iters();
    let mut rng = Rng::new(seed ^ fxhash(t.name));
    let mut corpus = t.seeds.clone();
    let mut classes = HashSet::new();
    let (mut ok, mut err, mut max_seen, mut max_input) = (0u64, 0u64, 0usize, 0usize);
    let (mut worst_ratio, mut worst) = (0f64, (0usize, 0usize));
    let started = Instant::now();
    for iter in 0..n {
        let mut data = if rng.chance(64) {
            (0..rng.below(512)).map(|_| rng.next() as u8).collect()
        } else {
            // A quarter of the time straight from a valid seed, so the
            // corpus never drifts far from real encodings.
            let from = if rng.chance(4) {
                rng.below(t.seeds.len())
            } else {
                rng.below(corpus.len())
            };
            let mut d = corpus[from].clone();
            mutate(&mut rng, &mut d, &corpus, t.json);
            if rng.chance(2) {
                (t.fixup)(&mut rng, &mut d);
            }
            d
        };
        if iter < t.seeds.len() as u64 {
            data = t.seeds[iter as usize].clone();
        }
        let run = &mut t.run;
        let (r, max) = measured(|| catch_unwind(AssertUnwindSafe(|| run(&data))));
        let limit = (t.limit)(&data);
        let r = match r {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let f = save(t.name, seed, iter, &data);
                panic!(
                    "{}: input {iter} (seed {seed}) panicked: {msg}\n  input saved to {}\n  replay: FERRY_FUZZ_REPLAY={} cargo test --release -p ferry-engine --test fuzz_parsers fuzz_{} -- --exact --nocapture",
                    t.name,
                    f.display(),
                    f.display(),
                    t.name
                );
            }
        };
        if max > limit {
            let f = save(t.name, seed, iter, &data);
            panic!(
                "{}: input {iter} (seed {seed}, {} bytes) made a {max}-byte allocation, limit {limit} (result {r:?})\n  input saved to {}\n  replay: FERRY_FUZZ_REPLAY={} cargo test --release -p ferry-engine --test fuzz_parsers fuzz_{} -- --exact --nocapture",
                t.name,
                data.len(),
                f.display(),
                f.display(),
                t.name
            );
        }
        max_seen = max_seen.max(max);
        max_input = max_input.max(data.len());
        let ratio = max as f64 / limit as f64;
        if ratio > worst_ratio {
            worst_ratio = ratio;
            worst = (max, limit);
        }
        let keep = match &r {
            Ok(()) => {
                ok += 1;
                rng.chance(2)
            }
            Err(e) => {
                err += 1;
                // New kinds of error join the corpus, while they are few.
                classes.insert(class(e)) && classes.len() <= 256
            }
        };
        if keep {
            if corpus.len() < 512 {
                corpus.push(data);
            } else {
                let i = t.seeds.len() + rng.below(corpus.len() - t.seeds.len());
                corpus[i] = data;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "FUZZ {:<16} inputs {n:>8}  ok {ok:>8}  err {err:>8}  error kinds {:>3}  max alloc {max_seen:>9} B (closest: {} of {} B)  largest input {max_input:>7} B  {secs:>7.1} s  seed {seed}",
        t.name,
        classes.len(),
        worst.0,
        worst.1,
    );
}

// ---------------------------------------------------------------------------
// Seeds from the real encoders

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hello(role: Role, options: Vec<(u16, Vec<u8>)>) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role,
        session_id: 0x1234_5678,
        features: features::SUPPORTED,
        mem_size: 16 << 20,
        vcpus: 2,
        page_size: PAGE_SIZE as u32,
        options,
    }
}

fn hellos() -> Vec<Vec<u8>> {
    vec![
        hello(Role::Control, vec![]).encode(),
        hello(
            Role::Control,
            vec![(OPT_MODE, vec![MigrationMode::Hybrid as u8])],
        )
        .encode(),
        hello(
            Role::Fault,
            vec![(OPT_MODE, vec![2]), (0x0001, vec![]), (0x8002, vec![9; 40])],
        )
        .encode(),
    ]
}

fn meta() -> StateMeta {
    StateMeta {
        mode: MigrationMode::Precopy,
        start_host_us: 1_700_000_000_000_000,
        rounds: vec![
            RoundStats {
                round: 0,
                pages: 4096,
                bytes: 16 << 20,
                ms: 12.5,
                dirty_after: 17,
                est_downtime_ms: 0.25,
            },
            RoundStats::default(),
        ],
        converged: Some(true),
        pause_host_us: 1_700_000_000_100_000,
        pause_us: 80,
        save_us: 900,
    }
}

const MEM_PAGES: u64 = 4096;

fn pages_payloads() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 7) as u8).collect();
    vec![
        encode_pages(7, &noise(PAGE_SIZE, 3), true, true),
        encode_pages(100, &text, true, true),
        encode_pages(MEM_PAGES - 3, &vec![0; 3 * PAGE_SIZE], true, true),
        encode_pages(0, &text, false, false),
    ]
}

fn frame(kind: MsgType, arg: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, kind, arg, payload).unwrap();
    v
}

/// Streams of whole frames, as a control or fault connection carries them.
fn streams() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / 3 % 11) as u8).collect();
    let mut control = frame(MsgType::Hello, 0, &hellos()[1]);
    control.extend(frame(
        MsgType::State,
        0,
        &encode_state(&meta(), &codec::encode(&machine(1))),
    ));
    let mut scratch = Vec::new();
    append_pages_frame(&mut control, &mut scratch, 0, 8, &text, true, true);
    append_pages_frame(
        &mut control,
        &mut scratch,
        0,
        20,
        &noise(PAGE_SIZE, 5),
        true,
        true,
    );
    append_pages_frame(
        &mut control,
        &mut scratch,
        0,
        30,
        &[0; PAGE_SIZE],
        true,
        true,
    );
    control.extend(frame(
        MsgType::Discard,
        1,
        &PageBitmap::full(100).to_le_bytes(),
    ));
    control.extend(frame(MsgType::Ping, 0, &[]));
    control.extend(frame(MsgType::PushDone, 0, br#"{"pages":4096}"#));
    control.extend(frame(MsgType::Commit, 0, &[]));
    let mut fault = frame(MsgType::Hello, 0, &hellos()[2]);
    for i in 0..4u64 {
        let r = PageRequest {
            pfn: i * 9,
            count: 1 + i as u32,
            vcpu: 0,
        };
        fault.extend_from_slice(&r.frame(i + 1));
    }
    let ack = HelloAck {
        version: PROTOCOL_VERSION,
        status: 0,
        features: features::SUPPORTED,
        session_id: 5,
        peer_timeout_ms: Some(5000),
    };
    let mut back = frame(MsgType::HelloAck, 0, &ack.encode());
    back.extend(frame(MsgType::Ready, 0, br#"{"restore_us":10}"#));
    back.extend(frame(
        MsgType::RecvBitmap,
        0,
        &PageBitmap::new(MEM_PAGES).to_le_bytes(),
    ));
    back.extend(frame(MsgType::Abort, 0, b"no room"));
    vec![control, fault, back]
}

fn vcpu(i: u64) -> VcpuState {
    use kvm_bindings::*;
    VcpuState {
        cpuid: (0..3)
            .map(|f| kvm_cpuid_entry2 {
                function: f,
                eax: 7,
                ..Default::default()
            })
            .collect(),
        mp_state: kvm_mp_state::default(),
        regs: kvm_regs {
            rip: 0x1000 + i,
            ..Default::default()
        },
        sregs: kvm_sregs::default(),
        xsave: kvm_xsave::default(),
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs::default(),
        lapic: kvm_lapic_state::default(),
        msrs: vec![kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        }],
        events: kvm_vcpu_events::default(),
    }
}

fn machine(vcpus: u32) -> MachineState {
    use kvm_bindings::*;
    MachineState {
        meta: MachineMeta {
            vcpus,
            mem_size: 16 << 20,
            tsc_khz: 2_000_000,
        },
        vm: VmState {
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
        },
        vcpus: (0..u64::from(vcpus)).map(vcpu).collect(),
        devices: DeviceState {
            serial: vm_superio::serial::SerialState {
                in_buffer: vec![1, 2, 3],
                ..Default::default()
            },
            serial_line: b"FERRY TI".to_vec(),
            virtio: (0..vcpus.min(2))
                .map(|i| state::VirtioState {
                    device_type: 2,
                    status: 15,
                    device_features_sel: 1,
                    driver_features_sel: 1,
                    driver_features: (1 << 32) | (1 << 9),
                    queue_sel: 0,
                    interrupt_status: 1,
                    config_generation: 0,
                    queues: vec![state::QueueState {
                        max_size: 256,
                        size: 16,
                        ready: true,
                        event_idx_enabled: false,
                        next_avail: 300 + i as u16,
                        next_used: 300 + i as u16,
                        desc_table: 0x10_0000,
                        avail_ring: 0x10_1000,
                        used_ring: 0x10_2000,
                    }],
                    backend: state::VirtioBackendConfig::Blk(state::DiskConfig {
                        path: format!("/srv/disk{i}.img").into(),
                        readonly: i == 1,
                        serial: format!("ferry{i}"),
                        latency_us: 0,
                        migrated: None,
                    }),
                })
                .collect(),
        },
    }
}

/// Re-seals a state blob: body length and CRC match its bytes again.
fn reseal_blob(rng: &mut Rng, b: &mut [u8]) {
    if b.len() < 28 {
        return;
    }
    if rng.chance(2) {
        let body = (b.len() - 28) as u64;
        b[16..24].copy_from_slice(&body.to_le_bytes());
    }
    let n = b.len();
    let crc = crc32fast::hash(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn blob_fixup(rng: &mut Rng, b: &mut [u8]) {
    // The Meta section comes first: give it another vCPU count.
    if b.len() >= 40 && rng.chance(4) {
        let v = 1 + rng.below(ferry_engine::layout::MAX_VCPUS as usize + 1) as u32;
        b[32..36].copy_from_slice(&v.to_le_bytes());
    }
    reseal_blob(rng, b);
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Repairs a snapshot file: optionally its size, its state blob's seal and
/// its header/state/bitmap CRC, so parsing goes past the cheap checks.
fn snapshot_fixup(rng: &mut Rng, b: &mut Vec<u8>) {
    let (Some(mem), Some(state_len), Some(data_pages)) = (le64(b, 16), le64(b, 24), le64(b, 32))
    else {
        return;
    };
    let bitmap_len = (mem / PAGE_SIZE as u64).div_ceil(8);
    let Some(data_at) = 48u64
        .checked_add(state_len)
        .and_then(|x| x.checked_add(bitmap_len))
        .map(|x| x.next_multiple_of(PAGE_SIZE as u64))
    else {
        return;
    };
    let Some(total) = data_pages
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|x| x.checked_add(data_at))
        .filter(|&t| t <= 4 << 20)
    else {
        return;
    };
    if rng.chance(2) {
        b.resize(total as usize, 0);
    }
    let (s, e) = (48usize, 48 + state_len as usize);
    if e <= b.len() && rng.chance(2) {
        reseal_blob(rng, &mut b[s..e]);
    }
    let end = e + bitmap_len as usize;
    if end <= b.len() {
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..40]);
        h.update(&b[48..end]);
        let crc = h.finalize();
        b[40..44].copy_from_slice(&crc.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------
// Protocol targets

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

#[test]
fn fuzz_frame_header() {
    let seeds = streams()
        .iter()
        .map(|s| s[..HEADER_LEN].to_vec())
        .chain([frame(MsgType::Pages, 9, &pages_payloads()[0])[..HEADER_LEN].to_vec()])
        .collect();
    fuzz(Target {
        name: "frame_header",
        seeds,
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            let mut h = [0u8; HEADER_LEN];
            let n = d.len().min(HEADER_LEN);
            h[..n].copy_from_slice(&d[..n]);
            let f = FrameHeader::decode(&h).map_err(err)?;
            // A decoded header re-encodes to the same meaning.
            assert_eq!(FrameHeader::decode(&f.encode()).map_err(err)?, f);
            Ok(())
        }),
        limit: base_limit,
    });
}

/// The largest payload length any accepted header in `d` declares.
fn declared_frames(d: &[u8]) -> usize {
    d.windows(HEADER_LEN)
        .filter_map(|w| FrameHeader::decode(w.try_into().ok()?).ok())
        .map(|h| h.len as usize)
        .max()
        .unwrap_or(0)
}

/// A reader that hands out a stream in the chunk sizes it is given.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    at: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self
            .sizes
            .get(self.at % self.sizes.len())
            .copied()
            .unwrap_or(1);
        self.at += 1;
        let n = want.max(1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn fuzz_frame_decoder() {
    fuzz(Target {
        name: "frame_decoder",
        seeds: streams(),
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            // The chunking comes from the input too, so it is replayable.
            let split = fxhash(&format!("{:?}", &d[..d.len().min(32)]));
            let mut rng = Rng::new(split ^ d.len() as u64);
            let sizes: Vec<usize> = (0..8)
                .map(|_| match rng.below(3) {
                    0 => 1 + rng.below(16),
                    1 => 1 + rng.below(4096),
                    _ => 1 + rng.below(1 << 18),
                })
                .collect();
            // 1. extend + next_frame, in those chunks.
            let mut dec = FrameDecoder::new();
            let mut frames = Vec::new();
            let mut res = Ok(());
            let mut rest = d;
            let mut k = 0;
            'outer: while !rest.is_empty() {
                let n = sizes[k % sizes.len()].min(rest.len());
                k += 1;
                dec.extend(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match dec.next_frame() {
                        Ok(Some(f)) => {
                            assert_eq!(f.payload.len(), f.header.len as usize);
                            frames.push((f.header, f.payload.len()));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            res = Err(err(e));
                            break 'outer;
                        }
                    }
                }
            }
            if res.is_ok() {
                let _ = dec.last_frame();
                let _ = dec.into_buffered();
            }
            // 2. recv over a reader that returns the same chunks: the same
            // frames, then the same error or end of stream.
            let mut r = Chunked {
                data: d,
                sizes,
                at: 0,
            };
            let mut dec = FrameDecoder::new();
            let mut again = Vec::new();
            while let Ok(f) = dec.recv(&mut r) {
                again.push((f.header, f.payload.len()));
            }
            assert_eq!(frames, again);
            // 3. read_frame, frame by frame.
            let mut r = d;
            let mut buf = Vec::new();
            for (h, len) in &frames {
                let got = read_frame(&mut r, &mut buf).map_err(err)?;
                assert_eq!((&got, buf.len()), (h, *len));
            }
            res
        }),
        limit: |d| {
            // The decoder buffers a frame of the declared (checked) length
            // and reads in 256 KiB chunks; a Vec may double past both.
            base_limit(d) + 2 * (HEADER_LEN + (256 << 10) + declared_frames(d))
        },
    });
}

#[test]
fn fuzz_hello() {
    fuzz(Target {
        name: "hello",
        seeds: hellos(),
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            let h = Hello::decode(d).map_err(err)?;
            let _ = h.mode();
            assert_eq!(Hello::decode(&h.encode()).map_err(err)?, h);
            Ok(())
        }),
        limit: base_limit,
    });
}

#[test]
fn fuzz_hello_ack() {
    let ack = HelloAck {
        version: PROTOCOL_VERSION,
        status: 3,
        features: features::SUPPORTED,
        session_id: 77,
        peer_timeout_ms: Some(2000),
    };
    let old = HelloAck {
        features: features::SUPPORTED & !features::PEER_TIMEOUT,
        peer_timeout_ms: None,
        ..ack
    };
    fuzz(Target {
        name: "hello_ack",
        seeds: vec![ack.encode(), old.encode()],
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            let a = HelloAck::decode(d).map_err(err)?;
            let _ = ferry_protocol::ResumeStatus::from_u32(a.status);
            assert_eq!(HelloAck::decode(&a.encode()).map_err(err)?, a);
            Ok(())
        }),
        limit: base_limit,
    });
}

#[test]
fn fuzz_redirect() {
    let seeds = [
        (1u64, 1u16),
        (0xdead_beef_0000_0001, 40123),
        (u64::MAX, u16::MAX),
    ]
    .iter()
    .map(|&(session_id, port)| ferry_protocol::Redirect { session_id, port }.encode())
    .collect();
    fuzz(Target {
        name: "redirect",
        seeds,
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            let r = ferry_protocol::Redirect::decode(d).map_err(err)?;
            assert_ne!(r.port, 0);
            assert_eq!(
                ferry_protocol::Redirect::decode(&r.encode()).map_err(err)?,
                r
            );
            Ok(())
        }),
        limit: base_limit,
    });
}

#[test]
fn fuzz_pages() {
    let mut out = Vec::new();
    fuzz(Target {
        name: "pages",
        seeds: pages_payloads(),
        json: false,
        fixup: no_fixup,
        run: Box::new(move |d| {
            let h = decode_pages(d, MEM_PAGES, &mut out).map_err(err)?;
            assert!(h.first_pfn + u64::from(h.count) <= MEM_PAGES);
            let want = match h.encoding {
                ferry_protocol::PageEncoding::Zero => 0,
                _ => h.count as usize * PAGE_SIZE,
            };
            assert_eq!(out.len(), want);
            Ok(())
        }),
        limit: |d| {
            // The output holds the declared page count once it is checked.
            let count = d
                .get(8..12)
                .map_or(0, |c| u32::from_le_bytes(c.try_into().unwrap()));
            let checked = if count <= MAX_PAGES_PER_FRAME {
                count as usize * PAGE_SIZE
            } else {
                0
            };
            base_limit(d).max(checked)
        },
    });
}

#[test]
fn fuzz_page_request() {
    let seeds = (0..4)
        .map(|i| {
            PageRequest {
                pfn: [0, 5, MEM_PAGES - 1, MEM_PAGES - 512][i],
                count: [1, 7, 1, 512][i],
                vcpu: [0, 1, u32::MAX, 3][i],
            }
            .encode()
            .to_vec()
        })
        .collect();
    fuzz(Target {
        name: "page_request",
        seeds,
        json: false,
        fixup: no_fixup,
        run: Box::new(|d| {
            let r = PageRequest::decode(d, MEM_PAGES).map_err(err)?;
            assert!(r.count >= 1 && r.pfn + u64::from(r.count) <= MEM_PAGES);
            assert_eq!(PageRequest::decode(&r.encode(), MEM_PAGES).map_err(err)?, r);
            Ok(())
        }),
        limit: base_limit,
    });
}

#[test]
fn fuzz_state_payload() {
    let blob = codec::encode(&machine(1));
    let mut short = meta();
    short.rounds.clear();
    short.converged = None;
    short.mode = MigrationMode::Postcopy;
    fuzz(Target {
        name: "state_payload",
        seeds: vec![
            encode_state(&meta(), &blob),
            encode_state(&short, b"blob"),
            encode_state(&short, &[]),
        ],
        json: true,
        fixup: |rng, d| {
            // Point the metadata length at a plausible end of the JSON.
            if d.len() >= 4 {
                let end = d[4..]
                    .iter()
                    .position(|&b| b == b'}' && rng.chance(2))
                    .map_or(d.len() - 4, |p| p + 1);
                d[..4].copy_from_slice(&(end as u32).to_le_bytes());
            }
        },
        run: Box::new(|d| {
            let (m, b) = decode_state(d).map_err(err)?;
            let _ = m.mode.lazy();
            assert!(b.len() <= d.len());
            Ok(())
        }),
        limit: base_limit,
    });
}

#[test]
fn fuzz_bitmap() {
    // Input: the page count (u64 LE), then the bitmap bytes.
    let seed = |pages: u64, b: &PageBitmap| {
        let mut v = pages.to_le_bytes().to_vec();
        v.extend(b.to_le_bytes());
        v
    };
    let some = PageBitmap::new(200);
    for p in [0, 1, 63, 64, 65, 199] {
        some.set(p);
    }
    let mut bytewise = 13u64.to_le_bytes().to_vec();
    bytewise.extend([0xff, 0x1f]);
    fuzz(Target {
        name: "bitmap",
        seeds: vec![
            seed(200, &some),
            seed(MEM_PAGES, &PageBitmap::full(MEM_PAGES)),
            seed(1, &PageBitmap::full(1)),
            bytewise,
        ],
        json: false,
        fixup: |rng, d| {
            // Make the page count fit the byte count, in one of its two forms.
            if d.len() >= 8 {
                let n = (d.len() - 8) as u64;
                let pages = if rng.chance(2) {
                    (n * 8).saturating_sub(rng.below(8) as u64)
                } else {
                    (n / 8 * 64).saturating_sub(rng.below(64) as u64)
                };
                d[..8].copy_from_slice(&pages.to_le_bytes());
            }
        },
        run: Box::new(|d| {
            let pages = le64(d, 0).ok_or("short")?;
            let b = PageBitmap::from_le_bytes(pages, &d[8..])
                .ok_or_else(|| "bitmap size does not match".to_string())?;
            // What a receiver then does with it.
            let set = b.count();
            assert!(set <= pages);
            assert_eq!(b.iter_set().count() as u64, set);
            let run_pages: u64 = b.runs(0, 512).map(|(_, n)| n).sum();
            assert_eq!(run_pages, set);
            assert_eq!(b.rank(pages), set);
            let _ = (b.next_clear(0), b.is_full(), b.get(pages), b.set(pages));
            Ok(())
        }),
        limit: base_limit,
    });
}

// ---------------------------------------------------------------------------
// Engine targets

#[test]
fn fuzz_state_blob() {
    fuzz(Target {
        name: "state_blob",
        seeds: vec![codec::encode(&machine(1)), codec::encode(&machine(2))],
        json: false,
        fixup: |rng, b| blob_fixup(rng, b),
        run: Box::new(|d| {
            let s = state::decode(d).map_err(err)?;
            assert_eq!(codec::decode_meta(d).map_err(err)?, s.meta);
            // Whatever decodes re-encodes to an equivalent blob.
            let again = codec::encode(&s);
            assert!(codec::differing_sections(
                &again,
                &codec::encode(&state::decode(&again).unwrap())
            )
            .map_err(err)?
            .is_empty());
            // A decoded device state is still untrusted: rebuilding the
            // device from it answers Ok or Err, never panics.
            for v in &s.devices.virtio {
                let backend: Box<dyn ferry_engine::devices::transport::VirtioBackend> =
                    match &v.backend {
                        state::VirtioBackendConfig::Blk(c) => {
                            Box::new(ferry_engine::devices::Blk::new(c.clone()))
                        }
                        state::VirtioBackendConfig::Net(c) => {
                            Box::new(ferry_engine::devices::Net::new(c.clone(), true))
                        }
                    };
                let _ = ferry_engine::devices::transport::MmioTransport::from_state(backend, v);
            }
            Ok(())
        }),
        limit: base_limit,
    });
}

/// A scratch file name, in memory (`/dev/shm`) when there is one.
fn scratch(name: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    let dir = base.join(format!("ferry-fuzz-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A snapshot file of a small machine with some pages stored.
fn snapshot_seed(vcpus: u32, pages: &[u64]) -> Vec<u8> {
    let ram = GuestRam::new(16 << 20).unwrap();
    for &p in pages {
        ram.write_at(p * PAGE_SIZE as u64, &noise(PAGE_SIZE, p + 1))
            .unwrap();
    }
    let path = scratch(&format!("seed{vcpus}-{}", pages.len()));
    snapshot::write(&path, &machine(vcpus), &ram).unwrap();
    let b = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    b
}

#[test]
fn fuzz_snapshot() {
    let path = scratch("snapshot");
    let ram = GuestRam::new(16 << 20).unwrap();
    let p = path.clone();
    fuzz(Target {
        name: "snapshot",
        seeds: vec![
            snapshot_seed(1, &[]),
            snapshot_seed(1, &[0, 1, 2, 4095]),
            snapshot_seed(2, &[10, 300]),
        ],
        json: false,
        fixup: snapshot_fixup,
        run: Box::new(move |d| {
            std::fs::write(&p, d).unwrap();
            let s = Snapshot::open(&p).map_err(err)?;
            // Page data: the verify pass and an eager load, on small guests.
            s.verify_memory().map_err(err)?;
            let _ = s.has_page(0);
            if s.state.meta.mem_size == ram.size() {
                s.load_memory(&ram).map_err(err)?;
            }
            Ok(())
        }),
        // Plus the fixed 2 MiB copy buffer of load_memory/verify_memory.
        limit: |d| base_limit(d) + (2 << 20),
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(path.parent().unwrap());
}

/// What the API server does with one connection's bytes: split lines,
/// refuse long or non-UTF-8 ones, parse the rest and encode the answer.
fn api_stream(d: &[u8]) -> Result<(), String> {
    let mut last = Ok(());
    for line in d.split_inclusive(|&b| b == b'\n') {
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let Ok(line) = std::str::from_utf8(line) else {
            return Err("unreadable request: not UTF-8".into());
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match api::parse_request(line) {
            Ok(req) => {
                // A parsed request survives a round trip through JSON.
                let again = serde_json::to_string(&req).unwrap();
                assert_eq!(api::parse_request(&again), Ok(req.clone()));
                last = Ok(());
                ApiResponse::ok(serde_json::json!({ "echo": format!("{req:?}") }))
            }
            Err(e) => {
                last = Err(e.clone());
                ApiResponse::err(e)
            }
        };
        let _ = serde_json::to_string(&response).unwrap();
    }
    last
}

#[test]
fn fuzz_api_request() {
    let reqs = [
        ApiRequest::Status,
        ApiRequest::Pause,
        ApiRequest::Resume,
        ApiRequest::Snapshot {
            path: "/tmp/vm.snap".into(),
        },
        ApiRequest::Migrate {
            to: "10.0.0.2:7000".into(),
            stats_json: Some("/tmp/s.json".into()),
            mode: Some(MigrationMode::Hybrid),
            max_bandwidth: Some(25 << 20),
            tcp_congestion: Some("reno".into()),
            tls_cert: Some("/etc/ferry/source.pem".into()),
            tls_key: Some("/etc/ferry/source.key".into()),
            tls_ca: Some("/etc/ferry/ca.pem".into()),
            tls_server_name: Some("dest".into()),
        },
        ApiRequest::Recover {
            to: Some("[::1]:7001".into()),
        },
        ApiRequest::Recover { to: None },
        ApiRequest::Cancel,
        ApiRequest::Quit,
    ];
    let mut seeds: Vec<Vec<u8>> = reqs
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap())
        .collect();
    seeds.push(
        b"{\"cmd\":\"pause\"}\n{\"cmd\":\"migrate\",\"to\":\"h:1\",\"mode\":\"precopy\"}\n  \n"
            .to_vec(),
    );
    fuzz(Target {
        name: "api_request",
        seeds,
        json: true,
        fixup: no_fixup,
        run: Box::new(api_stream),
        limit: api_limit,
    });
}

/// serde buffers an internally tagged enum's fields (`"cmd"` may come
/// last) as generic content, up to 32 bytes per JSON value of at least 2
/// bytes, in a Vec that doubles: the line bound (`MAX_REQUEST`) caps it.
fn api_limit(d: &[u8]) -> usize {
    base_limit(d).max(32 * d.len().min(MAX_REQUEST + 1))
}

#[test]
fn fuzz_session_record() {
    let path = scratch("record");
    let rec = SessionRecord {
        version: 1,
        addr: "127.0.0.1:7000".into(),
        session_id: 42,
        features: 3,
        mem_size: 256 << 20,
        vcpus: 2,
        mode: MigrationMode::Hybrid,
    };
    rec.write(&path).unwrap();
    let pretty = std::fs::read(&path).unwrap();
    let p = path.clone();
    fuzz(Target {
        name: "session_record",
        seeds: vec![pretty, serde_json::to_vec(&rec).unwrap()],
        json: true,
        fixup: no_fixup,
        run: Box::new(move |d| {
            std::fs::write(&p, d).unwrap();
            let r = SessionRecord::read(&p).map_err(err)?;
            let _ = r.hello().encode();
            Ok(())
        }),
        limit: base_limit,
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(path.parent().unwrap());
}
