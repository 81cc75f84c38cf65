//! The control protocol under good and hostile input: codec round trips and fuzzed bytes as
//! property tests, and the handshake's refusals (wrong key, version, layout, session), each of
//! which must end in a typed error on both sides, never a panic or a hang.

use ferry_transport::GuestAddr;
use std::io::{Cursor, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use ferry_transport::handshake::{client_handshake, server_handshake};
use ferry_transport::lane::{BulkRead, PageBuf};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::wire::{
    encode_header, parse_header, read_control, Challenge, Control, Hello, Lane, MessageKind, ReadReply, ReadRequest,
    ReadStatus, RejectReason, SessionId, ZeroMask, HEADER_LEN, MAGIC, PROTOCOL_VERSION, READ_REQUEST_FRAME_LEN,
};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey, RegionLayout, TransportError};
use proptest::prelude::*;

fn key_a() -> PreSharedKey {
    PreSharedKey::new(*b"key A for the protocol tests....").unwrap()
}

fn key_b() -> PreSharedKey {
    PreSharedKey::new(*b"key B for the protocol tests....").unwrap()
}

fn small_layout() -> MemoryLayout {
    MemoryLayout::single(4 << 20).unwrap()
}

fn arb_layout() -> impl Strategy<Value = MemoryLayout> {
    (prop_oneof![Just(4096u32), Just(2 << 20)], prop::collection::vec((0u64..1000, 1u64..64), 1..8)).prop_map(
        |(ps, regions)| {
            let regions = regions
                .into_iter()
                .enumerate()
                .map(|(i, (off, pages))| RegionLayout {
                    guest_phys_addr: GuestAddr(((i as u64) << 40) + off * u64::from(ps)),
                    size: pages * u64::from(ps),
                })
                .collect();
            MemoryLayout::new(ps, regions).unwrap()
        },
    )
}

fn arb_control() -> impl Strategy<Value = Control> {
    let lane = prop_oneof![Just(Lane::Control), Just(Lane::Urgent), Just(Lane::Bulk)];
    prop_oneof![
        (lane, any::<[u8; 16]>(), any::<[u8; 32]>(), prop::option::of(arb_layout())).prop_map(
            |(lane, s, nonce, layout)| { Control::Hello(Hello { lane, session: SessionId(s), nonce, layout }) }
        ),
        (any::<[u8; 16]>(), any::<[u8; 32]>(), any::<[u8; 32]>(), arb_layout()).prop_map(
            |(s, nonce, proof, layout)| {
                Control::Challenge(Challenge { session: SessionId(s), nonce, proof, layout })
            }
        ),
        any::<[u8; 32]>().prop_map(Control::Proof),
        Just(Control::Welcome),
        ("[a-z ]{0,200}").prop_map(|detail| Control::Reject { reason: RejectReason::Layout, detail }),
    ]
}

proptest! {
    #[test]
    fn control_messages_round_trip(msg in arb_control()) {
        let frame = msg.encode();
        prop_assert_eq!(read_control(&mut Cursor::new(&frame)).unwrap(), msg);
    }

    #[test]
    fn truncated_control_frames_are_errors(msg in arb_control(), cut in 0usize..10_000) {
        let frame = msg.encode();
        let cut = cut % frame.len();
        let err = read_control(&mut Cursor::new(&frame[..cut])).unwrap_err();
        let closed = matches!(err, TransportError::PeerClosed);
        prop_assert!(closed, "{:?}", err);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_control(&mut Cursor::new(&bytes));
        if let Ok(frame) = <[u8; READ_REQUEST_FRAME_LEN]>::try_from(&bytes[..bytes.len().min(READ_REQUEST_FRAME_LEN)]) {
            let _ = ReadRequest::decode(&frame);
        }
        let req = ReadRequest { id: 7, run: PageRun::new(0, 0, (bytes.len() as u32 % 1024) + 1) };
        let _ = ReadReply::decode_prefix(&bytes, &req, 4096);
    }

    /// A valid frame header with random payload bytes: decoding is an error or a message, never a panic.
    #[test]
    fn random_payloads_never_panic(kind in prop_oneof![Just(MessageKind::Hello), Just(MessageKind::Challenge),
            Just(MessageKind::Proof), Just(MessageKind::Welcome), Just(MessageKind::Reject)],
            payload in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut frame = encode_header(kind, payload.len() as u32).to_vec();
        frame.extend_from_slice(&payload);
        let _ = read_control(&mut Cursor::new(&frame));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading(len in 16 * 1024u32 + 1..u32::MAX) {
        let h = encode_header(MessageKind::Hello, len);
        let refused = matches!(parse_header(&h), Err(TransportError::FrameTooLarge { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn other_versions_are_named(version in any::<u16>().prop_filter("not ours", |v| *v != PROTOCOL_VERSION)) {
        let mut h = encode_header(MessageKind::Welcome, 0);
        h[4..6].copy_from_slice(&version.to_le_bytes());
        let named = matches!(parse_header(&h), Err(TransportError::VersionMismatch { ours: PROTOCOL_VERSION, theirs }) if theirs == version);
        prop_assert!(named);
    }

    #[test]
    fn read_requests_round_trip(id in any::<u64>(), region in any::<u32>(), first in any::<u64>(), pages in any::<u32>()) {
        let req = ReadRequest { id, run: PageRun::new(region, first, pages) };
        prop_assert_eq!(ReadRequest::decode(&req.encode()).unwrap(), req);
    }

    #[test]
    fn reply_prefixes_round_trip_and_check_the_request(pages in 1u32..=1024, zero_bits in any::<[u64; 16]>(), id in any::<u64>()) {
        let mut zero = ZeroMask::default();
        for p in 0..pages {
            if zero_bits[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                zero.set(p);
            }
        }
        let reply = ReadReply { id, status: ReadStatus::Ok, pages, zero };
        let mut prefix = Vec::new();
        reply.encode_prefix(4096, &mut prefix);
        let req = ReadRequest { id, run: PageRun::new(0, 0, pages) };
        prop_assert_eq!(ReadReply::decode_prefix(&prefix, &req, 4096).unwrap(), reply);
        let other = ReadRequest { id: id.wrapping_add(1), run: req.run };
        let refused = ReadReply::decode_prefix(&prefix, &other, 4096).is_err();
        prop_assert!(refused, "a reply to another request is refused");
    }
}

#[test]
fn reply_with_mask_bits_past_the_run_is_refused() {
    let mut zero = ZeroMask::default();
    zero.set(5);
    let reply = ReadReply { id: 1, status: ReadStatus::Ok, pages: 3, zero };
    let mut prefix = Vec::new();
    reply.encode_prefix(4096, &mut prefix);
    let req = ReadRequest { id: 1, run: PageRun::new(0, 0, 3) };
    assert!(matches!(ReadReply::decode_prefix(&prefix, &req, 4096), Err(TransportError::Malformed { .. })));
}

#[test]
fn bad_magic_is_named() {
    let mut h = encode_header(MessageKind::Welcome, 0);
    h[0] ^= 0xff;
    assert!(matches!(parse_header(&h), Err(TransportError::BadMagic(m)) if m != MAGIC));
}

/// Runs a server handshake on one end of a socket pair and `client` on the other.
fn handshake_pair<T: Send + 'static>(
    server_key: PreSharedKey,
    server_layout: MemoryLayout,
    session: SessionId,
    client: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> (ferry_transport::Result<Lane>, T) {
    let (mut s, c) = UnixStream::pair().unwrap();
    let client = std::thread::spawn(move || client(c));
    let server = server_handshake(&mut s, &server_key, session, &server_layout);
    drop(s);
    (server, client.join().unwrap())
}

#[test]
fn handshake_succeeds_with_the_same_key() {
    let session = SessionId::random().unwrap();
    let (server, client) = handshake_pair(key_a(), small_layout(), session, |mut c| {
        client_handshake(&mut c, &key_a(), Lane::Bulk, SessionId::NEW, Some(&small_layout()))
    });
    assert_eq!(server.unwrap(), Lane::Bulk);
    let cs = client.unwrap();
    assert_eq!(cs.session, session);
    assert_eq!(cs.layout, small_layout());
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), |mut c| {
        client_handshake(&mut c, &key_b(), Lane::Urgent, SessionId::NEW, None)
    });
    assert!(matches!(client, Err(TransportError::AuthFailed(_))), "{client:?}");
    assert!(matches!(server, Err(TransportError::Refused { reason: RejectReason::Auth, .. })), "{server:?}");
}

#[test]
fn forged_client_proof_is_refused() {
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), |mut c| {
        let hello = Control::Hello(Hello { lane: Lane::Urgent, session: SessionId::NEW, nonce: [1; 32], layout: None });
        c.write_all(&hello.encode()).unwrap();
        let challenge = read_control(&mut c).unwrap();
        assert!(matches!(challenge, Control::Challenge(_)));
        c.write_all(&Control::Proof([0x42; 32]).encode()).unwrap();
        read_control(&mut c)
    });
    assert!(matches!(server, Err(TransportError::AuthFailed(_))), "{server:?}");
    assert!(matches!(client, Ok(Control::Reject { reason: RejectReason::Auth, .. })), "{client:?}");
}

#[test]
fn other_protocol_version_is_refused_on_both_sides() {
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), |mut c| {
        let mut frame =
            Control::Hello(Hello { lane: Lane::Urgent, session: SessionId::NEW, nonce: [1; 32], layout: None })
                .encode();
        frame[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        c.write_all(&frame).unwrap();
        read_control(&mut c)
    });
    assert!(matches!(server, Err(TransportError::VersionMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1));
    assert!(matches!(client, Ok(Control::Reject { reason: RejectReason::Version, .. })), "{client:?}");
}

#[test]
fn client_sees_a_server_of_another_version() {
    let (mut s, mut c) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        let mut frame = Control::Welcome.encode();
        frame[4..6].copy_from_slice(&9u16.to_le_bytes());
        s.write_all(&frame).unwrap();
    });
    let err = client_handshake(&mut c, &key_a(), Lane::Urgent, SessionId::NEW, None).unwrap_err();
    assert!(matches!(err, TransportError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: 9 }), "{err:?}");
    server.join().unwrap();
}

#[test]
fn other_layout_is_refused_on_both_sides() {
    let theirs = MemoryLayout::single(8 << 20).unwrap();
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), move |mut c| {
        client_handshake(&mut c, &key_a(), Lane::Urgent, SessionId::NEW, Some(&theirs))
    });
    assert!(matches!(server, Err(TransportError::LayoutMismatch(_))), "{server:?}");
    assert!(matches!(client, Err(TransportError::Refused { reason: RejectReason::Layout, .. })), "{client:?}");
}

#[test]
fn unknown_session_is_refused() {
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), |mut c| {
        client_handshake(&mut c, &key_a(), Lane::Urgent, SessionId::random().unwrap(), None)
    });
    assert!(matches!(server, Err(TransportError::Refused { reason: RejectReason::UnknownSession, .. })));
    assert!(matches!(client, Err(TransportError::Refused { reason: RejectReason::UnknownSession, .. })), "{client:?}");
}

#[test]
fn a_peer_that_vanishes_mid_handshake_is_an_error() {
    let (server, client) = handshake_pair(key_a(), small_layout(), SessionId::random().unwrap(), |mut c| {
        let frame = Control::Hello(Hello { lane: Lane::Urgent, session: SessionId::NEW, nonce: [1; 32], layout: None })
            .encode();
        c.write_all(&frame[..HEADER_LEN + 3]).unwrap();
    });
    assert!(matches!(server, Err(TransportError::PeerClosed)), "{server:?}");
    let () = client;
}

/// A plaintext server: these tests speak the raw protocol (tests/tls.rs covers encrypted lanes).
fn tcp_server() -> (TcpPageServer, Arc<GuestMemory>) {
    let memory = Arc::new(GuestMemory::create(small_layout(), Backing::Anonymous).unwrap());
    ferry_transport::pattern::fill_memory(&memory, 1).unwrap();
    (TcpPageServer::start("127.0.0.1:0", memory.clone(), key_a(), plaintext()).unwrap(), memory)
}

fn plaintext() -> TcpOptions {
    TcpOptions { encryption: tcp::Encryption::Off, ..TcpOptions::default() }
}

/// An authenticated raw connection, for sending requests the real client would never send.
fn raw_lane(server: &TcpPageServer) -> TcpStream {
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    client_handshake(&mut s, &key_a(), Lane::Urgent, SessionId::NEW, None).unwrap();
    s
}

#[test]
fn server_refuses_reads_outside_its_regions_and_keeps_serving() {
    let (server, _memory) = tcp_server();
    let mut s = raw_lane(&server);
    for (id, run) in [(1, PageRun::new(3, 0, 1)), (2, PageRun::new(0, 1023, 2)), (3, PageRun::new(0, u64::MAX, 1))] {
        let req = ReadRequest { id, run };
        s.write_all(&req.encode()).unwrap();
        let mut prefix = vec![0u8; ReadReply::prefix_len(run.pages)];
        s.read_exact(&mut prefix).unwrap();
        let reply = ReadReply::decode_prefix(&prefix, &req, 4096).unwrap();
        assert_eq!(reply.status, ReadStatus::OutOfRange, "{run:?}");
    }
    let req = ReadRequest { id: 4, run: PageRun::new(0, 1, 1) };
    s.write_all(&req.encode()).unwrap();
    let mut prefix = vec![0u8; ReadReply::prefix_len(1)];
    s.read_exact(&mut prefix).unwrap();
    let reply = ReadReply::decode_prefix(&prefix, &req, 4096).unwrap();
    assert_eq!(reply.status, ReadStatus::Ok);
    let mut page = vec![0u8; 4096];
    s.read_exact(&mut page).unwrap();
    assert!(ferry_transport::pattern::check_page(&page, 1, 1));
    assert_eq!(server.stats().refused_reads.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn server_drops_a_connection_that_sends_garbage_and_serves_others() {
    let (server, _memory) = tcp_server();
    for garbage in [
        vec![0u8; READ_REQUEST_FRAME_LEN],
        ReadRequest { id: 1, run: PageRun::new(0, 0, 0) }.encode().to_vec(),
        ReadRequest { id: 1, run: PageRun::new(0, 0, 5000) }.encode().to_vec(),
    ] {
        let mut s = raw_lane(&server);
        s.write_all(&garbage).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "the server closes the connection");
    }
    let mut src = tcp::connect(server.local_addr(), &key_a(), None, &plaintext()).unwrap();
    let mut page = vec![0u8; 4096];
    src.urgent.read(PageRun::new(0, 2, 1), &mut page).unwrap();
    assert!(ferry_transport::pattern::check_page(&page, 2, 1));
}

#[test]
fn client_checks_runs_and_buffers_before_sending() {
    let (server, _memory) = tcp_server();
    let mut src = tcp::connect(server.local_addr(), &key_a(), Some(&small_layout()), &plaintext()).unwrap();
    let mut small = vec![0u8; 4096];
    assert!(matches!(src.urgent.read(PageRun::new(0, 0, 2), &mut small), Err(TransportError::BufferSize { .. })));
    assert!(matches!(src.urgent.read(PageRun::new(0, 1024, 1), &mut small), Err(TransportError::OutOfRange(_))));
    let depth = src.bulk.depth();
    for i in 0..depth {
        src.bulk
            .submit(BulkRead { run: PageRun::new(0, i as u64, 1), buf: PageBuf::new(4096).into(), tag: i as u64 })
            .unwrap();
    }
    let over = src.bulk.submit(BulkRead { run: PageRun::new(0, 0, 1), buf: PageBuf::new(4096).into(), tag: 0 });
    assert!(matches!(over, Err(TransportError::LaneFull(n)) if n == depth));
    for i in 0..depth {
        let done = src.bulk.complete().unwrap().unwrap();
        assert_eq!(done.tag, i as u64);
    }
    assert!(src.bulk.complete().unwrap().is_none());
}

#[test]
fn lanes_resume_after_the_connection_breaks() {
    let (server, _memory) = tcp_server();
    let mut src = tcp::connect(server.local_addr(), &key_a(), None, &plaintext()).unwrap();
    let mut page = vec![0u8; 4096];
    src.urgent.read(PageRun::new(0, 5, 1), &mut page).unwrap();
    src.bulk.submit(BulkRead { run: PageRun::new(0, 100, 4), buf: PageBuf::new(4 * 4096).into(), tag: 9 }).unwrap();
    server.drop_connections();
    assert!(src.urgent.read(PageRun::new(0, 6, 1), &mut page).is_err(), "a broken lane reports an error");
    assert!(src.bulk.complete().is_err());
    let mut resumed = tcp::resume(server.local_addr(), &key_a(), src.session, &src.layout, &plaintext()).unwrap();
    assert_eq!(resumed.session, src.session);
    resumed.urgent.read(PageRun::new(0, 6, 1), &mut page).unwrap();
    assert!(ferry_transport::pattern::check_page(&page, 6, 1));
    resumed.bulk.submit(BulkRead { run: PageRun::new(0, 100, 4), buf: PageBuf::new(4 * 4096).into(), tag: 9 }).unwrap();
    let done = resumed.bulk.complete().unwrap().unwrap();
    for i in 0..4 {
        assert!(ferry_transport::pattern::check_page(&done.buf[i * 4096..(i + 1) * 4096], 100 + i as u64, 1));
    }
}

#[test]
fn a_vanished_server_is_an_error_not_a_hang() {
    let (server, _memory) = tcp_server();
    let mut src = tcp::connect(server.local_addr(), &key_a(), None, &plaintext()).unwrap();
    let addr = server.local_addr();
    server.shutdown();
    let mut page = vec![0u8; 4096];
    assert!(src.urgent.read(PageRun::new(0, 0, 1), &mut page).is_err());
    assert!(tcp::connect(addr, &key_a(), None, &plaintext()).is_err());
}

#[test]
fn local_server_refuses_a_wrong_key() {
    let memory = Arc::new(GuestMemory::create(small_layout(), Backing::Memfd).unwrap());
    let path = std::env::temp_dir().join(format!("ferry-local-key-{}.sock", std::process::id()));
    let server = ferry_transport::local::LocalPageServer::start(&path, memory, key_a()).unwrap();
    let err = ferry_transport::local::connect(server.path(), &key_b(), None, 8).unwrap_err();
    assert!(matches!(err, TransportError::AuthFailed(_)), "{err:?}");
    let anon = Arc::new(GuestMemory::create(small_layout(), Backing::Anonymous).unwrap());
    let err = ferry_transport::local::LocalPageServer::start(path.with_extension("2"), anon, key_a()).unwrap_err();
    assert!(matches!(err, TransportError::BadSharedMemory(_)), "anonymous memory cannot be shared: {err:?}");
}

#[test]
fn a_handshake_trickled_a_byte_at_a_time_is_cut_at_its_deadline() {
    // Each byte arrives well inside the per-read timeout; the handshake as a whole may not take
    // longer than it either.
    let options = TcpOptions { io_timeout: std::time::Duration::from_millis(500), ..TcpOptions::default() };
    let memory = Arc::new(GuestMemory::create(small_layout(), Backing::Anonymous).unwrap());
    let server = TcpPageServer::start("127.0.0.1:0", memory, key_a(), options).unwrap();
    let mut peer = TcpStream::connect(server.local_addr()).unwrap();
    let hello =
        Control::Hello(Hello { lane: Lane::Urgent, session: SessionId::NEW, nonce: [7; 32], layout: None }).encode();
    peer.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
    let mut cut_after = None;
    for (i, byte) in hello.iter().cycle().take(400).enumerate() {
        let mut buf = [0u8; 64];
        // A closed connection reads as end-of-stream (or a reset) instead of timing out.
        match peer.read(&mut buf) {
            Ok(0) => {
                cut_after = Some(i);
                break;
            }
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                cut_after = Some(i);
                break;
            }
            _ => {}
        }
        if peer.write_all(&[*byte]).is_err() {
            cut_after = Some(i);
            break;
        }
    }
    let n = cut_after.expect("the server kept a trickling handshake open for 400 bytes (40 s)");
    assert!(n < hello.len(), "cut after {n} bytes, the hello alone has {}", hello.len());
}

#[test]
fn a_session_reader_refuses_another_frame_kind_before_reading_its_payload() {
    // A ReadReply header announcing a payload that never comes: refused on the header alone
    // (reading, let alone allocating, the payload first would end in "peer closed" here, and
    // on a socket wait for bytes never sent).
    let header = encode_header(MessageKind::ReadReply, 1000);
    let mut r = Cursor::new(header.to_vec());
    match ferry_transport::wire::read_session(&mut r) {
        Err(TransportError::Unexpected { got, .. }) => assert_eq!(got, MessageKind::ReadReply as u16),
        other => panic!("expected a refusal of the frame kind, got {other:?}"),
    }
}
