//! The destination's buffers on the path of the first demand answers,
//! made ahead of a move.
//!
//! In lazy modes the first answers arrive into backed memory (2G guest on
//! huge pages: the first fault after the resume took 6-8 ms without it,
//! under 1 ms with it), and compressed ones are decoded into backed
//! memory too. Backing 4 MiB of fresh memory takes about 1.5 ms here,
//! and made after the fault connection's `Hello` it falls inside the
//! pause. [`SpareFaultBuffers::fill`] makes them when the process starts
//! (`ferry-dest` does); a move that finds none makes its own, as before.

use ferry_page_server::spare::{Backed, Spare};
use ferry_protocol::{backed_buffer, HEADER_LEN, MAX_PAGES_PER_FRAME, PAGES_PREFIX, PAGE_SIZE};

/// Bytes of one whole page frame's pages.
const FRAME_PAGES: usize = MAX_PAGES_PER_FRAME as usize * PAGE_SIZE;
/// Receive room for one whole page frame on the fault connection.
pub(super) const RX_ROOM: usize = HEADER_LEN + PAGES_PREFIX + FRAME_PAGES;
/// Storage made for it: the room, plus space for bytes that may already
/// be buffered when it is handed to the decoder.
const RX_STORAGE: usize = RX_ROOM + (64 << 10);

/// The fault connection's receive storage and the decode buffer for
/// compressed answers, both written once so that their memory is backed.
#[derive(Debug)]
pub struct FaultBuffers {
    /// Storage for the fault connection's frame decoder.
    pub rx: Vec<u8>,
    /// Where compressed answers are decoded.
    pub decode: Vec<u8>,
}

impl Backed for FaultBuffers {
    /// Both, backed now.
    fn backed() -> Self {
        Self {
            rx: backed_buffer(RX_STORAGE),
            decode: backed_buffer(FRAME_PAGES),
        }
    }
}

/// One set of [`FaultBuffers`] kept for the next move (see
/// [`ferry_page_server::spare`]).
pub type SpareFaultBuffers = Spare<FaultBuffers>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_holds_a_whole_answer() {
        let b = SpareFaultBuffers::default().take();
        assert_eq!((b.rx.len(), b.decode.len()), (RX_STORAGE, FRAME_PAGES));
        assert!(b.rx.len() >= RX_ROOM);
    }
}
