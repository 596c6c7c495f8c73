//! Pages arriving on the control connection: before the state (pre-copy
//! modes write them into guest RAM; hybrid also drops stale pages), and
//! the background push after it (installed through userfaultfd).

use ferry_protocol::{
    decode_pages, decode_pages_ref, from_json, pages_header, raw_pages_head, MigrationMode,
    MsgType, PageBitmap, PageEncoding, ProtocolError, HEADER_LEN, PAGES_PREFIX,
};
use std::os::fd::BorrowedFd;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

use super::error::DestError;
use super::link::{Link, Received};
use super::stats::PushInstall;
use super::uffd_ram::UffdRam;
use crate::devices::migrated::DiskSet;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;

/// Counters of the background installer.
#[derive(Default)]
pub(super) struct PushCounters {
    pub(super) pages_pushed: u64,
    pub(super) pages_zero: u64,
    pub(super) bytes_wire: u64,
    pub(super) bytes_page_data: u64,
    pub(super) bytes_page_raw: u64,
    /// Migrated-disk blocks among `pages_pushed` and `pages_zero`.
    pub(super) disk_blocks: u64,
    /// Pages loaded locally before the vCPUs ran (see `super::preload`).
    pub(super) pages_preloaded: u64,
    /// How the push was installed, once it ran.
    pub(super) install: Option<PushInstall>,
}

/// Pages `first..first+n` split into the part in guest RAM (`ram_pages`
/// pages) and the part on migrated disks: the count in RAM.
fn in_ram(ram_pages: u64, first: u64, n: u64) -> u64 {
    ram_pages.saturating_sub(first).min(n)
}

/// A frame's pages reach beyond RAM but there are no migrated disks.
fn no_disks(first: u64, n: u64) -> DestError {
    ProtocolError::BadPages(format!(
        "pages {first}+{n} beyond guest RAM, and no disk is migrated"
    ))
    .into()
}

/// Writes whole pages at `first` before the state. With userfaultfd, a page
/// not yet present is installed with `UFFDIO_COPY`, which also maps it, so
/// the guest's first touch of it after the resume costs no host page fault
/// (written through the file, each one did: 64,518 of them kept a restored
/// guest below its rate for 200 ms); a page present already (sent again by a
/// later pre-copy round) is overwritten through the file, which keeps its
/// mapping.
fn write_pages(
    ram: &GuestRam,
    uffd: Option<&UffdRam>,
    first: u64,
    data: &[u8],
) -> Result<(), DestError> {
    let Some(u) = uffd else {
        ram.write_at(first * PAGE_SIZE as u64, data)?;
        return Ok(());
    };
    let n = (data.len() / PAGE_SIZE) as u64;
    let mut i = 0;
    while i < n {
        let present = u.present.get(first + i);
        let mut j = i + 1;
        while j < n && u.present.get(first + j) == present {
            j += 1;
        }
        let run = &data[i as usize * PAGE_SIZE..j as usize * PAGE_SIZE];
        if present {
            ram.write_at((first + i) * PAGE_SIZE as u64, run)?;
        } else {
            u.install(first + i, run)?;
        }
        i = j;
    }
    for p in first..first + n {
        u.zero.clear(p);
    }
    Ok(())
}

/// Receives what comes before `State`: pages (pre-copy modes) and, in
/// hybrid mode, the stale-page `Discard`. Returns the `State` payload.
pub(super) fn receive_before_state(
    ctl: &mut Link,
    ram: &GuestRam,
    uffd: Option<&UffdRam>,
    disks: Option<&DiskSet>,
    mode: MigrationMode,
    c: &mut PushCounters,
) -> Result<Vec<u8>, DestError> {
    let mut pages = Vec::new();
    let total = disks.map_or(ram.pages(), DiskSet::total_pages);
    loop {
        let frame = ctl.recv()?;
        let payload = frame.payload;
        match frame.header.kind {
            MsgType::State => return Ok(payload.to_vec()),
            MsgType::Pages if mode != MigrationMode::Postcopy => {
                c.bytes_wire += (HEADER_LEN + payload.len()) as u64;
                let ph = decode_pages(payload, total, &mut pages)?;
                let (first, all) = (ph.first_pfn, u64::from(ph.count));
                let n = in_ram(ram.pages(), first, all);
                if n < all {
                    let d = disks.ok_or_else(|| no_disks(first, all))?;
                    c.disk_blocks += all - n;
                    if ph.encoding == PageEncoding::Zero {
                        d.install_zero(first + n, all - n)?;
                    } else {
                        d.install(first + n, &pages[n as usize * PAGE_SIZE..])?;
                    }
                }
                if ph.encoding == PageEncoding::Zero {
                    c.pages_zero += all;
                    if n > 0 {
                        ram.discard(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64)?;
                    }
                    if let Some(u) = uffd {
                        for p in first..first + n {
                            u.present.clear(p);
                        }
                        u.zero.set_range(first, n);
                    }
                } else {
                    c.pages_pushed += all;
                    c.bytes_page_data += (payload.len() - PAGES_PREFIX) as u64;
                    c.bytes_page_raw += pages.len() as u64;
                    if n > 0 {
                        write_pages(ram, uffd, first, &pages[..n as usize * PAGE_SIZE])?;
                    }
                }
            }
            MsgType::Discard if mode == MigrationMode::Hybrid => {
                let u =
                    uffd.ok_or_else(|| DestError::Refused("Discard without userfaultfd".into()))?;
                c.bytes_wire += (HEADER_LEN + payload.len()) as u64;
                let stale = PageBitmap::from_le_bytes(total, payload).ok_or_else(|| {
                    ProtocolError::BadPages(format!(
                        "Discard bitmap of {} bytes for {total} pages",
                        payload.len(),
                    ))
                })?;
                let ack = frame.header.arg == 1;
                // One punch per run of stale pages: the guest is paused.
                for (first, all) in stale.runs(0, u64::MAX) {
                    let n = in_ram(ram.pages(), first, all);
                    if n > 0 {
                        ram.discard(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64)?;
                        for p in first..first + n {
                            u.present.clear(p);
                            u.zero.clear(p);
                        }
                    }
                    if n < all {
                        disks
                            .ok_or_else(|| no_disks(first, all))?
                            .discard(first + n, all - n)?;
                    }
                }
                if ack {
                    ctl.send(MsgType::DiscardDone, 0, &[])?;
                }
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other,
                    expected: "State (or Pages/Discard before it in pre-copy modes)",
                }
                .into())
            }
        }
    }
}

/// Pages for the installer thread: the first page, and a buffer with the
/// range of it that holds the pages.
type PushJob = (u64, Vec<u8>, std::ops::Range<usize>);

/// Push frames decoded and waiting for the installer thread at most; with
/// one free buffer each, this bounds the pipeline to about 16 MiB (2 MiB
/// frames).
const IN_FLIGHT: usize = 8;

/// Installs pushed pages until `PushDone`, counting them into `c`; returns
/// the source's stats from `PushDone` once every pushed page is installed.
///
/// Two stages on two threads, so that the push runs at the speed of the
/// slower stage rather than of both: this thread reads and decodes frames
/// from the control connection (the kernel's socket copy, and LZ4), and an
/// installer thread resolves them with `UFFDIO_COPY` (the page allocation
/// and copy, the costliest step on the destination). Buffers go back and
/// forth between the two, so nothing is allocated per frame.
pub(super) fn install_push(
    ctl: &mut Link,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    c: &mut PushCounters,
) -> Result<serde_json::Value, DestError> {
    if std::thread::available_parallelism().is_ok_and(|n| n.get() == 1) {
        c.install = Some(PushInstall::Inline);
        return install_push_inline(ctl, ram, disks, c);
    }
    c.install = Some(PushInstall::Pipelined);
    let (work_tx, work_rx) = sync_channel::<PushJob>(IN_FLIGHT);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let installer = std::thread::Builder::new()
            .name("installer".into())
            .spawn_scoped(s, move || -> Result<(), DestError> {
                crate::seccomp::apply(crate::seccomp::Thread::Installer)?;
                for (pfn, pages, range) in work_rx {
                    install_data(ram, disks, pfn, &pages[range])?;
                    // The receiver may be gone (it failed): drop the buffer.
                    let _ = free_tx.send(pages);
                }
                Ok(())
            })
            .map_err(|e| DestError::Refused(format!("cannot start the installer thread: {e}")))?;
        let received = receive_push(ctl, ram, disks, c, &work_tx, &free_rx);
        drop(work_tx);
        let installed = installer
            .join()
            .map_err(|_| DestError::Refused("the installer thread panicked".into()))?;
        // An installer failure is the cause of any receive error it made.
        installed?;
        received
    })
}

/// Installs the pages of `data` at `pfn`: the part in guest RAM through
/// userfaultfd, the rest on the migrated disks.
fn install_data(
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    pfn: u64,
    data: &[u8],
) -> Result<(), DestError> {
    let all = (data.len() / PAGE_SIZE) as u64;
    let n = in_ram(ram.pages(), pfn, all);
    let split = n as usize * PAGE_SIZE;
    if n > 0 {
        ram.install(pfn, &data[..split])?;
    }
    if n < all {
        disks
            .ok_or_else(|| no_disks(pfn, all))?
            .install(pfn + n, &data[split..])?;
    }
    Ok(())
}

/// [`install_push`] on a destination that may use one CPU only (pinned):
/// two stages could not overlap there, so this thread installs each frame
/// itself, straight from the connection's buffer. That saves the copy into
/// the installer's buffer and two thread switches per frame.
fn install_push_inline(
    ctl: &mut Link,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    c: &mut PushCounters,
) -> Result<serde_json::Value, DestError> {
    let mut lz4 = Vec::new();
    push_frames(ctl, ram, disks, c, |ctl, total| {
        let frame = ctl.rx.last_frame().ok_or(ProtocolError::Closed)?;
        let (ph, data) = decode_pages_ref(frame.payload, total, &mut lz4)?;
        install_data(ram, disks, ph.first_pfn, data)
    })
}

/// The receiving stage of [`install_push`]: hands data frames to the
/// installer through `work` without copying them. A raw frame goes in the
/// storage the connection read it into, which takes a buffer the installer
/// gave back (`free`) in its place; an LZ4 frame goes in the buffer it was
/// decompressed into. (Copying each frame into a buffer of its own cost as
/// much CPU as its `UFFDIO_COPY`.)
fn receive_push(
    ctl: &mut Link,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    c: &mut PushCounters,
    work: &SyncSender<PushJob>,
    free: &Receiver<Vec<u8>>,
) -> Result<serde_json::Value, DestError> {
    let mut lz4 = Vec::new();
    push_frames(ctl, ram, disks, c, |ctl, total| {
        let frame = ctl.rx.last_frame().ok_or(ProtocolError::Closed)?;
        // Checks the frame (and inflates an LZ4 one into `lz4`).
        let (ph, _) = decode_pages_ref(frame.payload, total, &mut lz4)?;
        let spare = free.try_recv().unwrap_or_default();
        let job = if ph.encoding == PageEncoding::Raw {
            let (storage, payload) = ctl.rx.take_last_frame(spare).ok_or(ProtocolError::Closed)?;
            (
                ph.first_pfn,
                storage,
                payload.start + PAGES_PREFIX..payload.end,
            )
        } else {
            let pages = std::mem::replace(&mut lz4, spare);
            let n = ph.count as usize * PAGE_SIZE;
            (ph.first_pfn, pages, 0..n)
        };
        work.send(job)
            .map_err(|_| DestError::Refused("the installer thread stopped".into()))
    })
}

/// Fills pages `first..first+n` of guest RAM in place with the bytes of a
/// raw frame: `lead` (what the decoder had read of them), then the rest
/// read from the link's socket straight into RAM.
fn fill_from_stream(
    ctl: &Link,
    ram: &UffdRam,
    first: u64,
    n: u64,
    mut lead: &[u8],
) -> Result<(), DestError> {
    let mut fd = ctl
        .stream
        .plain_fd()
        .ok_or_else(|| DestError::Refused("in-place fill over TLS".into()))?;
    ram.fill(first, n, |dst| {
        fill_part(dst, &mut lead, &mut fd)?;
        Ok::<_, DestError>(())
    })?;
    Ok(())
}

/// Fills `dst`, a part of guest RAM, with the next bytes of a raw frame:
/// first what is left of `lead` (bytes of it read already), then bytes
/// read from socket `fd`.
pub(super) fn fill_part(
    dst: &mut VolatileSlice<'_>,
    lead: &mut &[u8],
    fd: &mut BorrowedFd<'_>,
) -> Result<(), ProtocolError> {
    let k = lead.len().min(dst.len());
    dst.copy_from(&lead[..k]);
    *lead = &lead[k..];
    let mut rest = dst.offset(k).map_err(volatile_error)?;
    fd.read_exact_volatile(&mut rest).map_err(volatile_error)
}

/// A read into guest RAM that failed: the link's error.
fn volatile_error(e: VolatileMemoryError) -> ProtocolError {
    match e {
        VolatileMemoryError::IOError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ProtocolError::Closed
        }
        VolatileMemoryError::IOError(e) => ProtocolError::Io(e),
        other => ProtocolError::Io(std::io::Error::other(other.to_string())),
    }
}

/// Reads the push until `PushDone` and returns the source's stats from it.
/// Counts every frame into `c` and records zero runs itself; each data
/// frame's payload goes to `data` (with the page space's size, for
/// decoding), which takes it from the connection (`ctl.rx.last_frame()`)
/// and installs it or hands it on.
fn push_frames(
    ctl: &mut Link,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    c: &mut PushCounters,
    mut data: impl FnMut(&mut Link, u64) -> Result<(), DestError>,
) -> Result<serde_json::Value, DestError> {
    let total = disks.map_or(ram.pages(), DiskSet::total_pages);
    let in_place = ram.fills_in_place() && ctl.stream.plain_fd().is_some();
    if in_place {
        ctl.rx.set_head_reads(Some(PAGES_PREFIX));
    }
    let done = push_frames_from(ctl, ram, disks, c, in_place, total, &mut data);
    ctl.rx.set_head_reads(None);
    done
}

/// A raw frame at least this long is read from the socket straight into
/// guest RAM when RAM is filled in place.
const IN_PLACE_FROM: usize = 64 << 10;

/// The loop of [`push_frames`].
fn push_frames_from(
    ctl: &mut Link,
    ram: &UffdRam,
    disks: Option<&DiskSet>,
    c: &mut PushCounters,
    in_place: bool,
    total: u64,
    data: &mut impl FnMut(&mut Link, u64) -> Result<(), DestError>,
) -> Result<serde_json::Value, DestError> {
    let ram_pages = ram.pages();
    let take = |p: &ferry_protocol::PartialFrame<'_>| {
        in_place
            && p.header.kind == MsgType::Pages
            && p.rest >= IN_PLACE_FROM
            && raw_pages_head(p.buffered, p.header.len as usize, total)
                .is_ok_and(|h| h.first_pfn + u64::from(h.count) <= ram_pages)
    };
    let mut lead = Vec::new();
    loop {
        let frame = match ctl.recv_or_partial(PAGES_PREFIX, take)? {
            Received::Frame(f) => f,
            Received::Partial(p) => {
                let len = p.header.len as usize;
                let h = raw_pages_head(p.buffered, len, total)?;
                lead.clear();
                lead.extend_from_slice(&p.buffered[PAGES_PREFIX..]);
                ctl.rx.skip_partial();
                fill_from_stream(ctl, ram, h.first_pfn, u64::from(h.count), &lead)?;
                c.bytes_wire += (HEADER_LEN + len) as u64;
                c.pages_pushed += u64::from(h.count);
                c.bytes_page_data += (len - PAGES_PREFIX) as u64;
                c.bytes_page_raw += u64::from(h.count) * PAGE_SIZE as u64;
                continue;
            }
        };
        let (kind, payload) = (frame.header.kind, frame.payload);
        let payload_len = payload.len();
        c.bytes_wire += (HEADER_LEN + payload_len) as u64;
        match kind {
            MsgType::Pages => {
                let (ph, _) = pages_header(payload, total)?;
                let (first, all) = (ph.first_pfn, u64::from(ph.count));
                let n = in_ram(ram.pages(), first, all);
                if n < all {
                    c.disk_blocks += all - n;
                }
                if ph.encoding == PageEncoding::Zero {
                    c.pages_zero += all;
                    ram.note_zero(first, n)?;
                    if n < all {
                        disks
                            .ok_or_else(|| no_disks(first, all))?
                            .install_zero(first + n, all - n)?;
                    }
                } else {
                    data(ctl, total)?;
                    c.pages_pushed += all;
                    c.bytes_page_data += (payload_len - PAGES_PREFIX) as u64;
                    c.bytes_page_raw += all * PAGE_SIZE as u64;
                }
            }
            MsgType::PushDone => return Ok(from_json("PushDone", payload)?),
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other,
                    expected: "Pages or PushDone",
                }
                .into())
            }
        }
    }
}
