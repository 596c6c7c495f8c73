//! Hostile connections to a migration listener: what a stranger, a
//! scanner or a flood does to the port.

use std::io::Write;
use std::net::TcpStream;

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
