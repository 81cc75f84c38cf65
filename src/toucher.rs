//! A guest stand-in for tests, benchmarks and demos without KVM: threads that touch guest memory
//! in a pattern and verify every byte of each page they touch. Page contents come from
//! [`ferry_transport::pattern`], so any page can be checked anywhere without a copy of the source.

use std::time::{Duration, Instant};

use ferry_transport::pattern::{check_page, fill_page};
use ferry_transport::{GuestMemory, PageIndex, Result};

use crate::freepages::FreePages;

/// Bytes a free page holds at the source: anything but zero, so a free page that crossed would
/// show at the destination.
pub const FREE_PAGE_FILL: u8 = 0xEE;

/// How the workload walks memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Every page once, in address order.
    Sequential,
    /// Pages drawn uniformly at random.
    Random,
    /// 90% of touches in a hot set of 1/16 of memory (four contiguous stretches), 10% anywhere.
    HotSet,
}

impl Pattern {
    /// Every pattern, in the order reports list them.
    pub const ALL: [Pattern; 3] = [Pattern::Sequential, Pattern::Random, Pattern::HotSet];

    /// The pattern's name on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "seq",
            Pattern::Random => "random",
            Pattern::HotSet => "hot-set",
        }
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown pattern {s:?}: seq, random or hot-set"))
    }
}

/// What a workload saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TouchReport {
    /// Pages touched.
    pub touches: u64,
    /// Touches that found a page with the wrong contents.
    pub mismatches: u64,
    /// How long the walk took.
    pub elapsed: Duration,
    /// Latency of each touch that blocked (took at least [`BLOCKED_TOUCH`]): what a fault costs the
    /// guest, delivery and wake-up included. Capped at [`MAX_BLOCKED_SAMPLES`].
    pub blocked: Vec<Duration>,
}

/// A touch slower than this blocked on a fault: reading and checking a present 4 KiB page takes
/// about 1 us here, the cheapest userfaultfd fault about 10 us.
pub const BLOCKED_TOUCH: Duration = Duration::from_micros(5);
/// Most blocked-touch latencies a report keeps.
pub const MAX_BLOCKED_SAMPLES: usize = 1 << 20;

impl TouchReport {
    /// Touches per second.
    pub fn rate(&self) -> f64 {
        self.touches as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Fills the source: every page with its pattern, free pages with [`FREE_PAGE_FILL`].
pub fn prepare_source(memory: &GuestMemory, seed: u64, free: &FreePages) -> Result<()> {
    ferry_transport::pattern::fill_memory(memory, seed)?;
    let ps = memory.layout().page_size() as usize;
    let junk = vec![FREE_PAGE_FILL; ps];
    for (PageIndex(first), count) in free.runs() {
        for g in first..first + count {
            let (region, offset) = locate(memory, g);
            memory.regions()[region].write(offset, &junk)?;
        }
    }
    Ok(())
}

fn locate(memory: &GuestMemory, global: u64) -> (usize, u64) {
    let ps = u64::from(memory.layout().page_size());
    let mut g = global;
    for (i, r) in memory.regions().iter().enumerate() {
        let pages = r.len() as u64 / ps;
        if g < pages {
            return (i, g * ps);
        }
        g -= pages;
    }
    panic!("page {global} outside guest memory");
}

fn page_ok(page: &[u8], global: u64, seed: u64, free: &FreePages) -> bool {
    if free.is_free(PageIndex(global)) {
        page.iter().all(|&b| b == 0)
    } else {
        check_page(page, global, seed)
    }
}

/// A small fast generator: the workload must cost far less than a page fault.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Where a walk goes: its pattern, its own random seed, and its start (for sequential walks).
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// How pages are chosen.
    pub pattern: Pattern,
    /// The walk's random seed.
    pub seed: u64,
    /// The first page of a sequential walk.
    pub start: u64,
}

impl Walk {
    /// A walk of `pattern` with the default seed, from page 0.
    pub fn new(pattern: Pattern) -> Self {
        Walk { pattern, seed: 0x2545_f491, start: 0 }
    }
}

/// Touches `touches` pages of `memory` along `walk`, reading each whole page and checking it
/// against the source's contents under `data_seed`: the destination's guest, or a local baseline.
pub fn touch(memory: &GuestMemory, walk: Walk, data_seed: u64, free: &FreePages, touches: u64) -> Result<TouchReport> {
    let (pattern, start) = (walk.pattern, walk.start);
    let pages = memory.layout().total_pages();
    let ps = memory.layout().page_size() as usize;
    let mut buf = vec![0u8; ps];
    let mut rng = XorShift(walk.seed | 1);
    let hot_len = (pages / 16).max(1);
    let hot_stretch = (hot_len / 4).max(1);
    let hot_starts: Vec<u64> = (0..4).map(|i| (pages / 4) * i + (pages / 4 - hot_stretch.min(pages / 4)) / 2).collect();
    let mut report = TouchReport::default();
    let t0 = Instant::now();
    for i in 0..touches {
        let g = match pattern {
            Pattern::Sequential => (start + i) % pages,
            Pattern::Random => rng.next() % pages,
            Pattern::HotSet => {
                let r = rng.next();
                if r % 10 == 0 || pages < 64 {
                    (r >> 8) % pages
                } else {
                    hot_starts[(r >> 4) as usize % 4] + (r >> 8) % hot_stretch
                }
            }
        };
        let (region, offset) = locate(memory, g);
        let t = Instant::now();
        memory.regions()[region].read(offset, &mut buf)?;
        let took = t.elapsed();
        if took >= BLOCKED_TOUCH && report.blocked.len() < MAX_BLOCKED_SAMPLES {
            report.blocked.push(took);
        }
        if !page_ok(&buf, g, data_seed, free) {
            report.mismatches += 1;
        }
        report.touches += 1;
    }
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// Checks every page of `memory`: the count of pages that differ from what the source held.
pub fn verify_all(memory: &GuestMemory, seed: u64, free: &FreePages) -> Result<u64> {
    let ps = memory.layout().page_size() as usize;
    let mut buf = vec![0u8; ps];
    let mut bad = 0;
    let mut g = 0;
    for r in memory.regions() {
        for off in (0..r.len()).step_by(ps) {
            r.read(off as u64, &mut buf)?;
            if !page_ok(&buf, g, seed, free) {
                bad += 1;
            }
            g += 1;
        }
    }
    Ok(bad)
}

/// Writes the source pattern for `global` into `page` (for tests that build pages by hand).
pub fn expected_page(page: &mut [u8], global: u64, seed: u64) {
    fill_page(page, global, seed);
}

/// The free pages the demos and tests report: one eighth of memory in one stretch (a guest that
/// freed a large buffer) plus every 97th page (scattered frees).
pub fn demo_free_pages(pages: u64) -> FreePages {
    let mut free = FreePages::new(pages);
    free.set_range(PageIndex(pages / 2), pages / 8);
    for p in (0..pages).step_by(97) {
        free.set(PageIndex(p));
    }
    free
}

/// Free 2 MiB hugepages on this machine, after reserving more when this process may (root) and
/// fewer than `needed` are free. For tests and demos of hugetlbfs-backed guests.
pub fn reserve_hugepages(needed: u64) -> u64 {
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find(|l| l.starts_with("HugePages_Free:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let have = free();
    if have < needed {
        let total: u64 =
            std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + needed - have).to_string());
    }
    free()
}

/// While a guest stand-in touches memory on its own thread, a failed engine would leave it blocked
/// on a missing page for good: this watchdog ends the process with the engine's reason instead
/// (tests and demos only; a VMM stops its vCPUs).
#[derive(Debug)]
pub struct EngineWatchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineWatchdog {
    /// Watches `watch` from a thread of its own until dropped.
    pub fn start(watch: crate::engine::FailureWatch) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let mut next_report = std::time::Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    if let Some(why) = watch.failure() {
                        eprintln!("ferry: the post-copy engine failed while the guest stand-in waited on it: {why}");
                        std::process::exit(3);
                    }
                    if started.elapsed() > next_report {
                        // Only a report: the open hang under load is still being chased.
                        eprintln!(
                            "ferry: the guest stand-in is still running after {next_report:?}: {}",
                            watch.describe()
                        );
                        next_report *= 2;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        EngineWatchdog { stop, thread: Some(thread) }
    }
}

impl Drop for EngineWatchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
