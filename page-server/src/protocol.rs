//! Ferry's migration wire protocol: framing, handshake and page messages.
//!
//! See `docs/protocol.md` for the sequence diagram. Every message is a frame:
//!
//! ```text
//! 0       2       4               8                               16
//! +-------+-------+---------------+-------------------------------+----------+
//! | type  | flags | payload len   | arg (request id or sequence)  | payload  |
//! | u16   | u16   | u32           | u64                           | len bytes|
//! +-------+-------+---------------+-------------------------------+----------+
//! ```
//!
//! All integers are little-endian. A frame's length is checked against
//! [`MAX_PAYLOAD`] and the type's own bounds before any payload is read, and
//! every decoder returns a [`ProtocolError`] naming what was wrong; nothing
//! here panics on hostile input.

use std::io::{Read, Write};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Size of a guest page on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` frame (2 MiB).
pub const MAX_PAGES_PER_FRAME: u32 = 512;
/// Bytes before the page data in a `Pages` payload.
pub const PAGES_PREFIX: usize = 16;
/// Largest payload accepted: a full raw `Pages` frame, or a state blob.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Magic at the start of a `Hello`.
pub const HELLO_MAGIC: [u8; 8] = *b"FERRYMIG";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
const HELLO_FIXED: usize = 48;

/// Feature bits negotiated in the handshake.
pub mod features {
    /// `Pages` frames may be LZ4-compressed.
    pub const LZ4: u64 = 1 << 0;
    /// Runs of zero pages are sent as markers without data.
    pub const ZERO_RUNS: u64 = 1 << 1;
    /// Reserved: an authentication exchange follows the handshake.
    pub const AUTH: u64 = 1 << 8;
    /// Reserved: this connection resumes a session after a cut.
    pub const RESUME: u64 = 1 << 9;
    /// Reserved: the destination sends its received-pages bitmap.
    pub const RECV_BITMAP: u64 = 1 << 10;
    /// What this build implements.
    pub const SUPPORTED: u64 = LZ4 | ZERO_RUNS;
}

/// Why a frame or message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Transport failure.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// Unknown frame type.
    #[error("unknown frame type {0:#06x}")]
    UnknownType(u16),
    /// Payload length out of bounds for the type.
    #[error("{kind:?} frame with {len}-byte payload (allowed {min}..={max})")]
    Length {
        /// The frame type.
        kind: MsgType,
        /// Its payload length.
        len: usize,
        /// Least allowed.
        min: usize,
        /// Most allowed.
        max: usize,
    },
    /// A frame arrived that the protocol does not allow at this point.
    #[error("unexpected {got:?} frame, expected {expected}")]
    Unexpected {
        /// What arrived.
        got: MsgType,
        /// What was expected.
        expected: &'static str,
    },
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// A `Pages` frame is malformed.
    #[error("bad Pages frame: {0}")]
    BadPages(String),
    /// The peer aborted.
    #[error("peer aborted the migration: {0}")]
    Aborted(String),
    /// A JSON payload did not parse.
    #[error("bad {what} payload: {why}")]
    BadJson {
        /// Which message.
        what: &'static str,
        /// The parser's complaint.
        why: String,
    },
}

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// Source → destination, first frame on every connection.
    Hello = 0x01,
    /// Destination → source, answer to `Hello`.
    HelloAck = 0x02,
    /// Source → destination: migration metadata (JSON) + VM state blob.
    State = 0x10,
    /// Destination → source: the vCPUs run (JSON timing).
    Resumed = 0x11,
    /// Source → destination: a run of pages (push or demand answer).
    Pages = 0x20,
    /// Destination → source, fault connection: send these pages now.
    PageRequest = 0x21,
    /// Source → destination: every page has been pushed once (JSON stats).
    PushDone = 0x22,
    /// Source → destination, control, hybrid mode before `State`: a bitmap
    /// (little-endian u64 words, bit = page) of pages that changed after
    /// they were sent; the destination drops them and faults them in later.
    Discard = 0x23,
    /// Destination → source, control: a `Discard` whose `arg` was 1 has been
    /// applied (the source waits for it while the guest still runs).
    DiscardDone = 0x24,
    /// Destination → source: every page is present (JSON stats); the source
    /// may release the VM's memory.
    Complete = 0x30,
    /// Either way: give up, with a reason (UTF-8).
    Abort = 0x7f,
}

impl MsgType {
    fn from_u16(v: u16) -> Option<Self> {
        use MsgType::*;
        [
            Hello,
            HelloAck,
            State,
            Resumed,
            Pages,
            PageRequest,
            PushDone,
            Discard,
            DiscardDone,
            Complete,
            Abort,
        ]
        .into_iter()
        .find(|t| *t as u16 == v)
    }

    /// Payload bounds for this type.
    fn bounds(self) -> (usize, usize) {
        match self {
            MsgType::Hello => (HELLO_FIXED, HELLO_FIXED + 4096),
            MsgType::HelloAck => (24, 24),
            MsgType::Pages => (
                PAGES_PREFIX,
                PAGES_PREFIX + MAX_PAGES_PER_FRAME as usize * PAGE_SIZE,
            ),
            MsgType::PageRequest => (16, 16),
            MsgType::State | MsgType::Discard => (4, MAX_PAYLOAD),
            MsgType::Resumed | MsgType::PushDone | MsgType::Complete => (0, 1 << 20),
            MsgType::DiscardDone => (0, 0),
            MsgType::Abort => (0, 4096),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub kind: MsgType,
    /// Type-specific flags (none defined yet; must be 0).
    pub flags: u16,
    /// Payload length.
    pub len: u32,
    /// Request id for demand traffic, otherwise 0.
    pub arg: u64,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        h[2..4].copy_from_slice(&self.flags.to_le_bytes());
        h[4..8].copy_from_slice(&self.len.to_le_bytes());
        h[8..16].copy_from_slice(&self.arg.to_le_bytes());
        h
    }

    /// Decodes and bounds-checks a header.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let raw_kind = u16::from_le_bytes([h[0], h[1]]);
        let kind = MsgType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType(raw_kind))?;
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let (min, max) = kind.bounds();
        if (len as usize) < min || len as usize > max {
            return Err(ProtocolError::Length {
                kind,
                len: len as usize,
                min,
                max,
            });
        }
        let mut arg = [0u8; 8];
        arg.copy_from_slice(&h[8..16]);
        Ok(Self {
            kind,
            flags: u16::from_le_bytes([h[2], h[3]]),
            len,
            arg: u64::from_le_bytes(arg),
        })
    }
}

/// Writes one frame.
pub fn write_frame(
    w: &mut impl Write,
    kind: MsgType,
    arg: u64,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let h = FrameHeader {
        kind,
        flags: 0,
        len: payload.len() as u32,
        arg,
    };
    w.write_all(&h.encode())?;
    w.write_all(payload)?;
    Ok(())
}

/// Reads one frame into `buf` (resized to the payload); returns its header.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<FrameHeader, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        });
    }
    let hdr = FrameHeader::decode(&h)?;
    buf.resize(hdr.len as usize, 0);
    r.read_exact(buf)?;
    if hdr.kind == MsgType::Abort {
        return Err(ProtocolError::Aborted(
            String::from_utf8_lossy(buf).into_owned(),
        ));
    }
    Ok(hdr)
}

/// Hello option (critical): the migration mode, one byte ([`MigrationMode`]).
pub const OPT_MODE: u16 = 0x8001;

/// How the memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum MigrationMode {
    /// State first; pages on demand and by background push.
    Postcopy = 0,
    /// Pause, all pages, then state.
    StopAndCopy = 1,
    /// Pages while running, in rounds of dirty pages; pause; the rest; state.
    Precopy = 2,
    /// Some pre-copy rounds, then post-copy for the rest.
    Hybrid = 3,
}

impl MigrationMode {
    /// Decodes the `OPT_MODE` byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        [
            Self::Postcopy,
            Self::StopAndCopy,
            Self::Precopy,
            Self::Hybrid,
        ]
        .into_iter()
        .find(|m| *m as u8 == v)
    }

    /// The name used on the command line and in statistics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postcopy => "postcopy",
            Self::StopAndCopy => "stop-and-copy",
            Self::Precopy => "precopy",
            Self::Hybrid => "hybrid",
        }
    }

    /// True when the destination fetches pages after resuming.
    pub fn lazy(self) -> bool {
        matches!(self, Self::Postcopy | Self::Hybrid)
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Postcopy,
            Self::StopAndCopy,
            Self::Precopy,
            Self::Hybrid,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| {
            format!("unknown mode {s:?}: expected postcopy, stop-and-copy, precopy or hybrid")
        })
    }
}

/// Role of a connection within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// State, pushed pages, completion.
    Control = 0,
    /// Demand page requests and their answers only.
    Fault = 1,
}

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u32,
    /// What this connection is for.
    pub role: Role,
    /// Identifies the migration; the fault connection repeats the control
    /// connection's id.
    pub session_id: u64,
    /// Features the source wants ([`features`]).
    pub features: u64,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Page size (4096).
    pub page_size: u32,
    /// Extension options `(tag, value)`. Tag bit 15 marks an option the
    /// receiver must understand or refuse the session.
    pub options: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    /// The migration mode the source asks for (post-copy when absent).
    pub fn mode(&self) -> Result<MigrationMode, ProtocolError> {
        match self.options.iter().find(|(t, _)| *t == OPT_MODE) {
            None => Ok(MigrationMode::Postcopy),
            Some((_, v)) => v
                .first()
                .copied()
                .and_then(MigrationMode::from_u8)
                .filter(|_| v.len() == 1)
                .ok_or_else(|| ProtocolError::Handshake(format!("bad mode option {v:?}"))),
        }
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HELLO_FIXED);
        p.extend_from_slice(&HELLO_MAGIC);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&[self.role as u8, 0, 0, 0]);
        p.extend_from_slice(&self.session_id.to_le_bytes());
        p.extend_from_slice(&self.features.to_le_bytes());
        p.extend_from_slice(&self.mem_size.to_le_bytes());
        p.extend_from_slice(&self.vcpus.to_le_bytes());
        p.extend_from_slice(&self.page_size.to_le_bytes());
        for (tag, value) in &self.options {
            p.extend_from_slice(&tag.to_le_bytes());
            p.extend_from_slice(&(value.len() as u16).to_le_bytes());
            p.extend_from_slice(value);
        }
        p
    }

    /// Decodes a payload, refusing other magics and versions.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |s: String| ProtocolError::Handshake(s);
        if p.len() < HELLO_FIXED || p[0..8] != HELLO_MAGIC {
            return Err(bad("not a Ferry migration peer (bad Hello magic)".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != PROTOCOL_VERSION {
            return Err(bad(format!(
                "peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}"
            )));
        }
        let role = match p[12] {
            0 => Role::Control,
            1 => Role::Fault,
            r => return Err(bad(format!("unknown connection role {r}"))),
        };
        let mut options = Vec::new();
        let mut at = HELLO_FIXED;
        while at < p.len() {
            let hdr = p
                .get(at..at + 4)
                .ok_or_else(|| bad("truncated Hello option".into()))?;
            let tag = u16::from_le_bytes([hdr[0], hdr[1]]);
            let len = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
            let value = p
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| bad("truncated Hello option".into()))?;
            options.push((tag, value.to_vec()));
            at += 4 + len;
        }
        Ok(Self {
            version,
            role,
            session_id: u64_at(16),
            features: u64_at(24),
            mem_size: u64_at(32),
            vcpus: u32_at(40),
            page_size: u32_at(44),
            options,
        })
    }
}

/// The destination's answer to a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// Protocol version of the destination.
    pub version: u32,
    /// 0 = accepted; anything else is followed by an `Abort`.
    pub status: u32,
    /// Features both sides will use.
    pub features: u64,
    /// The session id being answered.
    pub session_id: u64,
}

impl HelloAck {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(24);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&self.status.to_le_bytes());
        p.extend_from_slice(&self.features.to_le_bytes());
        p.extend_from_slice(&self.session_id.to_le_bytes());
        p
    }

    /// Decodes a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        if p.len() != 24 {
            return Err(ProtocolError::Handshake(format!(
                "HelloAck of {} bytes",
                p.len()
            )));
        }
        let mut a8 = [0u8; 8];
        a8.copy_from_slice(&p[8..16]);
        let features = u64::from_le_bytes(a8);
        a8.copy_from_slice(&p[16..24]);
        Ok(Self {
            version: u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
            status: u32::from_le_bytes([p[4], p[5], p[6], p[7]]),
            features,
            session_id: u64::from_le_bytes(a8),
        })
    }
}

/// How the pages of a `Pages` frame are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageEncoding {
    /// `count * 4096` raw bytes.
    Raw = 0,
    /// An LZ4 block that decompresses to `count * 4096` bytes.
    Lz4 = 1,
    /// All `count` pages are zero; no data.
    Zero = 2,
}

/// The fixed prefix of a `Pages` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesHeader {
    /// First page frame number (memory-file page index).
    pub first_pfn: u64,
    /// Pages in the run.
    pub count: u32,
    /// Encoding of the data.
    pub encoding: PageEncoding,
}

/// Builds a `Pages` payload for `count` pages whose bytes are `data`
/// (`data.len() == count * 4096`). Zero runs become a marker when
/// `zero_runs`; LZ4 is used when `lz4` and it makes the frame smaller.
pub fn encode_pages(first_pfn: u64, data: &[u8], lz4: bool, zero_runs: bool) -> Vec<u8> {
    let count = (data.len() / PAGE_SIZE) as u32;
    let mut p = Vec::with_capacity(PAGES_PREFIX + data.len());
    p.extend_from_slice(&first_pfn.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    if zero_runs && is_zero(data) {
        p.extend_from_slice(&[PageEncoding::Zero as u8, 0, 0, 0]);
        return p;
    }
    if lz4 {
        let compressed = lz4_flex::block::compress(data);
        if compressed.len() < data.len() * 7 / 8 {
            p.extend_from_slice(&[PageEncoding::Lz4 as u8, 0, 0, 0]);
            p.extend_from_slice(&compressed);
            return p;
        }
    }
    p.extend_from_slice(&[PageEncoding::Raw as u8, 0, 0, 0]);
    p.extend_from_slice(data);
    p
}

/// Appends a whole `Pages` frame (header and payload) for the pages in
/// `data` to `out`, choosing the encoding exactly as [`encode_pages`] does but
/// without allocating a payload; `scratch` is reused for LZ4 output. Returns
/// the encoding used.
pub fn append_pages_frame(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    arg: u64,
    first_pfn: u64,
    data: &[u8],
    lz4: bool,
    zero_runs: bool,
) -> PageEncoding {
    let count = (data.len() / PAGE_SIZE) as u32;
    if zero_runs && is_zero(data) {
        append_zero_pages_frame(out, arg, first_pfn, count);
        return PageEncoding::Zero;
    }
    let (encoding, body) = if lz4 {
        scratch.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        match lz4_flex::block::compress_into(data, scratch) {
            Ok(n) if n < data.len() * 7 / 8 => (PageEncoding::Lz4, &scratch[..n]),
            _ => (PageEncoding::Raw, data),
        }
    } else {
        (PageEncoding::Raw, data)
    };
    append_pages_prefix(out, arg, first_pfn, count, encoding, body.len());
    out.extend_from_slice(body);
    encoding
}

/// Appends a `Pages` frame marking `count` pages from `first_pfn` as zero.
pub fn append_zero_pages_frame(out: &mut Vec<u8>, arg: u64, first_pfn: u64, count: u32) {
    append_pages_prefix(out, arg, first_pfn, count, PageEncoding::Zero, 0);
}

fn append_pages_prefix(
    out: &mut Vec<u8>,
    arg: u64,
    first_pfn: u64,
    count: u32,
    encoding: PageEncoding,
    body_len: usize,
) {
    let h = FrameHeader {
        kind: MsgType::Pages,
        flags: 0,
        len: (PAGES_PREFIX + body_len) as u32,
        arg,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&first_pfn.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&[encoding as u8, 0, 0, 0]);
}

/// Decodes a `Pages` payload. Page data (not for `Zero`) goes into `out`,
/// resized to `count * 4096`. `mem_pages` bounds the page numbers.
pub fn decode_pages(
    payload: &[u8],
    mem_pages: u64,
    out: &mut Vec<u8>,
) -> Result<PagesHeader, ProtocolError> {
    let bad = |s: String| ProtocolError::BadPages(s);
    if payload.len() < PAGES_PREFIX {
        return Err(bad(format!(
            "{} bytes is shorter than the prefix",
            payload.len()
        )));
    }
    let mut a8 = [0u8; 8];
    a8.copy_from_slice(&payload[0..8]);
    let first_pfn = u64::from_le_bytes(a8);
    let count = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(bad(format!("page count {count}")));
    }
    if first_pfn
        .checked_add(u64::from(count))
        .is_none_or(|end| end > mem_pages)
    {
        return Err(bad(format!(
            "pages {first_pfn}+{count} are outside the {mem_pages}-page guest"
        )));
    }
    let data = &payload[PAGES_PREFIX..];
    let size = count as usize * PAGE_SIZE;
    let encoding = match payload[12] {
        0 => {
            if data.len() != size {
                return Err(bad(format!("{} raw bytes for {count} pages", data.len())));
            }
            out.clear();
            out.extend_from_slice(data);
            PageEncoding::Raw
        }
        1 => {
            out.resize(size, 0);
            let n = lz4_flex::block::decompress_into(data, out)
                .map_err(|e| bad(format!("LZ4: {e}")))?;
            if n != size {
                return Err(bad(format!("LZ4 gave {n} bytes for {count} pages")));
            }
            PageEncoding::Lz4
        }
        2 => {
            if !data.is_empty() {
                return Err(bad("zero run with data".into()));
            }
            out.clear();
            PageEncoding::Zero
        }
        e => return Err(bad(format!("unknown encoding {e}"))),
    };
    Ok(PagesHeader {
        first_pfn,
        count,
        encoding,
    })
}

/// A demand request: `count` pages from `pfn`, faulted by `vcpu`
/// (`u32::MAX` when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// First page.
    pub pfn: u64,
    /// Pages wanted.
    pub count: u32,
    /// Faulting vCPU, for the source's statistics.
    pub vcpu: u32,
}

impl PageRequest {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[0..8].copy_from_slice(&self.pfn.to_le_bytes());
        p[8..12].copy_from_slice(&self.count.to_le_bytes());
        p[12..16].copy_from_slice(&self.vcpu.to_le_bytes());
        p
    }

    /// Decodes and bounds-checks a payload.
    pub fn decode(p: &[u8], mem_pages: u64) -> Result<Self, ProtocolError> {
        if p.len() != 16 {
            return Err(ProtocolError::BadPages(format!(
                "PageRequest of {} bytes",
                p.len()
            )));
        }
        let mut a8 = [0u8; 8];
        a8.copy_from_slice(&p[0..8]);
        let r = Self {
            pfn: u64::from_le_bytes(a8),
            count: u32::from_le_bytes([p[8], p[9], p[10], p[11]]),
            vcpu: u32::from_le_bytes([p[12], p[13], p[14], p[15]]),
        };
        if r.count == 0
            || r.count > MAX_PAGES_PER_FRAME
            || r.pfn
                .checked_add(u64::from(r.count))
                .is_none_or(|e| e > mem_pages)
        {
            return Err(ProtocolError::BadPages(format!(
                "request for pages {}+{} of a {mem_pages}-page guest",
                r.pfn, r.count
            )));
        }
        Ok(r)
    }
}

/// True when every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

/// Parses a JSON payload.
pub fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    p: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(p).map_err(|e| ProtocolError::BadJson {
        what,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_bounds() {
        let h = FrameHeader {
            kind: MsgType::PageRequest,
            flags: 0,
            len: 16,
            arg: 42,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[4] = 17;
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(ProtocolError::Length { .. })
        ));
        bad = h.encode();
        bad[0] = 0x55;
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(ProtocolError::UnknownType(0x55))
        ));
        let mut huge = FrameHeader {
            kind: MsgType::State,
            flags: 0,
            len: u32::MAX,
            arg: 0,
        }
        .encode();
        assert!(FrameHeader::decode(&huge).is_err());
        huge[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert!(FrameHeader::decode(&huge).is_ok());
    }

    #[test]
    fn hello_round_trip_and_refusals() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Fault,
            session_id: 7,
            features: features::SUPPORTED,
            mem_size: 1 << 30,
            vcpus: 2,
            page_size: 4096,
            options: vec![(0x8001, vec![1, 2, 3])],
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut v2 = h.encode();
        v2[8] = 2;
        let e = Hello::decode(&v2).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        let mut cut = h.encode();
        cut.pop();
        assert!(Hello::decode(&cut).is_err());
        assert!(
            Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n-----------------------").is_err()
        );
    }

    #[test]
    fn pages_encodings_round_trip() {
        let mut out = Vec::new();
        let zero = vec![0u8; 3 * PAGE_SIZE];
        let p = encode_pages(10, &zero, true, true);
        assert_eq!(p.len(), PAGES_PREFIX);
        let h = decode_pages(&p, 100, &mut out).unwrap();
        assert_eq!(
            (h.first_pfn, h.count, h.encoding),
            (10, 3, PageEncoding::Zero)
        );

        let text: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 7) as u8).collect();
        let p = encode_pages(0, &text, true, true);
        assert!(p.len() < text.len() / 4);
        assert_eq!(
            decode_pages(&p, 100, &mut out).unwrap().encoding,
            PageEncoding::Lz4
        );
        assert_eq!(out, text);

        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let p = encode_pages(99, &random, true, true);
        assert_eq!(
            decode_pages(&p, 100, &mut out).unwrap().encoding,
            PageEncoding::Raw
        );
        assert_eq!(out, random);
        assert!(
            decode_pages(&p, 99, &mut out).is_err(),
            "past the end of memory"
        );
    }

    #[test]
    fn appended_frames_match_encode_pages() {
        let zero = vec![0u8; 2 * PAGE_SIZE];
        let text: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 7) as u8).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut scratch = Vec::new();
        for data in [&zero, &text, &random] {
            for (lz4, zero_runs) in [(true, true), (false, false), (true, false), (false, true)] {
                let mut out = Vec::new();
                append_pages_frame(&mut out, &mut scratch, 9, 5, data, lz4, zero_runs);
                let mut r = &out[..];
                let mut payload = Vec::new();
                let h = read_frame(&mut r, &mut payload).unwrap();
                assert_eq!((h.kind, h.arg), (MsgType::Pages, 9));
                assert!(r.is_empty());
                assert_eq!(payload, encode_pages(5, data, lz4, zero_runs));
            }
        }
    }

    #[test]
    fn hostile_pages_and_requests_are_refused() {
        let mut out = Vec::new();
        let text: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 3) as u8).collect();
        let good = encode_pages(0, &text, true, false);
        for cut in 0..good.len() {
            let _ = decode_pages(&good[..cut], 10, &mut out);
        }
        let mut lie = good.clone();
        lie[8] = 2; // claims two pages
        assert!(decode_pages(&lie, 10, &mut out).is_err());
        let mut seed = 1u64;
        for _ in 0..2000 {
            let mut b = good.clone();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let at = (seed >> 33) as usize % b.len();
            b[at] = (seed >> 17) as u8;
            let _ = decode_pages(&b, 10, &mut out);
        }
        assert!(PageRequest::decode(
            &PageRequest {
                pfn: u64::MAX,
                count: 2,
                vcpu: 0
            }
            .encode(),
            10
        )
        .is_err());
        assert!(PageRequest::decode(
            &PageRequest {
                pfn: 3,
                count: 0,
                vcpu: 0
            }
            .encode(),
            10
        )
        .is_err());
        assert!(PageRequest::decode(
            &PageRequest {
                pfn: 3,
                count: 7,
                vcpu: 0
            }
            .encode(),
            10
        )
        .is_ok());
    }

    #[test]
    fn frames_over_a_stream() {
        let mut wire = Vec::new();
        write_frame(&mut wire, MsgType::PushDone, 0, b"{}").unwrap();
        write_frame(&mut wire, MsgType::Abort, 0, b"no room").unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        assert_eq!(
            read_frame(&mut r, &mut buf).unwrap().kind,
            MsgType::PushDone
        );
        let e = read_frame(&mut r, &mut buf).unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        assert!(matches!(
            read_frame(&mut r, &mut buf),
            Err(ProtocolError::Closed)
        ));
    }
}
