//! A VM as one portable file: `ferry-ctl export` writes an archive (a tar
//! with a descriptor and the snapshot), `ferry-dest --import` checks it and
//! restores it elsewhere. Damaged or foreign archives start no VM.

mod common;

use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};

/// Runs a guest in `ferry-source`, exports it, quits it; returns the
/// archive and the source's console log.
fn export_a_guest(dir: &Scratch) -> (std::path::PathBuf, Vec<Logged>) {
    let mut src = spawn_guest_source(
        dir,
        "256M",
        2,
        "ws=32M pattern=random write=80 report_ms=50",
        &[],
    );
    wait_ticks(&dir.path("src.log"), 2, 3, WAIT);
    let file = dir.path("vm.ferry");
    let v = ctl(&dir.path("src.sock"), &["export", file.to_str().unwrap()]);
    // The descriptor's checksum is the snapshot's real SHA-256.
    let m = &v["descriptor"]["members"][0];
    assert_eq!(m["name"], "vm.snap", "{v}");
    assert_eq!(v["descriptor"]["vm"]["mem_size"], 256u64 << 20, "{v}");
    assert_eq!(v["descriptor"]["vm"]["vcpus"], 2, "{v}");
    let snap = member_bytes(&file, "vm.snap");
    assert_eq!(snap.len() as u64, m["size"].as_u64().unwrap());
    let sum: String = Sha256::digest(&snap)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(m["sha256"], sum.as_str());
    let sock = dir.path("src.sock");
    assert_eq!(ctl(&sock, &["status"])["run_state"], "paused");
    let log = read_console(&dir.path("src.log"));
    ctl(&sock, &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    (file, log)
}

/// One member's bytes, read with the tar crate.
fn member_bytes(archive: &Path, name: &str) -> Vec<u8> {
    use std::io::Read;
    let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some(name) {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            return v;
        }
    }
    panic!("no {name} in {}", archive.display());
}

#[test]
fn export_then_import_eagerly_and_lazily() {
    let dir = Scratch::new("export");
    let (file, before) = export_a_guest(&dir);
    // The export's snapshot and the archive's temporary file are gone.
    let beside: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".snap") || n.contains(".tmp"))
        .collect();
    assert!(beside.is_empty(), "left beside the archive: {beside:?}");
    for (name, lazy) in [("eager", false), ("lazy", true)] {
        let mut args = vec!["--import", file.to_str().unwrap()];
        if lazy {
            args.push("--lazy");
        }
        let mut dst = spawn(
            "ferry-dest",
            &strs(&console_args(&dir, name, &args)),
            &dir.path(&format!("{name}.err")),
        );
        let after = wait_ticks(&dir.path(&format!("{name}.log")), 2, 3, WAIT);
        assert_continues(&before, &after, 2);
        ctl(&dir.path(&format!("{name}.sock")), &["quit"]);
        assert!(wait_exit(&mut dst, WAIT, "the import to quit"));
    }
}

/// Writes a tar archive of `members` (name, bytes) to `path`, names
/// written raw (so `..` and `/` can be put in).
fn write_tar(path: &Path, members: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

/// Writes one damaged archive to the path it is given.
type MakeArchive<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn damaged_and_foreign_archives_start_no_vm() {
    let dir = Scratch::new("badarchive");
    let (file, _) = export_a_guest(&dir);
    let good = std::fs::read(&file).unwrap();
    let desc = member_bytes(&file, "ferry-vm.json");
    let snap = member_bytes(&file, "vm.snap");
    let mut flipped = snap.clone();
    let at = flipped.len() - 5000;
    flipped[at] ^= 0x40;
    let mut v: serde_json::Value = serde_json::from_slice(&desc).unwrap();
    v["version"] = 99.into();
    let v99 = serde_json::to_vec(&v).unwrap();
    let cases: Vec<(&str, MakeArchive, &str)> = vec![
        (
            "truncated",
            Box::new(|p: &Path| std::fs::write(p, &good[..good.len() / 2]).unwrap()),
            "cut short",
        ),
        (
            "checksum",
            Box::new(|p: &Path| write_tar(p, &[("ferry-vm.json", &desc), ("vm.snap", &flipped)])),
            "checksum mismatch",
        ),
        (
            "missing",
            Box::new(|p: &Path| write_tar(p, &[("ferry-vm.json", &desc)])),
            "is missing",
        ),
        (
            "version",
            Box::new(|p: &Path| write_tar(p, &[("ferry-vm.json", &v99), ("vm.snap", &snap)])),
            "archive version 99",
        ),
        (
            "tar-slip",
            Box::new(|p: &Path| write_tar(p, &[("ferry-vm.json", &desc), ("../vm.snap", &snap)])),
            "escapes the target directory",
        ),
        (
            "foreign",
            Box::new(|p: &Path| write_tar(p, &[("README", b"hello")])),
            "not a Ferry VM archive",
        ),
        (
            "garbage",
            Box::new(|p: &Path| std::fs::write(p, vec![0x5a; 3000]).unwrap()),
            "not a tar archive",
        ),
    ];
    for (name, make, why) in cases {
        let path = dir.path(&format!("{name}.ferry"));
        make(&path);
        let mut dst = spawn(
            "ferry-dest",
            &strs(&console_args(
                &dir,
                name,
                &["--import", path.to_str().unwrap()],
            )),
            &dir.path(&format!("{name}.err")),
        );
        let st = wait_for(WAIT, "the import to fail", || dst.0.try_wait().unwrap());
        assert!(!st.success(), "{name}: imported");
        let err = std::fs::read_to_string(dir.path(&format!("{name}.err"))).unwrap();
        assert!(err.contains(why), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(
            read_console(&dir.path(&format!("{name}.log"))).is_empty(),
            "{name}: a VM ran"
        );
        // Nothing escaped next to the work directory.
        assert!(!std::env::temp_dir().join("vm.snap").exists(), "{name}");
    }
}

/// An archive's VM with a disk is imported only with a `--disk` of this
/// host's: the path inside the archive is the exporting host's (and a
/// forged archive could name any file here). Without it the import is
/// refused naming the path, and the file there is not touched; with it
/// the VM runs on the given copy.
#[test]
fn an_archive_chooses_no_disk_on_the_importing_host() {
    let dir = Scratch::new("export-disk");
    let disk = dir.path("d.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let mut src = spawn_guest_source(
        &dir,
        "256M",
        1,
        "ws=16M report_ms=50 disk=1 disk_batch=8 disk_ops=200000",
        &["--disk", disk.to_str().unwrap()],
    );
    wait_ticks(&dir.path("src.log"), 1, 3, WAIT);
    let file = dir.path("vm.ferry");
    ctl(&dir.path("src.sock"), &["export", file.to_str().unwrap()]);
    ctl(&dir.path("src.sock"), &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    let exported = std::fs::read(&disk).unwrap();

    let mut refused = spawn(
        "ferry-dest",
        &strs(&console_args(
            &dir,
            "bare",
            &["--import", file.to_str().unwrap()],
        )),
        &dir.path("bare.err"),
    );
    assert!(!wait_exit(&mut refused, WAIT, "an import without --disk"));
    let err = std::fs::read_to_string(dir.path("bare.err")).unwrap();
    assert!(
        err.contains("names devices of the host it came from") && err.contains("d.img"),
        "{err}"
    );
    assert!(
        std::fs::read(&disk).unwrap() == exported,
        "the refused import wrote the disk"
    );

    let copy = dir.path("copy.img");
    std::fs::write(&copy, &exported).unwrap();
    let mut dst = spawn(
        "ferry-dest",
        &strs(&console_args(
            &dir,
            "dst",
            &[
                "--import",
                file.to_str().unwrap(),
                "--disk",
                copy.to_str().unwrap(),
            ],
        )),
        &dir.path("dst.err"),
    );
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert!(bad_lines(&after).is_empty(), "{:?}", bad_lines(&after));
    let status = ctl(&dir.path("dst.sock"), &["status"]);
    assert_eq!(
        status["devices"][0]["path"],
        copy.to_str().unwrap(),
        "{status}"
    );
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the import to quit"));
    assert!(
        std::fs::read(&disk).unwrap() == exported,
        "the import wrote the original disk"
    );
}
