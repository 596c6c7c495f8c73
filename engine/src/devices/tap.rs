//! A tap interface: `/dev/net/tun` attached with `TUNSETIFF`
//! (`IFF_TAP | IFF_NO_PI`), non-blocking. One frame per read or write.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::net_config::MAX_TAP_NAME;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the
/// rest of the union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to the tap `name` (created by the kernel if missing).
    pub fn open(name: &str) -> std::io::Result<Tap> {
        let file = Self::open_tun(name)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back the name into) a
        // `struct ifreq` of 40 bytes; `req` is one, NUL-terminated (name
        // at most 15 bytes), alive for the call, and `file` is open.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tap { file })
    }

    /// Any other fd that reads and writes one frame per call and does
    /// not block (one end of a datagram socket pair, in tests).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
        }
    }

    /// What can be known of opening tap `name` without attaching to it
    /// (which another process may hold until a move commits): the name is
    /// one a tap can have, and `/dev/net/tun` opens for this process.
    pub fn check(name: &str) -> std::io::Result<()> {
        Self::open_tun(name).map(drop)
    }

    fn open_tun(name: &str) -> std::io::Result<std::fs::File> {
        if name.is_empty() || name.len() > MAX_TAP_NAME || name.contains('\0') {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// The fd, for epoll.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
