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

use std::sync::{Arc, Mutex};

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

impl FaultBuffers {
    /// Both, backed now.
    pub fn backed() -> Self {
        Self {
            rx: backed_buffer(RX_STORAGE),
            decode: backed_buffer(FRAME_PAGES),
        }
    }
}

/// One set of [`FaultBuffers`] kept for the next move; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SpareFaultBuffers(Arc<Mutex<Option<FaultBuffers>>>);

impl SpareFaultBuffers {
    /// Makes the spare set now, unless there is one.
    pub fn fill(&self) {
        let mut spare = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spare.is_none() {
            *spare = Some(FaultBuffers::backed());
        }
    }

    /// The spare set, or one made now when there is none.
    pub fn take(&self) -> FaultBuffers {
        let spare = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        spare.unwrap_or_else(FaultBuffers::backed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_set_is_taken_once_then_made_on_demand() {
        let spare = SpareFaultBuffers::default();
        spare.fill();
        let at = spare.0.lock().unwrap().as_ref().unwrap().rx.as_ptr();
        let first = spare.clone().take();
        assert_eq!(first.rx.as_ptr(), at, "took the set made ahead");
        assert_eq!(
            (first.rx.len(), first.decode.len()),
            (RX_STORAGE, FRAME_PAGES)
        );
        assert!(spare.0.lock().unwrap().is_none());
        let second = spare.take();
        assert_eq!(
            (second.rx.len(), second.decode.len()),
            (RX_STORAGE, FRAME_PAGES)
        );
    }
}
