//! Link recovery for the destination's lanes: a lane that broke or went silent is reopened under
//! the same session (authenticated again) with backoff, for up to a recovery window, and the
//! reads that were in flight on it are asked again. The claims of those reads stay with the
//! destination throughout, so a page is still installed once; pages asked again are counted as
//! resent, apart from first sends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::{Reconnect, TransportError};

use crate::error::{FaultError, Result};

/// How a destination reopens its lanes.
#[derive(Clone, Debug)]
pub struct Recovery {
    pub reconnect: Arc<dyn Reconnect>,
    /// How long to keep trying; the lane's failure stands after it.
    pub window: Duration,
}

/// First wait between attempts; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

impl Recovery {
    /// Whether `error` is a broken or silent lane, which reopening may cure (not a protocol
    /// violation, a refusal or a corrupt page).
    pub fn cures(error: &FaultError) -> bool {
        matches!(
            error,
            FaultError::Lane(_)
                | FaultError::Transport(TransportError::PeerClosed | TransportError::Io(_) | TransportError::Silent(_))
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
        loop {
            match open(self.reconnect.as_ref()) {
                Ok(lane) => return Ok(lane),
                Err(e) if since.elapsed() + backoff > self.window || stop.load(Ordering::Acquire) => {
                    return Err(FaultError::Lane(format!("{why}; reconnecting for {:?} failed: {e}", since.elapsed())))
                }
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
