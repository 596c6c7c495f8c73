//! The one incremental frame decoder: bytes in, whole frames out.
//!
//! Every reader of Ferry frames uses it: the page server's non-blocking
//! connections, the destination's control-connection thread and its fault
//! thread. Bytes are appended as they arrive ([`FrameDecoder::read_from`] or
//! [`FrameDecoder::extend`]); [`FrameDecoder::next_frame`] hands out each
//! complete frame, its header checked by [`FrameHeader::decode`] before the
//! payload is awaited, so a hostile length never makes it buffer more than
//! the type allows.

use std::io::{ErrorKind, Read};

use crate::{FrameHeader, MsgType, ProtocolError, HEADER_LEN};

/// Bytes asked of the socket per read when no larger frame is pending.
const READ_CHUNK: usize = 256 << 10;
/// A pending frame missing at least this many bytes is read to its end and
/// no further.
const EXACT_READ: usize = 64 << 10;

/// Buffers a byte stream and splits it into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Storage; the bytes received and not yet handed out are
    /// `buf[start..end]`. It only grows, so a read never zeroes it again
    /// (zeroing 256 KiB per read once cost a fault thread that polls its
    /// socket in a loop half its CPU).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload length of the frame whose header is at `start`, once known.
    want: Option<usize>,
    /// Where the last frame handed out starts, and its header.
    last: Option<(usize, FrameHeader)>,
    /// With no frame pending, read only this many payload bytes past the
    /// next header (see [`FrameDecoder::set_head_reads`]).
    head_reads: Option<usize>,
}

/// A frame at the front of the buffer of which only a part is buffered:
/// its header, at least the head of its payload asked for, and how much
/// of it is still in the stream (see [`FrameDecoder::partial_frame`]).
#[derive(Debug)]
pub struct PartialFrame<'a> {
    /// Its checked header.
    pub header: FrameHeader,
    /// The first bytes of its payload: all that is buffered of it.
    pub buffered: &'a [u8],
    /// Payload bytes not yet read from the stream.
    pub rest: usize,
}

/// One complete frame, borrowed from the decoder.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Its checked header.
    pub header: FrameHeader,
    /// Exactly `header.len` bytes.
    pub payload: &'a [u8],
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that starts with bytes already read from the stream.
    pub fn with_bytes(bytes: Vec<u8>) -> Self {
        Self {
            end: bytes.len(),
            buf: bytes,
            start: 0,
            want: None,
            last: None,
            head_reads: None,
        }
    }

    /// Makes room for frames of up to `n` bytes and writes that storage
    /// now, so its memory is backed before the frames arrive: the first
    /// write to fresh memory costs a page fault per 4 KiB (here about
    /// 1 ms per 2 MiB, and far more on a host that has handed recently
    /// freed memory back to its own hypervisor). Call it off the critical
    /// path, for example before the switch-over.
    pub fn reserve_backed(&mut self, n: usize) {
        self.compact();
        self.reserve(n);
        write_every_byte(&mut self.buf[self.end..]);
    }

    /// Like [`FrameDecoder::reserve_backed`], with storage made and
    /// written ahead (when a process starts, say): the bytes buffered now
    /// move to the front of `room`, which becomes the storage, when it can
    /// hold them and `n` more; otherwise this is `reserve_backed(n)`.
    pub fn reserve_backed_from(&mut self, mut room: Vec<u8>, n: usize) {
        let pending = self.end - self.start;
        if room.len() < pending + n {
            self.reserve_backed(n);
            return;
        }
        room[..pending].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = room;
        self.start = 0;
        self.end = pending;
        self.last = None;
    }

    /// Bytes received but not yet handed out as frames.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The bytes not yet handed out, for whoever reads the stream next.
    pub fn into_buffered(mut self) -> Vec<u8> {
        self.buf.truncate(self.end);
        self.buf.drain(..self.start);
        self.buf
    }

    /// Bytes still to come before the frame whose header is buffered is
    /// whole; 0 when no header is buffered or the frame is complete (a
    /// header that does not decode counts as complete: reading it reports
    /// the error).
    pub fn missing(&self) -> usize {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return 0;
        };
        FrameHeader::decode(head).map_or(0, |h| {
            (HEADER_LEN + h.len as usize).saturating_sub(avail.len())
        })
    }

    /// Appends bytes that arrived.
    pub fn extend(&mut self, data: &[u8]) {
        self.compact();
        self.reserve(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Makes room for `n` more bytes after `end`, zeroing only storage
    /// that never existed before.
    fn reserve(&mut self, n: usize) {
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
    }

    /// Reads once from `r` into the buffer; returns the byte count (0 at
    /// end of stream). `WouldBlock` and `Interrupted` come back as errors
    /// for the caller's loop to handle.
    pub fn read_from(&mut self, r: &mut impl Read) -> std::io::Result<usize> {
        self.compact();
        let pending = self.end - self.start;
        let need = self.want.map_or(0, |w| HEADER_LEN + w);
        // The rest of a large frame is read exactly, so that the frame
        // ends its storage (see `take_last_frame`); small ones share reads.
        let rest = need.saturating_sub(pending);
        let room = match self.head_reads {
            // Only the next header and the head of its payload, so that
            // the caller can read the rest of a large frame itself.
            Some(head) if pending < HEADER_LEN + head => HEADER_LEN + head - pending,
            _ if rest >= EXACT_READ => rest,
            _ => READ_CHUNK,
        };
        self.reserve(room);
        let got = r.read(&mut self.buf[self.end..self.end + room]);
        self.end += *got.as_ref().unwrap_or(&0);
        got
    }

    /// The next complete frame, if one is buffered. An `Abort` frame comes
    /// back as [`ProtocolError::Aborted`] with its reason.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ProtocolError> {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head)?;
        let end = HEADER_LEN + header.len as usize;
        if avail.len() < end {
            self.want = Some(header.len as usize);
            return Ok(None);
        }
        self.want = None;
        let at = self.start;
        self.start += end;
        self.last = Some((at, header));
        let payload = &self.buf[at + HEADER_LEN..at + end];
        if header.kind == MsgType::Abort {
            return Err(ProtocolError::Aborted(
                String::from_utf8_lossy(payload).into_owned(),
            ));
        }
        Ok(Some(Frame { header, payload }))
    }

    /// The frame that [`FrameDecoder::next_frame`] or
    /// [`FrameDecoder::recv`] handed out last, again (until more is read).
    pub fn last_frame(&self) -> Option<Frame<'_>> {
        let (at, header) = self.last?;
        Some(Frame {
            header,
            payload: &self.buf[at + HEADER_LEN..at + HEADER_LEN + header.len as usize],
        })
    }

    /// Hands out the storage that holds the last frame handed out (as
    /// [`FrameDecoder::last_frame`] would), with the range of its payload
    /// in it, so the payload can go elsewhere (another thread) without a
    /// copy. `room` becomes the storage; the bytes buffered after the frame
    /// move to its front (none, usually: a large frame is read to its end
    /// and no further). `None`, and `room` unused, when there is no such
    /// frame.
    pub fn take_last_frame(
        &mut self,
        mut room: Vec<u8>,
    ) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
        let (at, header) = self.last?;
        let payload = at + HEADER_LEN..at + HEADER_LEN + header.len as usize;
        let rest = self.end - self.start;
        if room.len() < rest {
            room.resize(rest, 0);
        }
        room[..rest].copy_from_slice(&self.buf[self.start..self.end]);
        let storage = std::mem::replace(&mut self.buf, room);
        self.start = 0;
        self.end = rest;
        self.last = None;
        Some((storage, payload))
    }

    /// Blocks on `r` until a whole frame is buffered and returns it. End of
    /// stream is [`ProtocolError::Closed`]; a read timeout is an I/O error.
    pub fn recv(&mut self, r: &mut impl Read) -> Result<Frame<'_>, ProtocolError> {
        loop {
            // Two steps so the borrow of a returned frame ends before a read.
            if self.has_frame()? {
                return self
                    .next_frame()?
                    .ok_or(ProtocolError::Io(ErrorKind::UnexpectedEof.into()));
            }
            match self.read_from(r) {
                Ok(0) => return Err(ProtocolError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Makes reads stop after the next frame's header and `head` bytes
    /// of its payload while those are not all here (`None`: read as much as
    /// there is room for). For a reader that takes the rest of large
    /// frames straight from the stream ([`FrameDecoder::recv_or_partial`]):
    /// what the decoder reads of such a frame's body is copied once more.
    pub fn set_head_reads(&mut self, head: Option<usize>) {
        self.head_reads = head;
    }

    /// The frame at the front when its header and at least `head` bytes of
    /// its payload are buffered, but not the whole frame.
    pub fn partial_frame(&self, head: usize) -> Option<PartialFrame<'_>> {
        let avail = &self.buf[self.start..self.end];
        let header = FrameHeader::decode(avail.first_chunk::<HEADER_LEN>()?).ok()?;
        let len = header.len as usize;
        let have = avail.len() - HEADER_LEN;
        (have >= head.min(len) && have < len).then(|| PartialFrame {
            header,
            buffered: &avail[HEADER_LEN..],
            rest: len - have,
        })
    }

    /// Drops the partial frame at the front (see
    /// [`FrameDecoder::partial_frame`]): the caller has taken what was
    /// buffered of it and reads its `rest` bytes from the stream itself;
    /// the next frame starts after them.
    pub fn skip_partial(&mut self) {
        self.start = 0;
        self.end = 0;
        self.want = None;
        self.last = None;
    }

    /// Blocks on `r` until a whole frame is buffered (`Ok(false)`: take it
    /// with [`FrameDecoder::next_frame`]) or a partial one whose header and
    /// first `head` payload bytes `take` accepts (`Ok(true)`: see
    /// [`FrameDecoder::partial_frame`]). End of stream is
    /// [`ProtocolError::Closed`].
    pub fn recv_or_partial(
        &mut self,
        r: &mut impl Read,
        head: usize,
        take: impl Fn(&PartialFrame<'_>) -> bool,
    ) -> Result<bool, ProtocolError> {
        loop {
            if self.has_frame()? {
                return Ok(false);
            }
            if self.partial_frame(head).is_some_and(|p| take(&p)) {
                return Ok(true);
            }
            match self.read_from(r) {
                Ok(0) => return Err(ProtocolError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// True when a whole frame is buffered (its header is checked).
    fn has_frame(&mut self) -> Result<bool, ProtocolError> {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(false);
        };
        let header = FrameHeader::decode(head)?;
        let whole = avail.len() >= HEADER_LEN + header.len as usize;
        // The next read may ask for the rest of the frame at once.
        self.want = (!whole).then_some(header.len as usize);
        Ok(whole)
    }

    /// Drops consumed bytes when that is cheap or needed.
    fn compact(&mut self) {
        self.last = None;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > READ_CHUNK && self.start * 2 > self.end {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

/// `n` bytes of storage whose memory is backed now (every byte written),
/// for a buffer on a latency-critical path: see
/// [`FrameDecoder::reserve_backed`]. The contents are unspecified.
pub fn backed_buffer(n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    write_every_byte(&mut v);
    v
}

/// Writes `buf` with a non-zero byte: zeroing a fresh allocation may be
/// turned into `calloc` by the compiler, which hands out untouched pages.
fn write_every_byte(buf: &mut [u8]) {
    buf.fill(0xA5);
}

/// Reads exactly one frame from a blocking stream that carries nothing
/// else the caller wants buffered (tests, benches and one-shot clients): its
/// payload goes into `buf`. The bytes are parsed by [`FrameDecoder`]; end of
/// stream before a header is [`ProtocolError::Closed`].
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<FrameHeader, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut head) {
        return Err(if e.kind() == ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        });
    }
    let len = FrameHeader::decode(&head)?.len as usize;
    let mut bytes = Vec::with_capacity(HEADER_LEN + len);
    bytes.extend_from_slice(&head);
    bytes.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut bytes[HEADER_LEN..])?;
    let mut d = FrameDecoder::with_bytes(bytes);
    let f = d
        .next_frame()?
        .ok_or(ProtocolError::Io(ErrorKind::UnexpectedEof.into()))?;
    buf.clear();
    buf.extend_from_slice(f.payload);
    Ok(f.header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write_frame;

    fn two_frames() -> Vec<u8> {
        let mut wire = Vec::new();
        write_frame(&mut wire, MsgType::PushDone, 7, b"{\"a\":1}").unwrap();
        write_frame(&mut wire, MsgType::Complete, 0, b"{}").unwrap();
        wire
    }

    #[test]
    fn frames_come_out_whole_whatever_the_split() {
        let wire = two_frames();
        for split in 0..=wire.len() {
            let mut d = FrameDecoder::new();
            d.extend(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push((f.header.kind, f.header.arg, f.payload.to_vec()));
            }
            d.extend(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push((f.header.kind, f.header.arg, f.payload.to_vec()));
            }
            assert_eq!(
                got,
                vec![
                    (MsgType::PushDone, 7, b"{\"a\":1}".to_vec()),
                    (MsgType::Complete, 0, b"{}".to_vec())
                ],
                "split at {split}"
            );
            assert!(d.buffered().is_empty());
        }
    }

    #[test]
    fn storage_made_ahead_keeps_the_bytes_already_buffered() {
        let wire = two_frames();
        let split = 5; // part of the first header
        let mut d = FrameDecoder::with_bytes(wire[..split].to_vec());
        let room = vec![0xA5; 1 << 16];
        let at = room.as_ptr();
        d.reserve_backed_from(room, 4096);
        assert_eq!(d.buf.as_ptr(), at, "the storage made ahead is used");
        assert_eq!(d.buffered(), &wire[..split]);
        let mut r = &wire[split..];
        assert_eq!(d.recv(&mut r).unwrap().header.kind, MsgType::PushDone);
        assert_eq!(d.recv(&mut r).unwrap().header.kind, MsgType::Complete);
        // Too small for what is asked: it makes its own, bytes kept too.
        let mut d = FrameDecoder::with_bytes(wire.clone());
        d.reserve_backed_from(vec![0; 8], 4096);
        assert!(d.buf.len() >= wire.len() + 4096);
        assert_eq!(d.next_frame().unwrap().unwrap().header.arg, 7);
    }

    /// A reader that hands out at most `step` bytes per read and counts
    /// what it was asked for.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        asked: Vec<usize>,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.asked.push(buf.len());
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_frame_taken_with_its_storage_leaves_the_stream_whole() {
        let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        for arg in 0..3 {
            write_frame(&mut wire, MsgType::Pages, arg, &big).unwrap();
            write_frame(&mut wire, MsgType::Ping, 0, b"").unwrap();
        }
        write_frame(&mut wire, MsgType::PushDone, 9, b"{}").unwrap();
        for step in [100_000, usize::MAX] {
            let mut r = Trickle {
                data: &wire,
                step,
                asked: Vec::new(),
            };
            let mut d = FrameDecoder::new();
            let mut spare = Vec::new();
            for arg in 0..3 {
                let f = d.recv(&mut r).unwrap();
                assert_eq!((f.header.kind, f.header.arg), (MsgType::Pages, arg));
                let (storage, range) = d.take_last_frame(spare).unwrap();
                assert!(storage[range] == big[..], "step {step}: payload {arg}");
                assert!(d.last_frame().is_none());
                assert!(d.take_last_frame(Vec::new()).is_none());
                spare = storage; // reused as storage for a later frame
                assert_eq!(d.recv(&mut r).unwrap().header.kind, MsgType::Ping);
            }
            assert_eq!(d.recv(&mut r).unwrap().header.arg, 9);
            // A large frame's rest was asked for exactly.
            let rest = HEADER_LEN + big.len() - step.min(READ_CHUNK);
            assert!(r.asked.contains(&rest), "step {step}: asked {:?}", r.asked);
        }
    }

    #[test]
    fn a_large_frame_left_in_the_stream_is_read_by_the_caller() {
        let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        write_frame(&mut wire, MsgType::PushDone, 1, b"{}").unwrap();
        for arg in 0..2 {
            write_frame(&mut wire, MsgType::Pages, arg, &big).unwrap();
            write_frame(&mut wire, MsgType::Ping, 0, b"").unwrap();
        }
        write_frame(&mut wire, MsgType::PushDone, 9, b"{}").unwrap();
        let head = 16;
        for step in [7, 100_000, usize::MAX] {
            let mut r = Trickle {
                data: &wire,
                step,
                asked: Vec::new(),
            };
            let mut d = FrameDecoder::new();
            d.set_head_reads(Some(head));
            let big_pages = |p: &PartialFrame<'_>| p.header.kind == MsgType::Pages;
            // A small frame comes out whole.
            assert!(!d.recv_or_partial(&mut r, head, big_pages).unwrap());
            assert_eq!(d.next_frame().unwrap().unwrap().header.arg, 1);
            for arg in 0..2 {
                assert!(d.recv_or_partial(&mut r, head, big_pages).unwrap());
                let p = d.partial_frame(head).unwrap();
                assert_eq!((p.header.kind, p.header.arg), (MsgType::Pages, arg));
                // Head reads: nothing past the head was read.
                assert_eq!(p.buffered.len(), head, "step {step}");
                let mut got = p.buffered.to_vec();
                let rest = p.rest;
                assert_eq!(got.len() + rest, big.len());
                d.skip_partial();
                assert!(d.partial_frame(head).is_none());
                let mut tail = vec![0; rest];
                std::io::Read::read_exact(&mut r, &mut tail).unwrap();
                got.extend_from_slice(&tail);
                assert!(got == big, "step {step}: payload {arg}");
                // The frame after it is whole (a Ping is never split).
                assert!(!d.recv_or_partial(&mut r, head, |_| true).unwrap());
                assert_eq!(d.next_frame().unwrap().unwrap().header.kind, MsgType::Ping);
            }
            // Frames not taken come out whole, read as before.
            assert!(!d.recv_or_partial(&mut r, head, |_| false).unwrap());
            assert_eq!(d.next_frame().unwrap().unwrap().header.arg, 9);
            assert!(matches!(
                d.recv_or_partial(&mut r, head, |_| true),
                Err(ProtocolError::Closed)
            ));
        }
    }

    #[test]
    fn recv_reads_a_stream_and_reports_its_end() {
        let wire = two_frames();
        let mut r = &wire[..];
        let mut d = FrameDecoder::new();
        assert_eq!(d.recv(&mut r).unwrap().header.kind, MsgType::PushDone);
        assert_eq!(d.recv(&mut r).unwrap().payload, b"{}");
        assert!(matches!(d.recv(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn abort_and_bad_headers_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, MsgType::Abort, 0, b"no room").unwrap();
        let mut d = FrameDecoder::with_bytes(wire);
        let e = d.next_frame().unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        let mut d = FrameDecoder::with_bytes(vec![0x55; 16]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::UnknownType(0x5555))
        ));
    }

    #[test]
    fn missing_counts_the_rest_of_the_frame_under_way() {
        let wire = two_frames();
        let first = HEADER_LEN + 7;
        let mut d = FrameDecoder::new();
        assert_eq!(d.missing(), 0);
        d.extend(&wire[..HEADER_LEN - 1]);
        assert_eq!(d.missing(), 0, "no whole header yet");
        d.extend(&wire[HEADER_LEN - 1..HEADER_LEN + 3]);
        assert_eq!(d.missing(), first - (HEADER_LEN + 3));
        d.extend(&wire[HEADER_LEN + 3..first + 1]);
        assert_eq!(d.missing(), 0, "the first frame is whole");
        assert!(d.next_frame().unwrap().is_some());
        assert_eq!(d.missing(), 0, "one byte of the next header only");
        d.extend(&wire[first + 1..first + HEADER_LEN]);
        assert_eq!(d.missing(), 2, "the second frame's payload is 2 bytes");
    }

    #[test]
    fn leftover_bytes_are_handed_on() {
        let wire = two_frames();
        let mut d = FrameDecoder::with_bytes(wire.clone());
        let first_len = {
            let f = d.next_frame().unwrap().unwrap();
            HEADER_LEN + f.payload.len()
        };
        assert_eq!(d.into_buffered(), wire[first_len..].to_vec());
    }
}
