//! Pre-copy with options: task-guided stop-and-copy (the VMM says whether its guest is inside a
//! segment it marked as cheap to stop) and back-and-forth (the destination kept the image this
//! guest left there; only what changed since moves). Both ends of such a migration use these
//! calls: `ferry_source_precopy_with` pairs with `ferry_precopy_receive_with` (the plain calls
//! pair with each other), because the two exchange what the image they hold is before the rounds.
//!
//! Keeping an image is the VMM's part: after its guest left (ferry_source_precopy_with returned
//! FERRY_STATUS_OK and the vCPUs stay stopped for good) it keeps the regions mapped and unwritten,
//! and remembers the image's identity (the VM's id, and the generation: how many migrations the
//! VM had made when it left). When the guest comes back, its source names that identity as its
//! base and the destination names the image it kept; ferry checks them (and a sample of page
//! checksums) and moves only the pages the guest changed since, or refuses with the reason and
//! moves everything into the same regions.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use ferry::backforth::{self, Arrival, BaseVerdict, ChangeTracker, ImageIdentity, RetainedImage};
use ferry::precopy::{DirtyLog, PrecopyConfig, PrecopyReport};
use ferry::taskguided::{PauseRule, Paused, TaskGuidance, TaskSegments};
use ferry::MigrationError;

use crate::*;

/// Which image: a VM's id (1 to 64 bytes, NUL-terminated) and its generation.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryImageId {
    /// The VM's id, the same on every host.
    pub vm_id: *const c_char,
    /// Migrations the VM had made when the image was left.
    pub generation: u64,
}

/// Returns 1 while the guest is inside a segment it marked as cheap to stop, 0 outside.
/// Called from the thread inside ferry_source_precopy_with, between rounds.
pub type FerryInSegmentFn = Option<unsafe extern "C" fn(user: *mut c_void) -> i32>;

/// Stops the guest's vCPUs. With `anyway` 0 (task-guided) the guest must be inside a marked
/// segment once its vCPUs have stopped: if it is not, the callback lets it run on and returns 1
/// (another round follows). Otherwise it points `*state`/`*len` at the guest's state blob, valid
/// until ferry_source_precopy_with returns, and returns 0. Anything else aborts.
pub type FerryGuidedPauseFn =
    Option<unsafe extern "C" fn(anyway: u32, state: *mut *const u8, len: *mut usize, user: *mut c_void) -> i32>;

/// What ferry_source_precopy_with does besides plain pre-copy.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryPrecopyOptions {
    /// Stop once the predicted downtime is at most this.
    pub downtime_target_ms: u32,
    /// Stop after this many rounds whatever the prediction (at least 1).
    pub max_rounds: u32,
    /// How long to wait for the destination to connect.
    pub timeout_ms: u32,
    /// Task-guided: how long past the first moment it could stop the source waits for a segment
    /// (then it stops anyway, and the outcome says so).
    pub task_max_wait_ms: u32,
    /// Task-guided when not null.
    pub in_segment: FerryInSegmentFn,
    /// The image this guest arrived on (kept by the host it goes back to), or null.
    pub base: *const FerryImageId,
}

/// How a migration with options went (ferry_source_precopy_with, ferry_precopy_receive_with,
/// ferry_source_offer_base, ferry_destination_connect_with). Fields a call does not know stay 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryOutcome {
    /// Rounds before the final one (source).
    pub rounds: u32,
    /// 1: the destination's kept image served as the base and only changed pages moved.
    pub kept_image_used: u8,
    /// Task-guided (source): 1 when the guest stopped inside a segment; 1 in task_gave_up when
    /// the wait ran out and it was stopped outside.
    pub stopped_in_segment: u8,
    /// See `stopped_in_segment`.
    pub task_gave_up: u8,
    /// Zero.
    pub reserved: u8,
    /// Pauses held back because the guest had left its segment.
    pub task_held_back: u32,
    /// Rounds run after the source could first have stopped.
    pub task_extra_rounds: u32,
    /// From the first moment the source could have stopped to the pause.
    pub task_wait_us: u64,
    /// Why a kept image was refused (NUL-terminated, empty when it was not).
    pub refused: [c_char; 256],
}

impl Default for FerryOutcome {
    fn default() -> Self {
        FerryOutcome {
            rounds: 0,
            kept_image_used: 0,
            stopped_in_segment: 0,
            task_gave_up: 0,
            reserved: 0,
            task_held_back: 0,
            task_extra_rounds: 0,
            task_wait_us: 0,
            refused: [0; 256],
        }
    }
}

impl FerryOutcome {
    pub(crate) fn set_refused(&mut self, why: &str) {
        let n = why.len().min(self.refused.len() - 1);
        for (dst, &src) in self.refused.iter_mut().zip(&why.as_bytes()[..n]) {
            *dst = src as c_char;
        }
        self.refused[n] = 0;
    }
}

/// The VMM's in-segment callback as ferry's policy input.
struct CallbackSegments {
    in_segment: unsafe extern "C" fn(*mut c_void) -> i32,
    user: *mut c_void,
}

// SAFETY: ferry calls the callback only on the thread inside ferry_source_precopy_with, while that
// call runs (the guidance holding it is dropped before the call returns); `user` is valid there by
// that function's contract.
unsafe impl Send for CallbackSegments {}
// SAFETY: as for Send: never called from two threads.
unsafe impl Sync for CallbackSegments {}

impl TaskSegments for CallbackSegments {
    fn in_segment(&self) -> bool {
        // SAFETY: the VMM's callback with its own `user` (see the Send impl).
        unsafe { (self.in_segment)(self.user) != 0 }
    }
}

/// Pre-copy from a running guest, with the options in `options` (see FerryPrecopyOptions): waits
/// for a destination that called ferry_precopy_receive_with, tells it which image this guest
/// arrived on (if any) and learns whether it kept that image; then rounds as ferry_source_precopy
/// (only the changed pages in round 0 when the kept image serves), stopping inside a task segment
/// when task-guided. `stats` and `outcome` may be null. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; the callbacks are valid functions; `user` is passed through;
/// `options` is readable, its `base` null or readable with a NUL-terminated `vm_id`; `stats` and
/// `outcome` are null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_precopy_with(
    source: *mut FerrySource,
    dirty_log: FerryDirtyLogFn,
    pause: FerryGuidedPauseFn,
    user: *mut c_void,
    options: *const FerryPrecopyOptions,
    stats: *mut FerryStats,
    outcome: *mut FerryOutcome,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null; options null or readable.
        let (source, options) = unsafe { (source.as_ref(), options.as_ref()) };
        let source = source.ok_or_else(|| invalid("source is null"))?;
        let options = options.ok_or_else(|| invalid("options is null"))?;
        let collect = dirty_log.ok_or_else(|| invalid("dirty_log is null"))?;
        let pause = pause.ok_or_else(|| invalid("pause is null"))?;
        // SAFETY: caller contract on `base`.
        let base = unsafe { image_id_arg(options.base, "options.base")? };
        let mut config = PrecopyConfig {
            downtime_target: Duration::from_millis(u64::from(options.downtime_target_ms)),
            max_rounds: options.max_rounds.max(1),
            task: options.in_segment.map(|in_segment| TaskGuidance {
                segments: Arc::new(CallbackSegments { in_segment, user }),
                max_wait: Duration::from_millis(u64::from(options.task_max_wait_ms)),
            }),
            ..Default::default()
        };
        source.check_no_offer()?;
        let mut control = source.connected(options.timeout_ms)?;
        let pause_guest = |rule: PauseRule| -> ferry::Result<Paused> {
            let (mut state, mut len): (*const u8, usize) = (std::ptr::null(), 0);
            let anyway = u32::from(rule == PauseRule::Anyway);
            // SAFETY: the VMM's callback writes the two out-parameters, which live across the call.
            match unsafe { pause(anyway, &mut state, &mut len, user) } {
                // SAFETY: the callback promises `len` readable bytes at `state` until we return.
                0 => unsafe { state_blob(state, len) }.map(Paused::Stopped),
                1 => Ok(Paused::LeftSegment),
                rc => Err(MigrationError::Vmm(format!("the pause callback returned {rc}"))),
            }
        };
        let log = CallbackDirtyLog::new(collect, user, source.pages);
        source.begin_migration()?;
        let mut done = FerryOutcome::default();
        let report = match base {
            Some(base) => {
                let mut tracker = ChangeTracker::start(base, log, source.pages).map_err(migration)?;
                let offer = tracker.offer(&source.memory, backforth::DEFAULT_SAMPLES).map_err(migration)?;
                match backforth::propose(control.as_mut(), Some(&offer)).map_err(migration)? {
                    BaseVerdict::Accepted => {
                        done.kept_image_used = 1;
                        config.base = Some(tracker.changed().clone());
                    }
                    BaseVerdict::Refused(why) => done.set_refused(&why),
                }
                rounds(source, control.as_mut(), &mut tracker, pause_guest, &config)?
            }
            None => {
                if let BaseVerdict::Refused(why) = backforth::propose(control.as_mut(), None).map_err(migration)? {
                    done.set_refused(&why);
                }
                let mut log = log;
                rounds(source, control.as_mut(), &mut log, pause_guest, &config)?
            }
        };
        done.rounds = report.rounds;
        if let Some(task) = &report.task {
            done.stopped_in_segment = u8::from(task.stopped_in_segment);
            done.task_gave_up = u8::from(task.gave_up);
            done.task_held_back = task.held_back;
            done.task_extra_rounds = task.extra_rounds;
            done.task_wait_us = micros(task.waited);
        }
        // SAFETY: caller contract: null or writable.
        unsafe {
            if let Some(stats) = stats.as_mut() {
                *stats = precopy_stats(source.pages, &report);
            }
            if let Some(outcome) = outcome.as_mut() {
                *outcome = done;
            }
        }
        Ok(())
    })
}

fn rounds(
    source: &FerrySource,
    control: &mut dyn ferry::transport::ControlStream,
    log: &mut dyn DirtyLog,
    pause: impl FnMut(PauseRule) -> ferry::Result<Paused>,
    config: &PrecopyConfig,
) -> Result<PrecopyReport, (FerryStatus, String)> {
    ferry::precopy::run_source_guided(control, source.page_size, log, pause, config).map_err(migration)
}

/// The destination of a ferry_source_precopy_with migration: as ferry_precopy_receive, into the
/// guest memory in `regions`; with `kept` (may be null) naming the image those regions hold, left
/// by this guest when it went away from here. If the source's base is that image and the sampled
/// pages match, only the pages the guest changed since are pulled; otherwise (the reason goes to
/// `outcome.refused`) every page is, overwriting the regions. `outcome` may be null.
/// Thread safety: any thread.
///
/// # Safety
/// As ferry_precopy_receive; `kept` is null or readable with a NUL-terminated `vm_id`; `outcome`
/// is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_precopy_receive_with(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    addr: *const c_char,
    key: *const u8,
    key_len: usize,
    kept: *const FerryImageId,
    resume: FerryResumeFn,
    user: *mut c_void,
    outcome: *mut FerryOutcome,
) -> FerryStatus {
    guard(|| {
        let resume = resume.ok_or_else(|| invalid("resume is null"))?;
        // SAFETY: forwarded caller contracts.
        let (regions, key, addr, kept) = unsafe {
            (
                regions_arg(regions, region_count)?,
                key_arg(key, key_len)?,
                str_arg(addr, "addr")?,
                image_id_arg(kept, "kept")?,
            )
        };
        // SAFETY: forwarded caller contract on the mappings.
        let guest = Arc::new(unsafe { adopt(regions, page_size)? });
        let layout = guest.layout().clone();
        let (lanes, mut control) = connect_session(addr, &key, &layout, None)?;
        let image = kept.map(|identity| RetainedImage::keep(guest.clone(), identity));
        let mut done = FerryOutcome::default();
        // Refused, the rounds start with every page: the regions are overwritten whole.
        match backforth::answer(control.as_mut(), image, &layout).map_err(migration)? {
            Arrival::Onto { .. } => done.kept_image_used = 1,
            Arrival::Full { refused, .. } => done.set_refused(refused.as_deref().unwrap_or("")),
        }
        ferry::precopy::run_destination(control.as_mut(), &guest, lanes, |state| {
            // SAFETY: `resume` is the caller's function (this function's contract).
            unsafe { call_resume(resume, state, user) }
        })
        .map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(outcome) = unsafe { outcome.as_mut() } {
            *outcome = done;
        }
        Ok(())
    })
}

/// # Safety
/// `id` is null or points to a readable FerryImageId whose `vm_id` is null or NUL-terminated.
pub(crate) unsafe fn image_id_arg(
    id: *const FerryImageId,
    what: &str,
) -> Result<Option<ImageIdentity>, (FerryStatus, String)> {
    // SAFETY: caller contract.
    let Some(id) = (unsafe { id.as_ref() }) else { return Ok(None) };
    // SAFETY: caller contract on vm_id.
    let vm_id = unsafe { str_arg(id.vm_id, &format!("{what}.vm_id"))? };
    ImageIdentity::new(vm_id, id.generation).map(Some).map_err(|e| invalid(format!("{what}: {e}")))
}
