//! A post-copy destination's counters sampled over time: pages present, pages by lane, network
//! faults and the time vCPUs waited. What the paper's pictures are drawn from (bandwidth by lane
//! over time, pages present over time); a VMM starts one beside a session and stops it when every
//! page is present.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::stats::FaultStats;
use ferry_fault_handler::DestinationMemory;

/// One reading of the counters, `at` after the timeline started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelinePoint {
    /// When the reading was taken, from the timeline's start.
    pub at: Duration,
    /// Pages present.
    pub pages_present: u64,
    /// Pages read on the urgent lane (faults) and on the bulk lane (pre-paging), so far.
    pub urgent_pages: u64,
    /// See `urgent_pages`.
    pub bulk_pages: u64,
    /// Faults that waited for the network, so far.
    pub network_faults: u64,
    /// Time faulting vCPUs waited, so far.
    pub blocktime: Duration,
}

/// Samples a destination's counters every `period` on a thread of its own until stopped.
#[derive(Debug)]
pub struct Timeline {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<TimelinePoint>>>,
}

impl Timeline {
    /// Reads `stats` and `memory` every `period` on a thread of its own until [`Timeline::stop`].
    pub fn start(memory: Arc<DestinationMemory>, stats: Arc<FaultStats>, period: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("ferry-timeline".into()).spawn(move || {
            let t0 = Instant::now();
            let read = || TimelinePoint {
                at: t0.elapsed(),
                pages_present: memory.states().present_count(),
                urgent_pages: stats.urgent_pages.load(Ordering::Relaxed),
                bulk_pages: stats.bulk_pages.load(Ordering::Relaxed),
                network_faults: stats.network_faults.load(Ordering::Relaxed),
                blocktime: Duration::from_nanos(stats.blocktime_ns.load(Ordering::Relaxed)),
            };
            let mut points = vec![read()];
            while !flag.load(Ordering::Acquire) {
                std::thread::park_timeout(period);
                points.push(read());
            }
            points
        })?;
        Ok(Timeline { stop, thread: Some(thread) })
    }

    /// Stops sampling (one last reading) and returns the readings in time order.
    pub fn stop(mut self) -> Vec<TimelinePoint> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<TimelinePoint> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => {
                t.thread().unpark();
                t.join().unwrap_or_default()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Bytes per second on each lane between consecutive readings: (seconds since start, urgent,
/// bulk).
pub fn lane_rates(points: &[TimelinePoint], page_size: u64) -> Vec<(f64, f64, f64)> {
    points
        .windows(2)
        .filter_map(|w| {
            let dt = (w[1].at - w[0].at).as_secs_f64();
            (dt > 0.0).then(|| {
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 * page_size as f64 / dt;
                (
                    w[1].at.as_secs_f64(),
                    rate(w[0].urgent_pages, w[1].urgent_pages),
                    rate(w[0].bulk_pages, w[1].bulk_pages),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ms: u64, urgent: u64, bulk: u64) -> TimelinePoint {
        TimelinePoint {
            at: Duration::from_millis(ms),
            pages_present: urgent + bulk,
            urgent_pages: urgent,
            bulk_pages: bulk,
            network_faults: urgent,
            blocktime: Duration::ZERO,
        }
    }

    #[test]
    fn lane_rates_are_bytes_per_second_between_readings() {
        let rates = lane_rates(&[point(0, 0, 0), point(100, 10, 1000), point(200, 10, 3000)], 4096);
        assert_eq!(rates.len(), 2);
        assert_eq!(rates[0], (0.1, 10.0 * 4096.0 / 0.1, 1000.0 * 4096.0 / 0.1));
        assert_eq!(rates[1].1, 0.0, "no urgent pages in the second interval");
        assert_eq!(rates[1].2, 2000.0 * 4096.0 / 0.1);
    }
}
