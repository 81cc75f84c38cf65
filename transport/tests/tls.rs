//! Encrypted tcp lanes: what crosses the wire, who may connect, and what a tampering link gets.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_transport::lane::{BulkRead, BulkTarget, PageBuf};
use ferry_transport::tcp::{self, Encryption, TcpOptions, TcpPageServer};
use ferry_transport::wire::RejectReason;
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey, TransportError};

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"key for the encrypted lane tests").unwrap()
}

fn options(encryption: Encryption) -> TcpOptions {
    TcpOptions { encryption, io_timeout: Duration::from_secs(5), ..TcpOptions::default() }
}

/// 4 MiB whose every page starts with a marker that cannot occur by chance, so a capture of the
/// wire shows whether page contents crossed it readable.
const MARKER: &[u8; 32] = b"FERRY-PLAINTEXT-PAGE-MARKER-0001";

fn marked_memory() -> Arc<GuestMemory> {
    let memory = Arc::new(GuestMemory::create(MemoryLayout::single(4 << 20).unwrap(), Backing::Anonymous).unwrap());
    let region = &memory.regions()[0];
    for page in 0..1024u64 {
        let mut bytes = vec![(page % 251) as u8 + 1; 4096];
        bytes[..32].copy_from_slice(MARKER);
        region.write(page * 4096, &bytes).unwrap();
    }
    memory
}

/// A tcp relay between a client and `target` that records what the server sent and may flip one
/// byte of it (the `flip_at`-th byte from the server).
struct Relay {
    addr: std::net::SocketAddr,
    from_server: Arc<Mutex<Vec<u8>>>,
}

fn relay(target: std::net::SocketAddr, flip_at: Option<usize>) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let from_server = Arc::new(Mutex::new(Vec::new()));
    let captured = from_server.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else { return };
            let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(Shutdown::Write);
            });
            let captured = captured.clone();
            std::thread::spawn(move || {
                let (mut s_read, mut c_write) = (server, client);
                let mut buf = [0u8; 65536];
                loop {
                    let n = match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut all = captured.lock().unwrap();
                    let before = all.len();
                    all.extend_from_slice(&buf[..n]);
                    if let Some(at) = flip_at {
                        if (before..before + n).contains(&at) {
                            buf[at - before] ^= 0x40;
                        }
                    }
                    drop(all);
                    if c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(Shutdown::Write);
            });
        }
    });
    Relay { addr, from_server }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads every page through the bulk lane and checks it against the source.
fn read_all(source: &mut ferry_transport::PageSource, memory: &GuestMemory) -> Result<(), TransportError> {
    let mut expected = vec![0u8; 64 * 4096];
    for first in (0..1024u64).step_by(64) {
        let run = PageRun::new(0, first, 64);
        source.bulk.submit(BulkRead { run, buf: BulkTarget::Buffer(PageBuf::new(64 * 4096)), tag: 0 })?;
        let done = source.bulk.complete()?.expect("one read in flight");
        memory.read_run(run, &mut expected).unwrap();
        assert_eq!(&done.buf[..], &expected[..], "pages {first}..{} differ from the source", first + 64);
    }
    Ok(())
}

#[test]
fn guest_memory_crosses_encrypted_by_default_and_readable_only_when_turned_off() {
    assert_eq!(TcpOptions::default().encryption, Encryption::Tls, "encryption is on by default");
    let memory = marked_memory();
    for encryption in [Encryption::Tls, Encryption::Off] {
        let server = TcpPageServer::start("127.0.0.1:0", memory.clone(), key(), options(encryption)).unwrap();
        let wire = relay(server.local_addr(), None);
        let mut source = tcp::connect(wire.addr, &key(), Some(memory.layout()), &options(encryption)).unwrap();
        let mut page = vec![0u8; 4096];
        source.urgent.read(PageRun::new(0, 7, 1), &mut page).unwrap();
        assert!(page.starts_with(MARKER));
        read_all(&mut source, &memory).unwrap();
        drop(source);
        std::thread::sleep(Duration::from_millis(50));
        let captured = wire.from_server.lock().unwrap();
        assert!(captured.len() > 4 << 20, "the whole image crossed the relay ({} bytes)", captured.len());
        match encryption {
            Encryption::Tls => assert!(!contains(&captured, MARKER), "page contents crossed the wire readable"),
            Encryption::Off => assert!(contains(&captured, MARKER), "the capture is not of page contents"),
        }
    }
}

#[test]
fn a_plaintext_client_is_refused_by_an_encrypting_server_with_the_reason() {
    let server = TcpPageServer::start("127.0.0.1:0", marked_memory(), key(), options(Encryption::Tls)).unwrap();
    let err = tcp::connect(server.local_addr(), &key(), None, &options(Encryption::Off)).unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { reason: RejectReason::Encryption, .. }),
        "a plaintext client against a TLS server: {err:?}"
    );
}

#[test]
fn an_encrypting_client_fails_fast_against_a_plaintext_server() {
    let server = TcpPageServer::start("127.0.0.1:0", marked_memory(), key(), options(Encryption::Off)).unwrap();
    let err = tcp::connect(server.local_addr(), &key(), None, &options(Encryption::Tls)).unwrap_err();
    // Not Silent: the server closes at once rather than letting the handshake time out.
    assert!(matches!(err, TransportError::Tls(_)), "a TLS client against a plaintext server: {err:?}");
}

#[test]
fn a_wrong_key_is_refused_inside_tls() {
    let server = TcpPageServer::start("127.0.0.1:0", marked_memory(), key(), options(Encryption::Tls)).unwrap();
    let other = PreSharedKey::new(*b"another key, not the server's..").unwrap();
    let err = tcp::connect(server.local_addr(), &other, None, &options(Encryption::Tls)).unwrap_err();
    assert!(matches!(err, TransportError::AuthFailed(_)), "{err:?}");
}

#[test]
fn a_byte_changed_in_transit_is_an_error_never_a_wrong_page() {
    let memory = marked_memory();
    // Flip a byte at several depths of the server's stream: in its handshake, in an early
    // reply and deep in the bulk transfer.
    for flip_at in [40usize, 3000, 200_000, 2_000_000] {
        let server = TcpPageServer::start("127.0.0.1:0", memory.clone(), key(), options(Encryption::Tls)).unwrap();
        let wire = relay(server.local_addr(), Some(flip_at));
        // The relay flips a byte of the first connection only when it is that deep: the urgent
        // lane opens first and carries little, so count on the bulk lane for deep flips.
        let outcome = tcp::connect(wire.addr, &key(), Some(memory.layout()), &options(Encryption::Tls))
            .and_then(|mut source| read_all(&mut source, &memory));
        let err = outcome.expect_err("a tampered stream cannot succeed");
        assert!(
            matches!(err, TransportError::Tls(_) | TransportError::Io(_) | TransportError::PeerClosed),
            "flip at {flip_at}: {err:?}"
        );
    }
}
