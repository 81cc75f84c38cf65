//! The fault thread: reads userfaultfd events, serves each fault at once on the urgent lane, and
//! hands every faulting page to the pre-pager as a pivot through a bounded lock-free queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use ferry_transport::{PageIndex, UrgentLane};

use crate::error::{FaultError, Result};
use crate::install::DestinationMemory;
use crate::recovery::Recovery;
use crate::stats::FaultStats;
use crate::uffd::Event;

/// Pivots waiting for the pre-pager. When full the oldest pivot is dropped: the newest faults say
/// most about where the guest is working now.
#[derive(Debug)]
pub struct FaultQueue(ArrayQueue<PageIndex>);

impl FaultQueue {
    /// A queue of `capacity` faults (at least one).
    pub fn new(capacity: usize) -> Self {
        FaultQueue(ArrayQueue::new(capacity.max(1)))
    }

    /// Adds a faulting page, dropping the oldest when full.
    pub fn push(&self, page: PageIndex) {
        self.0.force_push(page);
    }

    /// The oldest fault queued.
    pub fn pop(&self) -> Option<PageIndex> {
        self.0.pop()
    }

    /// Faults queued.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no fault is queued.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Most fault latency samples kept for exact percentiles (the histogram counts all of them).
const MAX_SAMPLES: usize = 1 << 22;

/// How long an install may keep meeting a changing mapping before it is an error.
pub const BUSY_DEADLINE: Duration = Duration::from_secs(10);

/// Reads events (up to `timeout_ms`) into `pending`. Removes take effect as they are read (the
/// memory marks their pages discarded), so the faults behind them in `pending` see it.
fn read_into(
    memory: &DestinationMemory,
    buf: &mut [Event],
    pending: &mut VecDeque<Event>,
    stats: &FaultStats,
    timeout_ms: i32,
) -> Result<()> {
    let mut discarded = 0;
    let n = memory.read_events(buf, timeout_ms, &mut discarded)?;
    FaultStats::add(&stats.discarded_pages, discarded);
    pending.extend(buf[..n].iter().filter(|e| !matches!(e, Event::Remove { .. })));
    Ok(())
}

/// Serves faults until `stop` is set or the memory is released, releasing it itself once every
/// page is present (faults on zero pages left absent keep coming until then). Returns the service
/// time of each network fault, for percentiles.
pub fn run_fault_loop(
    memory: &DestinationMemory,
    urgent: &mut Box<dyn UrgentLane>,
    recovery: Option<&Recovery>,
    queue: &FaultQueue,
    stats: &FaultStats,
    stop: &AtomicBool,
) -> Result<Vec<Duration>> {
    let mut events = [Event::Other(0); 64];
    let mut staging = urgent.buffer(memory.page_size() as usize)?;
    let mut samples = Vec::new();
    let states = memory.states();
    let mut pending: VecDeque<Event> = VecDeque::new();
    let mut release_error = None;
    // Until the memory is released, not merely until every page is present: zero pages are
    // present without an install and fault until then.
    while !stop.load(Ordering::Acquire) && !memory.is_released() {
        if states.all_present() && pending.is_empty() {
            if let Err(e) = memory.release() {
                // Keep serving: the engine's wait reports it, and a guest must not hang meanwhile.
                release_error.get_or_insert(e);
            }
            if memory.is_released() {
                break;
            }
        }
        if pending.is_empty() {
            read_into(memory, &mut events, &mut pending, stats, 20)?;
        }
        while let Some(event) = pending.pop_front() {
            match event {
                Event::PageFault { address, minor, .. } => {
                    let t0 = Instant::now();
                    FaultStats::add(&stats.faults, 1);
                    let page = memory.page_of(address).ok_or(FaultError::OutsideGuest(address))?;
                    queue.push(page);
                    if let Some(claim) = states.claim(page) {
                        let run = states.to_run(&claim);
                        let deadline = Instant::now() + BUSY_DEADLINE;
                        loop {
                            let installed = match memory.fill_in_place(&claim, stats, |dst| urgent.read(run, dst)) {
                                Ok(true) => Ok(()),
                                Ok(false) => urgent
                                    .read(run, &mut staging)
                                    .map_err(FaultError::from)
                                    .and_then(|zero| memory.install(&claim, &staging, &zero, stats)),
                                Err(e) => Err(e),
                            };
                            match installed {
                                // A remove waiting in our own queue keeps the kernel answering
                                // EAGAIN: take it in (the install then leaves its pages zero).
                                Err(FaultError::Busy { .. }) if Instant::now() < deadline => {
                                    read_into(memory, &mut events, &mut pending, stats, 1)?;
                                }
                                // The claim stays ours: reopen the lane and ask again.
                                Err(e) if recovery.is_some() && Recovery::cures(&e) => {
                                    let recovery = recovery.expect("checked");
                                    let paused = Instant::now();
                                    *urgent = recovery.reopen(stop, &e, |r| r.urgent())?;
                                    recovery.interrupts_on(ferry_transport::Lane::Urgent, urgent.interrupter());
                                    // Cancelled while reopening: the new lane's read would block.
                                    if stop.load(Ordering::Acquire) {
                                        return Err(e);
                                    }
                                    staging = urgent.buffer(memory.page_size() as usize)?;
                                    FaultStats::add(&stats.recoveries, 1);
                                    FaultStats::add(&stats.resent_pages, u64::from(claim.count()));
                                    FaultStats::add(&stats.paused_ns, paused.elapsed().as_nanos() as u64);
                                }
                                other => break other?,
                            }
                        }
                        let took = t0.elapsed();
                        FaultStats::add(&stats.network_faults, 1);
                        FaultStats::add(&stats.urgent_pages, 1);
                        FaultStats::add(&stats.blocktime_ns, took.as_nanos() as u64);
                        stats.fault_latency.record(took);
                        if samples.len() < MAX_SAMPLES {
                            samples.push(took);
                        }
                    } else if states.is_present(page) {
                        memory.resolve_present(page, minor)?;
                        FaultStats::add(&stats.local_faults, 1);
                    } else {
                        // In flight on the bulk lane: its install wakes this fault.
                        FaultStats::add(&stats.inflight_faults, 1);
                    }
                }
                Event::Remove { .. } | Event::Other(_) => {}
            }
        }
    }
    match release_error {
        Some(e) if !memory.is_released() => Err(e),
        _ => Ok(samples),
    }
}
