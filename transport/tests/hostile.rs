//! Hostile peers against the tcp lanes, each met with a typed error within its deadline, never a
//! panic, a hang or unbounded memory; a legitimate session works afterwards.
//!
//! A malicious source (a fake page server that passes the handshake, it holds the key, then
//! misbehaves): replies to requests never made, more pages than asked, a replayed reply, a reply
//! that stops halfway, a reply trickled a byte at a time. A malicious destination: a flood of
//! requests it never reads the replies to (the server's memory stays bounded).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ferry_transport::handshake::server_handshake;
use ferry_transport::tcp::{self, Encryption, TcpOptions, TcpPageServer};
use ferry_transport::wire::{ReadReply, ReadRequest, ReadStatus, SessionId, ZeroMask, READ_REQUEST_FRAME_LEN};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey, TransportError};

const TIMEOUT: Duration = Duration::from_millis(600);

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"key for the hostile peer tests..").unwrap()
}

fn layout() -> MemoryLayout {
    MemoryLayout::single(4 << 20).unwrap()
}

fn options() -> TcpOptions {
    TcpOptions { io_timeout: TIMEOUT, encryption: Encryption::Off, ..TcpOptions::default() }
}

/// What the fake source does with each request it reads (after the handshake).
type Misbehave = fn(&mut TcpStream, ReadRequest, usize);

/// A page server that holds the key and then answers as `misbehave` says.
fn fake_source(misbehave: Misbehave) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let session = SessionId::random().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                if server_handshake(&mut s, &key(), session, &layout()).is_err() {
                    return;
                }
                let mut frame = [0u8; READ_REQUEST_FRAME_LEN];
                let mut n = 0;
                while s.read_exact(&mut frame).is_ok() {
                    let Ok(req) = ReadRequest::decode(&frame) else { return };
                    misbehave(&mut s, req, n);
                    n += 1;
                }
            });
        }
    });
    addr
}

fn reply(s: &mut TcpStream, id: u64, pages: u32, data: bool) {
    let r = ReadReply { id, status: ReadStatus::Ok, pages, zero: ZeroMask::default() };
    let mut prefix = Vec::new();
    r.encode_prefix(4096, &mut prefix);
    let _ = s.write_all(&prefix);
    if data {
        let _ = s.write_all(&vec![0xabu8; pages as usize * 4096]);
    }
}

/// An urgent read of one page from the fake source: its outcome, and how long it took.
fn read_one(addr: std::net::SocketAddr) -> Result<(), TransportError> {
    let mut source = tcp::connect(addr, &key(), Some(&layout()), &options())?;
    let mut page = vec![0u8; 4096];
    source.urgent.read(PageRun::new(0, 1, 1), &mut page)?;
    source.urgent.read(PageRun::new(0, 2, 1), &mut page)?;
    Ok(())
}

#[test]
fn a_reply_to_a_request_never_made_is_an_error() {
    let addr = fake_source(|s, req, _| reply(s, req.id + 1000, req.run.pages, true));
    let err = read_one(addr).unwrap_err();
    assert!(matches!(err, TransportError::Malformed { .. } | TransportError::Unexpected { .. }), "{err:?}");
}

#[test]
fn a_reply_with_more_pages_than_asked_is_an_error() {
    let addr = fake_source(|s, req, _| reply(s, req.id, req.run.pages + 7, true));
    let err = read_one(addr).unwrap_err();
    assert!(matches!(err, TransportError::Malformed { .. } | TransportError::Unexpected { .. }), "{err:?}");
}

#[test]
fn a_replayed_reply_is_an_error() {
    // The second request gets the first reply again.
    let addr = fake_source(|s, req, n| reply(s, if n == 0 { req.id } else { req.id - 1 }, req.run.pages, true));
    let err = read_one(addr).unwrap_err();
    assert!(matches!(err, TransportError::Malformed { .. } | TransportError::Unexpected { .. }), "{err:?}");
}

#[test]
fn a_reply_that_stops_halfway_is_silent_within_the_deadline() {
    let addr = fake_source(|s, req, _| {
        reply(s, req.id, req.run.pages, false);
        let _ = s.write_all(&[1u8; 100]);
        std::thread::sleep(Duration::from_secs(30));
    });
    let err = read_one(addr).unwrap_err();
    assert!(matches!(err, TransportError::Silent(_)), "{err:?}");
}

#[test]
fn a_reply_trickled_a_byte_at_a_time_is_cut_at_its_deadline() {
    // A byte every 100 ms: each read would be within a per-read timeout of 600 ms; the whole
    // reply is not.
    let addr = fake_source(|s, req, _| {
        let r = ReadReply { id: req.id, status: ReadStatus::Ok, pages: req.run.pages, zero: ZeroMask::default() };
        let mut bytes = Vec::new();
        r.encode_prefix(4096, &mut bytes);
        bytes.extend(std::iter::repeat(7u8).take(4096));
        for b in bytes {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let err = read_one(addr).unwrap_err();
    assert!(matches!(err, TransportError::Silent(_)), "{err:?}");
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_destination_flooding_requests_it_never_reads_keeps_the_server_bounded() {
    let memory = Arc::new(GuestMemory::create(layout(), Backing::Anonymous).unwrap());
    memory.regions()[0].write(0, &[1u8; 4 << 20]).unwrap();
    let server = TcpPageServer::start("127.0.0.1:0", memory.clone(), key(), options()).unwrap();
    let before = rss_kib();
    // An authenticated lane that sends a million requests of 64 pages (250 GiB of replies) and never
    // reads a reply: the server blocks on its full socket and stops reading requests, so the
    // flood ends when the flooder's own buffer is full too.
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    ferry_transport::handshake::client_handshake(
        &mut s,
        &key(),
        ferry_transport::wire::Lane::Bulk,
        SessionId::NEW,
        Some(&layout()),
    )
    .unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut sent = 0u64;
    for i in 0..1_000_000u64 {
        let req = ReadRequest { id: i + 1, run: PageRun::new(0, (i * 64) % 1024, 64) };
        if s.write_all(&req.encode()).is_err() {
            break;
        }
        sent += 1;
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(sent < 1_000_000, "the server kept taking requests ({sent}) it could not answer");
    assert!(grown < 64 * 1024, "the server's memory grew by {grown} KiB under a request flood");
    drop(s);
    // A legitimate destination on the same server still reads its pages.
    let mut good = tcp::connect(server.local_addr(), &key(), Some(&layout()), &options()).unwrap();
    let mut page = vec![0u8; 4096];
    good.urgent.read(PageRun::new(0, 5, 1), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 1));
}

/// This process's threads.
fn threads() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_thousand_idle_connections_cost_the_server_a_bounded_number_of_threads() {
    // Room for the thousand client sockets this process holds itself.
    let limit = libc::rlimit { rlim_cur: 8192, rlim_max: 8192 };
    // SAFETY: setrlimit reads the struct we pass, which lives across the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0, "{}", std::io::Error::last_os_error());
    let memory = Arc::new(GuestMemory::create(layout(), Backing::Anonymous).unwrap());
    let opts = TcpOptions { io_timeout: Duration::from_secs(30), ..TcpOptions::default() };
    let server = TcpPageServer::start("127.0.0.1:0", memory, key(), opts).unwrap();
    let before = (threads(), rss_kib());
    let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(server.local_addr()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let (grown_threads, grown_kib) = (threads().saturating_sub(before.0), rss_kib().saturating_sub(before.1));
    // The server keeps 64 waiting to authenticate (the oldest closed first); threads of closed ones
    // end as their sockets do.
    assert!(grown_threads <= 200, "{grown_threads} threads for 1000 idle connections");
    assert!(grown_kib < 256 * 1024, "the server's memory grew by {grown_kib} KiB");
    let mut good = tcp::connect(server.local_addr(), &key(), Some(&layout()), &TcpOptions::default()).unwrap();
    let mut page = vec![0u8; 4096];
    good.urgent.read(PageRun::new(0, 5, 1), &mut page).unwrap();
    drop(idle);
}
