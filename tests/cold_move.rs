//! A cold move: a stopped VM moves as a file. It is exported on one host,
//! the archive is copied across the link between two network namespaces,
//! and it is imported on the other host, where the guest continues.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use common::*;
use ferry_tools::netns::{Net, Side};

/// Copies `from` (read in the source namespace) to `to` (written in the
/// destination namespace) over a TCP connection across the link.
fn copy_across(net: &Net, from: &std::path::Path, to: &std::path::Path) {
    let (tx, rx) = std::sync::mpsc::channel();
    let ip = net.dest_ip();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            net.enter(Side::Dest).unwrap();
            let l = TcpListener::bind((ip, 0)).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let (mut c, peer) = l.accept().unwrap();
            assert_eq!(peer.ip(), net.source_ip(), "the copy came over the link");
            let mut data = Vec::new();
            c.read_to_end(&mut data).unwrap();
            std::fs::write(to, data).unwrap();
        });
        let sender = s.spawn(move || {
            net.enter(Side::Source).unwrap();
            let addr = rx.recv().unwrap();
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&std::fs::read(from).unwrap()).unwrap();
        });
        sender.join().unwrap();
        receiver.join().unwrap();
    });
}

#[test]
fn a_stopped_vm_moves_as_a_file_between_two_hosts() {
    let net = Net::tagged("ferrycold", "fc", 91, None).expect("network namespaces");
    let dir = Scratch::new("coldmove");
    let err = dir.path("src.err");
    let mut src = Proc(
        net.command(Side::Source, &bin("ferry-source"))
            .args(strs(&console_args(
                &dir,
                "src",
                &[
                    "--mem",
                    "256M",
                    "--guest-args",
                    "ws=32M pattern=random write=80 report_ms=50",
                ],
            )))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_ticks(&dir.path("src.log"), 1, 3, WAIT);
    // Host A: export, then stop the VM for good (a cold move).
    let exported = dir.path("exported.ferry");
    ctl(
        &dir.path("src.sock"),
        &["export", exported.to_str().unwrap()],
    );
    let before = read_console(&dir.path("src.log"));
    ctl(&dir.path("src.sock"), &["quit"]);
    assert!(wait_exit(&mut src, WAIT, "the source to quit"));
    // Across the link.
    let copied = dir.path("copied.ferry");
    copy_across(&net, &exported, &copied);
    // Host B: import; the guest continues from where it stopped.
    let derr = dir.path("dst.err");
    let mut dst = Proc(
        net.command(Side::Dest, &bin("ferry-dest"))
            .args(strs(&console_args(
                &dir,
                "dst",
                &["--import", copied.to_str().unwrap()],
            )))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&derr).unwrap())
            .spawn()
            .unwrap(),
    );
    let after = wait_ticks(&dir.path("dst.log"), 1, 3, WAIT);
    assert_continues(&before, &after, 1);
    ctl(&dir.path("dst.sock"), &["quit"]);
    assert!(wait_exit(&mut dst, WAIT, "the destination to quit"));
}
