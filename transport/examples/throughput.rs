//! Bulk throughput of one connection over loopback, plain TCP and mutual
//! TLS, in this process: `cargo run --release -p ferry-transport --example
//! throughput [MiB]`. The CPU cost per byte of the TLS layer, without a VM.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry_transport::{certs, ClientTls, Conn, ServerTls, TlsFiles};

fn pair(tls: Option<(&ServerTls, &ClientTls)>) -> (Conn, Conn) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let soon = Instant::now() + Duration::from_secs(5);
    match tls {
        None => (Conn::Plain(s), Conn::Plain(c)),
        Some((st, ct)) => {
            let st = st.clone();
            let t = std::thread::spawn(move || st.accept(s, soon).unwrap());
            let c = ct.connect(c, "localhost", soon).unwrap();
            (t.join().unwrap(), c)
        }
    }
}

fn run(name: &str, (server, client): (Conn, Conn), mib: usize) {
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let w = std::thread::spawn(move || {
        for _ in 0..mib {
            (&client).write_all(&chunk).unwrap();
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    while got < mib << 20 {
        got += (&server).read(&mut buf).unwrap();
    }
    w.join().unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{name}: {mib} MiB in {s:.3} s = {:.2} GB/s",
        (mib << 20) as f64 / s / 1e9
    );
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let dir = std::env::temp_dir().join(format!("ferry-tput-{}", std::process::id()));
    certs::generate(&dir, &[]).unwrap();
    let f = |who: &str| TlsFiles {
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
        ca: dir.join("ca.pem"),
    };
    let st = ServerTls::load(&f("dest"), vec![]).unwrap();
    let ct = ClientTls::load(&f("source"), None).unwrap();
    for _ in 0..2 {
        run("plain", pair(None), mib);
        run("tls  ", pair(Some((&st, &ct))), mib);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
