//! RAM filled in place, with a real userfaultfd: huge pages from the pool
//! (scripts/setup.sh reserves it; without it these fail, naming it) and
//! shared memory allocated ahead, in 512 KiB units. Every test runs on
//! both. Contents are read back through the memory file and, once a unit
//! is mapped, through the guest's own mapping, which must then not fault.

use vm_memory::{Bytes, GuestAddress};

use super::{Local, UffdRam};
use crate::layout::PAGE_SIZE;
use crate::memory::{Backing, GuestRam};

/// 16 MiB of huge-page guest RAM, then 16 MiB of shared memory allocated
/// ahead (guest address = file offset here), each with its userfaultfd.
fn in_place_rams() -> Vec<(GuestRam, UffdRam)> {
    let huge = GuestRam::with_backing(16 << 20, Backing::HugePages)
        .expect("16 MiB of huge pages (run scripts/setup.sh for a pool)");
    let mut ahead = GuestRam::new(16 << 20).unwrap();
    ahead.allocate_all().unwrap();
    [huge, ahead]
        .into_iter()
        .map(|ram| {
            let u = UffdRam::register(&ram).unwrap();
            assert!(u.fills_in_place());
            (ram, u)
        })
        .collect()
}

/// Page `pfn` read through the memory file.
fn file_page(ram: &GuestRam, pfn: u64) -> Vec<u8> {
    let mut b = vec![0; PAGE_SIZE];
    ram.read_at(pfn * PAGE_SIZE as u64, &mut b).unwrap();
    b
}

/// Page `pfn` read through the guest's mapping (which faults, and would
/// hang here, unless its unit is mapped).
fn guest_page(ram: &GuestRam, pfn: u64) -> Vec<u8> {
    let mut b = vec![0; PAGE_SIZE];
    ram.guest_memory()
        .read_slice(&mut b, GuestAddress(pfn * PAGE_SIZE as u64))
        .unwrap();
    b
}

fn pages(n: u64, byte: u8) -> Vec<u8> {
    vec![byte; n as usize * PAGE_SIZE]
}

#[test]
fn the_units_are_huge_pages_and_512_kib() {
    let units: Vec<u64> = in_place_rams()
        .iter()
        .map(|(_, u)| u.unit_pages())
        .collect();
    assert_eq!(units, [512, 128]);
    // RAM neither in huge pages nor allocated ahead takes UFFDIO_COPY.
    let plain = UffdRam::register(&GuestRam::new(16 << 20).unwrap()).unwrap();
    assert!(!plain.fills_in_place());
    assert_eq!(plain.unit_pages(), 1);
}

#[test]
fn a_unit_is_mapped_once_complete_and_never_written_after() {
    for (ram, u) in in_place_rams() {
        let (unit, half) = (u.unit_pages(), u.unit_pages() / 2);
        // Half of unit 1 arrives: present, not mapped.
        assert_eq!(u.install(unit, &pages(half, 0xA5)).unwrap(), half);
        assert!(!u.mapped.get(1));
        assert_eq!(u.resolve_local(unit + half + 1).unwrap(), Local::Missing);
        // The rest of it is zero: complete, and mapped at once.
        assert_eq!(u.install_zeros(unit + half, half).unwrap(), half);
        assert!(u.mapped.get(1), "unit of {unit}");
        assert!(file_page(&ram, unit + half - 1).iter().all(|&b| b == 0xA5));
        assert!(guest_page(&ram, unit + half - 1).iter().all(|&b| b == 0xA5));
        assert!(guest_page(&ram, unit + half).iter().all(|&b| b == 0));
        // From now on its contents are the guest's: a late copy with other
        // bytes (a duplicate answer) is dropped, not written.
        let guest_at = GuestAddress((unit + half + 1) * PAGE_SIZE as u64);
        ram.guest_memory().write_slice(b"guest", guest_at).unwrap();
        assert_eq!(u.install(unit, &pages(unit, 0x5A)).unwrap(), 0);
        assert!(guest_page(&ram, unit).iter().all(|&b| b == 0xA5));
        assert_eq!(&guest_page(&ram, unit + half + 1)[..5], b"guest");
        assert_eq!(u.resolve_local(unit).unwrap(), Local::Hit);
    }
}

#[test]
fn an_all_zero_unit_is_mapped_when_a_vcpu_touches_it() {
    for (ram, u) in in_place_rams() {
        let unit = u.unit_pages();
        assert_eq!(u.install_zeros(2 * unit, unit).unwrap(), unit);
        assert!(!u.mapped.get(2), "an all-zero unit was mapped untouched");
        assert_eq!(u.resolve_local(2 * unit + 3).unwrap(), Local::Zero);
        assert!(u.mapped.get(2));
        assert!(guest_page(&ram, 2 * unit + 3).iter().all(|&b| b == 0));
    }
}

#[test]
fn a_unit_is_not_mapped_while_someone_writes_it() {
    for (ram, u) in in_place_rams() {
        // While the push writes the first half of unit 3, a demand answer
        // brings the same pages and a zero run the rest: the unit is
        // complete, but must wait for the push's write to end, and the
        // push maps it when it is done.
        let (unit, half) = (u.unit_pages(), u.unit_pages() / 2);
        let first = 3 * unit;
        let mut other_finished = false;
        let newly = u
            .fill(first, half, |dst| {
                assert_eq!(u.install(first, &pages(half, 7))?, half);
                u.install_zeros(first + half, half)?;
                other_finished = true;
                assert!(!u.mapped.get(3), "mapped while a write was under way");
                assert_eq!(u.resolve_local(first + half + 1)?, Local::Hit);
                assert!(!u.mapped.get(3));
                dst.copy_from(&pages(half, 7));
                Ok::<_, super::UffdRamError>(())
            })
            .unwrap();
        assert!(other_finished);
        // The demand answer made the pages present first.
        assert_eq!(newly, 0);
        assert!(u.mapped.get(3));
        assert!(guest_page(&ram, first + 1).iter().all(|&b| b == 7));
        assert!(guest_page(&ram, first + half + 1).iter().all(|&b| b == 0));
    }
}

#[test]
fn a_failed_write_leaves_its_pages_missing_and_maps_nothing() {
    for (ram, u) in in_place_rams() {
        let unit = u.unit_pages();
        let first = 4 * unit;
        let r = u.fill(first, unit, |dst| {
            dst.copy_from(&pages(unit, 9)[..dst.len() / 2]);
            Err(super::UffdRamError::Setup("link lost".into()))
        });
        assert!(r.is_err());
        assert!(!u.mapped.get(4));
        assert_eq!(u.resolve_local(first).unwrap(), Local::Missing);
        // Sent again in full, the unit completes and is mapped.
        assert_eq!(u.install(first, &pages(unit, 3)).unwrap(), unit);
        assert!(u.mapped.get(4));
        assert!(guest_page(&ram, first + unit - 1).iter().all(|&b| b == 3));
        assert!(file_page(&ram, first).iter().all(|&b| b == 3));
    }
}

#[test]
fn a_frame_across_units_maps_each_unit_it_completes() {
    for (ram, u) in in_place_rams() {
        // One frame from the middle of unit 5 to the middle of unit 7:
        // unit 6 is complete and mapped, 5 and 7 wait for their other
        // halves.
        let (unit, half) = (u.unit_pages(), u.unit_pages() / 2);
        let first = 5 * unit + half;
        let mut data = pages(2 * unit, 0);
        for (i, page) in data.chunks_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
        }
        assert_eq!(u.install(first, &data).unwrap(), 2 * unit);
        assert_eq!(
            (u.mapped.get(5), u.mapped.get(6), u.mapped.get(7)),
            (false, true, false)
        );
        let p = 6 * unit + 1;
        assert_eq!(guest_page(&ram, p)[..8], p.to_le_bytes());
        assert_eq!(u.install_zeros(5 * unit, half).unwrap(), half);
        assert!(u.mapped.get(5));
        assert_eq!(guest_page(&ram, first)[..8], first.to_le_bytes());
        assert!(guest_page(&ram, 5 * unit).iter().all(|&b| b == 0));
    }
}

#[test]
fn a_vcpu_touching_an_incomplete_unit_waits_for_all_of_it() {
    for (ram, u) in in_place_rams() {
        // Memory allocated ahead holds (zero) pages already: without a
        // minor-fault registration a read would see them at once.
        let unit = u.unit_pages();
        let first = 7 * unit;
        assert_eq!(u.install(first, &pages(unit - 1, 0x11)).unwrap(), unit - 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = ram.clone();
        let t = std::thread::spawn(move || tx.send(guest_page(&reader, first)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "read an incomplete unit (unit of {unit})"
        );
        assert_eq!(u.install(first + unit - 1, &pages(1, 0x22)).unwrap(), 1);
        let page = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(page.iter().all(|&b| b == 0x11));
        t.join().unwrap();
    }
}
