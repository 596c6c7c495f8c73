//! Pieces of a fake destination that the page server's tests and its
//! benchmark (`benches/page_server.rs`, which includes this file) share.
#![allow(dead_code)]

use std::ffi::CStr;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;

use ferry_protocol::PAGE_SIZE;

/// A new memfd named `name`, `pages` pages long, all holes.
pub fn memfd_of_pages(name: &CStr, pages: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; it returns a new
    // descriptor or -1, and touches no other memory.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(pages * PAGE_SIZE as u64).unwrap();
    file
}

/// The two connections of a migration over loopback, control first then
/// fault: for each, the destination's end and the source's (the page
/// server's) end.
pub fn loopback_connections() -> [(TcpStream, TcpStream); 2] {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    [(); 2].map(|()| {
        let dest = TcpStream::connect(addr).unwrap();
        let (source, _) = listener.accept().unwrap();
        (dest, source)
    })
}
