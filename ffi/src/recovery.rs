//! Post-copy that survives its destination, through the C ABI: recovery settings (heartbeats,
//! the silence timeout, the recovery window, the lease), the destination's checkpoint callbacks
//! (a consistent capture: pause, dirty log, resume; output release; halt), and the source's
//! restart from the image it kept.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use ferry::arbiter::{LeaseFile, LeaseKeeper, LeaseTerms};
use ferry::checkpoint::{CheckpointCapture, CheckpointConfig, KeptImage};
use ferry::{FreePages, Liveness, Protection};

use crate::*;

/// How a protected post-copy watches its peer and who may run the guest. Zero fields take the
/// defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryRecovery {
    /// Between heartbeats (0: 250 ms).
    pub heartbeat_ms: u32,
    /// Silence after which the peer counts as gone (0: 3000 ms); more than heartbeat_ms.
    pub silence_timeout_ms: u32,
    /// How long a broken or silent lane may take to come back, counted from when it last worked
    /// (0: 10000 ms). Past it the session fails: the destination halts its guest and the source
    /// may restart it.
    pub recovery_window_ms: u32,
    /// A lease file on storage both hosts see, NUL-terminated; null: no lease (nothing then stops
    /// a partitioned destination that lives on from running while the source restarts).
    pub lease_path: *const c_char,
    /// This side's name in the lease: NUL-terminated, 1-256 bytes, no spaces. Needed with
    /// lease_path.
    pub lease_holder: *const c_char,
    /// How long one acquisition or renewal holds (0: 2000 ms).
    pub lease_ttl_ms: u32,
}

/// The settings, checked, in ferry's terms.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) liveness: Liveness,
    pub(crate) recovery_window: Duration,
    pub(crate) lease: Option<LeaseTerms>,
}

fn or(ms: u32, default_ms: u64) -> Duration {
    Duration::from_millis(if ms == 0 { default_ms } else { u64::from(ms) })
}

/// # Safety
/// `settings` is null or points to a FerryRecovery whose strings are null or NUL-terminated.
pub(crate) unsafe fn settings_arg(settings: *const FerryRecovery) -> Result<Settings, (FerryStatus, String)> {
    // SAFETY: caller contract: null or a valid FerryRecovery.
    let s = unsafe { settings.as_ref() }.ok_or_else(|| invalid("settings is null"))?;
    let liveness =
        Liveness { interval: or(s.heartbeat_ms, 250), timeout: or(s.silence_timeout_ms, 3000), ..Liveness::default() };
    if liveness.timeout <= liveness.interval {
        return Err(invalid("silence_timeout_ms must exceed heartbeat_ms"));
    }
    let lease = match (s.lease_path.is_null(), s.lease_holder.is_null()) {
        (true, _) => None,
        (false, true) => return Err(invalid("lease_holder is null (needed with lease_path)")),
        (false, false) => {
            // SAFETY: caller contract: NUL-terminated strings.
            let (path, holder) =
                unsafe { (str_arg(s.lease_path, "lease_path")?, str_arg(s.lease_holder, "lease_holder")?) };
            ferry::arbiter::check_holder(holder).map_err(|e| invalid(format!("lease_holder: {e}")))?;
            Some(LeaseTerms {
                arbiter: Arc::new(LeaseFile::new(path, Duration::ZERO)),
                holder: holder.into(),
                ttl: or(s.lease_ttl_ms, 2000),
                clock_skew: Duration::ZERO,
            })
        }
    };
    Ok(Settings { liveness, recovery_window: or(s.recovery_window_ms, 10_000), lease })
}

/// Stops every vCPU (returning once none runs) and points `*state`/`*len` at the state blob the
/// guest would resume from (device state, held output among it), valid until the resume
/// callback; output emitted until now belongs to checkpoint `epoch`. Returns 0; anything else
/// skips this checkpoint (the vCPUs must then run as before).
pub type FerryCheckpointPauseFn =
    Option<unsafe extern "C" fn(epoch: u64, state: *mut *const u8, len: *mut usize, user: *mut c_void) -> i32>;
/// Lets the vCPUs run again after a pause; returns 0 (anything else ends checkpointing).
pub type FerryCheckpointResumeFn = Option<unsafe extern "C" fn(user: *mut c_void) -> i32>;
/// Checkpoint `epoch` is safe at the source: output the guest emitted before its pause may leave.
/// UINT64_MAX: the migration completed; everything held may leave and need not be held again.
pub type FerryCommittedFn = Option<unsafe extern "C" fn(epoch: u64, user: *mut c_void)>;
/// The session failed (or the lease was lost): stop the guest for good, without waiting on a
/// vCPU (one may be blocked on a page that will never come), and drop the output it holds.
pub type FerryHaltFn = Option<unsafe extern "C" fn(user: *mut c_void)>;

/// A destination's reverse checkpoints: the VMM's side of a consistent capture. Every callback is
/// called from ferry's threads (halt possibly concurrently with the others).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerryCheckpointer {
    /// Between checkpoints (0: 100 ms).
    pub period_ms: u32,
    /// Stops every vCPU and fills the state blob (see FerryCheckpointPauseFn).
    pub pause: FerryCheckpointPauseFn,
    /// Pages the guest wrote since the previous call (the first: since it resumed), as for
    /// ferry_source_precopy; pages it discarded count as written.
    pub dirty_log: FerryDirtyLogFn,
    /// Lets the vCPUs run again.
    pub resume: FerryCheckpointResumeFn,
    /// An epoch is safe: output produced before its pause may leave.
    pub committed: FerryCommittedFn,
    /// This side must stop running the guest for good (the other side may take it).
    pub halt: FerryHaltFn,
}

/// The caller's `user` pointer, which its callbacks accept from any thread (this module's
/// contract with the caller).
#[derive(Clone, Copy)]
struct User(*mut c_void);
// SAFETY: ferry_destination_protect's contract: the callbacks may be called from any thread with
// this pointer.
unsafe impl Send for User {}
// SAFETY: as above.
unsafe impl Sync for User {}

struct CallbackCapture {
    callbacks: FerryCheckpointer,
    pause: unsafe extern "C" fn(u64, *mut *const u8, *mut usize, *mut c_void) -> i32,
    resume: unsafe extern "C" fn(*mut c_void) -> i32,
    dirty: crate::source::CallbackDirtyLog,
    user: User,
}

// SAFETY: see `User`; the function pointers are plain code addresses.
unsafe impl Send for CallbackCapture {}

impl CheckpointCapture for CallbackCapture {
    fn pause(&mut self, epoch: u64) -> Result<Vec<u8>, String> {
        let (mut state, mut len): (*const u8, usize) = (std::ptr::null(), 0);
        // SAFETY: the caller's callback (ferry_destination_protect's contract), given writable
        // out-parameters.
        let rc = unsafe { (self.pause)(epoch, &mut state, &mut len, self.user.0) };
        if rc != 0 {
            return Err(format!("the pause callback returned {rc}"));
        }
        // SAFETY: the callback's contract: `len` bytes at `state`, valid until resume.
        unsafe { bytes_arg(state, len, "the paused state") }.map(<[u8]>::to_vec).map_err(|(_, why)| why)
    }

    fn dirty(&mut self) -> Result<FreePages, String> {
        use ferry::precopy::DirtyLog;
        self.dirty.collect().map_err(|e| e.to_string())
    }

    fn resume(&mut self) -> Result<(), String> {
        // SAFETY: the caller's callback.
        match unsafe { (self.resume)(self.user.0) } {
            0 => Ok(()),
            rc => Err(format!("the resume callback returned {rc}")),
        }
    }

    fn committed(&mut self, epoch: u64) {
        if let Some(committed) = self.callbacks.committed {
            // SAFETY: the caller's callback.
            unsafe { committed(epoch, self.user.0) };
        }
    }
}

/// Where a restart resumes: a state blob the source handle keeps, and its checkpoint (0: none).
pub(crate) struct Restart {
    pub(crate) state: *const u8,
    pub(crate) len: usize,
    pub(crate) epoch: u64,
}

/// What ferry_destination_protect stored, turned into ferry's protection at start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DestinationProtection {
    callbacks: FerryCheckpointer,
    user: *mut c_void,
}

// SAFETY: see `User`.
unsafe impl Send for DestinationProtection {}

impl DestinationProtection {
    pub(crate) fn protection(&self, settings: &Settings, pages: u64) -> Result<Protection, (FerryStatus, String)> {
        let c = self.callbacks;
        let missing = |what: &str| invalid(format!("the checkpointer's {what} callback is null"));
        let user = User(self.user);
        let halt = c.halt.ok_or_else(|| missing("halt"))?;
        Ok(Protection {
            capture: Box::new(CallbackCapture {
                callbacks: c,
                pause: c.pause.ok_or_else(|| missing("pause"))?,
                resume: c.resume.ok_or_else(|| missing("resume"))?,
                dirty: crate::source::CallbackDirtyLog::new(
                    c.dirty_log.ok_or_else(|| missing("dirty_log"))?,
                    user.0,
                    pages,
                ),
                user,
            }),
            checkpoints: CheckpointConfig { period: or(c.period_ms, 100), ..CheckpointConfig::default() },
            lease: settings.lease.clone(),
            halt: Box::new(move || {
                let user = user;
                // SAFETY: the caller's callback.
                unsafe { halt(user.0) }
            }),
        })
    }
}

/// Protects a connected, not yet started destination: from ferry_destination_start on it takes
/// the lease before the guest resumes (when settings name one), sends a checkpoint of what the
/// guest wrote every `checkpointer->period_ms` (the source applies it to the image it keeps),
/// tells the VMM when output may leave, and on failure halts the guest and gives the lease up so
/// the source can restart it. Settings also set heartbeats and the recovery window. After
/// FERRY_STATUS_OK from ferry_destination_wait the lease stays held until ferry_destination_free.
/// Thread safety: before start, from the thread that owns the handle.
///
/// # Safety
/// `destination` is a live handle; `settings` and `checkpointer` point to valid structs (strings
/// NUL-terminated); the callbacks are valid functions that accept `user` from any thread.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_protect(
    destination: *mut FerryDestination,
    settings: *const FerryRecovery,
    checkpointer: *const FerryCheckpointer,
    user: *mut c_void,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let d = unsafe { destination.as_ref() }.ok_or_else(|| invalid("destination is null"))?;
        // SAFETY: caller contracts.
        let (settings, callbacks) = unsafe { (settings_arg(settings)?, checkpointer.as_ref()) };
        let callbacks = *callbacks.ok_or_else(|| invalid("checkpointer is null"))?;
        let protection = DestinationProtection { callbacks, user };
        // Checked now, not at start: a null callback is the caller's mistake to hear at once.
        protection.protection(&settings, d.pages())?;
        d.protect(settings, protection)
    })
}

/// A source's protection: the image it keeps and applies checkpoints to, and its lease.
#[derive(Debug)]
pub(crate) struct SourceProtection {
    pub(crate) settings: Settings,
    pub(crate) kept: KeptImage,
    /// Held while the guest runs here (before the handoff, and after a restart).
    pub(crate) lease: Option<LeaseKeeper>,
    /// The handoff's state blob.
    pub(crate) handoff_state: Option<Vec<u8>>,
    /// What a restart resumes from: the checkpoint's epoch (0: none) and state blob.
    pub(crate) restart_state: Option<(u64, Vec<u8>)>,
}

impl SourceProtection {
    /// Takes the lease now: the guest runs here.
    pub(crate) fn start(
        settings: Settings,
        memory: Arc<ferry::transport::GuestMemory>,
    ) -> Result<Self, (FerryStatus, String)> {
        let lease = match &settings.lease {
            Some(terms) => Some(LeaseKeeper::acquire(terms, terms.ttl, || {}).map_err(migration)?),
            None => None,
        };
        Ok(SourceProtection { settings, kept: KeptImage::new(memory), lease, handoff_state: None, restart_state: None })
    }
}

/// Protects a post-copy source (before ferry_source_handoff): it keeps its guest memory as the
/// image to restart from and applies the destination's checkpoints to it (the regions passed to
/// ferry_source_start are written), and with a lease in `settings` takes it now (the guest runs
/// here) and gives it up at the handoff. When the handoff then fails with the guest running at
/// the destination, ferry_source_restart brings it back. FERRY_STATUS_ERR_STATE when the lease
/// is held by another. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; `settings` points to a valid FerryRecovery.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_protect(source: *mut FerrySource, settings: *const FerryRecovery) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let s = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        // SAFETY: caller contract.
        let settings = unsafe { settings_arg(settings)? };
        s.protect(settings)
    })
}

/// After ferry_source_handoff failed on a protected source (the destination died, or stayed
/// unreachable past the recovery window): waits up to `timeout_ms` for the lease (the destination
/// gives it up when it halts, or it expires), then points `*state`/`*len` at the state blob to
/// resume the guest from (valid until ferry_source_free) and sets `*epoch` to the checkpoint it
/// belongs to (0: none came; it is the handoff's). Guest memory already holds that checkpoint:
/// load the state and resume the vCPUs. FERRY_STATUS_ERR_STATE if the source is not protected,
/// its handoff did not fail, or the lease stayed with another.
/// Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; `state`, `len` and `epoch` are writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_restart(
    source: *mut FerrySource,
    timeout_ms: u32,
    state: *mut *const u8,
    len: *mut usize,
    epoch: *mut u64,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let s = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        if state.is_null() || len.is_null() || epoch.is_null() {
            return Err(invalid("state, len and epoch must be writable"));
        }
        let restart = s.restart(Duration::from_millis(u64::from(timeout_ms)))?;
        // SAFETY: caller contract: writable (checked non-null); the blob lives in the handle.
        unsafe {
            *state = restart.state;
            *len = restart.len;
            *epoch = restart.epoch;
        }
        Ok(())
    })
}
