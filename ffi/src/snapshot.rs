//! Snapshots: save a paused guest in ferry's image format, open an image, and restore it eagerly
//! (every page read before the guest runs) or lazily (the guest runs at once while the post-copy
//! engine brings its memory in from the file), recording and replaying the guest's working set
//! beside the image (`IMAGE.ws`).

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry::fault_handler::DestinationMemory;
use ferry::restore::{restore_eager, LazyRestore, WorkingSet};
use ferry::transport::snapshot::SnapshotImage;
use ferry::transport::GuestMemory;
use ferry::EngineConfig;

use crate::destination::{call_resume, report_stats, Running};
use crate::*;

/// `ferry_restore_lazy` flag: keep the order of the guest's first faults in `IMAGE.ws` when the
/// restore completes (written by ferry_restore_wait).
pub const FERRY_RESTORE_RECORD: u32 = 1;
/// `ferry_restore_lazy` flag: fetch the working set in `IMAGE.ws` first, in its order, then go on
/// with the pre-pager.
pub const FERRY_RESTORE_REPLAY: u32 = 2;

/// An opened, verified snapshot image.
#[derive(Debug)]
pub struct FerryImage {
    image: Arc<SnapshotImage>,
    path: PathBuf,
}

/// What an image holds: map guest memory of this shape before restoring it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FerryImageInfo {
    /// Bytes per page.
    pub page_size: u32,
    /// Regions in the image.
    pub region_count: u32,
    /// Bytes of guest memory in all regions.
    pub total_bytes: u64,
    /// Pages restored as zero without a read (zero when saved, or free).
    pub zero_pages: u64,
    /// Bytes of the VMM state blob saved with it.
    pub state_len: usize,
    /// 1 if `IMAGE.ws` holds a working set for FERRY_RESTORE_REPLAY.
    pub has_working_set: u32,
}

/// A lazy restore in progress: the guest runs while its memory arrives from the image.
#[derive(Debug)]
pub struct FerryRestore {
    session: Mutex<Option<LazyRestore>>,
    running: Running,
    /// Where ferry_restore_wait writes the working set (FERRY_RESTORE_RECORD).
    record_to: Option<PathBuf>,
    /// Last: the engine above holds it too, and goes first.
    memory: Arc<DestinationMemory>,
}

/// # Safety
/// `image` must be null or a live handle.
unsafe fn image_arg<'a>(image: *const FerryImage) -> Result<&'a FerryImage, (FerryStatus, String)> {
    // SAFETY: caller contract: a live handle or null.
    unsafe { image.as_ref() }.ok_or_else(|| invalid("image is null"))
}

/// Adopts the caller's regions as memory for `image`, checking they match its layout.
///
/// # Safety
/// As [`adopt`], for `regions` pointing to `count` regions.
unsafe fn memory_for(
    image: &FerryImage,
    regions: *const FerryRegion,
    count: usize,
) -> Result<GuestMemory, (FerryStatus, String)> {
    let layout = image.image.layout();
    // SAFETY: forwarded caller contracts.
    let guest = unsafe { adopt(regions_arg(regions, count)?, layout.page_size())? };
    if let Some(why) = guest.layout().mismatch(layout) {
        return Err((FerryStatus::ErrLayout, format!("the regions do not match the image: {why}")));
    }
    Ok(guest)
}

/// Saves a paused guest to `path`: the memory in `regions` (free pages, per `free_bitmap` as in
/// ferry_source_handoff, are neither read nor stored; zero pages are stored as a map), and the
/// VMM's `state`. Crash-safe: the file is complete or absent. `bytes_written` (may be null) gets
/// the image's size. Thread safety: any thread; the guest must not run meanwhile.
///
/// # Safety
/// `regions` points to `region_count` regions whose mappings are readable for the call; `path` is
/// NUL-terminated; `state` points to `state_len` bytes (or is null with 0); `free_bitmap` to
/// `free_words` words (or null with 0); `bytes_written` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_snapshot_save(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    path: *const c_char,
    state: *const u8,
    state_len: usize,
    free_bitmap: *const u64,
    free_words: usize,
    bytes_written: *mut u64,
) -> FerryStatus {
    guard(|| {
        // SAFETY: forwarded caller contracts.
        let (regions, path, state) = unsafe {
            (regions_arg(regions, region_count)?, str_arg(path, "path")?, bytes_arg(state, state_len, "state")?)
        };
        // SAFETY: forwarded caller contract on the mappings (read during this call only).
        let guest = unsafe { adopt(regions, page_size)? };
        let pages = guest.layout().total_pages();
        // SAFETY: forwarded caller contract on the bitmap.
        let free = unsafe { free_pages_arg(free_bitmap, free_words, pages)? };
        let written = ferry::restore::save(path, &guest, state, &free).map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(out) = unsafe { bytes_written.as_mut() } {
            *out = written.bytes_written;
        }
        Ok(())
    })
}

/// Opens and verifies the image at `path` (header, checksums of its maps and state): a truncated,
/// corrupt or foreign file is FERRY_STATUS_ERR_INVALID_ARGUMENT or FERRY_STATUS_ERR_IO with the
/// reason. Thread safety: any thread; the handle may then be shared by readers.
///
/// # Safety
/// `path` is NUL-terminated; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_image_open(path: *const c_char, out: *mut *mut FerryImage) -> FerryStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        // SAFETY: caller contract: NUL-terminated.
        let path = unsafe { str_arg(path, "path")? };
        let image = SnapshotImage::open(path, None).map_err(image_error)?;
        let handle = Box::new(FerryImage { image, path: PathBuf::from(path) });
        // SAFETY: out is non-null (checked) and writable (caller contract).
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// The shape of the image's guest memory, its zero pages and state size. Thread safety: any thread.
///
/// # Safety
/// `image` is a live handle; `info` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_image_info(image: *const FerryImage, info: *mut FerryImageInfo) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let image = unsafe { image_arg(image)? };
        // SAFETY: caller contract: writable or null.
        let out = unsafe { info.as_mut() }.ok_or_else(|| invalid("info is null"))?;
        let layout = image.image.layout();
        let zero = image.image.zero_map().iter().map(|w| u64::from(w.count_ones())).sum();
        *out = FerryImageInfo {
            page_size: layout.page_size(),
            region_count: layout.regions().len() as u32,
            total_bytes: layout.total_bytes(),
            zero_pages: zero,
            state_len: image.image.state().len(),
            has_working_set: u32::from(WorkingSet::path_for(&image.path).exists()),
        };
        Ok(())
    })
}

/// Region `index` of the image: where it sits in the guest and its size in bytes. Map each with
/// this size and pass them in this order to a restore. Thread safety: any thread.
///
/// # Safety
/// `image` is a live handle; `guest_phys_addr` and `size` are writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_image_region(
    image: *const FerryImage,
    index: u32,
    guest_phys_addr: *mut u64,
    size: *mut u64,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let image = unsafe { image_arg(image)? };
        // SAFETY: caller contract: writable or null.
        let (gpa, len) = unsafe { (guest_phys_addr.as_mut(), size.as_mut()) };
        let (gpa, len) = gpa.zip(len).ok_or_else(|| invalid("guest_phys_addr or size is null"))?;
        let regions = image.image.layout().regions();
        let r = regions.get(index as usize).ok_or_else(|| invalid(format!("region {index} of {}", regions.len())))?;
        (*gpa, *len) = (r.guest_phys_addr.0, r.size);
        Ok(())
    })
}

/// Points `*state`/`*len` at the VMM state saved with the image; valid until ferry_image_free.
/// Thread safety: any thread.
///
/// # Safety
/// `image` is a live handle; `state` and `len` are writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_image_state(
    image: *const FerryImage,
    state: *mut *const u8,
    len: *mut usize,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let image = unsafe { image_arg(image)? };
        // SAFETY: caller contract: writable or null.
        let (state, len) = unsafe { (state.as_mut(), len.as_mut()) };
        let (state, len) = state.zip(len).ok_or_else(|| invalid("state or len is null"))?;
        (*state, *len) = (image.image.state().as_ptr(), image.image.state().len());
        Ok(())
    })
}

/// Frees an image. Restores started from it keep what they need. Null is ignored. Thread
/// safety: once, when no other call on the handle is running.
///
/// # Safety
/// `image` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_image_free(image: *mut FerryImage) {
    if !image.is_null() {
        // SAFETY: caller contract: a handle from ferry_image_open, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(image) })));
    }
}

/// Reads every non-zero page of the image into the memory in `regions` (fresh mappings of the
/// image's layout, see ferry_image_region), through io_uring; then load ferry_image_state and run
/// the guest. `stats` (may be null) gets the pages read (bulk_pages) and the time (total_us).
/// Thread safety: any thread.
///
/// # Safety
/// `image` is a live handle; `regions` points to `region_count` regions whose mappings are
/// writable for the call; `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_eager(
    image: *const FerryImage,
    regions: *const FerryRegion,
    region_count: usize,
    stats: *mut FerryStats,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let image = unsafe { image_arg(image)? };
        // SAFETY: forwarded caller contracts.
        let guest = unsafe { memory_for(image, regions, region_count)? };
        let report = restore_eager(&image.image, &guest).map_err(migration)?;
        // SAFETY: caller contract: null or writable.
        if let Some(out) = unsafe { stats.as_mut() } {
            *out = FerryStats {
                pages_total: guest.layout().total_pages(),
                bulk_pages: report.pages_read,
                total_us: micros(report.took),
                ..FerryStats::default()
            };
        }
        Ok(())
    })
}

/// Restores the image lazily into the memory in `regions` (mapped, never touched, of the image's
/// layout): registers it with userfaultfd, serves faults from the file, calls `resume` with the
/// image's state (load it and start the vCPUs), and returns once the guest runs; memory keeps
/// arriving, by `prepager` (a `FerryPrepager` value), until ferry_restore_wait. `flags`:
/// FERRY_RESTORE_RECORD, FERRY_RESTORE_REPLAY (FERRY_STATUS_ERR_INVALID_ARGUMENT if the image has
/// no working set to replay). Regions with an fd are filled in place (UFFDIO_CONTINUE).
/// Thread safety: any thread; then wait from one thread, stats, finish and cancel from any.
///
/// # Safety
/// `image` is a live handle; `regions` points to `region_count` regions whose mappings stay valid
/// until ferry_restore_free; `resume` is a valid function; `user` is passed through; `out` is
/// writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_lazy(
    image: *const FerryImage,
    regions: *const FerryRegion,
    region_count: usize,
    prepager: u32,
    flags: u32,
    resume: FerryResumeFn,
    user: *mut c_void,
    out: *mut *mut FerryRestore,
) -> FerryStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let resume = resume.ok_or_else(|| invalid("resume is null"))?;
        if flags & !(FERRY_RESTORE_RECORD | FERRY_RESTORE_REPLAY) != 0 {
            return Err(invalid(format!("unknown flags {flags:#x}")));
        }
        // SAFETY: caller contract.
        let image = unsafe { image_arg(image)? };
        let policy = policy_arg(prepager)?;
        let ws_path = WorkingSet::path_for(&image.path);
        let mut config =
            EngineConfig { policy, record_first_faults: flags & FERRY_RESTORE_RECORD != 0, ..EngineConfig::default() };
        if flags & FERRY_RESTORE_REPLAY != 0 {
            let ws = WorkingSet::load(&ws_path, image.image.layout().total_pages())
                .map_err(|e| invalid(format!("FERRY_RESTORE_REPLAY: {e}")))?;
            config = ws.replay_config(policy, &config);
        }
        // SAFETY: forwarded caller contracts.
        let guest = unsafe { memory_for(image, regions, region_count)? };
        let memory = Arc::new(DestinationMemory::register(guest).map_err(|e| migration(e.into()))?);
        let session = LazyRestore::start(&image.image, memory.clone(), &config, |state| {
            // SAFETY: `resume` is the caller's function (this function's contract).
            unsafe { call_resume(resume, state, user) }
        })
        .map_err(migration)?;
        let handle = Box::new(FerryRestore {
            running: Running::default(),
            session: Mutex::new(None),
            record_to: config.record_first_faults.then_some(ws_path),
            memory,
        });
        handle.running.set(session.engine());
        *lock(&handle.session) = Some(session);
        // SAFETY: out is non-null (checked) and writable (caller contract).
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// # Safety
/// `restore` must be null or a live handle.
unsafe fn restore_arg<'a>(restore: *const FerryRestore) -> Result<&'a FerryRestore, (FerryStatus, String)> {
    // SAFETY: caller contract: a live handle or null.
    unsafe { restore.as_ref() }.ok_or_else(|| invalid("restore is null"))
}

/// Live counters while memory arrives, as ferry_destination_stats. Thread safety: any thread.
///
/// # Safety
/// `restore` is a live handle; `stats` is writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_stats(restore: *const FerryRestore, stats: *mut FerryStats) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { restore_arg(restore)? };
        // SAFETY: caller contract: writable or null.
        let out = unsafe { stats.as_mut() }.ok_or_else(|| invalid("stats is null"))?;
        *out = r.running.live_stats(&r.memory);
        Ok(())
    })
}

/// Fetches what is still missing in address order once the pre-pager runs dry: only a `demand`
/// restore needs it to complete. Thread safety: any thread, also during ferry_restore_wait.
///
/// # Safety
/// `restore` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_finish(restore: *const FerryRestore) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { restore_arg(restore)? }.running.control()?.finish();
        Ok(())
    })
}

/// Stops the restore: ferry_restore_wait returns FERRY_STATUS_ERR_PEER with the pages still
/// missing; guest threads faulting on them stay blocked (stop the vCPUs). Thread safety: any
/// thread, also during ferry_restore_wait.
///
/// # Safety
/// `restore` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_cancel(restore: *const FerryRestore) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { restore_arg(restore)? }.running.control()?.cancel();
        Ok(())
    })
}

/// Blocks until every page is in, releases userfaultfd, writes the working set if asked
/// (FERRY_RESTORE_RECORD), and fills `stats` (may be null; downtime_us is the time from
/// ferry_restore_lazy to the guest running). Thread safety: one waiter per handle.
///
/// # Safety
/// `restore` is a live handle; `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_wait(restore: *const FerryRestore, stats: *mut FerryStats) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { restore_arg(restore)? };
        let session = lock(&r.session).take().ok_or_else(|| (FerryStatus::ErrState, "already waited".to_string()))?;
        let report = session.wait().map_err(migration)?;
        if let Some(path) = &r.record_to {
            WorkingSet { pages: report.first_faults.clone() }.save(path).map_err(migration)?;
        }
        // SAFETY: caller contract: null or writable.
        if let Some(out) = unsafe { stats.as_mut() } {
            *out = report_stats(&report);
        }
        Ok(())
    })
}

/// Frees a restore. One freed before every page arrived keeps its userfaultfd open, so guest
/// threads faulting on missing pages stay blocked instead of reading zeros: stop the vCPUs first.
/// Null is ignored. Thread safety: once, when no other call on the handle is running.
///
/// # Safety
/// `restore` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_restore_free(restore: *mut FerryRestore) {
    if !restore.is_null() {
        // SAFETY: caller contract: a handle from ferry_restore_lazy, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(restore) })));
    }
}

/// Opening an image: a file that is not a sound image is the caller's argument, not an I/O failure.
fn image_error(e: ferry::transport::TransportError) -> (FerryStatus, String) {
    match e {
        ferry::transport::TransportError::Snapshot { .. } => (FerryStatus::ErrInvalidArgument, e.to_string()),
        other => transport(other),
    }
}
