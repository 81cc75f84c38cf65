//! Peers without the key that open connection after connection and say nothing (each would hold
//! a thread and three descriptors until its handshake deadline) cannot lock the rightful
//! destination out: the page server keeps at most `MAX_UNAUTHENTICATED` of them, closing the
//! oldest. Its own process, with a descriptor limit low enough that the flood would exhaust it
//! without the bound (before it, the rightful handshake timed out).

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};

fn limit_descriptors(n: u64) {
    let limit = libc::rlimit { rlim_cur: n, rlim_max: n.max(4096) };
    // SAFETY: setrlimit reads the struct we pass, which lives across the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn a_keyless_flood_does_not_lock_the_rightful_destination_out() {
    // Client and server share this process. Unbounded, 400 silent connections would take 400
    // descriptors here and 1200 at the server; bounded, the server holds 3 for each of 64 waiting
    // and 2 for each it closed whose thread has not ended yet, a lag that a burst of connects on
    // two cores makes reach dozens (at 512 and 250 connections the client itself ran out now and
    // then, ~1 run in 12).
    limit_descriptors(1024);
    let layout = MemoryLayout::single(4 << 20).unwrap();
    let memory = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    let key = PreSharedKey::generate().unwrap();
    let options = TcpOptions { io_timeout: Duration::from_secs(30), ..TcpOptions::default() };
    let server = TcpPageServer::start("127.0.0.1:0", memory, key.clone(), options.clone()).unwrap();
    let flood: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(server.local_addr()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let connected = tcp::connect_session(
        server.local_addr(),
        &key,
        Some(&layout),
        &TcpOptions { io_timeout: Duration::from_secs(5), ..TcpOptions::default() },
    );
    assert!(connected.is_ok(), "the rightful destination was locked out: {:?}", connected.err());
    let control = server.accept_control(Duration::from_secs(5));
    assert!(control.is_ok(), "its control lane never reached the source");
    eprintln!("connected in {:?} past {} silent connections", started.elapsed(), flood.len());
}
