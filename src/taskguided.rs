//! Task-guided stop-and-copy (Kuo, "A Task Guided Framework for Reducing the Service Downtime of
//! Virtual Machine Live Migration"). The guest knows when stopping it is cheap: between requests,
//! after a commit, outside a burst of writes. It marks those code segments (in `ferry-vmm`, an
//! `out` to a task port on entering and leaving), and the VMM tells ferry where the guest is
//! through [`TaskSegments`].
//!
//! With [`TaskGuidance`] in a [`crate::precopy::PrecopyConfig`], pre-copy and hybrid stop only
//! inside a segment: once the predicted downtime meets the target (or the round limit is reached)
//! the source checks the guest; outside a segment it waits a little for one and runs another
//! round, so the pages the guest writes meanwhile keep crossing while it is live. The wait is
//! bounded: past [`TaskGuidance::max_wait`] the source stops at the next point the prediction
//! allows, inside a segment or not, and says so ([`TaskOutcome::gave_up`]).
//!
//! Deciding and pausing are two steps, and the guest may leave its segment between them. The pause
//! callback is told the rule ([`PauseRule`]); a VMM that can check the guest's place while its
//! vCPUs are stopped (they exit on the segment hypercall) resumes a guest found outside and
//! answers [`Paused::LeftSegment`]: the stop is held back and another round runs.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the guest is, as the VMM learns it from the guest's segment marks.
pub trait TaskSegments: Send + Sync {
    /// Whether the guest is inside a segment it marked as cheap to stop, now.
    fn in_segment(&self) -> bool;

    /// Waits up to `timeout` for the guest to be inside a segment; returns whether it is. The
    /// default polls every 200 µs; a VMM with a notification overrides it.
    fn wait_for_segment(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.in_segment() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_micros(200)));
        }
    }
}

/// Stop-and-copy inside the guest's marked segments.
#[derive(Clone)]
pub struct TaskGuidance {
    /// Tells whether the guest is inside a marked segment, and holds it there for a pause.
    pub segments: Arc<dyn TaskSegments>,
    /// How long past the first moment the source could have stopped it waits for a segment.
    pub max_wait: Duration,
}

impl fmt::Debug for TaskGuidance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the guest's place: that asks the VMM (a C callback, for one), which Debug must not.
        f.debug_struct("TaskGuidance").field("max_wait", &self.max_wait).finish_non_exhaustive()
    }
}

/// What the pause callback of a task-guided migration is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseRule {
    /// Stop the guest only if it is inside a segment when its vCPUs stop; otherwise let it run on
    /// and answer [`Paused::LeftSegment`].
    InSegmentOnly,
    /// Stop it wherever it is (no guidance, or the wait is over).
    Anyway,
}

/// The pause callback's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Paused {
    /// The guest is stopped; its state blob.
    Stopped(Vec<u8>),
    /// The guest had left its segment: it runs on, and pre-copy goes on with another round.
    LeftSegment,
}

/// How a task-guided stop went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskOutcome {
    /// The guest stopped inside a marked segment.
    pub stopped_in_segment: bool,
    /// The wait ran out and the guest was stopped outside a segment.
    pub gave_up: bool,
    /// From the first moment the source could have stopped to the pause.
    pub waited: Duration,
    /// Pauses held back because the guest left its segment before its vCPUs stopped.
    pub held_back: u32,
    /// Rounds run after the source could first have stopped.
    pub extra_rounds: u32,
}

/// The source's decision after each round: the clock of the wait and what it has seen.
#[derive(Debug)]
pub(crate) struct StopDecision<'a> {
    guidance: Option<&'a TaskGuidance>,
    ready_since: Option<Instant>,
    /// Whether the guest was inside a segment when the current round began.
    inside_at_round_start: bool,
    outcome: TaskOutcome,
}

/// What to do after a round.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Round,
    Pause(PauseRule),
}

impl<'a> StopDecision<'a> {
    pub(crate) fn new(guidance: Option<&'a TaskGuidance>) -> Self {
        StopDecision { guidance, ready_since: None, inside_at_round_start: false, outcome: TaskOutcome::default() }
    }

    /// A round begins.
    pub(crate) fn round_starts(&mut self) {
        self.inside_at_round_start = self.guidance.is_some_and(|g| g.segments.in_segment());
    }

    /// After a round: `ready` when the prediction (or the round limit) allows stopping now. Stops
    /// inside a segment only after a round that ran inside it.
    pub(crate) fn after_round(&mut self, ready: bool) -> Next {
        if self.ready_since.is_some() {
            self.outcome.extra_rounds += 1;
        }
        if !ready {
            return Next::Round;
        }
        let Some(guidance) = self.guidance else {
            return Next::Pause(PauseRule::Anyway);
        };
        let since = *self.ready_since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if waited >= guidance.max_wait {
            return Next::Pause(PauseRule::Anyway);
        }
        if guidance.segments.in_segment() {
            if self.inside_at_round_start {
                return Next::Pause(PauseRule::InSegmentOnly);
            }
            // The guest just entered: the round's dirty pages are its busy phase's last writes.
            // One more round, inside the segment, leaves the stop little to copy.
            return Next::Round;
        }
        // Not inside: wait a little for a segment, then a round carries what the guest wrote
        // meanwhile, and the check comes again with a fresh prediction.
        guidance.segments.wait_for_segment((guidance.max_wait - waited).min(Duration::from_millis(5)));
        Next::Round
    }

    /// The guest left its segment before its vCPUs stopped: it runs on.
    pub(crate) fn held_back(&mut self) {
        self.outcome.held_back += 1;
    }

    /// The guest is stopped, by a pause asked to follow `rule`.
    pub(crate) fn stopped(&mut self, rule: PauseRule) {
        if let Some(guidance) = self.guidance {
            self.outcome.waited = self.ready_since.map_or(Duration::ZERO, |s| s.elapsed());
            // With its vCPUs stopped the guest's place is exact.
            self.outcome.stopped_in_segment = rule == PauseRule::InSegmentOnly || guidance.segments.in_segment();
            self.outcome.gave_up = !self.outcome.stopped_in_segment;
        }
    }

    pub(crate) fn outcome(&self) -> Option<TaskOutcome> {
        self.guidance.map(|_| self.outcome.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flag(AtomicBool);

    impl TaskSegments for Flag {
        fn in_segment(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    fn guidance(inside: bool, max_wait: Duration) -> (Arc<Flag>, TaskGuidance) {
        let flag = Arc::new(Flag(AtomicBool::new(inside)));
        (flag.clone(), TaskGuidance { segments: flag, max_wait })
    }

    #[test]
    fn without_guidance_a_ready_source_stops_anyway() {
        let mut d = StopDecision::new(None);
        d.round_starts();
        assert_eq!(d.after_round(false), Next::Round);
        assert_eq!(d.after_round(true), Next::Pause(PauseRule::Anyway));
        d.stopped(PauseRule::Anyway);
        assert_eq!(d.outcome(), None);
    }

    #[test]
    fn a_guest_outside_its_segment_gets_more_rounds_then_stops_inside() {
        let (flag, g) = guidance(false, Duration::from_secs(60));
        let mut d = StopDecision::new(Some(&g));
        d.round_starts();
        assert_eq!(d.after_round(true), Next::Round);
        d.round_starts();
        assert_eq!(d.after_round(true), Next::Round);
        // Entered during a round: that round's pages are the busy phase's; one more.
        d.round_starts();
        flag.0.store(true, Ordering::Release);
        assert_eq!(d.after_round(true), Next::Round);
        d.round_starts();
        assert_eq!(d.after_round(true), Next::Pause(PauseRule::InSegmentOnly));
        d.stopped(PauseRule::InSegmentOnly);
        let o = d.outcome().unwrap();
        assert!(o.stopped_in_segment && !o.gave_up, "{o:?}");
        assert_eq!(o.extra_rounds, 3);
    }

    #[test]
    fn a_guest_that_left_between_decision_and_pause_is_held_back() {
        let (_flag, g) = guidance(true, Duration::from_secs(60));
        let mut d = StopDecision::new(Some(&g));
        d.round_starts();
        assert_eq!(d.after_round(true), Next::Pause(PauseRule::InSegmentOnly));
        d.held_back();
        d.round_starts();
        assert_eq!(d.after_round(true), Next::Pause(PauseRule::InSegmentOnly));
        d.stopped(PauseRule::InSegmentOnly);
        assert_eq!(d.outcome().unwrap().held_back, 1);
    }

    #[test]
    fn the_wait_is_bounded_and_a_stop_outside_says_so() {
        let (_flag, g) = guidance(false, Duration::from_millis(20));
        let mut d = StopDecision::new(Some(&g));
        // Each round waits at most 5 ms for a segment: the 20 ms run out within a few.
        let rule = (0..10_000)
            .find_map(|_| match d.after_round(true) {
                Next::Round => None,
                Next::Pause(rule) => Some(rule),
            })
            .expect("the wait never ran out");
        assert_eq!(rule, PauseRule::Anyway);
        d.stopped(rule);
        let o = d.outcome().unwrap();
        assert!(o.gave_up && !o.stopped_in_segment, "{o:?}");
        assert!(o.waited >= Duration::from_millis(20), "{o:?}");
    }

    #[test]
    fn an_unready_source_runs_rounds_whatever_the_guest_does() {
        let (_flag, g) = guidance(true, Duration::ZERO);
        let mut d = StopDecision::new(Some(&g));
        assert_eq!(d.after_round(false), Next::Round);
    }
}
