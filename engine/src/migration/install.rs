//! Pages arriving on the control connection: before the state (pre-copy
//! modes write them straight into the memory file; hybrid also drops stale
//! pages), and the background push after it (installed through
//! userfaultfd).

use std::net::TcpStream;

use ferry_page_server::protocol::{
    self, decode_pages, read_frame, write_frame, MigrationMode, MsgType, PageEncoding,
    ProtocolError, PAGES_PREFIX,
};

use super::dest::DestError;
use super::precopy;
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

/// The first set bit at or after `from`.
pub(super) fn next_set(bits: &[u64], from: u64) -> Option<u64> {
    let mut w = (from / 64) as usize;
    let mut word = bits.get(w)? & (!0u64 << (from % 64));
    while word == 0 {
        w += 1;
        word = *bits.get(w)?;
    }
    Some(w as u64 * 64 + u64::from(word.trailing_zeros()))
}

/// Receives what comes before `State`: pages (pre-copy modes) and, in
/// hybrid mode, the stale-page `Discard`. Leaves the `State` payload in `buf`.
pub(super) fn receive_before_state(
    rd: &mut impl std::io::Read,
    wr: &mut TcpStream,
    buf: &mut Vec<u8>,
    ram: &GuestRam,
    uffd: Option<&UffdRam>,
    mode: MigrationMode,
    c: &mut PushCounters,
) -> Result<(), DestError> {
    let mut pages = Vec::new();
    loop {
        let hdr = read_frame(rd, buf)?;
        match hdr.kind {
            MsgType::State => return Ok(()),
            MsgType::Pages if mode != MigrationMode::Postcopy => {
                c.bytes_wire += (protocol::HEADER_LEN + buf.len()) as u64;
                let ph = decode_pages(buf, ram.pages(), &mut pages)?;
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
                    c.bytes_page_data += (buf.len() - PAGES_PREFIX) as u64;
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
                c.bytes_wire += (protocol::HEADER_LEN + buf.len()) as u64;
                let stale: Vec<u64> = buf
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                    .collect();
                // One punch per run of stale pages: the guest is paused.
                let mut p = 0;
                while let Some(first) = next_set(&stale, p) {
                    let mut end = first + 1;
                    while precopy::bit(&stale, end) {
                        end += 1;
                    }
                    if end > ram.pages() {
                        return Err(ProtocolError::BadPages(format!(
                            "Discard names page {}",
                            end - 1
                        ))
                        .into());
                    }
                    ram.discard(first * PAGE_SIZE as u64, (end - first) * PAGE_SIZE as u64)?;
                    for q in first..end {
                        u.present.clear(q);
                        u.zero.clear(q);
                    }
                    p = end;
                }
                if hdr.arg == 1 {
                    write_frame(wr, MsgType::DiscardDone, 0, &[])?;
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

/// Installs pushed pages until `PushDone`; returns counters and the
/// source's stats.
pub(super) fn install_push(
    rd: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
    ram: &UffdRam,
    mut c: PushCounters,
) -> Result<(PushCounters, serde_json::Value), DestError> {
    let mut pages = Vec::new();
    loop {
        let hdr = read_frame(rd, buf)?;
        c.bytes_wire += (protocol::HEADER_LEN + buf.len()) as u64;
        match hdr.kind {
            MsgType::Pages => {
                let ph = decode_pages(buf, ram.pages(), &mut pages)?;
                if ph.encoding == PageEncoding::Zero {
                    c.pages_zero += u64::from(ph.count);
                    ram.zero.set_range(ph.first_pfn, u64::from(ph.count));
                } else {
                    c.pages_pushed += u64::from(ph.count);
                    c.bytes_page_data += (buf.len() - PAGES_PREFIX) as u64;
                    c.bytes_page_raw += pages.len() as u64;
                    ram.install(ph.first_pfn, &pages)?;
                }
            }
            MsgType::PushDone => {
                let v = protocol::from_json("PushDone", buf)?;
                return Ok((c, v));
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
