//! userfaultfd page install benchmark on this machine.
//!
//! 1. Copy throughput: `UffdRam::install` of every page of fresh guest RAM
//!    (all pages missing), 1, 16, 64, 256 or 512 pages per `UFFDIO_COPY`.
//! 2. Minor-fault mode: the memory file allocated first (`fallocate`,
//!    timed apart), then each batch written through the file and mapped
//!    with `UFFDIO_CONTINUE`, 32 or 256 pages per call.
//! 3. Huge pages (`--huge-pages`): `UffdRam::install` of every page of
//!    fresh 2 MiB-page guest RAM, 512 pages per call, so each call stages
//!    one huge page and maps it with one `UFFDIO_COPY`. Needs that many free
//!    pages in the pool (scripts/setup.sh reserves some); without them the
//!    row says so instead of a figure.
//! 4. `UFFDIO_ZEROPAGE`: `UffdRam::install_zeros` of every page, one per call.
//! 5. Fault round trip: a thread reads missing pages one by one; the main
//!    thread spins on the (non-blocking) userfaultfd, and installs each
//!    faulting page with `UFFDIO_COPY`, which wakes the thread. Reported as
//!    the thread's blocked time per page, and the handler's share of it
//!    (event read → install returned).
//!
//! The source buffer is the same (cache-warm) pattern for every call, so the
//! numbers are the kernel's cost of allocating, filling and mapping shmem
//! pages, not of reading cold source data.
//!
//! `cargo bench -p ferry-engine --bench uffd_install` runs 256 MiB; without
//! `--bench` (as under `cargo test --benches`) it runs a quick 8 MiB smoke
//! version (in the smallest guest RAM the engine accepts).

use std::thread;
use std::time::{Duration, Instant};

use ferry_engine::layout::{MIN_MEM, PAGE_SIZE};
use ferry_engine::memory::{Backing, GuestRam};
use ferry_engine::migration::uffd_ram::UffdRam;
use hdrhistogram::Histogram;
use serde_json::json;
use userfaultfd::{Event, EventBuffer, FeatureFlags, RegisterMode, UffdBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const BATCHES: [u64; 5] = [1, 16, 64, 256, 512];

/// Fresh guest RAM of at least `bytes`, every page missing under userfaultfd.
fn fresh(bytes: u64) -> (GuestRam, UffdRam) {
    let ram = GuestRam::new(bytes.max(MIN_MEM)).expect("guest RAM");
    let uffd = UffdRam::register(&ram).expect("userfaultfd registration");
    (ram, uffd)
}

/// Seconds to install the first `pages` pages of fresh huge-page RAM, one
/// huge page per call (the error when the pool cannot hold it).
fn huge_secs(pages: u64, src: &[u8]) -> Result<f64, String> {
    let ram = GuestRam::with_backing((pages * PAGE_SIZE as u64).max(MIN_MEM), Backing::HugePages)
        .map_err(|e| e.to_string())?;
    let uffd = UffdRam::register(&ram).expect("userfaultfd registration");
    let data = &src[..512 * PAGE_SIZE];
    let t = Instant::now();
    let mut installed = 0;
    for pfn in (0..pages).step_by(512) {
        installed += uffd.install(pfn, data).expect("install");
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(installed, pages, "not every page was installed");
    Ok(secs)
}

/// A non-zero source buffer of `pages` pages.
fn source(pages: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    buf
}

/// Seconds to install the first `pages` pages `batch` pages per call.
fn copy_secs(pages: u64, batch: u64, src: &[u8]) -> f64 {
    let (_ram, uffd) = fresh(pages * PAGE_SIZE as u64);
    let data = &src[..batch as usize * PAGE_SIZE];
    let mut installed = 0;
    let t = Instant::now();
    let mut pfn = 0;
    while pfn < pages {
        let n = batch.min(pages - pfn) as usize;
        installed += uffd.install(pfn, &data[..n * PAGE_SIZE]).expect("install");
        pfn += batch;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(installed, pages, "not every page was installed");
    secs
}

/// `UFFD_FEATURE_MINOR_SHMEM` (linux/userfaultfd.h), which the crate's
/// `FeatureFlags` does not name.
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// Minor-fault mode, the alternative to `UFFDIO_COPY` that post-copy could
/// use: the memory file is allocated whole first (`fallocate`, which a
/// destination could do during the handshake, while the source still
/// runs), registered for minor faults, and each batch is written through
/// the file and mapped with `UFFDIO_CONTINUE`. Returns (allocation secs,
/// install secs) for the first `pages` pages, `batch` pages per call.
fn minor_secs(pages: u64, batch: u64, src: &[u8]) -> (f64, f64) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let ram = GuestRam::new((pages * PAGE_SIZE as u64).max(MIN_MEM)).expect("guest RAM");
    let first = ram.ranges()[0];
    assert!(
        first.file_offset == 0 && first.len >= pages * PAGE_SIZE as u64,
        "the bench's pages lie in guest RAM's first range"
    );
    let t = Instant::now();
    // SAFETY: the descriptor is `ram`'s memory file, alive for this call;
    // fallocate only allocates the file's pages (zeroed).
    let r = unsafe { libc::fallocate(ram.file().as_raw_fd(), 0, 0, ram.size() as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let alloc = t.elapsed().as_secs_f64();
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM))
        .create()
        .expect("userfaultfd with minor faults on shmem");
    let host = ram
        .guest_memory()
        .get_host_address(GuestAddress(first.guest_addr))
        .expect("host address") as usize;
    uffd.register_with_mode(
        host as *mut libc::c_void,
        first.len as usize,
        RegisterMode::MINOR,
    )
    .expect("minor-fault registration");
    let data = &src[..batch as usize * PAGE_SIZE];
    let t = Instant::now();
    let mut pfn = 0;
    while pfn < pages {
        let n = batch.min(pages - pfn) as usize * PAGE_SIZE;
        let at = pfn as usize * PAGE_SIZE;
        ram.file()
            .write_all_at(&data[..n], at as u64)
            .expect("write through the file");
        let mut done = 0;
        while done < n {
            let mapped = uffd
                .r#continue((host + at + done) as *mut libc::c_void, n - done, true)
                .expect("UFFDIO_CONTINUE");
            done += mapped as usize;
        }
        pfn += batch;
    }
    (alloc, t.elapsed().as_secs_f64())
}

/// Seconds to zero-install the first `pages` pages, one per call.
fn zero_secs(pages: u64) -> f64 {
    let (_ram, uffd) = fresh(pages * PAGE_SIZE as u64);
    let t = Instant::now();
    let mut installed = 0;
    for pfn in 0..pages {
        installed += uffd.install_zeros(pfn, 1).expect("install_zeros");
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(installed, pages, "not every page was installed");
    secs
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")
}

/// Fault round trips over the first `pages` pages: (thread blocked time,
/// handler time), both in ns.
fn fault_round_trip(pages: u64, src: &[u8]) -> (Histogram<u64>, Histogram<u64>) {
    let (ram, uffd) = fresh(pages * PAGE_SIZE as u64);
    let page = &src[..PAGE_SIZE];
    let toucher = {
        let ram = ram.clone();
        thread::spawn(move || {
            let mem = ram.guest_memory();
            let mut h = histogram();
            for pfn in 0..pages {
                let t = Instant::now();
                let b: u8 = mem
                    .read_obj(GuestAddress(pfn * PAGE_SIZE as u64))
                    .expect("guest read");
                h.record(t.elapsed().as_nanos() as u64).expect("record");
                std::hint::black_box(b);
            }
            h
        })
    };
    let mut handler = histogram();
    let mut events = EventBuffer::new(16);
    let mut served = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while served < pages {
        assert!(Instant::now() < deadline, "fault round trip stalled");
        let evs = uffd.uffd().read_events(&mut events).expect("read_events");
        let t = Instant::now();
        let mut faults = Vec::new();
        for ev in evs {
            if let Ok(Event::Pagefault { addr, .. }) = ev {
                faults.push(addr as usize);
            }
        }
        for addr in faults {
            let pfn = uffd.pfn_of(addr).expect("fault inside guest RAM");
            if uffd.install(pfn, page).expect("install") == 1 {
                handler
                    .record(t.elapsed().as_nanos() as u64)
                    .expect("record");
                served += 1;
            } else {
                uffd.wake(pfn);
            }
        }
    }
    let blocked = toucher.join().expect("toucher thread");
    (blocked, handler)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "n": h.len(),
        "p50_us": us(h.value_at_quantile(0.5)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "max_us": us(h.max()),
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (mib, reps) = if full { (256u64, 3) } else { (8, 1) };
    let pages = mib << 20 >> 12;
    let src = source(*BATCHES.iter().max().unwrap_or(&1) as usize);
    println!("uffd install bench: {mib} MiB of missing shmem guest RAM, best of {reps} run(s)\n");

    println!(
        "{:<22} {:>9} {:>10} {:>12} {:>10}",
        "install", "secs", "MiB/s", "pages/s", "µs/call"
    );
    let mut rows = Vec::new();
    let row = |name: String, batch: u64, secs: f64| {
        let mib_s = mib as f64 / secs;
        let pages_s = pages as f64 / secs;
        let calls = pages.div_ceil(batch);
        let us_call = secs * 1e6 / calls as f64;
        println!("{name:<22} {secs:>9.3} {mib_s:>10.0} {pages_s:>12.0} {us_call:>10.2}");
        (mib_s, pages_s, us_call)
    };
    let entry = |op: &str, batch: u64, secs: f64, (mib_s, pages_s, us_call): (f64, f64, f64)| {
        json!({
            "op": op,
            "pages_per_call": batch,
            "secs": secs,
            "mib_s": mib_s,
            "pages_s": pages_s,
            "us_per_call": us_call,
        })
    };
    for batch in BATCHES {
        let secs = (0..reps)
            .map(|_| copy_secs(pages, batch, &src))
            .fold(f64::INFINITY, f64::min);
        let rates = row(format!("copy {batch:>3} pages/call"), batch, secs);
        rows.push(entry("copy", batch, secs, rates));
    }
    for batch in [32, 256] {
        let (alloc, install) = (0..reps)
            .map(|_| minor_secs(pages, batch, &src))
            .fold((f64::INFINITY, f64::INFINITY), |a, b| {
                (a.0.min(b.0), a.1.min(b.1))
            });
        row("fallocate (before)".to_string(), batch, alloc);
        let rates = row(format!("write+continue {batch:>3}"), batch, install);
        let mut e = entry("minor", batch, install, rates);
        e["alloc_secs"] = json!(alloc);
        rows.push(e);
    }
    match (0..reps)
        .map(|_| huge_secs(pages, &src))
        .collect::<Result<Vec<f64>, String>>()
    {
        Ok(all) => {
            let secs = all.into_iter().fold(f64::INFINITY, f64::min);
            let rates = row("huge 512 pages/call".into(), 512, secs);
            rows.push(entry("huge", 512, secs, rates));
        }
        Err(e) => println!("huge 512 pages/call    not measured: {e}"),
    }
    let secs = (0..reps)
        .map(|_| zero_secs(pages))
        .fold(f64::INFINITY, f64::min);
    let rates = row("zeropage   1 page/call".into(), 1, secs);
    rows.push(entry("zeropage", 1, secs, rates));

    let (blocked, handler) = fault_round_trip(pages, &src);
    println!(
        "\n{:<34} {:>7} {:>8} {:>8} {:>9}",
        "fault round trip (1 page, µs)", "n", "p50", "p99", "max"
    );
    for (name, h) in [
        ("touch → resumed (thread blocked)", &blocked),
        ("event read → page installed", &handler),
    ] {
        println!(
            "{:<34} {:>7} {:>8.2} {:>8.2} {:>9.1}",
            name,
            h.len(),
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.max())
        );
    }

    let line = json!({
        "bench": "uffd_install",
        "mib": mib,
        "reps": reps,
        "install": rows,
        "fault_round_trip": summary(&blocked),
        "fault_handler": summary(&handler),
    });
    println!("\n{line}");
}
