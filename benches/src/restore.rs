//! `ferry-bench restore`: snapshot restore, ferry against the strategy of Firecracker's example UFFD
//! handler, in one run, beside the raw limits of that run.
//!
//! ```text
//! ferry-bench restore [--json] [--mem-mib N] [--ws-pages N] [--dir DIR] [--scale-gib 1,4,16] [--samples N]
//! ```
//! (`--mem-mib 0` runs only the scale rows, `--scale-gib ''` none of them.)
//! A guest of `--mem-mib` (every page data) is saved twice: as Firecracker's raw memory file and as
//! a ferry image. Each row restores it into fresh memory and starts a "vCPU" thread the moment the
//! guest may run; the thread reads a working set of `--ws-pages` random pages in a fixed order and
//! checks each. Rows: `firecracker-example` (a handler thread answers each fault with one
//! UFFDIO_COPY from a mapping of the raw file; nothing else is fetched), ferry `demand`
//! (recording the first faults), `bubbling`, `bubbling+replay` (that recorded set fetched first)
//! and `eager` (every page read before the guest runs), once with the files in the page cache and
//! once with it dropped for them (ferry then reads with O_DIRECT; the mapping reads from disk with
//! the kernel's read-around). Each row reports `restore_to_running_ms`, `time_to_working_set_ms`,
//! `faults` (faults that waited for a read of the file), `fault_p50_us`/`fault_p99_us` (service
//! time of those, from the event read to the install), `touch_p50_us`/`touch_p99_us` (the guest's
//! own time per working-set touch, fault or not: the figure to hold against the raw fault, which
//! is measured from the faulting thread too), `total_ms` (until every page is in; null for Firecracker's strategy, which
//! never fetches a page the guest does not touch), and the raw limits: `raw_fault_p50_us` (a
//! userfaultfd fault resolved from local memory) and `raw_read_p50_us` (one 4 KiB io_uring read
//! of the file, the same way ferry reads it). Then, for guests of `--scale-gib` each (the first
//! 256 MiB data, the rest zero), a lazy restore's `restore_to_running_ms`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry::fault_handler::uffd::{Event, Outcome, Userfault, MODE_MISSING};
use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::restore::{restore_eager, LazyRestore};
use ferry::{EngineConfig, FreePages};
use ferry_transport::snapshot::{ImageReads, SnapshotImage};
use ferry_transport::{Backing, GuestMemory, HostAddr, MemoryLayout, PageIndex, RegionMapping};
use serde_json::{json, Value};

use crate::fixtures::{filled_memory, PAGE};
use crate::raw;
use crate::stats::{max_rss_mib, Latencies};

/// `ferry-bench restore`'s options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Guest memory of the restore comparison, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Pages of the recorded working set (0: a quarter of the touched pages).
    #[arg(long, default_value_t = 0)]
    ws_pages: usize,
    /// Where the images are written (a real disk for O_DIRECT figures).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Guest sizes for the restore-to-running scale test, GiB, comma separated (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    scale_gib: Vec<u64>,
    /// Faults timed per strategy.
    #[arg(long, default_value_t = 5000)]
    samples: usize,
}

/// The first word of page `p` of [`filled_memory`] (its pattern repeats every MiB).
fn expected_first_word(p: u64) -> u64 {
    let word = (p * PAGE as u64 % (1 << 20)) / 8;
    word.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// What the "vCPU" saw: when it finished, how many pages read wrong, and how long its touches
/// took (each a fault where the page was missing).
struct GuestRun {
    done: Instant,
    wrong: u64,
    touches: Latencies,
}

/// The "vCPU": reads the first word of each working-set page in order (each read of a missing page
/// faults), timing each touch, and counts the wrong ones.
fn spawn_guest(memory: impl AsRef<GuestMemory> + Send + 'static, ws: Arc<Vec<u64>>) -> JoinHandle<Result<GuestRun>> {
    std::thread::spawn(move || {
        let region = &memory.as_ref().regions()[0];
        let mut word = [0u8; 8];
        let mut wrong = 0;
        let mut touches = Latencies::with_capacity(ws.len());
        for &p in ws.iter() {
            let t = Instant::now();
            region.read(p * PAGE as u64, &mut word)?;
            touches.record(t.elapsed());
            wrong += u64::from(u64::from_le_bytes(word) != expected_first_word(p));
        }
        Ok(GuestRun { done: Instant::now(), wrong, touches })
    })
}

struct DestinationGuest(Arc<DestinationMemory>);

impl AsRef<GuestMemory> for DestinationGuest {
    fn as_ref(&self) -> &GuestMemory {
        self.0.guest()
    }
}

struct PlainGuest(Arc<GuestMemory>);

impl AsRef<GuestMemory> for PlainGuest {
    fn as_ref(&self) -> &GuestMemory {
        &self.0
    }
}

/// One restore's figures.
#[derive(Default)]
struct Row {
    mode: &'static str,
    restore_to_running: Duration,
    time_to_working_set: Duration,
    faults: u64,
    fault_p50: Duration,
    fault_p99: Duration,
    total: Option<Duration>,
    direct_io: bool,
    wrong: u64,
    /// The guest's own view: each working-set touch, fault or not.
    touch_p50: Duration,
    touch_p99: Duration,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

fn join_guest(guest: Option<JoinHandle<Result<GuestRun>>>) -> Result<GuestRun> {
    guest.context("the guest never resumed")?.join().map_err(|_| anyhow::anyhow!("guest thread panicked"))?
}

fn quantile(l: &mut Latencies, q: f64) -> Duration {
    Duration::from_secs_f64(l.quantile_us(q).max(0.0) / 1e6)
}

/// Firecracker's example handler: one UFFDIO_COPY per fault from a private mapping of the raw
/// memory file, nothing fetched ahead.
fn firecracker_example(raw_file: &Path, layout: &MemoryLayout, ws: &Arc<Vec<u64>>) -> Result<Row> {
    let t0 = Instant::now();
    let file = File::open(raw_file)?;
    let len = layout.total_bytes() as usize;
    // SAFETY: a fresh read-only private mapping of a file this function opened; it is only read
    // (through `source` below) and unmapped at the end, after the handler thread is joined.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
    if map == libc::MAP_FAILED {
        bail!("mmap {}: {}", raw_file.display(), std::io::Error::last_os_error());
    }
    // SAFETY: the mapping above is `len` readable bytes and lives until the munmap below.
    let source: &'static [u8] = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) };
    let memory = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous)?);
    let region: &RegionMapping = &memory.regions()[0];
    let base = HostAddr::of(region.host_addr().as_ptr());
    let uffd = Arc::new(Userfault::open(0)?);
    // SAFETY: fresh, untouched memory of this function, reached by the guest thread only through
    // reads that fault; it outlives the handler, which is joined before it is dropped.
    unsafe { uffd.register(base, len as u64, MODE_MISSING)? };
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop) = (uffd.clone(), stop.clone());
        std::thread::spawn(move || -> Result<Latencies> {
            let mut served = Latencies::default();
            let mut events = [Event::Other(0); 16];
            while !stop.load(Ordering::Acquire) {
                let n = uffd.read_events(&mut events, 20)?;
                for e in &events[..n] {
                    if let Event::PageFault { address, .. } = *e {
                        let t = Instant::now();
                        let page = address.align_down(PAGE as u64);
                        let off = page.offset_from(base).expect("a fault in the registered region") as usize;
                        match uffd.copy(page, &source[off..off + PAGE], true) {
                            Outcome::Done | Outcome::Exists(_) => {}
                            other => bail!("UFFDIO_COPY: {other:?}"),
                        }
                        served.record(t.elapsed());
                    }
                }
            }
            Ok(served)
        })
    };
    let guest = spawn_guest(PlainGuest(memory.clone()), ws.clone());
    let restore_to_running = t0.elapsed();
    let mut g = join_guest(Some(guest))?;
    stop.store(true, Ordering::Release);
    let mut served = handler.join().map_err(|_| anyhow::anyhow!("handler thread panicked"))??;
    // SAFETY: the handler that read `source` is joined; nothing else uses the mapping.
    unsafe { libc::munmap(map, len) };
    let faults = served.len() as u64;
    Ok(Row {
        mode: "firecracker-example",
        restore_to_running,
        time_to_working_set: g.done - t0,
        faults,
        fault_p50: quantile(&mut served, 0.5),
        fault_p99: quantile(&mut served, 0.99),
        total: None,
        direct_io: false,
        wrong: g.wrong,
        touch_p50: quantile(&mut g.touches, 0.5),
        touch_p99: quantile(&mut g.touches, 0.99),
    })
}

/// A ferry lazy restore; returns the row and the recorded first faults.
fn ferry_lazy(
    image_path: &Path,
    reads: ImageReads,
    config: &EngineConfig,
    mode: &'static str,
    ws: &Arc<Vec<u64>>,
) -> Result<(Row, Vec<PageIndex>)> {
    let t0 = Instant::now();
    let image = SnapshotImage::open_with(image_path, None, reads)?;
    let memory =
        Arc::new(DestinationMemory::register(GuestMemory::create(image.layout().clone(), Backing::Anonymous)?)?);
    let mut guest = None;
    let session = LazyRestore::start(&image, memory.clone(), config, |_state| {
        guest = Some(spawn_guest(DestinationGuest(memory.clone()), ws.clone()));
        Ok(())
    })?;
    let restore_to_running = t0.elapsed();
    let mut g = join_guest(guest)?;
    if config.policy == PolicyKind::Demand {
        session.engine().finish();
    }
    let r = session.wait()?;
    let row = Row {
        mode,
        restore_to_running,
        time_to_working_set: g.done - t0,
        faults: r.network_faults,
        fault_p50: r.fault_p50,
        fault_p99: r.fault_p99,
        total: Some(t0.elapsed()),
        direct_io: image.uses_direct_io(),
        wrong: g.wrong,
        touch_p50: quantile(&mut g.touches, 0.5),
        touch_p99: quantile(&mut g.touches, 0.99),
    };
    Ok((row, r.first_faults))
}

fn eager(image_path: &Path, reads: ImageReads, ws: &Arc<Vec<u64>>) -> Result<Row> {
    let t0 = Instant::now();
    let image = SnapshotImage::open_with(image_path, None, reads)?;
    let memory = Arc::new(GuestMemory::create(image.layout().clone(), Backing::Anonymous)?);
    restore_eager(&image, &memory)?;
    let guest = spawn_guest(PlainGuest(memory), ws.clone());
    let restore_to_running = t0.elapsed();
    let mut g = join_guest(Some(guest))?;
    Ok(Row {
        mode: "eager",
        restore_to_running,
        time_to_working_set: g.done - t0,
        total: Some(restore_to_running),
        direct_io: image.uses_direct_io(),
        wrong: g.wrong,
        touch_p50: quantile(&mut g.touches, 0.5),
        touch_p99: quantile(&mut g.touches, 0.99),
        ..Row::default()
    })
}

/// Puts `paths` in the page cache (read through) or drops them from it (they are synced, so
/// POSIX_FADV_DONTNEED evicts every page).
fn set_cache(paths: &[&Path], cached: bool) -> Result<()> {
    for path in paths {
        let file = File::open(path)?;
        if cached {
            std::io::copy(&mut &file, &mut std::io::sink())?;
        } else {
            file.sync_all()?;
            // SAFETY: an advisory call on a file descriptor this function owns.
            let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                bail!("posix_fadvise DONTNEED {}: {}", path.display(), std::io::Error::from_raw_os_error(rc));
            }
        }
    }
    Ok(())
}

fn print(o: &Options, row: &Value, text: String) {
    if o.json {
        println!("{row}");
    } else {
        println!("{text}");
    }
}

pub fn run(o: Options) -> Result<()> {
    std::fs::create_dir_all(&o.dir)?;
    if o.mem_mib > 0 {
        compare(&o)?;
    }
    for &gib in &o.scale_gib {
        scale_row(&o, gib)?;
    }
    Ok(())
}

/// The rows against Firecracker's strategy, with the image in the page cache and out of it.
fn compare(o: &Options) -> Result<()> {
    let mem = o.mem_mib << 20;
    let memory = filled_memory(mem, Backing::Anonymous)?;
    let layout = memory.layout().clone();
    let pages = layout.total_pages();
    let ws_pages = if o.ws_pages == 0 { (pages / 16) as usize } else { o.ws_pages };
    let ws: Arc<Vec<u64>> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        Arc::new((0..ws_pages).map(|_| rng.random_range(0..pages)).collect())
    };
    let tag = std::process::id();
    let image_path = o.dir.join(format!("ferry-bench-restore-{tag}.img"));
    let raw_path = o.dir.join(format!("ferry-bench-restore-{tag}.mem"));
    let _cleanup =
        Cleanup(vec![image_path.clone(), raw_path.clone(), ferry::restore::WorkingSet::path_for(&image_path)]);
    ferry::restore::save(&image_path, &memory, b"vcpu state", &FreePages::new(pages))?;
    {
        let mut raw = File::create(&raw_path)?;
        let mut chunk = vec![0u8; 1 << 20];
        for off in (0..mem).step_by(chunk.len()) {
            memory.regions()[0].read(off, &mut chunk)?;
            std::io::Write::write_all(&mut raw, &chunk)?;
        }
        raw.sync_all()?;
    }
    drop(memory);
    let data_offset = {
        let image = SnapshotImage::open(&image_path, None)?;
        image.data_offset()
    };
    let mut raw_fault = raw::uffd_local_faults(o.samples)?;
    let raw_fault_p50 = raw_fault.quantile_us(0.5);
    for cached in [true, false] {
        let cache = if cached { "page-cache" } else { "dropped" };
        let reads = if cached { ImageReads::PageCache } else { ImageReads::Direct };
        set_cache(&[&image_path], cached)?;
        let raw_read_p50 =
            raw::io_uring_page_reads(&image_path, data_offset, mem, o.samples, !cached)?.quantile_us(0.5);
        let base = EngineConfig::default();
        let mut recorded = Vec::new();
        let mut rows = Vec::new();
        for mode in ["firecracker-example", "demand", "bubbling", "bubbling+replay", "eager"] {
            set_cache(&[&image_path, &raw_path], cached)?;
            let row = match mode {
                "firecracker-example" => firecracker_example(&raw_path, &layout, &ws)?,
                "demand" => {
                    let config = EngineConfig { policy: PolicyKind::Demand, record_first_faults: true, ..base.clone() };
                    let (row, first) = ferry_lazy(&image_path, reads, &config, "demand", &ws)?;
                    recorded = first;
                    row
                }
                "bubbling" => {
                    let config = EngineConfig { policy: PolicyKind::Bubbling, ..base.clone() };
                    ferry_lazy(&image_path, reads, &config, "bubbling", &ws)?.0
                }
                "bubbling+replay" => {
                    let config = EngineConfig {
                        policy: PolicyKind::Bubbling,
                        replay: Some(Arc::new(recorded.clone())),
                        ..base.clone()
                    };
                    ferry_lazy(&image_path, reads, &config, "bubbling+replay", &ws)?.0
                }
                _ => eager(&image_path, reads, &ws)?,
            };
            if row.wrong != 0 {
                bail!("{mode} ({cache}): {} of the working set's pages read wrong", row.wrong);
            }
            let value = json!({
                "mode": row.mode, "cache": cache, "mem_mib": o.mem_mib, "working_set_pages": ws.len(),
                "restore_to_running_ms": ms(row.restore_to_running),
                "time_to_working_set_ms": ms(row.time_to_working_set),
                "faults": row.faults, "fault_p50_us": us(row.fault_p50), "fault_p99_us": us(row.fault_p99),
                "touch_p50_us": us(row.touch_p50), "touch_p99_us": us(row.touch_p99),
                "total_ms": row.total.map(ms),
                "raw_fault_p50_us": raw_fault_p50, "raw_read_p50_us": raw_read_p50,
                "direct_io": row.direct_io, "max_rss_mib": max_rss_mib().round(),
            });
            let total = row.total.map(|t| format!("{:>8.1} ms", ms(t))).unwrap_or_else(|| "   never".into());
            let text = format!(
                "{:<20} {:<10} running {:>7.2} ms | working set {:>8.1} ms | faults {:>6} p50 {:>6.1} us p99 {:>7.1} us | touch p50 {:>6.1} us | all in {} | raw fault {:.1} us + read {:.1} us",
                row.mode, cache, ms(row.restore_to_running), ms(row.time_to_working_set), row.faults,
                us(row.fault_p50), us(row.fault_p99), us(row.touch_p50), total, raw_fault_p50, raw_read_p50
            );
            print(o, &value, text);
            rows.push(row);
        }
        let (fc, demand, replay) = (&rows[0], &rows[1], &rows[3]);
        let summary = json!({
            "summary": "restore", "cache": cache,
            "replay_ws_over_firecracker": (replay.time_to_working_set.as_secs_f64() / fc.time_to_working_set.as_secs_f64() * 1e3).round() / 1e3,
            "replay_faults_cut": ((1.0 - replay.faults as f64 / fc.faults.max(1) as f64) * 1e3).round() / 1e3,
            "demand_fault_p50_over_raw": (us(demand.fault_p50) / (raw_fault_p50 + raw_read_p50) * 1e3).round() / 1e3,
            // The guest's own view against the raw fault, also seen from the faulting thread.
            "demand_touch_p50_over_raw": (us(demand.touch_p50) / (raw_fault_p50 + raw_read_p50) * 1e3).round() / 1e3,
        });
        let text = format!(
            "{cache}: replay reaches the working set in {:.2}x Firecracker's time with {:.1}% fewer faults; a demand touch's p50 is {:.2}x (raw fault + raw read), its service {:.2}x",
            summary["replay_ws_over_firecracker"].as_f64().unwrap_or(f64::NAN),
            100.0 * summary["replay_faults_cut"].as_f64().unwrap_or(f64::NAN),
            summary["demand_touch_p50_over_raw"].as_f64().unwrap_or(f64::NAN),
            summary["demand_fault_p50_over_raw"].as_f64().unwrap_or(f64::NAN)
        );
        print(o, &summary, text);
    }
    Ok(())
}

/// A guest of `gib` GiB, its first 256 MiB data and the rest zero: how long a lazy restore takes
/// to let it run, and to bring all of it in.
fn scale_row(o: &Options, gib: u64) -> Result<()> {
    let size = gib << 30;
    let layout = MemoryLayout::single(size)?;
    let path = o.dir.join(format!("ferry-bench-scale-{}-{gib}.img", std::process::id()));
    let _cleanup = Cleanup(vec![path.clone()]);
    {
        let memory = GuestMemory::create(layout.clone(), Backing::Anonymous)?;
        let data = filled_memory(size.min(256 << 20), Backing::Anonymous)?;
        let mut chunk = vec![0u8; 1 << 20];
        for off in (0..data.layout().total_bytes()).step_by(chunk.len()) {
            data.regions()[0].read(off, &mut chunk)?;
            memory.regions()[0].write(off, &chunk)?;
        }
        ferry::restore::save(&path, &memory, b"vcpu state", &FreePages::new(layout.total_pages()))?;
    }
    let ws = Arc::new(Vec::new());
    let config = EngineConfig { policy: PolicyKind::Push, ..EngineConfig::default() };
    let t0 = Instant::now();
    let image = SnapshotImage::open(&path, None)?;
    let open = t0.elapsed();
    drop(image);
    let (row, _) = ferry_lazy(&path, ImageReads::Direct, &config, "push", &ws)?;
    let value = json!({
        "scale": "restore", "mem_gib": gib, "data_mib": size.min(256 << 20) >> 20,
        "open_ms": ms(open), "restore_to_running_ms": ms(row.restore_to_running),
        "total_ms": row.total.map(ms), "max_rss_mib": max_rss_mib().round(),
    });
    let text = format!(
        "scale {gib:>3} GiB (256 MiB data): open {:.2} ms, running {:.2} ms, all in {:.0} ms",
        ms(open),
        ms(row.restore_to_running),
        row.total.map(ms).unwrap_or(f64::NAN)
    );
    print(o, &value, text);
    Ok(())
}

/// Removes the bench's files however it ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
