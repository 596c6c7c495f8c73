//! Hostile connections to a migration listener: what a stranger, a
//! scanner or a flood does to the port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_protocol::{features, write_frame, Hello, MsgType, Role, PAGE_SIZE, PROTOCOL_VERSION};

/// Opens `n` hostile connections to `addr`: half of them silent and
/// returned (held open until the caller drops them), the rest garbage,
/// hand-built `Hello`s that resume sessions the listener does not hold,
/// fault connections with no session, or closed at once.
pub fn hostile_connections(addr: &str, n: u64) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let hello = |role, features| Hello {
            version: PROTOCOL_VERSION,
            role,
            session_id: 0xbad0_0000 + i,
            features,
            mem_size: 256 << 20,
            vcpus: 1,
            page_size: PAGE_SIZE as u32,
            options: Vec::new(),
        };
        match i % 8 {
            0..=3 => held.push(s), // silent
            4 => {
                let _ = s.write_all(b"\x00\x01garbage garbage garbage garbage");
            }
            5 => {
                let h = hello(Role::Control, features::RESUME);
                let _ = write_frame(&mut s, MsgType::Hello, 0, &h.encode());
            }
            6 => {
                let h = hello(Role::Fault, 0);
                let _ = write_frame(&mut s, MsgType::Hello, 0, &h.encode());
            }
            _ => drop(s),
        }
    }
    held
}

/// Opens `n` connections to `addr` (all connected when this returns) that
/// each try to keep a handshake slot for `hold` without sending a whole
/// `Hello`, never quiet for as long as a per-read timeout: one in two
/// sends a `Hello` one byte every 500 ms, the others a `Ping` every 1.5 s.
/// Each stops when the listener answers or closes; its thread returns the
/// listener's answer (what `read_frame` makes of it: the `Abort`'s
/// reason), if it got one.
pub fn slow_hello_connections(
    addr: &str,
    n: u64,
    hold: Duration,
) -> Vec<JoinHandle<Option<String>>> {
    (0..n)
        .filter_map(|i| {
            let mut s = TcpStream::connect(addr).ok()?;
            let trickle = i % 2 == 0;
            let mut frame = Vec::new();
            if trickle {
                let h = Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Control,
                    session_id: 0x510e_0000 + i,
                    features: features::SUPPORTED,
                    mem_size: 256 << 20,
                    vcpus: 1,
                    page_size: PAGE_SIZE as u32,
                    options: Vec::new(),
                };
                write_frame(&mut frame, MsgType::Hello, 0, &h.encode()).unwrap();
            } else {
                write_frame(&mut frame, MsgType::Ping, 0, &[]).unwrap();
            }
            let every = Duration::from_millis(if trickle { 500 } else { 1500 });
            Some(std::thread::spawn(move || {
                let start = Instant::now();
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(every));
                let mut got = Vec::new();
                let mut buf = [0; 4096];
                let mut sent = 0;
                while start.elapsed() < hold {
                    if got.is_empty() {
                        // A byte of the Hello (past its end, the last one
                        // again), or a whole Ping.
                        let chunk = match trickle {
                            true => &frame[sent.min(frame.len() - 1)..][..1],
                            false => &frame[..],
                        };
                        if s.write_all(chunk).is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    // The wait before the next send, or the answer.
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                let answer = ferry_protocol::read_frame(&mut &got[..], &mut Vec::new());
                (!got.is_empty()).then(|| match answer {
                    Ok(h) => format!("{:?} frame", h.kind),
                    Err(e) => e.to_string(),
                })
            }))
        })
        .collect()
}
