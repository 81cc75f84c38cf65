//! The destination's page reading API: an urgent lane and a bulk lane per session.
//!
//! The urgent lane serves faults: one page or a short run, synchronously, at the lowest latency the
//! backend has. The bulk lane serves pre-paging: many runs in flight, completed in any order.
//! Backends keep the two apart (separate connections, rings or queue pairs) so an urgent read never
//! waits behind bulk reads. Each lane is owned by one thread (the fault thread, the pre-pager).

use std::alloc::Layout;
use std::ptr::NonNull;

use crate::error::Result;
use crate::layout::{MemoryLayout, PageRun};
use crate::wire::{SessionId, ZeroMask};

/// Alignment of [`PageBuf`]: enough for O_DIRECT and for RDMA registration.
pub const PAGE_BUF_ALIGN: usize = 4096;

/// An owned, page-aligned, zero-initialised byte buffer that bulk reads fill.
///
/// A lane that needs its buffers registered with a device (RDMA) hands out buffers carrying their
/// registration ([`PageBuf::with_registration`]); the registration is dropped before the memory is
/// freed, so a device can never be left pointing at memory that was given back.
pub struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
    registration: Option<Box<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: PageBuf uniquely owns its allocation, like Vec<u8>.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only yields &[u8], like Vec<u8>.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// A zeroed, page-aligned buffer of `len` bytes (at least one).
    pub fn new(len: usize) -> Self {
        let len = len.max(1);
        let layout = Layout::from_size_align(len, PAGE_BUF_ALIGN).expect("page buffer size overflows");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        PageBuf { ptr, len, registration: None }
    }

    /// Attaches what keeps this buffer registered with a device; it lives exactly as long as the
    /// buffer's memory and is dropped first.
    pub fn with_registration(mut self, registration: Box<dyn std::any::Any + Send + Sync>) -> Self {
        self.registration = Some(registration);
        self
    }

    /// The registration attached by the lane that made this buffer, for that lane to recognise.
    pub fn registration(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.registration.as_deref()
    }

    /// The buffer's first byte, for a lane that writes into it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // Deregister before the memory goes back to the allocator.
        drop(self.registration.take());
        let layout = Layout::from_size_align(self.len, PAGE_BUF_ALIGN).expect("validated in new");
        // SAFETY: allocated in new() with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.len)
    }
}

/// Memory outside any Rust object that one bulk read may fill: a range of a post-copy
/// destination's alias mapping, so pages land in the guest's page cache without a host copy.
#[derive(Debug)]
pub struct MappedRange {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a MappedRange is an exclusive claim on its bytes (see `new`), like a `&mut [u8]`.
unsafe impl Send for MappedRange {}

impl MappedRange {
    /// The range's first byte, for a lane that writes into it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// # Safety
    /// `ptr..ptr+len` must be mapped writable until this value is dropped, and nothing else may
    /// read or write those bytes meanwhile: it is lent to the lane as if it were `&mut [u8]`.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        MappedRange { ptr, len }
    }
}

/// Where a bulk read lands: an owned buffer, or a mapped range of guest memory.
///
/// A lane may leave the pages it reports zero untouched in a `Mapped` target (the caller does not
/// use their bytes, and writing zeros into a file's holes would allocate memory for them); in a
/// `Buffer` they are zero-filled.
#[derive(Debug)]
pub enum BulkTarget {
    /// A buffer the pages are read into, to be installed from.
    Buffer(PageBuf),
    /// Memory the pages land in directly (an alias of the guest's).
    Mapped(MappedRange),
}

impl BulkTarget {
    /// The buffer back, for reuse; `None` for a mapped range.
    pub fn into_buffer(self) -> Option<PageBuf> {
        match self {
            BulkTarget::Buffer(b) => Some(b),
            BulkTarget::Mapped(_) => None,
        }
    }
}

impl From<PageBuf> for BulkTarget {
    fn from(b: PageBuf) -> Self {
        BulkTarget::Buffer(b)
    }
}

impl std::ops::Deref for BulkTarget {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BulkTarget::Buffer(b) => b,
            // SAFETY: MappedRange::new's contract: mapped, and ours alone until dropped.
            BulkTarget::Mapped(m) => unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), m.len) },
        }
    }
}

impl std::ops::DerefMut for BulkTarget {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            BulkTarget::Buffer(b) => b,
            // SAFETY: as in deref, with &mut self for exclusivity.
            BulkTarget::Mapped(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) },
        }
    }
}

/// A bulk read: fill `buf` (at least the run's size) with `run`. `tag` comes back on completion.
#[derive(Debug)]
pub struct BulkRead {
    /// The pages to read.
    pub run: PageRun,
    /// Where they go.
    pub buf: BulkTarget,
    /// The caller's own mark, returned with the completion.
    pub tag: u64,
}

/// A completed bulk read. Pages marked in `zero` are all zero in `buf`.
#[derive(Debug)]
pub struct BulkDone {
    /// The pages read.
    pub run: PageRun,
    /// Where they went.
    pub buf: BulkTarget,
    /// The read's tag, as submitted.
    pub tag: u64,
    /// Which of them are zero.
    pub zero: ZeroMask,
}

/// Breaks a lane's blocked read or write from another thread: a session torn down must not wait
/// out the lane's read deadline.
pub type Interrupter = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Low-latency reads for faults.
pub trait UrgentLane: Send {
    /// Reads `run` into `dst[..run bytes]`. Pages marked in the returned mask are zero in `dst`;
    /// a backend may also return zero pages unmarked.
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask>;

    /// A buffer this lane reads into fastest (registered with its device, where it has one).
    fn buffer(&mut self, len: usize) -> Result<PageBuf> {
        Ok(PageBuf::new(len))
    }

    /// Lets the lane read straight into `ptr..ptr+len` (a destination's alias mapping of guest
    /// memory) when a read's target lies there. A no-op for lanes that need no registration.
    ///
    /// # Safety
    /// The range must stay mapped, by the same mapping, until this lane is dropped.
    unsafe fn register_landing(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let _ = (ptr, len);
        Ok(())
    }

    /// A handle that makes a blocked [`UrgentLane::read`] fail at once; `None` where reads do
    /// not block on a peer (a file, a shared mapping).
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// Pipelined reads for pre-paging.
pub trait BulkLane: Send {
    /// Most reads that may be in flight at once.
    fn depth(&self) -> usize;
    /// Reads submitted and not yet completed.
    fn in_flight(&self) -> usize;
    /// Starts a read. Fails with `LaneFull` when `depth` reads are in flight: complete one first.
    fn submit(&mut self, read: BulkRead) -> Result<()>;
    /// Waits for one read to complete; `None` when nothing is in flight.
    fn complete(&mut self) -> Result<Option<BulkDone>>;

    /// A buffer this lane reads into fastest (registered with its device, where it has one).
    fn buffer(&mut self, len: usize) -> Result<PageBuf> {
        Ok(PageBuf::new(len))
    }

    /// As [`UrgentLane::register_landing`].
    ///
    /// # Safety
    /// The range must stay mapped, by the same mapping, until this lane is dropped.
    unsafe fn register_landing(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let _ = (ptr, len);
        Ok(())
    }

    /// A handle that makes a blocked [`BulkLane::complete`] fail at once; `None` where it does
    /// not block on a peer.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// Both lanes of one session with a source, as the destination holds them.
pub struct PageSource {
    /// The session the lanes belong to.
    pub session: SessionId,
    /// The guest memory layout the source serves.
    pub layout: MemoryLayout,
    /// For faults: one read at a time, never behind pre-paging.
    pub urgent: Box<dyn UrgentLane>,
    /// For pre-paging: pipelined reads.
    pub bulk: Box<dyn BulkLane>,
    /// How to reopen a lane of this session after it broke, where the backend can (`tcp`); a
    /// file or a shared mapping does not break.
    pub reconnect: Option<std::sync::Arc<dyn Reconnect>>,
}

/// Reopens one lane of an existing session after its connection broke: the same session id,
/// authenticated again. Reads are idempotent, so what was in flight is simply asked again.
pub trait Reconnect: Send + Sync + std::fmt::Debug {
    /// The urgent lane, reopened.
    fn urgent(&self) -> Result<Box<dyn UrgentLane>>;
    /// The bulk lane, reopened.
    fn bulk(&self) -> Result<Box<dyn BulkLane>>;
    /// The session's control lane, reopened (reads block until a message comes).
    fn control(&self) -> Result<Box<dyn ControlStream>>;
}

impl std::fmt::Debug for PageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSource").field("session", &self.session).field("layout", &self.layout).finish()
    }
}

/// An authenticated connection for a session's own messages (handoff, progress, done).
pub trait ControlStream: std::io::Read + std::io::Write + Send + std::fmt::Debug {
    /// Sets how long a read may wait (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()>;
    /// Sets how long a write may wait for the peer to take the bytes (`None`: forever).
    fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()>;
    /// A second handle on the same connection (one thread reads while another writes).
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlStream>>;
    /// Waits up to `timeout` for something to read (or the peer's close); `false` on timeout.
    fn wait_readable(&self, timeout: std::time::Duration) -> std::io::Result<bool>;
    /// Shuts the connection down for every handle: blocked reads and writes return, the peer
    /// sees the lane close. Lets another thread cancel a session. Streams that cannot answer
    /// `Unsupported`.
    fn shutdown(&self) -> std::io::Result<()> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "this control stream cannot be shut down"))
    }
}

/// poll(2) for input on `fd`, retrying on EINTR.
fn poll_readable(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

macro_rules! control_stream {
    ($t:ty) => {
        impl ControlStream for $t {
            fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
                <$t>::set_read_timeout(self, timeout)
            }
            fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
                <$t>::set_write_timeout(self, timeout)
            }
            fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlStream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn wait_readable(&self, timeout: std::time::Duration) -> std::io::Result<bool> {
                poll_readable(std::os::fd::AsRawFd::as_raw_fd(self), timeout)
            }
            fn shutdown(&self) -> std::io::Result<()> {
                <$t>::shutdown(self, std::net::Shutdown::Both)
            }
        }
    };
}

control_stream!(std::net::TcpStream);
control_stream!(std::os::unix::net::UnixStream);

/// Waits up to `timeout` for a control lane a server's accept loop handed over, and makes its
/// reads block (a session may wait long between messages). Shared by the tcp and local servers.
pub(crate) fn receive_control<S: ControlStream>(
    rx: &std::sync::Mutex<std::sync::mpsc::Receiver<S>>,
    timeout: std::time::Duration,
) -> Result<S> {
    let rx = rx.lock().expect("control receiver poisoned");
    let stream = rx.recv_timeout(timeout).map_err(|_| {
        crate::error::TransportError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no destination opened a control lane",
        ))
    })?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Checks a destination buffer against a run, shared by every backend.
pub(crate) fn run_dst<'a>(layout: &MemoryLayout, run: PageRun, dst: &'a mut [u8]) -> Result<&'a mut [u8]> {
    layout.check_run(run)?;
    let (_, len) = layout.run_bytes(run);
    let got = dst.len();
    dst.get_mut(..len).ok_or(crate::error::TransportError::BufferSize { need: len, got })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buf_is_aligned_and_zeroed() {
        let mut b = PageBuf::new(3 * 4096 + 5);
        assert_eq!(b.as_mut_ptr() as usize % PAGE_BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[3 * 4096 + 4] = 9;
        assert_eq!(b.len(), 3 * 4096 + 5);
    }
}
