//! Sending pages before the switch-over: the full first pass, and rounds of
//! the pages KVM's dirty log says changed since.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ferry_page_server::protocol::{self, write_frame, MsgType, ProtocolError, PAGE_SIZE};
use ferry_page_server::source::PageSource;
use serde::{Deserialize, Serialize};

/// Pages per data frame.
const RUN: u64 = 256;
/// Pages per zero-run frame.
const ZERO_RUN: u64 = protocol::MAX_PAGES_PER_FRAME as u64;

/// One pre-copy round, as the source saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundStats {
    /// 0 is the full first pass.
    pub round: u32,
    /// Pages sent in this round (data and zero).
    pub pages: u64,
    /// Bytes written in this round.
    pub bytes: u64,
    /// Wall time of the round, ms.
    pub ms: f64,
    /// Pages the guest dirtied while the round was sent.
    pub dirty_after: u64,
    /// Estimated stop-and-copy time of those pages at this round's rate, ms.
    pub est_downtime_ms: f64,
}

/// Writes `Pages` frames on the control connection.
pub struct PageSender<'a> {
    out: BufWriter<&'a TcpStream>,
    source: &'a dyn PageSource,
    lz4: bool,
    zero_runs: bool,
    buf: Vec<u8>,
    /// Bytes written so far.
    pub bytes: u64,
    /// Data pages sent so far.
    pub pages_data: u64,
    /// Zero pages sent as markers so far.
    pub pages_zero: u64,
    /// Counts pages sent, for a progress display.
    pub progress: Option<&'a AtomicU64>,
}

impl<'a> PageSender<'a> {
    /// A sender over `conn`.
    pub fn new(
        conn: &'a TcpStream,
        source: &'a dyn PageSource,
        lz4: bool,
        zero_runs: bool,
    ) -> Self {
        Self {
            out: BufWriter::with_capacity(1 << 20, conn),
            source,
            lz4,
            zero_runs,
            buf: vec![0; RUN as usize * PAGE_SIZE],
            bytes: 0,
            pages_data: 0,
            pages_zero: 0,
            progress: None,
        }
    }

    fn frame(&mut self, payload: &[u8]) -> Result<(), ProtocolError> {
        write_frame(&mut self.out, MsgType::Pages, 0, payload)?;
        self.bytes += (protocol::HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    fn zero(&mut self, pfn: u64, count: u64) -> Result<(), ProtocolError> {
        let mut p = pfn;
        while p < pfn + count {
            let n = (pfn + count - p).min(ZERO_RUN);
            let mut payload = Vec::with_capacity(protocol::PAGES_PREFIX);
            payload.extend_from_slice(&p.to_le_bytes());
            payload.extend_from_slice(&(n as u32).to_le_bytes());
            payload.extend_from_slice(&[protocol::PageEncoding::Zero as u8, 0, 0, 0]);
            self.frame(&payload)?;
            self.pages_zero += n;
            self.tick(n);
            p += n;
        }
        Ok(())
    }

    fn tick(&self, pages: u64) {
        if let Some(p) = self.progress {
            p.fetch_add(pages, Ordering::Relaxed);
        }
    }

    /// Sends `count` (≤ 256) contiguous pages from `pfn`.
    fn run(&mut self, pfn: u64, count: u64) -> Result<(), ProtocolError> {
        let len = count as usize * PAGE_SIZE;
        self.source
            .read(pfn, &mut self.buf[..len])
            .map_err(ProtocolError::Io)?;
        if !self.zero_runs || !protocol::is_zero(&self.buf[..len]) {
            let payload = protocol::encode_pages(pfn, &self.buf[..len], self.lz4, false);
            self.frame(&payload)?;
            self.pages_data += count;
            self.tick(count);
            Ok(())
        } else {
            self.zero(pfn, count)
        }
    }

    /// Sends every page: holes in the memory file go as zero runs unread.
    pub fn send_all(&mut self) -> Result<u64, ProtocolError> {
        let pages = self.source.pages();
        let mut p = 0;
        while p < pages {
            let data = self.source.next_data(p).unwrap_or(pages).min(pages);
            if data > p && self.zero_runs {
                self.zero(p, data - p)?;
                p = data;
                continue;
            }
            let n = RUN.min(pages - p);
            self.run(p, n)?;
            p += n;
        }
        Ok(pages)
    }

    /// Sends the pages set in `bitmap` (one bit per page); returns how many.
    pub fn send_set(&mut self, bitmap: &[u64]) -> Result<u64, ProtocolError> {
        let pages = self.source.pages();
        let mut sent = 0;
        let mut p = 0;
        while p < pages {
            if !bit(bitmap, p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while n < RUN && p + n < pages && bit(bitmap, p + n) {
                n += 1;
            }
            self.run(p, n)?;
            sent += n;
            p += n;
        }
        Ok(sent)
    }

    /// Pushes buffered frames to the socket.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.out.flush().map_err(ProtocolError::Io)
    }
}

/// True when page `p` is set in `bitmap`.
pub fn bit(bitmap: &[u64], p: u64) -> bool {
    bitmap
        .get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

/// Number of set pages.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Runs `f` and returns its result with the elapsed milliseconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}
