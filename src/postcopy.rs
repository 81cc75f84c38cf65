//! Post-copy migration (Hines & Gopalan, VEE'09). The source pauses the guest and hands over its
//! vCPU/device state and free-page bitmap; the destination resumes the guest at once and brings
//! memory over behind it: faults are served on the urgent lane by the fault thread, and the
//! pre-pager fills the rest on the bulk lane, pivoting around faults. Free pages never cross.
//! Every page crosses at most once: the page-state bitmaps guarantee it at the destination and the
//! page server counts it at the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_fault_handler::{DestinationMemory, FaultStats};
use ferry_transport::{ControlStream, PageSource};

use crate::engine::{DestinationReport, EngineConfig, PostcopyEngine};
use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff::{self, DoneCounters};

/// A running post-copy destination: the engine, and the control lane to the source.
#[derive(Debug)]
pub struct PostcopyDestination {
    engine: PostcopyEngine,
    control: Box<dyn ControlStream>,
    resume_latency: Duration,
}

impl PostcopyDestination {
    /// Waits for the source's handoff on `control`, starts the engine (faults are served from
    /// then on; free pages never cross), calls `resume` with the state blob (the VMM loads it and
    /// starts its vCPUs), tells the source, and starts pre-paging. Returns while memory is still
    /// arriving.
    pub fn start(
        mut control: Box<dyn ControlStream>,
        memory: Arc<DestinationMemory>,
        source: PageSource,
        config: &EngineConfig,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        let (state, free) = handoff::receive_handoff(control.as_mut(), memory.states().pages())?;
        let handoff_at = Instant::now();
        let mut engine = PostcopyEngine::start(memory, source, config, &free)?;
        if let Err(why) = resume(&state) {
            handoff::send_abort(control.as_mut(), &why);
            return Err(MigrationError::Resume(why));
        }
        let resume_latency = handoff_at.elapsed();
        handoff::send_resumed(control.as_mut())?;
        engine.start_prepaging()?;
        Ok(PostcopyDestination { engine, control, resume_latency })
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
    pub fn wait(mut self) -> Result<DestinationReport> {
        let mut report = match self.engine.wait() {
            Ok(r) => r,
            Err(e) => {
                handoff::send_abort(self.control.as_mut(), &e.to_string());
                return Err(e);
            }
        };
        report.resume_latency = self.resume_latency;
        handoff::send_done(
            self.control.as_mut(),
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
