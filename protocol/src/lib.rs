//! Ferry's migration wire format, whole: frames and their one decoder, the
//! handshake, page messages, the `State`/`Resumed` payloads, and the page
//! bitmap they carry. No other crate defines a frame layout.
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

pub mod bitmap;
mod decoder;
mod frame;
mod hello;
mod pages;
mod redirect;
mod state;

pub use bitmap::PageBitmap;
pub use decoder::{backed_buffer, read_frame, Frame, FrameDecoder, PartialFrame};
pub use frame::{write_frame, FrameHeader, MsgType};
pub use hello::{
    peer_timeout_ms, session_peer_timeout, Hello, HelloAck, MigratedDisk, MigrationMode, Role,
    MAX_DISK_BLOCKS, MAX_MIGRATED_DISKS, MIN_PEER_TIMEOUT, OPT_DISKS, OPT_MODE, OPT_PEER_TIMEOUT,
};
pub use pages::{
    append_pages_frame, append_pages_head, append_zero_pages_frame, choose_encoding, decode_pages,
    decode_pages_ref, encode_pages, lz4_room, pages_header, raw_pages_head, PageEncoding,
    PageRequest, PagesHeader, LZ4_PROBE,
};
pub use redirect::{Redirect, REDIRECT_LEN};
pub use state::{decode_state, encode_state, Resumed, RoundStats, StateMeta};

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
/// The protocol version this build speaks (2: the two-phase switch-over
/// `Ready`/`Commit`, heartbeats and session recovery).
pub const PROTOCOL_VERSION: u32 = 2;
/// Longest reason an `Abort` frame carries.
pub const MAX_ABORT_REASON: usize = 4096;

/// `why` as an `Abort` payload: UTF-8, cut at a character boundary to at
/// most [`MAX_ABORT_REASON`] bytes.
pub fn abort_reason(why: &str) -> &[u8] {
    let mut end = why.len().min(MAX_ABORT_REASON);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    &why.as_bytes()[..end]
}

/// Bytes of a `Hello` before its options.
pub(crate) const HELLO_FIXED: usize = 48;
/// Most bytes of options a `Hello` may carry.
pub(crate) const MAX_HELLO_OPTIONS: usize = 4096;

/// Feature bits negotiated in the handshake.
pub mod features {
    /// `Pages` frames may be LZ4-compressed.
    pub const LZ4: u64 = 1 << 0;
    /// Runs of zero pages are sent as markers without data.
    pub const ZERO_RUNS: u64 = 1 << 1;
    /// Reserved: an authentication exchange follows the handshake.
    pub const AUTH: u64 = 1 << 8;
    /// This connection resumes an existing session after a cut: its
    /// `Hello` names the session, and the `HelloAck` status says what the
    /// destination holds of it ([`super::ResumeStatus`]).
    pub const RESUME: u64 = 1 << 9;
    /// After a resume handshake the destination sends `RecvBitmap`.
    pub const RECV_BITMAP: u64 = 1 << 10;
    /// The source follows a `Redirect` answer to its control `Hello` (a
    /// `ferry-dest --daemon` sends each VM to a process of its own).
    pub const REDIRECT: u64 = 1 << 11;
    /// The two sides tell each other their peer timeouts (the source in
    /// `OPT_PEER_TIMEOUT`, the destination in the `HelloAck`) and both run
    /// the session with the shorter ([`super::session_peer_timeout`]).
    pub const PEER_TIMEOUT: u64 = 1 << 12;
    /// What this build implements.
    /// (`RESUME` is not negotiated: it marks a connection that resumes.)
    pub const SUPPORTED: u64 = LZ4 | ZERO_RUNS | RECV_BITMAP | REDIRECT | PEER_TIMEOUT;
}

/// What a destination holds of a session that a resuming source names,
/// as the `HelloAck` status of a resume handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ResumeStatus {
    /// A new session, accepted (not a resume).
    Accepted = 0,
    /// No such session here: it was never prepared, or it was discarded
    /// before any `Commit`. The destination will never run it.
    UnknownSession = 1,
    /// Restored and waiting for `Commit`; the VM has not run here.
    Prepared = 2,
    /// Committed and running; a lazy move continues (`RecvBitmap` follows).
    Running = 3,
    /// Every page arrived; `Complete` follows.
    Completed = 4,
}

impl ResumeStatus {
    /// Decodes a `HelloAck` status.
    pub fn from_u32(v: u32) -> Option<Self> {
        [
            Self::Accepted,
            Self::UnknownSession,
            Self::Prepared,
            Self::Running,
            Self::Completed,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
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
    use std::time::Duration;

    /// One page of xorshift noise: incompressible.
    fn random_page(mut x: u64) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

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
    fn migrated_disks_option() {
        let mut h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Control,
            session_id: 7,
            features: 0,
            mem_size: 1 << 30,
            vcpus: 1,
            page_size: 4096,
            options: vec![],
        };
        assert!(h.disks().unwrap().is_empty());
        let two = [
            MigratedDisk {
                slot: 0,
                blocks: 262_144,
            },
            MigratedDisk { slot: 2, blocks: 1 },
        ];
        h.options = vec![(OPT_DISKS, MigratedDisk::encode_option(&two))];
        let back = Hello::decode(&h.encode()).unwrap();
        assert_eq!(back.disks().unwrap(), two);
        let refused = |v: Vec<u8>| {
            let h = Hello {
                options: vec![(OPT_DISKS, v)],
                ..h.clone()
            };
            h.disks().unwrap_err().to_string()
        };
        let one =
            |slot: u32, blocks: u64| MigratedDisk::encode_option(&[MigratedDisk { slot, blocks }]);
        assert!(refused(vec![0; 11]).contains("11 bytes"));
        assert!(refused(one(0, 0)).contains("0 blocks"));
        assert!(refused(one(0, MAX_DISK_BLOCKS + 1)).contains("blocks"));
        assert!(refused([one(1, 5), one(1, 6)].concat()).contains("named twice"));
        let many: Vec<u8> = (0..=MAX_MIGRATED_DISKS as u32)
            .flat_map(|s| one(s, 1))
            .collect();
        assert!(refused(many).contains("at most"));
    }

    #[test]
    fn peer_timeouts_are_told_and_the_shorter_one_holds() {
        let mut h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Control,
            session_id: 7,
            features: features::SUPPORTED,
            mem_size: 1 << 30,
            vcpus: 1,
            page_size: 4096,
            options: Vec::new(),
        };
        assert_eq!(h.peer_timeout_ms().unwrap(), None);
        h.options
            .push((OPT_PEER_TIMEOUT, 300u32.to_le_bytes().to_vec()));
        let back = Hello::decode(&h.encode()).unwrap();
        assert_eq!(back.peer_timeout_ms().unwrap(), Some(300));
        h.options[0].1.pop();
        let e = h.peer_timeout_ms().unwrap_err().to_string();
        assert!(e.contains("peer timeout option of 3 bytes"), "{e}");

        // The HelloAck carries the destination's exactly when PEER_TIMEOUT
        // is among its features: 32 bytes, else 24 as before.
        let ack = HelloAck {
            version: PROTOCOL_VERSION,
            status: 0,
            features: features::SUPPORTED,
            session_id: 7,
            peer_timeout_ms: Some(5000),
        };
        assert_eq!(ack.encode().len(), 32);
        assert_eq!(HelloAck::decode(&ack.encode()).unwrap(), ack);
        let old = HelloAck {
            features: features::LZ4,
            peer_timeout_ms: None,
            ..ack
        };
        assert_eq!(old.encode().len(), 24);
        assert_eq!(HelloAck::decode(&old.encode()).unwrap(), old);
        let e = HelloAck::decode(&ack.encode()[..24])
            .unwrap_err()
            .to_string();
        assert!(e.contains("24 bytes with PEER_TIMEOUT (32)"), "{e}");
        let mut long = old.encode();
        long.extend_from_slice(&[0; 8]);
        let e = HelloAck::decode(&long).unwrap_err().to_string();
        assert!(e.contains("HelloAck of 32 bytes"), "{e}");
        assert!(HelloAck::decode(&[0; 23]).is_err());

        // Both sides reach the same value from the two they know.
        let ms = Duration::from_millis;
        let src = ms(300);
        let dst = Duration::from_secs(5);
        let at_src = session_peer_timeout(src, Some(peer_timeout_ms(dst)));
        let at_dst = session_peer_timeout(dst, Some(peer_timeout_ms(src)));
        assert_eq!((at_src, at_dst), (src, src));
        // A peer that says nothing leaves this side's own.
        assert_eq!(session_peer_timeout(dst, None), dst);
        // A peer cannot push it below the floor, nor past this side's own.
        assert_eq!(session_peer_timeout(dst, Some(0)), MIN_PEER_TIMEOUT);
        assert_eq!(session_peer_timeout(ms(50), Some(0)), ms(50));
        assert_eq!(session_peer_timeout(ms(300), Some(u32::MAX)), ms(300));
        assert_eq!(peer_timeout_ms(Duration::from_secs(u64::MAX)), u32::MAX);
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
        v2[8] = 99;
        let e = Hello::decode(&v2).unwrap_err().to_string();
        assert!(e.contains("version 99"), "{e}");
        let mut cut = h.encode();
        cut.pop();
        assert!(Hello::decode(&cut).is_err());
        assert!(
            Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n-----------------------").is_err()
        );
        // Options past the frame bound are refused, not turned into entries.
        let mut many = h.encode();
        many.truncate(HELLO_FIXED);
        many.resize(HELLO_FIXED + MAX_HELLO_OPTIONS + 4, 0);
        let e = Hello::decode(&many).unwrap_err().to_string();
        assert!(e.contains("bytes of Hello options"), "{e}");
        many.truncate(HELLO_FIXED + MAX_HELLO_OPTIONS);
        assert_eq!(Hello::decode(&many).unwrap().options.len(), 1024);
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

        let random = random_page(0x9e37_79b9_7f4a_7c15);
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
        let random = random_page(0x2545_f491_4f6c_dd1d);
        let mut scratch = Vec::new();
        for data in [&zero, &text, &random] {
            for (lz4, zero_runs) in [(true, true), (false, false), (true, false), (false, true)] {
                let mut out = Vec::new();
                append_pages_frame(&mut out, &mut scratch, 9, 5, data, lz4, zero_runs);
                let mut d = FrameDecoder::with_bytes(out);
                let f = d.next_frame().unwrap().unwrap();
                assert_eq!((f.header.kind, f.header.arg), (MsgType::Pages, 9));
                assert_eq!(f.payload, encode_pages(5, data, lz4, zero_runs));
                assert!(d.buffered().is_empty());
            }
        }
    }

    #[test]
    fn lz4_is_tried_on_a_large_body_only_when_its_start_shrinks() {
        let pages = 256; // 1 MiB: more than twice the probe
        let text: Vec<u8> = (0..pages * PAGE_SIZE).map(|i| (i % 7) as u8).collect();
        let random: Vec<u8> = (0..pages as u64)
            .flat_map(|i| random_page(0x9e37_79b9_7f4a_7c15 ^ i))
            .collect();
        let probe_pages = LZ4_PROBE / PAGE_SIZE;
        // Random at the start, text after: the probe says no, so the body
        // goes raw although LZ4 would have shrunk it as a whole.
        let mut late = random[..LZ4_PROBE].to_vec();
        late.extend_from_slice(&text[LZ4_PROBE..]);
        assert!(lz4_flex::block::compress(&late).len() < late.len() * 7 / 8);
        // Text at the start, random after: the probe says yes, the whole
        // does not shrink enough, so it goes raw too.
        let mut early = text[..LZ4_PROBE].to_vec();
        early.extend_from_slice(&random[LZ4_PROBE..]);
        let mut scratch = Vec::new();
        for (data, want) in [
            (&text, PageEncoding::Lz4),
            (&random, PageEncoding::Raw),
            (&late, PageEncoding::Raw),
            (&early, PageEncoding::Raw),
        ] {
            let (enc, body) = choose_encoding(data, &mut scratch, true, true);
            assert_eq!(enc, want, "{} pages", data.len() / PAGE_SIZE);
            let body = body.to_vec();
            let mut out = Vec::new();
            let p = encode_pages(3, data, true, true);
            assert_eq!(p[PAGES_PREFIX..], body[..], "encode_pages agrees");
            decode_pages(&p, 3 + pages as u64, &mut out).unwrap();
            assert_eq!(&out, data, "round trip");
        }
        // A small body is tried whole, whatever its start.
        let small = &late[LZ4_PROBE - PAGE_SIZE..LZ4_PROBE + (probe_pages - 1) * PAGE_SIZE];
        assert_eq!(
            choose_encoding(small, &mut scratch, true, true).0,
            PageEncoding::Lz4
        );
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
        let request = |pfn, count| {
            PageRequest::decode(
                &PageRequest {
                    pfn,
                    count,
                    vcpu: 0,
                }
                .encode(),
                10,
            )
        };
        assert!(request(u64::MAX, 2).is_err(), "past the end");
        assert!(request(3, 0).is_err(), "no pages");
        assert!(request(3, 8).is_err(), "one past the end");
        assert_eq!(request(3, 7).unwrap().count, 7);
    }
}
