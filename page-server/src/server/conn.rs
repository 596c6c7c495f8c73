//! One non-blocking connection of the page server, with its buffers.

use std::io::{self, Write};

use ferry_protocol::{FrameDecoder, FrameHeader, ProtocolError};
use ferry_transport::Conn as Stream;
use nix::sys::socket::{setsockopt, sockopt};

use super::{setup, ServerError};

/// What a read from a connection gave.
pub(super) enum Fill {
    Data,
    Blocked,
    Eof,
}

/// One connection: its socket, input and output buffers; `'a` is the
/// life of the pages its bodies may borrow (see [`Conn::queue_lent`]).
pub(super) struct Conn<'a> {
    pub(super) name: &'static str,
    /// Plain TCP, TLS or a socketpair, non-blocking; registered with the
    /// event loop by its descriptor. Under TLS every byte of `out` is
    /// encrypted on its way (no zero-copy path exists that could bypass it).
    pub(super) stream: Stream,
    pub(super) input: FrameDecoder,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    /// A frame body written from its own buffer instead of copied into
    /// `out` (see [`Conn::queue_body`]): it goes out after `out[..at]` and
    /// before the rest of `out`, whatever is queued meanwhile.
    body: Vec<u8>,
    /// A body lent by the page source, sent instead of `body`.
    lent: Option<&'a [u8]>,
    body_pos: usize,
    body_at: Option<usize>,
    /// Bytes ever queued in `out` (and as bodies).
    pub(super) queued: u64,
    /// Bytes ever written.
    pub(super) written: u64,
    pub(super) readable: bool,
    pub(super) writable: bool,
    pub(super) eof: bool,
}

impl<'a> Conn<'a> {
    pub(super) fn new(
        name: &'static str,
        stream: Stream,
        sndbuf: Option<usize>,
        already_read: Vec<u8>,
    ) -> Result<Self, ServerError> {
        stream
            .set_nodelay(true)
            .map_err(setup("setting TCP_NODELAY"))?;
        stream
            .set_nonblocking(true)
            .map_err(setup("setting non-blocking mode"))?;
        if let (Some(size), Some(tcp)) = (sndbuf, stream.tcp()) {
            set_sndbuf(tcp, size).map_err(setup("setting SO_SNDBUF"))?;
        }
        Ok(Self {
            name,
            stream,
            input: FrameDecoder::with_bytes(already_read),
            out: Vec::new(),
            out_pos: 0,
            body: Vec::new(),
            lent: None,
            body_pos: 0,
            body_at: None,
            queued: 0,
            written: 0,
            readable: true,
            writable: true,
            eof: false,
        })
    }

    pub(super) fn err(&self, source: impl Into<ProtocolError>) -> ServerError {
        ServerError::Protocol {
            conn: self.name,
            source: source.into(),
        }
    }

    /// Bytes queued but not yet written (a TLS connection's ciphertext
    /// not yet taken by the socket counts as one).
    pub(super) fn pending(&self) -> usize {
        let body = if self.body_at.is_some() {
            self.body_bytes().len() - self.body_pos
        } else {
            0
        };
        self.out.len() - self.out_pos + body + usize::from(self.stream.wants_write())
    }

    /// Queues `body` to go out next, after what `out` holds now, without
    /// copying it, and returns the buffer of the body before it for the
    /// caller to fill again (empty the first time). If a body is still
    /// waiting, this one is copied into `out` instead (and handed back),
    /// to be counted by the caller's [`Conn::queued_since`] like any other
    /// append to `out`.
    pub(super) fn queue_body(&mut self, body: Vec<u8>) -> Vec<u8> {
        if self.body_at.is_some() {
            self.out.extend_from_slice(&body);
            return body;
        }
        if body.is_empty() {
            return body;
        }
        self.queued += body.len() as u64;
        self.body_at = Some(self.out.len());
        self.body_pos = 0;
        std::mem::replace(&mut self.body, body)
    }

    /// Queues `body`, pages lent by the page source, exactly as
    /// [`Conn::queue_body`] queues a buffer: sent from where they are. If a
    /// body is still waiting, this one is copied into `out` instead.
    pub(super) fn queue_lent(&mut self, body: &'a [u8]) {
        if self.body_at.is_some() {
            self.out.extend_from_slice(body);
            return;
        }
        if body.is_empty() {
            return;
        }
        self.queued += body.len() as u64;
        self.body_at = Some(self.out.len());
        self.body_pos = 0;
        self.lent = Some(body);
    }

    /// The waiting body's bytes.
    fn body_bytes(&self) -> &[u8] {
        self.lent.unwrap_or(&self.body)
    }

    /// The bytes to write next, at most `max`: `out` up to a waiting body,
    /// then the body, then the rest of `out`.
    fn next_bytes(&self, max: usize) -> &[u8] {
        let bytes = match self.body_at {
            Some(at) if self.out_pos < at => &self.out[self.out_pos..at],
            Some(_) => &self.body_bytes()[self.body_pos..],
            None => &self.out[self.out_pos..],
        };
        &bytes[..bytes.len().min(max)]
    }

    /// Notes `n` bytes of [`Conn::next_bytes`] as written.
    fn advance(&mut self, n: usize) {
        match self.body_at {
            Some(at) if self.out_pos >= at => {
                self.body_pos += n;
                if self.body_pos == self.body_bytes().len() {
                    self.body_at = None;
                    self.lent = None;
                }
            }
            _ => self.out_pos += n,
        }
        self.written += n as u64;
    }

    /// Notes bytes appended to `out` since `before` (its old length).
    pub(super) fn queued_since(&mut self, before: usize) {
        self.queued += (self.out.len() - before) as u64;
    }

    /// Writes as much of `out` as the socket takes, stopping once about
    /// `max` bytes went (each write is at most `max`); returns the byte
    /// count.
    pub(super) fn flush(&mut self, max: usize) -> Result<u64, ServerError> {
        let before = self.written;
        while self.writable && self.written - before < max as u64 {
            let bytes = self.next_bytes(max);
            if bytes.is_empty() {
                break;
            }
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(self.err(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        // TLS: ciphertext the socket did not take yet.
        if self.writable && self.stream.wants_write() {
            match (&self.stream).flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        if self.body_at.is_some() {
            // `out` keeps its offsets while a body waits.
        } else if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 1 << 20 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(self.written - before)
    }

    /// Queues `head` then `body`, writing them straight from the caller's
    /// buffers when nothing else waits (one `writev`, no copy into `out`);
    /// what the socket does not take is copied into `out`. Returns the
    /// bytes written now.
    pub(super) fn write_through(&mut self, head: &[u8], body: &[u8]) -> Result<u64, ServerError> {
        let n = self.write_now(head, body)?;
        let (head_left, body_left) = split_written(head, body, n);
        // Counted as queued in full: the part written counts as written.
        self.queue(head_left, body_left);
        self.queued += n as u64;
        Ok(n as u64)
    }

    /// As [`Conn::write_through`], for a body lent by the page source:
    /// what the socket does not take of it waits where it is (as
    /// [`Conn::queue_lent`] queues it), not copied into `out`, unless a
    /// body is waiting already.
    pub(super) fn write_through_lent(
        &mut self,
        head: &[u8],
        body: &'a [u8],
    ) -> Result<u64, ServerError> {
        let n = self.write_now(head, body)?;
        let (head_left, body_left) = split_written(head, body, n);
        self.out.extend_from_slice(head_left);
        self.queued += (head_left.len() + n) as u64;
        self.queue_lent(body_left);
        Ok(n as u64)
    }

    /// Writes `head` and `body` with one `writev` when nothing else waits
    /// to be written; returns the bytes the socket took.
    fn write_now(&mut self, head: &[u8], body: &[u8]) -> Result<usize, ServerError> {
        let mut n = 0;
        if self.writable && self.pending() == 0 {
            let bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
            loop {
                match (&self.stream).write_vectored(&bufs) {
                    Ok(0) => return Err(self.err(io::Error::from(io::ErrorKind::WriteZero))),
                    Ok(w) => n = w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.err(e)),
                }
                break;
            }
        }
        self.written += n as u64;
        Ok(n)
    }

    /// Appends `head` then `body` to `out` (bytes written later).
    pub(super) fn queue(&mut self, head: &[u8], body: &[u8]) {
        self.out.extend_from_slice(head);
        self.out.extend_from_slice(body);
        self.queued += (head.len() + body.len()) as u64;
    }

    /// Reads once from the socket into `input`.
    pub(super) fn fill(&mut self) -> Result<Fill, ServerError> {
        let got = self.input.read_from(&mut &self.stream);
        let idle = self.input.buffered().is_empty();
        match got {
            Ok(0) if !idle => Err(self.err(ProtocolError::Closed)),
            // A reset is how a peer's close looks when our last answers were
            // still unread in its socket: treat it like EOF, so the grace
            // period for `Complete` on the other connection applies.
            Ok(0) => {
                self.eof = true;
                self.readable = false;
                Ok(Fill::Eof)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && idle => {
                self.eof = true;
                self.readable = false;
                Ok(Fill::Eof)
            }
            Ok(_) => Ok(Fill::Data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(Fill::Blocked)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::Data),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Takes the next whole frame out of `input`, its payload into `payload`.
    /// An `Abort` from the peer is an error.
    pub(super) fn next_frame(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<Option<FrameHeader>, ServerError> {
        match self.input.next_frame() {
            Ok(Some(f)) => {
                payload.clear();
                payload.extend_from_slice(f.payload);
                Ok(Some(f.header))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// What is left of `head` then `body` once their first `n` bytes went.
fn split_written<'h, 'b>(head: &'h [u8], body: &'b [u8], n: usize) -> (&'h [u8], &'b [u8]) {
    if n < head.len() {
        (&head[n..], body)
    } else {
        (&[][..], &body[n - head.len()..])
    }
}

pub(super) fn set_sndbuf(stream: &impl std::os::fd::AsFd, size: usize) -> io::Result<()> {
    let size = usize::try_from(i32::MAX).map_or(size, |max| size.min(max));
    setsockopt(stream, sockopt::SndBuf, &size).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A connection to a reader thread that collects the first `total`
    /// bytes it receives.
    fn to_reader(total: usize) -> (Conn<'static>, std::thread::JoinHandle<Vec<u8>>) {
        let (a, b) = Stream::pair().unwrap();
        let conn = Conn::new("test", a, None, Vec::new()).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            (&b).read_exact(&mut got).unwrap();
            got
        });
        (conn, reader)
    }

    /// The bytes a reader should see: `parts`, one after the other.
    fn stream_of(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// Writes everything queued, at most `max` bytes per write.
    fn flush_all(conn: &mut Conn, max: usize) {
        while conn.pending() > 0 {
            conn.writable = true;
            conn.flush(max).unwrap();
        }
    }

    /// A body goes out after what `out` held when it was queued and before
    /// anything appended later, in writes of any size; `pending` counts it.
    #[test]
    fn a_body_keeps_its_place_in_the_stream() {
        let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let total = 4 + body.len() + 4 + 4;
        for max in [3, 4096, usize::MAX] {
            let (mut conn, reader) = to_reader(total);
            conn.out.extend_from_slice(b"head");
            assert!(conn.queue_body(body.clone()).is_empty());
            conn.out.extend_from_slice(b"tail");
            assert_eq!(conn.pending(), 4 + body.len() + 4);
            // A second body while the first waits is copied, after "tail".
            let again = conn.queue_body(b"more".to_vec());
            assert_eq!(again, b"more");
            flush_all(&mut conn, max);
            assert_eq!(conn.written, total as u64);
            let want = stream_of(&[b"head", &body, b"tailmore"]);
            assert!(reader.join().unwrap() == want, "max {max}: out of order");
            // The sent body's buffer comes back for the next one.
            let back = conn.queue_body(vec![1; 10]);
            assert_eq!(back, body);
        }
    }

    /// A lent body keeps its place like an owned one: after the head,
    /// before a second body (copied) and the tail; then an owned body
    /// after it goes out in turn.
    #[test]
    fn a_lent_body_keeps_its_place_in_the_stream() {
        let lent: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let total = 4 + lent.len() + 6 + 4 + 5;
        for max in [3, 4096, usize::MAX] {
            let (mut conn, reader) = to_reader(total);
            conn.out.extend_from_slice(b"head");
            conn.queue_lent(&lent);
            conn.queue_lent(b"second");
            conn.out.extend_from_slice(b"tail");
            assert_eq!(conn.pending(), 4 + lent.len() + 6 + 4);
            flush_all(&mut conn, max);
            // The lent body is done with: an owned one is queued as a body.
            assert!(conn.queue_body(b"owned".to_vec()).is_empty());
            flush_all(&mut conn, max);
            let want = stream_of(&[b"head", &lent, b"secondtailowned"]);
            assert!(reader.join().unwrap() == want, "max {max}: out of order");
        }
    }

    /// A demand answer written through from lent pages: what the socket
    /// does not take waits where it is (a body, not `out`), and the
    /// stream stays in order with an answer queued after it.
    #[test]
    fn a_lent_answer_not_taken_whole_waits_as_a_body() {
        let lent: Vec<u8> = (0..8_000_000u32).map(|i| (i % 241) as u8).collect();
        let total = 3 + lent.len() + 3 + 5;
        let (mut conn, reader) = to_reader(total);
        let now = conn.write_through_lent(b"hd1", &lent).unwrap();
        assert!(now < total as u64, "an 8 MB write is taken whole");
        assert_eq!(conn.queued, 3 + lent.len() as u64);
        assert_eq!(conn.written, now);
        assert!(conn.out.len() <= 3, "the lent pages were copied");
        assert_eq!(conn.pending() as u64, conn.queued - conn.written);
        // A second answer while the first waits goes after it, copied.
        conn.write_through(b"hd2", b"owned").unwrap();
        flush_all(&mut conn, usize::MAX);
        assert_eq!(conn.written, total as u64);
        assert_eq!(conn.queued, total as u64);
        let want = stream_of(&[b"hd1", &lent, b"hd2owned"]);
        assert!(reader.join().unwrap() == want, "the stream is out of order");
    }
}
