//! Post-copy migration (Hines & Gopalan, VEE'09). The source pauses the guest and hands over its
//! vCPU/device state and free-page bitmap; the destination resumes the guest at once and brings
//! memory over behind it: faults are served on the urgent lane by the fault thread, and the
//! pre-pager fills the rest on the bulk lane, pivoting around faults. Free pages never cross.
//! Every page crosses at most once: the page-state bitmaps guarantee it at the destination and the
//! page server counts it at the source (pages asked again after a lane broke are counted apart).
//! Both sides watch each other with heartbeats ([`crate::liveness`]); a control lane that breaks
//! is reopened under the same session, as the engine reopens its data lanes.
//!
//! A destination started with [`Protection`] keeps its source able to restart the guest (after
//! PostCopyFT): it takes the lease before the guest resumes, sends reverse checkpoints of what
//! the guest writes ([`crate::checkpoint`]; the source applies them to the image it keeps,
//! [`SourceOptions::kept`]), lets output leave only once its epoch is acknowledged, and halts its
//! guest and gives the lease up when the session fails (or halts when it loses the lease). A
//! source whose destination is gone restarts the guest itself once it holds the lease:
//! ```text
//! run_source(...) fails  ->  LeaseKeeper::acquire(terms, wait, ..)  ->  kept.restart_state(handoff)
//!                        ->  load that state blob, resume the vCPUs (memory already holds it)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::{DestinationMemory, FaultStats, Recovery};
use ferry_transport::{ControlStream, PageSource};

use crate::arbiter::{LeaseKeeper, LeaseTerms};
use crate::checkpoint::{self, CheckpointCapture, CheckpointConfig, CheckpointLane, Checkpointer, KeptImage};
use crate::engine::{DestinationReport, EngineConfig, EngineControl, FailureWatch, PostcopyEngine};
use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff::{self, DoneCounters};
use crate::liveness::{LiveControl, LiveWriter, Liveness};

/// How a post-copy destination keeps its source able to restart the guest (see the module doc).
pub struct Protection {
    /// Pauses the guest for consistent captures; told when output may leave.
    pub capture: Box<dyn CheckpointCapture>,
    /// How often the destination checkpoints, and how long an epoch waits for its ack.
    pub checkpoints: CheckpointConfig,
    /// Taken before the guest resumes here, kept while it runs; `None`: no fencing (a partitioned
    /// destination may then run on while the source restarts).
    pub lease: Option<LeaseTerms>,
    /// Stops the guest for good, without waiting on it (a vCPU may be blocked on a page that will
    /// never come) and drops the output it still holds. Called once, when the session fails or
    /// the lease is lost.
    pub halt: HaltFn,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("checkpoints", &self.checkpoints)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

type HaltFn = Box<dyn FnOnce() + Send>;

/// A halt callback that runs at most once, from whichever path gets there first.
#[derive(Clone)]
struct Halt(Arc<std::sync::Mutex<Option<HaltFn>>>);

impl Halt {
    fn run(&self) {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}

impl std::fmt::Debug for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Halt")
    }
}

/// The control lane as the checkpointer writes to it: whichever lane is current (the source
/// watch swaps in a reopened one), numbered by how many were set.
#[derive(Debug, Default)]
struct CurrentLane(std::sync::Mutex<(Option<LiveWriter>, u64)>);

impl CurrentLane {
    fn set(&self, writer: LiveWriter) {
        let mut lane = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *lane = (Some(writer), lane.1 + 1);
    }
}

impl CheckpointLane for CurrentLane {
    fn send(&self, on: u64, msg: &[u8]) -> Result<()> {
        let writer = match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            (Some(writer), current) if *current == on => writer.clone(),
            // Gone with the lane the epoch began on: as lost as the messages that went with it.
            _ => return Err(MigrationError::Transport(ferry_transport::TransportError::PeerClosed)),
        };
        writer.write(msg)
    }

    fn current(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// The protecting parts of a running destination.
#[derive(Debug)]
struct Guard {
    checkpointer: Option<Checkpointer>,
    failsafe: Arc<Failsafe>,
}

/// Stops the guest here for good, then gives the lease up, so the source may restart it: run
/// once the session failed with pages still missing, by whichever of the source watch and `wait`
/// sees it first.
#[derive(Debug)]
struct Failsafe {
    halt: Halt,
    lease: std::sync::Mutex<Option<LeaseKeeper>>,
    tripped: AtomicBool,
}

impl Failsafe {
    fn trip(&self) {
        self.tripped.store(true, Ordering::Release);
        self.halt.run();
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(lease) = lease {
            let _ = lease.hand_over();
        }
    }

    /// Trips when the engine failed short of every page.
    fn trip_if_failed(&self, engine: &FailureWatch) {
        if !self.tripped.load(Ordering::Acquire) && engine.failure().is_some() && !engine.complete() {
            self.trip();
        }
    }
}

/// A running post-copy destination: the engine, and the control lane to the source, watched.
#[derive(Debug)]
pub struct PostcopyDestination {
    engine: PostcopyEngine,
    watch: SourceWatch,
    resume_latency: Duration,
    rejoin: Option<Rejoin>,
    guard: Option<Guard>,
}

impl PostcopyDestination {
    /// Waits for the source's handoff on `control`, starts the engine (faults are served from
    /// then on; free pages never cross), calls `resume` with the state blob (the VMM loads it and
    /// starts its vCPUs), tells the source, and starts pre-paging. Returns while memory is still
    /// arriving. The destination sends heartbeats from here on, the source from its handoff
    /// ([`EngineConfig::liveness`]); a source silent past the timeout and the recovery window, or
    /// one that aborts, stops the engine with that error. The wait for the handoff to begin is
    /// `liveness.handoff_wait` (the source decides when to pause its guest).
    pub fn start(
        control: Box<dyn ControlStream>,
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &EngineConfig,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        Self::start_with(control, memory, source, config, None, resume)
    }

    /// [`PostcopyDestination::start`], protected: the lease is taken before `resume`, reverse
    /// checkpoints flow from then on (see the module doc).
    pub fn start_with(
        control: Box<dyn ControlStream>,
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &EngineConfig,
        protection: Option<Protection>,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        let mut live = LiveControl::start(control.as_ref(), config.liveness)?;
        drop(control);
        if !live.wait_readable(config.liveness.handoff_wait).map_err(ferry_transport::TransportError::Io)? {
            return Err(ferry_transport::TransportError::Silent(format!(
                "the source began no handoff within {:?}",
                config.liveness.handoff_wait
            ))
            .into());
        }
        let (state, free) = handoff::receive_handoff(&mut live, memory.states().pages())?;
        let handoff_at = Instant::now();
        let rejoin = Rejoin::of(&source, config);
        let mut engine = PostcopyEngine::start(memory.clone(), source, config, &free)?;
        let halt = protection.as_ref().map(|_| Halt(Arc::new(std::sync::Mutex::new(None))));
        let lease = match protection.as_ref().and_then(|p| p.lease.as_ref()) {
            Some(terms) => {
                let (control, halt) = (engine.control(), halt.clone().expect("protected"));
                // The source gave the lease up before its handoff; one time to live covers a
                // release that has not reached the arbiter yet.
                let wait = terms.ttl + terms.clock_skew * 2;
                match LeaseKeeper::acquire(terms, wait, move || {
                    control.fail(&MigrationError::LeaseLost);
                    halt.run();
                }) {
                    Ok(keeper) => Some(keeper),
                    Err(e) => {
                        handoff::send_abort(&mut live, &e.to_string());
                        engine.control().cancel();
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        if let Err(why) = resume(&state) {
            handoff::send_abort(&mut live, &why);
            return Err(MigrationError::Resume(why));
        }
        let resume_latency = handoff_at.elapsed();
        tracing::info!(?resume_latency, "post-copy: the guest runs here; memory follows");
        handoff::send_resumed(&mut live)?;
        engine.start_prepaging()?;
        let lane = Arc::new(CurrentLane::default());
        lane.set(live.writer());
        let guard = match protection {
            Some(p) => {
                let halt = halt.expect("protected");
                *halt.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.halt);
                let checkpointer = Checkpointer::start(memory, p.capture, lane.clone(), p.checkpoints)?;
                let failsafe =
                    Arc::new(Failsafe { halt, lease: std::sync::Mutex::new(lease), tripped: AtomicBool::new(false) });
                Some(Guard { checkpointer: Some(checkpointer), failsafe })
            }
            None => None,
        };
        let protected = guard.as_ref().map(|g| Protected {
            acks: g.checkpointer.as_ref().expect("just started").handle(),
            failsafe: g.failsafe.clone(),
            engine: engine.failure_watch(),
        });
        let watch = SourceWatch::start(live, engine.control(), rejoin.clone(), lane, protected)?;
        Ok(PostcopyDestination { engine, watch, resume_latency, rejoin, guard })
    }

    /// The destination's memory.
    pub fn memory(&self) -> &Arc<DestinationMemory> {
        self.engine.memory()
    }

    /// What the fault handler and installers count, live.
    pub fn stats(&self) -> &FaultStats {
        self.engine.stats()
    }

    /// The engine behind this session (its failure watch, among others).
    pub fn engine(&self) -> &PostcopyEngine {
        &self.engine
    }

    /// See [`PostcopyEngine::finish`]: only a `demand` session needs it to complete.
    pub fn finish(&self) {
        self.engine.finish();
    }

    /// Waits until every page is present, releases userfaultfd, tells the source, and reports.
    /// A source that went silent or aborted meanwhile is the error, also if every page arrived
    /// (it never heard so, and may act on it).
    pub fn wait(mut self) -> Result<DestinationReport> {
        let failure = self.engine.failure_watch();
        let engine = self.engine.wait();
        if let Some(guard) = &self.guard {
            // Before anything that may wait on a dead lane: the lease goes back as soon as can be.
            guard.failsafe.trip_if_failed(&failure);
        }
        // Stopped before `done`: the source stops applying once it hears it.
        let checkpoints = self.guard.as_mut().and_then(|g| g.checkpointer.take()).map(Checkpointer::stop);
        let result = match (engine, self.watch.stop()) {
            (Ok(mut report), Ok(mut live)) => {
                report.resume_latency = self.resume_latency;
                let done = DoneCounters {
                    pages_present: report.pages_total,
                    network_faults: report.network_faults,
                    urgent_pages: report.urgent_pages,
                    bulk_pages: report.bulk_pages,
                    skipped_free_pages: report.skipped_free_pages,
                };
                let told = match (handoff::send_done(&mut live, &done), &self.rejoin) {
                    (Ok(()), _) => Ok(live),
                    // The control lane broke just now: say it on a new one.
                    (Err(e), Some(rejoin)) if lane_broke(&e) => {
                        match rejoin.open(Instant::now(), &AtomicBool::new(false)) {
                            Some(mut again) => handoff::send_done(&mut again, &done).map(|()| again),
                            None => Err(e),
                        }
                    }
                    (Err(e), _) => Err(e),
                };
                told.map(|mut live| {
                    // Every page is here whatever the source says now; one that did not hear
                    // `Done` finds the lease held if it tries to restart the guest.
                    if let Err(e) = handoff::expect_done_seen(&mut live) {
                        tracing::warn!(error = %e, "post-copy: the source did not confirm it heard done");
                    }
                    report
                })
            }
            (Err(e), Ok(mut live)) => {
                handoff::send_abort(&mut live, &e.to_string());
                Err(e)
            }
            // The engine reports the source's failure itself when it stopped on it.
            (Err(e), Err(_)) => Err(e),
            (Ok(_), Err(source)) => Err(source),
        };
        let Some(guard) = self.guard.take() else { return result };
        let (stats, capture) = checkpoints.unwrap_or_default();
        let result = match result {
            // Halted meanwhile (the lease was lost): the guest no longer runs here.
            Ok(_) if guard.failsafe.tripped.load(Ordering::Acquire) => Err(MigrationError::LeaseLost),
            other => other,
        };
        match result {
            Ok(mut report) => {
                // The source heard that every page is here: it will not restart the guest, and
                // everything held may leave. The lease stays with the caller while the guest runs.
                if let Some(mut capture) = capture {
                    capture.committed(u64::MAX);
                }
                report.checkpoints = stats;
                report.lease = guard.failsafe.lease.lock().unwrap_or_else(|e| e.into_inner()).take().map(Arc::new);
                Ok(report)
            }
            Err(e) => {
                // Never two live copies: the guest stops here before the lease can go to the source.
                guard.failsafe.trip();
                Err(e)
            }
        }
    }
}

/// The destination's side of the control lane during post-copy: a thread that keeps the
/// heartbeats going, listens for the source's, and stops the engine when the source goes silent
/// or aborts.
#[derive(Debug)]
struct SourceWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<LiveControl>>>,
}

impl SourceWatch {
    /// How long the watcher sleeps between looks at its stop flag: [`PostcopyDestination::wait`]
    /// waits for up to one tick after the last page (at 50 ms that added 25 ms on average to
    /// every migration's end, a quarter of a 5% back-and-forth return's total).
    const TICK: Duration = Duration::from_millis(5);

    fn start(
        mut live: LiveControl,
        engine: EngineControl,
        rejoin: Option<Rejoin>,
        lane: Arc<CurrentLane>,
        protected: Option<Protected>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-source-watch".into())
                .spawn(move || {
                    let mut last_heard = Instant::now();
                    // When the control lane last worked: rejoining goes on for one recovery
                    // window from then, however many times a reopened lane fails again.
                    let mut trouble_since: Option<Instant> = None;
                    while !stop.load(Ordering::Acquire) {
                        if let Some(p) = &protected {
                            p.failsafe.trip_if_failed(&p.engine);
                        }
                        let heard = last_heard;
                        let failure = match live.poll(Self::TICK, &mut last_heard) {
                            Ok(None) => {
                                if last_heard != heard {
                                    trouble_since = None;
                                }
                                continue;
                            }
                            // A broken or silent control lane: open it again, if the session can.
                            Err(e)
                                if lane_broke(&e)
                                    && rejoin.as_ref().is_some_and(|r| {
                                        trouble_since.get_or_insert(heard).elapsed() < r.recovery.window
                                    }) =>
                            {
                                let rejoin = rejoin.as_ref().expect("checked");
                                match rejoin.open(trouble_since.expect("set"), &stop) {
                                    Some(again) => {
                                        lane.set(again.writer());
                                        live = again;
                                        last_heard = Instant::now();
                                        continue;
                                    }
                                    None => e,
                                }
                            }
                            Ok(Some(msg)) => {
                                match (handoff::abort_reason(&msg), checkpoint::ack_epoch(&msg), &protected) {
                                    (Some(why), ..) => MigrationError::PeerAborted(why),
                                    (None, Some(epoch), Some(p)) => {
                                        p.acks.acked(epoch);
                                        continue;
                                    }
                                    _ => MigrationError::Protocol("an unexpected message from the source".into()),
                                }
                            }
                            Err(MigrationError::Transport(ferry_transport::TransportError::Silent(why))) => {
                                MigrationError::Transport(ferry_transport::TransportError::Silent(format!(
                                    "the source: {why}"
                                )))
                            }
                            Err(e) => e,
                        };
                        engine.fail(&failure);
                        if let Some(p) = &protected {
                            p.failsafe.trip_if_failed(&p.engine);
                        }
                        return Err(failure);
                    }
                    Ok(live)
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the source watch: {e}")))?
        };
        Ok(SourceWatch { stop, thread: Some(thread) })
    }

    /// Stops watching; the control lane back, or why the source failed.
    fn stop(&mut self) -> Result<LiveControl> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| MigrationError::ThreadPanicked)?,
            None => Err(MigrationError::Protocol("the source watch already stopped".into())),
        }
    }
}

/// What the source watch does for a protected destination: routes acknowledgements to the
/// checkpointer, and trips the failsafe as soon as the engine failed.
#[derive(Debug)]
struct Protected {
    acks: checkpoint::CheckpointerHandle,
    failsafe: Arc<Failsafe>,
    engine: FailureWatch,
}

/// How a destination opens its control lane again after it broke: the same reconnection and
/// backoff as the engine's data lanes, then heartbeats on the new lane.
#[derive(Clone, Debug)]
struct Rejoin {
    recovery: Recovery,
    liveness: Liveness,
}

impl Rejoin {
    fn of(source: &PageSource, config: &EngineConfig) -> Option<Self> {
        let reconnect = source.reconnect.clone()?;
        (!config.recovery_window.is_zero()).then_some(Rejoin {
            recovery: Recovery { reconnect, window: config.recovery_window, interrupts: None },
            liveness: config.liveness,
        })
    }

    /// Reopens the control lane until the window from `since` ends (or `stop`); `None` then, and
    /// the failure that started it stands.
    fn open(&self, since: Instant, stop: &AtomicBool) -> Option<LiveControl> {
        let control = self.recovery.reopen_since(since, stop, &"the control lane broke", |r| r.control()).ok()?;
        LiveControl::start(control.as_ref(), self.liveness).ok()
    }
}

impl Drop for SourceWatch {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

/// What the source measured.
#[derive(Clone, Debug, Default)]
pub struct SourceReport {
    /// From the pause to the destination's guest running.
    pub downtime: Duration,
    /// From the pause to every page present at the destination.
    pub total: Duration,
    /// What the destination counted when every page was present.
    pub done: DoneCounters,
    /// Times the destination opened the control lane again after it broke.
    pub control_recoveries: u64,
}

/// Where a source takes a destination's control lane again after it broke: its page server.
pub trait ControlAcceptor: Sync {
    /// Waits up to `timeout` for the destination to open the control lane again.
    fn accept_control(&self, timeout: Duration) -> Result<Box<dyn ControlStream>>;
}

impl ControlAcceptor for ferry_transport::tcp::TcpPageServer {
    fn accept_control(&self, timeout: Duration) -> Result<Box<dyn ControlStream>> {
        Ok(Box::new(ferry_transport::tcp::TcpPageServer::accept_control(self, timeout)?))
    }
}

#[cfg(feature = "rdma")]
impl ControlAcceptor for ferry_transport::rdma::RdmaPageServer {
    fn accept_control(&self, timeout: Duration) -> Result<Box<dyn ControlStream>> {
        Ok(Box::new(ferry_transport::rdma::RdmaPageServer::accept_control(self, timeout)?))
    }
}

impl ControlAcceptor for ferry_transport::local::LocalPageServer {
    fn accept_control(&self, timeout: Duration) -> Result<Box<dyn ControlStream>> {
        Ok(Box::new(ferry_transport::local::LocalPageServer::accept_control(self, timeout)?))
    }
}

/// How a post-copy source runs its side of the session.
#[derive(Clone, Copy)]
pub struct SourceOptions<'a> {
    /// Heartbeats on the control lane.
    pub liveness: Liveness,
    /// How long to wait for a destination whose control lane broke to open it again (it does,
    /// under the same session, when it can reconnect); zero: a broken control lane ends the
    /// migration.
    pub recovery_window: Duration,
    /// Where the control lane comes back: the session's page server.
    pub reaccept: Option<&'a dyn ControlAcceptor>,
    /// The image this source keeps for a restart: reverse checkpoints are applied to it (a
    /// destination's checkpoints to a source without one are a protocol error).
    pub kept: Option<&'a KeptImage>,
}

impl Default for SourceOptions<'_> {
    fn default() -> Self {
        SourceOptions {
            liveness: Liveness::default(),
            recovery_window: Duration::from_secs(10),
            reaccept: None,
            kept: None,
        }
    }
}

impl std::fmt::Debug for SourceOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOptions")
            .field("liveness", &self.liveness)
            .field("recovery_window", &self.recovery_window)
            .field("reaccept", &self.reaccept.is_some())
            .field("kept", &self.kept)
            .finish()
    }
}

/// A broken or silent lane, which reconnecting may cure (not a refusal or a protocol violation).
fn lane_broke(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::Transport(
            ferry_transport::TransportError::PeerClosed
                | ferry_transport::TransportError::Io(_)
                | ferry_transport::TransportError::Silent(_)
        )
    )
}

/// Source side, called with the guest paused at `paused_at`: hands over `state` and the free
/// pages, waits for the destination to resume the guest and then to hold every page. The page
/// server must keep serving meanwhile; after this returns the source may release guest memory.
/// Both sides send heartbeats meanwhile: a destination silent for `liveness.timeout` is
/// [`ferry_transport::TransportError::Silent`] (the guest's only complete copy may then be
/// split: keep the source's image). Once the guest runs there, a control lane that breaks or
/// goes silent is taken again from `options.reaccept` when the destination reopens it within
/// the recovery window.
pub fn run_source(
    control: &mut dyn ControlStream,
    paused_at: Instant,
    state: &[u8],
    free: &FreePages,
    options: &SourceOptions<'_>,
) -> Result<SourceReport> {
    let mut live = LiveControl::start(&*control, options.liveness)?;
    tracing::info!(state_bytes = state.len(), "post-copy: handing the guest over");
    handoff::send_handoff(&mut live, state, free)?;
    handoff::expect_resumed(&mut live)?;
    let downtime = paused_at.elapsed();
    tracing::info!(?downtime, "post-copy: the destination resumed the guest");
    if let Some(kept) = options.kept {
        kept.set_downtime(downtime);
    }
    let mut control_recoveries = 0;
    let done = loop {
        let msg = match live.read() {
            Ok(msg) => msg,
            Err(e) if lane_broke(&e) && !options.recovery_window.is_zero() && options.reaccept.is_some() => {
                let reaccept = options.reaccept.expect("checked");
                // The window runs from when the lane last worked, as the destination counts it: a
                // silent lane stopped working a liveness timeout ago.
                let silent_for = match &e {
                    MigrationError::Transport(ferry_transport::TransportError::Silent(_)) => options.liveness.timeout,
                    _ => Duration::ZERO,
                };
                let left = options.recovery_window.saturating_sub(silent_for);
                tracing::warn!(error = %e, ?left, "post-copy: the control lane broke; waiting for the destination to reopen it");
                // The destination's own error stands if it never comes back.
                let again = match left.is_zero() {
                    true => return Err(e),
                    false => reaccept.accept_control(left).map_err(|_| e)?,
                };
                live = LiveControl::start(again.as_ref(), options.liveness)?;
                control_recoveries += 1;
                tracing::info!("post-copy: the control lane was reopened");
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(why) = handoff::abort_reason(&msg) {
            return Err(MigrationError::PeerAborted(why));
        }
        if checkpoint::is_checkpoint_message(&msg) {
            let kept = options.kept.ok_or_else(|| {
                MigrationError::Protocol("a reverse checkpoint, but this source keeps no image".into())
            })?;
            if let Some(epoch) = kept.accept(&msg)? {
                // A lost ack costs the destination a resend, not a checkpoint: the next read
                // finds the broken lane.
                let _ = live.write(&checkpoint::ack_message(epoch));
            }
            continue;
        }
        break handoff::done_counters(&msg)?;
    };
    // Heard: the destination closes once told so, with nothing left unread on the lane. (A lane
    // that breaks now costs the destination a warning, not the migration.)
    if let Err(e) = live.end_with(handoff::done_seen_message()) {
        tracing::warn!(error = %e, "post-copy: telling the destination its done was heard");
    }
    tracing::info!(total = ?paused_at.elapsed(), "post-copy: the destination holds every page");
    Ok(SourceReport { downtime, total: paused_at.elapsed(), done, control_recoveries })
}
