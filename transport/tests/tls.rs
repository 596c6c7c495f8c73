//! Mutual TLS over loopback: the handshakes, who is refused and why, and
//! the stream's blocking, concurrent and non-blocking use.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_transport::{certs, ClientTls, Conn, HandshakeError, ServerTls, TlsFiles};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-transport-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files(dir: &std::path::Path, who: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
        ca: dir.join("ca.pem"),
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Runs a server handshake on a thread and a client handshake here.
fn pair(
    server: ServerTls,
    client: ClientTls,
    name: &str,
) -> (Result<Conn, HandshakeError>, Result<Conn, HandshakeError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        server.accept(s, soon())
    });
    let c = client.connect(TcpStream::connect(addr).unwrap(), name, soon());
    // TLS 1.3: the client is done before the server has checked its
    // certificate; a refusal shows on the client's first read.
    (t.join().unwrap(), c)
}

#[test]
fn gen_certs_writes_private_keys_for_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("modes");
    let g = certs::generate(&d, &["10.9.0.2".into()]).unwrap();
    for key in [&g.dest.1, &g.source.1] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    assert!(g.dest_names.contains(&"10.9.0.2".to_string()));
}

#[test]
fn mutual_tls_moves_bytes_both_ways_concurrently() {
    let d = scratch("ok");
    certs::generate(&d, &[]).unwrap();
    let server = ServerTls::load(&files(&d, "dest"), vec!["source".into()]).unwrap();
    let client = ClientTls::load(&files(&d, "source"), None).unwrap();
    let (s, c) = pair(server, client, "127.0.0.1");
    let (s, c) = (s.unwrap(), c.unwrap());
    assert!(s.peer_certificate().is_some());
    assert!(c.peer_certificate().is_some());
    // A reader and a writer on one session, from two threads each side.
    let n = 8 << 20;
    let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let c2 = c.try_clone().unwrap();
    let expect = data.clone();
    let writer = std::thread::spawn(move || (&c2).write_all(&expect).unwrap());
    let s2 = s.try_clone().unwrap();
    let echo = std::thread::spawn(move || {
        let mut got = vec![0u8; n];
        (&s2).read_exact(&mut got).unwrap();
        (&s2).write_all(&got[..1 << 20]).unwrap();
        got
    });
    let mut back = vec![0u8; 1 << 20];
    (&c).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    let got = echo.join().unwrap();
    assert!(got == data, "the stream changed the bytes");
    assert_eq!(back[..], data[..1 << 20]);

    // Read timeout: nothing comes.
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let e = (&c).read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);

    // Non-blocking: WouldBlock until data arrives, then all of it.
    c.set_nonblocking(true).unwrap();
    assert_eq!(
        (&c).read(&mut [0u8; 16]).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    (&s).write_all(b"hello").unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < 5 && t.elapsed() < Duration::from_secs(5) {
        let mut b = [0u8; 16];
        match (&c).read(&mut b) {
            Ok(k) => got.extend_from_slice(&b[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, b"hello");

    // The peer's close ends the stream.
    drop(s);
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!((&c).read(&mut [0u8; 16]), Ok(0) | Err(_)));
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let (d, other) = (scratch("ca1"), scratch("ca2"));
    certs::generate(&d, &[]).unwrap();
    certs::generate(&other, &[]).unwrap();
    let server = ServerTls::load(&files(&d, "dest"), vec![]).unwrap();
    // The stranger trusts our CA (it knows who we are), but its own
    // certificate is signed by another.
    let mut f = files(&other, "source");
    f.ca = d.join("ca.pem");
    let client = ClientTls::load(&f, None).unwrap();
    let (s, _c) = pair(server, client, "dest");
    let e = s.unwrap_err().to_string();
    assert!(e.contains("unknown CA"), "{e}");
}

#[test]
fn a_name_that_is_not_allowed_is_refused() {
    let d = scratch("allow");
    certs::generate(&d, &[]).unwrap();
    let server = ServerTls::load(&files(&d, "dest"), vec!["source".into()]).unwrap();
    // Signed by the right CA, but named "dest".
    let client = ClientTls::load(&files(&d, "dest"), None).unwrap();
    let (s, c) = pair(server, client, "localhost");
    let e = s.unwrap_err().to_string();
    assert!(e.contains("none of the allowed peers"), "{e}");
    // The client learns it on its first read.
    let c = c.unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!((&c).read(&mut [0u8; 1]).is_err());
}

#[test]
fn the_source_checks_the_destination_name() {
    let d = scratch("name");
    certs::generate(&d, &[]).unwrap();
    let server = ServerTls::load(&files(&d, "dest"), vec![]).unwrap();
    let client = ClientTls::load(&files(&d, "source"), None).unwrap();
    let (_s, c) = pair(server, client, "elsewhere");
    let e = c.unwrap_err().to_string();
    assert!(e.contains("expected name"), "{e}");
}

#[test]
fn plain_tcp_against_a_tls_listener_is_not_tls() {
    let d = scratch("plain");
    certs::generate(&d, &[]).unwrap();
    let server = ServerTls::load(&files(&d, "dest"), vec![]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        server.accept(s, soon())
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"FERRYMIG\x02\0\0\0 a hand-built hello, in the clear")
        .unwrap();
    let e = t.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("not TLS"), "{e}");

    // Silence: the deadline ends it.
    let server = ServerTls::load(&files(&d, "dest"), vec![]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let _quiet = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let e = server
        .accept(s, Instant::now() + Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("timed out"), "{e}");
}
