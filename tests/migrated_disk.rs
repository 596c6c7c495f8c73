//! Migrated local disks (`--migrate-disk`): a 1 GiB disk moves with the
//! memory through the page server into the destination's own empty file,
//! judged by the workload guest (`disk=1`, 4096 blocks) and by an offline
//! check of the destination's file: every block the guest uses at the
//! generation it last wrote, and every other byte equal to the source's
//! file (a 32 MiB pattern the guest never touches, and holes).

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::disk_log::final_gens;
use common::*;
use ferry_guest::{disk_block, GuestLine, DISK_BLOCK};

const DISK_BYTES: u64 = 1 << 30;
/// Blocks the guest uses (its most): the first 16 MiB.
const GUEST_BLOCKS: u64 = 4096;
/// A region the guest never touches, filled before the move.
const PATTERN_AT: u64 = 512 << 20;
const PATTERN_BYTES: u64 = 32 << 20;

/// A sparse 1 GiB disk with a pattern in [`PATTERN_AT`].
fn source_disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..PATTERN_BYTES >> 20 {
        for (j, w) in chunk.chunks_exact_mut(8).enumerate() {
            let v = (i << 32 | j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            w.copy_from_slice(&v.to_le_bytes());
        }
        f.write_all_at(&chunk, PATTERN_AT + (i << 20)).unwrap();
    }
}

fn disk_ops(log: &[Logged]) -> Vec<u64> {
    log.iter()
        .filter_map(|l| match l.line {
            GuestLine::Disk { ops, errors, .. } => {
                assert_eq!(errors, 0, "disk errors: {}", l.text);
                Some(ops)
            }
            _ => None,
        })
        .collect()
}

/// Every guest block holds the generation the guest last wrote, and every
/// byte after the guest's blocks equals the source file's.
fn check_files(dst: &Path, src: &Path, gens: &[u32]) {
    assert_eq!(
        gens.len() as u64,
        GUEST_BLOCKS,
        "the guest used every block"
    );
    assert_eq!(std::fs::metadata(dst).unwrap().len(), DISK_BYTES);
    let mut d = std::fs::File::open(dst).unwrap();
    let mut block = vec![0u8; DISK_BLOCK];
    for (b, &g) in gens.iter().enumerate() {
        d.read_exact(&mut block).unwrap();
        if block != disk_block(b as u64, g).as_slice() {
            let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap());
            panic!(
                "block {b} is not at generation {g} (holds block {} generation {})",
                word(1),
                word(2)
            );
        }
    }
    let s = std::fs::File::open(src).unwrap();
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = GUEST_BLOCKS * DISK_BLOCK as u64;
    while at < DISK_BYTES {
        let n = (DISK_BYTES - at).min(x.len() as u64) as usize;
        d.read_exact_at(&mut x[..n], at).unwrap();
        s.read_exact_at(&mut y[..n], at).unwrap();
        assert!(
            x[..n] == y[..n],
            "bytes {at}..+{n} differ from the source's file"
        );
        at += n as u64;
    }
}

/// Moves a guest running the disk workload with its 1 GiB disk migrated
/// into the destination's own file, in `mode`; returns the stats. `ops`
/// is long enough for the workload to outlast the move at this host's
/// fastest (~75,000 disk operations a second, the move starting at 1 s).
fn move_disk(name: &str, mode: &str, ops: u64, extra: &[&str]) -> serde_json::Value {
    let dir = Scratch::new(name);
    let src_disk = dir.path("src.img");
    let dst_disk = dir.path("dst.img");
    source_disk(&src_disk);
    // Something to find emptied: the destination starts from an empty file.
    std::fs::write(&dst_disk, b"stale content").unwrap();
    let mut dargs = dest_args(&dir, "127.0.0.1");
    dargs.extend(["--disk".to_string(), dst_disk.display().to_string()]);
    let mut dst = spawn("ferry-dest", &strs(&dargs), &dir.path("dst.err"));
    let addr = wait_listen_addr(&mut dst, &dir.path("dst.addr"), &dir.path("dst.err"));
    let guest = format!(
        "ws=64M report_ms=50 disk=1 disk_batch=8 disk_blocks={GUEST_BLOCKS} disk_ops={ops}"
    );
    let mut args = source_args(&dir, "256M", 2, &guest, &addr, "1s");
    let disk = src_disk.display().to_string();
    args.extend(
        ["--mode", mode, "--disk", &disk, "--migrate-disk"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let stats = run_source(&dir, &args);
    assert_eq!(stats["mode"], mode, "{stats}");
    let after = wait_for(WAIT, "DISKEND on the destination", || {
        let log = read_console(&dir.path("dst.log"));
        let bad = bad_lines(&log);
        assert!(bad.is_empty(), "guest reported BAD: {bad:?}");
        log.iter()
            .any(|l| matches!(l.line, GuestLine::DiskEnd { .. }))
            .then_some(log)
    });
    let before = read_console(&dir.path("src.log"));
    assert!(bad_lines(&before).is_empty(), "{:?}", bad_lines(&before));
    assert!(
        final_gens(&before).is_none(),
        "the disk workload finished before the move"
    );
    let (src_ops, dst_ops) = (disk_ops(&before), disk_ops(&after));
    let last_src = *src_ops.last().expect("no DISK report before the move");
    let first_dst = *dst_ops.first().expect("no DISK report after the move");
    assert!(
        last_src > 0 && first_dst >= last_src,
        "{last_src} then {first_dst}"
    );
    let whole: Vec<Logged> = before.iter().chain(&after).cloned().collect();
    let gens = final_gens(&whole).expect("a DISKGEN line is missing");
    check_files(&dst_disk, &src_disk, &gens);
    let disk = &stats["disk"];
    assert_eq!(disk["blocks"], DISK_BYTES / 4096, "{stats}");
    let status = ctl(&dir.path("dst.sock"), &["status"]);
    let dev = &status["devices"][0];
    assert_eq!(dev["path"], dst_disk.to_str().unwrap(), "{status}");
    assert_eq!(dev["errors"], 0, "{status}");
    eprintln!(
        "{mode}: {last_src} disk ops before the move, {} in all; disk {disk}; downtime {} us, \
         total {} ms, bytes on the wire {}",
        dst_ops.last().unwrap(),
        stats["downtime_us"],
        stats["total_ms"],
        stats["bytes_wire"]
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    stats
}

/// Post-copy with the push slowed down, so the guest reads blocks that
/// have not arrived yet (fetched on demand over the fault connection) and
/// writes blocks before the push gets to them (the push must not overwrite
/// them: the offline check finds every block at its last generation).
#[test]
fn postcopy_moves_a_local_disk_with_reads_on_demand() {
    let stats = move_disk(
        "mdisk-post",
        "postcopy",
        600_000,
        &["--max-bandwidth", "400mbit"],
    );
    let disk = &stats["disk"];
    assert!(
        disk["demand_requests"].as_u64().unwrap() > 0,
        "no disk block was read before it arrived: {stats}"
    );
    assert!(disk["blocks_pushed"].as_u64().unwrap() > 0, "{stats}");
    // The guest wrote blocks here before the push reached them, and the
    // push's copies were dropped (the offline check shows the guest's).
    assert!(
        disk["dropped_after_guest_write"].as_u64().unwrap() > 0,
        "no guest write came before the push: {stats}"
    );
}

#[test]
fn stop_and_copy_moves_a_local_disk() {
    let stats = move_disk("mdisk-sac", "stop-and-copy", 600_000, &[]);
    assert_eq!(stats["disk"]["demand_requests"], 0, "{stats}");
}

#[test]
fn precopy_moves_a_local_disk() {
    let stats = move_disk("mdisk-pre", "precopy", 600_000, &["--max-rounds", "5"]);
    assert_eq!(stats["disk"]["demand_requests"], 0, "{stats}");
}

#[test]
fn hybrid_moves_a_local_disk() {
    move_disk("mdisk-hyb", "hybrid", 600_000, &["--hybrid-rounds", "1"]);
}

/// A destination without a file for the migrated disk refuses the move
/// before the switch-over: the source rolls back and its VM runs on.
#[test]
fn a_migrated_disk_needs_a_file_on_the_destination() {
    let dir = Scratch::new("mdisk-refused");
    let src_disk = dir.path("src.img");
    std::fs::File::create(&src_disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let (_dst, addr) = spawn_dest(&dir, "dst", &[]);
    let disk = src_disk.display().to_string();
    let sock = dir.path("src.sock");
    let mut args = source_args(&dir, "64M", 1, "ws=8M disk=1", &addr, "1s");
    args.extend(
        [
            "--disk",
            &disk,
            "--migrate-disk",
            "--api",
            sock.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut src = spawn("ferry-source", &strs(&args), &dir.path("src.err"));
    wait_for(WAIT, "the refusal", || {
        let src = std::fs::read_to_string(dir.path("src.err")).unwrap_or_default();
        let dst = std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default();
        (dst.contains("give its local file") && src.contains("the VM keeps running here"))
            .then_some(())
    });
    let status = ctl(&sock, &["status"]);
    assert_eq!(status["run_state"], "running", "{status}");
    ctl(&sock, &["quit"]);
    let _ = wait_exit(&mut src, WAIT, "the source to quit");
}
