//! Guest RAM in 4 KiB pages of shared memory made and allocated before
//! the move (`ferry-dest --prealloc`): post-copy writes each page in place
//! and maps it a 512 KiB unit at a time. Judged by the workload guest,
//! which verifies every page of its working set as it goes on, and by
//! the statistics.

mod common;

use common::*;

/// A guest that writes a 256 MiB working set at random, 80% writes.
const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

/// `ferry-dest --prealloc SIZE` (4 KiB pages) in `dir`, named `name`,
/// plus `extra`.
fn spawn_dest_ahead(dir: &Scratch, name: &str, size: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--prealloc", size];
    args.extend_from_slice(extra);
    spawn_dest(dir, name, &strs(&io_args(dir, name, &args)))
}

/// Moves the ticking source `src` of `dir` to the destination `name` at
/// `addr` (`ferry-ctl migrate`, with `extra`); the guest goes on with no
/// BAD and the source ends by itself. Returns the destination's
/// statistics.
fn move_to(
    dir: &Scratch,
    (name, dst, addr): (&str, &mut Proc, &str),
    mut src: Proc,
    extra: &[&str],
) -> serde_json::Value {
    assert!(
        wait_exit(
            &mut migrate_once_ticking_with(dir, addr, extra),
            WAIT,
            "the move to end"
        ),
        "the move failed: {}",
        std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default()
    );
    let f = |ext: &str| dir.path(&format!("{name}.{ext}"));
    let stats = wait_stats(&f("json"), WAIT);
    assert_eq!(stats["backing"], "shmem", "{stats}");
    let after = wait_ticks(&f("log"), 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    ctl(&f("sock"), &["quit"]);
    assert!(wait_exit(dst, WAIT, "the destination to quit"));
    assert!(wait_exit(
        &mut src,
        WAIT,
        "the source to end after the move"
    ));
    stats
}

/// A post-copy move of the size allocated ahead takes that RAM and fills
/// it in place (the statistics say both); every page still faults until
/// it arrives, and a fault asks for the rest of its 512 KiB unit. A move of
/// another size gets RAM of its own, filled by `UFFDIO_COPY` as without
/// `--prealloc`.
#[test]
fn postcopy_into_shared_memory_allocated_ahead() {
    let dir = Scratch::new("ahead-pc");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "dst", "512M", &[]);
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &[]);
    let s = move_to(&dir, ("dst", &mut dst, &addr), src, &[]);
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
    assert_eq!(s["filled_in_place"], true, "{s}");
    assert_postcopy_accounting(&s, &s["source"]);
    assert!(s["pages_demand"].as_u64().unwrap() > 0, "no demand: {s}");
    assert!(s["fault_around_pages"].as_u64().unwrap() > 0, "{s}");

    let dir = Scratch::new("ahead-pc-other");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "dst", "256M", &[]);
    let src = spawn_guest_source(&dir, "512M", 1, GUEST, &[]);
    let s = move_to(&dir, ("dst", &mut dst, &addr), src, &[]);
    assert_eq!(s["ram_allocated_ahead"], false, "{s}");
    assert_eq!(s["filled_in_place"], false, "{s}");
}

/// Hybrid drops single stale pages, which RAM mapped a unit at a time
/// cannot take: a hybrid move leaves the RAM allocated ahead alone and
/// fills RAM of its own; pre-copy takes it (no userfaultfd at all).
#[test]
fn hybrid_makes_its_own_ram_and_precopy_takes_the_ram_ahead() {
    let dir = Scratch::new("ahead-hy");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "dst", "256M", &[]);
    let src = spawn_guest_source(&dir, "256M", 1, "ws=64M report_ms=50", &[]);
    let s = move_to(&dir, ("dst", &mut dst, &addr), src, &["--mode", "hybrid"]);
    assert_eq!(s["mode"], "hybrid", "{s}");
    assert_eq!(s["ram_allocated_ahead"], false, "{s}");
    assert_eq!(s["filled_in_place"], false, "{s}");

    let dir = Scratch::new("ahead-pre");
    let (mut dst, addr) = spawn_dest_ahead(&dir, "dst", "256M", &[]);
    let src = spawn_guest_source(&dir, "256M", 1, "ws=64M report_ms=50", &[]);
    let s = move_to(&dir, ("dst", &mut dst, &addr), src, &["--mode", "precopy"]);
    assert_eq!(s["mode"], "precopy", "{s}");
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
}

/// Post-copy into RAM allocated ahead through a proxy that cuts the push
/// at a random byte offset, twice: units half written when the link died
/// are not mapped until they are whole, every move completes after its
/// recovery, and the guest verifies every page.
#[test]
fn cut_links_during_postcopy_into_ram_allocated_ahead_recover() {
    use common::proxy::{Cut, Dir, Proxy};
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // The push carries ~256 MiB of non-zero pages; cut in its first 120.
        let cut = Cut::AtByte(Dir::ToDest, (1 << 20) + x % (120 << 20));
        let dir = Scratch::new(&format!("ahead-cut-{i}"));
        let link = ["--peer-timeout", "2s", "--recovery-window", "30s"];
        let (mut dst, addr) = spawn_dest_ahead(&dir, "dst", "512M", &link);
        let proxy = Proxy::start(&addr, vec![cut]);
        let mut src = spawn_linked_source(
            &dir,
            ("512M", GUEST),
            &proxy.addr,
            "60m",
            ("2s", "30s"),
            &[],
        );
        let mut ctl_proc = migrate_once_ticking(&dir, &proxy.addr);
        assert!(
            wait_exit(&mut ctl_proc, WAIT, "the move to end"),
            "move {i} {cut:?}: {}\n{}",
            std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.path("dst.err")).unwrap_or_default()
        );
        assert_eq!(proxy.fired(), 1, "move {i}: {cut:?} did not fire");
        let stats = wait_stats(&dir.path("dst.json"), WAIT);
        assert_eq!(stats["filled_in_place"], true, "move {i}: {stats}");
        assert_eq!(stats["recoveries"], 1, "move {i}: {stats}");
        let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
        assert_continues(&read_console(&dir.path("src.log")), &after, 1);
        ctl(&dir.path("dst.sock"), &["quit"]);
        assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
        assert!(wait_exit(
            &mut src,
            WAIT,
            "the source to end after the move"
        ));
    }
}
