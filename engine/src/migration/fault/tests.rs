//! The fault thread on real userfaultfd, with the test as the source.

use std::io::{Read, Write};

use ferry_protocol::{append_pages_head, read_frame, PageEncoding};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;

/// Stopping the thread while an answer is still owed (the push installed
/// the page first) waits for that answer and reads it before the
/// connection closes: over TCP, closing with bytes on their way resets the
/// connection, which the source takes for a lost link.
#[test]
fn a_stopped_fault_thread_reads_the_answer_it_is_owed_before_it_closes() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let uffd = Arc::new(UffdRam::register(&ram).unwrap());
    let (ours, theirs) = Stream::pair().unwrap();
    let Stream::Local(mut source) = theirs else {
        unreachable!("a pair is two local sockets")
    };
    let fault = FaultThread::start(
        uffd.clone(),
        None,
        ours,
        Vec::new(),
        None,
        FaultPriority::Normal,
        Vec::new(),
    )
    .unwrap();

    // A reader faults on page 0, so the thread asks the source for it.
    let mem = ram.guest_memory().clone();
    let reader = std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0)).unwrap());
    let mut payload = Vec::new();
    let head = read_frame(&mut source, &mut payload).unwrap();
    assert_eq!(head.kind, MsgType::PageRequest);
    let req = PageRequest::decode(&payload, ram.pages()).unwrap();
    assert_eq!(req.pfn, 0);

    // The push installs those pages first: the reader goes on, but the
    // answer is still owed.
    let data = vec![7u8; req.count as usize * PAGE_SIZE];
    uffd.install(req.pfn, &data).unwrap();
    assert_eq!(reader.join().unwrap(), u64::from_ne_bytes([7; 8]));

    let stopper = std::thread::spawn(move || fault.stop());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stopper.is_finished(),
        "the thread ended with an answer still on its way"
    );
    let mut answer = Vec::new();
    append_pages_head(
        &mut answer,
        head.arg,
        req.pfn,
        req.count,
        PageEncoding::Raw,
        data.len(),
    );
    answer.extend_from_slice(&data);
    source.write_all(&answer).unwrap();

    let st = stopper.join().unwrap().unwrap();
    // The answer was read: it found its page already there.
    assert_eq!(st.prefetch_hits, 1);
    assert_eq!(st.pages_demand, 0);
    // Then the thread closed its end.
    let mut rest = Vec::new();
    assert_eq!(source.read_to_end(&mut rest).unwrap(), 0);
}
