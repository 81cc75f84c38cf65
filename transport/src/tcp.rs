//! The `tcp` backend: a page server on the source and two connections per session at the
//! destination, one urgent (`TCP_NODELAY`, one request at a time) and one bulk (pipelined).
//!
//! Lanes run over TLS 1.3 by default ([`Encryption`], see [`crate::tls`]). In plaintext the server
//! answers each request with one `writev` whose data iovecs point straight into guest memory, so
//! a page is copied once, by the kernel; over TLS the pages are copied out of guest memory once
//! (volatile reads) and encrypted. All-zero pages cross as a bit in the reply's zero mask. Reads
//! are idempotent and carry the session id in the handshake, so a destination whose connection
//! broke reconnects with [`resume`] and asks again.

use std::collections::VecDeque;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::acceptor::{Acceptor, Served};
use crate::auth::PreSharedKey;
use crate::error::{Result, TransportError};
use crate::handshake::{client_handshake_bound, server_handshake_bound, Deadline};
use crate::lane::{run_dst, BulkDone, BulkLane, BulkRead, BulkTarget, PageSource, Reconnect, UrgentLane};
use crate::layout::{MemoryLayout, PageRun};
use crate::memory::GuestMemory;
pub use crate::tls::Encryption;
use crate::tls::{TlsServer, TlsStream};
use crate::wire::{Lane, ReadReply, ReadRequest, ReadStatus, SessionId, ZeroMask, READ_REQUEST_FRAME_LEN};

/// Tunables shared by the server and the client.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// How long a handshake may take, and how long a lane waits for a reply before it reports the
    /// peer as gone.
    pub io_timeout: Duration,
    /// Bulk reads in flight on the bulk connection.
    pub bulk_depth: usize,
    /// TLS or plaintext; both ends must agree (a TLS server refuses a plaintext client with a
    /// reason, a plaintext server closes on a TLS client).
    pub encryption: Encryption,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { io_timeout: Duration::from_secs(10), bulk_depth: 32, encryption: Encryption::Tls }
    }
}

/// Counters a page server keeps, readable while it runs.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Read requests answered.
    pub requests: AtomicU64,
    /// Pages sent as data.
    pub data_pages: AtomicU64,
    /// Pages sent as one bit of a zero mask.
    pub zero_pages: AtomicU64,
    /// Requests refused (out of range).
    pub refused_reads: AtomicU64,
    /// Connections refused in the handshake.
    pub failed_handshakes: AtomicU64,
    /// Pages served more than once in this session (a resumed read whose reply was lost, or a
    /// destination that asks twice). Post-copy keeps this at zero.
    pub pages_served_twice: AtomicU64,
}

struct Shared {
    memory: Arc<GuestMemory>,
    key: PreSharedKey,
    session: SessionId,
    options: TcpOptions,
    stats: ServerStats,
    /// One bit per global page: served at least once.
    served: crate::pagebits::PageBits,
    tls: Option<TlsServer>,
}

/// Serves reads of a guest's memory to authenticated destinations until shut down.
pub struct TcpPageServer {
    acceptor: Acceptor<TcpControl>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TcpPageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpPageServer")
            .field("addr", &self.acceptor.local_addr())
            .field("session", &self.shared.session)
            .finish()
    }
}

impl TcpPageServer {
    /// Binds `addr` and starts serving `memory` under a new session id.
    pub fn start(
        addr: impl ToSocketAddrs,
        memory: Arc<GuestMemory>,
        key: PreSharedKey,
        options: TcpOptions,
    ) -> Result<Self> {
        let served = crate::pagebits::PageBits::new(memory.layout());
        let tls = match options.encryption {
            Encryption::Tls => Some(TlsServer::new()?),
            Encryption::Off => None,
        };
        let shared = Arc::new(Shared {
            memory,
            key,
            session: SessionId::random()?,
            options,
            stats: ServerStats::default(),
            served,
            tls,
        });
        let conn_shared = shared.clone();
        let acceptor = Acceptor::start(addr, "ferry-tcp", move |stream, authenticated| {
            serve_connection(stream, &conn_shared, authenticated).unwrap_or_else(|e| {
                tracing::debug!(peer = ?stream.peer_addr().ok(), error = %e, "a page server connection ended");
                if matches!(e, TransportError::AuthFailed(_) | TransportError::Refused { .. }) {
                    conn_shared.stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                }
                Served::Closed
            })
        })?;
        Ok(TcpPageServer { acceptor, shared })
    }

    /// Waits up to `timeout` for a destination to open the session's control lane.
    pub fn accept_control(&self, timeout: Duration) -> Result<TcpControl> {
        self.acceptor.accept_control(timeout)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    /// The session the server serves.
    pub fn session(&self) -> SessionId {
        self.shared.session
    }

    /// What the server counted.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Drops every connection (destinations see their lanes fail and may [`resume`] against
    /// another server of the same session), keeping the server accepting new ones. Used to test
    /// and to force reconnection.
    pub fn drop_connections(&self) {
        self.acceptor.drop_connections();
    }

    /// Breaks the session's data lanes (urgent, bulk) as a cut link would, keeping its control
    /// lane and accepting new connections: the destination reconnects and asks again. For fault
    /// injection and tests.
    pub fn cut_data_lanes(&self) {
        self.acceptor.drop_served_connections();
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.acceptor.stop();
    }
}

fn serve_connection(stream: &TcpStream, shared: &Shared, authenticated: &dyn Fn()) -> Result<Served<TcpControl>> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(shared.options.io_timeout))?;
    stream.set_write_timeout(Some(shared.options.io_timeout))?;
    let limit = shared.options.io_timeout;
    let until = std::time::Instant::now() + limit;
    let memory = &shared.memory;
    let layout = memory.layout();
    let lane = match &shared.tls {
        Some(tls) => {
            if speaks_plaintext(stream)? {
                let _ = crate::wire::write_control(
                    &mut Deadline::until(stream, until, limit),
                    &crate::wire::Control::Reject {
                        reason: crate::wire::RejectReason::Encryption,
                        detail: "this page server runs its tcp lanes over TLS".into(),
                    },
                );
                return Err(TransportError::Refused {
                    reason: crate::wire::RejectReason::Encryption,
                    detail: "a plaintext client".into(),
                });
            }
            TcpControl::Tls(tls.accept(stream, until, limit)?)
        }
        None => TcpControl::Plain(stream.try_clone()?),
    };
    let binding = lane.binding()?;
    let kind = server_handshake_bound(
        &mut Deadline::until(&lane, until, limit),
        &shared.key,
        &binding,
        shared.session,
        layout,
    )?;
    authenticated();
    if kind == Lane::Control {
        return Ok(Served::Control(lane));
    }
    // A destination may be idle for a long time between faults: wait for requests indefinitely,
    // but never block forever on a peer that stopped reading replies.
    stream.set_read_timeout(None)?;
    match lane {
        TcpControl::Plain(_) => serve_reads(&mut BufReader::with_capacity(16 * 1024, stream), shared, |_, _, iov| {
            // SAFETY: iov[0] points at the reply's prefix, alive across the call; the others point
            // into guest memory ranges bounds-checked by raw_range, kept mapped by `memory`, which
            // outlives the call.
            unsafe { writev_all(stream.as_raw_fd(), iov) }.map_err(TransportError::from)
        }),
        TcpControl::Tls(tls) => {
            // Each record is filled straight from guest memory (volatile reads: the guest may be
            // running) and sealed in place; the bulk lane's are sent by another thread meanwhile.
            let (mut requests, mut replies) = tls.into_records()?;
            let size =
                |prefix: &[u8], data: &[(u32, u64, usize)]| prefix.len() + data.iter().map(|d| d.2).sum::<usize>();
            if kind == Lane::Bulk {
                replies.pipelined(|replies| {
                    serve_reads(&mut requests, shared, |prefix, data, _| {
                        replies
                            .send_with(size(prefix, data), |at, piece| copy_reply(memory, prefix, data, at, piece))?;
                        Ok(())
                    })
                })?
            } else {
                serve_reads(&mut requests, shared, |prefix, data, _| {
                    replies.send_with(size(prefix, data), |at, piece| copy_reply(memory, prefix, data, at, piece))?;
                    Ok(())
                })
            }
        }
    }
}

/// Copies bytes `offset..offset + out.len()` of a reply, its prefix followed by its guest ranges
/// (region, offset, length), into `out`.
fn copy_reply(
    memory: &GuestMemory,
    prefix: &[u8],
    data: &[(u32, u64, usize)],
    offset: usize,
    out: &mut [u8],
) -> std::io::Result<()> {
    let mut done = 0;
    let mut segment_start = 0;
    if offset < prefix.len() {
        let n = (prefix.len() - offset).min(out.len());
        out[..n].copy_from_slice(&prefix[offset..offset + n]);
        done = n;
    }
    segment_start += prefix.len();
    for &(region, guest_offset, len) in data {
        if done == out.len() {
            break;
        }
        let want = offset + done;
        if want < segment_start + len {
            let skip = want - segment_start;
            let n = (len - skip).min(out.len() - done);
            memory.regions()[region as usize]
                .read(guest_offset + skip as u64, &mut out[done..done + n])
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            done += n;
        }
        segment_start += len;
    }
    if done != out.len() {
        return Err(std::io::Error::other("a reply shorter than its records"));
    }
    Ok(())
}

/// Whether the first bytes a client sent are a plaintext ferry frame rather than a TLS record.
fn speaks_plaintext(stream: &TcpStream) -> Result<bool> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first) {
        Ok(0) => Err(TransportError::PeerClosed),
        Ok(_) => Ok(first[0] == crate::wire::MAGIC.to_le_bytes()[0]),
        Err(e) => Err(TransportError::from_read(e)),
    }
}

/// Serves read requests from `requests` until the peer closes; `send` gets each reply as its
/// prefix and guest ranges (region, offset, length), and as iovecs: the prefix, then the same
/// ranges, each bounds-checked within a mapping `shared.memory` keeps alive.
fn serve_reads(
    requests: &mut dyn Read,
    shared: &Shared,
    mut send: impl FnMut(&[u8], &[(u32, u64, usize)], &mut [libc::iovec]) -> Result<()>,
) -> Result<Served<TcpControl>> {
    let memory = &shared.memory;
    let layout = memory.layout();
    let mut frame = [0u8; READ_REQUEST_FRAME_LEN];
    let mut prefix = Vec::with_capacity(ReadReply::prefix_len(crate::layout::MAX_RUN_PAGES));
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(crate::layout::MAX_RUN_PAGES as usize + 1);
    let mut data: Vec<(u32, u64, usize)> = Vec::with_capacity(crate::layout::MAX_RUN_PAGES as usize);
    let page_size = layout.page_size();
    loop {
        match requests.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Served::Closed),
            Err(e) => return Err(e.into()),
        }
        let req = ReadRequest::decode(&frame)?;
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut reply =
            ReadReply { id: req.id, status: ReadStatus::Ok, pages: req.run.pages, zero: ZeroMask::default() };
        // A refused run still gets a well-formed reply sized for its page count, so the count
        // itself must be bounded before we build one.
        if req.run.pages == 0 || req.run.pages > crate::layout::MAX_RUN_PAGES {
            return Err(TransportError::malformed("read request", format!("{} pages", req.run.pages)));
        }
        iov.clear();
        data.clear();
        if layout.check_run(req.run).is_err() {
            reply.status = ReadStatus::OutOfRange;
            shared.stats.refused_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            let region = memory.region(req.run.region).expect("check_run proved the region exists");
            let (base, _) = layout.run_bytes(req.run);
            for p in 0..req.run.pages {
                if region.is_zero(base + u64::from(p) * u64::from(page_size), page_size as usize)? {
                    reply.zero.set(p);
                }
            }
            let twice = shared.served.set_run(req.run);
            if twice > 0 {
                shared.stats.pages_served_twice.fetch_add(twice, Ordering::Relaxed);
            }
            let zero = reply.zero.count();
            shared.stats.zero_pages.fetch_add(u64::from(zero), Ordering::Relaxed);
            shared.stats.data_pages.fetch_add(u64::from(req.run.pages - zero), Ordering::Relaxed);
            let mut err = None;
            reply.zero.for_each_data_run(req.run.pages, |first, count| {
                let off = base + u64::from(first) * u64::from(page_size);
                let len = count as usize * page_size as usize;
                match region.raw_range(off, len) {
                    Ok(ptr) => {
                        iov.push(libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len });
                        data.push((req.run.region, off, len));
                    }
                    Err(e) => err = Some(e),
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
        }
        reply.encode_prefix(page_size, &mut prefix);
        iov.insert(0, libc::iovec { iov_base: prefix.as_ptr() as *mut libc::c_void, iov_len: prefix.len() });
        send(&prefix, &data, &mut iov)?;
    }
}

/// One tcp lane after its handshake, in plaintext or over TLS: what a session's control lane is.
/// Clones share the connection, so one thread may read while another writes.
#[derive(Debug)]
pub enum TcpControl {
    /// Without encryption (`Encryption::Off`).
    Plain(TcpStream),
    /// Over TLS 1.3.
    Tls(TlsStream),
}

impl TcpControl {
    /// The socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &TcpStream {
        match self {
            TcpControl::Plain(s) => s,
            TcpControl::Tls(t) => t.socket(),
        }
    }

    /// Shuts the connection down (every handle's blocked read returns).
    pub fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.socket().shutdown(how)
    }

    /// Whether the lane is encrypted.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, TcpControl::Tls(_))
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            TcpControl::Plain(s) => TcpControl::Plain(s.try_clone()?),
            TcpControl::Tls(t) => TcpControl::Tls(t.clone()),
        })
    }

    /// What the handshake's proofs are bound to: the TLS session, or nothing in plaintext.
    fn binding(&self) -> Result<Vec<u8>> {
        match self {
            TcpControl::Plain(_) => Ok(Vec::new()),
            TcpControl::Tls(t) => Ok(t.binding()?.to_vec()),
        }
    }
}

impl Read for &TcpControl {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match *self {
            TcpControl::Plain(s) => (&*s).read(buf),
            TcpControl::Tls(t) => (&*t).read(buf),
        }
    }
}

impl Write for &TcpControl {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match *self {
            TcpControl::Plain(s) => (&*s).write(buf),
            TcpControl::Tls(t) => (&*t).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for TcpControl {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for TcpControl {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::lane::ControlStream for TcpControl {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.socket().set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.socket().set_write_timeout(timeout)
    }

    fn try_clone_box(&self) -> std::io::Result<Box<dyn crate::lane::ControlStream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        if let TcpControl::Tls(t) = self {
            if t.has_buffered() {
                return Ok(true);
            }
        }
        crate::lane::ControlStream::wait_readable(self.socket(), timeout)
    }

    fn shutdown(&self) -> std::io::Result<()> {
        self.socket().shutdown(std::net::Shutdown::Both)
    }
}

/// Writes every byte the iovecs describe, looping over partial writes and IOV_MAX.
///
/// # Safety
/// Every iovec must describe memory readable for its length until this function returns.
unsafe fn writev_all(fd: RawFd, mut iov: &mut [libc::iovec]) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    while !iov.is_empty() {
        let count = iov.len().min(IOV_MAX);
        // SAFETY: the caller guarantees the iovecs are readable; count <= iov.len().
        let written = unsafe { libc::writev(fd, iov.as_ptr(), count as libc::c_int) };
        if written < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut left = written as usize;
        while let Some(first) = iov.first_mut() {
            if left >= first.iov_len {
                left -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: left < iov_len, so the advanced pointer stays inside the same buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left) }.cast();
                first.iov_len -= left;
                break;
            }
        }
    }
    Ok(())
}

/// Opens a new session with the page server at `addr`: an urgent and a bulk connection.
/// With `expected_layout`, a server with any other layout is refused.
pub fn connect(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    options: &TcpOptions,
) -> Result<PageSource> {
    open_lanes(addr, key, SessionId::NEW, expected_layout, options)
}

/// Opens a new session's control lane, then its urgent and bulk lanes: what a post-copy
/// destination holds for the whole migration.
pub fn connect_session(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    options: &TcpOptions,
) -> Result<(PageSource, TcpControl)> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let (control, cs) = open_lane(&addrs, key, Lane::Control, SessionId::NEW, expected_layout, options)?;
    control.socket().set_read_timeout(None)?;
    let source = open_lanes(&addrs[..], key, cs.session, Some(&cs.layout), options)?;
    Ok((source, control))
}

/// Reopens both lanes of an existing session after its connections broke. Reads that were in
/// flight are simply asked again.
pub fn resume(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    session: SessionId,
    layout: &MemoryLayout,
    options: &TcpOptions,
) -> Result<PageSource> {
    open_lanes(addr, key, session, Some(layout), options)
}

fn open_lanes(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
    options: &TcpOptions,
) -> Result<PageSource> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let (urgent, first) = open_lane(&addrs, key, Lane::Urgent, session, expected_layout, options)?;
    let lanes = TcpLanes {
        addrs,
        key: key.clone(),
        session: first.session,
        layout: first.layout.clone(),
        options: options.clone(),
    };
    let urgent = Box::new(TcpUrgent { conn: Conn::new(urgent, first.layout.clone(), options.io_timeout)?, next_id: 1 });
    Ok(PageSource {
        session: first.session,
        layout: first.layout,
        urgent,
        bulk: lanes.bulk()?,
        reconnect: Some(Arc::new(lanes)),
    })
}

/// Opens a session's control lane again (blocking reads: liveness bounds them).
pub(crate) fn reopen_control(
    addrs: &[SocketAddr],
    key: &PreSharedKey,
    session: SessionId,
    layout: &MemoryLayout,
    io_timeout: Duration,
    encryption: Encryption,
) -> Result<Box<dyn crate::lane::ControlStream>> {
    let options = TcpOptions { io_timeout, encryption, ..TcpOptions::default() };
    let (s, _) = open_lane(addrs, key, Lane::Control, session, Some(layout), &options)?;
    s.socket().set_read_timeout(None)?;
    Ok(Box::new(s))
}

/// What reopens a session's lanes: where the server is, the key, and the session.
#[derive(Debug)]
struct TcpLanes {
    addrs: Vec<SocketAddr>,
    key: PreSharedKey,
    session: SessionId,
    layout: MemoryLayout,
    options: TcpOptions,
}

impl Reconnect for TcpLanes {
    fn control(&self) -> Result<Box<dyn crate::lane::ControlStream>> {
        reopen_control(
            &self.addrs,
            &self.key,
            self.session,
            &self.layout,
            self.options.io_timeout,
            self.options.encryption,
        )
    }

    fn urgent(&self) -> Result<Box<dyn UrgentLane>> {
        let (s, _) = open_lane(&self.addrs, &self.key, Lane::Urgent, self.session, Some(&self.layout), &self.options)?;
        Ok(Box::new(TcpUrgent { conn: Conn::new(s, self.layout.clone(), self.options.io_timeout)?, next_id: 1 }))
    }

    fn bulk(&self) -> Result<Box<dyn BulkLane>> {
        let (s, _) = open_lane(&self.addrs, &self.key, Lane::Bulk, self.session, Some(&self.layout), &self.options)?;
        Ok(Box::new(TcpBulk {
            conn: Conn::new(s, self.layout.clone(), self.options.io_timeout)?,
            depth: self.options.bulk_depth.max(1),
            in_flight: VecDeque::new(),
            unsent: Vec::new(),
            next_id: 1,
        }))
    }
}

/// Connects to the first address that answers and runs the handshake for `lane`, over TLS when
/// `options` ask for it; the whole of it within `options.io_timeout`.
pub(crate) fn open_lane(
    addrs: &[SocketAddr],
    key: &PreSharedKey,
    lane: Lane,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
    options: &TcpOptions,
) -> Result<(TcpControl, crate::handshake::ClientSession)> {
    let io_timeout = options.io_timeout;
    let (s, until) = connect_any(addrs, io_timeout)?;
    let conn = match options.encryption {
        Encryption::Tls => TcpControl::Tls(crate::tls::connect(&s, until, io_timeout)?),
        Encryption::Off => TcpControl::Plain(s),
    };
    let binding = conn.binding()?;
    let cs = client_handshake_bound(
        &mut Deadline::until(&conn, until, io_timeout),
        key,
        &binding,
        lane,
        session,
        expected_layout,
    )?;
    Ok((conn, cs))
}

/// [`open_lane`] in plaintext, returning the bare socket: the rdma backend's setup and control
/// lanes.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn open_plain_lane(
    addrs: &[SocketAddr],
    key: &PreSharedKey,
    lane: Lane,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
    io_timeout: Duration,
) -> Result<(TcpStream, crate::handshake::ClientSession)> {
    let options = TcpOptions { io_timeout, encryption: Encryption::Off, ..TcpOptions::default() };
    let (conn, cs) = open_lane(addrs, key, lane, session, expected_layout, &options)?;
    match conn {
        TcpControl::Plain(s) => Ok((s, cs)),
        TcpControl::Tls(_) => unreachable!("asked for plaintext"),
    }
}

/// Connects to the first address that answers; returns the socket (no delay, timeouts set) and
/// when its handshake must be over.
fn connect_any(addrs: &[SocketAddr], io_timeout: Duration) -> Result<(TcpStream, std::time::Instant)> {
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, io_timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(io_timeout))?;
                s.set_write_timeout(Some(io_timeout))?;
                return Ok((s, std::time::Instant::now() + io_timeout));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Io(
        last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolved to nothing")),
    ))
}

/// One client connection: the socket, and a reader that buffers (plaintext: a small buffer so a
/// reply's prefix and a small page arrive in one receive; TLS buffers by itself).
struct Conn {
    socket: TcpStream,
    /// How long one whole reply may take to arrive (a peer that trickles it is cut off).
    io_timeout: Duration,
    writer: Box<dyn Write + Send>,
    reader: Box<dyn Read + Send>,
    layout: MemoryLayout,
    prefix: [u8; 12 + 16 + 8 * crate::wire::ZERO_MASK_WORDS],
}

impl Conn {
    /// Shuts the connection down from another thread: a blocked read returns at once.
    fn interrupter(&self) -> Option<crate::lane::Interrupter> {
        let stream = self.socket.try_clone().ok()?;
        Some(std::sync::Arc::new(move || {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }))
    }

    fn new(lane: TcpControl, layout: MemoryLayout, io_timeout: Duration) -> Result<Self> {
        let socket = lane.socket().try_clone()?;
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match lane {
            TcpControl::Plain(s) => (Box::new(BufReader::with_capacity(16 * 1024, s.try_clone()?)), Box::new(s)),
            TcpControl::Tls(t) => {
                let (reader, writer) = t.into_records()?;
                (Box::new(reader), Box::new(writer))
            }
        };
        Ok(Conn { socket, io_timeout, writer, reader, layout, prefix: [0; 12 + 16 + 8 * crate::wire::ZERO_MASK_WORDS] })
    }

    /// Receives the reply to `req` into `dst` (exactly the run's bytes). Pages the reply marks
    /// zero are zero-filled when `fill_zero`; otherwise they are left as they were (a mapped
    /// target: its holes read as zero, and writing them would allocate memory).
    fn receive(&mut self, req: &ReadRequest, dst: &mut [u8], fill_zero: bool) -> Result<ZeroMask> {
        let page_size = self.layout.page_size();
        let plen = ReadReply::prefix_len(req.run.pages);
        let mut reader = ReplyDeadline::new(&mut *self.reader, &self.socket, self.io_timeout);
        reader.read_exact(&mut self.prefix[..plen]).map_err(TransportError::from_read)?;
        let reply = ReadReply::decode_prefix(&self.prefix[..plen], req, page_size)?;
        if reply.status == ReadStatus::OutOfRange {
            return Err(TransportError::OutOfRange(format!("the source refused {:?}", req.run)));
        }
        let ps = page_size as usize;
        let mut result = Ok(());
        reply.zero.for_each_data_run(req.run.pages, |first, count| {
            if result.is_ok() {
                let range = first as usize * ps..(first + count) as usize * ps;
                result = reader.read_exact(&mut dst[range]).map_err(TransportError::from_read);
            }
        });
        result?;
        if fill_zero {
            for p in (0..req.run.pages).filter(|&p| reply.zero.is_zero(p)) {
                dst[p as usize * ps..(p as usize + 1) * ps].fill(0);
            }
        }
        Ok(reply.zero)
    }
}

/// A reply's reads, all of them finished within one deadline: before each read the socket's
/// timeout is set to what is left (a per-read timeout alone lets a peer trickle a byte at a time
/// forever). The socket's timeout is the whole limit again afterwards.
struct ReplyDeadline<'a> {
    reader: &'a mut (dyn Read + Send),
    socket: &'a TcpStream,
    until: std::time::Instant,
    limit: Duration,
}

impl<'a> ReplyDeadline<'a> {
    fn new(reader: &'a mut (dyn Read + Send), socket: &'a TcpStream, limit: Duration) -> Self {
        ReplyDeadline { reader, socket, until: std::time::Instant::now() + limit, limit }
    }
}

impl Read for ReplyDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a reply did not arrive whole within {:?}", self.limit),
            ));
        }
        self.socket.set_read_timeout(Some(left))?;
        self.reader.read(buf)
    }
}

impl Drop for ReplyDeadline<'_> {
    fn drop(&mut self) {
        let _ = self.socket.set_read_timeout(Some(self.limit));
    }
}

struct TcpUrgent {
    conn: Conn,
    next_id: u64,
}

impl UrgentLane for TcpUrgent {
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        let dst = run_dst(&self.conn.layout, run, dst)?;
        let req = ReadRequest { id: self.next_id, run };
        self.next_id += 1;
        self.conn.writer.write_all(&req.encode())?;
        self.conn.receive(&req, dst, true)
    }

    fn interrupter(&self) -> Option<crate::lane::Interrupter> {
        self.conn.interrupter()
    }
}

struct TcpBulk {
    conn: Conn,
    depth: usize,
    in_flight: VecDeque<(ReadRequest, BulkRead)>,
    /// Requests not yet written: sent in batches to save a syscall and a server wakeup per run.
    unsent: Vec<u8>,
    next_id: u64,
}

impl TcpBulk {
    const SEND_BATCH: usize = 8;

    fn unsent_requests(&self) -> usize {
        self.unsent.len() / READ_REQUEST_FRAME_LEN
    }

    fn flush(&mut self) -> Result<()> {
        if !self.unsent.is_empty() {
            self.conn.writer.write_all(&self.unsent)?;
            self.unsent.clear();
        }
        Ok(())
    }
}

impl BulkLane for TcpBulk {
    fn depth(&self) -> usize {
        self.depth
    }

    fn interrupter(&self) -> Option<crate::lane::Interrupter> {
        self.conn.interrupter()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn submit(&mut self, mut read: BulkRead) -> Result<()> {
        if self.in_flight.len() >= self.depth {
            return Err(TransportError::LaneFull(self.in_flight.len()));
        }
        run_dst(&self.conn.layout, read.run, &mut read.buf)?;
        let req = ReadRequest { id: self.next_id, run: read.run };
        self.next_id += 1;
        self.unsent.extend_from_slice(&req.encode());
        self.in_flight.push_back((req, read));
        if self.unsent.len() >= Self::SEND_BATCH * READ_REQUEST_FRAME_LEN {
            self.flush()?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<Option<BulkDone>> {
        // Send what is queued when the server is about to run dry (or the read we wait for has not
        // been sent); otherwise keep batching, so steady state costs one send per several runs.
        let sent = self.in_flight.len() - self.unsent_requests();
        if sent <= self.depth / 2 {
            self.flush()?;
        }
        let Some((req, mut read)) = self.in_flight.pop_front() else { return Ok(None) };
        let (_, len) = self.conn.layout.run_bytes(req.run);
        let fill_zero = !matches!(read.buf, BulkTarget::Mapped(_));
        let zero = self.conn.receive(&req, &mut read.buf[..len], fill_zero)?;
        Ok(Some(BulkDone { run: read.run, buf: read.buf, tag: read.tag, zero }))
    }
}
