//! `ferry-ffi` is ferry's C ABI: opaque handles for a migration's source and destination and for
//! snapshot images and restores, guest memory described as host regions the VMM owns, the state
//! blob handed over as bytes, statistics as a plain struct, and `ferry_status` codes with
//! `ferry_last_error()` text per thread. Every entry point catches panics, checks its pointers,
//! and states its thread safety; the unsafe code is confined to reading the caller's arguments and
//! adopting the caller's memory. This file holds what the calls share; `source`, `destination`,
//! `precopy` (task-guided pre-copy and pre-copy against a kept image), `backforth` (post-copy
//! against a kept image), `recovery` (surviving a destination that dies) and `snapshot` the
//! calls. The header `include/ferry.h` is generated from these files by cbindgen and checked in;
//! a test fails when it is stale. `scripts/install-c.sh PREFIX` installs `libferry.so`,
//! `libferry.a`, `ferry.h` and `ferry.pc`.

#![deny(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

use ferry::transport::{GuestMemory, MemoryLayout, PreSharedKey, RegionLayout, RegionMapping, TransportError};
use ferry::MigrationError;

mod backforth;
mod destination;
mod precopy;
mod recovery;
mod snapshot;
mod source;

pub use backforth::*;
pub use destination::*;
pub use precopy::*;
pub use recovery::*;
pub use snapshot::*;
pub use source::*;

/// The ABI this library implements. Bumped on any incompatible change to ferry.h.
pub const FERRY_ABI_VERSION: u32 = 1;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryStatus {
    /// The call succeeded.
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
    /// Where the region starts in guest-physical memory.
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
    /// Faults only.
    Demand = 0,
    /// Faults, and a sweep from the first page to the last.
    Push = 1,
    /// Faults, and a bubble growing outward both ways from the latest fault.
    Bubbling = 2,
}

/// Counters of a migration. Fields a side does not measure are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FerryStats {
    /// Pages in the guest.
    pub pages_total: u64,
    /// Faults that waited for the network.
    pub network_faults: u64,
    /// Faults on pages already on their way (pre-paging made them shorter).
    pub inflight_faults: u64,
    /// Pages brought by faults.
    pub urgent_pages: u64,
    /// Pages brought by pre-paging.
    pub bulk_pages: u64,
    /// Pages that arrived as zero (no data on the wire).
    pub zero_pages: u64,
    /// Pages the source named free, never sent.
    pub skipped_free_pages: u64,
    /// Pages the source served more than once, or the destination installed more than once.
    pub pages_sent_twice: u64,
    /// From the pause to every page present, in microseconds.
    pub total_us: u64,
    /// From the pause to the guest running at the destination, in microseconds.
    pub downtime_us: u64,
    /// Median network-fault latency, in microseconds.
    pub fault_p50_us: u64,
    /// 99th percentile network-fault latency, in microseconds.
    pub fault_p99_us: u64,
    /// Longest network fault, in microseconds.
    pub fault_max_us: u64,
    /// Total time faulting vCPUs waited on the network, in microseconds.
    pub blocktime_us: u64,
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
        TransportError::PeerClosed
        | TransportError::Tls(_)
        | TransportError::Silent(_)
        | TransportError::Malformed { .. }
        | TransportError::Unexpected { .. } => FerryStatus::ErrPeer,
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
        // Another side holds the guest: this one must not run it.
        MigrationError::LeaseHeld(_) | MigrationError::LeaseLost => FerryStatus::ErrState,
        MigrationError::Arbiter(_) => FerryStatus::ErrIo,
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
    let layout = regions
        .iter()
        .map(|r| RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(r.guest_phys_addr), size: r.size })
        .collect();
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

/// # Safety
/// `ptr` must be null with `len` 0, or point to `len` readable bytes.
unsafe fn bytes_arg<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], (FerryStatus, String)> {
    match (ptr.is_null(), len) {
        (true, 0) => Ok(&[]),
        (true, _) => Err(invalid(format!("{what} is null"))),
        // SAFETY: the caller promises `len` readable bytes at `ptr`.
        (false, n) => Ok(unsafe { std::slice::from_raw_parts(ptr, n) }),
    }
}

/// A free-page bitmap (`words` 64-bit words, bit i = global page i) for a guest of `pages`; null
/// with 0 words is "none free".
///
/// # Safety
/// `bitmap` must be null with `words` 0, or point to `words` readable words.
unsafe fn free_pages_arg(
    bitmap: *const u64,
    words: usize,
    pages: u64,
) -> Result<ferry::FreePages, (FerryStatus, String)> {
    match (bitmap.is_null(), words) {
        (true, 0) => Ok(ferry::FreePages::new(pages)),
        (true, _) => Err(invalid("free_bitmap is null")),
        (false, n) => {
            // SAFETY: caller contract: n readable words.
            let words = unsafe { std::slice::from_raw_parts(bitmap, n) }.to_vec();
            ferry::FreePages::from_words(words, pages).ok_or_else(|| {
                invalid(format!("free_bitmap: {pages} pages need {} words, no bits past the end", pages.div_ceil(64)))
            })
        }
    }
}

/// A `FerryPrepager` passed as a number.
fn policy_arg(prepager: u32) -> Result<ferry::prepager::PolicyKind, (FerryStatus, String)> {
    use ferry::prepager::PolicyKind;
    Ok(match prepager {
        p if p == FerryPrepager::Demand as u32 => PolicyKind::Demand,
        p if p == FerryPrepager::Push as u32 => PolicyKind::Push,
        p if p == FerryPrepager::Bubbling as u32 => PolicyKind::Bubbling,
        other => return Err(invalid(format!("prepager {other}"))),
    })
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
