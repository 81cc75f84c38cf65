//! The post-copy engine: a guest runs on memory that is still arriving. It owns the page states,
//! the fault thread (faults served on the urgent lane, each faulting page handed on as a pivot),
//! the pre-pager thread (the chosen policy's runs on the bulk lane, installed by
//! [`BulkInstaller`]) and the counters. It runs over any [`PageSource`] (a network session, a
//! snapshot file, a kept image) and knows nothing of control lanes or handoffs: the sessions in
//! [`crate::postcopy`], [`crate::precopy`] (hybrid) and the restores are thin protocols around it.
//!
//! Life of an engine: [`PostcopyEngine::start`] before the guest runs (faults are served from
//! then on), the VMM resumes the guest, [`PostcopyEngine::start_prepaging`] once it runs (nothing
//! competes with the resume for the CPU), [`PostcopyEngine::wait`] until every page is present.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::{
    run_fault_loop, BulkInstaller, DestinationMemory, FaultQueue, FaultStats, LaneInterrupts, Recovery,
};
use ferry_prepager::{BatchSizer, Policy, PolicyKind, Push, Replay};
use ferry_transport::{BulkLane, Lane, PageIndex, PageSource};

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;

/// Longest bulk run the pre-pager asks for: bounds the buffers it keeps (depth x this).
const MAX_BULK_RUN_BYTES: u64 = 1 << 20;

/// What the user chooses for a post-copy destination.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How pages the guest has not touched yet are brought. Default: bubbling.
    pub policy: PolicyKind,
    /// Pivots the fault thread may queue for the pre-pager before the oldest are dropped.
    pub fault_queue: usize,
    /// A recorded working set to fetch first, in order, before `policy` ([`Replay`]).
    pub replay: Option<Arc<Vec<PageIndex>>>,
    /// Record the order of the guest's first faults (`DestinationReport::first_faults`).
    pub record_first_faults: bool,
    /// Heartbeats on a network session's control lane (not used by snapshot restores).
    pub liveness: crate::liveness::Liveness,
    /// How long a data lane that broke or went silent is reopened for (with backoff, under the
    /// same session) before its failure stands; faults waiting on it stay blocked meanwhile, the
    /// rest of the guest runs. Zero: no recovery. Only backends that can reconnect (tcp) recover.
    pub recovery_window: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            policy: PolicyKind::Bubbling,
            fault_queue: 4096,
            replay: None,
            record_first_faults: false,
            liveness: crate::liveness::Liveness::default(),
            recovery_window: Duration::from_secs(10),
        }
    }
}

impl EngineConfig {
    fn build_policy(&self) -> Box<dyn Policy> {
        match &self.replay {
            Some(order) => Box::new(Replay::new(order.clone(), self.policy.build())),
            None => self.policy.build(),
        }
    }
}

/// Most first faults recorded (bounds the working set a restore keeps).
const MAX_RECORDED_FAULTS: usize = 1 << 22;

/// What a post-copy destination measured.
#[derive(Clone, Debug, Default)]
pub struct DestinationReport {
    /// The policy that ran.
    pub policy: &'static str,
    /// Pages in the guest.
    pub pages_total: u64,
    /// From the engine's start (the handoff received) to every page present.
    pub total: Duration,
    /// From receiving the handoff to the guest running (the destination's share of downtime).
    pub resume_latency: Duration,
    /// Faults the guest took on absent pages.
    pub faults: u64,
    /// Faults that waited for the network (an urgent read).
    pub network_faults: u64,
    /// Faults on pages already in flight on the bulk lane: pre-paging made them shorter.
    pub inflight_faults: u64,
    /// Faults resolved without the network.
    pub local_faults: u64,
    /// Pages the urgent lane brought.
    pub urgent_pages: u64,
    /// Pages the pre-pager brought before anyone faulted on them.
    pub bulk_pages: u64,
    /// Bulk pages the policy claimed around fault pivots (bubbles).
    pub pivot_pages: u64,
    /// Bulk pages fetched by [`PostcopyEngine::finish`]'s sweep after the policy ran dry.
    pub swept_pages: u64,
    /// Bulk pages fetched from a recorded working set ([`EngineConfig::replay`]).
    pub replayed_pages: u64,
    /// Lanes reopened after they broke or went silent.
    pub recoveries: u64,
    /// Pages asked again on a reopened lane (apart from first sends).
    pub resent_pages: u64,
    /// Time spent reopening lanes.
    pub paused: Duration,
    /// The pages the guest faulted on, first faults only, in order (when recorded).
    pub first_faults: Vec<PageIndex>,
    /// Pages that arrived as zero (one bit on the wire, installed as zero pages).
    pub zero_pages: u64,
    /// Pages the source named free: never read, installed as zero.
    pub skipped_free_pages: u64,
    /// Pages the guest discarded before they arrived: never read.
    pub discarded_pages: u64,
    /// Pages installed more than once (a healthy run installs none twice).
    pub pages_installed_twice: u64,
    /// Median network-fault latency.
    pub fault_p50: Duration,
    /// 99th percentile network-fault latency.
    pub fault_p99: Duration,
    /// Longest network fault.
    pub fault_max: Duration,
    /// Counts of network-fault latencies in power-of-two microsecond buckets.
    pub fault_histogram_us: Vec<u64>,
    /// Total time faulting threads waited on network faults.
    pub blocktime: Duration,
    /// Reverse checkpoints sent by a protected session ([`crate::postcopy::Protection`]).
    pub checkpoints: crate::checkpoint::CheckpointStats,
    /// The lease a protected session took: keep it while the guest runs here (dropping the last
    /// handle gives it up).
    pub lease: Option<std::sync::Arc<crate::arbiter::LeaseKeeper>>,
}

/// Flags the engine's threads watch.
#[derive(Debug, Default)]
struct Flags {
    /// Sweep what is still missing once the policy has nothing more to fetch.
    finish: AtomicBool,
    /// Stop pre-paging (cancelled, or a thread failed).
    abort: AtomicBool,
    /// Stop serving faults.
    stop_faults: AtomicBool,
    /// The first error a thread of the engine failed with.
    failure: std::sync::Mutex<Option<String>>,
    /// Set with `failure` when the session stopped the engine because of its peer.
    peer_failure: std::sync::Mutex<Option<PeerFailure>>,
    /// Set as each thread ends, for diagnostics.
    faults_ended: AtomicBool,
    prepager_ended: AtomicBool,
    /// Break the lanes' blocked reads when the engine is cancelled.
    interrupts: Arc<LaneInterrupts>,
}

/// Why a session stopped its engine, so `wait` reports it with its own type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerFailure {
    Silent,
    Aborted,
}

impl Flags {
    /// A thread failed: stop pre-paging and keep the first reason.
    fn fail(&self, why: String) {
        self.abort.store(true, Ordering::Release);
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
    }

    /// How an engine thread ended: an error or a panic is the engine's failure at once (a VMM
    /// watching [`PostcopyEngine::failure`] must not wait for a join to learn it); a panic goes on
    /// to whoever joins the thread.
    fn settle<T>(&self, thread: &str, ended: std::thread::Result<Result<T>>) -> Result<T> {
        match ended {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.fail(format!("{thread}: {e}"));
                Err(e)
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                self.fail(format!("{thread} panicked: {what}"));
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// What the pre-pager thread counted.
#[derive(Debug, Default)]
struct Prepaged {
    pivot_pages: u64,
    swept_pages: u64,
    replayed_pages: u64,
    first_faults: Vec<PageIndex>,
}

/// The bulk side, waiting for [`PostcopyEngine::start_prepaging`].
struct Pending {
    bulk: Box<dyn BulkLane>,
    recovery: Option<Recovery>,
}

/// A running post-copy engine: the guest may run on `memory` while this brings its pages in.
pub struct PostcopyEngine {
    memory: Arc<DestinationMemory>,
    stats: Arc<FaultStats>,
    queue: Arc<FaultQueue>,
    config: EngineConfig,
    flags: Arc<Flags>,
    fault_thread: Option<JoinHandle<Result<Vec<Duration>>>>,
    prepager_thread: Option<JoinHandle<Result<Prepaged>>>,
    pending: Option<Pending>,
    started_at: Instant,
}

impl std::fmt::Debug for PostcopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyEngine").field("policy", &self.config.policy).finish_non_exhaustive()
    }
}

impl PostcopyEngine {
    /// Starts serving faults on `memory` from `source`'s urgent lane. `zero` are pages known to be
    /// zero (free pages, an image's zero pages): present from now on and never installed nor asked
    /// for (a fault on one gets a zero page). From here on a guest may run on `memory`.
    pub fn start(
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &EngineConfig,
        zero: &FreePages,
    ) -> Result<Self> {
        if zero.pages() != 0 && zero.pages() != memory.states().pages() {
            return Err(MigrationError::Protocol(format!(
                "a zero-page map of {} pages for a guest of {}",
                zero.pages(),
                memory.states().pages()
            )));
        }
        let mut source = source;
        // SAFETY: each lane is dropped inside its thread while that thread holds a clone of
        // `memory`, or in this function or in `Pending` while `self.memory` is held. Usually a
        // no-op here: a destination registers before the guest pauses (see `register_landings`),
        // and registering twice is skipped.
        unsafe { register_landings(&memory, &mut source)? };
        let PageSource { mut urgent, bulk, reconnect, .. } = source;
        let flags = Arc::new(Flags::default());
        // A cancelled engine must not wait out a lane's read deadline (seconds) in a blocked read.
        flags.interrupts.set(Lane::Urgent, urgent.interrupter());
        flags.interrupts.set(Lane::Bulk, bulk.interrupter());
        let recovery = reconnect.filter(|_| !config.recovery_window.is_zero()).map(|reconnect| Recovery {
            reconnect,
            window: config.recovery_window,
            interrupts: Some(flags.interrupts.clone()),
        });
        let stats = Arc::new(FaultStats::default());
        let zero_pages = if zero.pages() == 0 { 0 } else { memory.states().mark_present_words(zero.words()) };
        FaultStats::add(&stats.skipped_free_pages, zero_pages);
        let queue = Arc::new(FaultQueue::new(config.fault_queue));
        let fault_thread = {
            let (memory, queue, stats, flags, recovery) =
                (memory.clone(), queue.clone(), stats.clone(), flags.clone(), recovery.clone());
            std::thread::Builder::new()
                .name("ferry-faults".into())
                .spawn(move || {
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        run_fault_loop(&memory, &mut urgent, recovery.as_ref(), &queue, &stats, &flags.stop_faults)
                    }));
                    // Before `memory`: the lane may have registered its alias mappings.
                    drop(urgent);
                    flags.faults_ended.store(true, Ordering::Release);
                    flags.settle("the fault thread", result.map(|r| r.map_err(MigrationError::from)))
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the fault thread: {e}")))?
        };
        memory.begin_use();
        Ok(PostcopyEngine {
            memory,
            stats,
            queue,
            config: config.clone(),
            flags,
            fault_thread: Some(fault_thread),
            prepager_thread: None,
            pending: Some(Pending { bulk, recovery }),
            started_at: Instant::now(),
        })
    }

    /// Starts the pre-pager: the policy's runs on the bulk lane. Call it once the guest runs;
    /// [`Self::wait`] calls it if nobody did.
    pub fn start_prepaging(&mut self) -> Result<()> {
        let Some(Pending { bulk, recovery }) = self.pending.take() else { return Ok(()) };
        let (memory, queue, stats, flags) =
            (self.memory.clone(), self.queue.clone(), self.stats.clone(), self.flags.clone());
        let policy = self.config.build_policy();
        let record = self.config.record_first_faults;
        let thread = std::thread::Builder::new()
            .name("ferry-prepager".into())
            .spawn(move || {
                let installer = BulkInstaller::new(bulk, max_run_pages(&memory) as usize * memory.page_size() as usize);
                // The installer (and its lane) is dropped inside prepage, while `memory` is held here.
                let result = catch_unwind(AssertUnwindSafe(|| {
                    prepage(&memory, installer, recovery.as_ref(), policy, &queue, &stats, &flags, record)
                }));
                flags.prepager_ended.store(true, Ordering::Release);
                flags.settle("the pre-pager", result)
            })
            .map_err(|e| MigrationError::Protocol(format!("spawning the pre-pager: {e}")))?;
        self.prepager_thread = Some(thread);
        Ok(())
    }

    /// The destination's memory.
    pub fn memory(&self) -> &Arc<DestinationMemory> {
        &self.memory
    }

    /// What the fault handler and installers count, live.
    pub fn stats(&self) -> &FaultStats {
        &self.stats
    }

    /// The live counters, shareable with threads that outlive a borrow of this engine.
    pub fn stats_handle(&self) -> Arc<FaultStats> {
        self.stats.clone()
    }

    /// The policy the user chose (it runs until every page is present).
    pub fn policy(&self) -> PolicyKind {
        self.config.policy
    }

    /// Once the policy has nothing more to fetch, fetch what is still missing in address order.
    /// Push and bubbling never run dry while a page is unclaimed, so this changes nothing for
    /// them; a `demand` engine otherwise never completes on pages the guest does not touch. The
    /// pages it brings are reported as `swept_pages`.
    pub fn finish(&self) {
        self.control().finish();
    }

    /// Why the engine failed, once one of its threads did; `None` while it works. A VMM whose
    /// vCPUs may be blocked on missing pages watches this (faults are no longer served).
    pub fn failure(&self) -> Option<String> {
        self.failure_watch().failure()
    }

    /// [`Self::failure`] from any thread.
    pub fn failure_watch(&self) -> FailureWatch {
        FailureWatch { flags: self.flags.clone(), memory: self.memory.clone() }
    }

    /// A handle that finishes or cancels the engine from any thread, also while another waits.
    pub fn control(&self) -> EngineControl {
        EngineControl { flags: self.flags.clone() }
    }

    /// Waits until every page is present, releases userfaultfd, and reports. `resume_latency` is
    /// left for the session to fill in.
    pub fn wait(mut self) -> Result<DestinationReport> {
        self.start_prepaging()?;
        let prepaged = self.prepager_thread.take().map(|t| t.join().map_err(|_| MigrationError::ThreadPanicked));
        self.flags.stop_faults.store(true, Ordering::Release);
        let faults = self.fault_thread.take().map(|t| t.join().map_err(|_| MigrationError::ThreadPanicked));
        let samples = match faults {
            Some(r) => r??,
            None => Vec::new(),
        };
        let prepaged = match prepaged {
            Some(r) => r??,
            None => Prepaged::default(),
        };
        let states = self.memory.states();
        if !states.all_present() {
            let missing = format!("{} of {} pages missing", states.pages() - states.present_count(), states.pages());
            let peer = *self.flags.peer_failure.lock().unwrap_or_else(|e| e.into_inner());
            return Err(match (self.failure(), peer) {
                (Some(why), Some(PeerFailure::Silent)) => {
                    MigrationError::Transport(ferry_transport::TransportError::Silent(format!("{why} ({missing})")))
                }
                (Some(why), Some(PeerFailure::Aborted)) => MigrationError::PeerAborted(format!("{why} ({missing})")),
                (Some(why), None) => MigrationError::Protocol(format!("{why}: the engine stopped with {missing}")),
                (None, _) => MigrationError::Protocol(format!("the engine stopped with {missing}")),
            });
        }
        self.memory.release()?;
        Ok(self.report(samples, prepaged))
    }

    fn report(&self, mut samples: Vec<Duration>, prepaged: Prepaged) -> DestinationReport {
        samples.sort_unstable();
        let q =
            |f: f64| samples.get(((samples.len().max(1) - 1) as f64 * f).round() as usize).copied().unwrap_or_default();
        let s = &self.stats;
        let get = FaultStats::get;
        DestinationReport {
            policy: self.config.policy.name(),
            pages_total: self.memory.states().pages(),
            total: self.started_at.elapsed(),
            resume_latency: Duration::ZERO,
            faults: get(&s.faults),
            network_faults: get(&s.network_faults),
            inflight_faults: get(&s.inflight_faults),
            local_faults: get(&s.local_faults),
            urgent_pages: get(&s.urgent_pages),
            bulk_pages: get(&s.bulk_pages),
            pivot_pages: prepaged.pivot_pages,
            swept_pages: prepaged.swept_pages,
            replayed_pages: prepaged.replayed_pages,
            recoveries: get(&s.recoveries),
            resent_pages: get(&s.resent_pages),
            paused: Duration::from_nanos(get(&s.paused_ns)),
            first_faults: prepaged.first_faults,
            zero_pages: get(&s.zero_pages),
            skipped_free_pages: get(&s.skipped_free_pages),
            discarded_pages: get(&s.discarded_pages),
            pages_installed_twice: self.memory.states().installed_twice(),
            fault_p50: q(0.5),
            fault_p99: q(0.99),
            fault_max: samples.last().copied().unwrap_or_default(),
            fault_histogram_us: s.fault_latency.counts(),
            blocktime: Duration::from_nanos(get(&s.blocktime_ns)),
            checkpoints: Default::default(),
            lease: None,
        }
    }
}

impl Drop for PostcopyEngine {
    fn drop(&mut self) {
        // Dropped without wait(): stop both threads; the guest must already be stopped.
        self.flags.abort.store(true, Ordering::Release);
        self.flags.stop_faults.store(true, Ordering::Release);
        if let Some(t) = self.prepager_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
        // The bulk lane before `memory`, as the threads do.
        drop(self.pending.take());
    }
}

/// Tells from any thread whether a [`PostcopyEngine`] failed, and why.
#[derive(Clone, Debug)]
pub struct FailureWatch {
    flags: Arc<Flags>,
    memory: Arc<DestinationMemory>,
}

impl FailureWatch {
    /// Why the engine failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.flags.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether every page is present (a failure then costs nothing: `wait` succeeds).
    pub fn complete(&self) -> bool {
        self.memory.states().all_present()
    }

    /// The engine's state in one line, for a guest that seems stuck.
    pub fn describe(&self) -> String {
        let states = self.memory.states();
        let load = |b: &AtomicBool| b.load(Ordering::Acquire);
        format!(
            "{} of {} pages present, released {}, fault thread ended {}, pre-pager ended {}, abort {}, stop {}, failure {:?}",
            states.present_count(),
            states.pages(),
            self.memory.is_released(),
            load(&self.flags.faults_ended),
            load(&self.flags.prepager_ended),
            load(&self.flags.abort),
            load(&self.flags.stop_faults),
            self.failure()
        )
    }
}

/// Finishes or stops a running [`PostcopyEngine`] from any thread.
#[derive(Clone, Debug)]
pub struct EngineControl {
    flags: Arc<Flags>,
}

impl EngineControl {
    /// [`PostcopyEngine::finish`].
    pub fn finish(&self) {
        self.flags.finish.store(true, Ordering::Release);
    }

    /// Stops the engine because of `error` (a session's peer went silent or aborted, or the VMM
    /// gave up): it becomes the engine's failure, and `wait` returns it (a silent peer as
    /// [`ferry_transport::TransportError::Silent`], an abort as [`MigrationError::PeerAborted`])
    /// unless every page is in by then.
    pub fn fail(&self, error: &MigrationError) {
        let (peer, why) = match error {
            MigrationError::Transport(ferry_transport::TransportError::Silent(why)) => {
                (Some(PeerFailure::Silent), why.clone())
            }
            MigrationError::PeerAborted(why) => (Some(PeerFailure::Aborted), why.clone()),
            other => (None, other.to_string()),
        };
        let mut failure = self.flags.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(why);
            *self.flags.peer_failure.lock().unwrap_or_else(|e| e.into_inner()) = peer;
        }
        drop(failure);
        self.cancel();
    }

    /// Stops the fault thread and the pre-pager: `wait` then fails with the pages still missing.
    /// Guest threads faulting on missing pages stay blocked: stop the vCPUs.
    pub fn cancel(&self) {
        self.flags.abort.store(true, Ordering::Release);
        self.flags.stop_faults.store(true, Ordering::Release);
        self.flags.interrupts.fire();
    }
}

/// After the bulk lane failed with `error`: reopens it and asks again for what was in flight
/// when [`Recovery`] can cure it, else the error stands.
fn recover_bulk(
    memory: &DestinationMemory,
    installer: &mut BulkInstaller,
    recovery: Option<&Recovery>,
    error: ferry_fault_handler::FaultError,
    stats: &FaultStats,
    flags: &Flags,
) -> Result<()> {
    let Some(recovery) = recovery.filter(|_| Recovery::cures(&error)) else { return Err(error.into()) };
    let paused = Instant::now();
    let mut error = error;
    loop {
        let lane = recovery.reopen(&flags.abort, &error, |r| r.bulk())?;
        recovery.interrupts_on(Lane::Bulk, lane.interrupter());
        // The new lane may break while the reads are asked again: that is one more recovery.
        match installer.replace_lane(memory, lane, stats) {
            Ok(()) => {
                FaultStats::add(&stats.recoveries, 1);
                FaultStats::add(&stats.paused_ns, paused.elapsed().as_nanos() as u64);
                return Ok(());
            }
            Err(e) if Recovery::cures(&e) && paused.elapsed() < recovery.window => error = e,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Longest bulk run in pages: [`MAX_BULK_RUN_BYTES`], or one page where pages are larger.
fn max_run_pages(memory: &DestinationMemory) -> u32 {
    (MAX_BULK_RUN_BYTES / memory.page_size()).max(1) as u32
}

/// The pre-pager thread: the policy's runs (and, once finishing and the policy is dry, an
/// address-order sweep) keeping the bulk lane full, until every page is present. With `record`,
/// it notes each page's first fault, in order.
#[allow(clippy::too_many_arguments)]
fn prepage(
    memory: &DestinationMemory,
    mut installer: BulkInstaller,
    recovery: Option<&Recovery>,
    mut policy: Box<dyn Policy>,
    queue: &FaultQueue,
    stats: &FaultStats,
    flags: &Flags,
    record: bool,
) -> Result<Prepaged> {
    let states = memory.states();
    let page_size = memory.page_size();
    let mut sizer = BatchSizer::new(page_size, max_run_pages(memory));
    let mut sweep: Option<Push> = None;
    let mut swept_pages = 0;
    let mut first_faults = Vec::new();
    let mut faulted = if record { vec![0u64; states.pages().div_ceil(64) as usize] } else { Vec::new() };
    while !states.all_present() && !flags.abort.load(Ordering::Acquire) {
        while let Some(page) = queue.pop() {
            policy.on_fault(page);
            if let Some(word) = faulted.get_mut((page.0 / 64) as usize) {
                if *word & (1 << (page.0 % 64)) == 0 && first_faults.len() < MAX_RECORDED_FAULTS {
                    *word |= 1 << (page.0 % 64);
                    first_faults.push(page);
                }
            }
        }
        while installer.has_room() {
            let want = sizer.pages();
            let claim = match policy.next(states, want) {
                Some(claim) => claim,
                None if flags.finish.load(Ordering::Acquire) => {
                    let Some(claim) = sweep.get_or_insert_with(Push::default).next(states, want) else { break };
                    swept_pages += u64::from(claim.count());
                    claim
                }
                None => break,
            };
            if let Err(e) = installer.submit(memory, claim) {
                recover_bulk(memory, &mut installer, recovery, e, stats, flags)?;
            }
        }
        if installer.in_flight() == 0 {
            // Nothing to fetch until the guest faults again (demand) or the engine finishes. Not
            // sooner: waking every 200 us instead kept the fault thread's own wakeups in the slow
            // mode on this machine (a demand fault's p50 as the guest sees it: 43-66 us against
            // 9 us; `ferry-bench restore`), and pivots wait in their queue meanwhile.
            std::thread::park_timeout(Duration::from_millis(2));
            continue;
        }
        match installer.complete(memory, stats) {
            Ok(Some(done)) => sizer.record(done.bytes, done.lane_time),
            Ok(None) => {}
            Err(e) => recover_bulk(memory, &mut installer, recovery, e, stats, flags)?,
        }
    }
    if states.all_present() {
        // At once: a guest touching a zero page left absent must not wait for the fault thread.
        memory.release()?;
    }
    Ok(Prepaged {
        pivot_pages: policy.pivot_pages(),
        swept_pages,
        replayed_pages: policy.replayed_pages(),
        first_faults,
    })
}

/// Lets both lanes of `source` read straight into `memory`'s alias mappings (continue mode), for
/// lanes that must register memory with a device (RDMA). Registration pins the whole mapping, so
/// a destination does it before the source pauses the guest.
///
/// # Safety
/// `memory` must outlive both lanes of `source`.
pub unsafe fn register_landings(memory: &DestinationMemory, source: &mut PageSource) -> ferry_transport::Result<()> {
    for (ptr, len) in memory.landing_ranges() {
        // SAFETY: the alias mappings live as long as `memory`, which the caller keeps alive
        // for as long as the lanes.
        unsafe {
            source.urgent.register_landing(ptr, len)?;
            source.bulk.register_landing(ptr, len)?;
        }
    }
    Ok(())
}
