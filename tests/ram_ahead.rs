//! Guest RAM in 4 KiB pages of shared memory made and allocated before
//! the move (`ferry-dest --prealloc`): post-copy writes each page in place
//! and maps it a 512 KiB unit at a time. Judged by the workload guest,
//! which verifies every page of its working set as it goes on, and by
//! the statistics.

mod common;

use common::*;

/// A guest that writes a 256 MiB working set at random, 80% writes.
const GUEST: &str = "ws=256M pattern=random write=80 report_ms=50";

/// Moves a ticking `mem` guest writing `guest` (`ferry-ctl migrate`, with
/// `extra`) to a `ferry-dest --prealloc ahead` (4 KiB pages) in a scratch
/// directory named `name`; the guest goes on with no BAD and the source
/// ends by itself. Returns the destination's statistics.
fn move_into_ram_ahead(
    name: &str,
    ahead: &str,
    (mem, guest): (&str, &str),
    extra: &[&str],
) -> serde_json::Value {
    move_into_ram_ahead_from(name, ahead, (mem, guest), extra, &[])
}

/// [`move_into_ram_ahead`] from a `ferry-source` given `source_args` too.
fn move_into_ram_ahead_from(
    name: &str,
    ahead: &str,
    (mem, guest): (&str, &str),
    extra: &[&str],
    source_args: &[&str],
) -> serde_json::Value {
    let dir = Scratch::new(name);
    let dest_args = io_args(&dir, "dst", &["--prealloc", ahead]);
    let (mut dst, addr) = spawn_dest(&dir, "dst", &strs(&dest_args));
    let mut src = spawn_guest_source(&dir, mem, 1, guest, source_args);
    assert!(
        wait_exit(
            &mut migrate_once_ticking_with(&dir, &addr, extra),
            WAIT,
            "the move to end"
        ),
        "the move failed: {}",
        std::fs::read_to_string(dir.path("ctl.err")).unwrap_or_default()
    );
    let stats = wait_stats(&dir.path("dst.json"), WAIT);
    assert_eq!(stats["backing"], "shmem", "{stats}");
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&read_console(&dir.path("src.log")), &after, 1);
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
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
    let s = move_into_ram_ahead("ahead-pc", "512M", ("512M", GUEST), &[]);
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
    assert_eq!(s["filled_in_place"], true, "{s}");
    assert_postcopy_accounting(&s, &s["source"]);
    assert!(s["pages_demand"].as_u64().unwrap() > 0, "no demand: {s}");
    assert!(s["fault_around_pages"].as_u64().unwrap() > 0, "{s}");

    let s = move_into_ram_ahead("ahead-pc-other", "256M", ("512M", GUEST), &[]);
    assert_eq!(s["ram_allocated_ahead"], false, "{s}");
    assert_eq!(s["filled_in_place"], false, "{s}");
}

/// Hybrid drops single stale pages, which RAM mapped a unit at a time
/// cannot take: a hybrid move leaves the RAM allocated ahead alone and
/// fills RAM of its own; pre-copy takes it (no userfaultfd at all).
#[test]
fn hybrid_makes_its_own_ram_and_precopy_takes_the_ram_ahead() {
    let small = ("256M", "ws=64M report_ms=50");
    let s = move_into_ram_ahead("ahead-hy", "256M", small, &["--mode", "hybrid"]);
    assert_eq!(s["mode"], "hybrid", "{s}");
    assert_eq!(s["ram_allocated_ahead"], false, "{s}");
    assert_eq!(s["filled_in_place"], false, "{s}");

    let s = move_into_ram_ahead("ahead-pre", "256M", small, &["--mode", "precopy"]);
    assert_eq!(s["mode"], "precopy", "{s}");
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
}

/// Post-copy into RAM allocated ahead through a proxy that cuts the push
/// at a random byte offset, twice: units half written when the link died
/// are not mapped until they are whole, every move completes after its
/// recovery, and the guest verifies every page.
#[test]
fn cut_links_during_postcopy_into_ram_allocated_ahead_recover() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1du64);
    for i in 0..2 {
        let name = format!("ahead-cut-{i}");
        let mut m = move_through_a_cut(&name, &mut rng, GUEST, &["--prealloc", "512M"], &[]);
        let stats = wait_stats(&m.dir.path("dst.json"), WAIT);
        assert_eq!(stats["filled_in_place"], true, "move {i}: {stats}");
        assert_eq!(stats["recoveries"], 1, "move {i}: {stats}");
        let after = wait_ticks(&m.dir.path("dst.log"), 1, 3, WAIT);
        assert_continues(&read_console(&m.dir.path("src.log")), &after, 1);
        ctl(&m.dir.path("dst.sock"), &["quit"]);
        assert!(wait_exit(&mut m.dst, WAIT, "the destination to quit"));
        assert!(wait_exit(
            &mut m.src,
            WAIT,
            "the source to end after the move"
        ));
    }
}

/// `ferry-dest --prealloc hello`: the destination does not know the size
/// in advance, so it allocates the RAM the move's `Hello` asks for before
/// answering it. The source, whose peer timeout (150 ms) is far shorter
/// than that allocation and than the destination's (5 s), waits for the
/// answer without deeming the destination gone: the `Hello` told the
/// destination its timeout, and the destination pings every quarter of
/// it, then and for the rest of the move (no recovery). The move fills
/// the RAM in place, and the guest goes on without BAD.
#[test]
fn ram_is_allocated_on_the_hello_while_the_source_waits() {
    let timeout = ["--peer-timeout", "150ms"];
    let s = move_into_ram_ahead_from("ahead-hello", "hello", ("1G", GUEST), &[], &timeout);
    assert_eq!(s["ram_allocated_ahead"], true, "{s}");
    assert_eq!(s["filled_in_place"], true, "{s}");
    let took = s["ram_allocated_on_hello_ms"].as_f64().unwrap();
    // The test means something only if the allocation outlasted the
    // source's peer timeout.
    assert!(took > 150.0, "allocated in {took} ms: {s}");
    assert_eq!(s["peer_timeout_ms"], 150, "{s}");
    assert_eq!(s["recoveries"], 0, "{s}");
    assert_postcopy_accounting(&s, &s["source"]);
}
