//! `--mode ft`: a fault-tolerant pair (ferry's `ft` module) in the reference VMM. The source is
//! the primary: it gives the backup a first copy by pre-copy while its guest runs (the final
//! round pauses the vCPUs at the gate, and they go on here), then streams an epoch every
//! `--checkpoint-ms` for `--seconds`, holding the guest's output until the backup acknowledged
//! it, and stops protecting cleanly. The destination is the backup: it keeps the copy and applies
//! epochs; when the primary is lost (killed, or silent past the liveness timeout) it takes the
//! lease and resumes the guest from the last epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ferry::checkpoint::{CheckpointConfig, KeptImage};
use ferry::ft::{FtConfig, Primary};
use ferry_transport::{ControlStream, GuestMemory};
use serde_json::json;

use crate::protect::{self, VmCapture};
use crate::vm::{KvmDirtyLog, Vm};

/// Why a primary that stops protecting cleanly says so: its backup then does not take over.
const STOPPED: &str = "the primary stopped protection";

/// How long the first copy's final round may wait for every vCPU at the gate.
const GATE_TIMEOUT: Duration = Duration::from_secs(2);

fn config(checkpoint_ms: u64) -> FtConfig {
    FtConfig {
        checkpoints: CheckpointConfig { period: Duration::from_millis(checkpoint_ms), ..Default::default() },
        ..FtConfig::default()
    }
}

/// The primary's side of a pair, the same for each backup it protects the guest with.
#[derive(Clone, Copy)]
pub struct PrimarySide<'a> {
    pub vm: &'a Vm,
    pub memory: &'a Arc<GuestMemory>,
    /// Between epochs.
    pub checkpoint_ms: u64,
    /// Told when protection starts (a demo that kills the backup times it from then).
    pub protecting: Option<&'a std::sync::mpsc::Sender<Instant>>,
}

/// The primary, once a backup connected on `control` and the guest runs: the first copy, then
/// protection for what is `left` of the run's protected time (or less, if the backup is lost:
/// `left` keeps the rest for a backup made anew), then a clean stop. Fills `report` with what this
/// backup's term measured; the reason the backup was lost, if it was.
pub fn run_primary(
    primary: &PrimarySide<'_>,
    control: &mut dyn ControlStream,
    mut dirty: KvmDirtyLog,
    left: &mut Duration,
    report: &mut serde_json::Value,
) -> Result<Option<String>> {
    let PrimarySide { vm, memory, checkpoint_ms, protecting } = *primary;
    let started = Instant::now();
    let mut paused_for = Duration::ZERO;
    // Heartbeats both ways during the first copy too: a backup gone silent is an error, not a
    // primary waiting forever with its guest paused at the final round.
    let mut live = ferry::liveness::LiveControl::start(&*control, ferry::Liveness::default())?;
    let first = ferry::precopy::run_source(
        &mut live,
        u64::from(memory.layout().page_size()),
        &mut dirty,
        || {
            let at = Instant::now();
            let vcpus = vm
                .telemetry
                .gate
                .pause(vm.vcpu_count(), GATE_TIMEOUT)
                .map_err(|e| ferry::MigrationError::Vmm(e.to_string()))?;
            // From the copy's final state on, output waits for the epoch that captures it.
            vm.telemetry.output.hold();
            paused_for = at.elapsed();
            serde_json::to_vec(&vcpus).map_err(|e| ferry::MigrationError::Vmm(e.to_string()))
        },
        &ferry::precopy::PrecopyConfig::default(),
    );
    // The guest goes on here whatever became of the copy.
    vm.telemetry.gate.resume();
    drop(live);
    let first = first?;
    report["first_copy_ms"] = json!(started.elapsed().as_secs_f64() * 1e3);
    report["first_copy_rounds"] = json!(first.rounds);
    report["first_copy_pause_ms"] = json!(paused_for.as_secs_f64() * 1e3);
    let capture = VmCapture::new(vm.telemetry.clone(), vm.vcpu_count(), dirty);
    let primary = Primary::start(&*control, memory.clone(), Box::new(capture), &config(checkpoint_ms))?;
    let protected_at = Instant::now();
    let progress_at_start = vm.telemetry.progress.load(Ordering::Relaxed);
    if let Some(protecting) = protecting {
        let _ = protecting.send(protected_at);
    }
    let until = protected_at + *left;
    while Instant::now() < until && primary.backup_lost().is_none() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lost = primary.backup_lost();
    // Ending cleanly, the pair compares whole memories once: the backup learns whether its copy
    // is the guest's.
    let (stats, capture) = match lost {
        None => primary.stop_verified(),
        Some(_) => primary.stop(),
    };
    // No backup to wait for any more (it is gone, or protection ends): what is held leaves now.
    // This side holds the lease, so it is the one live copy.
    if let Some(mut capture) = capture {
        capture.committed(u64::MAX);
    }
    if lost.is_none() {
        ferry::handoff::send_abort(control, STOPPED);
    }
    *left = left.saturating_sub(protected_at.elapsed());
    let protected_s = protected_at.elapsed().as_secs_f64();
    report["protected_ms"] = json!(protected_s * 1e3);
    // The guest's own rate while protected, epochs' pauses and all.
    let progress = vm.telemetry.progress.load(Ordering::Relaxed) - progress_at_start;
    report["rate_protected"] = json!(progress as f64 / protected_s.max(1e-9));
    report["log_mib_per_s"] = json!(stats.bytes as f64 / f64::from(1 << 20) / protected_s.max(1e-9));
    report["epoch_pauses_ms"] = json!(stats.pauses.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>());
    report["backup_lost"] = json!(lost);
    report["checkpoints"] = json!(stats.committed);
    report["checkpoints_failed"] = json!(stats.failed);
    report["checkpoint_pages"] = json!(stats.pages);
    report["checkpoint_pause_ms"] = json!(stats.paused.as_secs_f64() * 1e3);
    report["checkpoint_longest_pause_ms"] = json!(stats.longest_pause.as_secs_f64() * 1e3);
    report["copy_digest_sent"] = json!(stats.verify_sent);
    Ok(lost)
}

/// Sums what each backup's term measured (`terms`, in order) into `report`: the first copy is the
/// first term's, counts add up, the longest pause is the longest of all.
pub fn summarize_terms(report: &mut serde_json::Value, mut terms: Vec<serde_json::Value>) {
    let sum = |k: &str| terms.iter().filter_map(|t| t[k].as_f64()).sum::<f64>();
    for k in ["first_copy_ms", "first_copy_rounds", "first_copy_pause_ms"] {
        report[k] = terms.first().map(|t| t[k].clone()).unwrap_or_default();
    }
    for k in ["protected_ms", "checkpoint_pause_ms"] {
        report[k] = json!(sum(k));
    }
    for k in ["checkpoints", "checkpoints_failed", "checkpoint_pages"] {
        report[k] = json!(terms.iter().filter_map(|t| t[k].as_u64()).sum::<u64>());
    }
    report["checkpoint_longest_pause_ms"] =
        json!(terms.iter().filter_map(|t| t["checkpoint_longest_pause_ms"].as_f64()).fold(0.0, f64::max));
    let mut pauses: Vec<f64> = terms
        .iter()
        .flat_map(|t| t["epoch_pauses_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    pauses.sort_by(f64::total_cmp);
    let quantile = |q: f64| pauses.get(((pauses.len() as f64 - 1.0) * q).round() as usize).copied();
    report["epochs"] = report["checkpoints"].clone();
    report["epoch_pause_p50_ms"] = json!(quantile(0.5));
    report["epoch_pause_p99_ms"] = json!(quantile(0.99));
    let protected_s = sum("protected_ms") / 1e3;
    let weighted = |k: &str| {
        terms.iter().filter_map(|t| Some(t[k].as_f64()? * t["protected_ms"].as_f64()? / 1e3)).sum::<f64>()
            / protected_s.max(1e-9)
    };
    report["rate_protected"] = json!(weighted("rate_protected"));
    report["log_mib_per_s"] = json!(weighted("log_mib_per_s"));
    for t in terms.iter_mut() {
        // One by one they served the quantiles; the report keeps what a reader wants.
        if let Some(t) = t.as_object_mut() {
            t.remove("epoch_pauses_ms");
        }
    }
    report["backup_lost"] = terms.last().map(|t| t["backup_lost"].clone()).unwrap_or_default();
    report["backups"] = json!(terms.len());
    report["backup_recreated"] = json!(terms.len() > 1);
    report["backup_terms"] = json!(terms);
}

/// What the backup did.
pub struct BackupOutcome {
    /// The guest now runs here (the primary was lost and the lease taken).
    pub running: Option<crate::vm::Running>,
    /// Held while the guest runs here.
    pub lease: Option<ferry::arbiter::LeaseKeeper>,
    pub report: serde_json::Value,
}

/// The backup: pulls the first copy into `memory`, then follows the primary's epochs until it is
/// lost; then, holding the lease, resumes the guest in `vm` from the last epoch. `copied` is told
/// when the first copy is complete.
pub fn run_backup(
    vm: &mut Vm,
    memory: &Arc<GuestMemory>,
    control: &mut dyn ControlStream,
    lanes: ferry_transport::PageSource,
    terms: &ferry::arbiter::LeaseTerms,
    copied: Option<&std::sync::mpsc::Sender<Instant>>,
) -> Result<BackupOutcome> {
    let mut first_state = None;
    let mut live = ferry::liveness::LiveControl::start(&*control, ferry::Liveness::default())?;
    ferry::precopy::run_destination(&mut live, memory, lanes, |state| {
        first_state = Some(state.to_vec());
        Ok(())
    })?;
    drop(live);
    let first_state = first_state.ok_or_else(|| anyhow!("the first copy ended without the guest's state"))?;
    if let Some(copied) = copied {
        let _ = copied.send(Instant::now());
    }
    let kept = KeptImage::new(memory.clone());
    let end = ferry::ft::run_backup(control, &kept, ferry::Liveness::default(), &AtomicBool::new(false))?;
    let mut report = json!({
        "epochs_applied": end.epochs,
        "epoch_pages_applied": end.pages,
        "primary_lost": end.why,
        "copy_verified": end.verified,
        "copy_differing_chunks": end.differing_chunks,
    });
    if end.why.contains(STOPPED) {
        report["took_over"] = json!(false);
        return Ok(BackupOutcome { running: None, lease: None, report });
    }
    let lost_at = Instant::now();
    // The primary's lease runs out (or it gave it up): only then may the guest run here.
    let lease = ferry::arbiter::LeaseKeeper::acquire(terms, terms.ttl * 3, {
        let telemetry = vm.telemetry.clone();
        move || telemetry.stop.store(true, Ordering::Release)
    })
    .context("taking the lease over")?;
    let epoch = protect::restart(vm, &kept, &first_state)?;
    let running = vm.start()?;
    report["took_over"] = json!(true);
    report["takeover_epoch"] = json!(epoch);
    report["lease_wait_ms"] = json!(lost_at.elapsed().as_secs_f64() * 1e3);
    if let Some(at) = end.last_applied_at {
        // The guest's work since the epoch it resumed from was done at the primary and lost.
        report["work_lost_ms"] = json!(at.elapsed().as_secs_f64() * 1e3);
    }
    Ok(BackupOutcome { running: Some(running), lease: Some(lease), report })
}
