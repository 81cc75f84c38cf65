//! Link recovery for the destination's lanes: a lane that broke or went silent is reopened under
//! the same session (authenticated again) with backoff, for up to a recovery window, and the
//! reads that were in flight on it are asked again. The claims of those reads stay with the
//! destination throughout, so a page is still installed once; pages asked again are counted as
//! resent, apart from first sends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::{Interrupter, Lane, Reconnect, TransportError};

use crate::error::{FaultError, Result};

/// How a destination reopens its lanes.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// Reopens the lanes.
    pub reconnect: Arc<dyn Reconnect>,
    /// How long to keep trying; the lane's failure stands after it.
    pub window: Duration,
    /// Where a reopened lane's interrupter goes (the session breaks its reads when cancelled).
    pub interrupts: Option<Arc<LaneInterrupts>>,
}

/// The current urgent and bulk lanes' interrupters: [`LaneInterrupts::fire`] makes their blocked
/// reads fail at once. A reopened lane replaces its predecessor's (whose socket may then close).
#[derive(Default)]
pub struct LaneInterrupts(std::sync::Mutex<[Option<Interrupter>; 2]>);

impl std::fmt::Debug for LaneInterrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LaneInterrupts")
    }
}

impl LaneInterrupts {
    fn slot(lane: Lane) -> usize {
        usize::from(lane != Lane::Urgent)
    }

    /// The interrupter of the current `lane` (urgent or bulk).
    pub fn set(&self, lane: Lane, interrupter: Option<Interrupter>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[Self::slot(lane)] = interrupter;
    }

    /// Makes every blocked read on the current lanes fail at once.
    pub fn fire(&self) {
        let current = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for interrupt in current.iter().flatten() {
            interrupt();
        }
    }
}

/// First wait between attempts; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

impl Recovery {
    /// Records a reopened lane's interrupter.
    pub fn interrupts_on(&self, lane: Lane, interrupter: Option<Interrupter>) {
        if let Some(interrupts) = &self.interrupts {
            interrupts.set(lane, interrupter);
        }
    }

    /// Whether `error` is a broken or silent lane, which reopening may cure (not a protocol
    /// violation, a refusal or a corrupt page).
    pub fn cures(error: &FaultError) -> bool {
        matches!(
            error,
            FaultError::Lane(_)
                | FaultError::Transport(
                    TransportError::PeerClosed
                        | TransportError::Io(_)
                        | TransportError::Silent(_)
                        // A failed RDMA read: the queue pair broke (reopening one that cannot
                        // work fails, and the window ends it).
                        | TransportError::Rdma { .. }
                )
        )
    }

    /// Opens a lane with `open`, retrying with backoff until it works, the window has passed
    /// (the last error then), or `stop` is set.
    pub fn reopen<T>(
        &self,
        stop: &AtomicBool,
        why: &dyn std::fmt::Display,
        open: impl FnMut(&dyn Reconnect) -> ferry_transport::Result<T>,
    ) -> Result<T> {
        self.reopen_since(Instant::now(), stop, why, open)
    }

    /// [`Self::reopen`], with the window counted from `since` (when the lane last worked).
    pub fn reopen_since<T>(
        &self,
        since: Instant,
        stop: &AtomicBool,
        why: &dyn std::fmt::Display,
        mut open: impl FnMut(&dyn Reconnect) -> ferry_transport::Result<T>,
    ) -> Result<T> {
        let mut backoff = FIRST_BACKOFF;
        tracing::warn!(%why, "a lane broke: reopening it");
        loop {
            match open(self.reconnect.as_ref()) {
                Ok(lane) => {
                    tracing::info!(after = ?since.elapsed(), "lane reopened");
                    return Ok(lane);
                }
                Err(e) if since.elapsed() + backoff > self.window || stop.load(Ordering::Acquire) => {
                    tracing::error!(%why, error = %e, "giving up reopening a lane");
                    return Err(FaultError::Lane(format!("{why}; reconnecting for {:?} failed: {e}", since.elapsed())));
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?backoff, "reopening a lane failed, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
