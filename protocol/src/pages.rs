//! Page messages: `Pages` (raw, LZ4 or a zero run) and `PageRequest`.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    is_zero, FrameHeader, MsgType, ProtocolError, HEADER_LEN, MAX_PAGES_PER_FRAME, PAGES_PREFIX,
    PAGE_SIZE,
};

/// The `Pages` prefix as it lies on the wire (16 bytes, little-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawPagesPrefix {
    first_pfn: U64,
    count: U32,
    encoding: u8,
    reserved: [u8; 3],
}

impl RawPagesPrefix {
    fn new(first_pfn: u64, count: u32, encoding: PageEncoding) -> Self {
        Self {
            first_pfn: U64::new(first_pfn),
            count: U32::new(count),
            encoding: encoding as u8,
            reserved: [0; 3],
        }
    }
}

/// A `PageRequest` payload as it lies on the wire (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawPageRequest {
    pfn: U64,
    count: U32,
    vcpu: U32,
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
    let mut scratch = Vec::new();
    let (encoding, body) = choose_encoding(data, &mut scratch, lz4, zero_runs);
    let mut p = Vec::with_capacity(PAGES_PREFIX + body.len());
    p.extend_from_slice(RawPagesPrefix::new(first_pfn, count, encoding).as_bytes());
    p.extend_from_slice(body);
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
    let (encoding, body) = choose_encoding(data, scratch, lz4, zero_runs);
    append_pages_head(out, arg, first_pfn, count, encoding, body.len());
    out.extend_from_slice(body);
    encoding
}

/// Bytes of scratch space LZ4 may need to compress `len` bytes.
pub fn lz4_room(len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(len)
}

/// Bytes of a larger body that LZ4 tries first (see [`choose_encoding`]).
pub const LZ4_PROBE: usize = 64 << 10;

/// True when LZ4 is worth trying on all of `data`: it is at most twice
/// [`LZ4_PROBE`], or its first `LZ4_PROBE` bytes shrink by at least 1/16.
/// A probe costs about a thirtieth of a full try on a 2 MiB body, which on
/// incompressible pages (a busy guest's) is pure loss: about 200 µs here.
fn lz4_probe_passes(data: &[u8], scratch: &mut Vec<u8>) -> bool {
    if data.len() <= 2 * LZ4_PROBE {
        return true;
    }
    let probe = &data[..LZ4_PROBE];
    scratch.resize(lz4_room(LZ4_PROBE), 0);
    lz4_flex::block::compress_into(probe, scratch).is_ok_and(|n| n <= LZ4_PROBE * 15 / 16)
}

/// How [`append_pages_frame`] sends `data`: a zero-run marker (when
/// `zero_runs` and it is all zero), LZ4 (when `lz4` and that takes at most
/// 7/8 of the bytes; compressed into `scratch`) or raw. A body of more than
/// twice [`LZ4_PROBE`] bytes is compressed whole only when its first
/// `LZ4_PROBE` bytes shrink by at least 1/16. Returns the encoding and the
/// frame's body: empty, a slice of `scratch`, or `data`.
pub fn choose_encoding<'a>(
    data: &'a [u8],
    scratch: &'a mut Vec<u8>,
    lz4: bool,
    zero_runs: bool,
) -> (PageEncoding, &'a [u8]) {
    if zero_runs && is_zero(data) {
        return (PageEncoding::Zero, &[]);
    }
    if lz4 && lz4_probe_passes(data, scratch) {
        scratch.resize(lz4_room(data.len()), 0);
        if let Ok(n) = lz4_flex::block::compress_into(data, scratch) {
            if n < data.len() * 7 / 8 {
                return (PageEncoding::Lz4, &scratch[..n]);
            }
        }
    }
    (PageEncoding::Raw, data)
}

/// Appends a `Pages` frame marking `count` pages from `first_pfn` as zero.
pub fn append_zero_pages_frame(out: &mut Vec<u8>, arg: u64, first_pfn: u64, count: u32) {
    append_pages_head(out, arg, first_pfn, count, PageEncoding::Zero, 0);
}

/// Appends the frame header and prefix of a `Pages` frame of `count` pages
/// from `first_pfn` in `encoding`, whose `body_len` bytes follow.
pub fn append_pages_head(
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
    out.extend_from_slice(RawPagesPrefix::new(first_pfn, count, encoding).as_bytes());
}

/// Decodes a `Pages` payload. Page data (not for `Zero`) goes into `out`,
/// resized to `count * 4096`. `mem_pages` bounds the page numbers.
pub fn decode_pages(
    payload: &[u8],
    mem_pages: u64,
    out: &mut Vec<u8>,
) -> Result<PagesHeader, ProtocolError> {
    let mut lz4 = std::mem::take(out);
    let h = decode_pages_ref(payload, mem_pages, &mut lz4)?.0;
    *out = lz4;
    match h.encoding {
        PageEncoding::Lz4 => {}
        PageEncoding::Zero => out.clear(),
        PageEncoding::Raw => {
            let data = &payload[PAGES_PREFIX..];
            out.clear();
            // Exactly the checked size: a reused buffer must not double
            // past the largest frame.
            out.reserve_exact(data.len());
            out.extend_from_slice(data);
        }
    }
    Ok(h)
}

/// Checks a `Pages` payload's prefix (page count, page numbers within
/// `mem_pages`, encoding) and returns it with the bytes after it; the data
/// itself is checked by [`decode_pages_ref`].
pub fn pages_header(payload: &[u8], mem_pages: u64) -> Result<(PagesHeader, &[u8]), ProtocolError> {
    let bad = |s: String| ProtocolError::BadPages(s);
    let Ok((prefix, data)) = RawPagesPrefix::ref_from_prefix(payload) else {
        return Err(bad(format!(
            "{} bytes is shorter than the prefix",
            payload.len()
        )));
    };
    let first_pfn = prefix.first_pfn.get();
    let count = prefix.count.get();
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
    let encoding = match prefix.encoding {
        0 => PageEncoding::Raw,
        1 => PageEncoding::Lz4,
        2 => PageEncoding::Zero,
        e => return Err(bad(format!("unknown encoding {e}"))),
    };
    Ok((
        PagesHeader {
            first_pfn,
            count,
            encoding,
        },
        data,
    ))
}

/// The header of a raw `Pages` frame of which only the head is at hand
/// (`head`: at least the 16-byte prefix; `payload_len`: the frame's whole
/// payload, from its frame header), for a reader that takes the pages'
/// bytes straight from the stream. Checked as [`decode_pages_ref`] checks
/// a whole frame: an error when it is not a raw frame of exactly its
/// pages' size inside `mem_pages`.
pub fn raw_pages_head(
    head: &[u8],
    payload_len: usize,
    mem_pages: u64,
) -> Result<PagesHeader, ProtocolError> {
    let prefix = head.get(..PAGES_PREFIX).ok_or_else(|| {
        ProtocolError::BadPages(format!("{} bytes is shorter than the prefix", head.len()))
    })?;
    let (h, _) = pages_header(prefix, mem_pages)?;
    let size = h.count as usize * PAGE_SIZE;
    if h.encoding != PageEncoding::Raw || payload_len != PAGES_PREFIX + size {
        return Err(ProtocolError::BadPages(format!(
            "{:?} frame of {payload_len} bytes for {} pages, not raw pages",
            h.encoding, h.count
        )));
    }
    Ok(h)
}

/// Decodes a `Pages` payload without copying raw page data: returns the
/// header and the pages' bytes, a slice of `payload` for raw frames, of
/// `lz4` (decompressed into it) for LZ4 ones, and empty for zero runs.
/// `mem_pages` bounds the page numbers.
pub fn decode_pages_ref<'a>(
    payload: &'a [u8],
    mem_pages: u64,
    lz4: &'a mut Vec<u8>,
) -> Result<(PagesHeader, &'a [u8]), ProtocolError> {
    let bad = |s: String| ProtocolError::BadPages(s);
    let (h, data) = pages_header(payload, mem_pages)?;
    let count = h.count;
    let size = count as usize * PAGE_SIZE;
    let pages: &'a [u8] = match h.encoding {
        PageEncoding::Raw => {
            if data.len() != size {
                return Err(bad(format!("{} raw bytes for {count} pages", data.len())));
            }
            data
        }
        PageEncoding::Lz4 => {
            lz4.reserve_exact(size.saturating_sub(lz4.len()));
            lz4.resize(size, 0);
            let n = lz4_flex::block::decompress_into(data, lz4)
                .map_err(|e| bad(format!("LZ4: {e}")))?;
            if n != size {
                return Err(bad(format!("LZ4 gave {n} bytes for {count} pages")));
            }
            &lz4[..]
        }
        PageEncoding::Zero => {
            if !data.is_empty() {
                return Err(bad("zero run with data".into()));
            }
            &[][..]
        }
    };
    Ok((h, pages))
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
        let raw = RawPageRequest {
            pfn: U64::new(self.pfn),
            count: U32::new(self.count),
            vcpu: U32::new(self.vcpu),
        };
        let mut p = [0u8; 16];
        p.copy_from_slice(raw.as_bytes());
        p
    }

    /// The whole `PageRequest` frame, header included, with `arg` as its
    /// request id.
    pub fn frame(&self, arg: u64) -> [u8; HEADER_LEN + 16] {
        let h = FrameHeader {
            kind: MsgType::PageRequest,
            flags: 0,
            len: 16,
            arg,
        };
        let mut f = [0u8; HEADER_LEN + 16];
        f[..HEADER_LEN].copy_from_slice(&h.encode());
        f[HEADER_LEN..].copy_from_slice(&self.encode());
        f
    }

    /// Decodes and bounds-checks a payload.
    pub fn decode(p: &[u8], mem_pages: u64) -> Result<Self, ProtocolError> {
        let Ok(raw) = RawPageRequest::ref_from_bytes(p) else {
            return Err(ProtocolError::BadPages(format!(
                "PageRequest of {} bytes",
                p.len()
            )));
        };
        let r = Self {
            pfn: raw.pfn.get(),
            count: raw.count.get(),
            vcpu: raw.vcpu.get(),
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
