//! The source side: a page server over the VMM's guest memory, the post-copy handoff, and
//! pre-copy rounds driven by the VMM's dirty log.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::transport::local::LocalPageServer;
use ferry::transport::tcp::{TcpOptions, TcpPageServer};
use ferry::transport::ControlStream;
use ferry::{FreePages, MigrationError};

use crate::*;

/// A post-copy source: a page server over the guest's memory.
#[derive(Debug)]
pub struct FerrySource {
    server: SourceServer,
    pub(crate) pages: u64,
    pub(crate) page_size: u64,
    /// The destination's control lane, once accepted.
    pub(crate) control: Mutex<Option<Box<dyn ControlStream>>>,
    /// Set when a migration starts: a source hands its guest over once (a second destination
    /// would resume a second copy).
    migrated: std::sync::atomic::AtomicBool,
    /// The guest's memory (also the page server's).
    pub(crate) memory: Arc<ferry::transport::GuestMemory>,
    /// Set by ferry_source_protect.
    protection: Mutex<Option<crate::recovery::SourceProtection>>,
    /// Set when a protected handoff failed: ferry_source_restart may then run.
    handoff_failed: std::sync::atomic::AtomicBool,
    /// Set by ferry_source_offer_base when the destination accepted the base: what the guest
    /// changes until the handoff, which sends the pages changed since the offer.
    pub(crate) base_changes: Mutex<Option<ferry::backforth::ChangeTracker<CallbackDirtyLog>>>,
    /// Set by ferry_source_cancel: no destination is accepted and no guest handed over any more.
    cancelled: std::sync::atomic::AtomicBool,
    /// A handle on the control lane a handoff or pre-copy is using, for ferry_source_cancel to
    /// shut (the page server forgets control lanes once it hands them over).
    in_use: Mutex<Option<Box<dyn ControlStream>>>,
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

/// Starts a post-copy source: serves the guest memory in `regions` to an authenticated destination
/// on TCP address `listen_addr` (for example "0.0.0.0:7070", or port 0 for any free port; every
/// lane over TLS 1.3, authenticated by the key); as
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
        let served = memory.clone();
        let server = match parse_address(addr) {
            Address::Unix(path) => {
                if let Some(i) = memory.regions().iter().position(|r| r.fd().is_none()) {
                    return Err(invalid(format!(
                        "unix: maps guest memory in the destination, so every region needs an fd (memfd or hugetlbfs); region {i} has none"
                    )));
                }
                SourceServer::Local(LocalPageServer::start(path, served, key).map_err(transport)?)
            }
            Address::Tcp(addr) => {
                SourceServer::Tcp(TcpPageServer::start(addr, served, key, TcpOptions::default()).map_err(transport)?)
            }
            #[cfg(feature = "rdma")]
            Address::Rdma { addr, device } => SourceServer::Rdma(
                ferry::transport::rdma::RdmaPageServer::start(addr, served, key, rdma_options(device))
                    .map_err(transport)?,
            ),
            #[cfg(not(feature = "rdma"))]
            Address::Rdma { addr, device } => return Err(no_rdma(addr, device)),
        };
        let handle = Box::new(FerrySource {
            server,
            pages,
            page_size,
            control: Mutex::new(None),
            migrated: std::sync::atomic::AtomicBool::new(false),
            memory,
            protection: Mutex::new(None),
            handoff_failed: std::sync::atomic::AtomicBool::new(false),
            base_changes: Mutex::new(None),
            cancelled: std::sync::atomic::AtomicBool::new(false),
            in_use: Mutex::new(None),
        });
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
    /// Refuses a second migration of the same guest (FERRY_STATUS_ERR_STATE); called once a
    /// destination is connected, so a handoff that found none may be tried again.
    fn check_not_migrated(&self) -> Result<(), (FerryStatus, String)> {
        if self.migrated.load(std::sync::atomic::Ordering::Acquire) {
            return Err((FerryStatus::ErrState, "this source already handed its guest over".into()));
        }
        Ok(())
    }

    /// Pre-copy after ferry_source_offer_base would offer the base twice.
    pub(crate) fn check_no_offer(&self) -> Result<(), (FerryStatus, String)> {
        if lock(&self.base_changes).is_some() {
            return Err((
                FerryStatus::ErrState,
                "a base was offered for post-copy: hand over with ferry_source_handoff".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn begin_migration(&self) -> Result<(), (FerryStatus, String)> {
        if self.migrated.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Err((FerryStatus::ErrState, "this source already handed its guest over (or is doing so)".into()));
        }
        Ok(())
    }

    /// A destination whose control lane broke opens it again on a tcp server; a protected source
    /// keeps its image for checkpoints.
    fn options<'a>(&'a self, protection: Option<&'a crate::recovery::SourceProtection>) -> ferry::SourceOptions<'a> {
        let reaccept = match &self.server {
            SourceServer::Tcp(s) => Some(s as &dyn ferry::ControlAcceptor),
            SourceServer::Local(s) => Some(s as &dyn ferry::ControlAcceptor),
            #[cfg(feature = "rdma")]
            SourceServer::Rdma(s) => Some(s as &dyn ferry::ControlAcceptor),
        };
        let mut options = ferry::SourceOptions { reaccept, ..Default::default() };
        if let Some(p) = protection {
            options.liveness = p.settings.liveness;
            options.recovery_window = p.settings.recovery_window;
            options.kept = Some(&p.kept);
        }
        options
    }

    pub(crate) fn protect(&self, settings: crate::recovery::Settings) -> Result<(), (FerryStatus, String)> {
        if self.migrated.load(std::sync::atomic::Ordering::Acquire) {
            return Err((FerryStatus::ErrState, "protect before the handoff".into()));
        }
        let mut protection = lock(&self.protection);
        if protection.is_some() {
            return Err((FerryStatus::ErrState, "already protected".into()));
        }
        *protection = Some(crate::recovery::SourceProtection::start(settings, self.memory.clone())?);
        Ok(())
    }

    /// See ferry_source_restart: the state blob (kept in the handle), its length and its epoch.
    pub(crate) fn restart(&self, wait: Duration) -> Result<crate::recovery::Restart, (FerryStatus, String)> {
        let mut guard = lock(&self.protection);
        let p = guard.as_mut().ok_or_else(|| (FerryStatus::ErrState, "this source is not protected".to_string()))?;
        if !self.handoff_failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err((FerryStatus::ErrState, "no failed handoff to restart from".into()));
        }
        if p.restart_state.is_none() {
            if let Some(terms) = &p.settings.lease {
                p.lease = Some(ferry::arbiter::LeaseKeeper::acquire(terms, wait, || {}).map_err(migration)?);
            }
            let handoff = p.handoff_state.as_deref().unwrap_or_default();
            let (epoch, state) = p.kept.restart_state(handoff);
            p.restart_state = Some((epoch.unwrap_or(0), state));
        }
        let (epoch, state) = p.restart_state.as_ref().expect("set above");
        Ok(crate::recovery::Restart { state: state.as_ptr(), len: state.len(), epoch: *epoch })
    }

    /// The destination's control lane: the one ferry_source_wait_destination (or
    /// ferry_source_offer_base) accepted, or one accepted now within `timeout_ms`. Refuses a
    /// source that already handed its guest over.
    pub(crate) fn connected(&self, timeout_ms: u32) -> Result<Connected<'_>, (FerryStatus, String)> {
        self.check_not_migrated()?;
        self.check_not_cancelled()?;
        let accepted = lock(&self.control).take();
        let control = match accepted {
            Some(control) => control,
            None => self.accept(Duration::from_millis(u64::from(timeout_ms)))?,
        };
        // From here ferry_source_cancel can shut the lane; a cancel that came just before is seen
        // below (the flag is set before cancel looks at `in_use`).
        *lock(&self.in_use) = control.try_clone_box().ok();
        if let Err(e) = self.check_not_cancelled() {
            let _ = control.shutdown();
            return Err(e);
        }
        Ok(Connected { source: self, control: Some(control) })
    }

    fn check_not_cancelled(&self) -> Result<(), (FerryStatus, String)> {
        if self.cancelled.load(std::sync::atomic::Ordering::Acquire) {
            return Err((FerryStatus::ErrPeer, "the source was cancelled".into()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for a destination's control lane, giving up at once when the source
    /// is cancelled.
    fn accept(&self, timeout: Duration) -> Result<Box<dyn ControlStream>, (FerryStatus, String)> {
        const SLICE: Duration = Duration::from_millis(20);
        let until = Instant::now() + timeout;
        loop {
            self.check_not_cancelled()?;
            let left = until.saturating_duration_since(Instant::now());
            let wait = left.min(SLICE);
            let accepted: Result<Box<dyn ControlStream>, _> = match &self.server {
                SourceServer::Tcp(server) => server.accept_control(wait).map(|c| Box::new(c) as _),
                SourceServer::Local(server) => server.accept_control(wait).map(|c| Box::new(c) as _),
                #[cfg(feature = "rdma")]
                SourceServer::Rdma(server) => server.accept_control(wait).map(|c| Box::new(c) as _),
            };
            match accepted {
                Ok(control) => return Ok(control),
                Err(e) if left <= SLICE => return Err(transport(e)),
                Err(_) => {}
            }
        }
    }

    /// Shuts every control lane this source holds or uses, and accepts no more.
    fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::Release);
        for lane in [lock(&self.control).take(), lock(&self.in_use).take()].into_iter().flatten() {
            let _ = lane.shutdown();
        }
    }
}

/// The control lane a call is using; ferry_source_cancel can shut it until it is dropped.
pub(crate) struct Connected<'a> {
    source: &'a FerrySource,
    control: Option<Box<dyn ControlStream>>,
}

impl Connected<'_> {
    /// The lane, no longer in use by this call (kept for a later one, where cancel still finds it).
    pub(crate) fn into_inner(mut self) -> Box<dyn ControlStream> {
        self.control.take().expect("present until dropped")
    }
}

impl std::ops::Deref for Connected<'_> {
    type Target = Box<dyn ControlStream>;
    fn deref(&self) -> &Self::Target {
        self.control.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Connected<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.control.as_mut().expect("present until dropped")
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        *lock(&self.source.in_use) = None;
    }
}

/// With the guest paused: waits up to `timeout_ms` for the destination (unless
/// ferry_source_wait_destination already did), hands over `state` and the
/// free-page bitmap (`free_words` 64-bit words, bit i = global page i is free; may be null), then
/// blocks until the destination holds every page. `stats` (may be null) receives the downtime
/// (from this call to the guest running there), total time and served-twice count. After FERRY_STATUS_OK
/// the source may release guest memory. A source hands its guest over once: a second handoff
/// (or pre-copy) is FERRY_STATUS_ERR_STATE. Thread safety: one thread per handle.
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
        // SAFETY: caller contracts on `state` and `free_bitmap`.
        let (state, free) =
            unsafe { (bytes_arg(state, state_len, "state")?, free_pages_arg(free_bitmap, free_words, source.pages)?) };
        let mut control = source.connected(timeout_ms)?;
        // Back onto a kept image (ferry_source_offer_base): first the pages changed since the
        // offer, which the destination marks absent too.
        if let Some(mut tracker) = lock(&source.base_changes).take() {
            use ferry::precopy::DirtyLog;
            let last = tracker.collect().map_err(migration)?;
            ferry::backforth::send_last_changes(control.as_mut(), &last).map_err(migration)?;
        }
        // From here the destination may resume the guest: never again from this source.
        source.begin_migration()?;
        let mut protection = lock(&source.protection);
        if let Some(p) = protection.as_mut() {
            p.handoff_state = Some(state.to_vec());
            // The guest is paused: it runs nowhere until the destination takes the lease.
            if let Some(lease) = p.lease.take() {
                lease.hand_over().map_err(migration)?;
            }
        }
        let report = ferry::run_source(control.as_mut(), paused_at, state, &free, &source.options(protection.as_ref()))
            .map_err(|e| {
                if protection.is_some() {
                    source.handoff_failed.store(true, std::sync::atomic::Ordering::Release);
                }
                migration(e)
            })?;
        drop(protection);
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

#[derive(Debug)]
pub(crate) struct CallbackDirtyLog {
    collect: unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> i32,
    user: *mut c_void,
    pages: u64,
}

impl CallbackDirtyLog {
    pub(crate) fn new(
        collect: unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> i32,
        user: *mut c_void,
        pages: u64,
    ) -> Self {
        CallbackDirtyLog { collect, user, pages }
    }
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
        source.check_no_offer()?;
        let mut control = source.connected(timeout_ms)?;
        let mut log = CallbackDirtyLog { collect, user, pages: source.pages };
        let config = ferry::precopy::PrecopyConfig {
            downtime_target: Duration::from_millis(u64::from(downtime_target_ms)),
            max_rounds: max_rounds.max(1),
            ..Default::default()
        };
        let pause_guest = || -> ferry::Result<Vec<u8>> {
            let (mut state, mut len): (*const u8, usize) = (std::ptr::null(), 0);
            // SAFETY: the VMM's callback writes the two out-parameters, which live across the call.
            let rc = unsafe { pause(&mut state, &mut len, user) };
            if rc != 0 {
                return Err(MigrationError::Vmm(format!("the pause callback returned {rc}")));
            }
            // SAFETY: the callback promises `len` readable bytes at `state` until we return.
            unsafe { state_blob(state, len) }
        };
        let page_size = source.page_size;
        source.begin_migration()?;
        let report = ferry::precopy::run_source(control.as_mut(), page_size, &mut log, pause_guest, &config)
            .map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(stats) = unsafe { stats.as_mut() } {
            *stats = precopy_stats(source.pages, &report);
        }
        Ok(())
    })
}

/// A pre-copy source's counters.
pub(crate) fn precopy_stats(pages: u64, report: &ferry::precopy::PrecopyReport) -> FerryStats {
    FerryStats {
        pages_total: pages,
        bulk_pages: report.pages_per_round.iter().sum(),
        total_us: micros(report.total),
        downtime_us: micros(report.downtime),
        ..FerryStats::default()
    }
}

/// The state blob a pause callback pointed at, copied.
///
/// # Safety
/// `state` points to `len` readable bytes, or `len` is 0.
pub(crate) unsafe fn state_blob(state: *const u8, len: usize) -> ferry::Result<Vec<u8>> {
    match (state.is_null(), len) {
        (_, 0) => Ok(Vec::new()),
        (true, _) => Err(MigrationError::Vmm("the pause callback gave a null state".into())),
        // SAFETY: caller contract.
        (false, n) => Ok(unsafe { std::slice::from_raw_parts(state, n) }.to_vec()),
    }
}

/// Cancels the source for good: every connection closes (its control lane too), a handoff or
/// pre-copy in progress fails with FERRY_STATUS_ERR_PEER (also one still waiting for a
/// destination), and later calls that would hand the guest over answer FERRY_STATUS_ERR_PEER. A
/// destination connected but not yet handed over sees its lanes fail and does not resume the
/// guest. Once the handoff's state has reached the destination, the destination may already run
/// the guest: cancel cannot take that back (ferry_source_protect and its lease decide who runs).
/// Thread safety: any thread, also during ferry_source_handoff.
///
/// # Safety
/// `source` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_cancel(source: *const FerrySource) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        source.cancel();
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
