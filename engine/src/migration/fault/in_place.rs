//! Demand answers read straight into huge-page RAM.
//!
//! A large raw answer (a huge page's missing pages, up to 2 MiB) is not
//! read into the connection's buffer and copied again: once its header is
//! here (the decoder reads no further, see
//! [`FrameDecoder::set_head_reads`](ferry_protocol::FrameDecoder::set_head_reads)),
//! the rest is read from the socket into its place in guest RAM
//! ([`UffdRam::fill`]), as whole pages arrive. The socket is non-blocking
//! and the thread never waits inside a read while faults may come in: it
//! reads the whole pages queued (`FIONREAD`), keeps a part of a page aside
//! (so the socket is empty and `poll` sleeps), and sleeps until at least
//! 64 KiB more have come ([`Answer::wake_at`]). Waking only once the whole
//! answer was queued stalled the first answer on a new connection for
//! 200 ms in three runs of five (2G/256M unpinned): the receive window
//! closed below the low-water mark, and only the sender's zero-window
//! probe opened it again.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, BorrowedFd};

use ferry_protocol::{raw_pages_head, MsgType, ProtocolError, PAGES_PREFIX, PAGE_SIZE};

use super::{Conn, FaultError};
use crate::migration::install::fill_part;
use crate::migration::uffd_ram::UffdRam;

/// A raw answer at least this long (after what is buffered of it) is read
/// in place.
const IN_PLACE_FROM: usize = 64 << 10;

/// The socket's low-water mark while an answer is read in place: well
/// inside the receive window of a new connection.
const WAKE_EVERY: usize = 64 << 10;

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
    read: usize,
    /// Bytes of its next page read already (less than a page).
    carry: Vec<u8>,
}

impl Answer {
    /// Bytes of it not yet read from the socket.
    fn missing(&self) -> usize {
        ((self.count - self.done) as usize) * PAGE_SIZE - self.carry.len()
    }

    /// The socket's low-water mark while it is under way: more than what
    /// is queued (nothing, after a pass), so `poll` sleeps.
    pub(super) fn wake_at(&self) -> usize {
        self.missing().min(WAKE_EVERY)
    }
}

/// What [`fill_ready`] did.
pub(super) enum Ready {
    /// An answer is complete in guest RAM (with the bytes read for it in
    /// this pass).
    Filled(Answer, usize),
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
    let pages = (((queued + a.carry.len()) / PAGE_SIZE) as u64).min(a.count - a.done);
    if pages == 0 {
        // Less than a page: take it out of the socket, so `poll` sleeps
        // until more comes; an empty socket that `poll` woke us for is
        // closed.
        let mut part = [0u8; PAGE_SIZE];
        let room = (PAGE_SIZE - a.carry.len()).min(a.missing());
        return match (&c.stream).read(&mut part[..room]) {
            Ok(0) => Err(ProtocolError::Closed.into()),
            Ok(n) => {
                a.carry.extend_from_slice(&part[..n]);
                a.read += n;
                Ok(Ready::Progress(n))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(Ready::Waiting)
            }
            Err(e) => Err(ProtocolError::Io(e).into()),
        };
    }
    let mut fd = fd;
    let carry = std::mem::take(&mut a.carry);
    let mut from: &[u8] = &carry;
    let before = a.read;
    a.newly += ram.fill(a.first + a.done, pages, |dst| {
        fill_part(dst, &mut from, &mut fd)?;
        Ok::<_, FaultError>(())
    })?;
    a.done += pages;
    a.read += pages as usize * PAGE_SIZE - carry.len();
    let now = a.read - before;
    if a.done == a.count {
        return Ok(c
            .in_place
            .take()
            .map_or(Ready::No, |a| Ready::Filled(a, now)));
    }
    Ok(Ready::Progress(now))
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
        carry: Vec::new(),
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
