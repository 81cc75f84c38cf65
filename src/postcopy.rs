//! Post-copy migration (Hines & Gopalan, VEE'09). The source pauses the guest and hands over its
//! vCPU/device state and free-page bitmap; the destination resumes the guest at once and brings
//! memory over behind it: faults are served on the urgent lane by the fault thread, and the
//! pre-pager fills the rest on the bulk lane, pivoting around faults. Free pages never cross.
//! Every page crosses at most once: the page-state bitmaps guarantee it at the destination and the
//! page server counts it at the source.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::{DestinationMemory, FaultStats};
use ferry_transport::{ControlStream, PageSource};

use crate::engine::{DestinationReport, EngineConfig, EngineControl, PostcopyEngine};
use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff::{self, DoneCounters};
use crate::liveness::{LiveControl, Liveness};

/// A running post-copy destination: the engine, and the control lane to the source, watched.
#[derive(Debug)]
pub struct PostcopyDestination {
    engine: PostcopyEngine,
    watch: SourceWatch,
    resume_latency: Duration,
}

impl PostcopyDestination {
    /// Waits for the source's handoff on `control`, starts the engine (faults are served from
    /// then on; free pages never cross), calls `resume` with the state blob (the VMM loads it and
    /// starts its vCPUs), tells the source, and starts pre-paging. Returns while memory is still
    /// arriving. From the first byte of the handoff on, both sides send heartbeats
    /// ([`EngineConfig::liveness`]): a source silent past the timeout, or one that aborts, stops
    /// the engine with that error. The wait for the handoff to begin has no deadline: the source
    /// decides when to pause its guest.
    pub fn start(
        control: Box<dyn ControlStream>,
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &EngineConfig,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        let mut live = LiveControl::start(control.as_ref(), config.liveness)?;
        drop(control);
        while !live.wait_readable(Duration::from_secs(3600)).map_err(ferry_transport::TransportError::Io)? {}
        let (state, free) = handoff::receive_handoff(&mut live, memory.states().pages())?;
        let handoff_at = Instant::now();
        let mut engine = PostcopyEngine::start(memory, source, config, &free)?;
        if let Err(why) = resume(&state) {
            handoff::send_abort(&mut live, &why);
            return Err(MigrationError::Resume(why));
        }
        let resume_latency = handoff_at.elapsed();
        handoff::send_resumed(&mut live)?;
        engine.start_prepaging()?;
        let watch = SourceWatch::start(live, engine.control())?;
        Ok(PostcopyDestination { engine, watch, resume_latency })
    }

    pub fn memory(&self) -> &Arc<DestinationMemory> {
        self.engine.memory()
    }

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
        let engine = self.engine.wait();
        match (engine, self.watch.stop()) {
            (Ok(mut report), Ok(mut live)) => {
                report.resume_latency = self.resume_latency;
                handoff::send_done(
                    &mut live,
                    &DoneCounters {
                        pages_present: report.pages_total,
                        network_faults: report.network_faults,
                        urgent_pages: report.urgent_pages,
                        bulk_pages: report.bulk_pages,
                        skipped_free_pages: report.skipped_free_pages,
                    },
                )?;
                Ok(report)
            }
            (Err(e), Ok(mut live)) => {
                handoff::send_abort(&mut live, &e.to_string());
                Err(e)
            }
            // The engine reports the source's failure itself when it stopped on it.
            (Err(e), Err(_)) => Err(e),
            (Ok(_), Err(source)) => Err(source),
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
    /// How long the watcher sleeps between looks at its stop flag.
    const TICK: Duration = Duration::from_millis(50);

    fn start(mut live: LiveControl, engine: EngineControl) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-source-watch".into())
                .spawn(move || {
                    let mut last_heard = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        let failure = match live.poll(Self::TICK, &mut last_heard) {
                            Ok(None) => continue,
                            Ok(Some(msg)) => match handoff::abort_reason(&msg) {
                                Some(why) => MigrationError::PeerAborted(why),
                                None => MigrationError::Protocol("an unexpected message from the source".into()),
                            },
                            Err(MigrationError::Transport(ferry_transport::TransportError::Silent(why))) => {
                                MigrationError::Transport(ferry_transport::TransportError::Silent(format!(
                                    "the source: {why}"
                                )))
                            }
                            Err(e) => e,
                        };
                        engine.fail(&failure);
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
    pub done: DoneCounters,
}

/// Source side, called with the guest paused at `paused_at`: hands over `state` and the free
/// pages, waits for the destination to resume the guest and then to hold every page. The page
/// server must keep serving meanwhile; after this returns the source may release guest memory.
/// Both sides send heartbeats meanwhile: a destination silent for `liveness.timeout` is
/// [`ferry_transport::TransportError::Silent`] (the guest's only complete copy may then be
/// split: keep the source's image).
pub fn run_source(
    control: &mut dyn ControlStream,
    paused_at: Instant,
    state: &[u8],
    free: &FreePages,
    liveness: Liveness,
) -> Result<SourceReport> {
    let mut live = LiveControl::start(&*control, liveness)?;
    handoff::send_handoff(&mut live, state, free)?;
    handoff::expect_resumed(&mut live)?;
    let downtime = paused_at.elapsed();
    let done = handoff::expect_done(&mut live)?;
    Ok(SourceReport { downtime, total: paused_at.elapsed(), done })
}
