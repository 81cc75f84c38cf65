//! Post-copy migration (Hines & Gopalan, VEE'09). The source pauses the guest and hands over its
//! vCPU/device state and free-page bitmap; the destination resumes the guest at once and brings
//! memory over behind it: faults are served on the urgent lane by the fault thread, and the
//! pre-pager fills the rest on the bulk lane, pivoting around faults. Free pages never cross.
//! Every page crosses at most once: the page-state bitmaps guarantee it at the destination and the
//! page server counts it at the source.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::{run_fault_loop, Claim, DestinationMemory, FaultQueue, FaultStats};
use ferry_prepager::{BatchSizer, Policy, PolicyKind, Push};
use ferry_transport::{BulkLane, BulkRead, BulkTarget, ControlStream, PageBuf, PageSource};

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff::{self, DoneCounters};

/// Longest bulk run the pre-pager asks for: bounds the buffers it keeps (depth x this).
const MAX_BULK_RUN_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct DestinationConfig {
    pub policy: PolicyKind,
    /// Pivots the fault thread may queue for the pre-pager before the oldest are dropped.
    pub fault_queue: usize,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig { policy: PolicyKind::Bubbling, fault_queue: 4096 }
    }
}

/// What the destination measured.
#[derive(Clone, Debug, Default)]
pub struct DestinationReport {
    pub policy: &'static str,
    pub pages_total: u64,
    /// From receiving the handoff to every page present.
    pub total: Duration,
    /// From receiving the handoff to the guest running (the destination's share of downtime).
    pub resume_latency: Duration,
    pub faults: u64,
    pub network_faults: u64,
    /// Faults on pages already in flight on the bulk lane: pre-paging made them shorter.
    pub inflight_faults: u64,
    /// Faults resolved without the network.
    pub local_faults: u64,
    pub urgent_pages: u64,
    /// Pages the pre-pager brought before anyone faulted on them.
    pub bulk_pages: u64,
    pub zero_pages: u64,
    pub skipped_free_pages: u64,
    pub discarded_pages: u64,
    pub pages_installed_twice: u64,
    pub fault_p50: Duration,
    pub fault_p99: Duration,
    pub fault_max: Duration,
    /// Counts of network-fault latencies in power-of-two microsecond buckets.
    pub fault_histogram_us: Vec<u64>,
    /// Total time faulting threads waited on network faults.
    pub blocktime: Duration,
}

/// A running post-copy destination. The guest runs while this brings its memory in.
pub struct PostcopyDestination {
    memory: Arc<DestinationMemory>,
    stats: Arc<FaultStats>,
    policy: &'static str,
    control: Box<dyn ControlStream>,
    finish: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
    stop_faults: Arc<AtomicBool>,
    fault_thread: Option<JoinHandle<ferry_fault_handler::Result<Vec<Duration>>>>,
    prepager_thread: Option<JoinHandle<Result<()>>>,
    handoff_at: Instant,
    resume_latency: Duration,
}

impl std::fmt::Debug for PostcopyDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyDestination").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl PostcopyDestination {
    /// Waits for the source's handoff on `control`, starts serving faults, calls `resume` with
    /// the state blob (the VMM loads it and starts its vCPUs), tells the source, and starts the
    /// pre-pager. Returns while memory is still arriving.
    pub fn start(
        mut control: Box<dyn ControlStream>,
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &DestinationConfig,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        let states = memory.states();
        let (state, free) = handoff::receive_handoff(control.as_mut(), states.pages())?;
        let handoff_at = Instant::now();
        let free_claims = claim_free_pages(&memory, &free);
        let stats = Arc::new(FaultStats::default());
        let queue = Arc::new(FaultQueue::new(config.fault_queue));
        let (finish, abort, stop_faults) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let mut source = source;
        // SAFETY: each lane is dropped inside its thread while that thread holds a clone of
        // `memory`, or below in this function on an error, while `memory` is held.
        // Usually a no-op here: a destination registers before the guest pauses (see
        // `register_landings`), and registering twice is skipped.
        unsafe { register_landings(&memory, &mut source)? };
        let PageSource { mut urgent, bulk, .. } = source;
        let fault_thread = {
            let (memory, queue, stats, stop, abort) =
                (memory.clone(), queue.clone(), stats.clone(), stop_faults.clone(), abort.clone());
            std::thread::Builder::new()
                .name("ferry-faults".into())
                .spawn(move || {
                    let result = run_fault_loop(&memory, urgent.as_mut(), &queue, &stats, &stop);
                    // Before `memory`: the lane may have registered its alias mappings.
                    drop(urgent);
                    if result.is_err() {
                        abort.store(true, Ordering::Release);
                    }
                    result
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the fault thread: {e}")))?
        };
        memory.begin_use();
        if let Err(why) = resume(&state) {
            handoff::send_abort(control.as_mut(), &why);
            stop_faults.store(true, Ordering::Release);
            let _ = fault_thread.join();
            return Err(MigrationError::Resume(why));
        }
        let resume_latency = handoff_at.elapsed();
        handoff::send_resumed(control.as_mut())?;
        let prepager_thread = {
            let (memory, queue, stats, finish, abort) =
                (memory.clone(), queue.clone(), stats.clone(), finish.clone(), abort.clone());
            let policy = config.policy.build();
            std::thread::Builder::new()
                .name("ferry-prepager".into())
                .spawn(move || {
                    // run_prepager drops the lane before returning, while `memory` is held here.
                    let result = run_prepager(&memory, bulk, policy, free_claims, &queue, &stats, &finish, &abort);
                    if result.is_err() {
                        abort.store(true, Ordering::Release);
                    }
                    result
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the pre-pager: {e}")))?
        };
        Ok(PostcopyDestination {
            memory,
            stats,
            policy: config.policy.name(),
            control,
            finish,
            abort,
            stop_faults,
            fault_thread: Some(fault_thread),
            prepager_thread: Some(prepager_thread),
            handoff_at,
            resume_latency,
        })
    }

    pub fn memory(&self) -> &Arc<DestinationMemory> {
        &self.memory
    }

    pub fn stats(&self) -> &FaultStats {
        &self.stats
    }

    /// The live counters, shareable with threads that outlive a borrow of this session.
    pub fn stats_handle(&self) -> Arc<FaultStats> {
        self.stats.clone()
    }

    /// A handle that stops the session from any thread: the fault thread and the pre-pager stop,
    /// `wait` then reports the pages still missing and tells the source. Guest threads faulting on
    /// missing pages stay blocked: stop the vCPUs.
    pub fn canceller(&self) -> Canceller {
        Canceller { abort: self.abort.clone(), stop_faults: self.stop_faults.clone() }
    }

    /// Fetches everything still missing in address order, whatever the policy (a `demand`
    /// session otherwise never completes on pages the guest does not touch).
    pub fn finish(&self) {
        self.finish.store(true, Ordering::Release);
    }

    /// Waits until every page is present, releases userfaultfd, tells the source, and reports.
    pub fn wait(mut self) -> Result<DestinationReport> {
        let prepaged = self.prepager_thread.take().map(|t| t.join().map_err(|_| MigrationError::ThreadPanicked));
        self.stop_faults.store(true, Ordering::Release);
        let faults = self.fault_thread.take().map(|t| t.join().map_err(|_| MigrationError::ThreadPanicked));
        let outcome = (|| {
            let samples = match faults {
                Some(r) => r??,
                None => Vec::new(),
            };
            if let Some(r) = prepaged {
                r??;
            }
            if !self.memory.states().all_present() {
                return Err(MigrationError::Protocol("the session ended with pages missing".into()));
            }
            self.memory.release()?;
            Ok(samples)
        })();
        let samples = match outcome {
            Ok(s) => s,
            Err(e) => {
                handoff::send_abort(self.control.as_mut(), &e.to_string());
                return Err(e);
            }
        };
        let report = self.report(samples);
        handoff::send_done(
            self.control.as_mut(),
            &DoneCounters {
                pages_present: self.memory.states().present_count(),
                network_faults: report.network_faults,
                urgent_pages: report.urgent_pages,
                bulk_pages: report.bulk_pages,
                skipped_free_pages: report.skipped_free_pages,
            },
        )?;
        Ok(report)
    }

    fn report(&self, mut samples: Vec<Duration>) -> DestinationReport {
        samples.sort_unstable();
        let q =
            |f: f64| samples.get(((samples.len().max(1) - 1) as f64 * f).round() as usize).copied().unwrap_or_default();
        let s = &self.stats;
        let get = FaultStats::get;
        DestinationReport {
            policy: self.policy,
            pages_total: self.memory.states().pages(),
            total: self.handoff_at.elapsed(),
            resume_latency: self.resume_latency,
            faults: get(&s.faults),
            network_faults: get(&s.network_faults),
            inflight_faults: get(&s.inflight_faults),
            local_faults: get(&s.local_faults),
            urgent_pages: get(&s.urgent_pages),
            bulk_pages: get(&s.bulk_pages),
            zero_pages: get(&s.zero_pages),
            skipped_free_pages: get(&s.skipped_free_pages),
            discarded_pages: get(&s.discarded_pages),
            pages_installed_twice: self.memory.states().installed_twice(),
            fault_p50: q(0.5),
            fault_p99: q(0.99),
            fault_max: samples.last().copied().unwrap_or_default(),
            fault_histogram_us: s.fault_latency.counts(),
            blocktime: Duration::from_nanos(get(&s.blocktime_ns)),
        }
    }
}

impl Drop for PostcopyDestination {
    fn drop(&mut self) {
        // Dropped without wait(): stop both threads; the guest must already be stopped.
        self.abort.store(true, Ordering::Release);
        self.stop_faults.store(true, Ordering::Release);
        if let Some(t) = self.prepager_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops a running [`PostcopyDestination`] from any thread.
#[derive(Clone, Debug)]
pub struct Canceller {
    abort: Arc<AtomicBool>,
    stop_faults: Arc<AtomicBool>,
}

impl Canceller {
    pub fn cancel(&self) {
        self.abort.store(true, Ordering::Release);
        self.stop_faults.store(true, Ordering::Release);
    }
}

/// Claims every free page before the guest resumes, so neither a fault nor the pre-pager ever asks
/// the source for one; the pre-pager installs them as zero pages first.
fn claim_free_pages(memory: &DestinationMemory, free: &FreePages) -> Vec<Claim> {
    let states = memory.states();
    let mut claims = Vec::new();
    for (first, count) in free.runs() {
        let mut p = first;
        while p < first + count {
            let want = (first + count - p).min(u64::from(u32::MAX)) as u32;
            match states.claim_up(p, want) {
                Some(c) => {
                    p = c.first() + u64::from(c.count());
                    claims.push(c);
                }
                None => p += 1,
            }
        }
    }
    claims
}

#[allow(clippy::too_many_arguments)]
fn run_prepager(
    memory: &DestinationMemory,
    mut bulk: Box<dyn BulkLane>,
    mut policy: Box<dyn Policy>,
    free: Vec<Claim>,
    queue: &FaultQueue,
    stats: &FaultStats,
    finish: &AtomicBool,
    abort: &AtomicBool,
) -> Result<()> {
    for claim in &free {
        memory.install_zero(claim)?;
        FaultStats::add(&stats.skipped_free_pages, u64::from(claim.count()));
    }
    let states = memory.states();
    let page_size = memory.page_size();
    let max_pages = (MAX_BULK_RUN_BYTES / page_size).max(1) as u32;
    let mut sizer = BatchSizer::new(page_size, max_pages);
    let mut in_flight: HashMap<u64, Claim> = HashMap::new();
    let mut pool: Vec<PageBuf> = Vec::new();
    let mut next_tag = 0u64;
    let mut finishing = false;
    let mut last_completion = Instant::now();
    while !states.all_present() {
        if abort.load(Ordering::Acquire) {
            return Ok(());
        }
        while let Some(page) = queue.pop() {
            policy.on_fault(page);
        }
        if !finishing && finish.load(Ordering::Acquire) {
            finishing = true;
            policy = Box::new(Push::default());
        }
        while bulk.in_flight() < bulk.depth() {
            let Some(claim) = policy.next(states, sizer.pages()) else { break };
            let bytes = claim.count() as usize * page_size as usize;
            // Straight into the guest's page cache where the backing allows it, else a buffer.
            let buf = match memory.mapped_target(&claim) {
                Some(target) => target,
                None => match pool.iter().position(|b| b.len() >= bytes) {
                    Some(i) => pool.swap_remove(i).into(),
                    None => bulk.buffer(bytes.next_power_of_two().min(max_pages as usize * page_size as usize))?.into(),
                },
            };
            let run = states.to_run(&claim);
            if bulk.in_flight() == 0 {
                last_completion = Instant::now();
            }
            bulk.submit(BulkRead { run, buf, tag: next_tag })?;
            in_flight.insert(next_tag, claim);
            next_tag += 1;
        }
        if bulk.in_flight() == 0 {
            // Nothing to fetch until the guest faults again (demand) or the session finishes.
            std::thread::park_timeout(Duration::from_micros(200));
            continue;
        }
        let done = bulk.complete()?.ok_or_else(|| MigrationError::Protocol("bulk lane lost a read".into()))?;
        let claim = in_flight
            .remove(&done.tag)
            .ok_or_else(|| MigrationError::Protocol("bulk completion for no read".into()))?;
        let bytes = u64::from(claim.count()) * page_size;
        let now = Instant::now();
        sizer.record(bytes, now - last_completion);
        last_completion = now;
        match done.buf {
            BulkTarget::Mapped(_) => memory.map_filled(&claim, &done.zero, stats)?,
            BulkTarget::Buffer(buf) => {
                memory.install(&claim, &buf, &done.zero, stats)?;
                pool.push(buf);
            }
        }
        FaultStats::add(&stats.bulk_pages, u64::from(claim.count()));
    }
    Ok(())
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

/// What the source measured.
#[derive(Clone, Debug, Default)]
pub struct SourceReport {
    /// From the pause to the destination's guest running.
    pub downtime: Duration,
    /// From the pause to every page present at the destination.
    pub total: Duration,
    pub done: DoneCounters,
}

/// Source side, called with the guest paused at `paused_at`: hands over `state` and the free
/// pages, waits for the destination to resume the guest and then to hold every page. The page
/// server must keep serving meanwhile; after this returns the source may release guest memory.
pub fn run_source(
    control: &mut dyn ControlStream,
    paused_at: Instant,
    state: &[u8],
    free: &FreePages,
) -> Result<SourceReport> {
    handoff::send_handoff(control, state, free)?;
    handoff::expect_resumed(control)?;
    let downtime = paused_at.elapsed();
    let done = handoff::expect_done(control)?;
    Ok(SourceReport { downtime, total: paused_at.elapsed(), done })
}
