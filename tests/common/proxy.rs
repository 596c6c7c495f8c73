//! A loopback TCP proxy that cuts migration links on purpose.
//!
//! Every connection to the proxy is forwarded to the target frame by frame
//! (headers parsed with `ferry_protocol::FrameHeader`), so a cut can be
//! placed exactly: before or after the n-th frame of a type in a direction,
//! or after a number of bytes into a direction (tearing a frame in half).
//! A cut closes every connection the proxy holds at that moment, both
//! directions, like a network failure between the hosts. Cuts fire in order,
//! one at a time, each counted afresh on the connections opened after the
//! previous one; once all have fired the proxy forwards everything.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_protocol::{FrameHeader, MsgType, HEADER_LEN};

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source → destination.
    ToDest,
    /// Destination → source.
    ToSource,
}

/// Where a cut happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Instead of forwarding the `nth` (from 1) frame of `kind` going `dir`.
    Before(Dir, MsgType, u32),
    /// Right after forwarding it.
    After(Dir, MsgType, u32),
    /// After this many bytes (frame headers included) went `dir` on the
    /// control connection; the frame that crosses the mark is torn.
    AtByte(Dir, u64),
}

struct State {
    cuts: Vec<Cut>,
    /// Frames of each (dir, kind) seen since the last cut.
    seen: Vec<(Dir, MsgType, u32)>,
    /// Control-connection bytes per direction since the last cut.
    bytes: [u64; 2],
    /// Every stream open now, to close them all at a cut.
    open: Vec<TcpStream>,
}

/// The proxy; dropping it stops it.
pub struct Proxy {
    /// Where to connect instead of the destination.
    pub addr: String,
    state: Arc<Mutex<State>>,
    fired: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Forwards `127.0.0.1:<new port>` to `target`, cutting at `cuts` in
    /// order.
    pub fn start(target: &str, cuts: Vec<Cut>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State {
            cuts,
            seen: Vec::new(),
            bytes: [0, 0],
            open: Vec::new(),
        }));
        let fired = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let thread = {
            let (state, fired, stop) = (state.clone(), fired.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let Ok(server) = TcpStream::connect(&target) else {
                                continue;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            {
                                let mut st = state.lock().unwrap();
                                st.open.push(client.try_clone().unwrap());
                                st.open.push(server.try_clone().unwrap());
                            }
                            let control = Arc::new(AtomicBool::new(false));
                            for (from, to, dir) in [
                                (
                                    client.try_clone().unwrap(),
                                    server.try_clone().unwrap(),
                                    Dir::ToDest,
                                ),
                                (server, client.try_clone().unwrap(), Dir::ToSource),
                            ] {
                                let (state, fired, control) =
                                    (state.clone(), fired.clone(), control.clone());
                                std::thread::spawn(move || {
                                    pump(from, to, dir, &state, &fired, &control)
                                });
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            addr,
            state,
            fired,
            stop,
            thread: Some(thread),
        }
    }

    /// How many cuts have fired.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Acquire)
    }

    /// Cuts that have not fired yet.
    pub fn pending(&self) -> Vec<Cut> {
        self.state.lock().unwrap().cuts.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in self.state.lock().unwrap().open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Closes every open stream and moves on to the next cut.
///
/// The cut is counted before any stream closes: the peers react to the
/// close at once, and a test that sees their reaction must also see the
/// cut (counting it afterwards lost that race once on a loaded host).
fn fire(st: &mut State, fired: &AtomicU64) {
    fired.fetch_add(1, Ordering::AcqRel);
    for s in st.open.drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
    st.cuts.remove(0);
    st.seen.clear();
    st.bytes = [0, 0];
}

/// Forwards one direction of one connection, frame by frame.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    state: &Mutex<State>,
    fired: &AtomicU64,
    control: &AtomicBool,
) {
    let di = dir as usize;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    let mut first = true;
    loop {
        // Forward every whole frame buffered.
        while let Some(head) = buf.first_chunk::<HEADER_LEN>() {
            let Ok(h) = FrameHeader::decode(head) else {
                // Not a frame: pass the bytes on untouched.
                if to.write_all(&buf).is_err() {
                    return;
                }
                buf.clear();
                break;
            };
            let len = HEADER_LEN + h.len as usize;
            if buf.len() < len {
                break;
            }
            if first && h.kind == MsgType::Hello && dir == Dir::ToDest {
                // Byte 12 of the Hello payload is the role: 0 is control.
                control.store(buf.get(HEADER_LEN + 12) == Some(&0), Ordering::Release);
            }
            first = false;
            let is_control = control.load(Ordering::Acquire);
            let mut st = state.lock().unwrap();
            let n = {
                let e = st
                    .seen
                    .iter_mut()
                    .find(|(d, k, _)| *d == dir && *k == h.kind);
                match e {
                    Some(e) => {
                        e.2 += 1;
                        e.2
                    }
                    None => {
                        st.seen.push((dir, h.kind, 1));
                        1
                    }
                }
            };
            let mut send = len;
            let mut cut_after = false;
            // A cut right after a whole frame: nothing may pass the other
            // way before it.
            let mut atomic = false;
            match st.cuts.first().copied() {
                Some(Cut::Before(d, k, nth)) if d == dir && k == h.kind && nth == n => {
                    fire(&mut st, fired);
                    return;
                }
                Some(Cut::After(d, k, nth)) if d == dir && k == h.kind && nth == n => {
                    cut_after = true;
                    atomic = true;
                }
                Some(Cut::AtByte(d, at)) if d == dir && is_control => {
                    let left = at.saturating_sub(st.bytes[di]) as usize;
                    if left < len {
                        send = left;
                        cut_after = true;
                    }
                }
                _ => {}
            }
            if is_control {
                st.bytes[di] += send as u64;
            }
            if atomic {
                // The lock is held until the cut, so the other direction
                // forwards nothing in between: a `Ready` the destination
                // sent at once upon the `State` of a cut after it slipped
                // through once, when this thread was descheduled between
                // the write and the cut.
                if to.write_all(&buf[..send]).is_ok() {
                    let _ = to.flush();
                    fire(&mut st, fired);
                }
                return;
            }
            drop(st);
            if to.write_all(&buf[..send]).is_err() {
                return;
            }
            if cut_after {
                let _ = to.flush();
                fire(&mut state.lock().unwrap(), fired);
                return;
            }
            buf.drain(..len);
        }
        match from.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
