//! Pre-copy migration with downtime control, and hybrid (pre-copy rounds, then post-copy). The guest keeps running at the source while the
//! destination pulls memory in rounds: round 0 is every page, each later round the pages the guest
//! dirtied meanwhile (from the VMM's dirty log). After each round the source predicts the downtime
//! of stopping now (dirty bytes / measured bandwidth); when it is under the target, or the round
//! limit is reached, it pauses the guest and sends a final round with the last dirty pages and the
//! state blob. The destination resumes the guest once those pages are in.
//!
//! The destination pulls with the same idempotent reads as post-copy: a page read while the guest
//! still writes it is simply dirty again and read again next round.

use std::time::{Duration, Instant};

use ferry_transport::{BulkRead, ControlStream, GuestMemory, PageBuf, PageIndex, PageRun, PageSource};

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff;
use crate::taskguided::{Next, PauseRule, Paused, StopDecision, TaskGuidance, TaskOutcome};

/// Where the guest's dirty pages come from: KVM's dirty log in a VMM, a callback through the C ABI.
pub trait DirtyLog {
    /// Pages written since the previous call (the first call starts tracking and may return all).
    fn collect(&mut self) -> Result<FreePages>;
}

/// How a pre-copy (or hybrid) source decides when to stop.
#[derive(Clone, Debug)]
pub struct PrecopyConfig {
    /// Stop when the predicted downtime is at most this.
    pub downtime_target: Duration,
    /// Stop after this many rounds whatever the prediction.
    pub max_rounds: u32,
    /// Heartbeats once a hybrid migration turns to post-copy.
    pub liveness: crate::liveness::Liveness,
    /// Round 0 pulls every page; migrating onto an image the destination kept and accepted
    /// ([`crate::backforth`]), only these, the pages changed since the guest left it.
    pub base: Option<FreePages>,
    /// Stop only inside the segments the guest marks as cheap to stop ([`crate::taskguided`]).
    pub task: Option<TaskGuidance>,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_target: Duration::from_millis(50),
            max_rounds: 30,
            liveness: crate::liveness::Liveness::default(),
            base: None,
            task: None,
        }
    }
}

/// What a pre-copy source measured.
#[derive(Clone, Debug, Default)]
pub struct PrecopyReport {
    /// Rounds before the final one.
    pub rounds: u32,
    /// Pages pulled in each round, the final one last.
    pub pages_per_round: Vec<u64>,
    /// The downtime predicted when the source decided to stop.
    pub predicted_downtime: Duration,
    /// Measured: from the pause to the destination's guest running.
    pub downtime: Duration,
    /// From the start of round 0 to the destination's guest running.
    pub total: Duration,
    /// Last measured pull bandwidth, bytes per second.
    pub bandwidth: f64,
    /// How a task-guided stop went (None without guidance).
    pub task: Option<TaskOutcome>,
}

/// Source side. `pause` stops the guest and returns its state blob. With task guidance it is
/// called once the guest is inside a segment, and cannot hold the stop back
/// ([`run_source_guided`] can).
pub fn run_source(
    control: &mut dyn ControlStream,
    page_size: u64,
    dirty_log: &mut dyn DirtyLog,
    pause: impl FnOnce() -> Result<Vec<u8>>,
    config: &PrecopyConfig,
) -> Result<PrecopyReport> {
    run_source_guided(control, page_size, dirty_log, once(pause), config)
}

/// Source side with a pause that follows a [`PauseRule`]: asked to stop only inside a task
/// segment, it may find the guest outside, let it run on and answer [`Paused::LeftSegment`];
/// another round then runs.
pub fn run_source_guided(
    control: &mut dyn ControlStream,
    page_size: u64,
    dirty_log: &mut dyn DirtyLog,
    mut pause: impl FnMut(PauseRule) -> Result<Paused>,
    config: &PrecopyConfig,
) -> Result<PrecopyReport> {
    let started = Instant::now();
    let (mut report, mut dirty, state, paused_at) = rounds(control, page_size, dirty_log, config, &mut pause)?;
    dirty.union_with(&dirty_log.collect()?);
    handoff::send_round(control, &dirty, &handoff::RoundKind::Final(state))?;
    handoff::expect_resumed(control)?;
    report.downtime = paused_at.elapsed();
    report.pages_per_round.push(dirty.count());
    report.total = started.elapsed();
    Ok(report)
}

/// Hybrid source: pre-copy rounds as in [`run_source`], then the guest is paused and the
/// migration continues as post-copy: the destination drops the pages dirtied since their last
/// pull and faults them in. Returns the rounds' report and the post-copy source report.
pub fn run_hybrid_source(
    control: &mut dyn ControlStream,
    page_size: u64,
    dirty_log: &mut dyn DirtyLog,
    pause: impl FnOnce() -> Result<Vec<u8>>,
    config: &PrecopyConfig,
) -> Result<(PrecopyReport, crate::postcopy::SourceReport)> {
    run_hybrid_source_guided(control, page_size, dirty_log, once(pause), config)
}

/// [`run_hybrid_source`] with a pause that follows a [`PauseRule`], as [`run_source_guided`].
pub fn run_hybrid_source_guided(
    control: &mut dyn ControlStream,
    page_size: u64,
    dirty_log: &mut dyn DirtyLog,
    mut pause: impl FnMut(PauseRule) -> Result<Paused>,
    config: &PrecopyConfig,
) -> Result<(PrecopyReport, crate::postcopy::SourceReport)> {
    let started = Instant::now();
    let (mut report, mut dirty, state, paused_at) = rounds(control, page_size, dirty_log, config, &mut pause)?;
    dirty.union_with(&dirty_log.collect()?);
    handoff::send_round(control, &dirty, &handoff::RoundKind::SwitchToPostcopy)?;
    report.pages_per_round.push(dirty.count());
    let post = crate::postcopy::run_source(
        control,
        paused_at,
        &state,
        &FreePages::new(dirty.pages()),
        &crate::postcopy::SourceOptions { liveness: config.liveness, ..Default::default() },
    )?;
    report.downtime = post.downtime;
    report.total = started.elapsed();
    Ok((report, post))
}

/// A pause that stops the guest wherever it is, as a rule-following one (called once).
fn once(pause: impl FnOnce() -> Result<Vec<u8>>) -> impl FnMut(PauseRule) -> Result<Paused> {
    let mut pause = Some(pause);
    move |_| match pause.take() {
        Some(pause) => pause().map(Paused::Stopped),
        None => Err(MigrationError::Vmm("the guest was paused twice".into())),
    }
}

/// Pre-copy rounds until the predicted downtime meets the target or the round limit is reached
/// (and, task-guided, the guest is inside a segment or the wait is over); then pauses the guest.
/// Returns the report so far, the pages dirtied up to the last round, the state blob and when the
/// pause began.
fn rounds(
    control: &mut dyn ControlStream,
    page_size: u64,
    dirty_log: &mut dyn DirtyLog,
    config: &PrecopyConfig,
    pause: &mut dyn FnMut(PauseRule) -> Result<Paused>,
) -> Result<(PrecopyReport, FreePages, Vec<u8>, Instant)> {
    let first = dirty_log.collect()?;
    let mut dirty = match &config.base {
        Some(changed) if changed.pages() == first.pages() => {
            let mut round0 = changed.clone();
            round0.union_with(&first);
            round0
        }
        Some(changed) => {
            return Err(MigrationError::Vmm(format!(
                "a base of {} pages for a dirty log of {}",
                changed.pages(),
                first.pages()
            )))
        }
        None => FreePages::all(first.pages()),
    };
    let mut report = PrecopyReport::default();
    let mut decision = StopDecision::new(config.task.as_ref());
    loop {
        decision.round_starts();
        handoff::send_round(control, &dirty, &handoff::RoundKind::Pull)?;
        let (pages, micros) = handoff::expect_round_done(control)?;
        // The peer's count bounds what we compute from it: no more than was asked.
        if pages > dirty.count() {
            return Err(MigrationError::Protocol(format!(
                "the destination pulled {pages} pages of a round of {}",
                dirty.count()
            )));
        }
        report.pages_per_round.push(pages);
        report.rounds += 1;
        if micros > 0 && pages > 0 {
            report.bandwidth = (pages * page_size) as f64 / (micros as f64 / 1e6);
        }
        dirty = dirty_log.collect()?;
        let bytes = dirty.count() * page_size;
        report.predicted_downtime = Duration::from_secs_f64(bytes as f64 / report.bandwidth.max(1.0));
        let ready = report.predicted_downtime <= config.downtime_target || report.rounds >= config.max_rounds;
        if let Next::Pause(rule) = decision.after_round(ready) {
            let paused_at = Instant::now();
            match (pause(rule)?, rule) {
                (Paused::Stopped(state), _) => {
                    decision.stopped(rule);
                    report.task = decision.outcome();
                    return Ok((report, dirty, state, paused_at));
                }
                (Paused::LeftSegment, PauseRule::InSegmentOnly) => decision.held_back(),
                (Paused::LeftSegment, PauseRule::Anyway) => {
                    return Err(MigrationError::Vmm("the pause held back a stop it was told to make".into()))
                }
            }
        }
    }
}

/// Destination side: pulls every round into `memory` and calls `resume` with the state blob
/// after the final one.
pub fn run_destination(
    control: &mut dyn ControlStream,
    memory: &GuestMemory,
    mut source: PageSource,
    resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
) -> Result<u32> {
    let pages = memory.layout().total_pages();
    let mut rounds = 0;
    loop {
        let round = handoff::receive_round(control, pages)?;
        if round.kind == handoff::RoundKind::SwitchToPostcopy {
            return Err(MigrationError::Protocol("a hybrid switch sent to a pre-copy destination".into()));
        }
        let t0 = Instant::now();
        let pulled = pull(memory, &mut source, &round.dirty)?;
        rounds += 1;
        match round.kind {
            handoff::RoundKind::Pull | handoff::RoundKind::SwitchToPostcopy => {
                handoff::send_round_done(control, pulled, t0.elapsed().as_micros() as u64)?
            }
            handoff::RoundKind::Final(state) => {
                if let Err(why) = resume(&state) {
                    handoff::send_abort(control, &why);
                    return Err(MigrationError::Resume(why));
                }
                handoff::send_resumed(control)?;
                return Ok(rounds);
            }
        }
    }
}

/// Hybrid destination: pulls pre-copy rounds into `memory` (not yet registered with
/// userfaultfd); at the switch it drops the stale pages, registers the memory with every other page
/// present, and continues as a post-copy destination, which it returns running.
pub fn run_hybrid_destination(
    mut control: Box<dyn ControlStream>,
    memory: std::sync::Arc<GuestMemory>,
    mut source: PageSource,
    config: &crate::engine::EngineConfig,
    resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
) -> Result<(u32, crate::postcopy::PostcopyDestination)> {
    let pages = memory.layout().total_pages();
    let mut rounds = 0;
    let stale = loop {
        let round = handoff::receive_round(control.as_mut(), pages)?;
        match round.kind {
            handoff::RoundKind::SwitchToPostcopy => break round.dirty,
            handoff::RoundKind::Final(_) => {
                return Err(MigrationError::Protocol("a final pre-copy round in a hybrid migration".into()))
            }
            handoff::RoundKind::Pull => {
                let t0 = Instant::now();
                let pulled = pull(&memory, &mut source, &round.dirty)?;
                rounds += 1;
                handoff::send_round_done(control.as_mut(), pulled, t0.elapsed().as_micros() as u64)?;
            }
        }
    };
    // Inside the downtime, but one madvise per run.
    discard(&memory, &stale)?;
    let registered = ferry_fault_handler::DestinationMemory::register_with_valid(memory, |p| !stale.is_free(p))?;
    let session =
        crate::postcopy::PostcopyDestination::start(control, std::sync::Arc::new(registered), source, config, resume)?;
    Ok((rounds, session))
}

/// Drops the `pages` from `memory` (they read as absent, or zero, from then on): one madvise per
/// run, split only at region edges.
pub(crate) fn discard(memory: &GuestMemory, pages: &FreePages) -> Result<()> {
    let layout = memory.layout();
    let ps = u64::from(layout.page_size());
    let bases = layout.region_bases();
    for (PageIndex(first), count) in pages.runs() {
        let mut g = first;
        while g < first + count {
            let region = bases.partition_point(|&b| b <= g) - 1;
            let region_end = bases[region] + layout.region_pages(region as u32).unwrap_or(0);
            let n = (first + count).min(region_end) - g;
            let (mapping, offset, len) = (&memory.regions()[region], (g - bases[region]) * ps, (n * ps) as usize);
            // A file keeps its pages when a mapping drops them: they must go from the file too, or
            // a page that arrives as zero (nothing installed) would map the old contents again.
            if mapping.fd().is_some() {
                mapping.punch_hole(offset, len)?;
            }
            mapping.discard(offset, len)?;
            g += n;
        }
    }
    Ok(())
}

/// Reads every page set in `dirty` through the bulk lane and writes it into `memory`.
pub(crate) fn pull(memory: &GuestMemory, source: &mut PageSource, dirty: &FreePages) -> Result<u64> {
    let layout = memory.layout();
    let ps = u64::from(layout.page_size());
    let max = layout.max_run_pages().min(256);
    let bases = layout.region_bases();
    let mut runs = Vec::new();
    for (PageIndex(first), count) in dirty.runs() {
        let mut g = first;
        while g < first + count {
            let region = bases.partition_point(|&b| b <= g) - 1;
            let region_end = bases[region] + layout.region_pages(region as u32).unwrap_or(0);
            let n = (first + count).min(region_end).min(g + u64::from(max)) - g;
            runs.push(PageRun::new(region as u32, g - bases[region], n as u32));
            g += n;
        }
    }
    let mut pool: Vec<PageBuf> = Vec::new();
    let mut next = runs.iter();
    let mut pulled = 0;
    loop {
        while source.bulk.in_flight() < source.bulk.depth() {
            let Some(&run) = next.next() else { break };
            let buf = match pool.pop() {
                Some(buf) => buf,
                None => source.bulk.buffer(max as usize * ps as usize)?,
            };
            source.bulk.submit(BulkRead { run, buf: buf.into(), tag: 0 })?;
        }
        let Some(done) = source.bulk.complete()? else { break };
        let len = done.run.pages as usize * ps as usize;
        memory.regions()[done.run.region as usize].write(done.run.first_page * ps, &done.buf[..len])?;
        pulled += u64::from(done.run.pages);
        pool.extend(done.buf.into_buffer());
    }
    Ok(pulled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    struct EverythingDirty(u64);

    impl DirtyLog for EverythingDirty {
        fn collect(&mut self) -> Result<FreePages> {
            Ok(FreePages::all(self.0))
        }
    }

    #[test]
    fn a_round_done_claiming_more_pages_than_asked_is_a_protocol_error_not_an_overflow() {
        let (mut source, mut dest) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            handoff::receive_round(&mut dest, 100).unwrap();
            handoff::send_round_done(&mut dest, u64::MAX, 1).unwrap();
            dest
        });
        let err =
            run_source(&mut source, 4096, &mut EverythingDirty(100), || Ok(Vec::new()), &PrecopyConfig::default())
                .unwrap_err();
        assert!(matches!(err, MigrationError::Protocol(ref why) if why.contains("pulled")), "{err:?}");
        drop(peer.join().unwrap());
    }
}
