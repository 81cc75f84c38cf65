//! TLS 1.3 for tcp lanes (rustls on aws-lc-rs): guest memory and session messages encrypted on
//! the wire, authenticated by the pre-shared key.
//!
//! rustls has no external pre-shared keys for TLS 1.3, so the key authenticates inside the
//! channel instead: the page server presents a throwaway self-signed certificate (made when it
//! starts; the client checks only that the server holds its private key), then ferry's own
//! handshake runs over TLS with both HMAC proofs bound to the TLS session through an exporter
//! ([RFC 5705]/[RFC 8446 §7.5]). A machine in the middle terminates two TLS sessions with two
//! different exporter values, so the proofs it relays verify on neither side. Only TLS 1.3 is
//! offered, without resumption or tickets.
//!
//! A [`TlsStream`] is one connection shared by several handles: one thread may read while
//! another writes (the control lane's heartbeats), each direction serialized by its own lock,
//! and a read waiting on the socket holds neither the connection's state nor the writer up.
//!
//! Page lanes (urgent, bulk) leave rustls once the handshake is over (`TlsStream::into_records`):
//! they take the session's traffic keys and protect TLS 1.3 records themselves with aws-lc-rs's
//! AES-GCM, as kernel TLS does with keys a TLS library hands it (this crate does not rely on
//! kernel TLS, which many kernels lack). rustls's buffered API copies each received byte three
//! times; the records here are sealed in place from guest memory and opened straight into the
//! page buffer, which is what brings encrypted bulk from about half of plaintext to about 70%.
//! Interop with rustls is tested both ways.
//!
//! [RFC 5705]: https://www.rfc-editor.org/rfc/rfc5705
//! [RFC 8446 §7.5]: https://www.rfc-editor.org/rfc/rfc8446#section-7.5

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig, ServerConnection};

use crate::error::{Result, TransportError};
use crate::handshake::Deadline;

/// Whether a tcp lane runs over TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// TLS 1.3 (AES-GCM), authenticated by the pre-shared key. A server that requires it
    /// refuses plaintext clients with [`crate::wire::RejectReason::Encryption`].
    #[default]
    Tls,
    /// Plaintext: for a link that is already private (a dedicated back-to-back cable, a VPN).
    /// The handshake still authenticates both sides; nothing is hidden from the link.
    Off,
}

/// The exporter label both sides feed the handshake's proofs with.
const BINDING_LABEL: &[u8] = b"EXPORTER-ferry/1 lane binding";
/// Bytes of exporter output bound into the proofs.
pub(crate) const BINDING_LEN: usize = 32;
/// The name the client asks for (not checked: the key authenticates the server).
const SERVER_NAME: &str = "ferry-page-server";
/// Ciphertext read from the socket at once: big enough that a bulk reply costs few receives.
const CIPHER_BUF: usize = 256 * 1024;

/// The suites we offer: AES-GCM first (several GB/s per core with AES-NI), TLS 1.3 only.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = aws_lc_rs::default_provider();
            p.cipher_suites = vec![
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(p)
        })
        .clone()
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what}: {e}"))
}

/// A page server's TLS identity: a certificate and key made when it starts, never stored.
#[derive(Clone)]
pub(crate) struct TlsServer {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer(<throwaway certificate>)")
    }
}

impl TlsServer {
    pub(crate) fn new() -> Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .map_err(|e| tls_error("making the server's certificate", e))?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("configuring TLS", e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| tls_error("loading the server's certificate", e))?;
        // No resumption: every lane is a full handshake bound to the key.
        config.send_tls13_tickets = 0;
        // Page lanes carry on with the session's keys outside rustls (`into_records`).
        config.enable_secret_extraction = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(TlsServer { config: Arc::new(config) })
    }

    /// Runs the server side of a TLS handshake on `sock`, finished by `until` (`limit` is the
    /// socket's timeout afterwards).
    pub(crate) fn accept(&self, sock: &TcpStream, until: Instant, limit: Duration) -> Result<TlsStream> {
        let conn = ServerConnection::new(self.config.clone()).map_err(|e| tls_error("starting TLS", e))?;
        TlsStream::handshake(sock, Connection::Server(conn), until, limit)
    }
}

fn client_config() -> Result<Arc<ClientConfig>> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("configuring TLS", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KeyBoundServer))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_secret_extraction = true;
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// Runs the client side of a TLS handshake on `sock`, finished by `until`.
pub(crate) fn connect(sock: &TcpStream, until: Instant, limit: Duration) -> Result<TlsStream> {
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| tls_error("server name", e))?;
    let conn = ClientConnection::new(client_config()?, name).map_err(|e| tls_error("starting TLS", e))?;
    TlsStream::handshake(sock, Connection::Client(conn), until, limit)
}

/// Accepts any certificate but checks that the server signed the handshake with its key: who
/// the server is, the pre-shared key proves afterwards, over this very TLS session.
#[derive(Debug)]
struct KeyBoundServer;

impl ServerCertVerifier for KeyBoundServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("ferry speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// One end of a TLS connection; clones share it (see the module doc).
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

struct Shared {
    sock: TcpStream,
    conn: Mutex<Connection>,
    /// Held across a read: ciphertext received and not yet handed to rustls.
    reading: Mutex<Incoming>,
    /// Held across a write, so records reach the socket in sequence order.
    writing: Mutex<()>,
}

struct Incoming {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Incoming {
    /// The length (header included) of the whole record at the front, if it is all here.
    fn whole_record(&self) -> std::io::Result<Option<usize>> {
        let have = &self.buf[self.start..self.end];
        if have.len() < RECORD_HEADER {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([have[3], have[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a TLS record longer than TLS allows"));
        }
        Ok((have.len() >= RECORD_HEADER + len).then_some(RECORD_HEADER + len))
    }

    /// Receives more ciphertext behind what is here (moved to the front first).
    fn receive(&mut self, mut from: impl Read) -> std::io::Result<usize> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let n = from.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("peer", &self.shared.sock.peer_addr().ok()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    fn handshake(sock: &TcpStream, mut conn: Connection, until: Instant, limit: Duration) -> Result<Self> {
        let owned = sock.try_clone()?;
        let mut incoming = Incoming { buf: vec![0; CIPHER_BUF].into_boxed_slice(), start: 0, end: 0 };
        {
            let mut io = Deadline::until(sock, until, limit);
            let closed = || {
                TransportError::Tls(
                    "the peer closed the connection during the TLS handshake (does it run with encryption off?)".into(),
                )
            };
            loop {
                while conn.wants_write() {
                    conn.write_tls(&mut io).map_err(TransportError::from_read)?;
                }
                if !conn.is_handshaking() {
                    break;
                }
                // Whole records only, as in `read`: what follows the handshake stays in `incoming`.
                let Some(len) = incoming.whole_record().map_err(|e| tls_error("TLS handshake", e))? else {
                    match incoming.receive(&mut io) {
                        Ok(0) => return Err(closed()),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(closed()),
                        Err(e) => return Err(TransportError::from_read(e)),
                    }
                };
                let mut record = &incoming.buf[incoming.start..incoming.start + len];
                while !record.is_empty() {
                    if conn.read_tls(&mut record).map_err(|e| tls_error("TLS handshake", e))? == 0 {
                        return Err(TransportError::Tls("rustls took no bytes".into()));
                    }
                }
                incoming.start += len;
                if let Err(e) = conn.process_new_packets() {
                    // Tell the peer why (best effort), then fail.
                    let _ = conn.write_tls(&mut io);
                    return Err(tls_error("TLS handshake", e));
                }
            }
        }
        // Writes encrypt all they are given at once; `drain` then sends it as the socket takes it.
        conn.set_buffer_limit(None);
        Ok(TlsStream {
            shared: Arc::new(Shared {
                sock: owned,
                conn: Mutex::new(conn),
                reading: Mutex::new(incoming),
                writing: Mutex::new(()),
            }),
        })
    }

    /// The value both ends of this TLS session, and only they, compute: bound into the handshake's
    /// proofs.
    pub(crate) fn binding(&self) -> Result<[u8; BINDING_LEN]> {
        lock(&self.shared.conn)
            .export_keying_material([0u8; BINDING_LEN], BINDING_LABEL, None)
            .map_err(|e| tls_error("exporting the channel binding", e))
    }

    /// The socket underneath (timeouts, shutdown, poll).
    pub fn socket(&self) -> &TcpStream {
        &self.shared.sock
    }

    /// Whether decrypted bytes, or received ciphertext not yet decrypted, wait to be read.
    pub(crate) fn has_buffered(&self) -> bool {
        let incoming = lock(&self.shared.reading);
        if incoming.start < incoming.end {
            return true;
        }
        let mut conn = lock(&self.shared.conn);
        conn.process_new_packets().map(|s| s.plaintext_bytes_to_read() > 0).unwrap_or(true)
    }

    /// Sends what rustls queued (alerts, responses to the peer's key updates) from the reading side.
    fn send_queued(&self) -> std::io::Result<()> {
        let _writing = lock(&self.shared.writing);
        self.drain()
    }

    /// Sends every record rustls holds, straight from its buffers, within the socket's write
    /// timeout. The caller holds `writing`. The socket is written without blocking and the wait
    /// for room happens without the connection's lock, so a reader is never held up by a peer
    /// that is slow to take our bytes (it may be waiting for us to read).
    fn drain(&self) -> std::io::Result<()> {
        let sock = &self.shared.sock;
        let deadline = sock.write_timeout()?.map(|t| Instant::now() + t);
        loop {
            {
                let mut conn = lock(&self.shared.conn);
                while conn.wants_write() {
                    match conn.write_tls(&mut SendNow(sock)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                if !conn.wants_write() {
                    return Ok(());
                }
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    // As a blocking socket's send timeout reports it.
                    _ => return Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, "the peer took nothing")),
                },
            };
            wait_writable(sock, left)?;
        }
    }
}

/// The socket, written without blocking (`MSG_DONTWAIT`): what it does not take stays queued.
struct SendNow<'a>(&'a TcpStream);

impl Write for SendNow<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads them.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024);
        // SAFETY: msg describes the caller's slices, valid for the duration of the call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// poll(2) for room to write on `sock`, up to `timeout` (`None`: forever).
fn wait_writable(sock: &TcpStream, timeout: Option<Duration>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
    }
    Ok(())
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TlsStream {
    /// Carries on this TLS session outside rustls, for a page lane: its traffic keys and sequence
    /// numbers go to a [`RecordReader`] and a [`RecordWriter`], which protect TLS 1.3 records
    /// (RFC 8446 §5.2-5.3) with the same AES-GCM from aws-lc-rs, as kernel TLS does with keys a
    /// TLS library hands it. A reply is then decrypted in place where it was received and copied
    /// once, into the page buffer (rustls's buffered API copies it three times), and a reply is
    /// sealed in place. Call it between messages (ferry's handshake is over and the peer waits
    /// for us), on the only handle. Key updates and alerts end the lane; so does reaching the
    /// suite's key-use limit (a reconnection brings fresh keys).
    pub(crate) fn into_records(self) -> Result<(RecordReader, RecordWriter)> {
        let shared = Arc::try_unwrap(self.shared)
            .map_err(|_| TransportError::Tls("a lane handed to the record layer has other handles".into()))?;
        let incoming = shared.reading.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut conn = shared.conn.into_inner().unwrap_or_else(|e| e.into_inner());
        let pending = conn.process_new_packets().map_err(|e| tls_error("TLS", e))?;
        if pending.plaintext_bytes_to_read() > 0 || conn.wants_write() {
            return Err(TransportError::Tls("data arrived out of turn during the handshake".into()));
        }
        let limit = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.tls13())
            .ok_or_else(|| TransportError::Tls("no TLS 1.3 suite negotiated".into()))?
            .common
            .confidentiality_limit;
        let secrets = conn.dangerous_extract_secrets().map_err(|e| tls_error("taking over the session's keys", e))?;
        let ((tx_seq, tx), (rx_seq, rx)) = (secrets.tx, secrets.rx);
        let mut buf = incoming.buf;
        // Ciphertext already received and not yet given to rustls belongs to the records.
        buf.copy_within(incoming.start..incoming.end, 0);
        let reader = RecordReader {
            sock: shared.sock.try_clone()?,
            key: RecordKey::new(tx_or_rx(rx)?, rx_seq, limit)?,
            buf,
            start: 0,
            end: incoming.end - incoming.start,
            plain: 0..0,
        };
        let writer =
            RecordWriter { sock: shared.sock, key: RecordKey::new(tx_or_rx(tx)?, tx_seq, limit)?, out: Vec::new() };
        Ok((reader, writer))
    }
}

fn tx_or_rx(secrets: rustls::ConnectionTrafficSecrets) -> Result<(&'static aead::Algorithm, Vec<u8>, [u8; 12])> {
    let iv = |iv: rustls::crypto::cipher::Iv| -> Result<[u8; 12]> {
        iv.as_ref().try_into().map_err(|_| TransportError::Tls("an IV that is not 12 bytes".into()))
    };
    match secrets {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv: v } => {
            Ok((&aead::AES_128_GCM, key.as_ref().to_vec(), iv(v)?))
        }
        rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv: v } => {
            Ok((&aead::AES_256_GCM, key.as_ref().to_vec(), iv(v)?))
        }
        _ => Err(TransportError::Tls("a suite ferry does not offer".into())),
    }
}

use ::aws_lc_rs::aead;

/// One direction's traffic key, its IV and the next record's sequence number.
struct RecordKey {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    limit: u64,
}

impl RecordKey {
    fn new((alg, key, iv): (&'static aead::Algorithm, Vec<u8>, [u8; 12]), seq: u64, limit: u64) -> Result<Self> {
        let key = aead::UnboundKey::new(alg, &key).map_err(|e| tls_error("the session's key", e))?;
        Ok(RecordKey { key: aead::LessSafeKey::new(key), iv, seq, limit })
    }

    /// The per-record nonce: the IV with the sequence number XORed into its low 8 bytes
    /// (RFC 8446 §5.3); each sequence number is used once.
    fn next_nonce(&mut self) -> std::io::Result<aead::Nonce> {
        if self.seq >= self.limit {
            return Err(std::io::Error::other("the session's keys reached their use limit: reconnect"));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// The largest plaintext a TLS record carries, and the most its protection adds (RFC 8446 §5.2).
const MAX_PLAINTEXT: usize = 1 << 14;
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const RECORD_HEADER: usize = 5;
const TAG_LEN: usize = 16;
const APPLICATION_DATA: u8 = 23;

/// The header of a record whose protected body is `len` bytes: also the AEAD's associated data.
fn record_header(len: usize) -> [u8; RECORD_HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// The content's length in a record's inner plaintext (content, the true content type, zero
/// padding), which must be application data.
fn content_length(inner: &[u8]) -> std::io::Result<usize> {
    let Some(typ_at) = inner.iter().rposition(|&b| b != 0) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a record without a content type"));
    };
    if inner[typ_at] != APPLICATION_DATA {
        // An alert (the peer closing or failing) or a key update: the lane ends.
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!("the peer sent a record of content type {} on a page lane", inner[typ_at]),
        ));
    }
    Ok(typ_at)
}

/// The receiving half of a TLS session carried on by ferry (see [`TlsStream::into_records`]).
pub(crate) struct RecordReader {
    sock: TcpStream,
    key: RecordKey,
    /// Ciphertext received; records are decrypted in place.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Decrypted bytes of the current record not yet read.
    plain: std::ops::Range<usize>,
}

impl RecordReader {
    /// Decrypts the next whole record in place, receiving until one is there. `Ok(false)` at the
    /// peer's close between records.
    fn next_record(&mut self) -> std::io::Result<bool> {
        loop {
            if let Some(len) = self.record_ready()? {
                self.open_record(len)?;
                return Ok(true);
            }
            if self.start > 0 && self.buf.len() - self.end < MAX_CIPHERTEXT + RECORD_HEADER {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = (&self.sock).read(&mut self.buf[self.end..])?;
            if n == 0 {
                if self.end == self.start {
                    return Ok(false);
                }
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed inside a record"));
            }
            self.end += n;
        }
    }

    /// The body length of the whole record waiting in the buffer, if one is.
    fn record_ready(&self) -> std::io::Result<Option<usize>> {
        let have = self.end - self.start;
        if have < RECORD_HEADER {
            return Ok(None);
        }
        let h = &self.buf[self.start..self.start + RECORD_HEADER];
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if h[..3] != [APPLICATION_DATA, 3, 3] || !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a TLS 1.3 application data record: header {h:02x?}"),
            ));
        }
        Ok((have >= RECORD_HEADER + len).then_some(len))
    }

    /// Opens the whole record at the front into `out` (its protected length less the tag);
    /// returns the content's length.
    fn open_record_into(&mut self, len: usize, out: &mut [u8]) -> std::io::Result<usize> {
        let nonce = self.key.next_nonce()?;
        let header = record_header(len);
        let body = self.start + RECORD_HEADER..self.start + RECORD_HEADER + len;
        let (ciphertext, tag) = self.buf[body.clone()].split_at(len - TAG_LEN);
        self.key.key.open_separate_gather(nonce, aead::Aad::from(header), ciphertext, tag, out).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "a record does not decrypt: changed in transit?")
        })?;
        let content = content_length(out)?;
        self.start = body.end;
        Ok(content)
    }

    fn open_record(&mut self, len: usize) -> std::io::Result<()> {
        let nonce = self.key.next_nonce()?;
        let header = record_header(len);
        let body = self.start + RECORD_HEADER..self.start + RECORD_HEADER + len;
        let opened =
            self.key.key.open_in_place(nonce, aead::Aad::from(header), &mut self.buf[body.clone()]).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "a record does not decrypt: changed in transit?")
            })?;
        let typ_at = content_length(opened)?;
        self.plain = body.start..body.start + typ_at;
        self.start = body.end;
        Ok(())
    }
}

impl Read for RecordReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.plain.is_empty() {
                // A whole record with room for it in `buf`: decrypt it straight there, one pass.
                if let Some(len) = self.record_ready()? {
                    if buf.len() - filled >= len - TAG_LEN {
                        filled += self.open_record_into(len, &mut buf[filled..filled + len - TAG_LEN])?;
                        continue;
                    }
                }
                // Block only while nothing was read.
                if filled > 0 && self.record_ready()?.is_none() {
                    break;
                }
                if !self.next_record()? {
                    break;
                }
                continue;
            }
            let n = self.plain.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
            self.plain.start += n;
            filled += n;
        }
        Ok(filled)
    }
}

/// The sending half of a TLS session carried on by ferry (see [`TlsStream::into_records`]).
pub(crate) struct RecordWriter {
    sock: TcpStream,
    key: RecordKey,
    /// Records being built and sealed in place, then sent with one write.
    out: Vec<u8>,
}

impl RecordWriter {
    /// Sends `len` bytes of plaintext in records of at most 16 KiB, each filled in place by
    /// `fill(offset, piece)` (the piece's offset in the `len` bytes), sealed, and all of them
    /// sent with one write.
    pub(crate) fn send_with(
        &mut self,
        len: usize,
        fill: impl FnMut(usize, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        let sent = self.seal_into(&mut out, len, fill).and_then(|total| (&self.sock).write_all(&out[..total]));
        self.out = out;
        sent
    }

    /// Builds the records of `len` bytes of plaintext in `out`, each filled in place by
    /// `fill(offset, piece)` and sealed; returns their length. The records must then be sent, in
    /// the order they were sealed.
    fn seal_into(
        &mut self,
        out: &mut Vec<u8>,
        len: usize,
        mut fill: impl FnMut(usize, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<usize> {
        let records = len.div_ceil(MAX_PLAINTEXT).max(1);
        let total = len + records * (RECORD_HEADER + 1 + TAG_LEN);
        // The buffer only grows: every byte sent is written first (header, `fill`, type, tag).
        if out.len() < total {
            out.resize(total, 0);
        }
        let (mut offset, mut at) = (0, 0);
        for _ in 0..records {
            let n = (len - offset).min(MAX_PLAINTEXT);
            let header = record_header(n + 1 + TAG_LEN);
            out[at..at + RECORD_HEADER].copy_from_slice(&header);
            let body = at + RECORD_HEADER..at + RECORD_HEADER + n + 1;
            fill(offset, &mut out[body.start..body.end - 1])?;
            out[body.end - 1] = APPLICATION_DATA;
            let nonce = self.key.next_nonce()?;
            let tag = self
                .key
                .key
                .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut out[body.clone()])
                .map_err(|_| std::io::Error::other("sealing a record failed"))?;
            out[body.end..body.end + TAG_LEN].copy_from_slice(tag.as_ref());
            offset += n;
            at = body.end + TAG_LEN;
        }
        Ok(total)
    }

    /// Runs `work` with a [`PipelinedWriter`]: records are sealed on the calling thread and
    /// written by another, so sealing one reply overlaps sending the one before (the bulk lane's
    /// server: the kernel's copy into the socket is a fifth of its work).
    pub(crate) fn pipelined<T>(self, work: impl FnOnce(&mut PipelinedWriter) -> T) -> std::io::Result<T> {
        const BUFFERS: usize = 3;
        let (free_tx, free) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
        let (full, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = free_tx.send(Vec::new());
        }
        let sock = self.sock.try_clone()?;
        std::thread::scope(|scope| {
            let sender = std::thread::Builder::new().name("ferry-tls-send".into()).spawn_scoped(scope, move || {
                for (buf, len) in full_rx {
                    if let Err(e) = (&sock).write_all(&buf[..len]) {
                        // The sealing side sees the lane fail when it finds no buffer back.
                        let _ = sock.shutdown(std::net::Shutdown::Both);
                        return Err(e);
                    }
                    if free_tx.send(buf).is_err() {
                        break;
                    }
                }
                Ok(())
            })?;
            let mut writer = PipelinedWriter { records: self, free, full: Some(full) };
            let result = work(&mut writer);
            writer.full = None;
            drop(writer);
            match sender.join() {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Ok(result),
                Err(_) => Err(std::io::Error::other("the record sender panicked")),
            }
        })
    }
}

/// A [`RecordWriter`] whose records another thread sends (see [`RecordWriter::pipelined`]).
pub(crate) struct PipelinedWriter {
    records: RecordWriter,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    full: Option<std::sync::mpsc::SyncSender<(Vec<u8>, usize)>>,
}

impl PipelinedWriter {
    /// As [`RecordWriter::send_with`]; returns once the records are sealed and queued.
    pub(crate) fn send_with(
        &mut self,
        len: usize,
        fill: impl FnMut(usize, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the record sender stopped");
        let mut buf = self.free.recv().map_err(|_| gone())?;
        let total = self.records.seal_into(&mut buf, len, fill)?;
        self.full.as_ref().ok_or_else(gone)?.send((buf, total)).map_err(|_| gone())
    }
}

impl Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send_with(buf.len(), |offset, piece| {
            piece.copy_from_slice(&buf[offset..offset + piece.len()]);
            Ok(())
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Handles share the connection, so a shared reference reads and writes too (as `&TcpStream`).
impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut incoming = lock(&self.shared.reading);
        let mut filled = 0;
        loop {
            let mut queued = false;
            {
                let mut conn = lock(&self.shared.conn);
                loop {
                    match conn.reader().read(&mut buf[filled..]) {
                        Ok(0) => return Ok(filled),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                return Ok(filled);
                            }
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if filled > 0 => {
                            // Hand over what arrived; the next read reports the failure.
                            let _ = e;
                            return Ok(filled);
                        }
                        Err(e) => return Err(e),
                    }
                    // rustls gets whole records only, so that between records it holds nothing
                    // (`into_records` takes over exactly where it stopped).
                    let Some(len) = incoming.whole_record()? else { break };
                    let Incoming { buf: cipher, start, .. } = &mut *incoming;
                    let mut record = &cipher[*start..*start + len];
                    while !record.is_empty() {
                        if conn.read_tls(&mut record)? == 0 {
                            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "rustls took no bytes"));
                        }
                    }
                    *start += len;
                    let processed = conn.process_new_packets().map_err(io_error);
                    queued |= conn.wants_write();
                    processed?;
                }
            }
            if queued {
                self.send_queued()?;
            }
            if filled > 0 {
                return Ok(filled);
            }
            let n = incoming.receive(&self.shared.sock)?;
            if n == 0 {
                // The socket's end: rustls tells a clean close (close_notify seen: Ok(0)) from a
                // truncation (UnexpectedEof) on the next pass.
                let mut conn = lock(&self.shared.conn);
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets().map_err(io_error)?;
                return match conn.reader().read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                };
            }
        }
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let _writing = lock(&self.shared.writing);
        let mut taken = 0;
        {
            let mut conn = lock(&self.shared.conn);
            for b in bufs {
                // No buffer limit: rustls takes (encrypts) all of it.
                taken += conn.writer().write(b)?;
            }
        }
        self.drain()?;
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::{self, TcpOptions, TcpPageServer};
    use crate::{Backing, GuestMemory, MemoryLayout, PreSharedKey};

    /// The record layer page lanes carry on with speaks TLS 1.3 as rustls does: records it seals
    /// open in rustls, and records rustls seals open in it, across several records each way.
    #[test]
    fn records_after_the_handshake_interoperate_with_rustls() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Duration::from_secs(5);
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let tls = TlsServer::new().unwrap().accept(&sock, Instant::now() + limit, limit).unwrap();
            // One message through rustls first, so the sequence numbers do not start at zero.
            let mut hello = [0u8; 5];
            (&tls).read_exact(&mut hello).unwrap();
            assert_eq!(&hello, b"hello");
            let (mut reader, mut writer) = tls.into_records().unwrap();
            let mut got = vec![0u8; 50_000];
            reader.read_exact(&mut got).unwrap();
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8), "rustls -> records");
            let reply: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
            writer.write_all(&reply).unwrap();
        });
        let sock = TcpStream::connect(addr).unwrap();
        let client = connect(&sock, Instant::now() + limit, limit).unwrap();
        (&client).write_all(b"hello").unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        (&client).write_all(&data).unwrap();
        let mut reply = vec![0u8; 70_000];
        (&client).read_exact(&mut reply).unwrap();
        assert!(reply.iter().enumerate().all(|(i, &b)| b == (i % 241) as u8), "records -> rustls");
        server.join().unwrap();
    }

    /// A machine in the middle that terminates TLS towards the client, opens its own TLS session
    /// to the server and relays ferry's handshake verbatim: without the key it cannot make new
    /// proofs, and the relayed ones are bound to the other TLS session.
    #[test]
    fn a_relay_terminating_tls_cannot_pass_the_key_proofs_along() {
        let key = PreSharedKey::new(*b"key for the channel binding test").unwrap();
        let memory = Arc::new(GuestMemory::create(MemoryLayout::single(1 << 20).unwrap(), Backing::Anonymous).unwrap());
        let server = TcpPageServer::start("127.0.0.1:0", memory, key.clone(), TcpOptions::default()).unwrap();
        let target = server.local_addr();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = listener.local_addr().unwrap();
        let relay = std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            let limit = Duration::from_secs(5);
            let towards_client = TlsServer::new().unwrap().accept(&client, Instant::now() + limit, limit).unwrap();
            let upstream = TcpStream::connect(target).unwrap();
            let towards_server = connect(&upstream, Instant::now() + limit, limit).unwrap();
            let (mut a, mut b) = (towards_client.clone(), towards_server.clone());
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
            });
            let (mut a, mut b) = (towards_server, towards_client);
            let _ = std::io::copy(&mut a, &mut b);
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = upstream.shutdown(std::net::Shutdown::Both);
            let _ = up.join();
        });
        let err = tcp::connect(relay_addr, &key, None, &TcpOptions::default()).unwrap_err();
        assert!(matches!(err, TransportError::AuthFailed(_)), "the relayed handshake must not verify: {err:?}");
        relay.join().unwrap();
        assert_eq!(server.stats().requests.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
