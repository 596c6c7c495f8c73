//! The same guest ELF runs under QEMU's microvm, which makes side-by-side
//! peer measurements possible. QEMU is installed by scripts/setup.sh; this
//! test fails (it does not skip) when it is missing. `-cpu host` does not
//! start on this PVM host (QEMU fails to set MSR 0x10a), so qemu64 is used.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ferry_guest::{parse_line, GuestLine, GUEST_ELF};
use ferry_tools::bench::qemu::MACHINE_ARGS;

#[test]
fn guest_elf_ticks_under_qemu_microvm() {
    let dir = Scratch::new("qemu");
    let elf = dir.path("guest.elf");
    std::fs::write(&elf, GUEST_ELF).unwrap();
    let serial = dir.path("serial.log");
    let _qemu = Proc(
        Command::new("qemu-system-x86_64")
            .args(MACHINE_ARGS)
            .args(["-m", "256"])
            .args(["-kernel", elf.to_str().unwrap()])
            .args(["-append", "ws=32M report_ms=50"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 must be installed (scripts/setup.sh installs it)"),
    );
    let lines = wait_for(Duration::from_secs(60), "5 ticks under QEMU", || {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let lines: Vec<GuestLine> = text.lines().map(parse_line).collect();
        let n = lines
            .iter()
            .filter(|l| matches!(l, GuestLine::Tick { .. }))
            .count();
        (n >= 5).then_some(lines)
    });
    let bad: Vec<_> = lines
        .iter()
        .filter(|l| matches!(l, GuestLine::Bad { .. }))
        .collect();
    assert!(bad.is_empty(), "BAD under QEMU: {bad:?}");
    let rounds: Vec<u64> = lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Tick { round, .. } => Some(*round),
            _ => None,
        })
        .collect();
    assert!(rounds.windows(2).all(|w| w[1] > w[0]), "rounds: {rounds:?}");
}
