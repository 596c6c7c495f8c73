//! Huge-page RAM filled in place, with a real userfaultfd and real pool
//! pages (scripts/setup.sh reserves the pool; without it these fail,
//! naming it). Contents are read back through the memory file and, once a
//! huge page is mapped, through the guest's own mapping, which must then
//! not fault.

use vm_memory::{Bytes, GuestAddress};

use super::{Local, UffdRam};
use crate::layout::PAGE_SIZE;
use crate::memory::{Backing, GuestRam};

/// 16 MiB of huge-page guest RAM (guest address = file offset here) and
/// its userfaultfd.
fn huge_ram() -> (GuestRam, UffdRam) {
    let ram = GuestRam::with_backing(16 << 20, Backing::HugePages)
        .expect("16 MiB of huge pages (run scripts/setup.sh for a pool)");
    let u = UffdRam::register(&ram).unwrap();
    assert!(u.fills_in_place());
    (ram, u)
}

/// Page `pfn` read through the memory file.
fn file_page(ram: &GuestRam, pfn: u64) -> Vec<u8> {
    let mut b = vec![0; PAGE_SIZE];
    ram.read_at(pfn * PAGE_SIZE as u64, &mut b).unwrap();
    b
}

/// Page `pfn` read through the guest's mapping (which faults, and would
/// hang here, unless its huge page is mapped).
fn guest_page(ram: &GuestRam, pfn: u64) -> Vec<u8> {
    let mut b = vec![0; PAGE_SIZE];
    ram.guest_memory()
        .read_slice(&mut b, GuestAddress(pfn * PAGE_SIZE as u64))
        .unwrap();
    b
}

#[test]
fn a_huge_page_is_mapped_once_complete_and_never_written_after() {
    let (ram, u) = huge_ram();
    // Half of huge page 1 arrives: present, not mapped.
    assert_eq!(u.install(512, &vec![0xA5; 256 * PAGE_SIZE]).unwrap(), 256);
    assert!(!u.mapped.get(1));
    assert_eq!(u.resolve_local(600).unwrap(), Local::Missing);
    // The rest of it is zero: complete, and mapped at once.
    assert_eq!(u.install_zeros(768, 256).unwrap(), 256);
    assert!(u.mapped.get(1));
    assert!(file_page(&ram, 700).iter().all(|&b| b == 0xA5));
    assert!(guest_page(&ram, 700).iter().all(|&b| b == 0xA5));
    assert!(guest_page(&ram, 900).iter().all(|&b| b == 0));
    // From now on its contents are the guest's: a late copy with other
    // bytes (a duplicate answer) is dropped, not written.
    ram.guest_memory()
        .write_slice(b"guest", GuestAddress(800 * PAGE_SIZE as u64))
        .unwrap();
    assert_eq!(u.install(512, &vec![0x5A; 512 * PAGE_SIZE]).unwrap(), 0);
    assert!(guest_page(&ram, 700).iter().all(|&b| b == 0xA5));
    assert_eq!(&guest_page(&ram, 800)[..5], b"guest");
    assert_eq!(u.resolve_local(700).unwrap(), Local::Hit);
}

#[test]
fn an_all_zero_huge_page_is_mapped_when_a_vcpu_touches_it() {
    let (ram, u) = huge_ram();
    assert_eq!(u.install_zeros(1024, 512).unwrap(), 512);
    assert!(
        !u.mapped.get(2),
        "an all-zero huge page was mapped untouched"
    );
    assert_eq!(u.resolve_local(1100).unwrap(), Local::Zero);
    assert!(u.mapped.get(2));
    assert!(guest_page(&ram, 1100).iter().all(|&b| b == 0));
}

#[test]
fn a_huge_page_is_not_mapped_while_someone_writes_it() {
    let (ram, u) = huge_ram();
    // While the push writes the first half of huge page 3, a demand answer
    // brings the same pages and a zero run the rest: the huge page is
    // complete, but must wait for the push's write to end, and the push
    // maps it when it is done.
    let first = 3 * 512;
    let mut other_finished = false;
    let newly = u
        .fill(first, 256, |dst| {
            assert_eq!(u.install(first, &vec![7u8; 256 * PAGE_SIZE])?, 256);
            u.install_zeros(first + 256, 256)?;
            other_finished = true;
            assert!(!u.mapped.get(3), "mapped while a write was under way");
            assert_eq!(u.resolve_local(first + 300)?, Local::Hit);
            assert!(!u.mapped.get(3));
            dst.copy_from(&vec![7u8; dst.len()]);
            Ok::<_, super::UffdRamError>(())
        })
        .unwrap();
    assert!(other_finished);
    // The demand answer made the pages present first.
    assert_eq!(newly, 0);
    assert!(u.mapped.get(3));
    assert!(guest_page(&ram, first + 10).iter().all(|&b| b == 7));
    assert!(guest_page(&ram, first + 300).iter().all(|&b| b == 0));
}

#[test]
fn a_failed_write_leaves_its_pages_missing_and_maps_nothing() {
    let (ram, u) = huge_ram();
    let first = 4 * 512;
    let r = u.fill(first, 512, |dst| {
        dst.copy_from(&vec![9u8; dst.len() / 2]);
        Err(super::UffdRamError::Setup("link lost".into()))
    });
    assert!(r.is_err());
    assert!(!u.mapped.get(4));
    assert_eq!(u.resolve_local(first).unwrap(), Local::Missing);
    // Sent again in full, the huge page completes and is mapped.
    assert_eq!(u.install(first, &vec![3u8; 512 * PAGE_SIZE]).unwrap(), 512);
    assert!(u.mapped.get(4));
    assert!(guest_page(&ram, first + 511).iter().all(|&b| b == 3));
    assert!(file_page(&ram, first).iter().all(|&b| b == 3));
}
