//! Ferry's workload guest: a small freestanding x86-64 kernel that dirties
//! and verifies memory, and checks CPU state, while it is live-migrated.
//! It is the project's correctness oracle: any state the VMM loses or
//! corrupts shows up as a `FERRY BAD ...` line on the serial port.
//!
//! [`GUEST_ELF`] is the image, built from C and GNU assembler sources in
//! `guest/src/` by `build.rs` (gcc + ld, no prebuilt blobs).  [`parse_line`]
//! parses its serial output.
//!
//! # Image and boot protocol
//!
//! An ELF64 executable linked at physical 1 MiB ([`LOAD_ADDR`]); one
//! loadable segment (its `.bss` must be zeroed by the loader, as ELF
//! loaders do) and a `PT_NOTE` segment.
//!
//! * **PVH entry** (the `XEN_ELFNOTE_PHYS32_ENTRY` note, what
//!   `qemu-system-x86_64 -M microvm -kernel` and linux-loader use):
//!   32-bit protected mode, paging off, `EBX` = physical address of
//!   `struct hvm_start_info` (magic `0x336ec578`, version >= 1 with a
//!   memory map).  The guest enables long mode itself with static page
//!   tables that identity-map the first 1 GiB.
//! * **64-bit entry** (ELF `e_entry`, `_start64`): long mode on, an
//!   identity map covering at least the first 1 GiB, `RBX` = physical
//!   address of the `hvm_start_info`, `RSP` undefined.  4-level paging.
//!
//! `hvm_start_info`, its command line and memory map must lie below 1 GiB.
//! All vCPUs may enter at once with the same `EBX`/`RBX`: each finds its
//! index from its initial APIC ID (CPUID.1:EBX\[31:24\], must be
//! `0..`[`MAX_VCPUS`]) and picks its own stack before using any.  APIC ID 0
//! (the BSP) parses `start_info`, builds identity page tables (2 MiB pages)
//! for all RAM in the memory map (RAM above 4 GiB included, up to 512 GiB)
//! plus `0xfec00000..4G` uncached, then releases the others.  Under QEMU
//! only the BSP runs, so use `cpus=1` there.
//!
//! Each vCPU then loads its TSS and the IDT, enables SSE and, if CPUID has
//! XSAVE+AVX, `XCR0 = x87|SSE|AVX`; starts its LAPIC timer periodic at
//! 100 Hz (vector 0x30; x2APIC if CPUID.1:ECX\[21\], else xAPIC MMIO at
//! `0xfee00000`, calibrated against the TSC); writes its MSR values; and
//! drops to **ring 3**, where the workload runs.
//!
//! Why ring 3: on PVM (the KVM flavour this project is developed on) the
//! ring-0 code of a guest that is not PVM-aware is executed by KVM's
//! instruction emulator (~1 µs per instruction, and no SSE compares, no
//! AVX), while ring 3 runs natively.  So ring 0 only does setup, interrupts
//! and exceptions; the workload and the register check run in ring 3
//! (all pages are user-accessible).  Ring 3 queues its output lines per
//! CPU and calls into ring 0 with a `ud2` at one known address (PVM turns
//! `int $n` from ring 3 into #UD); ring 0 prints the queue to the UART
//! then, and on every timer tick.  MSR checks run in ring 0 the same way.
//!
//! # Command line
//!
//! Space-separated `key=value`, all optional; unknown keys are ignored; a
//! bad value prints `FERRY BAD cmdline <key>` and keeps the default.
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `cpus=N` | vCPUs that enter (1..=8); vCPUs with a higher index halt | 1 |
//! | `ws=SIZE` | working set, bytes with optional `K`/`M`/`G` | `64M` |
//! | `pattern=seq\|random\|hotcold` | page choice; hotcold sends 90% of accesses to the first 10% of each vCPU's pages | `random` |
//! | `write=0..100` | percent of page operations that write | 50 |
//! | `rate=N` | dirty-page rate limit, pages/s over all vCPUs, 0 = none | 0 |
//! | `report_ms=N` | TICK/check interval | 100 |
//! | `tsc_khz=N` | TSC frequency; otherwise calibrated against PIT channel 0 | - |
//! | `seed=N` | random seed | 0 |
//! | `avx=0` | don't use AVX even if CPUID has it | auto |
//! | `x2apic=0` | drive the LAPIC through xAPIC MMIO even if x2APIC exists | auto |
//! | `inject=page\|reg\|msr\|timer` | self-test: vCPU 0 injects one fault at its 3rd report | none |
//! | `stream=1` | no workload: every vCPU prints the `STREAM` byte stream (below) | 0 |
//! | `disk=1` | vCPU 0 also runs the disk workload on the first virtio-blk device | 0 |
//! | `disk_batch=N` | disk requests in flight per batch (1..=8) | 4 |
//! | `disk_blocks=N` | 4 KiB disk blocks used (at most 4096 and the disk's size) | 256 |
//! | `disk_ops=N` | stop the disk workload after N requests and print the generations | never |
//! | `disk_bad=1` | also submit malformed descriptor chains | 0 |
//!
//! The working set is clamped to free RAM (after the image, page tables
//! and the generation array) and split evenly: vCPU `v` owns pages
//! `[v*n, (v+1)*n)` with `n = ws_pages / cpus`.  Pages are taken from the
//! top of RAM down, so big guests use memory above 4 GiB.
//!
//! # Workload and checks
//!
//! Word `i` (of 512) of working-set page `p` at generation `g` is
//! `mix64(mix64(p << 32 ^ g) + i)` (splitmix64 finaliser), so one flipped bit
//! anywhere is caught.  Generations are a `u32` array in guest RAM.  After
//! filling its pages (generation 0) a vCPU prints `READY` and loops over
//! rounds: 8 page operations (pick a page by the pattern, verify all of it,
//! with probability `write%` bump its generation and rewrite it, waiting on
//! the TSC for the dirty-rate limit), then the register check (load
//! per-vCPU, per-round values into rbx, r12-r15, xmm8-15 and the upper
//! halves of ymm8-15, spin 2 µs with `pause`, compare), then the TSC
//! monotonicity check.  Every `report_ms` it prints `TICK`, checks that its
//! timer interrupt count grows (checked over windows of at least 20 ms:
//! two windows in a row without a timer interrupt are BAD, since a pause of
//! the VM can empty only the window it falls in; after a TSC gap of more
//! than 10 intervals that report and the next one are not checked), and has
//! ring 0 compare
//! `KERNEL_GS_BASE`, `STAR`, `LSTAR` and (with RDTSCP) `TSC_AUX` with the
//! values it wrote.  A corrupted page is reported and rewritten, so one
//! corruption gives one line.
//!
//! # Output protocol (COM1, 0x3f8)
//!
//! Whole lines ending in `\n`, never interleaved.  Numbers are decimal
//! unless prefixed `0x`.
//!
//! ```text
//! FERRY BOOT cpus=<n> mem_mib=<n> ws_pages=<n> pattern=<p> write=<n> rate=<n> report_ms=<n> tsc_khz=<n> avx=<0|1> x2apic=<0|1>
//! FERRY WS seg=<i> pa=0x<hex> pages=<n> first_page=<n>
//! FERRY READY <vcpu>
//! FERRY TICK <vcpu> <round> <tsc> <timer_irqs> <pages_verified>
//! FERRY INJECT <what> vcpu=<n>
//! FERRY BAD <what> <detail...>
//! FERRY STREAM <vcpu> <seq> <payload> 0x<sum>
//! FERRY DISKINFO sectors=<n> blocks=<n> serial=<s>
//! FERRY DISK <ops> <errors> <malformed> <rejected>
//! FERRY DISKGEN <first_block> <gen> <gen> ...
//! FERRY DISKEND <ops> <errors> <blocks>
//! ```
//!
//! `DISK*` lines come with `disk=1` (see `guest/src/disk.c`): vCPU 0
//! drives the first virtio-mmio device the command line names
//! (`virtio_mmio.device=<size>@<base>:<irq>`, as the VMM adds it) with a
//! polled split virtqueue. It writes every block at generation 1, then
//! runs batches of `disk_batch` reads and writes on distinct random
//! 4 KiB blocks, checking each read against the generation it keeps in
//! RAM ([`disk_block`] is the block format) and that every used-ring entry
//! completes exactly one request in flight. `DISK` comes with each
//! `TICK` of vCPU 0. With `disk_ops=N` it stops after N requests and
//! prints every block's generation (`DISKGEN`, 16 per line) and `DISKEND`.
//! With `disk_bad=1` every fourth batch is followed by one malformed
//! chain, which must come back with an error status (counted in
//! `rejected`). Mismatches are `FERRY BAD disk ...`.
//!
//! `STREAM` lines (only with `stream=1`) come as fast as the vCPU can print
//! them, one port I/O exit per byte: a test of the VMM's I/O path, not of
//! memory. Per vCPU, `seq` counts from 0 without gaps, `payload` is
//! [`stream_payload`]`(vcpu, seq)` and `sum` is [`stream_sum`] over the
//! payloads of lines `0..=seq`: so the stream the host receives is fully
//! known in advance, and a byte lost or doubled anywhere shows. In this
//! mode the guest also enables the UART's THR-empty interrupt (its line
//! stays masked) and reads IIR after every byte, which must report it: a
//! port read that reached the UART twice (a VM restored from a state saved
//! before KVM completed the `in`, so it runs the `in` again) finds none,
//! and the next `STREAM` line is followed by
//! `FERRY BAD uart thre_missed=<n> vcpu=<v> seq=<seq>`.
//!
//! `WS` lines (one per physically contiguous run of working-set pages,
//! after `BOOT`) say where the working set lives: working-set page
//! `first_page + k` is at `pa + 4096 * k`.  Writing anything to such a
//! page from outside must produce `FERRY BAD page`.
//!
//! `BAD` lines (at most 10 per second in total; the excess is counted in
//! `FERRY BAD suppressed count=<n>`):
//!
//! ```text
//! FERRY BAD page <page> gen=<g> word=<i> want=0x<hex> got=0x<hex> bad_words=<n> vcpu=<n> pa=0x<hex>
//! FERRY BAD reg <rbx|r12..r15|xmm8..xmm15|ymm8h..ymm15h> vcpu=<n> round=<n>
//! FERRY BAD msr 0x<msr> want=0x<hex> got=0x<hex> vcpu=<n>
//! FERRY BAD tsc vcpu=<n> prev=<tsc> now=<tsc>
//! FERRY BAD timer vcpu=<n> irqs=<n>
//! FERRY BAD exception vec=<n> rip=0x<hex> err=0x<hex> cr2=0x<hex> vcpu=<n>   (that vCPU halts)
//! FERRY BAD irq vec=<n> vcpu=<n>
//! FERRY BAD cmdline <key>
//! FERRY BAD start_info|memmap|mm|tsc_khz ...
//! FERRY BAD uart thre_missed=<n> vcpu=<n> seq=<n>      (stream=1 only, see above)
//! ```

/// The guest image (ELF64, PVH note + 64-bit entry).
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// A PVH kernel that never prints: each vCPU increments one word in every
/// page of [16 MiB, 32 MiB) forever (`src/silent.S`). For tests of guests
/// that the workload oracle does not describe; it needs at least 32 MiB.
pub static SILENT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-silent.elf"));

/// Physical address the image is linked and loaded at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Most vCPUs the guest supports (initial APIC IDs `0..MAX_VCPUS`).
pub const MAX_VCPUS: u32 = 8;

/// Bytes per working-set page.
pub const PAGE_SIZE: u64 = 4096;

/// One parsed line of guest serial output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `FERRY BOOT ...`: the BSP's configuration summary.
    Boot {
        /// vCPUs that run the workload.
        cpus: u32,
        /// Total RAM in the memory map, MiB.
        mem_mib: u64,
        /// Working-set pages over all vCPUs.
        ws_pages: u64,
        /// `seq`, `random` or `hotcold`.
        pattern: String,
        /// Percent of page operations that write.
        write: u32,
        /// Dirty-rate limit, pages/s (0 = none).
        rate: u64,
        /// Report interval, ms.
        report_ms: u64,
        /// TSC frequency used, kHz.
        tsc_khz: u64,
        /// AVX state is being checked.
        avx: bool,
        /// The LAPIC runs in x2APIC mode.
        x2apic: bool,
    },
    /// `FERRY WS ...`: a physically contiguous run of working-set pages.
    Ws {
        /// Segment number.
        seg: u32,
        /// Guest physical address of the first page.
        pa: u64,
        /// Pages in the run.
        pages: u64,
        /// Working-set page number of the first page.
        first_page: u64,
    },
    /// `FERRY READY <vcpu>`: the vCPU filled its pages and started looping.
    Ready {
        /// vCPU index.
        vcpu: u32,
    },
    /// `FERRY TICK ...`: periodic progress report.
    Tick {
        /// vCPU index.
        vcpu: u32,
        /// Rounds completed.
        round: u64,
        /// TSC when the line was made.
        tsc: u64,
        /// Timer interrupts taken by this vCPU.
        timer_irqs: u64,
        /// Pages verified by this vCPU.
        pages_verified: u64,
    },
    /// `FERRY BAD <what> <detail>`: the oracle caught an error.
    Bad {
        /// First word: `page`, `reg`, `msr`, `tsc`, `timer`, `exception`, ...
        what: String,
        /// The rest of the line.
        detail: String,
    },
    /// `FERRY STREAM ...`: one line of the `stream=1` byte stream.
    Stream {
        /// vCPU index.
        vcpu: u32,
        /// Line number in this vCPU's stream, from 0.
        seq: u64,
        /// The line's payload.
        payload: String,
        /// [`stream_sum`] over the payloads of lines `0..=seq`.
        sum: u64,
    },
    /// `FERRY DISK <ops> <errors> [<malformed> <rejected>]`: the disk
    /// workload's progress (`disk=1`).
    Disk {
        /// Requests completed since the disk was filled.
        ops: u64,
        /// Errors found (each also printed as `FERRY BAD disk`).
        errors: u64,
        /// Malformed chains submitted (`disk_bad=1`).
        malformed: u64,
        /// Malformed chains the device answered with an error.
        rejected: u64,
    },
    /// `FERRY DISKINFO sectors=<n> blocks=<n> serial=<s>`.
    DiskInfo {
        /// The device's capacity in 512-byte sectors.
        sectors: u64,
        /// 4 KiB blocks the workload uses.
        blocks: u64,
        /// What GET_ID answered (`-` if empty).
        serial: String,
    },
    /// `FERRY DISKGEN <first> <gen>...`: generations of blocks `first..`.
    DiskGen {
        /// First block of the line.
        first: u64,
        /// Generation of each block from `first` on.
        gens: Vec<u32>,
    },
    /// `FERRY DISKEND <ops> <errors> <blocks>`: the disk workload stopped
    /// (`disk_ops=N`) after its `DISKGEN` lines.
    DiskEnd {
        /// Requests completed.
        ops: u64,
        /// Errors found.
        errors: u64,
        /// Blocks used.
        blocks: u64,
    },
    /// `FERRY NET <sent> <echoed> <lost> [<late> <dup> <arp>]`: the
    /// network echo workload's progress (`net=1`).
    Net {
        /// Datagrams sent.
        sent: u64,
        /// Distinct datagrams echoed back intact.
        echoed: u64,
        /// Datagrams not echoed within 50 sends (500 ms at `net_ms=10`).
        lost: u64,
        /// Echoes that came back too late to count (beyond 1024 sends).
        late: u64,
        /// Echoes of a number already echoed.
        dup: u64,
        /// Times the peer's MAC was learned (or changed) by ARP.
        arp: u64,
    },
    /// `FERRY NETMAC <mac>`: the guest found a new MAC in its card's
    /// configuration (a restore with another `--net mac=`).
    NetMac(String),
    /// Anything else (including `FERRY INJECT` and malformed `FERRY` lines).
    Other(String),
}

/// Bytes of one disk-workload block.
pub const DISK_BLOCK: usize = 4096;
/// Word 0 of every block the disk workload writes ("FERRYBLK").
pub const DISK_MAGIC: u64 = 0x4b4c_4259_5252_4546;

/// The content of disk block `block` at generation `gen`, as the guest
/// writes it: word 0 [`DISK_MAGIC`], word 1 the block, word 2 the
/// generation, word `i >= 3` `mix64(seed + i)` with
/// `seed = mix64(block << 32 ^ gen ^ 0xd15c0000d15c)`, little-endian.
pub fn disk_block(block: u64, gen: u32) -> Vec<u8> {
    let seed = mix64((block << 32) ^ u64::from(gen) ^ 0xd15c_0000_d15c);
    (0..DISK_BLOCK as u64 / 8)
        .flat_map(|i| {
            match i {
                0 => DISK_MAGIC,
                1 => block,
                2 => u64::from(gen),
                _ => mix64(seed.wrapping_add(i)),
            }
            .to_le_bytes()
        })
        .collect()
}

/// Longest `STREAM` payload, in bytes.
pub const STREAM_MAX_PAYLOAD: u64 = 48;

/// The `STREAM` checksum before any payload byte (FNV-1a's offset basis).
pub const STREAM_SUM_START: u64 = 0xcbf2_9ce4_8422_2325;

/// splitmix64's finaliser, as the guest computes it.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The payload of line `seq` of `vcpu`'s `STREAM` (1 to
/// [`STREAM_MAX_PAYLOAD`] letters and digits), as the guest makes it.
pub fn stream_payload(vcpu: u32, seq: u64) -> String {
    const ALPHABET: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let h = mix64((u64::from(vcpu) << 56) ^ seq);
    let len = 1 + h % STREAM_MAX_PAYLOAD;
    (0..len)
        .map(|i| char::from(ALPHABET[(mix64(h.wrapping_add(i)) % 62) as usize]))
        .collect()
}

/// The running `STREAM` checksum `sum` continued over `payload` (FNV-1a 64).
pub fn stream_sum(sum: u64, payload: &[u8]) -> u64 {
    payload.iter().fold(sum, |s, &b| {
        (s ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Line `seq` of `vcpu`'s stream given `sum`, the checksum after line
/// `seq - 1` ([`STREAM_SUM_START`] for line 0): the exact text and the new
/// checksum.
pub fn stream_line(vcpu: u32, seq: u64, sum: u64) -> (String, u64) {
    let payload = stream_payload(vcpu, seq);
    let sum = stream_sum(sum, payload.as_bytes());
    (format!("FERRY STREAM {vcpu} {seq} {payload} {sum:#x}"), sum)
}

impl GuestLine {
    /// Is this a `FERRY BAD` line?
    pub fn is_bad(&self) -> bool {
        matches!(self, GuestLine::Bad { .. })
    }
}

/// Decimal, or hex with a `0x` prefix.
fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn num32(s: &str) -> Option<u32> {
    num(s).and_then(|v| u32::try_from(v).ok())
}

/// Value of `key=` among the `key=value` words, if present exactly once.
fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    let mut found = words
        .iter()
        .filter_map(|w| w.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v));
    let v = found.next()?;
    found.next().is_none().then_some(v)
}

fn flag(s: &str) -> Option<bool> {
    match s {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

fn parse_boot(w: &[&str]) -> Option<GuestLine> {
    Some(GuestLine::Boot {
        cpus: num32(field(w, "cpus")?)?,
        mem_mib: num(field(w, "mem_mib")?)?,
        ws_pages: num(field(w, "ws_pages")?)?,
        pattern: field(w, "pattern")?.to_string(),
        write: num32(field(w, "write")?)?,
        rate: num(field(w, "rate")?)?,
        report_ms: num(field(w, "report_ms")?)?,
        tsc_khz: num(field(w, "tsc_khz")?)?,
        avx: flag(field(w, "avx")?)?,
        x2apic: flag(field(w, "x2apic")?)?,
    })
}

fn parse_ws(w: &[&str]) -> Option<GuestLine> {
    Some(GuestLine::Ws {
        seg: num32(field(w, "seg")?)?,
        pa: num(field(w, "pa")?)?,
        pages: num(field(w, "pages")?)?,
        first_page: num(field(w, "first_page")?)?,
    })
}

fn parse_ferry(rest: &str) -> Option<GuestLine> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let (&kind, args) = words.split_first()?;
    match kind {
        "BOOT" => parse_boot(args),
        "WS" => parse_ws(args),
        "READY" => match args {
            [vcpu] => Some(GuestLine::Ready {
                vcpu: vcpu.parse().ok()?,
            }),
            _ => None,
        },
        "TICK" => match args {
            [vcpu, round, tsc, irqs, verified] => Some(GuestLine::Tick {
                vcpu: vcpu.parse().ok()?,
                round: round.parse().ok()?,
                tsc: tsc.parse().ok()?,
                timer_irqs: irqs.parse().ok()?,
                pages_verified: verified.parse().ok()?,
            }),
            _ => None,
        },
        "STREAM" => match args {
            [vcpu, seq, payload, sum] => Some(GuestLine::Stream {
                vcpu: vcpu.parse().ok()?,
                seq: seq.parse().ok()?,
                payload: payload.to_string(),
                sum: u64::from_str_radix(sum.strip_prefix("0x")?, 16).ok()?,
            }),
            _ => None,
        },
        "DISK" => match args {
            [ops, errors, rest @ ..] => {
                let (malformed, rejected) = match rest {
                    [] => (0, 0),
                    [m, r] => (m.parse().ok()?, r.parse().ok()?),
                    _ => return None,
                };
                Some(GuestLine::Disk {
                    ops: ops.parse().ok()?,
                    errors: errors.parse().ok()?,
                    malformed,
                    rejected,
                })
            }
            _ => None,
        },
        "NET" => match args {
            [sent, echoed, lost, rest @ ..] => {
                let (late, dup, arp) = match rest {
                    [] => (0, 0, 0),
                    [l, d, a] => (l.parse().ok()?, d.parse().ok()?, a.parse().ok()?),
                    _ => return None,
                };
                Some(GuestLine::Net {
                    sent: sent.parse().ok()?,
                    echoed: echoed.parse().ok()?,
                    lost: lost.parse().ok()?,
                    late,
                    dup,
                    arp,
                })
            }
            _ => None,
        },
        "NETMAC" => match args {
            [mac] => Some(GuestLine::NetMac(mac.to_string())),
            _ => None,
        },
        "DISKINFO" => Some(GuestLine::DiskInfo {
            sectors: field(args, "sectors")?.parse().ok()?,
            blocks: field(args, "blocks")?.parse().ok()?,
            serial: field(args, "serial")?.to_string(),
        }),
        "DISKGEN" => match args {
            [first, gens @ ..] => Some(GuestLine::DiskGen {
                first: first.parse().ok()?,
                gens: gens.iter().map(|g| g.parse().ok()).collect::<Option<_>>()?,
            }),
            _ => None,
        },
        "DISKEND" => match args {
            [ops, errors, blocks] => Some(GuestLine::DiskEnd {
                ops: ops.parse().ok()?,
                errors: errors.parse().ok()?,
                blocks: blocks.parse().ok()?,
            }),
            _ => None,
        },
        "BAD" => {
            let after = rest.trim_start().strip_prefix("BAD")?.trim();
            let (what, detail) = after.split_once(char::is_whitespace).unwrap_or((after, ""));
            Some(GuestLine::Bad {
                what: what.to_string(),
                detail: detail.trim().to_string(),
            })
        }
        _ => None,
    }
}

/// Parse one line of guest serial output (with or without its line end).
///
/// Never panics.  Lines that are not well-formed `FERRY` lines come back
/// as [`GuestLine::Other`], except that anything starting `FERRY BAD` is
/// always [`GuestLine::Bad`] (an empty `what` if nothing follows).
pub fn parse_line(line: &str) -> GuestLine {
    let line = line.trim_end_matches(['\r', '\n']);
    line.trim()
        .strip_prefix("FERRY ")
        .and_then(parse_ferry)
        .unwrap_or_else(|| GuestLine::Other(line.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails unless `line` parses as no known line.
    #[track_caller]
    fn assert_unparsed(line: &str) {
        assert!(matches!(parse_line(line), GuestLine::Other(_)), "{line:?}");
    }

    #[test]
    fn image_is_a_small_elf64_with_pvh_note() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        assert_eq!(GUEST_ELF[4], 2, "ELF64");
        assert!(
            GUEST_ELF.len() < 64 * 1024,
            "image is {} bytes",
            GUEST_ELF.len()
        );
        let xen_note = GUEST_ELF.windows(4).any(|w| w == b"Xen\0");
        assert!(xen_note);
        let entry = u64::from_le_bytes(GUEST_ELF[24..32].try_into().unwrap());
        assert!((LOAD_ADDR..LOAD_ADDR + 0x10_0000).contains(&entry));
    }

    #[test]
    fn boot() {
        let l = "FERRY BOOT cpus=2 mem_mib=255 ws_pages=8192 pattern=random write=50 rate=0 \
                 report_ms=200 tsc_khz=2595598 avx=1 x2apic=0\n";
        assert_eq!(
            parse_line(l),
            GuestLine::Boot {
                cpus: 2,
                mem_mib: 255,
                ws_pages: 8192,
                pattern: "random".into(),
                write: 50,
                rate: 0,
                report_ms: 200,
                tsc_khz: 2595598,
                avx: true,
                x2apic: false,
            }
        );
        // Missing or malformed fields: not a Boot.
        assert_unparsed("FERRY BOOT cpus=2");
        let bad_avx = l.replace("avx=1", "avx=2");
        assert_unparsed(&bad_avx);
    }

    #[test]
    fn ws() {
        assert_eq!(
            parse_line("FERRY WS seg=1 pa=0xc400000 pages=736256 first_page=262144"),
            GuestLine::Ws {
                seg: 1,
                pa: 0xc40_0000,
                pages: 736256,
                first_page: 262144
            }
        );
        assert_unparsed("FERRY WS seg=1 pa=0xzz pages=1 first_page=0");
    }

    #[test]
    fn ready_and_tick() {
        assert_eq!(
            parse_line("FERRY READY 3\r\n"),
            GuestLine::Ready { vcpu: 3 }
        );
        assert_eq!(
            parse_line("FERRY TICK 0 21868 1703583107825 26 174944"),
            GuestLine::Tick {
                vcpu: 0,
                round: 21868,
                tsc: 1703583107825,
                timer_irqs: 26,
                pages_verified: 174944
            }
        );
        assert_unparsed("FERRY TICK 0 1 2 3");
        assert_unparsed("FERRY TICK 0 1 2 3 4 5");
        assert_unparsed("FERRY TICK a 1 2 3 4");
        assert_unparsed("FERRY READY -1");
    }

    #[test]
    fn stream() {
        let (l0, s0) = stream_line(1, 0, STREAM_SUM_START);
        let (l1, s1) = stream_line(1, 1, s0);
        for (l, seq, sum) in [(&l0, 0, s0), (&l1, 1, s1)] {
            assert_eq!(
                parse_line(l),
                GuestLine::Stream {
                    vcpu: 1,
                    seq,
                    payload: stream_payload(1, seq),
                    sum
                },
                "{l}"
            );
        }
        assert_ne!(stream_payload(0, 5), stream_payload(1, 5));
        for seq in 0..1000 {
            let p = stream_payload(0, seq);
            assert!((1..=STREAM_MAX_PAYLOAD as usize).contains(&p.len()));
            assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        // FNV-1a 64 test vector.
        assert_eq!(stream_sum(STREAM_SUM_START, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_unparsed("FERRY STREAM 0 1 abc 12");
        assert_unparsed("FERRY STREAM 0 1 abc");
    }

    #[test]
    fn net_lines() {
        assert_eq!(
            parse_line("FERRY NET 100 98 1 0 0 1"),
            GuestLine::Net {
                sent: 100,
                echoed: 98,
                lost: 1,
                late: 0,
                dup: 0,
                arp: 1
            }
        );
        assert!(matches!(
            parse_line("FERRY NET 1 1 0"),
            GuestLine::Net { sent: 1, .. }
        ));
        assert_eq!(
            parse_line("FERRY NETMAC 52:54:00:00:00:02"),
            GuestLine::NetMac("52:54:00:00:00:02".into())
        );
        assert_unparsed("FERRY NET 1 2");
        assert_unparsed("FERRY NET 1 2 x");
    }

    #[test]
    fn disk_lines() {
        assert_eq!(
            parse_line("FERRY DISK 10 0"),
            GuestLine::Disk {
                ops: 10,
                errors: 0,
                malformed: 0,
                rejected: 0
            }
        );
        assert_eq!(
            parse_line("FERRY DISK 10 1 4 4\n"),
            GuestLine::Disk {
                ops: 10,
                errors: 1,
                malformed: 4,
                rejected: 4
            }
        );
        assert_eq!(
            parse_line("FERRY DISKINFO sectors=2048 blocks=256 serial=ferry0"),
            GuestLine::DiskInfo {
                sectors: 2048,
                blocks: 256,
                serial: "ferry0".into()
            }
        );
        assert_eq!(
            parse_line("FERRY DISKGEN 16 1 2 3"),
            GuestLine::DiskGen {
                first: 16,
                gens: vec![1, 2, 3]
            }
        );
        assert_eq!(
            parse_line("FERRY DISKEND 5 0 256"),
            GuestLine::DiskEnd {
                ops: 5,
                errors: 0,
                blocks: 256
            }
        );
        assert_unparsed("FERRY DISK 1");
        assert_unparsed("FERRY DISK 1 2 3");
        assert_unparsed("FERRY DISKGEN x 1");
        let b = disk_block(3, 7);
        assert_eq!(b.len(), DISK_BLOCK);
        assert_eq!(&b[..8], b"FERRYBLK");
        assert_eq!(b[8], 3);
        assert_eq!(b[16], 7);
    }

    #[test]
    fn bad() {
        let l = parse_line(
            "FERRY BAD page 0 gen=77 word=7 want=0xf46b1270e3674592 got=0xf46b1270e3676592 \
             bad_words=1 vcpu=0 pa=0xf800000\n",
        );
        assert!(l.is_bad());
        match l {
            GuestLine::Bad { what, detail } => {
                assert_eq!(what, "page");
                assert!(detail.starts_with("0 gen=77 word=7"));
                assert!(detail.ends_with("pa=0xf800000"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_line("FERRY BAD reg xmm12 vcpu=0 round=41837"),
            GuestLine::Bad {
                what: "reg".into(),
                detail: "xmm12 vcpu=0 round=41837".into()
            }
        );
        assert_eq!(
            parse_line("FERRY BAD timer"),
            GuestLine::Bad {
                what: "timer".into(),
                detail: String::new()
            }
        );
        assert_eq!(
            parse_line("FERRY BAD"),
            GuestLine::Bad {
                what: String::new(),
                detail: String::new()
            }
        );
    }

    #[test]
    fn other() {
        for l in [
            "",
            "hello",
            "FERRY",
            "FERRY ",
            "FERRYBAD page",
            "ferry BAD page",
            "FERRY INJECT page vcpu=0",
            "FERRY NOPE 1 2",
            "FERRY READY",
            "FERRY READY 99999999999",
        ] {
            assert_unparsed(l);
        }
        assert_eq!(parse_line("xyz\n"), GuestLine::Other("xyz".into()));
    }

    #[test]
    fn never_panics() {
        // Deterministic fuzz: random mixes of protocol words and junk.
        let atoms = [
            "FERRY",
            "BOOT",
            "TICK",
            "READY",
            "BAD",
            "WS",
            "STREAM",
            "=",
            "cpus=",
            "pa=0x",
            "0x",
            "1",
            "18446744073709551616",
            "-5",
            "é",
            "\u{0}",
            " ",
            "\t",
            "\n",
            "avx=1",
            "seg=",
        ];
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20_000 {
            let mut s = String::new();
            let n = (x % 9) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(atoms[(x % atoms.len() as u64) as usize]);
                if x & 1 == 0 {
                    s.push(' ');
                }
            }
            let _ = parse_line(&s);
        }
    }
}
