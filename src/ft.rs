//! Fault-tolerant VMs: a primary runs the guest and streams epoch checkpoints to a backup that
//! can take over at any moment with nothing the outside world saw lost or repeated. VMware FT's
//! design (Scales et al., 2010: a logging channel, output commit, heartbeats, an atomic
//! test-and-set so one side goes live), with Remus's epochs (Cully et al., NSDI'08) on the logging
//! channel instead of deterministic replay, which KVM does not offer.
//!
//! Built from the session parts every mode shares: the backup's first copy is a pre-copy that
//! does not switch over ([`crate::precopy::run_source`] with the primary resuming its own guest
//! after the final round, and [`crate::precopy::run_destination`] keeping the state instead of
//! resuming); then the [`crate::checkpoint`] stream carries epochs (the primary's
//! [`Checkpointer`], the backup's [`KeptImage`]), [`crate::liveness`] watches both ways, and the
//! [`crate::arbiter`] lease decides who runs: the primary holds it while it runs, the backup takes
//! it over only once the primary let it go or it expired, and only then resumes the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::{ControlStream, TransportError};

use crate::checkpoint::{
    self, CheckpointCapture, CheckpointConfig, CheckpointLane, CheckpointStats, Checkpointer, GuestView, KeptImage,
};
use crate::error::{MigrationError, Result};
use crate::liveness::{LiveControl, LiveWriter, Liveness};

/// How a pair runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FtConfig {
    /// Heartbeats between primary and backup.
    pub liveness: Liveness,
    /// Epoch length (`period`, 10-100 ms is Remus's range) and how long an epoch waits for its ack.
    pub checkpoints: CheckpointConfig,
}

/// The logging channel as the primary's checkpointer writes to it.
struct Channel(LiveWriter);

impl CheckpointLane for Channel {
    fn send(&self, _on: u64, msg: &[u8]) -> Result<()> {
        self.0.write(msg)
    }
}

/// A primary protected by a live backup: its epochs stream to the backup, whose acks release the
/// guest's output; a thread watches the backup's heartbeats and acks.
pub struct Primary {
    checkpointer: Option<Checkpointer>,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
    watch: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary").field("lost", &self.backup_lost()).finish_non_exhaustive()
    }
}

impl Primary {
    /// Starts streaming epochs over `control`, a lane to a backup that holds the guest's first
    /// copy (see the module doc): every `config.checkpoints.period` the guest pauses for a
    /// capture, resumes, and the epoch goes to the backup; output waits for its ack.
    pub fn start(
        control: &dyn ControlStream,
        memory: Arc<dyn GuestView>,
        capture: Box<dyn CheckpointCapture>,
        config: &FtConfig,
    ) -> Result<Self> {
        let mut live = LiveControl::start(control, config.liveness)?;
        let lane = Arc::new(Channel(live.writer()));
        let checkpointer = Checkpointer::start(memory, capture, lane, config.checkpoints)?;
        let acks = checkpointer.handle();
        let (stop, lost) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None)));
        let watch = {
            let (stop, lost) = (stop.clone(), lost.clone());
            std::thread::Builder::new()
                .name("ferry-ft-backup-watch".into())
                .spawn(move || {
                    let mut last_heard = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        let why = match live.poll(Duration::from_millis(50), &mut last_heard) {
                            Ok(None) => continue,
                            Ok(Some(msg)) => match checkpoint::ack_epoch(&msg) {
                                Some(epoch) => {
                                    acks.acked(epoch);
                                    continue;
                                }
                                None => match crate::handoff::abort_reason(&msg) {
                                    Some(why) => format!("the backup aborted: {why}"),
                                    None => "the backup sent something that is not an ack".into(),
                                },
                            },
                            Err(e) => format!("the backup: {e}"),
                        };
                        *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                        return;
                    }
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the backup watch: {e}")))?
        };
        Ok(Primary { checkpointer: Some(checkpointer), stop, lost, watch: Some(watch) })
    }

    /// Why the backup was lost (silent past the liveness timeout, gone, or misbehaving), if it
    /// was: the guest then runs unprotected until a new backup is made.
    pub fn backup_lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops streaming: what the checkpointer measured and the capture back (to release the
    /// output it holds once no backup is left to wait for, or to protect the guest again).
    pub fn stop(mut self) -> (CheckpointStats, Option<Box<dyn CheckpointCapture>>) {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
        self.checkpointer.take().map(Checkpointer::stop).unwrap_or_default()
    }

    /// Stops streaming after one last epoch and a comparison of the whole memories (see
    /// [`Checkpointer::stop_verified`]): the backup learns whether its copy is the guest's.
    pub fn stop_verified(mut self) -> (CheckpointStats, Option<Box<dyn CheckpointCapture>>) {
        // The backup watch still delivers the last epoch's ack.
        let out = self.checkpointer.take().map(Checkpointer::stop_verified).unwrap_or_default();
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
        out
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
    }
}

/// What a backup saw before it stopped following.
#[derive(Clone, Debug)]
pub struct BackupEnd {
    /// Why: the primary went silent, closed the channel, or sent something wrong.
    pub why: String,
    /// Epochs applied, and their pages.
    pub epochs: u64,
    /// Pages they wrote.
    pub pages: u64,
    /// The last epoch applied, and when: a takeover resumes from it.
    pub last_epoch: Option<u64>,
    /// When the last epoch was applied.
    pub last_applied_at: Option<Instant>,
    /// Whether the copy equalled the primary's guest at its final epoch (a verified stop);
    /// `None` when the primary did not stop that way.
    pub verified: Option<bool>,
    /// Where it differed, if it did ([`KeptImage::differing_chunks`]).
    pub differing_chunks: Vec<usize>,
}

/// The backup's side: applies the primary's epochs to `kept` (the guest's copy, already holding
/// the first) whole, acks each, and returns when the primary is lost (silent for the liveness
/// timeout, or gone). The caller then takes the lease and, holding it, resumes the guest from
/// `kept` ([`KeptImage::restart_state`]). `stop` ends it early with `why` "stopped".
pub fn run_backup(
    control: &dyn ControlStream,
    kept: &KeptImage,
    liveness: Liveness,
    stop: &AtomicBool,
) -> Result<BackupEnd> {
    let mut live = LiveControl::start(control, liveness)?;
    let mut last_heard = Instant::now();
    let why = loop {
        if stop.load(Ordering::Acquire) {
            break "stopped".to_string();
        }
        match live.poll(Duration::from_millis(50), &mut last_heard) {
            Ok(None) => {}
            Ok(Some(msg)) if checkpoint::is_checkpoint_message(&msg) => {
                // A bad epoch is the primary's failure, not ours: we keep the last good one.
                match kept.accept(&msg) {
                    Ok(Some(epoch)) => {
                        // A lost ack costs the primary a resend, not a checkpoint.
                        let _ = live.write(&checkpoint::ack_message(epoch));
                    }
                    Ok(None) => {}
                    Err(e) => break format!("the primary sent a bad epoch: {e}"),
                }
            }
            Ok(Some(msg)) => match crate::handoff::abort_reason(&msg) {
                Some(why) => break format!("the primary aborted: {why}"),
                None => break "the primary sent something that is not an epoch".to_string(),
            },
            Err(MigrationError::Transport(TransportError::Silent(why))) => {
                break format!("the primary went silent: {why}")
            }
            Err(e) => break format!("the primary: {e}"),
        }
    };
    let (epochs, pages) = kept.applied();
    Ok(BackupEnd {
        why,
        epochs,
        pages,
        last_epoch: kept.last_epoch(),
        last_applied_at: kept.last_applied_at(),
        verified: kept.verified(),
        differing_chunks: kept.differing_chunks().unwrap_or_default(),
    })
}
