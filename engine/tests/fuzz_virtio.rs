//! Fuzzing of the guest-driven device paths, on the stable toolchain: the
//! virtio-mmio register file and the queues of virtio-blk (a real file
//! behind it, a migrated disk too) and virtio-net (a datagram socket pair
//! in place of the tap), all of which a guest controls.
//!
//! An input is a guest's whole say: a control block (the queue size, ring
//! addresses, features and status the driver writes through the MMIO
//! registers, how often the queue is notified, frames waiting on the
//! "tap"), a short script of further register accesses and notifies, and
//! an image of the first 16 KiB of guest RAM (descriptor table, avail and
//! used rings, request headers, data). Inputs are mutations of valid
//! set-ups, structure-aware: descriptor fields (addresses beyond RAM, in
//! the hole between the two RAM regions, near `u64::MAX`; huge, zero and
//! unaligned lengths; NEXT/WRITE/INDIRECT flags; `next` out of the table
//! or making loops), avail `idx` far ahead, head indices out of the
//! queue, request types and sectors (beyond the disk, `sector * 512`
//! overflowing), queue sizes not a power of two or beyond 16 bits,
//! misaligned rings and rings that run out of RAM; plus plain bit flips,
//! interesting integers and crossover between inputs. Inputs that make
//! the device behave in a way not seen before (which counters moved, a
//! reset) join the corpus.
//!
//! Checked for every input: no panic; the largest single allocation while
//! the guest's accesses are served stays within [`ALLOC_LIMIT`] (the
//! device's fixed 64 KiB copy buffer and a chain's descriptors); each
//! queue service returns within [`SLOW`] (a watchdog thread aborts the
//! run, saving the input, if one hangs for [`HANG`]); the disk file keeps
//! its length, and its bytes change only in blocks the device recorded as
//! written by a request it accepted (its dirty-block log, which a write
//! marks only after the request passed every check) — a migrated disk's
//! other blocks are still what arrived (or a hole); the net device sends
//! exactly the frames it counts, each within the Ethernet bounds. The
//! plain tests at the end assert concrete outcomes (statuses, data,
//! `DEVICE_NEEDS_RESET`) for hand-made chains. See `docs/security.md`.
//!
//! Environment: `FERRY_FUZZ_ITERS` (inputs per target, default 20000; the
//! migrated disk gets a quarter, each net queue half), `FERRY_FUZZ_SEED`, `FERRY_FUZZ_REPLAY=FILE`
//! (run one saved input through the selected target). A failure saves its
//! input and prints the command that replays it.
//!
//! Long run: `FERRY_FUZZ_ITERS=200000 cargo test --release -p ferry-engine
//! --test fuzz_virtio -- --nocapture --test-threads 2`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_engine::devices::dirty::DirtyLog;
use ferry_engine::devices::migrated::{DiskSet, MigratedHandle, BLOCK};
use ferry_engine::devices::transport::{MmioTransport, WriteEffect};
use ferry_engine::devices::{Blk, DiskConfig, Net, NetConfig};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod fuzz_support;
use fuzz_support::{base_seed, fxhash, iters, measured, Rng};

/// Largest single allocation serving a guest may make: virtio-blk's 64 KiB
/// copy buffer, with room for a chain's descriptors (16 B x 256) and the
/// error texts.
const ALLOC_LIMIT: usize = (64 << 10) + (16 << 10);
/// Longest one queue service may take.
const SLOW: Duration = Duration::from_secs(2);
/// An input still running after this hangs: the watchdog aborts the run.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The guest: RAM, the input's layout

/// Guest RAM: two regions with a hole between them.
const RAM_A: (u64, usize) = (0, 0x3_0000);
const RAM_B: (u64, usize) = (0x4_0000, 0x1_0000);
/// Bytes of the input's control block.
const CTRL: usize = 64;
/// Script operations and their bytes.
const OPS: usize = 8;
const SCRIPT: usize = OPS * 8;
/// Bytes of guest RAM (from address 0) the input holds.
const IMAGE: usize = 0x4000;
/// Bytes of an input.
const INPUT_LEN: usize = CTRL + SCRIPT + IMAGE;

/// Where the seeds put things (mutations move them).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x1400;
const HDRS: u64 = 0x2000;
const STATUS: u64 = 0x2100;
const DATA: u64 = 0x2400;

/// The disk: 64 sectors (8 blocks of 4 KiB).
const DISK_LEN: u64 = 64 * 512;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const HDR_LEN: usize = 12;

/// Control block fields (offsets).
mod ctl {
    pub const SIZE: usize = 0; // u32 written to QUEUE_NUM
    pub const DESC: usize = 4; // u64
    pub const AVAIL: usize = 12; // u64
    pub const USED: usize = 20; // u64
    pub const FEAT_LO: usize = 28; // u32
    pub const FEAT_HI: usize = 32; // u32
    pub const STATUS: usize = 36; // u32 written last
    pub const QUEUE: usize = 40; // u32 written to QUEUE_SEL
    pub const ROUNDS: usize = 44; // u8: 1 + n % 3 notifies
    pub const FLAGS: usize = 45; // u8: 1 ready first, 2 read-only disk
    pub const FRAMES: usize = 46; // u8: frames waiting on the tap (n % 5)
    pub const PRESENT: usize = 47; // u8: migrated blocks already here
    pub const FRAME_LENS: usize = 48; // 4 x u16
}

fn get<const N: usize>(d: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&d[at..at + N]);
    b
}
fn u16_at(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(get(d, at))
}
fn u32_at(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(get(d, at))
}
fn u64_at(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(get(d, at))
}
fn put(d: &mut [u8], at: usize, v: &[u8]) {
    d[at..at + v.len()].copy_from_slice(v);
}

/// Builds inputs: the control block for a queue, then chains in the image.
struct Builder {
    d: Vec<u8>,
    next_desc: u16,
    heads: Vec<u16>,
}

impl Builder {
    fn new(queue: u32, size: u32) -> Self {
        let mut d = vec![0u8; INPUT_LEN];
        put(&mut d, ctl::SIZE, &size.to_le_bytes());
        put(&mut d, ctl::DESC, &DESC.to_le_bytes());
        put(&mut d, ctl::AVAIL, &AVAIL.to_le_bytes());
        put(&mut d, ctl::USED, &USED.to_le_bytes());
        put(&mut d, ctl::FEAT_HI, &1u32.to_le_bytes()); // VERSION_1
        let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        put(&mut d, ctl::STATUS, &ok.to_le_bytes());
        put(&mut d, ctl::QUEUE, &queue.to_le_bytes());
        Self {
            d,
            next_desc: 0,
            heads: Vec::new(),
        }
    }

    fn image(&mut self, gpa: u64, v: &[u8]) {
        put(&mut self.d, CTRL + SCRIPT + gpa as usize, v);
    }

    /// Writes descriptor `i` of the table at `table`.
    fn desc_at(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        self.image(at, &addr.to_le_bytes());
        self.image(at + 8, &len.to_le_bytes());
        self.image(at + 12, &flags.to_le_bytes());
        self.image(at + 14, &next.to_le_bytes());
    }

    /// A chain of `(addr, len, write)` in the main table, made available.
    fn chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in parts.iter().enumerate() {
            let i = self.next_desc;
            let last = k + 1 == parts.len();
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.desc_at(DESC, i, addr, len, flags, i + 1);
            self.next_desc += 1;
        }
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let k = self.heads.len() as u64;
        self.image(AVAIL + 4 + 2 * k, &head.to_le_bytes());
        self.heads.push(head);
        self.image(AVAIL + 2, &(self.heads.len() as u16).to_le_bytes());
    }

    fn blk_header(&mut self, slot: u64, kind: u32, sector: u64) -> u64 {
        let at = HDRS + 16 * slot;
        self.image(at, &kind.to_le_bytes());
        self.image(at + 8, &sector.to_le_bytes());
        at
    }

    /// A virtio-blk request: header, data buffers, status.
    fn blk(&mut self, kind: u32, sector: u64, data: &[(u64, u32)]) -> u16 {
        let slot = self.heads.len() as u64;
        let hdr = self.blk_header(slot, kind, sector);
        let status = STATUS + slot;
        self.image(status, &[0xff]);
        let mut parts = vec![(hdr, 16, false)];
        for &(a, l) in data {
            parts.push((a, l, kind != T_OUT));
        }
        parts.push((status, 1, true));
        self.chain(&parts)
    }

    fn set(&mut self, at: usize, v: &[u8]) -> &mut Self {
        put(&mut self.d, at, v);
        self
    }

    fn done(self) -> Vec<u8> {
        self.d
    }
}

// ---------------------------------------------------------------------------
// Driving a transport the way a guest does

fn reg_write(t: &mut MmioTransport, off: u32, v: u32) -> WriteEffect {
    t.write(u64::from(off), &v.to_le_bytes())
}

fn reg_read(t: &MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

/// What serving an input did.
#[derive(Debug, Default)]
struct Served {
    /// Requests completed by each service.
    done: Vec<u32>,
    /// The slowest service.
    slowest: Duration,
    needs_reset: bool,
}

/// The MMIO registers a script picks from (and some beyond).
const REGS: [u32; 24] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG + 4,
    0xffc,
    3,
];

/// Sets the device up as the control block says, runs the script, then
/// notifies `queue` as often as the control block says, serving it each
/// time.
fn drive(
    t: &mut MmioTransport,
    d: &[u8],
    queue: usize,
    mem: &GuestMemoryMmap,
    dirty: &DirtyLog,
) -> Served {
    let mut served = Served::default();
    let serve = |t: &mut MmioTransport, q: usize, s: &mut Served| {
        let start = Instant::now();
        s.done.push(t.process(q, mem, dirty));
        s.slowest = s.slowest.max(start.elapsed());
    };
    reg_write(t, VIRTIO_MMIO_STATUS, 0);
    reg_write(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    reg_write(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES, u32_at(d, ctl::FEAT_LO));
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES, u32_at(d, ctl::FEAT_HI));
    reg_write(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    reg_write(t, VIRTIO_MMIO_QUEUE_SEL, u32_at(d, ctl::QUEUE));
    let flags = d[ctl::FLAGS];
    if flags & 1 != 0 {
        reg_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    reg_write(t, VIRTIO_MMIO_QUEUE_NUM, u32_at(d, ctl::SIZE));
    for (lo, at) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, ctl::DESC),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, ctl::AVAIL),
        (VIRTIO_MMIO_QUEUE_USED_LOW, ctl::USED),
    ] {
        let v = u64_at(d, at);
        reg_write(t, lo, v as u32);
        reg_write(t, lo + 4, (v >> 32) as u32);
    }
    reg_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    reg_write(t, VIRTIO_MMIO_STATUS, u32_at(d, ctl::STATUS));
    t.set_paused(false);
    for op in d[CTRL..CTRL + SCRIPT].chunks(8) {
        let off = u64::from(u16_at(op, 2));
        let v = u32_at(op, 4);
        match op[0] % 5 {
            1 => {
                if let WriteEffect::Notify(q) = t.write(off, &v.to_le_bytes()) {
                    serve(t, q, &mut served);
                }
            }
            2 => {
                let width = [1, 2, 8, 3][usize::from(op[1] % 4)];
                let b = [v as u8; 8];
                let _ = t.write(off, &b[..width]);
            }
            3 => {
                let mut b = [0u8; 8];
                t.read(off, &mut b[..1 << (op[1] % 4)]);
            }
            4 => serve(t, usize::from(op[1] % 3), &mut served),
            _ => {}
        }
    }
    for _ in 0..1 + d[ctl::ROUNDS] % 3 {
        if let WriteEffect::Notify(q) = reg_write(t, VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32) {
            serve(t, q, &mut served);
        }
    }
    served.needs_reset = reg_read(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
    served
}

fn guest(d: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(RAM_A.0), RAM_A.1),
        (GuestAddress(RAM_B.0), RAM_B.1),
    ])
    .unwrap();
    mem.write_slice(&d[CTRL + SCRIPT..], GuestAddress(0))
        .unwrap();
    mem
}

/// Pads or cuts a (replayed) input to the layout.
fn normalized(d: &[u8]) -> Vec<u8> {
    let mut v = d.to_vec();
    v.resize(INPUT_LEN, 0);
    v
}

// ---------------------------------------------------------------------------
// Targets

/// The disk's content before each input: no zero bytes, so holes show.
fn disk_ref() -> Vec<u8> {
    (0..DISK_LEN)
        .map(|i| ((i * 7 + (i >> 9)) as u8) | 1)
        .collect()
}

/// A file for a disk: on tmpfs where there is one (a `FLUSH` request's
/// fdatasync costs nothing there), else in the target's temp directory;
/// removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            // Fails while another test's file is still there.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn scratch(name: &str) -> Scratch {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    let p = base.join(format!("ferry-fuzz-virtio-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p.join(name))
}

fn stat(t: &MmioTransport, k: &str) -> u64 {
    t.backend().stats()[k].as_u64().unwrap_or(0)
}

/// The behaviour class of a run: which counters moved, a reset.
fn class(t: &MmioTransport, keys: &[&str], s: &Served) -> String {
    let mut c: String = keys
        .iter()
        .map(|k| if stat(t, k) > 0 { '1' } else { '0' })
        .collect();
    c.push(if s.needs_reset { 'R' } else { '-' });
    let total: u32 = s.done.iter().sum();
    c.push_str(&format!("{}", total.min(8)));
    c
}

/// Checks a disk file after a run: its length, and that every byte that
/// changed is in a block the device logged as written.
fn check_disk(path: &Path, before: &[u8], dirty: &DirtyLog) -> Result<BTreeSet<u64>, String> {
    let after = std::fs::read(path).map_err(|e| format!("read back the disk: {e}"))?;
    if after.len() != before.len() {
        return Err(format!(
            "the disk file is {} bytes long, was {}",
            after.len(),
            before.len()
        ));
    }
    let written: BTreeSet<u64> = dirty.take_disk(path).into_iter().collect();
    if let Some(b) = written.iter().find(|&&b| b * BLOCK >= before.len() as u64) {
        return Err(format!(
            "the device logged a write of block {b}, beyond the disk"
        ));
    }
    for (i, (a, b)) in after.iter().zip(before).enumerate() {
        if a != b && !written.contains(&(i as u64 / BLOCK)) {
            return Err(format!(
                "disk byte {i} (sector {}) changed without an accepted write",
                i / 512
            ));
        }
    }
    Ok(written)
}

/// What one input gives: `Ok(behaviour class)` or `Err(what is wrong)`.
type Run = Box<dyn FnMut(&[u8]) -> Result<(String, Served), String>>;

/// One virtio-blk device on a fresh copy of the reference disk at `path`,
/// driven by input `d`: the device, the guest's RAM, what serving did,
/// and the blocks the device logged as written (after the disk checks).
struct BlkRun {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    served: Served,
    written: BTreeSet<u64>,
}

fn serve_blk(path: &Path, reference: &[u8], d: &[u8]) -> Result<BlkRun, String> {
    std::fs::write(path, reference).unwrap();
    let mut cfg = DiskConfig::new(path, "fuzz-serial");
    cfg.readonly = cfg_readonly(d);
    let mut t = MmioTransport::new(Box::new(Blk::new(cfg))).unwrap();
    t.activate_backend().unwrap();
    let mem = guest(d);
    let dirty = DirtyLog::default();
    dirty.set_enabled(true);
    let served = guarded(|| drive(&mut t, d, 0, &mem, &dirty))?;
    let written = check_disk(path, reference, &dirty)?;
    if cfg_readonly(d) && !written.is_empty() {
        return Err("a read-only disk took a write".into());
    }
    Ok(BlkRun {
        t,
        mem,
        served,
        written,
    })
}

fn cfg_readonly(d: &[u8]) -> bool {
    d[ctl::FLAGS] & 2 != 0
}

fn blk_target() -> Run {
    let path = scratch("blk.img");
    let reference = disk_ref();
    Box::new(move |input| {
        let d = normalized(input);
        let r = serve_blk(&path, &reference, &d)?;
        let c = class(
            &r.t,
            &["reads", "writes", "flushes", "errors", "malformed"],
            &r.served,
        );
        Ok((c, r.served))
    })
}

/// Runs `f` under the allocation limit and the time bound.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let (r, max) = measured(|| catch_unwind(AssertUnwindSafe(f)));
    let r = r.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("panicked: {msg}")
    })?;
    if max > ALLOC_LIMIT {
        return Err(format!(
            "a {max}-byte allocation while serving the guest (limit {ALLOC_LIMIT})"
        ));
    }
    Ok(r)
}

fn slow_check(s: &Served) -> Result<(), String> {
    if s.slowest > SLOW {
        return Err(format!("a queue service took {:?}", s.slowest));
    }
    Ok(())
}

fn migrated_target() -> Run {
    let path = scratch("migrated.img");
    let reference = disk_ref();
    let blocks = DISK_LEN / BLOCK;
    Box::new(move |input| {
        let d = normalized(input);
        let set = DiskSet::create(0x50, &[(0, blocks, &path)]).unwrap();
        set.commit().unwrap();
        let disk = set.disks[0].clone();
        let present = d[ctl::PRESENT];
        for b in 0..blocks {
            if present & (1 << b) != 0 {
                let at = (b * BLOCK) as usize;
                disk.install(b, &reference[at..at + BLOCK as usize])
                    .unwrap();
            }
        }
        // The fault thread: answers every block asked for.
        let stop = Arc::new(AtomicBool::new(false));
        let helper = {
            let (stop, requests, disk, reference) = (
                stop.clone(),
                set.requests.clone(),
                disk.clone(),
                reference.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for pfn in requests.take() {
                        let b = pfn - disk.first_pfn;
                        let at = (b * BLOCK) as usize;
                        disk.install(b, &reference[at..at + BLOCK as usize])
                            .unwrap();
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let mut cfg = DiskConfig::new(path.to_path_buf(), "fuzz-serial");
        cfg.migrated = Some(MigratedHandle(disk.clone()));
        let mut t = MmioTransport::new(Box::new(Blk::new(cfg))).unwrap();
        t.activate_backend().unwrap();
        let mem = guest(&d);
        let dirty = DirtyLog::default();
        dirty.set_enabled(true);
        let served = guarded(|| drive(&mut t, &d, 0, &mem, &dirty));
        stop.store(true, Ordering::Relaxed);
        helper.join().unwrap();
        let served = served?;
        // Blocks the guest did not write are what arrived, or a hole.
        let after = std::fs::read(&path).unwrap();
        if after.len() as u64 != DISK_LEN {
            return Err(format!("the migrated disk is {} bytes long", after.len()));
        }
        let written: BTreeSet<u64> = dirty.take_disk(&path).into_iter().collect();
        for b in 0..blocks {
            let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            if disk.owned.get(b) && !written.contains(&b) {
                return Err(format!("block {b} is the guest's without a logged write"));
            }
            if written.contains(&b) {
                continue;
            }
            let expect_ok = if disk.present.get(b) {
                after[r.clone()] == reference[r.clone()]
            } else {
                after[r.clone()].iter().all(|&x| x == 0)
            };
            if !expect_ok {
                return Err(format!(
                    "block {b} (present {}) changed without an accepted write",
                    disk.present.get(b)
                ));
            }
        }
        let c = class(
            &t,
            &["reads", "writes", "flushes", "errors", "malformed"],
            &served,
        );
        drop(t);
        drop(set);
        Ok((c, served))
    })
}

fn net_pair() -> (OwnedFd, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (OwnedFd::from(a), b)
}

fn net_config() -> NetConfig {
    NetConfig::parse("tap=fuzz0,mac=52:54:00:12:34:56").unwrap()
}

/// A frame of `len` bytes from the guest's MAC (an IPv4 packet).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let head = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 8, 0,
    ];
    let n = head.len().min(len);
    f[..n].copy_from_slice(&head[..n]);
    f
}

fn net_target(rx: bool) -> Run {
    Box::new(move |input| {
        let d = normalized(input);
        let (fd, peer) = net_pair();
        let mut t = MmioTransport::new(Box::new(Net::with_frame_fd(net_config(), fd))).unwrap();
        t.activate_backend().unwrap();
        let mem = guest(&d);
        let dirty = DirtyLog::default();
        let frames = usize::from(d[ctl::FRAMES] % 5);
        let mut sent = 0u64;
        for k in 0..frames {
            let len = usize::from(u16_at(&d, ctl::FRAME_LENS + 2 * k)) % 10_000;
            if peer.send(&frame(len, k as u8)).is_ok() {
                sent += 1;
            }
        }
        let queue = if rx { 0 } else { 1 };
        let served = guarded(|| drive(&mut t, &d, queue, &mem, &dirty))?;
        if stat(&t, "rx_frames") > sent {
            return Err(format!(
                "{} frames delivered of {sent}",
                stat(&t, "rx_frames")
            ));
        }
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = peer.recv(&mut buf) {
            if !(14..=9216).contains(&n) {
                return Err(format!("a {n}-byte frame went out"));
            }
            got += 1;
        }
        if got != stat(&t, "tx_frames") {
            return Err(format!(
                "{got} frames went out, the device counts {}",
                stat(&t, "tx_frames")
            ));
        }
        let c = class(
            &t,
            &["rx_frames", "tx_frames", "tx_dropped", "malformed"],
            &served,
        );
        Ok((c, served))
    })
}

// ---------------------------------------------------------------------------
// Seeds

fn blk_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for size in [16u32, 256, 4] {
        let mut b = Builder::new(0, size);
        b.blk(T_IN, 3, &[(DATA, 1024)]);
        if size > 4 {
            b.blk(T_OUT, 10, &[(DATA + 0x400, 512)]);
            b.blk(T_FLUSH, 0, &[]);
            b.blk(T_GET_ID, 0, &[(DATA + 0x600, 20)]);
        }
        seeds.push(b.done());
    }
    // Several data buffers, one in the second RAM region.
    let mut b = Builder::new(0, 16);
    b.blk(
        T_OUT,
        60,
        &[(DATA, 512), (RAM_B.0, 1024), (DATA + 0x800, 512)],
    );
    b.blk(T_IN, 0, &[(RAM_B.0 + 0x1000, 4096), (DATA, 512)]);
    seeds.push(b.done());
    // Beyond the disk, and an overflowing sector.
    let mut b = Builder::new(0, 16);
    b.blk(T_IN, 63, &[(DATA, 1024)]);
    b.blk(T_OUT, u64::MAX / 512 + 1, &[(DATA, 512)]);
    b.blk(0x99, 0, &[(DATA, 512)]);
    seeds.push(b.done());
    // An indirect table: header, data, status.
    let mut b = Builder::new(0, 16);
    let table = 0x3800;
    let hdr = b.blk_header(0, T_OUT, 5);
    b.desc_at(table, 0, hdr, 16, NEXT, 1);
    b.desc_at(table, 1, DATA, 512, NEXT, 2);
    b.desc_at(table, 2, STATUS, 1, WRITE, 0);
    b.desc_at(DESC, 0, table, 48, INDIRECT, 0);
    b.publish(0);
    seeds.push(b.done());
    // A loop, then a request that is fine; the same head twice.
    let mut b = Builder::new(0, 16);
    let hdr = b.blk_header(0, T_IN, 0);
    b.desc_at(DESC, 0, hdr, 16, NEXT, 1);
    b.desc_at(DESC, 1, DATA, 512, NEXT | WRITE, 0);
    b.publish(0);
    b.next_desc = 2;
    let h = b.blk(T_IN, 1, &[(DATA, 512)]);
    b.publish(h);
    seeds.push(b.done());
    // Script: a notify through a register, a reset in the middle, ready.
    let mut b = Builder::new(0, 16);
    b.blk(T_IN, 2, &[(DATA, 512)]);
    let mut op = [0u8; 8];
    op[0] = 1;
    op[2..4].copy_from_slice(&(VIRTIO_MMIO_QUEUE_NOTIFY as u16).to_le_bytes());
    b.set(CTRL, &op);
    seeds.push(b.done());
    seeds
}

fn net_seeds(rx: bool) -> Vec<Vec<u8>> {
    let queue = if rx { 0 } else { 1 };
    let mut seeds = Vec::new();
    for size in [16u32, 256] {
        let mut b = Builder::new(queue, size);
        if rx {
            b.chain(&[(DATA, 2048, true)]);
            b.chain(&[(DATA + 0x800, 12, true), (DATA + 0x810, 1514, true)]);
            b.chain(&[(DATA + 0x1000, 64, true)]);
            b.set(ctl::FRAMES, &[3]);
            b.set(ctl::FRAME_LENS, &60u16.to_le_bytes());
            b.set(ctl::FRAME_LENS + 2, &1514u16.to_le_bytes());
            b.set(ctl::FRAME_LENS + 4, &9216u16.to_le_bytes());
        } else {
            let mut f = vec![0u8; HDR_LEN];
            f.extend(frame(60, 1));
            b.image(DATA, &f);
            b.chain(&[(DATA, (HDR_LEN + 60) as u32, false)]);
            b.chain(&[(DATA, HDR_LEN as u32, false), (DATA + 12, 60, false)]);
            b.chain(&[(DATA, 8, false)]);
        }
        seeds.push(b.done());
    }
    seeds
}

fn migrated_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for present in [0u8, 0b1010_0101, 0xff] {
        let mut b = Builder::new(0, 16);
        b.blk(T_IN, 7, &[(DATA, 2048)]);
        b.blk(T_OUT, 17, &[(DATA, 512)]);
        b.blk(T_OUT, 24, &[(DATA, 4096)]);
        b.blk(T_IN, 63, &[(DATA, 512)]);
        b.set(ctl::PRESENT, &[present]);
        seeds.push(b.done());
    }
    seeds
}

// ---------------------------------------------------------------------------
// Mutation

const ADDRS: [u64; 20] = [
    0,
    0x10,
    DATA,
    DATA + 0x1c00,
    HDRS,
    STATUS,
    0x2_fe00,
    0x2_ffff,
    0x3_0000,
    0x3_fff0,
    0x4_0000,
    0x4_fe00,
    0x4_ffff,
    0x5_0000,
    1 << 32,
    1 << 40,
    u64::MAX - 0x1ff,
    u64::MAX - 15,
    u64::MAX,
    0x8000_0000_0000_0000,
];
const LENS: [u32; 20] = [
    0,
    1,
    2,
    11,
    12,
    15,
    16,
    17,
    48,
    511,
    512,
    513,
    4096,
    0x1_0000,
    0x2_ffff,
    0xf_fff0,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fff0,
    u32::MAX,
];
const SECTORS: [u64; 14] = [
    0,
    1,
    7,
    62,
    63,
    64,
    65,
    127,
    u64::MAX / 512,
    u64::MAX / 512 + 1,
    1 << 54,
    1 << 55,
    i64::MAX as u64,
    u64::MAX,
];
const TYPES: [u32; 10] = [
    T_IN,
    T_OUT,
    T_FLUSH,
    T_GET_ID,
    2,
    11,
    13,
    0x99,
    0x8000_0001,
    u32::MAX,
];
const SIZES: [u32; 16] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    17,
    255,
    256,
    257,
    512,
    0x1_0010,
    u32::MAX,
];
const IDXS: [u16; 14] = [0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 255, 256, 0x8000, 0xffff];

fn nudge(rng: &mut Rng, v: u64) -> u64 {
    if rng.chance(2) {
        v.wrapping_add(1 + rng.below(16) as u64)
    } else {
        v.wrapping_sub(1 + rng.below(16) as u64)
    }
}

/// Offset in the input of guest address `gpa`, if the image holds it.
fn in_image(gpa: u64, len: u64) -> Option<usize> {
    (gpa.checked_add(len)? <= IMAGE as u64).then_some(CTRL + SCRIPT + gpa as usize)
}

fn mutate(rng: &mut Rng, d: &mut [u8], corpus: &[Vec<u8>]) {
    let ops = if rng.chance(8) {
        1 + rng.below(16)
    } else {
        1 + rng.below(3)
    };
    let size = u32_at(d, ctl::SIZE).clamp(1, 256) as usize;
    let table =
        in_image(u64_at(d, ctl::DESC), 16 * size as u64).unwrap_or(CTRL + SCRIPT + DESC as usize);
    let avail = in_image(u64_at(d, ctl::AVAIL), 6 + 2 * size as u64)
        .unwrap_or(CTRL + SCRIPT + AVAIL as usize);
    for _ in 0..ops {
        let len = d.len();
        match rng.below(14) {
            0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 => {
                // An interesting or nudged integer at an aligned offset.
                let width = rng.pick(&[1usize, 2, 4, 8]);
                let at = rng.below(len - 8) & !(width - 1);
                let old = u64_at(d, at);
                let v = match rng.below(3) {
                    0 => nudge(rng, old),
                    1 => rng.pick(&ADDRS),
                    _ => u64::from(rng.pick(&LENS)),
                };
                put(d, at, &v.to_le_bytes()[..width]);
            }
            3..=5 => {
                // A descriptor field.
                let i = if rng.chance(2) {
                    rng.below(8.min(size))
                } else {
                    rng.below(size)
                };
                let at = table + 16 * i;
                match rng.below(4) {
                    0 => {
                        let v = match rng.below(3) {
                            0 => rng.pick(&ADDRS),
                            1 => nudge(rng, u64_at(d, at)),
                            _ => (rng.below(IMAGE) as u64) & !0xf,
                        };
                        put(d, at, &v.to_le_bytes());
                    }
                    1 => {
                        let v = if rng.chance(3) {
                            nudge(rng, u64::from(u32_at(d, at + 8))) as u32
                        } else {
                            rng.pick(&LENS)
                        };
                        put(d, at + 8, &v.to_le_bytes());
                    }
                    2 => {
                        let v = if rng.chance(8) {
                            rng.next() as u16
                        } else {
                            rng.below(8) as u16
                        };
                        put(d, at + 12, &v.to_le_bytes());
                    }
                    _ => {
                        let s = size as u16;
                        let i = i as u16;
                        let v =
                            rng.pick(&[0, 1, i, i + 1, i.wrapping_sub(1), s - 1, s, s + 1, 0xffff]);
                        put(d, at + 14, &v.to_le_bytes());
                    }
                }
            }
            6 => {
                // The avail ring: idx, or an entry.
                if rng.chance(2) {
                    let v = if rng.chance(3) {
                        nudge(rng, u64::from(u16_at(d, avail + 2))) as u16
                    } else {
                        rng.pick(&IDXS)
                    };
                    put(d, avail + 2, &v.to_le_bytes());
                } else {
                    let k = rng.below(size.min(8));
                    let v = rng.pick(&[0, 1, 2, 3, size as u16 - 1, size as u16, 255, 256, 0xffff]);
                    put(d, avail + 4 + 2 * k, &v.to_le_bytes());
                }
            }
            7 => {
                // A request header: type or sector.
                let at = CTRL + SCRIPT + HDRS as usize + 16 * rng.below(8);
                if rng.chance(2) {
                    put(d, at, &rng.pick(&TYPES).to_le_bytes());
                } else {
                    put(d, at + 8, &rng.pick(&SECTORS).to_le_bytes());
                }
            }
            8 => {
                // The control block.
                match rng.below(8) {
                    0 => put(d, ctl::SIZE, &rng.pick(&SIZES).to_le_bytes()),
                    1..=3 => {
                        let at = rng.pick(&[ctl::DESC, ctl::AVAIL, ctl::USED]);
                        let v = match rng.below(3) {
                            0 => rng.pick(&ADDRS),
                            1 => nudge(rng, u64_at(d, at)),
                            _ => rng.below(IMAGE) as u64 & !1,
                        };
                        put(d, at, &v.to_le_bytes());
                    }
                    4 => {
                        let v = rng.pick(&[0u32, 1, 3, 7, 0xb, 0xf, 0x4, 0x8f, 0x4f, 0xff]);
                        put(d, ctl::STATUS, &v.to_le_bytes());
                    }
                    5 => {
                        let at = rng.pick(&[ctl::FEAT_LO, ctl::FEAT_HI, ctl::QUEUE]);
                        put(d, at, &(rng.below(4) as u32).to_le_bytes());
                    }
                    6 => {
                        d[rng.pick(&[ctl::ROUNDS, ctl::FLAGS, ctl::FRAMES, ctl::PRESENT])] =
                            rng.next() as u8
                    }
                    _ => {
                        let k = rng.below(4);
                        let v =
                            rng.pick(&[0u16, 1, 13, 14, 60, 1514, 9203, 9204, 9216, 9217, 9999]);
                        put(d, ctl::FRAME_LENS + 2 * k, &v.to_le_bytes());
                    }
                }
            }
            9 => {
                // A script operation.
                let at = CTRL + 8 * rng.below(OPS);
                let reg = rng.pick(&REGS) as u16;
                let v = if rng.chance(2) {
                    rng.below(4) as u32
                } else {
                    rng.pick(&ADDRS) as u32
                };
                let op = [rng.below(5) as u8, rng.next() as u8];
                put(d, at, &op);
                put(d, at + 2, &reg.to_le_bytes());
                put(d, at + 4, &v.to_le_bytes());
            }
            10 if !corpus.is_empty() => {
                // Crossover: a 64-byte block from another input.
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len / 64) * 64;
                if other.len() >= at + 64 {
                    d[at..at + 64].copy_from_slice(&other[at..at + 64]);
                }
            }
            11 => {
                // A descriptor copied over another (duplicates, loops).
                let (i, j) = (rng.below(size.min(16)), rng.below(size.min(16)));
                let src = get::<16>(d, table + 16 * i);
                put(d, table + 16 * j, &src);
            }
            12 => {
                // Turn a descriptor into an indirect one pointing into the
                // image, or a table's worth of looping descriptors.
                let i = rng.below(size.min(8));
                let at = table + 16 * i;
                let addr = (rng.below(IMAGE) as u64) & !0xf;
                put(d, at, &addr.to_le_bytes());
                let n = rng.pick(&[1u32, 2, 3, 16, 256, 4096, 0xffff]);
                put(d, at + 8, &(16 * n).to_le_bytes());
                put(
                    d,
                    at + 12,
                    &(INDIRECT | (rng.below(4) as u16)).to_le_bytes(),
                );
                if rng.chance(2) {
                    // Fill some of that table with a loop.
                    if let Some(t) = in_image(addr, 32) {
                        put(d, t + 12, &NEXT.to_le_bytes());
                        put(d, t + 14, &1u16.to_le_bytes());
                        put(d, t + 16 + 12, &NEXT.to_le_bytes());
                        put(d, t + 16 + 14, &0u16.to_le_bytes());
                    }
                }
            }
            _ => {
                // Random bytes over a descriptor.
                let i = rng.below(size.min(16));
                for k in 0..16 {
                    d[table + 16 * i + k] = rng.next() as u8;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The driver

/// Saves a failing input of target `name` (see [`fuzz_support::save`]).
fn save(name: &str, seed: u64, iter: u64, data: &[u8]) -> PathBuf {
    fuzz_support::save(&format!("virtio-{name}"), seed, iter, data)
}

fn replay_hint(name: &str, f: &Path) -> String {
    format!(
        "  input saved to {}\n  replay: FERRY_FUZZ_REPLAY={} cargo test --release -p ferry-engine --test fuzz_virtio fuzz_{name} -- --exact --nocapture",
        f.display(),
        f.display(),
    )
}

/// Inputs being served, by target, for the watchdog.
type Running = BTreeMap<&'static str, (Instant, u64, u64, Vec<u8>)>;

fn running() -> &'static Mutex<Running> {
    static RUNNING: OnceLock<Mutex<Running>> = OnceLock::new();
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    let r = RUNNING.get_or_init(|| Mutex::new(BTreeMap::new()));
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let r = running().lock().unwrap_or_else(|p| p.into_inner());
            for (name, (since, seed, iter, data)) in r.iter() {
                if since.elapsed() > HANG {
                    let f = save(name, *seed, *iter, data);
                    eprintln!(
                        "{name}: input {iter} (seed {seed}) still runs after {HANG:?}: the device hangs\n{}",
                        replay_hint(name, &f)
                    );
                    std::process::abort();
                }
            }
        });
    });
    r
}

fn fuzz(name: &'static str, seeds: Vec<Vec<u8>>, mut run: Run, share: u64) {
    if let Ok(file) = std::env::var("FERRY_FUZZ_REPLAY") {
        let data = std::fs::read(&file).unwrap();
        let r = run(&data).and_then(|(c, s)| slow_check(&s).map(|()| (c, s)));
        println!("replay {name}: {r:?}");
        r.unwrap();
        return;
    }
    let seed = base_seed();
    let n = (iters() / share).max(seeds.len() as u64);
    let mut rng = Rng::new(seed ^ fxhash(name));
    let mut corpus = seeds.clone();
    let mut classes = HashSet::new();
    let (mut slowest, mut most) = (Duration::ZERO, 0u32);
    let mut resets = 0u64;
    let started = Instant::now();
    for iter in 0..n {
        let data = if iter < seeds.len() as u64 {
            seeds[iter as usize].clone()
        } else {
            let from = if rng.chance(4) {
                rng.below(seeds.len())
            } else {
                rng.below(corpus.len())
            };
            let mut d = corpus[from].clone();
            mutate(&mut rng, &mut d, &corpus);
            d
        };
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, (Instant::now(), seed, iter, data.clone()));
        let r = run(&data).and_then(|(c, s)| slow_check(&s).map(|()| (c, s)));
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let (c, s) = match r {
            Ok(r) => r,
            Err(e) => {
                let f = save(name, seed, iter, &data);
                panic!(
                    "{name}: input {iter} (seed {seed}): {e}\n{}",
                    replay_hint(name, &f)
                );
            }
        };
        slowest = slowest.max(s.slowest);
        most = most.max(s.done.iter().copied().max().unwrap_or(0));
        resets += u64::from(s.needs_reset);
        if classes.insert(c) {
            if corpus.len() < 256 {
                corpus.push(data);
            } else {
                let i = seeds.len() + rng.below(corpus.len() - seeds.len());
                corpus[i] = data;
            }
        }
    }
    println!(
        "FUZZ virtio {name:<10} inputs {n:>7}  behaviours {:>3}  needs-reset {resets:>6}  most requests per service {most:>4}  slowest service {slowest:>10.1?}  {:>6.1} s  seed {seed}",
        classes.len(),
        started.elapsed().as_secs_f64(),
    );
}

#[test]
fn fuzz_blk() {
    fuzz("blk", blk_seeds(), blk_target(), 1);
}

#[test]
fn fuzz_migrated() {
    fuzz("migrated", migrated_seeds(), migrated_target(), 4);
}

#[test]
fn fuzz_net_tx() {
    fuzz("net_tx", net_seeds(false), net_target(false), 2);
}

#[test]
fn fuzz_net_rx() {
    fuzz("net_rx", net_seeds(true), net_target(true), 2);
}

// ---------------------------------------------------------------------------
// Concrete outcomes

fn used(mem: &GuestMemoryMmap, k: u64) -> (u32, u32) {
    let at = USED + 4 + 8 * k;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn status_byte(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + slot)).unwrap()
}

fn read_guest(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

#[test]
fn good_requests_complete_with_their_data() {
    let path = scratch("concrete-good.img");
    let reference = disk_ref();
    let mut b = Builder::new(0, 16);
    b.blk(T_IN, 3, &[(DATA, 1024)]);
    let payload: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
    b.image(DATA + 0x400, &payload);
    b.blk(T_OUT, 10, &[(DATA + 0x400, 512)]);
    b.blk(T_FLUSH, 0, &[]);
    b.blk(T_GET_ID, 0, &[(DATA + 0x600, 20)]);
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert!(!r.served.needs_reset);
    assert_eq!(used_idx(&r.mem), 4);
    for slot in 0..4 {
        assert_eq!(
            status_byte(&r.mem, slot),
            0,
            "request {slot}: VIRTIO_BLK_S_OK"
        );
    }
    assert_eq!(used(&r.mem, 0), (0, 1025), "1024 bytes and the status");
    assert_eq!(read_guest(&r.mem, DATA, 1024), reference[3 * 512..5 * 512]);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk[10 * 512..11 * 512], payload[..]);
    assert_eq!(disk[..10 * 512], reference[..10 * 512]);
    assert_eq!(disk[11 * 512..], reference[11 * 512..]);
    assert_eq!(r.written, BTreeSet::from([1]), "sector 10 is in block 1");
    assert_eq!(&read_guest(&r.mem, DATA + 0x600, 11), b"fuzz-serial");
}

#[test]
fn refused_requests_get_their_status_and_leave_the_disk_alone() {
    let path = scratch("concrete-refused.img");
    let reference = disk_ref();
    let mut b = Builder::new(0, 32);
    // The last sector and one beyond.
    b.blk(T_IN, 63, &[(DATA, 1024)]);
    // sector * 512 overflows.
    b.blk(T_OUT, u64::MAX / 512 + 1, &[(DATA, 512)]);
    // Just beyond the disk.
    b.blk(T_OUT, 64, &[(DATA, 512)]);
    // Wraps: start + length overflows.
    b.blk(T_OUT, u64::MAX / 512, &[(DATA, 1024)]);
    // A data buffer in the hole between the RAM regions.
    b.blk(T_OUT, 0, &[(RAM_A.1 as u64, 512)]);
    // Not whole sectors.
    b.blk(T_OUT, 0, &[(DATA, 100)]);
    // A write whose data buffer is write-only.
    let h = b.blk(T_OUT, 0, &[(DATA, 512)]);
    b.desc_at(DESC, h + 1, DATA, 512, WRITE | NEXT, h + 2);
    // An unknown type.
    b.blk(0x99, 0, &[(DATA, 512)]);
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert!(!r.served.needs_reset);
    assert!(r.t.active());
    assert_eq!(used_idx(&r.mem), 8);
    for slot in 0..7 {
        assert_eq!(
            status_byte(&r.mem, slot),
            1,
            "request {slot}: VIRTIO_BLK_S_IOERR"
        );
        assert_eq!(used(&r.mem, slot).1, 1, "request {slot}: only the status");
    }
    assert_eq!(status_byte(&r.mem, 7), 2, "VIRTIO_BLK_S_UNSUPP");
    assert_eq!(std::fs::read(&path).unwrap(), reference);
    assert!(r.written.is_empty());
    assert_eq!(stat(&r.t, "errors"), 8);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let path = scratch("concrete-ro.img");
    let reference = disk_ref();
    let mut b = Builder::new(0, 16);
    b.blk(T_OUT, 0, &[(DATA, 512)]);
    b.blk(T_IN, 0, &[(DATA + 0x200, 512)]);
    b.set(ctl::FLAGS, &[2]);
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert_eq!(status_byte(&r.mem, 0), 1);
    assert_eq!(status_byte(&r.mem, 1), 0);
    assert_eq!(std::fs::read(&path).unwrap(), reference);
}

#[test]
fn broken_chains_are_returned_unused_and_the_device_goes_on() {
    let path = scratch("concrete-broken.img");
    let reference = disk_ref();
    let mut b = Builder::new(0, 16);
    // 0 -> 1 -> 0: a loop.
    let hdr = b.blk_header(0, T_OUT, 0);
    b.image(STATUS, &[0xff]);
    b.desc_at(DESC, 0, hdr, 16, NEXT, 1);
    b.desc_at(DESC, 1, STATUS, 1, NEXT | WRITE, 0);
    b.publish(0);
    b.next_desc = 2;
    // `next` outside the table.
    let h = b.blk(T_IN, 0, &[(DATA, 512)]);
    b.desc_at(DESC, h + 1, DATA, 512, NEXT | WRITE, 300);
    // A head outside the queue would break it: not here. The same chain
    // twice, and a good one.
    b.publish(h);
    b.blk(T_IN, 2, &[(DATA + 0x200, 512)]);
    // An indirect table of 65535 descriptors looping: cut at the size.
    let table = 0x3800;
    b.desc_at(table, 0, hdr, 16, NEXT, 1);
    b.desc_at(table, 1, DATA, 0, NEXT, 0);
    let i = b.next_desc;
    b.desc_at(DESC, i, table, 16 * 0xffff, INDIRECT, 0);
    b.publish(i);
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert!(!r.served.needs_reset);
    assert_eq!(used_idx(&r.mem), 5);
    assert_eq!(used(&r.mem, 0), (0, 0), "the loop: nothing written");
    assert_eq!(status_byte(&r.mem, 0), 0xff, "no status for a loop");
    assert_eq!(used(&r.mem, 1).1, 0);
    assert_eq!(used(&r.mem, 2).1, 0);
    assert_eq!(status_byte(&r.mem, 3), 0, "the good one");
    assert_eq!(used(&r.mem, 4), (u32::from(i), 0));
    assert_eq!(stat(&r.t, "malformed"), 4);
    assert_eq!(std::fs::read(&path).unwrap(), reference);
}

#[test]
fn a_broken_queue_needs_a_reset_at_once() {
    let path = scratch("concrete-reset.img");
    let reference = disk_ref();
    // The avail index far ahead of the device.
    let mut b = Builder::new(0, 16);
    b.blk(T_OUT, 0, &[(DATA, 512)]);
    b.image(AVAIL + 2, &0x8000u16.to_le_bytes());
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert!(r.served.needs_reset);
    assert_eq!(r.served.done, vec![0]);
    assert!(!r.t.active());
    assert_eq!(used_idx(&r.mem), 0);
    // Each device below opens the disk anew: the one before lets it go
    // first (a writable disk is locked while open).
    drop(r);
    // A head outside the queue: served up to it, then a reset.
    let mut b = Builder::new(0, 16);
    b.blk(T_IN, 0, &[(DATA, 512)]);
    b.publish(77);
    let r = serve_blk(&path, &reference, &b.done()).unwrap();
    assert!(r.served.needs_reset);
    assert_eq!(used_idx(&r.mem), 1);
    drop(r);
    // An avail ring whose entries run out of guest RAM.
    let mut b = Builder::new(0, 16);
    let ring = RAM_B.0 + RAM_B.1 as u64 - 4;
    b.set(ctl::AVAIL, &ring.to_le_bytes());
    let mut d = b.done();
    let mem = guest(&d);
    mem.write_obj(1u16, GuestAddress(ring + 2)).unwrap();
    d[ctl::FLAGS] = 0;
    std::fs::write(&path, &reference).unwrap();
    let mut t =
        MmioTransport::new(Box::new(Blk::new(DiskConfig::new(path.to_path_buf(), "s")))).unwrap();
    t.activate_backend().unwrap();
    let s = drive(&mut t, &d, 0, &mem, &DirtyLog::default());
    assert!(s.needs_reset, "silently stalled before");
    drop(t);
    // A queue size that is not a power of two, or beyond 16 bits: the
    // queue keeps its size (256).
    for size in [24u32, 0x1_0010] {
        let mut b = Builder::new(0, size);
        b.blk(T_IN, 0, &[(DATA, 512)]);
        let r = serve_blk(&path, &reference, &b.done()).unwrap();
        assert_eq!(r.t.save().queues[0].size, 256, "size {size:#x}");
    }
}

#[test]
fn a_migrated_disk_serves_reads_as_blocks_arrive_and_refuses_bad_writes() {
    let mut run = migrated_target();
    // Nothing here yet: the read waits for blocks 0 and 1, the writes own
    // blocks 2 and 3.
    let (c, s) = run(&migrated_seeds()[0]).unwrap();
    assert_eq!(c, "11000-4", "{s:?}");
    // Beyond the disk, and overflowing: refused, no block becomes the
    // guest's (the closure checks ownership against the write log).
    let mut b = Builder::new(0, 16);
    b.blk(T_IN, 63, &[(DATA, 1024)]);
    b.blk(T_OUT, 64, &[(DATA, 512)]);
    b.blk(T_OUT, u64::MAX / 512, &[(DATA, 1024)]);
    // No bytes at all (this made block 2 the guest's before).
    b.blk(T_OUT, 17, &[(DATA, 0)]);
    let (c, _) = run(&b.done()).unwrap();
    assert_eq!(c, "00010-4");
}

#[test]
fn net_moves_good_frames_and_returns_bad_chains_unused() {
    // Receive: 60 and 1514 bytes fit; 9216 does not fit 64 and waits.
    let d = net_seeds(true)[0].clone();
    let (fd, peer) = net_pair();
    let mut t = MmioTransport::new(Box::new(Net::with_frame_fd(net_config(), fd))).unwrap();
    t.activate_backend().unwrap();
    let mem = guest(&d);
    for (k, len) in [60usize, 1514, 9216].into_iter().enumerate() {
        peer.send(&frame(len, k as u8)).unwrap();
    }
    let s = drive(&mut t, &d, 0, &mem, &DirtyLog::default());
    assert!(!s.needs_reset);
    assert_eq!(used(&mem, 0), (0, 12 + 60));
    assert_eq!(used(&mem, 1), (1, 12 + 1514));
    assert_eq!(used(&mem, 2), (3, 0), "too small: unused");
    assert_eq!(read_guest(&mem, DATA + 10, 2), [1, 0], "num_buffers");
    assert_eq!(read_guest(&mem, DATA + 12, 60), frame(60, 0));
    assert_eq!(read_guest(&mem, DATA + 0x810, 1514), frame(1514, 1));
    assert_eq!(stat(&t, "rx_frames"), 2);
    assert_eq!(stat(&t, "malformed"), 1);
    // Transmit: two good frames, one too short.
    let d = net_seeds(false)[0].clone();
    let (fd, peer) = net_pair();
    let mut t = MmioTransport::new(Box::new(Net::with_frame_fd(net_config(), fd))).unwrap();
    t.activate_backend().unwrap();
    let mem = guest(&d);
    let s = drive(&mut t, &d, 1, &mem, &DirtyLog::default());
    assert!(!s.needs_reset);
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], frame(60, 1)[..]);
    }
    assert!(peer.recv(&mut buf).is_err());
    assert_eq!(stat(&t, "malformed"), 1);
    assert_eq!(used_idx(&mem), 3);
}
