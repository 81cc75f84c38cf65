//! The destination side: post-copy (connect, start, wait, with live counters and cancel) and the
//! one-call pre-copy receive.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use ferry::fault_handler::{DestinationMemory, FaultStats};
use ferry::prepager::PolicyKind;
use ferry::transport::local;
use ferry::transport::tcp::{self, TcpOptions};
use ferry::transport::{ControlStream, MemoryLayout, PageSource, PreSharedKey};
use ferry::{DestinationReport, EngineConfig, EngineControl, PostcopyDestination};

use crate::*;

/// A post-copy destination, from connection to completion. Every entry point takes it by shared
/// reference; what changes lives behind locks, so the documented concurrent calls are sound.
#[derive(Debug)]
pub struct FerryDestination {
    policy: PolicyKind,
    pending: Mutex<Option<(PageSource, Box<dyn ControlStream>)>>,
    session: Mutex<Option<PostcopyDestination>>,
    running: Running,
    /// Set by ferry_destination_protect.
    protection: Mutex<Option<(crate::recovery::Settings, crate::recovery::DestinationProtection)>>,
    /// Held once a protected migration completed, until the handle is freed.
    lease: Mutex<Option<Arc<ferry::arbiter::LeaseKeeper>>>,
    /// Back onto a kept image (ferry_destination_connect_with): registered at start, once the
    /// source's last changes are in.
    pub(crate) onto: Mutex<Option<ferry::backforth::OntoKept>>,
    pub(crate) pages: u64,
    /// Registered at connect, or at start when back onto a kept image. Last: lanes above may have
    /// registered its alias mappings, so they go first.
    pub(crate) memory: std::sync::OnceLock<Arc<DestinationMemory>>,
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
            // SAFETY: `resume` is the caller's function (this function's contract).
            unsafe { call_resume(resume, state, user) }
        })
        .map_err(migration)?;
        Ok(())
    })
}

/// Opens a session's lanes over TCP, the local transport ("unix:PATH") or RDMA ("rdma:...").
/// With `landings`, RDMA lanes register its alias mappings before the control lane opens.
pub(crate) fn connect_session(
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
        let policy = policy_arg(prepager)?;
        // SAFETY: forwarded caller contracts.
        let (regions, key, addr) =
            unsafe { (regions_arg(regions, region_count)?, key_arg(key, key_len)?, str_arg(addr, "addr")?) };
        // SAFETY: forwarded caller contract on the mappings.
        let guest = unsafe { adopt(regions, page_size)? };
        let layout = guest.layout().clone();
        // Register first: the source may pause its guest as soon as our control lane connects.
        let memory = DestinationMemory::register(guest).map_err(|e| migration(e.into()))?;
        let (lanes, control) = connect_session(addr, &key, &layout, Some(&memory))?;
        let handle = Box::new(FerryDestination::new(policy, lanes, control, layout.total_pages(), None));
        handle.memory.set(Arc::new(memory)).expect("a new handle");
        // SAFETY: out is non-null (checked) and writable (caller contract).
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

impl FerryDestination {
    pub(crate) fn new(
        policy: PolicyKind,
        lanes: PageSource,
        control: Box<dyn ControlStream>,
        pages: u64,
        onto: Option<ferry::backforth::OntoKept>,
    ) -> Self {
        FerryDestination {
            policy,
            pending: Mutex::new(Some((lanes, control))),
            session: Mutex::new(None),
            running: Running::default(),
            protection: Mutex::new(None),
            lease: Mutex::new(None),
            onto: Mutex::new(onto),
            pages,
            memory: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// The registered memory: from connect, or registered now over a kept image once the source
    /// sent the pages it changed since its offer (the next message on `control`).
    fn registered(&self, control: &mut dyn ControlStream) -> Result<Arc<DestinationMemory>, (FerryStatus, String)> {
        if let Some(onto) = lock(&self.onto).take() {
            let last = ferry::backforth::receive_last_changes(control, self.pages).map_err(migration)?;
            let memory = Arc::new(onto.register(&last).map_err(migration)?);
            self.memory.set(memory.clone()).map_err(|_| (FerryStatus::ErrInternal, "registered twice".to_string()))?;
        }
        self.memory.get().cloned().ok_or_else(|| (FerryStatus::ErrInternal, "no registered memory".to_string()))
    }

    pub(crate) fn protect(
        &self,
        settings: crate::recovery::Settings,
        protection: crate::recovery::DestinationProtection,
    ) -> Result<(), (FerryStatus, String)> {
        if lock(&self.pending).is_none() {
            return Err((FerryStatus::ErrState, "protect before ferry_destination_start".into()));
        }
        *lock(&self.protection) = Some((settings, protection));
        Ok(())
    }
}

/// Called once with the state blob when the handoff arrives; load it and start the vCPUs, then
/// return 0 (anything else aborts the migration). `state` is valid only during the call.
pub type FerryResumeFn = Option<unsafe extern "C" fn(state: *const u8, len: usize, user: *mut c_void) -> i32>;

/// Blocks until the source hands over (at most 10 minutes; then FERRY_STATUS_ERR_PEER), serves
/// faults from then on, calls `resume`, and returns
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
        let (lanes, mut control) = pending.ok_or_else(|| (FerryStatus::ErrState, "already started".to_string()))?;
        let memory = d.registered(control.as_mut())?;
        let mut config = EngineConfig { policy: d.policy, ..EngineConfig::default() };
        let protection = match lock(&d.protection).as_ref() {
            Some((settings, p)) => {
                config.liveness = settings.liveness;
                config.recovery_window = settings.recovery_window;
                Some(p.protection(settings, d.pages())?)
            }
            None => None,
        };
        let session = PostcopyDestination::start_with(control, memory, lanes, &config, protection, |state| {
            // SAFETY: `resume` is the caller's function (this function's contract).
            unsafe { call_resume(resume, state, user) }
        })
        .map_err(migration)?;
        d.running.set(session.engine());
        *lock(&d.session) = Some(session);
        Ok(())
    })
}

/// Once the pre-pager has nothing more to fetch, fetches what is still missing in address order.
/// Push and bubbling never run dry while a page is missing, so only a `demand` destination (which
/// otherwise only fetches what the guest touches) needs it to complete. Thread safety: any thread
/// once started, also during ferry_destination_wait.
///
/// # Safety
/// `destination` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_finish(destination: *mut FerryDestination) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        d.running.control()?.finish();
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
        *out = match d.memory.get() {
            Some(memory) => d.running.live_stats(memory),
            None => FerryStats { pages_total: d.pages, ..FerryStats::default() },
        };
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
        *lock(&d.lease) = r.lease.clone();
        // SAFETY: caller contract: null or writable.
        if let Some(out) = unsafe { stats.as_mut() } {
            *out = report_stats(&r);
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
        d.running.control()?.cancel();
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

/// What a started post-copy engine shares with calls on other threads: its live counters and its
/// control (finish, cancel), usable while another thread waits. Empty until started.
#[derive(Debug, Default)]
pub(crate) struct Running(Mutex<Option<(Arc<FaultStats>, EngineControl)>>);

impl Running {
    pub(crate) fn set(&self, engine: &ferry::PostcopyEngine) {
        *lock(&self.0) = Some((engine.stats_handle(), engine.control()));
    }

    pub(crate) fn control(&self) -> Result<EngineControl, (FerryStatus, String)> {
        lock(&self.0).as_ref().map(|(_, c)| c.clone()).ok_or_else(|| (FerryStatus::ErrState, "not started".into()))
    }

    /// The counters so far (latencies come with the final report).
    pub(crate) fn live_stats(&self, memory: &DestinationMemory) -> FerryStats {
        let get = FaultStats::get;
        let mut s = FerryStats { pages_total: memory.states().pages(), ..FerryStats::default() };
        if let Some((f, _)) = lock(&self.0).as_ref() {
            s.network_faults = get(&f.network_faults);
            s.inflight_faults = get(&f.inflight_faults);
            s.urgent_pages = get(&f.urgent_pages);
            s.bulk_pages = get(&f.bulk_pages);
            s.zero_pages = get(&f.zero_pages);
            s.skipped_free_pages = get(&f.skipped_free_pages);
            s.blocktime_us = get(&f.blocktime_ns) / 1000;
        }
        s.pages_sent_twice = memory.states().installed_twice();
        s
    }
}

/// An engine's final report as C counters.
pub(crate) fn report_stats(r: &DestinationReport) -> FerryStats {
    FerryStats {
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
    }
}

/// Hands the state blob to the VMM's resume callback.
///
/// # Safety
/// `resume` must be a valid function; it gets `user` as given.
pub(crate) unsafe fn call_resume(
    resume: unsafe extern "C" fn(*const u8, usize, *mut c_void) -> i32,
    state: &[u8],
    user: *mut c_void,
) -> Result<(), String> {
    // SAFETY: the caller vouches for `resume`; `state` is valid for the call.
    match unsafe { resume(state.as_ptr(), state.len(), user) } {
        0 => Ok(()),
        rc => Err(format!("resume callback returned {rc}")),
    }
}
