//! Builds the freestanding guest (C + GNU assembler) into
//! `$OUT_DIR/ferry-guest.elf` with the system `gcc` and `ld`.
//!
//! `FERRY_GUEST_CC` / `FERRY_GUEST_LD` override the tools.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest sources, relative to the crate root.
const C_SOURCES: &[&str] = &[
    "src/main.c",
    "src/cpu.c",
    "src/mm.c",
    "src/console.c",
    "src/util.c",
    "src/disk.c",
    "src/net.c",
];
const ASM_SOURCES: &[&str] = &["src/boot.S"];
/// The silent test kernel: one assembler file, linked on its own.
const SILENT_SOURCE: &str = "src/silent.S";
const HEADERS: &[&str] = &["src/guest.h", "src/pvh_note.h", "src/virtio_mmio.h"];
const LINKER_SCRIPT: &str = "src/linker.ld";

/// Flags for every translation unit.
///
/// The image is linked at 1 MiB and runs identity-mapped below 2 GiB, so
/// the default small code model with absolute addressing (`-fno-pic`) is
/// exactly right; neither `-mcmodel=kernel` (needs the top 2 GiB) nor
/// `-mcmodel=large` is needed.  `-mgeneral-regs-only` keeps compiled code
/// off the x87/SSE/AVX registers, which interrupt handlers don't save and
/// the register check relies on.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-m64",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",
    "-fno-common",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("FERRY_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("FERRY_GUEST_LD").unwrap_or_else(|_| "ld".into());
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_LD");
    println!("cargo:rerun-if-changed=build.rs");
    for f in C_SOURCES
        .iter()
        .chain(ASM_SOURCES)
        .chain(HEADERS)
        .chain(&[LINKER_SCRIPT, SILENT_SOURCE])
    {
        println!("cargo:rerun-if-changed={f}");
    }

    let mut objects = Vec::new();
    for src in C_SOURCES.iter().chain(ASM_SOURCES) {
        let stem = Path::new(src)
            .file_name()
            .expect("file name")
            .to_string_lossy();
        objects.push(compile(
            &cc,
            &crate_dir,
            src,
            &out_dir.join(format!("{stem}.o")),
        ));
    }

    link(&ld, &crate_dir, &out_dir.join("ferry-guest.elf"), &objects);

    let silent = compile(&cc, &crate_dir, SILENT_SOURCE, &out_dir.join("silent.o"));
    link(
        &ld,
        &crate_dir,
        &out_dir.join("ferry-silent.elf"),
        &[silent],
    );
}

/// Compiles `src` (relative to the crate) into the object `obj`; returns
/// `obj`.
fn compile(cc: &str, crate_dir: &Path, src: &str, obj: &Path) -> PathBuf {
    run(Command::new(cc)
        .args(CFLAGS)
        .arg("-c")
        .arg(crate_dir.join(src))
        .arg("-o")
        .arg(obj));
    obj.to_path_buf()
}

/// Links `objects` into `elf` at 1 MiB with the guest's linker script.
fn link(ld: &str, crate_dir: &Path, elf: &Path, objects: &[PathBuf]) {
    run(Command::new(ld)
        .arg("-T")
        .arg(crate_dir.join(LINKER_SCRIPT))
        .args([
            "-nostdlib",
            "-static",
            "-z",
            "max-page-size=4096",
            "-z",
            "noexecstack",
            "--build-id=none",
            "--no-warn-rwx-segments",
        ])
        .arg("-o")
        .arg(elf)
        .args(objects));
}
