//! `ferry-ffi` is ferry's C ABI: opaque handles for a post-copy source and destination, guest
//! memory described as host regions the VMM owns, the state blob handed over as bytes, statistics
//! as a plain struct, and `ferry_status` codes with `ferry_last_error()` text per thread. Every
//! entry point catches panics, checks its pointers, and states its thread safety; the unsafe code
//! is confined to reading the caller's arguments and adopting the caller's memory. The header
//! `include/ferry.h` is generated from this file by cbindgen and checked in; a test fails when it
//! is stale. `scripts/install-c.sh PREFIX` installs `libferry.so`, `libferry.a`, `ferry.h` and
//! `ferry.pc`.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use ferry::fault_handler::{DestinationMemory, FaultStats};
use ferry::prepager::PolicyKind;
use ferry::transport::local::{self, LocalPageServer};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{
    ControlStream, GuestMemory, MemoryLayout, PageSource, PreSharedKey, RegionLayout, RegionMapping, TransportError,
};
use ferry::{Canceller, EngineConfig, FreePages, MigrationError, PostcopyDestination};

/// The ABI this library implements. Bumped on any incompatible change to ferry.h.
pub const FERRY_ABI_VERSION: u32 = 1;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryStatus {
    Ok = 0,
    /// A null pointer, a bad size, an unknown enum value, a key shorter than 16 bytes.
    ErrInvalidArgument = 1,
    /// A system call or the network failed.
    ErrIo = 2,
    /// The peer does not hold the key.
    ErrAuth = 3,
    /// The peer speaks another protocol version.
    ErrVersion = 4,
    /// The peer's guest memory layout differs from ours.
    ErrLayout = 5,
    /// The peer closed, refused, timed out or aborted the migration.
    ErrPeer = 6,
    /// This machine or this build cannot do what was asked (no userfaultfd, a transport not built).
    ErrUnsupported = 7,
    /// The call does not fit the handle's state (for example waiting before starting).
    ErrState = 8,
    /// A bug in ferry; the message says where.
    ErrInternal = 9,
}

/// One region of guest memory, as the VMM mapped it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryRegion {
    pub guest_phys_addr: u64,
    /// Start of the host mapping; page aligned.
    pub host_addr: *mut c_void,
    /// Bytes; a multiple of the page size.
    pub size: u64,
    /// The memfd or hugetlbfs file backing the mapping from offset 0, or -1 for anonymous memory.
    /// ferry duplicates it; the caller keeps its own.
    pub fd: i32,
}

/// The pre-pager a destination runs; passed as a `uint32_t` so that an out-of-range value is an
/// error, not undefined behaviour.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryPrepager {
    Demand = 0,
    Push = 1,
    Bubbling = 2,
}

/// Counters of a migration. Fields a side does not measure are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FerryStats {
    pub pages_total: u64,
    pub network_faults: u64,
    pub inflight_faults: u64,
    pub urgent_pages: u64,
    pub bulk_pages: u64,
    pub zero_pages: u64,
    pub skipped_free_pages: u64,
    /// Pages the source served more than once, or the destination installed more than once.
    pub pages_sent_twice: u64,
    pub total_us: u64,
    pub downtime_us: u64,
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    pub blocktime_us: u64,
}

/// A post-copy source: a page server over the guest's memory.
#[derive(Debug)]
pub struct FerrySource {
    server: SourceServer,
    pages: u64,
    page_size: u64,
    /// The destination's control lane, once accepted.
    control: Mutex<Option<Box<dyn ControlStream>>>,
}

#[derive(Debug)]
enum SourceServer {
    Tcp(TcpPageServer),
    /// `unix:PATH`: the same-host transport; guest memory must be memfd or hugetlbfs backed.
    Local(LocalPageServer),
    /// `rdma:HOST:PORT[#DEVICE]`: one-sided RDMA READs (built with feature `rdma`).
    #[cfg(feature = "rdma")]
    Rdma(ferry::transport::rdma::RdmaPageServer),
}

/// A post-copy destination, from connection to completion. Every entry point takes it by shared
/// reference; what changes lives behind locks, so the documented concurrent calls are sound.
#[derive(Debug)]
pub struct FerryDestination {
    policy: PolicyKind,
    pending: Mutex<Option<(PageSource, Box<dyn ControlStream>)>>,
    session: Mutex<Option<PostcopyDestination>>,
    /// Set by start: live counters and the cancel switch, usable while another thread waits.
    running: Mutex<Option<(Arc<FaultStats>, Canceller)>>,
    /// Last: lanes above may have registered its alias mappings, so they go first.
    memory: Arc<DestinationMemory>,
}

/// Where a source listens or a destination connects.
enum Address<'a> {
    Tcp(&'a str),
    /// `unix:PATH`: the local transport.
    Unix(&'a str),
    /// `rdma:HOST:PORT` or `rdma:HOST:PORT#DEVICE`: TCP for the handshake and setup, RDMA READs
    /// for pages.
    Rdma {
        addr: &'a str,
        device: Option<&'a str>,
    },
}

fn parse_address(addr: &str) -> Address<'_> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return Address::Unix(path);
    }
    if let Some(rest) = addr.strip_prefix("rdma:") {
        return match rest.split_once('#') {
            Some((addr, device)) => Address::Rdma { addr, device: Some(device) },
            None => Address::Rdma { addr: rest, device: None },
        };
    }
    Address::Tcp(addr)
}

#[cfg(feature = "rdma")]
fn rdma_options(device: Option<&str>) -> ferry::transport::rdma::RdmaOptions {
    ferry::transport::rdma::RdmaOptions { device: device.map(str::to_owned), ..Default::default() }
}

#[cfg(not(feature = "rdma"))]
fn no_rdma(addr: &str, device: Option<&str>) -> (FerryStatus, String) {
    let on = device.map(|d| format!(" on {d}")).unwrap_or_default();
    let why = format!("rdma to {addr}{on}: this libferry was built without the rdma transport (cargo feature rdma)");
    (FerryStatus::ErrUnsupported, why)
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning errors and panics into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), (FerryStatus, String)>) -> FerryStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FerryStatus::Ok,
        Ok(Err((status, message))) => {
            set_error(&message);
            status
        }
        Err(panic) => {
            let what =
                panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
            set_error(&format!("internal error: {}", what.unwrap_or("panic")));
            FerryStatus::ErrInternal
        }
    }
}

fn invalid(message: impl Into<String>) -> (FerryStatus, String) {
    (FerryStatus::ErrInvalidArgument, message.into())
}

fn transport_status(e: &TransportError) -> FerryStatus {
    match e {
        TransportError::AuthFailed(_) | TransportError::InvalidKey(_) => FerryStatus::ErrAuth,
        TransportError::VersionMismatch { .. } => FerryStatus::ErrVersion,
        TransportError::LayoutMismatch(_) | TransportError::InvalidLayout(_) => FerryStatus::ErrLayout,
        TransportError::Refused { reason, .. } => match reason {
            ferry::transport::wire::RejectReason::Auth => FerryStatus::ErrAuth,
            ferry::transport::wire::RejectReason::Version => FerryStatus::ErrVersion,
            ferry::transport::wire::RejectReason::Layout => FerryStatus::ErrLayout,
            _ => FerryStatus::ErrPeer,
        },
        TransportError::PeerClosed | TransportError::Malformed { .. } | TransportError::Unexpected { .. } => {
            FerryStatus::ErrPeer
        }
        _ => FerryStatus::ErrIo,
    }
}

fn migration(e: MigrationError) -> (FerryStatus, String) {
    let status = match &e {
        MigrationError::Transport(t) => transport_status(t),
        MigrationError::Fault(ferry::fault_handler::FaultError::Unsupported(_)) => FerryStatus::ErrUnsupported,
        MigrationError::Fault(ferry::fault_handler::FaultError::Transport(t)) => transport_status(t),
        MigrationError::Fault(_) => FerryStatus::ErrIo,
        MigrationError::Protocol(_) | MigrationError::PeerAborted(_) => FerryStatus::ErrPeer,
        MigrationError::Resume(_) | MigrationError::Vmm(_) => FerryStatus::ErrState,
        MigrationError::ThreadPanicked => FerryStatus::ErrInternal,
    };
    (status, e.to_string())
}

fn transport(e: TransportError) -> (FerryStatus, String) {
    (transport_status(&e), e.to_string())
}

/// Borrows the caller's region array.
///
/// # Safety
/// `regions` must point to `count` valid `FerryRegion`s (or be null with `count` 0).
unsafe fn regions_arg<'a>(
    regions: *const FerryRegion,
    count: usize,
) -> Result<&'a [FerryRegion], (FerryStatus, String)> {
    if regions.is_null() || count == 0 {
        return Err(invalid("regions is null or empty"));
    }
    // SAFETY: the caller promises `count` readable FerryRegions at `regions`.
    Ok(unsafe { std::slice::from_raw_parts(regions, count) })
}

fn layout_of(regions: &[FerryRegion], page_size: u32) -> Result<MemoryLayout, (FerryStatus, String)> {
    let layout = regions.iter().map(|r| RegionLayout { guest_phys_addr: r.guest_phys_addr, size: r.size }).collect();
    MemoryLayout::new(page_size, layout).map_err(|e| invalid(e.to_string()))
}

/// Adopts the caller's mappings as guest memory.
///
/// # Safety
/// Every region's `host_addr..+size` must be a mapping that stays valid, unmoved, until the
/// handle built from it is freed; `fd`, when not -1, must back it from offset 0.
unsafe fn adopt(regions: &[FerryRegion], page_size: u32) -> Result<GuestMemory, (FerryStatus, String)> {
    let layout = layout_of(regions, page_size)?;
    let mut mappings = Vec::with_capacity(regions.len());
    for (i, r) in regions.iter().enumerate() {
        let ptr =
            NonNull::new(r.host_addr.cast::<u8>()).ok_or_else(|| invalid(format!("region {i}: host_addr is null")))?;
        if ptr.as_ptr() as usize % page_size as usize != 0 {
            return Err(invalid(format!("region {i}: host_addr is not page aligned")));
        }
        let fd = match r.fd {
            -1 => None,
            fd if fd >= 0 => {
                // SAFETY: the caller says fd is an open file descriptor; we only duplicate it.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                Some(borrowed.try_clone_to_owned().map_err(|e| invalid(format!("region {i}: fd {fd}: {e}")))?)
            }
            fd => return Err(invalid(format!("region {i}: fd {fd}"))),
        };
        let size = usize::try_from(r.size).map_err(|_| invalid(format!("region {i}: size")))?;
        // SAFETY: the caller's contract above is exactly from_raw's.
        mappings.push(unsafe { RegionMapping::from_raw(ptr, size, fd, true) });
    }
    GuestMemory::new(layout, mappings).map_err(|e| invalid(e.to_string()))
}

/// # Safety
/// `key` must point to `len` readable bytes.
unsafe fn key_arg(key: *const u8, len: usize) -> Result<PreSharedKey, (FerryStatus, String)> {
    if key.is_null() {
        return Err(invalid("key is null"));
    }
    // SAFETY: the caller promises `len` readable bytes at `key`.
    let bytes = unsafe { std::slice::from_raw_parts(key, len) };
    PreSharedKey::new(bytes.to_vec()).map_err(|e| invalid(e.to_string()))
}

/// # Safety
/// `s` must be null or a NUL-terminated string.
unsafe fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, (FerryStatus, String)> {
    if s.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_str().map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// Locks a handle's state; a panic while it was held (turned into FERRY_STATUS_ERR_INTERNAL) does
/// not make the handle unusable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// The ABI version of this library (`FERRY_ABI_VERSION` of the header it was built from).
/// Thread safety: any thread, any time.
#[no_mangle]
pub extern "C" fn ferry_abi_version() -> u32 {
    FERRY_ABI_VERSION
}

/// The message of the last failed call on this thread, or "" if none. Valid until the next
/// ferry call on this thread. Thread safety: per thread.
#[no_mangle]
pub extern "C" fn ferry_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Starts a post-copy source: serves the guest memory in `regions` to an authenticated destination
/// on TCP address `listen_addr` (for example "0.0.0.0:7070", or port 0 for any free port); as
/// "unix:PATH", on a Unix socket for a destination on this host (local transport: the destination
/// maps the memory itself, so every region needs an fd); as "rdma:HOST:PORT" or
/// "rdma:HOST:PORT#DEVICE", by one-sided RDMA READs, the memory registered read-only for the
/// peer (a library built with the rdma feature; otherwise FERRY_STATUS_ERR_UNSUPPORTED).
/// The guest should be paused before ferry_source_handoff; pages are read while it is.
/// Thread safety: any thread; the handle may then be used from one thread at a time, except
/// ferry_source_cancel, which any thread may call.
///
/// # Safety
/// `regions` points to `region_count` regions whose mappings stay valid until ferry_source_free;
/// `key` to `key_len` bytes; `listen_addr` is NUL-terminated; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_start(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    listen_addr: *const c_char,
    key: *const u8,
    key_len: usize,
    out: *mut *mut FerrySource,
) -> FerryStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // SAFETY: forwarded caller contracts (see this function's Safety section).
        let (regions, key, addr) = unsafe {
            (regions_arg(regions, region_count)?, key_arg(key, key_len)?, str_arg(listen_addr, "listen_addr")?)
        };
        // SAFETY: forwarded caller contract on the mappings.
        let memory = unsafe { adopt(regions, page_size)? };
        let pages = memory.layout().total_pages();
        let page_size = u64::from(memory.layout().page_size());
        let memory = Arc::new(memory);
        let server = match parse_address(addr) {
            Address::Unix(path) => SourceServer::Local(LocalPageServer::start(path, memory, key).map_err(transport)?),
            Address::Tcp(addr) => {
                SourceServer::Tcp(TcpPageServer::start(addr, memory, key, TcpOptions::default()).map_err(transport)?)
            }
            #[cfg(feature = "rdma")]
            Address::Rdma { addr, device } => SourceServer::Rdma(
                ferry::transport::rdma::RdmaPageServer::start(addr, memory, key, rdma_options(device))
                    .map_err(transport)?,
            ),
            #[cfg(not(feature = "rdma"))]
            Address::Rdma { addr, device } => return Err(no_rdma(addr, device)),
        };
        let handle = Box::new(FerrySource { server, pages, page_size, control: Mutex::new(None) });
        // SAFETY: out is non-null (checked) and writable (caller contract).
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// The TCP port the source listens on, also for an rdma: source (FERRY_STATUS_ERR_STATE for a
/// unix: source).
/// Thread safety: any thread.
///
/// # Safety
/// `source` is a live handle; `port` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_port(source: *const FerrySource, port: *mut u16) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        // SAFETY: caller contract: writable or null.
        let port = unsafe { port.as_mut() }.ok_or_else(|| invalid("port is null"))?;
        match &source.server {
            SourceServer::Tcp(server) => *port = server.local_addr().port(),
            #[cfg(feature = "rdma")]
            SourceServer::Rdma(server) => *port = server.local_addr().port(),
            SourceServer::Local(_) => return Err((FerryStatus::ErrState, "a unix: source has no TCP port".into())),
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the destination to connect and authenticate. Call it before
/// pausing the guest, so that the downtime does not include connection setup; otherwise
/// ferry_source_handoff waits itself. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_wait_destination(source: *const FerrySource, timeout_ms: u32) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        let control = source.accept(Duration::from_millis(u64::from(timeout_ms)))?;
        *lock(&source.control) = Some(control);
        Ok(())
    })
}

impl FerrySource {
    fn accept(&self, timeout: Duration) -> Result<Box<dyn ControlStream>, (FerryStatus, String)> {
        Ok(match &self.server {
            SourceServer::Tcp(server) => Box::new(server.accept_control(timeout).map_err(transport)?),
            SourceServer::Local(server) => Box::new(server.accept_control(timeout).map_err(transport)?),
            #[cfg(feature = "rdma")]
            SourceServer::Rdma(server) => Box::new(server.accept_control(timeout).map_err(transport)?),
        })
    }
}

/// With the guest paused: waits up to `timeout_ms` for the destination (unless
/// ferry_source_wait_destination already did), hands over `state` and the
/// free-page bitmap (`free_words` 64-bit words, bit i = global page i is free; may be null), then
/// blocks until the destination holds every page. `stats` (may be null) receives the downtime
/// (from this call to the guest running there), total time and served-twice count. After FERRY_STATUS_OK
/// the source may release guest memory. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; `state` points to `state_len` bytes (or is null with 0);
/// `free_bitmap` to `free_words` words (or null with 0); `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_handoff(
    source: *mut FerrySource,
    state: *const u8,
    state_len: usize,
    free_bitmap: *const u64,
    free_words: usize,
    timeout_ms: u32,
    stats: *mut FerryStats,
) -> FerryStatus {
    guard(|| {
        let paused_at = Instant::now();
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        let state = match (state.is_null(), state_len) {
            (true, 0) => &[][..],
            (true, _) => return Err(invalid("state is null")),
            // SAFETY: caller contract: state_len readable bytes.
            (false, n) => unsafe { std::slice::from_raw_parts(state, n) },
        };
        let free = match (free_bitmap.is_null(), free_words) {
            (true, 0) => FreePages::new(source.pages),
            (true, _) => return Err(invalid("free_bitmap is null")),
            (false, n) => {
                // SAFETY: caller contract: n readable words.
                let words = unsafe { std::slice::from_raw_parts(free_bitmap, n) }.to_vec();
                FreePages::from_words(words, source.pages).ok_or_else(|| {
                    invalid(format!(
                        "free_bitmap: {} pages need {} words, no bits past the end",
                        source.pages,
                        source.pages.div_ceil(64)
                    ))
                })?
            }
        };
        let accepted = lock(&source.control).take();
        let mut control = match accepted {
            Some(control) => control,
            None => source.accept(Duration::from_millis(u64::from(timeout_ms)))?,
        };
        let report = ferry::run_source(control.as_mut(), paused_at, state, &free).map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(stats) = unsafe { stats.as_mut() } {
            *stats = FerryStats {
                pages_total: source.pages,
                network_faults: report.done.network_faults,
                urgent_pages: report.done.urgent_pages,
                bulk_pages: report.done.bulk_pages,
                skipped_free_pages: report.done.skipped_free_pages,
                pages_sent_twice: match &source.server {
                    SourceServer::Tcp(server) => {
                        server.stats().pages_served_twice.load(std::sync::atomic::Ordering::Relaxed)
                    }
                    // One-sided reads: the source sees none of them.
                    SourceServer::Local(_) => 0,
                    #[cfg(feature = "rdma")]
                    SourceServer::Rdma(_) => 0,
                },
                total_us: micros(report.total),
                downtime_us: micros(report.downtime),
                ..FerryStats::default()
            };
        }
        Ok(())
    })
}

/// Fills `words` (`word_count` 64-bit words, zeroed by ferry; bit i = global page i) with the pages
/// the guest wrote since the previous call, and clears that record; returns 0, anything else aborts.
/// The first call starts tracking. KVM VMMs answer with KVM_GET_DIRTY_LOG.
pub type FerryDirtyLogFn = Option<unsafe extern "C" fn(words: *mut u64, word_count: usize, user: *mut c_void) -> i32>;

/// Stops the guest's vCPUs and points `*state`/`*len` at its state blob, which must stay valid
/// until ferry_source_precopy returns; returns 0, anything else aborts.
pub type FerryPauseFn = Option<unsafe extern "C" fn(state: *mut *const u8, len: *mut usize, user: *mut c_void) -> i32>;

struct CallbackDirtyLog {
    collect: unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> i32,
    user: *mut c_void,
    pages: u64,
}

impl ferry::precopy::DirtyLog for CallbackDirtyLog {
    fn collect(&mut self) -> ferry::Result<FreePages> {
        let mut words = vec![0u64; self.pages.div_ceil(64) as usize];
        // SAFETY: the VMM's callback, given a buffer of exactly `words.len()` words it may write.
        let rc = unsafe { (self.collect)(words.as_mut_ptr(), words.len(), self.user) };
        if rc != 0 {
            return Err(MigrationError::Vmm(format!("the dirty-log callback returned {rc}")));
        }
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1 << tail) - 1;
            }
        }
        FreePages::from_words(words, self.pages)
            .ok_or_else(|| MigrationError::Vmm("dirty bitmap of the wrong size".into()))
    }
}

/// Pre-copy, with the guest running: waits up to `timeout_ms` for a destination that called
/// ferry_precopy_receive (unless ferry_source_wait_destination already did), lets it pull every
/// page, then the pages `dirty_log` reports, round after round, until the predicted downtime is at
/// most `downtime_target_ms` or `max_rounds` rounds ran; then calls `pause` and sends the last
/// dirty pages and the state. Returns once the destination's guest runs; `stats` (may be null)
/// gets the downtime and total time. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; the callbacks are valid functions; `user` is passed through;
/// `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_precopy(
    source: *mut FerrySource,
    dirty_log: FerryDirtyLogFn,
    pause: FerryPauseFn,
    user: *mut c_void,
    downtime_target_ms: u32,
    max_rounds: u32,
    timeout_ms: u32,
    stats: *mut FerryStats,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        let collect = dirty_log.ok_or_else(|| invalid("dirty_log is null"))?;
        let pause = pause.ok_or_else(|| invalid("pause is null"))?;
        let accepted = lock(&source.control).take();
        let mut control = match accepted {
            Some(control) => control,
            None => source.accept(Duration::from_millis(u64::from(timeout_ms)))?,
        };
        let mut log = CallbackDirtyLog { collect, user, pages: source.pages };
        let config = ferry::precopy::PrecopyConfig {
            downtime_target: Duration::from_millis(u64::from(downtime_target_ms)),
            max_rounds: max_rounds.max(1),
        };
        let pause_guest = || -> ferry::Result<Vec<u8>> {
            let (mut state, mut len): (*const u8, usize) = (std::ptr::null(), 0);
            // SAFETY: the VMM's callback writes the two out-parameters, which live across the call.
            let rc = unsafe { pause(&mut state, &mut len, user) };
            if rc != 0 {
                return Err(MigrationError::Vmm(format!("the pause callback returned {rc}")));
            }
            match (state.is_null(), len) {
                (_, 0) => Ok(Vec::new()),
                (true, _) => Err(MigrationError::Vmm("the pause callback gave a null state".into())),
                // SAFETY: the callback promises `len` readable bytes at `state` until we return.
                (false, n) => Ok(unsafe { std::slice::from_raw_parts(state, n) }.to_vec()),
            }
        };
        let page_size = source.page_size;
        let report = ferry::precopy::run_source(control.as_mut(), page_size, &mut log, pause_guest, &config)
            .map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(stats) = unsafe { stats.as_mut() } {
            *stats = FerryStats {
                pages_total: source.pages,
                bulk_pages: report.pages_per_round.iter().sum(),
                total_us: micros(report.total),
                downtime_us: micros(report.downtime),
                ..FerryStats::default()
            };
        }
        Ok(())
    })
}

/// The destination of a pre-copy migration, in one call: connects to the source at `addr` (TCP or
/// "unix:PATH"), pulls its rounds into the guest memory in `regions` (plain memory: no
/// userfaultfd), and calls `resume` with the state blob after the final round. Returns once the
/// guest runs. Thread safety: any thread.
///
/// # Safety
/// As ferry_destination_connect; `resume` is a valid function.
#[no_mangle]
pub unsafe extern "C" fn ferry_precopy_receive(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    addr: *const c_char,
    key: *const u8,
    key_len: usize,
    resume: FerryResumeFn,
    user: *mut c_void,
) -> FerryStatus {
    guard(|| {
        let resume = resume.ok_or_else(|| invalid("resume is null"))?;
        // SAFETY: forwarded caller contracts.
        let (regions, key, addr) =
            unsafe { (regions_arg(regions, region_count)?, key_arg(key, key_len)?, str_arg(addr, "addr")?) };
        // SAFETY: forwarded caller contract on the mappings.
        let guest = unsafe { adopt(regions, page_size)? };
        let layout = guest.layout().clone();
        let (lanes, mut control) = connect_session(addr, &key, &layout, None)?;
        ferry::precopy::run_destination(control.as_mut(), &guest, lanes, |state| {
            // SAFETY: `resume` is the caller's function; state is valid for the call.
            match unsafe { resume(state.as_ptr(), state.len(), user) } {
                0 => Ok(()),
                rc => Err(format!("resume callback returned {rc}")),
            }
        })
        .map_err(migration)?;
        Ok(())
    })
}

/// Opens a session's lanes over TCP, the local transport ("unix:PATH") or RDMA ("rdma:...").
/// With `landings`, RDMA lanes register its alias mappings before the control lane opens.
fn connect_session(
    addr: &str,
    key: &PreSharedKey,
    layout: &MemoryLayout,
    landings: Option<&DestinationMemory>,
) -> Result<(PageSource, Box<dyn ControlStream>), (FerryStatus, String)> {
    Ok(match parse_address(addr) {
        Address::Unix(path) => {
            let (lanes, control) = local::connect_session(path, key, Some(layout), 32).map_err(transport)?;
            (lanes, Box::new(control))
        }
        Address::Tcp(addr) => {
            let (lanes, control) =
                tcp::connect_session(addr, key, Some(layout), &TcpOptions::default()).map_err(transport)?;
            (lanes, Box::new(control))
        }
        #[cfg(feature = "rdma")]
        Address::Rdma { addr, device } => {
            let session =
                ferry::transport::rdma::connect_session(addr, key, Some(layout), &rdma_options(device), |lanes| {
                    match landings {
                        // SAFETY: the lanes end up in the FerryDestination that owns this memory,
                        // which drops them first (field order), or in the pre-copy receive,
                        // which registers nothing.
                        Some(memory) => unsafe { ferry::register_landings(memory, lanes) },
                        None => Ok(()),
                    }
                })
                .map_err(transport)?;
            (session.source, Box::new(session.control))
        }
        #[cfg(not(feature = "rdma"))]
        Address::Rdma { addr, device } => {
            let _ = landings;
            return Err(no_rdma(addr, device));
        }
    })
}

/// Drops every connection of the source: a handoff in progress fails with FERRY_STATUS_ERR_PEER and the
/// destination sees its lanes fail. Thread safety: any thread, also during ferry_source_handoff.
///
/// # Safety
/// `source` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_cancel(source: *const FerrySource) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        match &source.server {
            SourceServer::Tcp(server) => server.drop_connections(),
            SourceServer::Local(server) => server.drop_connections(),
            #[cfg(feature = "rdma")]
            SourceServer::Rdma(server) => server.drop_connections(),
        }
        Ok(())
    })
}

/// Stops serving and frees the handle. Null is ignored. Thread safety: once, when no other call
/// on the handle is running.
///
/// # Safety
/// `source` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_free(source: *mut FerrySource) {
    if !source.is_null() {
        // SAFETY: caller contract: a handle from ferry_source_start, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(source) })));
    }
}

/// Connects a post-copy destination to the source at `addr` (a TCP address, "unix:PATH" for
/// the local transport, or "rdma:HOST:PORT[#DEVICE]"; pre-pager: a `FerryPrepager` value) and registers the guest memory in
/// `regions` with userfaultfd. The memory must be mapped but never touched (touched pages are
/// taken as present). Regions with an fd are filled in place and mapped with UFFDIO_CONTINUE.
/// Thread safety: any thread; then start, finish and wait from one thread at a time, stats and
/// cancel from any thread at any time.
///
/// # Safety
/// As ferry_source_start, with `addr` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_connect(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    addr: *const c_char,
    key: *const u8,
    key_len: usize,
    prepager: u32,
    out: *mut *mut FerryDestination,
) -> FerryStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let policy = match prepager {
            p if p == FerryPrepager::Demand as u32 => PolicyKind::Demand,
            p if p == FerryPrepager::Push as u32 => PolicyKind::Push,
            p if p == FerryPrepager::Bubbling as u32 => PolicyKind::Bubbling,
            other => return Err(invalid(format!("prepager {other}"))),
        };
        // SAFETY: forwarded caller contracts.
        let (regions, key, addr) =
            unsafe { (regions_arg(regions, region_count)?, key_arg(key, key_len)?, str_arg(addr, "addr")?) };
        // SAFETY: forwarded caller contract on the mappings.
        let guest = unsafe { adopt(regions, page_size)? };
        let layout = guest.layout().clone();
        // Register first: the source may pause its guest as soon as our control lane connects.
        let memory = DestinationMemory::register(guest).map_err(|e| migration(e.into()))?;
        let (lanes, control) = connect_session(addr, &key, &layout, Some(&memory))?;
        let handle = Box::new(FerryDestination {
            policy,
            pending: Mutex::new(Some((lanes, control))),
            session: Mutex::new(None),
            running: Mutex::new(None),
            memory: Arc::new(memory),
        });
        // SAFETY: out is non-null (checked) and writable (caller contract).
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Called once with the state blob when the handoff arrives; load it and start the vCPUs, then
/// return 0 (anything else aborts the migration). `state` is valid only during the call.
pub type FerryResumeFn = Option<unsafe extern "C" fn(state: *const u8, len: usize, user: *mut c_void) -> i32>;

/// Blocks until the source hands over, serves faults from then on, calls `resume`, and returns
/// once the guest runs; memory keeps arriving until ferry_destination_wait. Thread safety: not
/// concurrently with start, finish or wait on the same handle.
///
/// # Safety
/// `destination` is a live handle; `resume` is a valid function; `user` is passed through.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_start(
    destination: *mut FerryDestination,
    resume: FerryResumeFn,
    user: *mut c_void,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        let resume = resume.ok_or_else(|| invalid("resume is null"))?;
        let pending = lock(&d.pending).take();
        let (lanes, control) = pending.ok_or_else(|| (FerryStatus::ErrState, "already started".to_string()))?;
        let config = EngineConfig { policy: d.policy, ..EngineConfig::default() };
        let session = PostcopyDestination::start(control, d.memory.clone(), lanes, &config, |state| {
            // SAFETY: `resume` is the caller's function; state is valid for the call.
            match unsafe { resume(state.as_ptr(), state.len(), user) } {
                0 => Ok(()),
                rc => Err(format!("resume callback returned {rc}")),
            }
        })
        .map_err(migration)?;
        *lock(&d.running) = Some((session.stats_handle(), session.canceller()));
        *lock(&d.session) = Some(session);
        Ok(())
    })
}

/// Once the pre-pager has nothing more to fetch, fetches what is still missing in address order.
/// Push and bubbling never run dry while a page is missing, so only a `demand` destination (which
/// otherwise only fetches what the guest touches) needs it to complete. Thread safety: any thread
/// once started.
///
/// # Safety
/// `destination` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_finish(destination: *mut FerryDestination) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        lock(&d.session).as_ref().ok_or_else(|| (FerryStatus::ErrState, "not started".to_string()))?.finish();
        Ok(())
    })
}

/// Live counters while memory arrives (latencies are filled in by ferry_destination_wait).
/// Thread safety: any thread, concurrently with the others.
///
/// # Safety
/// `destination` is a live handle; `stats` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_stats(
    destination: *const FerryDestination,
    stats: *mut FerryStats,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        // SAFETY: caller contract: writable or null.
        let out = unsafe { stats.as_mut() }.ok_or_else(|| invalid("stats is null"))?;
        let get = FaultStats::get;
        let mut s = FerryStats { pages_total: d.memory.states().pages(), ..FerryStats::default() };
        if let Some((f, _)) = lock(&d.running).as_ref() {
            s.network_faults = get(&f.network_faults);
            s.inflight_faults = get(&f.inflight_faults);
            s.urgent_pages = get(&f.urgent_pages);
            s.bulk_pages = get(&f.bulk_pages);
            s.zero_pages = get(&f.zero_pages);
            s.skipped_free_pages = get(&f.skipped_free_pages);
            s.blocktime_us = get(&f.blocktime_ns) / 1000;
        }
        s.pages_sent_twice = d.memory.states().installed_twice();
        *out = s;
        Ok(())
    })
}

/// Blocks until every page is present, tells the source, releases userfaultfd, and fills `stats`
/// (may be null). Thread safety: one waiter per handle; stats and cancel may run meanwhile.
///
/// # Safety
/// `destination` is a live handle; `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_wait(
    destination: *mut FerryDestination,
    stats: *mut FerryStats,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        let session = lock(&d.session).take();
        let session = session.ok_or_else(|| (FerryStatus::ErrState, "not started, or already waited".to_string()))?;
        let r = session.wait().map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(out) = unsafe { stats.as_mut() } {
            *out = FerryStats {
                pages_total: r.pages_total,
                network_faults: r.network_faults,
                inflight_faults: r.inflight_faults,
                urgent_pages: r.urgent_pages,
                bulk_pages: r.bulk_pages,
                zero_pages: r.zero_pages,
                skipped_free_pages: r.skipped_free_pages,
                pages_sent_twice: r.pages_installed_twice,
                total_us: micros(r.total),
                downtime_us: micros(r.resume_latency),
                fault_p50_us: micros(r.fault_p50),
                fault_p99_us: micros(r.fault_p99),
                fault_max_us: micros(r.fault_max),
                blocktime_us: micros(r.blocktime),
            };
        }
        Ok(())
    })
}

/// Stops a started destination: its fault thread and pre-pager stop, and ferry_destination_wait
/// returns FERRY_STATUS_ERR_PEER with the pages still missing. Guest threads faulting on missing
/// pages stay blocked: stop the vCPUs. Thread safety: any thread, also during
/// ferry_destination_wait.
///
/// # Safety
/// `destination` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_cancel(destination: *const FerryDestination) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        let running = lock(&d.running);
        let (_, canceller) = running.as_ref().ok_or_else(|| (FerryStatus::ErrState, "not started".to_string()))?;
        canceller.cancel();
        Ok(())
    })
}

/// Frees the handle. A destination freed before every page arrived keeps its userfaultfd open,
/// so guest threads faulting on missing pages stay blocked instead of reading zeros: stop the
/// vCPUs first. Null is ignored. Thread safety: once, when no other call on the handle is running.
///
/// # Safety
/// `destination` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_free(destination: *mut FerryDestination) {
    if !destination.is_null() {
        // SAFETY: caller contract: a handle from ferry_destination_connect, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(destination) })));
    }
}
