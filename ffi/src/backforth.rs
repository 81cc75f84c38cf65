//! Post-copy back onto a kept image: the source offers the image its guest arrived on while the
//! guest still runs (`ferry_source_offer_base`), the destination connects naming the image it
//! kept (`ferry_destination_connect_with`); accepted, only the pages the guest changed since
//! are absent when it resumes there. Then the usual calls: pause, `ferry_source_handoff`,
//! `ferry_destination_start` and `_wait`. Pre-copy does the same in one call each
//! (`precopy`).

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use ferry::backforth::{self, Arrival, BaseVerdict, ChangeTracker, RetainedImage};
use ferry::fault_handler::DestinationMemory;

use crate::*;

/// Post-copy back onto a kept image, with the guest still running: waits up to `timeout_ms` for
/// a destination that called ferry_destination_connect_with, names the image the guest arrived on
/// (`base`; null: none) and learns whether the destination kept it. Accepted
/// (`outcome.kept_image_used`), it waits until the destination has dropped the changed pages
/// from its image. `dirty_log` must report, at its first call, every page written since the guest
/// resumed on `base`; ferry calls it once more in ferry_source_handoff for the pages written
/// since, so `user` must stay valid until then. Then pause the guest and call
/// ferry_source_handoff. Thread safety: one thread per handle.
///
/// # Safety
/// `source` is a live handle; `base` is null or readable with a NUL-terminated `vm_id`;
/// `dirty_log` is a valid function (it may be null when `base` is); `outcome` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_source_offer_base(
    source: *mut FerrySource,
    base: *const FerryImageId,
    dirty_log: FerryDirtyLogFn,
    user: *mut c_void,
    timeout_ms: u32,
    outcome: *mut FerryOutcome,
) -> FerryStatus {
    guard(|| {
        // SAFETY: caller contract: a live handle or null.
        let source = unsafe { source.as_ref() }.ok_or_else(|| invalid("source is null"))?;
        // SAFETY: caller contract on `base`.
        let base = unsafe { image_id_arg(base, "base")? };
        source.check_no_offer()?;
        let tracker = match base {
            Some(base) => {
                let collect = dirty_log.ok_or_else(|| invalid("dirty_log is null"))?;
                let log = CallbackDirtyLog::new(collect, user, source.pages);
                Some(ChangeTracker::start(base, log, source.pages).map_err(migration)?)
            }
            None => None,
        };
        let mut control = source.connected(timeout_ms)?;
        let mut done = FerryOutcome::default();
        match tracker {
            Some(mut tracker) => {
                let offer = tracker.offer(&source.memory, backforth::DEFAULT_SAMPLES).map_err(migration)?;
                match backforth::propose(control.as_mut(), Some(&offer)).map_err(migration)? {
                    BaseVerdict::Accepted => {
                        backforth::await_prepared(control.as_mut()).map_err(migration)?;
                        done.kept_image_used = 1;
                        *lock(&source.base_changes) = Some(tracker);
                    }
                    BaseVerdict::Refused(why) => done.set_refused(&why),
                }
            }
            None => {
                if let BaseVerdict::Refused(why) = backforth::propose(control.as_mut(), None).map_err(migration)? {
                    done.set_refused(&why);
                }
            }
        }
        // The handoff goes on on this control lane (a lane that failed above is dropped).
        *lock(&source.control) = Some(control.into_inner());
        // SAFETY: caller contract: null or writable.
        if let Some(outcome) = unsafe { outcome.as_mut() } {
            *outcome = done;
        }
        Ok(())
    })
}

/// As ferry_destination_connect, for a source that calls ferry_source_offer_base: `kept` (may be
/// null) names the image the memory in `regions` holds, left by this guest when it went away
/// from here. If the source's base is that image and its sampled pages match, only the pages the
/// guest changed since are dropped and fetched (`outcome.kept_image_used`); otherwise (the reason
/// in `outcome.refused`) every page is, and ferry drops the regions' old contents first. TCP and
/// "unix:" addresses (FERRY_STATUS_ERR_UNSUPPORTED for rdma). Thread safety: as
/// ferry_destination_connect.
///
/// # Safety
/// As ferry_destination_connect, except that the memory may hold the kept image; `kept` is null
/// or readable with a NUL-terminated `vm_id`; `outcome` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_destination_connect_with(
    regions: *const FerryRegion,
    region_count: usize,
    page_size: u32,
    addr: *const c_char,
    key: *const u8,
    key_len: usize,
    prepager: u32,
    kept: *const FerryImageId,
    out: *mut *mut FerryDestination,
    outcome: *mut FerryOutcome,
) -> FerryStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is null"));
        }
        let policy = policy_arg(prepager)?;
        // SAFETY: forwarded caller contracts.
        let (regions, key, addr, kept) = unsafe {
            (
                regions_arg(regions, region_count)?,
                key_arg(key, key_len)?,
                str_arg(addr, "addr")?,
                image_id_arg(kept, "kept")?,
            )
        };
        if addr.starts_with("rdma:") {
            return Err((FerryStatus::ErrUnsupported, "back onto a kept image over rdma".into()));
        }
        // SAFETY: forwarded caller contract on the mappings.
        let guest = Arc::new(unsafe { adopt(regions, page_size)? });
        let layout = guest.layout().clone();
        let (lanes, mut control) = connect_session(addr, &key, &layout, None)?;
        let image = kept.map(|identity| RetainedImage::keep(guest.clone(), identity));
        let mut done = FerryOutcome::default();
        let handle = match backforth::answer(control.as_mut(), image, &layout).map_err(migration)? {
            Arrival::Onto { memory, changed } => {
                let onto = backforth::OntoKept::prepare(control.as_mut(), memory, changed).map_err(migration)?;
                done.kept_image_used = 1;
                Box::new(FerryDestination::new(policy, lanes, control, layout.total_pages(), Some(onto)))
            }
            Arrival::Full { refused, image } => {
                done.set_refused(refused.as_deref().unwrap_or(""));
                drop(image);
                backforth::forget_image(&guest).map_err(migration)?;
                let memory =
                    DestinationMemory::register_with_valid(guest, |_| false).map_err(|e| migration(e.into()))?;
                let handle = Box::new(FerryDestination::new(policy, lanes, control, layout.total_pages(), None));
                handle
                    .memory
                    .set(Arc::new(memory))
                    .map_err(|_| (FerryStatus::ErrInternal, "a new handle".to_string()))?;
                handle
            }
        };
        // SAFETY: out and outcome: caller contract (out checked non-null).
        unsafe {
            *out = Box::into_raw(handle);
            if let Some(outcome) = outcome.as_mut() {
                *outcome = done;
            }
        }
        Ok(())
    })
}
