//! [`Link`]: one blocking migration connection with its frame decoder.
//!
//! Every frame read on a control or fault connection outside the page
//! server goes through the link's [`FrameDecoder`], so bytes read past one
//! frame are never lost: they stay in the decoder for the next read, or are
//! handed on with [`Link::into_parts`] to whoever takes the connection over.

use std::io::Write;
use std::net::TcpStream;

use ferry_protocol::{write_frame, Frame, FrameDecoder, MsgType, ProtocolError};

/// A connection and the frames buffered from it.
#[derive(Debug)]
pub struct Link {
    /// The socket (blocking).
    pub stream: TcpStream,
    /// What has been read from it and not yet handed out.
    pub rx: FrameDecoder,
}

impl Link {
    /// A link over `stream`, nothing read yet.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            rx: FrameDecoder::new(),
        }
    }

    /// Writes one frame and flushes it.
    pub fn send(&mut self, kind: MsgType, arg: u64, payload: &[u8]) -> Result<(), ProtocolError> {
        write_frame(&mut self.stream, kind, arg, payload)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Blocks until the next frame.
    pub fn recv(&mut self) -> Result<Frame<'_>, ProtocolError> {
        self.rx.recv(&mut self.stream)
    }

    /// Blocks until the next frame, which must be of type `kind`; returns
    /// its payload.
    pub fn expect(
        &mut self,
        kind: MsgType,
        expected: &'static str,
    ) -> Result<&[u8], ProtocolError> {
        let f = self.rx.recv(&mut self.stream)?;
        if f.header.kind != kind {
            return Err(ProtocolError::Unexpected {
                got: f.header.kind,
                expected,
            });
        }
        Ok(f.payload)
    }

    /// The socket and the bytes read from it but not yet decoded.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.rx.into_buffered())
    }
}
