//! Demand answers read straight into huge-page RAM.
//!
//! A large raw answer (a huge page's missing pages, up to 2 MiB) is not
//! read into the connection's buffer and copied again: once its header is
//! here (the decoder reads no further, see
//! [`FrameDecoder::set_head_reads`](ferry_protocol::FrameDecoder::set_head_reads)),
//! the rest is read from the socket into its place in guest RAM
//! ([`UffdRam::fill`]), as whole pages arrive. The socket is non-blocking
//! and the thread never waits inside a read while faults may come in: it
//! reads the whole pages queued (`FIONREAD`), and sleeps in `poll` until
//! more come (the socket's low-water mark is the answer's missing bytes,
//! so that is usually one wake-up per answer).

use std::os::fd::{AsRawFd, BorrowedFd};

use ferry_protocol::{raw_pages_head, MsgType, ProtocolError, PAGES_PREFIX, PAGE_SIZE};
use vm_memory::ReadVolatile;

use super::{Conn, FaultError};
use crate::migration::install::volatile_error;
use crate::migration::uffd_ram::UffdRam;

/// A raw answer at least this long (after what is buffered of it) is read
/// in place.
const IN_PLACE_FROM: usize = 64 << 10;

/// An answer being read in place.
#[derive(Debug)]
pub(super) struct Answer {
    /// Its first page.
    pub(super) first: u64,
    /// Its pages.
    pub(super) count: u64,
    /// Pages read so far.
    done: u64,
    /// How many of them were new.
    pub(super) newly: u64,
    /// Bytes read from the socket for it.
    pub(super) read: usize,
}

impl Answer {
    /// Bytes of it still to come.
    pub(super) fn missing(&self) -> usize {
        ((self.count - self.done) as usize) * PAGE_SIZE
    }
}

/// What [`fill_ready`] did.
pub(super) enum Ready {
    /// An answer is complete in guest RAM.
    Filled(Answer),
    /// Pages of an answer were read (this many bytes); more may be queued.
    Progress(usize),
    /// An answer is under way and no whole page of it is queued.
    Waiting,
    /// No answer to read in place: read through the decoder.
    No,
}

/// Reads the answer under way, or the one at the front of `c`'s buffer
/// when it is a large raw one inside RAM (of `total` pages in all), into
/// guest RAM: the whole pages of it queued on the socket. `lead` is
/// scratch space for the part the decoder had read.
pub(super) fn fill_ready(
    c: &mut Conn,
    ram: &UffdRam,
    total: u64,
    lead: &mut Vec<u8>,
) -> Result<Ready, FaultError> {
    if c.stream.plain_fd().is_none() {
        return Ok(Ready::No);
    }
    if c.in_place.is_none() {
        let Some(a) = start(c, ram, total, lead)? else {
            return Ok(Ready::No);
        };
        c.in_place = Some(a);
    }
    let (Some(a), Some(fd)) = (c.in_place.as_mut(), c.stream.plain_fd()) else {
        return Ok(Ready::No);
    };
    let queued = queued(fd).map_err(ProtocolError::Io)?;
    let pages = ((queued / PAGE_SIZE) as u64).min(a.count - a.done);
    if pages > 0 {
        let mut fd = fd;
        a.newly += ram.fill(a.first + a.done, pages, |dst| {
            fd.read_exact_volatile(dst).map_err(volatile_error)?;
            Ok::<_, FaultError>(())
        })?;
        a.done += pages;
        a.read += pages as usize * PAGE_SIZE;
    }
    if a.done == a.count {
        return Ok(c.in_place.take().map_or(Ready::No, Ready::Filled));
    }
    Ok(if pages > 0 {
        Ready::Progress(pages as usize * PAGE_SIZE)
    } else {
        Ready::Waiting
    })
}

/// Takes the answer at the front of `c`'s buffer out of the decoder when
/// it is to be read in place, and writes what was buffered of it.
fn start(
    c: &mut Conn,
    ram: &UffdRam,
    total: u64,
    lead: &mut Vec<u8>,
) -> Result<Option<Answer>, FaultError> {
    let Some(p) = c.rx.partial_frame(PAGES_PREFIX) else {
        return Ok(None);
    };
    if p.header.kind != MsgType::Pages || p.rest < IN_PLACE_FROM {
        return Ok(None);
    }
    // A bad head is reported by the decoder's path, with the whole frame.
    let Ok(h) = raw_pages_head(p.buffered, p.header.len as usize, total) else {
        return Ok(None);
    };
    let (first, count) = (h.first_pfn, u64::from(h.count));
    let body = &p.buffered[PAGES_PREFIX..];
    if first + count > ram.pages() || !body.len().is_multiple_of(PAGE_SIZE) {
        return Ok(None);
    }
    lead.clear();
    lead.extend_from_slice(body);
    c.rx.skip_partial();
    let done = (lead.len() / PAGE_SIZE) as u64;
    let newly = if done > 0 {
        ram.install(first, lead)?
    } else {
        0
    };
    Ok(Some(Answer {
        first,
        count,
        done,
        newly,
        read: 0,
    }))
}

/// Bytes queued on socket `fd`, ready to be read (`FIONREAD`).
fn queued(fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is an open socket for the call's duration, and FIONREAD
    // writes one `c_int`, which `n` is.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}
