//! A loopback TCP tap: forwards every connection to a target byte for byte
//! (it does not parse frames, so it works under TLS), records what crosses
//! it in each direction, and can cut every connection it holds at once.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes of one connection in one direction.
pub struct Stream {
    /// True for source → destination.
    pub to_dest: bool,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    open: Vec<TcpStream>,
    streams: Vec<Arc<Mutex<Stream>>>,
    connections: usize,
}

/// The tap; dropping it stops it and closes what it holds.
pub struct Tap {
    /// Where to connect instead of the target.
    pub addr: String,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Forwards `127.0.0.1:<new port>` to `target`; with `record`, keeps
    /// every byte that crosses.
    pub fn start(target: &str, record: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    client.set_nonblocking(false).unwrap();
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let mut sh = shared.lock().unwrap();
                    sh.connections += 1;
                    sh.open.push(client.try_clone().unwrap());
                    sh.open.push(server.try_clone().unwrap());
                    for (from, to, to_dest) in [
                        (
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            true,
                        ),
                        (server, client, false),
                    ] {
                        let rec = record.then(|| {
                            let s = Arc::new(Mutex::new(Stream {
                                to_dest,
                                bytes: Vec::new(),
                            }));
                            sh.streams.push(s.clone());
                            s
                        });
                        std::thread::spawn(move || pump(from, to, rec));
                    }
                }
            })
        };
        Self {
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes every connection open now, both ways (a network failure).
    pub fn cut(&self) {
        for s in self.shared.lock().unwrap().open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }

    /// Every recorded stream, (direction, bytes).
    pub fn captured(&self) -> Vec<(bool, Vec<u8>)> {
        self.shared
            .lock()
            .unwrap()
            .streams
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                (s.to_dest, s.bytes.clone())
            })
            .collect()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rec: Option<Arc<Mutex<Stream>>>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(r) = &rec {
            r.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
