//! Pages arriving on the control connection: before the state (pre-copy
//! modes write them straight into the memory file; hybrid also drops stale
//! pages), and the background push after it (installed through
//! userfaultfd).

use ferry_protocol::{
    decode_pages, from_json, MigrationMode, MsgType, PageBitmap, PageEncoding, ProtocolError,
    HEADER_LEN, PAGES_PREFIX,
};

use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

use super::error::DestError;
use super::link::Link;
use super::uffd_ram::UffdRam;
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
}

/// Receives what comes before `State`: pages (pre-copy modes) and, in
/// hybrid mode, the stale-page `Discard`. Returns the `State` payload.
pub(super) fn receive_before_state(
    ctl: &mut Link,
    ram: &GuestRam,
    uffd: Option<&UffdRam>,
    mode: MigrationMode,
    c: &mut PushCounters,
) -> Result<Vec<u8>, DestError> {
    let mut pages = Vec::new();
    loop {
        let frame = ctl.recv()?;
        let payload = frame.payload;
        match frame.header.kind {
            MsgType::State => return Ok(payload.to_vec()),
            MsgType::Pages if mode != MigrationMode::Postcopy => {
                c.bytes_wire += (HEADER_LEN + payload.len()) as u64;
                let ph = decode_pages(payload, ram.pages(), &mut pages)?;
                let (first, n) = (ph.first_pfn, u64::from(ph.count));
                if ph.encoding == PageEncoding::Zero {
                    c.pages_zero += n;
                    ram.discard(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64)?;
                    if let Some(u) = uffd {
                        for p in first..first + n {
                            u.present.clear(p);
                        }
                        u.zero.set_range(first, n);
                    }
                } else {
                    c.pages_pushed += n;
                    c.bytes_page_data += (payload.len() - PAGES_PREFIX) as u64;
                    c.bytes_page_raw += pages.len() as u64;
                    ram.write_at(first * PAGE_SIZE as u64, &pages)?;
                    if let Some(u) = uffd {
                        u.present.set_range(first, n);
                        for p in first..first + n {
                            u.zero.clear(p);
                        }
                    }
                }
            }
            MsgType::Discard if mode == MigrationMode::Hybrid => {
                let u =
                    uffd.ok_or_else(|| DestError::Refused("Discard without userfaultfd".into()))?;
                c.bytes_wire += (HEADER_LEN + payload.len()) as u64;
                let stale = PageBitmap::from_le_bytes(ram.pages(), payload).ok_or_else(|| {
                    ProtocolError::BadPages(format!(
                        "Discard bitmap of {} bytes for {} pages",
                        payload.len(),
                        ram.pages()
                    ))
                })?;
                let ack = frame.header.arg == 1;
                // One punch per run of stale pages: the guest is paused.
                for (first, n) in stale.runs(0, u64::MAX) {
                    ram.discard(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64)?;
                }
                u.present.clear_those_in(&stale);
                u.zero.clear_those_in(&stale);
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

/// Push frames decoded and waiting for the installer thread at most; with
/// one free buffer each, this bounds the pipeline to about 8 MiB.
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
    c: &mut PushCounters,
) -> Result<serde_json::Value, DestError> {
    let (work_tx, work_rx) = sync_channel::<(u64, Vec<u8>)>(IN_FLIGHT);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let installer = std::thread::Builder::new()
            .name("installer".into())
            .spawn_scoped(s, move || -> Result<(), DestError> {
                crate::seccomp::apply(crate::seccomp::Thread::Installer)?;
                for (pfn, pages) in work_rx {
                    ram.install(pfn, &pages)?;
                    // The receiver may be gone (it failed): drop the buffer.
                    let _ = free_tx.send(pages);
                }
                Ok(())
            })
            .map_err(|e| DestError::Refused(format!("cannot start the installer thread: {e}")))?;
        let received = receive_push(ctl, ram, c, &work_tx, &free_rx);
        drop(work_tx);
        let installed = installer
            .join()
            .map_err(|_| DestError::Refused("the installer thread panicked".into()))?;
        // An installer failure is the cause of any receive error it made.
        installed?;
        received
    })
}

/// The receiving stage of [`install_push`]: hands data frames to the
/// installer through `work`, records zero runs itself.
fn receive_push(
    ctl: &mut Link,
    ram: &UffdRam,
    c: &mut PushCounters,
    work: &SyncSender<(u64, Vec<u8>)>,
    free: &Receiver<Vec<u8>>,
) -> Result<serde_json::Value, DestError> {
    loop {
        let frame = ctl.recv()?;
        let payload = frame.payload;
        c.bytes_wire += (HEADER_LEN + payload.len()) as u64;
        match frame.header.kind {
            MsgType::Pages => {
                let mut pages = free.try_recv().unwrap_or_default();
                let ph = decode_pages(payload, ram.pages(), &mut pages)?;
                if ph.encoding == PageEncoding::Zero {
                    c.pages_zero += u64::from(ph.count);
                    ram.zero.set_range(ph.first_pfn, u64::from(ph.count));
                } else {
                    c.pages_pushed += u64::from(ph.count);
                    c.bytes_page_data += (payload.len() - PAGES_PREFIX) as u64;
                    c.bytes_page_raw += pages.len() as u64;
                    work.send((ph.first_pfn, pages))
                        .map_err(|_| DestError::Refused("the installer thread stopped".into()))?;
                }
            }
            MsgType::PushDone => {
                return Ok(from_json("PushDone", payload)?);
            }
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
