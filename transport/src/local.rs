//! The `local` backend: source and destination on one host. The source's guest memory lives in
//! sealed memfds; after the handshake on a Unix socket the source passes them with `SCM_RIGHTS`
//! and the destination maps them read-only. A read is then a one-sided copy out of the shared
//! mapping: the source's CPU does no work at all, which is the property RDMA READ gives across hosts.
//!
//! A destination opens a bulk lane to receive the fds, and for a migration session a control lane
//! first, which the server hands to its owner through [`LocalPageServer::accept_control`].
//!
//! The destination checks every fd it receives (a sealed memfd, at least the region's size) before
//! mapping it, so a hostile source cannot make its reads fault.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::auth::PreSharedKey;
use crate::error::{Result, TransportError};
use crate::handshake::{client_handshake, server_handshake, Deadline};
use crate::lane::{run_dst, BulkDone, BulkLane, BulkRead, PageSource, UrgentLane};
use crate::layout::{MemoryLayout, PageRun};
use crate::memory::{GuestMemory, RegionMapping};
use crate::wire::{Lane, SessionId, ZeroMask};

/// Most fds in one `SCM_RIGHTS` message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Offers a memfd-backed guest's memory to destinations on this host.
pub struct LocalPageServer {
    path: PathBuf,
    session: SessionId,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<Connection>>>,
    control_rx: Mutex<std::sync::mpsc::Receiver<UnixStream>>,
}

/// A served destination: a handle to close its socket, and the thread serving it.
type Connection = (UnixStream, JoinHandle<()>);

impl std::fmt::Debug for LocalPageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPageServer").field("path", &self.path).field("session", &self.session).finish()
    }
}

impl LocalPageServer {
    /// Listens on the Unix socket `path`. Every region of `memory` must have a backing fd (create
    /// it with [`crate::Backing::Memfd`] or [`crate::Backing::HugetlbMemfd`]).
    pub fn start(path: impl AsRef<Path>, memory: Arc<GuestMemory>, key: PreSharedKey) -> Result<Self> {
        if let Some(i) = memory.regions().iter().position(|r| r.fd().is_none()) {
            return Err(TransportError::BadSharedMemory(format!("region {i} has no memfd to share")));
        }
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let session = SessionId::random()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (stop2, conns2) = (stop.clone(), connections.clone());
        let (control_tx, control_rx) = std::sync::mpsc::sync_channel(4);
        let accept_thread = std::thread::Builder::new().name("ferry-local-accept".into()).spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let Ok(handle) = stream.try_clone() else { continue };
                let (memory, key, control_tx) = (memory.clone(), key.clone(), control_tx.clone());
                let spawned = std::thread::Builder::new().name("ferry-local-serve".into()).spawn(move || {
                    if let Ok(Some(control)) = serve(&stream, &memory, &key, session) {
                        if control_tx.try_send(control).is_ok() {
                            return;
                        }
                    }
                    // The accept loop holds a duplicate of this socket: close it explicitly.
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                });
                let mut conns = conns2.lock().expect("connection list poisoned");
                conns.retain(|(_, t): &Connection| !t.is_finished());
                if let Ok(t) = spawned {
                    conns.push((handle, t));
                }
            }
        })?;
        Ok(LocalPageServer {
            path,
            session,
            stop,
            accept_thread: Some(accept_thread),
            connections,
            control_rx: Mutex::new(control_rx),
        })
    }

    /// Waits up to `timeout` for a destination to open the session's control lane.
    pub fn accept_control(&self, timeout: Duration) -> Result<UnixStream> {
        crate::lane::receive_control(&self.control_rx, timeout)
    }

    /// The unix socket the server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The session the server serves.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Closes every connection: destinations see their control lane fail. Their mappings stay
    /// valid (the memory is shared), which is what one-sided reads mean.
    pub fn drop_connections(&self) {
        for (s, t) in std::mem::take(&mut *self.connections.lock().expect("connection list poisoned")) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for (s, t) in std::mem::take(&mut *self.connections.lock().expect("connection list poisoned")) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for LocalPageServer {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Serves one connection: a bulk lane gets the memfds; a control lane is returned for the session.
fn serve(
    stream: &UnixStream,
    memory: &GuestMemory,
    key: &PreSharedKey,
    session: SessionId,
) -> Result<Option<UnixStream>> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    if server_handshake(&mut Deadline::new(stream, HANDSHAKE_TIMEOUT), key, session, memory.layout())? == Lane::Control
    {
        return Ok(Some(stream.try_clone()?));
    }
    let fds: Vec<BorrowedFd<'_>> = memory.regions().iter().filter_map(|r| r.fd()).collect();
    send_fds(stream, &fds)?;
    // The destination holds the connection open while it uses the mappings; its end marks the
    // moment the source may release the memory.
    stream.set_read_timeout(None)?;
    let mut byte = [0u8; 1];
    while (&mut &*stream).read(&mut byte)? != 0 {}
    Ok(None)
}

/// Connects to the local page server at `path` and authenticates as `lane` of `session`.
fn open_lane(
    path: &Path,
    key: &PreSharedKey,
    lane: Lane,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
) -> Result<(UnixStream, crate::handshake::ClientSession)> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let cs = client_handshake(&mut Deadline::new(&stream, HANDSHAKE_TIMEOUT), key, lane, session, expected_layout)?;
    Ok((stream, cs))
}

/// Opens a session with the local page server at `path` and maps the source's memory.
pub fn connect(
    path: impl AsRef<Path>,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    bulk_depth: usize,
) -> Result<PageSource> {
    map_lanes(path.as_ref(), key, SessionId::NEW, expected_layout, bulk_depth)
}

/// Opens a session's control lane, then maps the source's memory for its lanes: what a post-copy
/// destination on the same host holds for the whole migration.
pub fn connect_session(
    path: impl AsRef<Path>,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    bulk_depth: usize,
) -> Result<(PageSource, UnixStream)> {
    let path = path.as_ref();
    let (control, cs) = open_lane(path, key, Lane::Control, SessionId::NEW, expected_layout)?;
    control.set_read_timeout(None)?;
    let source = map_lanes(path, key, cs.session, Some(&cs.layout), bulk_depth)?;
    Ok((source, control))
}

fn map_lanes(
    path: &Path,
    key: &PreSharedKey,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
    bulk_depth: usize,
) -> Result<PageSource> {
    let (stream, cs) = open_lane(path, key, Lane::Bulk, session, expected_layout)?;
    let fds = recv_fds(&stream, cs.layout.regions().len())?;
    let mappings = fds
        .into_iter()
        .zip(cs.layout.regions())
        .map(|(fd, r)| RegionMapping::map_shared_readonly(fd, r.size as usize))
        .collect::<Result<Vec<_>>>()?;
    let memory = Arc::new(GuestMemory::new(cs.layout.clone(), mappings)?);
    let lanes = LocalLanes {
        path: path.to_path_buf(),
        key: key.clone(),
        session: cs.session,
        layout: cs.layout.clone(),
        bulk_depth,
        memory: memory.clone(),
    };
    Ok(PageSource {
        reconnect: Some(Arc::new(lanes)),
        session: cs.session,
        layout: cs.layout,
        urgent: Box::new(LocalUrgent { memory: memory.clone(), _control: stream }),
        bulk: Box::new(LocalBulk { memory, depth: bulk_depth.max(1), done: VecDeque::new() }),
    })
}

/// What reopens a local session's lanes. Its page lanes are a shared mapping, which does not
/// break: reopening them maps nothing new. Its control lane is a socket, opened again under the
/// session.
#[derive(Debug)]
struct LocalLanes {
    path: std::path::PathBuf,
    key: PreSharedKey,
    session: SessionId,
    layout: MemoryLayout,
    bulk_depth: usize,
    memory: Arc<GuestMemory>,
}

impl crate::lane::Reconnect for LocalLanes {
    fn control(&self) -> Result<Box<dyn crate::lane::ControlStream>> {
        let (control, _) = open_lane(&self.path, &self.key, Lane::Control, self.session, Some(&self.layout))?;
        control.set_read_timeout(None)?;
        Ok(Box::new(control))
    }

    fn urgent(&self) -> Result<Box<dyn UrgentLane>> {
        // Proves the session is still served (and keeps the source told the mapping is in use).
        let (stream, _) = open_lane(&self.path, &self.key, Lane::Bulk, self.session, Some(&self.layout))?;
        recv_fds(&stream, self.layout.regions().len())?;
        Ok(Box::new(LocalUrgent { memory: self.memory.clone(), _control: stream }))
    }

    fn bulk(&self) -> Result<Box<dyn BulkLane>> {
        Ok(Box::new(LocalBulk { memory: self.memory.clone(), depth: self.bulk_depth.max(1), done: VecDeque::new() }))
    }
}

struct LocalUrgent {
    memory: Arc<GuestMemory>,
    /// Held open so the source knows the mappings are in use.
    _control: UnixStream,
}

impl UrgentLane for LocalUrgent {
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        let dst = run_dst(self.memory.layout(), run, dst)?;
        self.memory.read_run(run, dst)?;
        Ok(ZeroMask::default())
    }
}

/// Reads complete at submission (a copy from the shared mapping); the queue keeps the lane's
/// contract of bounded depth and completion on demand.
struct LocalBulk {
    memory: Arc<GuestMemory>,
    depth: usize,
    done: VecDeque<BulkDone>,
}

impl BulkLane for LocalBulk {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn submit(&mut self, mut read: BulkRead) -> Result<()> {
        if self.done.len() >= self.depth {
            return Err(TransportError::LaneFull(self.done.len()));
        }
        let dst = run_dst(self.memory.layout(), read.run, &mut read.buf)?;
        self.memory.read_run(read.run, dst)?;
        self.done.push_back(BulkDone { run: read.run, buf: read.buf, tag: read.tag, zero: ZeroMask::default() });
        Ok(())
    }

    fn complete(&mut self) -> Result<Option<BulkDone>> {
        Ok(self.done.pop_front())
    }
}

/// Room for the control message of one batch, as u64s for cmsghdr alignment.
const CMSG_WORDS: usize = 2 + FDS_PER_MESSAGE / 2 + 2;

fn send_fds(sock: &UnixStream, fds: &[BorrowedFd<'_>]) -> Result<()> {
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let raw: Vec<i32> = chunk.iter().map(|f| f.as_raw_fd()).collect();
        let mut count = [chunk.len() as u8];
        let mut iov = libc::iovec { iov_base: count.as_mut_ptr().cast(), iov_len: 1 };
        let mut cmsg_buf = [0u64; CMSG_WORDS];
        let data_len = std::mem::size_of_val(raw.as_slice()) as u32;
        // SAFETY: msghdr is plain old data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        assert!(msg.msg_controllen <= std::mem::size_of_val(&cmsg_buf), "CMSG_WORDS too small");
        // SAFETY: msg_control points at a buffer of msg_controllen bytes, so the first header
        // exists and CMSG_DATA has room for data_len bytes; raw holds exactly that many bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), data_len as usize);
        }
        // SAFETY: msg and everything it points to are alive for the call.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// Receives exactly `count` fds. Every fd received is owned at once, so none leaks on error.
fn recv_fds(sock: &UnixStream, count: usize) -> Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut announced = [0u8; 1];
        let mut iov = libc::iovec { iov_base: announced.as_mut_ptr().cast(), iov_len: 1 };
        let mut cmsg_buf = [0u64; CMSG_WORDS];
        // SAFETY: msghdr is plain old data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
        // SAFETY: msg points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut batch = Vec::new();
        // SAFETY: walking the control buffer the kernel just filled, with the libc macros that
        // bound every header by msg_controllen; each SCM_RIGHTS fd is new and owned by us.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data_len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(cmsg).cast::<i32>();
                    for i in 0..data_len / 4 {
                        batch.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 {
            return Err(TransportError::PeerClosed);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(TransportError::BadSharedMemory("fd message truncated".into()));
        }
        if batch.len() != announced[0] as usize || batch.is_empty() {
            return Err(TransportError::BadSharedMemory(format!(
                "peer announced {} fds and sent {}",
                announced[0],
                batch.len()
            )));
        }
        fds.extend(batch);
        if fds.len() > count {
            return Err(TransportError::BadSharedMemory(format!("peer sent {} fds for {count} regions", fds.len())));
        }
    }
    Ok(fds)
}
