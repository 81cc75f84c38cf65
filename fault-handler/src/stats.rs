//! Counters of a post-copy destination, shared by the fault thread and the pre-pager. Names
//! follow QEMU's postcopy statistics where one exists (blocktime, page counts by kind).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Power-of-two latency histogram: bucket `i` counts samples in `[2^i, 2^(i+1))` microseconds
/// (bucket 0 also holds samples under 1 us).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 32],
}

impl Histogram {
    /// Counts one fault that took `d`.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().max(1) as u64;
        let i = (63 - us.leading_zeros() as usize).min(31);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of each bucket, up to the last that is not empty: bucket N holds faults of [2^N, 2^(N+1)) us.
    pub fn counts(&self) -> Vec<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let last = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        counts[..last].to_vec()
    }
}

/// What a destination's fault handler and installers count, readable while they run.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Page-fault events read from the userfaultfd.
    pub faults: AtomicU64,
    /// Lanes reopened after they broke or went silent ([`crate::Recovery`]).
    pub recoveries: AtomicU64,
    /// Pages asked again after a lane was reopened: counted apart from first sends, so a page the
    /// source serves twice is a resend or a bug, never both.
    pub resent_pages: AtomicU64,
    /// Time spent reopening lanes, while the faults waiting on them stayed blocked.
    pub paused_ns: AtomicU64,
    /// Faults whose page had to be read from the source on the urgent lane.
    pub network_faults: AtomicU64,
    /// Faults on pages the pre-pager already had in flight: they waited for that read.
    pub inflight_faults: AtomicU64,
    /// Faults resolved without the network: a free, discarded or just-installed page.
    pub local_faults: AtomicU64,
    /// Pages installed from urgent reads.
    pub urgent_pages: AtomicU64,
    /// Pages installed from bulk reads.
    pub bulk_pages: AtomicU64,
    /// Pages that crossed as zero markers (no data) and were installed as zero pages.
    pub zero_pages: AtomicU64,
    /// Free pages the source reported: never transferred, installed as zero.
    pub skipped_free_pages: AtomicU64,
    /// Pages the guest discarded (UFFD_EVENT_REMOVE) before they arrived.
    pub discarded_pages: AtomicU64,
    /// Total time faulting threads waited for network faults, in nanoseconds.
    pub blocktime_ns: AtomicU64,
    /// Service time of network faults, from event read to install.
    pub fault_latency: Histogram,
}

impl FaultStats {
    /// Adds `n` to one of the counters.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads one of the counters.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
