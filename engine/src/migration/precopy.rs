//! Sending pages before the switch-over: the full first pass, and rounds of
//! the pages KVM's dirty log says changed since.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ferry_page_server::pacer::Pacer;
use ferry_page_server::source::PageSource;
use ferry_protocol::{
    self as protocol, write_frame, MsgType, PageBitmap, ProtocolError, PAGE_SIZE,
};

use super::cancel::CancelGate;
use super::error::SourceError;
use super::options::check_cancel;

/// Pages per data frame.
const RUN: u64 = 256;
/// Pages per zero-run frame.
const ZERO_RUN: u64 = protocol::MAX_PAGES_PER_FRAME as u64;

/// Writes `Pages` frames on the control connection.
pub struct PageSender<'a> {
    out: BufWriter<&'a ferry_transport::Conn>,
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
    /// The bandwidth cap, if any.
    pub pacer: Option<Pacer>,
    /// Counts bytes written, for a progress display.
    pub bytes_progress: Option<&'a AtomicU64>,
    /// A cancel accepted here stops the sending at the next frame.
    pub cancel: Option<&'a CancelGate>,
}

impl<'a> PageSender<'a> {
    /// A sender over `conn`.
    pub fn new(
        conn: &'a ferry_transport::Conn,
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
            pacer: None,
            bytes_progress: None,
            cancel: None,
        }
    }

    fn frame(&mut self, payload: &[u8]) -> Result<(), ProtocolError> {
        write_frame(&mut self.out, MsgType::Pages, 0, payload)?;
        self.sent_bytes((protocol::HEADER_LEN + payload.len()) as u64);
        Ok(())
    }

    /// Counts bytes written (against the bandwidth cap too).
    fn sent_bytes(&mut self, n: u64) {
        self.bytes += n;
        if let Some(b) = self.bytes_progress {
            b.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(p) = self.pacer.as_mut() {
            p.sent(n);
        }
    }

    /// Before each frame: fails if the move was cancelled, and waits while
    /// over the bandwidth cap, looking for a cancel between naps, so that
    /// a small cap cannot keep a VM paused for the copy from a cancel.
    fn ready_to_send(&self) -> Result<(), SourceError> {
        loop {
            check_cancel(self.cancel)?;
            match &self.pacer {
                Some(p) if !p.pace() => {}
                _ => return Ok(()),
            }
        }
    }

    fn zero(&mut self, pfn: u64, count: u64) -> Result<(), SourceError> {
        let mut frame = Vec::with_capacity(protocol::HEADER_LEN + protocol::PAGES_PREFIX);
        let mut p = pfn;
        while p < pfn + count {
            self.ready_to_send()?;
            let n = (pfn + count - p).min(ZERO_RUN);
            frame.clear();
            protocol::append_zero_pages_frame(&mut frame, 0, p, n as u32);
            self.out.write_all(&frame).map_err(ProtocolError::Io)?;
            self.sent_bytes(frame.len() as u64);
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
    fn run(&mut self, pfn: u64, count: u64) -> Result<(), SourceError> {
        self.ready_to_send()?;
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
    pub fn send_all(&mut self) -> Result<u64, SourceError> {
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

    /// Sends the pages set in `bitmap`; returns how many.
    pub fn send_set(&mut self, bitmap: &PageBitmap) -> Result<u64, SourceError> {
        let mut sent = 0;
        for (p, n) in bitmap.runs(0, RUN) {
            self.run(p, n)?;
            sent += n;
        }
        Ok(sent)
    }

    /// Pushes buffered frames to the socket.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.out.flush().map_err(ProtocolError::Io)
    }
}

/// Runs `f` and returns its result with the elapsed milliseconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}
