//! Frames: the fixed header, its per-type length bounds, and blocking
//! read/write helpers.

use std::io::Write;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    ProtocolError, HEADER_LEN, HELLO_FIXED, MAX_HELLO_OPTIONS, MAX_PAGES_PER_FRAME, MAX_PAYLOAD,
    PAGES_PREFIX, PAGE_SIZE, REDIRECT_LEN,
};

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// Source → destination, first frame on every connection.
    Hello = 0x01,
    /// Destination → source, answer to `Hello`.
    HelloAck = 0x02,
    /// Destination (a `--daemon`) → source, answer to a control `Hello`:
    /// take the session to this port on the same host ([`crate::Redirect`]).
    Redirect = 0x03,
    /// Source → destination: migration metadata (JSON) + VM state blob.
    State = 0x10,
    /// Destination → source: the vCPUs run (JSON timing), after `Commit`.
    Resumed = 0x11,
    /// Destination → source: the state is restored, the vCPUs are ready
    /// but do not run until `Commit` (JSON timing).
    Ready = 0x12,
    /// Source → destination: the switch-over is decided; from the moment
    /// the source writes it, it never runs its own copy again.
    Commit = 0x13,
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
    /// Destination → source, control, after a recovery handshake: the pages
    /// it already holds (a [`crate::PageBitmap`] as little-endian words).
    RecvBitmap = 0x25,
    /// Destination → source: every page is present (JSON stats); the source
    /// may release the VM's memory.
    Complete = 0x30,
    /// Either way, control: "still here" when nothing else was sent for a
    /// while; a side that hears nothing for its peer timeout deems the link
    /// dead.
    Ping = 0x40,
    /// Either way: give up, with a reason (UTF-8).
    Abort = 0x7f,
}

impl MsgType {
    fn from_u16(v: u16) -> Option<Self> {
        use MsgType::*;
        [
            Hello,
            HelloAck,
            Redirect,
            State,
            Resumed,
            Ready,
            Commit,
            Pages,
            PageRequest,
            PushDone,
            Discard,
            DiscardDone,
            RecvBitmap,
            Complete,
            Ping,
            Abort,
        ]
        .into_iter()
        .find(|t| *t as u16 == v)
    }

    /// Payload bounds for this type.
    fn bounds(self) -> (usize, usize) {
        match self {
            MsgType::Hello => (HELLO_FIXED, HELLO_FIXED + MAX_HELLO_OPTIONS),
            MsgType::HelloAck => (24, 32),
            MsgType::Redirect => (REDIRECT_LEN, REDIRECT_LEN),
            MsgType::Pages => (
                PAGES_PREFIX,
                PAGES_PREFIX + MAX_PAGES_PER_FRAME as usize * PAGE_SIZE,
            ),
            MsgType::PageRequest => (16, 16),
            MsgType::State | MsgType::Discard | MsgType::RecvBitmap => (4, MAX_PAYLOAD),
            MsgType::Resumed | MsgType::Ready | MsgType::PushDone | MsgType::Complete => {
                (0, 1 << 20)
            }
            MsgType::DiscardDone | MsgType::Commit | MsgType::Ping => (0, 0),
            MsgType::Abort => (0, crate::MAX_ABORT_REASON),
        }
    }
}

/// The header as it lies on the wire: 16 bytes, little-endian, no padding.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    kind: U16,
    flags: U16,
    len: U32,
    arg: U64,
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
        let raw = RawHeader {
            kind: U16::new(self.kind as u16),
            flags: U16::new(self.flags),
            len: U32::new(self.len),
            arg: U64::new(self.arg),
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(raw.as_bytes());
        h
    }

    /// Decodes and bounds-checks a header.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        // A 16-byte array always holds a RawHeader (unaligned, any bits).
        let raw = RawHeader::read_from_bytes(h).map_err(|_| ProtocolError::Closed)?;
        let raw_kind = raw.kind.get();
        let kind = MsgType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType(raw_kind))?;
        let len = raw.len.get();
        let (min, max) = kind.bounds();
        if (len as usize) < min || len as usize > max {
            return Err(ProtocolError::Length {
                kind,
                len: len as usize,
                min,
                max,
            });
        }
        Ok(Self {
            kind,
            flags: raw.flags.get(),
            len,
            arg: raw.arg.get(),
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
