//! Latency percentiles, throughput and memory figures.

use std::time::{Duration, Instant};

/// Latency samples in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Latencies(Vec::with_capacity(n))
    }

    pub fn record(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Times `f` `n` times after `warmup` untimed calls.
    pub fn measure<E>(warmup: usize, n: usize, mut f: impl FnMut(usize) -> Result<(), E>) -> Result<Self, E> {
        for i in 0..warmup {
            f(i)?;
        }
        let mut l = Latencies::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            f(warmup + i)?;
            l.record(t.elapsed());
        }
        Ok(l)
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn quantile_us(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[i] as f64 / 1000.0
    }
}

/// Gigabytes (10^9 bytes) per second.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// Peak resident set size of this process so far, in MiB.
pub fn max_rss_mib() -> f64 {
    // SAFETY: rusage is plain old data and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, exclusively borrowed rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// The median of a few repeated measurements (the machine is shared and noisy).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
