//! A migrated disk's blocks land beside its file until the move commits:
//! a session that never commits (here, one whose fault connection never
//! comes) leaves the file the destination's `--disk` names untouched. That
//! file may be a disk this host shares with the source, which a `Hello`
//! alone must not be able to empty.

use std::io::Write;
use std::time::Duration;

use ferry_engine::devices::DiskConfig;
use ferry_engine::migration::acceptor::Acceptor;
use ferry_engine::migration::{self, DestOptions};
use ferry_engine::ConsoleOutput;
use ferry_protocol::{
    write_frame, Hello, MigratedDisk, MsgType, Role, OPT_DISKS, OPT_MODE, PAGE_SIZE,
    PROTOCOL_VERSION,
};
use ferry_transport::Conn;

#[test]
fn a_session_that_never_commits_leaves_the_disk_file_as_it_was() {
    let dir = std::env::temp_dir().join(format!("ferry-incoming-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shared.img");
    let content = vec![0xabu8; 1 << 20];
    std::fs::write(&path, &content).unwrap();
    let (ctl, mut ctl_src) = Conn::pair().unwrap();
    let (fault, fault_src) = Conn::pair().unwrap();
    drop(fault_src); // the fault connection never comes
    let acceptor = Acceptor::given(vec![ctl, fault], Duration::from_secs(1)).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Control,
        session_id: 5,
        features: 0,
        mem_size: 16 << 20,
        vcpus: 1,
        page_size: PAGE_SIZE as u32,
        options: vec![
            (OPT_MODE, vec![0]),
            (
                OPT_DISKS,
                MigratedDisk::encode_option(&[MigratedDisk { slot: 0, blocks: 1 }]),
            ),
        ],
    };
    let mut frame = Vec::new();
    write_frame(&mut frame, MsgType::Hello, 0, &hello.encode()).unwrap();
    ctl_src.write_all(&frame).unwrap();
    let opts = DestOptions {
        disk_overrides: vec![DiskConfig::new(&path, "s")],
        peer_timeout: Duration::from_secs(1),
        accept_timeout: Some(Duration::from_secs(2)),
        expect_session: Some(5),
        ..Default::default()
    };
    let err = migration::receive_from(acceptor, ConsoleOutput::Discard, &opts)
        .err()
        .map(|e| e.to_string());
    let after = std::fs::read(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("Fault connection of the session never came")),
        "{err:?}"
    );
    assert!(
        after == content,
        "the disk file changed: {} bytes",
        after.len()
    );
    assert_eq!(
        leftovers,
        ["shared.img"],
        "an incoming file was left behind"
    );
}
