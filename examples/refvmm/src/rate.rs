//! The guest's rate over time: a thread samples the guest's progress counter at a fixed period,
//! so a migration's effect on the workload is measured over exact intervals (the baseline in
//! steady state on the source, the post-copy interval at the destination) and as the time the
//! guest lost: the integral of (1 - rate / baseline) over the migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the progress counter is read.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(5);

/// Samples a progress counter until stopped.
pub struct RateSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Samples>,
}

/// Reads a counter.
pub type Counter = Arc<dyn Fn() -> u64 + Send + Sync>;

impl RateSampler {
    /// Samples `progress`, and `pages` beside it where given (pages present, while memory arrives).
    pub fn start(progress: Counter, pages: Option<Counter>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let read = || (Instant::now(), progress(), pages.as_ref().map_or(0, |p| p()));
                let mut points = vec![read()];
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(SAMPLE_PERIOD);
                    points.push(read());
                }
                Samples { points }
            })
        };
        RateSampler { stop, thread }
    }

    /// A sampler of a VM's progress, and of `pages` where given.
    pub fn of(telemetry: Arc<crate::vm::Telemetry>, pages: Option<Counter>) -> Self {
        Self::start(Arc::new(move || telemetry.progress.load(Ordering::Relaxed)), pages)
    }

    pub fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(Samples { points: Vec::new() })
    }
}

/// Progress counter readings, in time order.
#[derive(Debug, Clone)]
pub struct Samples {
    /// (when, progress, pages)
    points: Vec<(Instant, u64, u64)>,
}

impl Samples {
    /// Progress at `t`, interpolated between the readings around it (clamped to the ends).
    fn progress_at(&self, t: Instant) -> f64 {
        let i = self.points.partition_point(|&(at, _, _)| at <= t);
        match (i.checked_sub(1).and_then(|j| self.points.get(j)), self.points.get(i)) {
            (Some(&(t0, p0, _)), Some(&(t1, p1, _))) => {
                let span = (t1 - t0).as_secs_f64();
                let f = if span > 0.0 { (t - t0).as_secs_f64() / span } else { 0.0 };
                p0 as f64 + f * (p1 as f64 - p0 as f64)
            }
            (Some(&(_, p, _)), None) | (None, Some(&(_, p, _))) => p as f64,
            (None, None) => 0.0,
        }
    }

    /// Units per second over `from..to`.
    pub fn rate(&self, from: Instant, to: Instant) -> f64 {
        let secs = to.saturating_duration_since(from).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.progress_at(to) - self.progress_at(from)) / secs
    }

    /// The time the guest lost against `baseline` over `from..to`: the integral of
    /// max(0, 1 - rate / baseline), in windows of `window`.
    pub fn work_lost(&self, from: Instant, to: Instant, baseline: f64, window: Duration) -> Duration {
        if baseline <= 0.0 {
            return Duration::ZERO;
        }
        let mut lost = 0.0;
        let mut t = from;
        while t < to {
            let end = (t + window).min(to);
            let dt = (end - t).as_secs_f64();
            let shortfall = (1.0 - self.rate(t, end) / baseline).max(0.0);
            lost += shortfall * dt;
            t = end;
        }
        Duration::from_secs_f64(lost)
    }

    /// The rate in consecutive windows of `window` over `from..to`: (ms since `origin` at the
    /// window's start, units per second, pages sampled at the window's end).
    pub fn series(&self, origin: Instant, from: Instant, to: Instant, window: Duration) -> Vec<(f64, f64, u64)> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            let end = (t + window).min(to);
            let ms = t.saturating_duration_since(origin).as_secs_f64() * 1e3
                - origin.saturating_duration_since(t).as_secs_f64() * 1e3;
            let i = self.points.partition_point(|&(at, _, _)| at <= end).saturating_sub(1);
            out.push((ms, self.rate(t, end), self.points.get(i).map_or(0, |p| p.2)));
            t = end;
        }
        out
    }

    pub fn last_time(&self) -> Option<Instant> {
        self.points.last().map(|&(t, _, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(u64, u64)]) -> (Instant, Samples) {
        let t0 = Instant::now();
        (t0, Samples { points: points.iter().map(|&(ms, p)| (t0 + Duration::from_millis(ms), p, p / 10)).collect() })
    }

    #[test]
    fn rates_interpolate_between_readings() {
        let (t0, s) = samples(&[(0, 0), (100, 1000), (200, 1000), (300, 4000)]);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!((s.rate(at(0), at(100)) - 10_000.0).abs() < 1e-6);
        assert!((s.rate(at(50), at(150)) - 5_000.0).abs() < 1e-6, "half a window at 10k/s, half stopped");
        assert_eq!(s.rate(at(100), at(200)), 0.0);
        assert!((s.rate(at(0), at(300)) - 4000.0 / 0.3).abs() < 1e-6);
    }

    #[test]
    fn work_lost_integrates_the_shortfall() {
        // Baseline 10k/s: full speed for 100 ms, stopped for 100 ms, half speed for 200 ms.
        let (t0, s) = samples(&[(0, 0), (100, 1000), (200, 1000), (400, 2000)]);
        let at = |ms| t0 + Duration::from_millis(ms);
        let lost = s.work_lost(at(0), at(400), 10_000.0, Duration::from_millis(10));
        assert!((lost.as_secs_f64() - 0.2).abs() < 1e-6, "100 ms stopped + 200 ms at half: {lost:?}");
        // Faster than the baseline is no gain: the shortfall is clamped at zero.
        let lost = s.work_lost(at(0), at(100), 5_000.0, Duration::from_millis(10));
        assert_eq!(lost, Duration::ZERO);
    }

    #[test]
    fn series_has_one_point_per_window() {
        let (t0, s) = samples(&[(0, 0), (100, 1000), (200, 1000)]);
        let at = |ms| t0 + Duration::from_millis(ms);
        let series = s.series(at(100), at(0), at(200), Duration::from_millis(100));
        assert_eq!(series.len(), 2);
        assert!((series[0].0 + 100.0).abs() < 1e-6 && (series[0].1 - 10_000.0).abs() < 1e-6);
        assert!(series[1].0.abs() < 1e-6 && series[1].1 == 0.0);
        assert_eq!((series[0].2, series[1].2), (100, 100), "pages read at each window's end");
    }
}
