//! `ferry-vmm`, ferry's reference VMM: runs a KVM guest whose workload runs at CPL3 and migrates
//! it with ferry. `ferry-vmm --help` and `ferry-vmm COMMAND --help` list every option with its
//! default (the command line is in `cli`).
//!
//! ```text
//! ferry-vmm run     [--mem-mib 256] [--data-mib N] [--vcpus N] [--backing anon|memfd|hugetlb]
//!                   [--workload idle|seq-write|rand-write|read-mostly|hot-set] [--guest FILE]
//!                   [--rate-mib N] [--seconds 1] [--json]
//! ferry-vmm demo    [run's options] [--mem 2G] [--mode postcopy|precopy|hybrid]
//!                   [--prepager demand|push|bubbling] [--downtime-ms 50] [--max-rounds 30]
//!                   [--transport tcp|local] [--inject cut-lanes=N|kill-destination=F]
//!                   [--checkpoint-ms 100] [--recovery-window-ms 10000] [--lease-dir DIR]
//!                   [--trips N [--dirty-percent P] [--tamper-kept]]
//! ferry-vmm receive --listen ADDR [--key-hex K] [--json] [--lease-dir DIR] [--observe SOCKET]
//! ferry-vmm migrate --to ADDR [--key-hex K] [demo's options]
//! ferry-vmm snapshot --out FILE [run's options]
//! ferry-vmm restore --from FILE [--lazy|--eager] [--prepager P] [--record] [--replay]
//!                   [--backing B] [--seconds 1] [--json]
//! ```
//! `migrate` boots the guest, runs it for `--seconds`, then migrates it to a `receive` waiting at
//! ADDR: it tells the destination where its page server listens and the guest's shape, and the
//! destination connects back (the pre-shared key, from `--key-hex` or FERRY_KEY, authenticates both
//! sides). `demo` runs both halves in this process over tcp loopback; `--inject cut-lanes=N`
//! breaks the data lanes N times during a tcp post-copy (the destination reconnects and asks
//! again for what was in flight). A post-copy destination sends reverse checkpoints every
//! `--checkpoint-ms` and holds the guest's output until they are acknowledged (see `protect`);
//! `--inject kill-destination=F` runs the destination as its own process and SIGKILLs it once
//! that fraction of the pages crossed, and the source restarts the guest from the last
//! checkpoint. The guests' output goes to an observer (`output`) that counts gaps and
//! regressions. After the migration the
//! guest checks its own memory; each side prints its report (`demo` one merged report).
//! `demo --trips N` moves the guest back and forth N times (`trips`): the host it left keeps its
//! image, and each return moves only the pages the guest changed since (one report per trip).
//! `snapshot` runs the guest for `--seconds`, pauses it and saves it in ferry's image format;
//! `restore` brings it back, eagerly or lazily (running at once while the image's pages fault in
//! behind it), `--record` keeping the order of its first faults beside the image (FILE.ws) and
//! `--replay` fetching that working set first; the guest then checks its own memory.

mod cli;
mod ft;
mod guest;
mod output;
mod plot;
mod protect;
mod rate;
mod summary;
mod trips;
mod vm;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use ferry::prepager::PolicyKind;
use ferry::taskguided::{PauseRule, Paused, TaskGuidance};
use ferry::{run_source, EngineConfig, PostcopyDestination};
use ferry_fault_handler::DestinationMemory;
use ferry_transport::local::{self, LocalPageServer};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, ControlStream, GuestMemory, MemoryLayout, PreSharedKey};
use guest::Workload;
use rate::RateSampler;
use serde_json::json;
use vm::{Memory, Vm};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
enum Mode {
    Postcopy,
    Precopy,
    Hybrid,
    /// A fault-tolerant pair: the destination is a backup that follows the guest's epochs and
    /// takes over when the source (the primary) is lost.
    Ft,
}

#[derive(Clone)]
struct Args {
    command: String,
    /// The local transport: same host, the destination maps the source's memfds.
    local: bool,
    /// tcp lanes: TLS or plaintext.
    encryption: tcp::Encryption,
    /// Where `--plot` writes the run's pictures (SVG).
    plot: Option<std::path::PathBuf>,
    to: Option<String>,
    listen: Option<String>,
    key_hex: Option<String>,
    vcpus: usize,
    guest_file: Option<std::path::PathBuf>,
    rate_mib: Option<f64>,
    mode: Mode,
    downtime_ms: u64,
    max_rounds: u32,
    mem_mib: u64,
    data_mib: Option<u64>,
    workload: Workload,
    seconds: f64,
    prepager: PolicyKind,
    backing: Backing,
    json: bool,
    out: Option<std::path::PathBuf>,
    from: Option<std::path::PathBuf>,
    lazy: bool,
    record: bool,
    replay: bool,
    /// Data-lane cuts injected into a tcp post-copy (`--inject cut-lanes=N`).
    cut_lanes: u64,
    /// `--inject kill-destination=F`: SIGKILL the destination process at this fraction of pages.
    kill_destination: Option<f64>,
    /// `--inject kill-primary=S` (ft): SIGKILL the primary process S seconds into protection.
    kill_primary: Option<f64>,
    kill_backup: Option<f64>,
    /// Reverse checkpoint period in post-copy; 0: none.
    checkpoint_ms: u64,
    recovery_window_ms: u64,
    lease_dir: std::path::PathBuf,
    /// The etcd cluster holding the lease, instead of a file in `lease_dir`.
    etcd: Option<String>,
    /// The output observer's socket.
    observe: Option<std::path::PathBuf>,
    /// Back-and-forth: moves of the guest between two hosts (`trips`); 1 is a plain migration.
    trips: u64,
    /// Between trips the guest runs until it changed this share of its memory.
    dirty_percent: Option<f64>,
    /// Writes the kept image before each return (it must be refused).
    tamper_kept: bool,
    /// Pre-copy and hybrid stop only inside the guest's task segments (`--task-guided on`).
    task_guided: bool,
    /// How long past the first possible stop the source waits for a segment.
    task_wait_ms: u64,
    /// The phased workload's phases (`--heavy-ms`, `--quiet-ms`; defaults below).
    heavy_ms: Option<u64>,
    quiet_ms: Option<u64>,
}

/// The phased workload's default phases: writes for 300 ms, quiet (marked) for 100 ms.
const HEAVY_MS: u64 = 300;
const QUIET_MS: u64 = 100;

impl Default for Args {
    fn default() -> Self {
        Args {
            command: String::new(),
            local: false,
            encryption: tcp::Encryption::Tls,
            plot: None,
            to: None,
            listen: None,
            key_hex: None,
            vcpus: 1,
            guest_file: None,
            rate_mib: None,
            mode: Mode::Postcopy,
            downtime_ms: 50,
            max_rounds: 30,
            mem_mib: 256,
            data_mib: None,
            workload: Workload::SeqWrite,
            seconds: 1.0,
            prepager: PolicyKind::Bubbling,
            backing: Backing::Anonymous,
            json: false,
            out: None,
            from: None,
            lazy: true,
            record: false,
            replay: false,
            cut_lanes: 0,
            kill_destination: None,
            kill_primary: None,
            kill_backup: None,
            checkpoint_ms: 100,
            recovery_window_ms: 10_000,
            lease_dir: std::env::temp_dir(),
            etcd: None,
            observe: None,
            trips: 1,
            dirty_percent: None,
            tamper_kept: false,
            task_guided: false,
            task_wait_ms: 1000,
            heavy_ms: None,
            quiet_ms: None,
        }
    }
}

/// "2G", "512M" or a number of MiB.
fn parse_size(s: &str) -> Result<u64> {
    let (n, unit) = s.split_at(s.trim_end_matches(['G', 'g', 'M', 'm']).len());
    let n: u64 = n.parse().with_context(|| format!("size {s:?}"))?;
    Ok(match unit {
        "G" | "g" => n << 10,
        _ => n,
    })
}

fn data_pages(a: &Args) -> u64 {
    let data_mib = a.data_mib.unwrap_or((a.mem_mib / 2).max(1)).min(a.mem_mib.saturating_sub(16));
    (data_mib << 20) / guest::PAGE
}

/// One region at guest address 0; 2 MiB pages on hugetlbfs, 4 KiB otherwise.
fn layout(a: &Args) -> Result<MemoryLayout> {
    let page_size = if a.backing == Backing::HugetlbMemfd { 2 << 20 } else { 4096 };
    Ok(MemoryLayout::new(
        page_size,
        vec![ferry_transport::RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(0), size: a.mem_mib << 20 }],
    )?)
}

fn main() -> Result<()> {
    // Logs (session phases, reconnections, refusals) on stderr, chosen by RUST_LOG (errors only
    // by default): e.g. RUST_LOG=ferry=info,ferry_fault_handler=info.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let a = cli::parse();
    // Before any VM or thread exists: a demo's destination thread would wait for a source that
    // gave up.
    if a.mode == Mode::Ft && a.checkpoint_ms == 0 && matches!(a.command.as_str(), "demo" | "migrate") {
        bail!("--mode ft streams epochs: --checkpoint-ms must be above 0");
    }
    match a.command.as_str() {
        "run" => run(&a),
        "demo" => demo(&a),
        "snapshot" => snapshot(&a),
        "restore" => restore(&a),
        "migrate" => {
            let to = a.to.clone().ok_or_else(|| anyhow!("migrate needs --to ADDR"))?;
            print_report(&a, &source_half(&a, &to, &key(&a)?, None, None)?.report)
        }
        "receive" => {
            let listener = TcpListener::bind(a.listen.as_deref().unwrap_or("127.0.0.1:7070"))?;
            eprintln!("ferry-vmm: receiving on {}", listener.local_addr()?);
            print_report(&a, &destination_half(&listener, &key(&a)?, &a, None)?.report)
        }
        other => bail!("unknown command {other:?}: run, demo, migrate, receive, snapshot or restore"),
    }
}

/// Runs the workload for `--seconds` and reports its rate and its self-check.
fn run(a: &Args) -> Result<()> {
    let memory = Arc::new(GuestMemory::create(layout(a)?, a.backing)?);
    let mut vm = Vm::new(Memory::Plain(memory), a.vcpus)?;
    boot(&mut vm, a)?;
    let running = vm.start()?;
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let progress = vm.telemetry.progress.load(Ordering::Relaxed);
    let rate = progress as f64 / a.seconds;
    if a.guest_file.is_some() {
        // A user's guest need not implement the self-check.
        vm.stop(running)?;
        let segments = vm.telemetry.segments.load(Ordering::Relaxed);
        let dropped = vm.telemetry.free_reports_dropped.load(Ordering::Relaxed);
        println!(
            "{}",
            json!({"guest": a.guest_file.as_ref().map(|p| p.display().to_string()), "rate": rate, "task_segments": segments, "free_reports_dropped": dropped})
        );
        return Ok(());
    }
    let mismatches = self_check(&mut vm, running)?;
    if a.json {
        println!("{}", json!({"workload": a.workload.name(), "rate": rate, "guest_mismatches": mismatches}));
    } else {
        println!("{}: {rate:.0} units/s, self-check: {mismatches} pages wrong", a.workload.name());
    }
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages");
    }
    Ok(())
}

/// Boots the guest, runs it for `--seconds`, pauses it and saves it with its free pages.
fn snapshot(a: &Args) -> Result<()> {
    let out = a.out.clone().ok_or_else(|| anyhow!("snapshot needs --out FILE"))?;
    let layout = layout(a)?;
    let memory = Arc::new(GuestMemory::create(layout.clone(), a.backing)?);
    let mut vm = Vm::new(Memory::Plain(memory.clone()), a.vcpus)?;
    boot(&mut vm, a)?;
    let running = vm.start()?;
    let rate = measure_rate(&vm, a.seconds);
    vm.stop(running)?;
    let state = vm.save()?;
    let free = vm.telemetry.free_pages(layout.total_pages(), u64::from(layout.page_size()));
    let t0 = Instant::now();
    let w = ferry::restore::save(&out, &memory, &state, &free)?;
    let took = t0.elapsed();
    let report = json!({
        "image": out.display().to_string(),
        "mem_mib": a.mem_mib,
        "vcpus": a.vcpus,
        "workload": a.workload.name(),
        "rate": rate,
        "save_ms": took.as_secs_f64() * 1e3,
        "data_pages": w.data_pages,
        "zero_pages": w.zero_pages,
        "free_pages": w.free_pages,
        "bytes_written": w.bytes_written,
        "write_gbps": w.bytes_written as f64 / took.as_secs_f64() / 1e9,
    });
    print_report(a, &report)
}

/// Restores a snapshot eagerly or lazily, lets the guest run for `--seconds`, and has it check
/// its memory.
fn restore(a: &Args) -> Result<()> {
    use ferry::restore::{restore_eager, LazyRestore, WorkingSet};
    use ferry_transport::snapshot::SnapshotImage;
    let from = a.from.clone().ok_or_else(|| anyhow!("restore needs --from FILE"))?;
    let t0 = Instant::now();
    let image = SnapshotImage::open(&from, None)?;
    let layout = image.layout().clone();
    let vcpus = Vm::vcpus_in(image.state())?;
    if (layout.page_size() > 4096) != (a.backing == Backing::HugetlbMemfd) {
        bail!(
            "the image has {} byte pages: restore it with --backing hugetlb exactly when they are 2 MiB",
            layout.page_size()
        );
    }
    let mut report = json!({
        "image": from.display().to_string(),
        "mode": if a.lazy { "lazy" } else { "eager" },
        "mem_mib": layout.total_bytes() >> 20,
        "vcpus": vcpus,
        "direct_io": image.uses_direct_io(),
        "open_ms": t0.elapsed().as_secs_f64() * 1e3,
    });
    let mut running = None;
    let mut resumed = None;
    let mut vm;
    if a.lazy {
        let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), a.backing)?)?);
        vm = Vm::new(Memory::Arriving(memory.clone()), vcpus)?;
        report["prepared_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        let ws_path = WorkingSet::path_for(&from);
        let mut config = EngineConfig { policy: a.prepager, record_first_faults: a.record, ..EngineConfig::default() };
        if a.replay {
            let ws = WorkingSet::load(&ws_path, layout.total_pages())?;
            report["working_set_pages"] = json!(ws.pages.len());
            config = ws.replay_config(a.prepager, &config);
        }
        let session =
            LazyRestore::start(&image, memory, &config, |blob| resume(&mut vm, blob, &mut running, &mut resumed))?;
        report["restore_to_running_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        let during = Instant::now();
        let p0 = vm.telemetry.progress.load(Ordering::Relaxed);
        if a.prepager == PolicyKind::Demand {
            std::thread::sleep(Duration::from_secs_f64(a.seconds));
            session.engine().finish();
        }
        let r = session.wait()?;
        let lazy_ms = during.elapsed().as_secs_f64() * 1e3;
        report["all_present_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        report["rate_during"] =
            json!((vm.telemetry.progress.load(Ordering::Relaxed) - p0) as f64 / lazy_ms.max(1e-3) * 1e3);
        report["prepager"] = json!(r.policy);
        report["faults"] = json!(r.faults);
        report["network_faults"] = json!(r.network_faults);
        report["fault_p50_us"] = json!(r.fault_p50.as_secs_f64() * 1e6);
        report["fault_p99_us"] = json!(r.fault_p99.as_secs_f64() * 1e6);
        report["bulk_pages"] = json!(r.bulk_pages);
        report["replayed_pages"] = json!(r.replayed_pages);
        report["zero_pages"] = json!(r.zero_pages + r.skipped_free_pages);
        report["pages_installed_twice"] = json!(r.pages_installed_twice);
        if a.record {
            WorkingSet { pages: r.first_faults.clone() }.save(&ws_path)?;
            report["recorded_working_set_pages"] = json!(r.first_faults.len());
        }
    } else {
        let memory = Arc::new(GuestMemory::create(layout.clone(), a.backing)?);
        vm = Vm::new(Memory::Plain(memory.clone()), vcpus)?;
        let e = restore_eager(&image, &memory)?;
        report["pages_read"] = json!(e.pages_read);
        resume(&mut vm, image.state(), &mut running, &mut resumed).map_err(|e| anyhow!(e))?;
        report["restore_to_running_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        report["all_present_ms"] = report["restore_to_running_ms"].clone();
    }
    let running = running.ok_or_else(|| anyhow!("the guest never resumed"))?;
    report["rate_after"] = json!(measure_rate(&vm, a.seconds));
    let mismatches = self_check(&mut vm, running)?;
    report["guest_mismatches"] = json!(mismatches);
    print_report(a, &report)?;
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages after the restore");
    }
    Ok(())
}

/// Asks every vCPU of the running guest to check its memory, waits for all answers, and stops
/// the vCPUs. Returns the pages found wrong.
fn self_check(vm: &mut Vm, running: vm::Running) -> Result<u64> {
    vm.telemetry.verify_wrong.store(0, Ordering::Release);
    vm.telemetry.verify_answers.store(0, Ordering::Release);
    for i in 0..vm.vcpu_count() as u64 {
        vm.memory().write(guest::MAILBOX_GPA + 8 * i, &1u64.to_le_bytes())?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        if vm.telemetry.verify_answers.load(Ordering::Acquire) == vm.vcpu_count() as u64 {
            break Some(vm.telemetry.verify_wrong.load(Ordering::Acquire));
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    vm.stop(running)?;
    answer.ok_or_else(|| anyhow!("the guest did not answer the self-check"))
}

/// Boots the generated workload, or `--guest FILE`.
fn boot(vm: &mut Vm, a: &Args) -> Result<()> {
    match &a.guest_file {
        Some(path) => {
            let code = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            vm.boot_code(&code, data_pages(a), a.rate_mib)
        }
        None => {
            vm.boot(a.workload, data_pages(a), a.rate_mib)?;
            if a.workload == Workload::Phased {
                let ms = |m: Option<u64>, default| Duration::from_millis(m.unwrap_or(default));
                vm.set_phases(ms(a.heavy_ms, HEAVY_MS), ms(a.quiet_ms, QUIET_MS))?;
            }
            Ok(())
        }
    }
}

/// The pre-shared key: `--key-hex`, else the environment variable FERRY_KEY.
fn key(a: &Args) -> Result<PreSharedKey> {
    let hex = match &a.key_hex {
        Some(k) => k.clone(),
        None => std::env::var("FERRY_KEY").context("the pre-shared key: pass --key-hex or set FERRY_KEY")?,
    };
    Ok(PreSharedKey::from_hex(&hex)?)
}

/// The first line a source sends a destination: where its page server listens and the guest's
/// shape, so that the destination builds a matching VM. Only a hint: the page server's handshake
/// then authenticates both sides and checks the layout.
#[derive(serde::Serialize, serde::Deserialize)]
struct Rendezvous {
    page_port: u16,
    /// Set for the local transport: the source's Unix socket.
    local_path: Option<String>,
    mem_mib: u64,
    page_size: u32,
    vcpus: usize,
    backing: String,
    mode: Mode,
    prepager: String,
    seconds: f64,
    /// The guest's steady-state rate at the source just before the pause.
    baseline_rate: f64,
    /// Names the VM's lease (letters, digits, '-').
    vm_id: String,
    /// Post-copy: reverse checkpoints this often (0: none).
    checkpoint_ms: u64,
    recovery_window_ms: u64,
}

const MAX_RENDEZVOUS_BYTES: u64 = 4096;
/// Largest guest a destination builds on a source's word, before the handshake authenticates it.
const MAX_GUEST_MIB: u64 = 16 << 10;

fn backing_name(b: Backing) -> &'static str {
    match b {
        Backing::Anonymous => "anon",
        Backing::Memfd => "memfd",
        Backing::HugetlbMemfd => "hugetlb",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Postcopy => "postcopy",
        Mode::Precopy => "precopy",
        Mode::Hybrid => "hybrid",
        Mode::Ft => "ft",
    }
}

/// The source's page server.
enum Server {
    Tcp(Arc<TcpPageServer>),
    Local(LocalPageServer),
}

/// Fault injection: breaks the data lanes `cuts` times while the destination pulls the guest,
/// at evenly spread fractions of the pages served, so the cuts land mid-migration however fast
/// it goes.
struct LaneCutter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl LaneCutter {
    fn start(server: Arc<TcpPageServer>, cuts: u64, pages: u64) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut made = 0;
                while made < cuts && !stop.load(Ordering::Acquire) {
                    let s = server.stats();
                    let served = s.data_pages.load(Ordering::Relaxed) + s.zero_pages.load(Ordering::Relaxed);
                    if served >= (made + 1) * pages / (cuts + 2) {
                        server.cut_data_lanes();
                        made += 1;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                made
            })
        };
        LaneCutter { stop, thread }
    }

    /// Stops cutting; how many cuts were made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(0)
    }
}

/// Fault injection: SIGKILLs the destination process once `at_fraction` of the guest's pages
/// have been served.
struct Killer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<Instant>>,
}

impl Killer {
    fn start(server: Arc<TcpPageServer>, kill: Kill, pages: u64) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let s = server.stats();
                    let served = s.data_pages.load(Ordering::Relaxed) + s.zero_pages.load(Ordering::Relaxed);
                    if served as f64 >= kill.at_fraction * pages as f64 {
                        // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
                        let rc = unsafe { libc::kill(kill.pid as libc::pid_t, libc::SIGKILL) };
                        return (rc == 0).then(Instant::now);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                None
            })
        };
        Killer { stop, thread }
    }

    /// Stops watching; when the destination was killed, if it was.
    fn stop(self) -> Option<Instant> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().ok().flatten()
    }
}

/// What one half of a migration reports, and when (wall clock) its side of the downtime was.
struct Half {
    report: serde_json::Value,
    at: SystemTime,
}

/// The source: boots the guest, lets it run, then migrates it to the destination at `to`.
/// A destination process the demo kills (`--inject kill-destination=F`): its pid, the fraction.
#[derive(Clone, Copy)]
struct Kill {
    pid: u32,
    at_fraction: f64,
}

/// How long a primary whose backup was lost waits for a new one before it runs on unprotected.
const REPLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// A demo that kills an ft primary's backup: the primary says when protection starts, and is
/// handed where each replacement backup waits.
struct BackupSwap {
    protecting: std::sync::mpsc::Sender<Instant>,
    replacements: std::sync::mpsc::Receiver<String>,
}

/// Connects to `to`, trying again until `patience` ran out (a process just started may not
/// listen yet).
fn connect_retrying(to: &str, patience: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + patience;
    loop {
        match TcpStream::connect(to) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("connecting to {to}")),
        }
    }
}

fn source_half(a: &Args, to: &str, key: &PreSharedKey, kill: Option<Kill>, swap: Option<BackupSwap>) -> Result<Half> {
    let layout = layout(a)?;
    let mut rendezvous = TcpStream::connect(to).with_context(|| format!("connecting to the destination at {to}"))?;
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), a.backing)?);
    // A running guest's memory is populated: so is this one's, or its rate before migrating would
    // measure first-touch page allocation instead of the workload.
    source_mem.regions()[0].populate_write(guest::DATA_GPA, (data_pages(a) * guest::PAGE) as usize)?;
    let mut source = Vm::new(Memory::Plain(source_mem.clone()), a.vcpus)?;
    if let Some(path) = &a.observe {
        source.telemetry.output.connect(path).with_context(|| format!("the output observer at {}", path.display()))?;
    }
    boot(&mut source, a)?;
    // With reverse checkpoints the guest runs only where its lease is: here, from now on.
    let protected = (a.mode == Mode::Postcopy && a.checkpoint_ms > 0) || a.mode == Mode::Ft;
    let vm_id =
        format!("vm-{}-{}", std::process::id(), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_nanos());
    let terms =
        if protected { Some(protect::lease_terms(a, &vm_id, format!("source-{}", std::process::id()))?) } else { None };
    let mut lease = match &terms {
        Some(terms) => {
            let telemetry = source.telemetry.clone();
            Some(ferry::arbiter::LeaseKeeper::acquire(terms, terms.ttl, move || {
                telemetry.stop.store(true, Ordering::Release)
            })?)
        }
        None => None,
    };
    // Likewise KVM's page tables, or first-touch EPT faults would slow it.
    let prefaulted = source.prefault()?;
    let mut running = Some(source.start()?);
    let booted_at = Instant::now();
    let sampler = RateSampler::of(source.telemetry.clone(), None);
    // Serve pages on the address the destination reached us on, or on this host's Unix socket.
    let server = if a.local {
        if a.backing == Backing::Anonymous {
            bail!("--transport local shares guest memory: use --backing memfd or hugetlb");
        }
        let path = std::env::temp_dir().join(format!("ferry-vmm-{}.sock", std::process::id()));
        Server::Local(LocalPageServer::start(&path, source_mem.clone(), key.clone())?)
    } else {
        let page_addr = SocketAddr::new(rendezvous.local_addr()?.ip(), 0);
        let options = TcpOptions { encryption: a.encryption, ..TcpOptions::default() };
        Server::Tcp(Arc::new(TcpPageServer::start(page_addr, source_mem.clone(), key.clone(), options)?))
    };
    // The baseline is the guest's steady state: after a warm-up, the rate just before the pause.
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let baseline_rate = measure_rate(&source, a.seconds);
    // The warm-up is the raw limit of a fresh destination: all memory present, KVM's mappings of
    // it cold (built one first touch at a time; on this machine's shadow paging that is slow).
    let warmup = sampler.stop();
    let cold_series =
        warmup.series(booted_at, booted_at, booted_at + Duration::from_secs_f64(a.seconds), Duration::from_millis(50));
    let hello = Rendezvous {
        page_port: match &server {
            Server::Tcp(s) => s.local_addr().port(),
            Server::Local(_) => 0,
        },
        local_path: match &server {
            Server::Tcp(_) => None,
            Server::Local(s) => Some(s.path().display().to_string()),
        },
        mem_mib: a.mem_mib,
        page_size: layout.page_size(),
        vcpus: a.vcpus,
        backing: backing_name(a.backing).into(),
        mode: a.mode,
        prepager: a.prepager.name().into(),
        seconds: a.seconds,
        baseline_rate,
        vm_id: vm_id.clone(),
        checkpoint_ms: if protected { a.checkpoint_ms } else { 0 },
        recovery_window_ms: a.recovery_window_ms,
    };
    writeln!(rendezvous, "{}", serde_json::to_string(&hello)?)?;
    let mut control: Box<dyn ControlStream> = match &server {
        Server::Tcp(s) => Box::new(s.accept_control(Duration::from_secs(30))?),
        Server::Local(s) => Box::new(s.accept_control(Duration::from_secs(30))?),
    };
    let page_size = u64::from(layout.page_size());
    let free = source.telemetry.free_pages(layout.total_pages(), page_size);
    let mut dirty_log = match a.mode {
        Mode::Postcopy => None,
        Mode::Precopy | Mode::Hybrid | Mode::Ft => Some(source.dirty_log()?),
    };
    if a.mode == Mode::Ft {
        let mut report = json!({"baseline_rate": baseline_rate, "mode": "ft"});
        // Protected time, however many backups it takes.
        let mut left = Duration::from_secs_f64(a.seconds);
        let mut log = dirty_log.take().ok_or_else(|| anyhow!("no dirty log"))?;
        let mut terms = Vec::new();
        let swap = swap.as_ref();
        loop {
            let mut term = json!({});
            let side = ft::PrimarySide {
                vm: &source,
                memory: &source_mem,
                checkpoint_ms: a.checkpoint_ms,
                protecting: swap.map(|s| &s.protecting),
            };
            let lost = ft::run_primary(&side, control.as_mut(), log, &mut left, &mut term)?;
            terms.push(term);
            // A lost backup is made anew by a live copy, when one comes in time (and protected
            // time is left); meanwhile the guest runs unprotected (its output leaves at once).
            let Some(lost_at) = lost.filter(|_| !left.is_zero()).map(|_| Instant::now()) else { break };
            let next = swap.and_then(|s| s.replacements.recv_timeout(REPLACEMENT_WAIT).ok());
            let Some(next) = next else { break };
            let mut rendezvous = connect_retrying(&next, Duration::from_secs(10))?;
            writeln!(rendezvous, "{}", serde_json::to_string(&hello)?)?;
            control = match &server {
                Server::Tcp(s) => Box::new(s.accept_control(Duration::from_secs(30))?),
                Server::Local(s) => Box::new(s.accept_control(Duration::from_secs(30))?),
            };
            // Round 0 of the new backup's first copy pulls every page: the log starts afresh.
            log = source.dirty_log()?;
            let connected_ms = lost_at.elapsed().as_secs_f64() * 1e3;
            report["recreate_connect_ms"] = json!(connected_ms);
        }
        let first_copy_of_last = terms.last().and_then(|t| t["first_copy_ms"].as_f64());
        ft::summarize_terms(&mut report, terms);
        if let (Some(connect), Some(copy)) = (report["recreate_connect_ms"].as_f64(), first_copy_of_last) {
            // From the loss noticed to the new backup holding its first copy.
            report["recreate_ms"] = json!(connect + copy);
        }
        report["rate_unprotected"] = json!(baseline_rate);
        report["output_latency_p50_ms"] =
            json!(source.telemetry.output.held_latency_p50().map(|d| d.as_secs_f64() * 1e3));
        report["primary_rate_after"] = json!(measure_rate(&source, a.seconds.min(0.5)));
        let running = running.take().ok_or_else(|| anyhow!("the guest is not running"))?;
        let mismatches = self_check(&mut source, running)?;
        report["primary_guest_mismatches"] = json!(mismatches);
        let (emitted, released) = source.telemetry.output.counts();
        report["source_outputs"] = json!({"emitted": emitted, "released": released});
        drop(lease);
        return Ok(Half { report, at: SystemTime::now() });
    }
    let mut paused = None;
    let mut stopped_in_segment = false;
    let telemetry = source.telemetry.clone();
    let in_segment = telemetry.clone();
    // Told to stop only inside a task segment, a guest found outside runs on (task-guided).
    let mut pause = |rule: PauseRule| -> ferry::Result<Paused> {
        let vmm = |e: anyhow::Error| ferry::MigrationError::Vmm(e.to_string());
        let r = running.take().ok_or_else(|| ferry::MigrationError::Vmm("the guest is not running".into()))?;
        if let Err(still_running) = source.stop_in_segment(r, rule == PauseRule::Anyway).map_err(vmm)? {
            running = Some(still_running);
            return Ok(Paused::LeftSegment);
        }
        stopped_in_segment = in_segment.in_segment.load(Ordering::Acquire);
        paused = Some(SystemTime::now());
        source.save().map(Paused::Stopped).map_err(vmm)
    };
    let config = ferry::precopy::PrecopyConfig {
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
        task: a
            .task_guided
            .then(|| TaskGuidance { segments: telemetry.clone(), max_wait: Duration::from_millis(a.task_wait_ms) }),
        ..Default::default()
    };
    let mut report = json!({
        "baseline_rate": baseline_rate,
        "prefaulted": prefaulted,
        "mode": mode_name(a.mode),
        "cold_series_50ms": cold_series.iter().map(|&(ms, r, _)| [ms.round(), r.round()]).collect::<Vec<_>>(),
    });
    match (a.mode, dirty_log.as_mut()) {
        (Mode::Postcopy, _) | (_, None) => {
            let paused_at = Instant::now();
            let Paused::Stopped(blob) = pause(PauseRule::Anyway)? else {
                bail!("the guest was not stopped");
            };
            // Paused: the guest runs nowhere until the destination takes the lease.
            if let Some(lease) = lease.take() {
                lease.hand_over()?;
            }
            let cutter = match &server {
                Server::Tcp(s) if a.cut_lanes > 0 => {
                    Some(LaneCutter::start(s.clone(), a.cut_lanes, layout.total_pages()))
                }
                _ => None,
            };
            let killer = match (&server, kill) {
                (Server::Tcp(s), Some(kill)) => Some(Killer::start(s.clone(), kill, layout.total_pages())),
                _ => None,
            };
            let kept = protected.then(|| ferry::checkpoint::KeptImage::new(source_mem.clone()));
            let options = ferry::SourceOptions {
                liveness: config.liveness,
                recovery_window: Duration::from_millis(a.recovery_window_ms),
                // A destination whose control lane broke opens it again on the page server.
                reaccept: Some(match &server {
                    Server::Tcp(s) => s.as_ref() as &dyn ferry::ControlAcceptor,
                    Server::Local(s) => s as &dyn ferry::ControlAcceptor,
                }),
                kept: kept.as_ref(),
            };
            let r = run_source(control.as_mut(), paused_at, &blob, &free, &options);
            if let Some(cutter) = cutter {
                report["lane_cuts"] = json!(cutter.stop());
            }
            let killed_at = killer.and_then(Killer::stop);
            report["restarted_on_source"] = json!(false);
            if let Some(kept) = &kept {
                let (applied, pages) = kept.applied();
                report["checkpoints_applied"] = json!(applied);
                report["checkpoint_pages_applied"] = json!(pages);
            }
            match (r, &kept) {
                (Ok(r), _) => {
                    report["source_downtime_ms"] = json!(r.downtime.as_secs_f64() * 1e3);
                    report["total_ms"] = json!(r.total.as_secs_f64() * 1e3);
                }
                (Err(e), Some(kept)) => {
                    let failed_at = Instant::now();
                    report["destination_error"] = json!(e.to_string());
                    // The destination stops its guest and gives the lease up, or its lease runs
                    // out: only then may the guest run here again.
                    let terms = terms.as_ref().expect("a source keeps an image only when protected");
                    let wait = terms.ttl * 2 + Duration::from_millis(a.recovery_window_ms);
                    let telemetry = source.telemetry.clone();
                    lease = Some(ferry::arbiter::LeaseKeeper::acquire(terms, wait, move || {
                        telemetry.stop.store(true, Ordering::Release)
                    })?);
                    let epoch = protect::restart(&mut source, kept, &blob)?;
                    let restarted = source.start()?;
                    let restarted_at = Instant::now();
                    report["restarted_on_source"] = json!(true);
                    report["source_downtime_ms"] = json!(kept.downtime().map(|d| d.as_secs_f64() * 1e3));
                    report["restart_epoch"] = json!(epoch);
                    report["lease_wait_ms"] = json!((restarted_at - failed_at).as_secs_f64() * 1e3);
                    report["total_ms"] = json!((restarted_at - paused_at).as_secs_f64() * 1e3);
                    if let Some(killed_at) = killed_at {
                        // From the SIGKILL to the guest running here again.
                        report["failover_ms"] = json!((restarted_at - killed_at).as_secs_f64() * 1e3);
                    }
                    // What the restart took back: the guest's time since the epoch it resumed
                    // from (or since the handoff), during which its work was done and lost.
                    let since = kept.last_applied_at().unwrap_or(paused_at);
                    report["work_lost_ms"] = json!((restarted_at - since).as_secs_f64() * 1e3);
                    report["rate_after"] = json!(measure_rate(&source, a.seconds));
                    let mismatches = self_check(&mut source, restarted)?;
                    report["guest_mismatches"] = json!(mismatches);
                    if mismatches != 0 {
                        bail!("the guest restarted on the source found {mismatches} wrong pages: {report}");
                    }
                }
                (Err(e), None) => return Err(e.into()),
            }
        }
        (Mode::Precopy, Some(log)) => {
            let r = ferry::precopy::run_source_guided(control.as_mut(), page_size, log, &mut pause, &config)?;
            report["total_ms"] = json!(r.total.as_secs_f64() * 1e3);
            report["source_downtime_ms"] = json!(r.downtime.as_secs_f64() * 1e3);
            report["rounds"] = json!(r.rounds);
            task_report(&mut report, &r, stopped_in_segment);
            report["pages_per_round"] = json!(r.pages_per_round);
            report["predicted_downtime_ms"] = json!(r.predicted_downtime.as_secs_f64() * 1e3);
            report["bandwidth_gbps"] = json!(r.bandwidth / 1e9);
        }
        (Mode::Ft, Some(_)) => bail!("an ft primary runs above"),
        (Mode::Hybrid, Some(log)) => {
            let (pre, post) =
                ferry::precopy::run_hybrid_source_guided(control.as_mut(), page_size, log, &mut pause, &config)?;
            task_report(&mut report, &pre, stopped_in_segment);
            report["total_ms"] = json!(pre.total.as_secs_f64() * 1e3);
            report["source_downtime_ms"] = json!(post.downtime.as_secs_f64() * 1e3);
            report["precopy_rounds"] = json!(pre.rounds);
            report["pages_per_round"] = json!(pre.pages_per_round);
        }
    }
    // Local reads are one-sided: the source sees none of them, the destination counts installs.
    if let Server::Tcp(server) = &server {
        let served_again = server.stats().pages_served_twice.load(Ordering::Relaxed);
        match a.mode {
            // Post-copy's invariant: every page crosses at most once.
            Mode::Postcopy => report["pages_sent_twice"] = json!(served_again),
            // Pre-copy rounds send a page again when the guest dirtied it after its last round.
            Mode::Precopy | Mode::Hybrid | Mode::Ft => report["pages_resent"] = json!(served_again),
        }
    }
    let (emitted, released) = source.telemetry.output.counts();
    report["source_outputs"] = json!({"emitted": emitted, "released": released});
    drop(lease);
    let at = paused.ok_or_else(|| anyhow!("the source never paused"))?;
    Ok(Half { report, at })
}

/// Where the guest stopped and how long the source waited for it (`task_wait_ms` is 0 without
/// guidance: the source never waits).
fn task_report(report: &mut serde_json::Value, r: &ferry::precopy::PrecopyReport, stopped_in_segment: bool) {
    report["task_guided"] = json!(r.task.is_some());
    report["stopped_in_segment"] = json!(stopped_in_segment);
    let outcome = r.task.clone().unwrap_or_default();
    report["task_wait_ms"] = json!(outcome.waited.as_secs_f64() * 1e3);
    report["task_gave_up"] = json!(outcome.gave_up);
    report["task_held_back"] = json!(outcome.held_back);
    report["task_extra_rounds"] = json!(outcome.extra_rounds);
}

/// The workload's rate over `seconds`.
/// The guest's progress per second over `seconds`, or longer (up to 10 s) until it reported some:
/// a guest on a loaded host reports in bursts, and a window between two bursts would say it
/// stood still.
fn measure_rate(vm: &Vm, seconds: f64) -> f64 {
    let (started, p0) = (Instant::now(), vm.telemetry.progress.load(Ordering::Relaxed));
    let (window, longest) = (Duration::from_secs_f64(seconds), Duration::from_secs(10));
    std::thread::sleep(window);
    while vm.telemetry.progress.load(Ordering::Relaxed) == p0 && started.elapsed() < longest {
        std::thread::sleep(Duration::from_millis(10));
    }
    (vm.telemetry.progress.load(Ordering::Relaxed) - p0) as f64 / started.elapsed().as_secs_f64()
}

/// Destination memory prepared for the source's mode.
enum Prepared {
    /// Registered with userfaultfd: post-copy.
    Arriving(Arc<DestinationMemory>),
    /// Plain memory that rounds are pulled into: pre-copy and hybrid.
    Plain(Arc<GuestMemory>),
}

/// The destination's resume: load the vCPU state, start the vCPUs, note when.
fn resume(
    dest: &mut Vm,
    blob: &[u8],
    running: &mut Option<vm::Running>,
    resumed: &mut Option<(SystemTime, Instant)>,
) -> std::result::Result<(), String> {
    dest.restore(blob).map_err(|e| e.to_string())?;
    *running = Some(dest.start().map_err(|e| e.to_string())?);
    *resumed = Some((SystemTime::now(), Instant::now()));
    Ok(())
}

/// The destination: waits for a source on `listener`, builds the VM it describes, receives the
/// guest in the source's mode, and has it check its own memory.
/// Waits for a source's rendezvous on `listener`. A connection that does not send a sound
/// rendezvous line within 10 s (a port scan, a stray HTTP request) is dropped with a note, and
/// the wait goes on: it cannot end the receive.
fn accept_rendezvous(listener: &TcpListener) -> Result<(SocketAddr, Rendezvous, Backing, PolicyKind)> {
    loop {
        let (rendezvous, peer) = listener.accept()?;
        let read = || -> Result<(Rendezvous, Backing, PolicyKind)> {
            rendezvous.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut line = String::new();
            BufReader::new((&rendezvous).take(MAX_RENDEZVOUS_BYTES)).read_line(&mut line)?;
            let rv: Rendezvous = serde_json::from_str(line.trim()).context("not a rendezvous line")?;
            // Not yet authenticated: bound what it can make us allocate or compute.
            if rv.mem_mib == 0 || rv.mem_mib > MAX_GUEST_MIB || rv.vcpus == 0 || rv.vcpus > vm::MAX_VCPUS {
                bail!(
                    "it asks for {} MiB and {} vCPUs (1 to {MAX_GUEST_MIB} MiB, 1 to {} vCPUs)",
                    rv.mem_mib,
                    rv.vcpus,
                    vm::MAX_VCPUS
                );
            }
            if !(0.0..=3600.0).contains(&rv.seconds) || !rv.baseline_rate.is_finite() || rv.baseline_rate < 0.0 {
                bail!("it asks for {} s phases at a baseline of {} writes/s", rv.seconds, rv.baseline_rate);
            }
            if rv.checkpoint_ms > 60_000 || !(1..=600_000).contains(&rv.recovery_window_ms) {
                bail!(
                    "it asks for checkpoints every {} ms and a {} ms recovery window",
                    rv.checkpoint_ms,
                    rv.recovery_window_ms
                );
            }
            protect::check_vm_id(&rv.vm_id)?;
            let backing = match rv.backing.as_str() {
                "anon" => Backing::Anonymous,
                "memfd" => Backing::Memfd,
                "hugetlb" => Backing::HugetlbMemfd,
                other => bail!("it asks for backing {other:?}"),
            };
            let prepager: PolicyKind = rv.prepager.parse().map_err(|e: String| anyhow!(e))?;
            Ok((rv, backing, prepager))
        };
        match read() {
            Ok((rv, backing, prepager)) => return Ok((peer, rv, backing, prepager)),
            Err(e) => eprintln!("ferry-vmm: ignoring a connection from {peer}: {e:#}"),
        }
    }
}

/// `copied` hears when an ft backup holds its first copy.
fn destination_half(
    listener: &TcpListener,
    key: &PreSharedKey,
    a: &Args,
    copied: Option<&std::sync::mpsc::Sender<Instant>>,
) -> Result<Half> {
    let (peer, rv, backing, prepager) = accept_rendezvous(listener)?;
    let layout = MemoryLayout::new(
        rv.page_size,
        vec![ferry_transport::RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(0), size: rv.mem_mib << 20 }],
    )?;
    // Memory and VM first: the source may pause its guest as soon as our control lane connects,
    // and nothing slow (mapping, registering, memory slots) belongs in the downtime.
    let (mut dest, prepared) = match rv.mode {
        Mode::Postcopy => {
            let m = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), backing)?)?);
            (Vm::new(Memory::Arriving(m.clone()), rv.vcpus)?, Prepared::Arriving(m))
        }
        Mode::Precopy | Mode::Hybrid | Mode::Ft => {
            let m = Arc::new(GuestMemory::create(layout.clone(), backing)?);
            (Vm::new(Memory::Plain(m.clone()), rv.vcpus)?, Prepared::Plain(m))
        }
    };
    let (lanes, mut control, transport): (_, Box<dyn ControlStream>, _) = match &rv.local_path {
        Some(path) => {
            let (lanes, control) = local::connect_session(path, key, Some(&layout), 32)?;
            (lanes, Box::new(control), "local")
        }
        None => {
            let addr = SocketAddr::new(peer.ip(), rv.page_port);
            let options = TcpOptions { encryption: a.encryption, ..TcpOptions::default() };
            let (lanes, control) = tcp::connect_session(addr, key, Some(&layout), &options)?;
            let transport = if control.is_encrypted() { "tcp+tls" } else { "tcp" };
            (lanes, Box::new(control), transport)
        }
    };
    let mut report =
        json!({ "mode": mode_name(rv.mode), "mem_mib": rv.mem_mib, "vcpus": rv.vcpus, "transport": transport });
    if let Some(path) = &a.observe {
        dest.telemetry.output.connect(path).with_context(|| format!("the output observer at {}", path.display()))?;
    }
    // Reverse checkpoints: the source keeps the guest restartable until every page is here.
    let protection = match (&prepared, rv.checkpoint_ms) {
        (Prepared::Arriving(_), ms) if ms > 0 => {
            let terms = protect::lease_terms(a, &rv.vm_id, format!("destination-{}", std::process::id()))?;
            Some(protect::protection(&dest, Duration::from_millis(ms), Some(terms))?)
        }
        _ => None,
    };
    let pages: Option<rate::Counter> = match &prepared {
        Prepared::Arriving(m) => {
            let m = m.clone();
            Some(Arc::new(move || m.states().present_count()))
        }
        Prepared::Plain(_) => None,
    };
    let sampler = RateSampler::of(dest.telemetry.clone(), pages);
    let mut running = None;
    let mut resumed = None;
    let config = EngineConfig {
        policy: prepager,
        recovery_window: Duration::from_millis(rv.recovery_window_ms),
        ..EngineConfig::default()
    };
    let mut lease = None;
    let mut ft_lease = None;
    let session = match prepared {
        Prepared::Plain(m) if rv.mode == Mode::Ft => {
            let terms = protect::lease_terms(a, &rv.vm_id, format!("backup-{}", std::process::id()))?;
            let outcome = ft::run_backup(&mut dest, &m, control.as_mut(), lanes, &terms, copied)?;
            for (k, v) in outcome.report.as_object().into_iter().flatten() {
                report[k] = v.clone();
            }
            ft_lease = outcome.lease;
            match outcome.running {
                Some(r) => {
                    running = Some(r);
                    resumed = Some((SystemTime::now(), Instant::now()));
                }
                // The primary ended protection and still runs the guest.
                None => {
                    drop(sampler.stop());
                    return Ok(Half { report, at: SystemTime::now() });
                }
            }
            None
        }
        Prepared::Arriving(m) => {
            Some(PostcopyDestination::start_with(control, m, lanes, &config, protection, |blob| {
                resume(&mut dest, blob, &mut running, &mut resumed)
            })?)
        }
        Prepared::Plain(m) if rv.mode == Mode::Precopy => {
            ferry::precopy::run_destination(control.as_mut(), &m, lanes, |blob| {
                resume(&mut dest, blob, &mut running, &mut resumed)
            })?;
            None
        }
        Prepared::Plain(m) => {
            let (_, session) = ferry::precopy::run_hybrid_destination(control, m, lanes, &config, |blob| {
                resume(&mut dest, blob, &mut running, &mut resumed)
            })?;
            Some(session)
        }
    };
    if a.command == "receive" {
        // Scripts that break the link mid-migration wait for this line.
        eprintln!("ferry-vmm: the guest runs here");
    }
    let mut postcopy_done = None;
    if let Some(session) = session {
        let bar = ProgressBar::start(session.memory().clone(), session.engine().stats_handle());
        let timeline = ferry::timeline::Timeline::start(
            session.memory().clone(),
            session.engine().stats_handle(),
            Duration::from_millis(50),
        )?;
        if prepager == PolicyKind::Demand {
            // Demand paging alone never brings the pages the guest does not touch: after the
            // workload's phase, sweep them (reported as swept_pages).
            std::thread::sleep(Duration::from_secs_f64(rv.seconds));
            session.finish();
        }
        let r = session.wait();
        postcopy_done = Some(Instant::now());
        bar.stop();
        // [ms since the handoff, pages present, urgent pages, bulk pages, network faults, blocktime ms]
        report["timeline_50ms"] = json!(timeline
            .stop()
            .iter()
            .map(|p| [
                (p.at.as_secs_f64() * 1e3).round(),
                p.pages_present as f64,
                p.urgent_pages as f64,
                p.bulk_pages as f64,
                p.network_faults as f64,
                p.blocktime.as_secs_f64() * 1e3
            ])
            .collect::<Vec<_>>());
        let r = r?;
        report["prepager"] = json!(r.policy);
        report["pivot_pages"] = json!(r.pivot_pages);
        report["swept_pages"] = json!(r.swept_pages);
        report["pages_total"] = json!(r.pages_total);
        report["urgent_pages"] = json!(r.urgent_pages);
        report["bulk_pages"] = json!(r.bulk_pages);
        report["postcopy_pages"] = json!(r.urgent_pages + r.bulk_pages);
        report["zero_pages"] = json!(r.zero_pages);
        report["skipped_free_pages"] = json!(r.skipped_free_pages);
        report["network_faults"] = json!(r.network_faults);
        report["faults_avoided"] = json!(r.inflight_faults + r.local_faults);
        report["fault_p50_us"] = json!(r.fault_p50.as_secs_f64() * 1e6);
        report["fault_p99_us"] = json!(r.fault_p99.as_secs_f64() * 1e6);
        report["blocktime_ms"] = json!(r.blocktime.as_secs_f64() * 1e3);
        // QEMU's names: the time vCPUs waited on faults (ms), and fault latencies where bucket N
        // counts faults in [2^N, 2^(N+1)) us.
        report["postcopy-blocktime"] = json!(r.blocktime.as_secs_f64() * 1e3);
        report["postcopy-latency-dist"] = json!(r.fault_histogram_us);
        report["pages_installed_twice"] = json!(r.pages_installed_twice);
        report["recoveries"] = json!(r.recoveries);
        report["pages_resent"] = json!(r.resent_pages);
        report["paused_ms"] = json!(r.paused.as_secs_f64() * 1e3);
        let c = &r.checkpoints;
        report["checkpoints"] = json!(c.committed);
        report["checkpoints_failed"] = json!(c.failed);
        report["checkpoints_skipped"] = json!(c.skipped);
        report["checkpoint_pages"] = json!(c.pages);
        report["checkpoint_pause_ms"] = json!(c.paused.as_secs_f64() * 1e3);
        report["checkpoint_longest_pause_ms"] = json!(c.longest_pause.as_secs_f64() * 1e3);
        // The guest runs here now: the lease stays held while it does.
        lease = r.lease.clone();
    }
    let running = running.ok_or_else(|| anyhow!("the destination never resumed"))?;
    let (at, resumed_at) = resumed.ok_or_else(|| anyhow!("the destination never resumed"))?;
    report["rate_after"] = json!(measure_rate(&dest, rv.seconds));
    let samples = sampler.stop();
    report["baseline_rate"] = json!(rv.baseline_rate);
    if let Some(done) = postcopy_done {
        // The post-copy interval: from the guest running here to every page present.
        let during = samples.rate(resumed_at, done);
        report["postcopy_ms"] = json!((done - resumed_at).as_secs_f64() * 1e3);
        report["rate_during"] = json!(during);
        report["rate_during_over_baseline"] = json!(during / rv.baseline_rate.max(1e-9));
        let lost = samples.work_lost(resumed_at, done, rv.baseline_rate, Duration::from_millis(10));
        report["work_lost_postcopy_ms"] = json!(lost.as_secs_f64() * 1e3);
    }
    let end = samples.last_time().unwrap_or(resumed_at);
    let series = samples.series(resumed_at, resumed_at, end, Duration::from_millis(50));
    // [ms since resume, guest rate, pages present] every 50 ms.
    report["rate_series_50ms"] =
        json!(series.iter().map(|&(ms, r, pages)| [ms.round(), r.round(), pages as f64]).collect::<Vec<_>>());
    let mismatches = self_check(&mut dest, running)?;
    report["guest_mismatches"] = json!(mismatches);
    let (emitted, released) = dest.telemetry.output.counts();
    report["destination_outputs"] = json!({"emitted": emitted, "released": released});
    drop(lease);
    drop(ft_lease);
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages after migration: {report}");
    }
    Ok(Half { report, at })
}

/// Memory arrived out of all, its rate, the network faults and the time left, drawn on stderr
/// by indicatif while post-copy brings memory in (nothing when stderr is not a terminal).
struct ProgressBar {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressBar {
    fn start(memory: Arc<DestinationMemory>, stats: Arc<ferry::fault_handler::FaultStats>) -> Self {
        use std::io::IsTerminal;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let done = done.clone();
            std::thread::spawn(move || {
                let page = u64::from(memory.guest().layout().page_size());
                let bar = indicatif::ProgressBar::new(memory.states().pages() * page);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} memory [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                    )
                    .expect("a valid template")
                    .progress_chars("#>-"),
                );
                while !done.load(Ordering::Acquire) {
                    bar.set_position(memory.states().present_count() * page);
                    bar.set_message(format!("{} network faults", stats.network_faults.load(Ordering::Relaxed)));
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.set_position(memory.states().present_count() * page);
                bar.finish_with_message("all present");
            })
        });
        ProgressBar { done, thread }
    }

    fn stop(mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Both halves in this process, over tcp loopback: one report, with the downtime measured from
/// the last source vCPU stopping to the first destination vCPU starting.
fn demo(a: &Args) -> Result<()> {
    let observer =
        output::Observer::start(std::env::temp_dir().join(format!("ferry-observer-{}.sock", std::process::id())))?;
    let mut a = a.clone();
    a.observe = Some(observer.path().to_path_buf());
    if let Some(at_fraction) = a.kill_destination {
        return demo_killing_the_destination(&a, observer, at_fraction);
    }
    if let Some(after) = a.kill_primary {
        return demo_killing_the_primary(&a, observer, after);
    }
    if let Some(after) = a.kill_backup {
        return demo_killing_the_backup(&a, observer, after);
    }
    if a.trips > 1 {
        return trips::demo_trips(&a);
    }
    let a = &a;
    let key = PreSharedKey::generate()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let to = listener.local_addr()?.to_string();
    let destination = {
        let (key, a) = (key.clone(), a.clone());
        std::thread::spawn(move || destination_half(&listener, &key, &a, None))
    };
    // A source that failed may have left the destination waiting for it: report the failure
    // without joining (the process ends with it).
    let source = source_half(a, &to, &key, None, None)?;
    let destination = destination.join().map_err(|_| anyhow!("the destination thread panicked"))?;
    if source.report["restarted_on_source"] == json!(true) {
        // The destination failed and the source took the guest back: its report is the one.
        let mut report = source.report;
        report["destination_failure"] = json!(destination.err().map(|e| format!("{e:#}")));
        return finish_report(a, report, observer);
    }
    let destination = destination?;
    let mut report = destination.report;
    for (k, v) in source.report.as_object().into_iter().flatten() {
        report[k] = v.clone();
    }
    let downtime = destination.at.duration_since(source.at).unwrap_or_default();
    report["downtime_ms"] = json!(downtime.as_secs_f64() * 1e3);
    if let Some(postcopy) = report["work_lost_postcopy_ms"].as_f64() {
        // The guest did no work during the downtime, then lost this much while memory arrived.
        report["work_lost_ms"] = json!(downtime.as_secs_f64() * 1e3 + postcopy);
    }
    if let (Some(ms), Some(during)) = (report["postcopy_ms"].as_f64(), report["rate_during"].as_f64()) {
        // A fresh VM over the same time from its start, with every page present (the source's
        // warm-up): what the guest would do at a destination if memory had arrived in no time.
        let cold: Vec<f64> = report["cold_series_50ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p[0].as_f64().unwrap_or(f64::MAX) < ms.max(50.0))
            .filter_map(|p| p[1].as_f64())
            .collect();
        if !cold.is_empty() {
            let cold_rate = cold.iter().sum::<f64>() / cold.len() as f64;
            report["cold_rate"] = json!(cold_rate);
            report["rate_during_over_cold"] = json!(during / cold_rate.max(1e-9));
        }
    }
    // Pages served again because a cut lane's reads were asked again are resends, not a second
    // send: only what is left beyond them (and any second install) would be a bug.
    let served_twice = report["pages_sent_twice"].as_u64().unwrap_or(0);
    let resent = report["pages_resent"].as_u64().unwrap_or(0);
    let twice = served_twice.saturating_sub(resent) + report["pages_installed_twice"].as_u64().unwrap_or(0);
    report["pages_sent_twice"] = json!(twice);
    finish_report(a, report, observer)
}

/// Adds what the output observer saw (every VMM of the demo has closed its end) and prints.
fn finish_report(a: &Args, mut report: serde_json::Value, observer: output::Observer) -> Result<()> {
    report["workload"] = json!(a.workload.name());
    if a.mode == Mode::Ft {
        // Who runs the guest at the end, as each side's own report says: the primary unless it
        // was killed, and a backup that took over.
        let live = |yes: bool| u64::from(yes);
        report["live_primaries"] = json!(
            live(report["primary_killed"] != json!(true))
                + live(report["took_over"] == json!(true))
                + live(report["new_backup"]["took_over"] == json!(true))
        );
    }
    report["rate_before"] = report["baseline_rate"].clone();
    for (k, v) in serde_json::to_value(observer.finish())?.as_object().into_iter().flatten() {
        report[k] = v.clone();
    }
    print_report(a, &report)
}

/// A fresh pre-shared key as hex, for a demo's second process.
fn random_key_hex() -> Result<String> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

/// `demo --mode ft --inject kill-primary=S`: the primary runs as its own process (`ferry-vmm
/// migrate --mode ft`), SIGKILLed S seconds after the backup (here) holds its first copy; the
/// backup takes over.
fn demo_killing_the_primary(a: &Args, observer: output::Observer, after: f64) -> Result<()> {
    use std::process::{Command, Stdio};
    if a.mode != Mode::Ft {
        bail!("--inject kill-primary needs --mode ft");
    }
    let key_hex = random_key_hex()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let to = listener.local_addr()?.to_string();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["migrate", "--mode", "ft", "--json", "--to", &to, "--key-hex", &key_hex])
        .args(["--mem-mib", &a.mem_mib.to_string(), "--vcpus", &a.vcpus.to_string()])
        .args(["--workload", a.workload.name(), "--backing", backing_name(a.backing)])
        .args(["--seconds", &a.seconds.to_string(), "--checkpoint-ms", &a.checkpoint_ms.to_string()])
        .args(a.data_mib.map(|d| ["--data-mib".to_string(), d.to_string()]).into_iter().flatten())
        .args(a.etcd.as_ref().map(|e| ["--etcd", e.as_str()]).into_iter().flatten())
        .arg("--lease-dir")
        .arg(&a.lease_dir)
        .arg("--observe")
        .arg(observer.path())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the primary process")?;
    let (copied_tx, copied_rx) = std::sync::mpsc::channel::<Instant>();
    let pid = child.id();
    let killer = std::thread::spawn(move || -> Option<SystemTime> {
        let copied = copied_rx.recv().ok()?;
        std::thread::sleep(Duration::from_secs_f64(after).saturating_sub(copied.elapsed()));
        // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        (rc == 0).then(SystemTime::now)
    });
    let backup = destination_half(&listener, &PreSharedKey::from_hex(&key_hex)?, a, Some(&copied_tx));
    drop(copied_tx);
    if backup.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let killed_at = killer.join().ok().flatten();
    let backup = backup?;
    let mut report = backup.report;
    use std::os::unix::process::ExitStatusExt;
    report["primary_killed"] = json!(status.signal() == Some(libc::SIGKILL));
    report["kill_after_s"] = json!(after);
    if let (Some(killed), true) = (killed_at, report["took_over"] == json!(true)) {
        // From the SIGKILL to the guest running here.
        report["failover_ms"] = json!(backup.at.duration_since(killed).unwrap_or_default().as_secs_f64() * 1e3);
    }
    finish_report(a, report, observer)
}

/// Starts `ferry-vmm receive` as a process of its own (its stdout to `stdout`, its log lines to
/// ours, prefixed with `who`); the process and the address it waits on.
fn spawn_receiver(
    a: &Args,
    key_hex: &str,
    observer: &output::Observer,
    stdout: std::process::Stdio,
    who: &'static str,
) -> Result<(std::process::Child, String)> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["receive", "--listen", "127.0.0.1:0", "--json", "--key-hex", key_hex, "--lease-dir"])
        .arg(&a.lease_dir)
        .args(a.etcd.as_ref().map(|e| ["--etcd", e.as_str()]).into_iter().flatten())
        .arg("--observe")
        .arg(observer.path())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {who} process"))?;
    // Its address is on its first line: "ferry-vmm: receiving on ADDR".
    let mut stderr = BufReader::new(child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?);
    let mut line = String::new();
    stderr.read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("ferry-vmm: receiving on ") else {
        let _ = child.kill();
        bail!("the {who} process said {line:?}");
    };
    let addr = addr.to_string();
    // The rest of what it says (it may die mid-sentence) goes to ours.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(std::result::Result::ok) {
            eprintln!("{who}: {line}");
        }
    });
    Ok((child, addr))
}

/// `demo --mode ft --inject kill-backup=S`: the primary runs here, each backup as its own process
/// (`ferry-vmm receive`); the first is SIGKILLed S seconds into protection, and the primary makes
/// a new one by a live copy while its guest runs on. The report is the primary's, with what the
/// new backup saw.
fn demo_killing_the_backup(a: &Args, observer: output::Observer, after: f64) -> Result<()> {
    use std::process::Stdio;
    if a.mode != Mode::Ft || a.local {
        bail!("--inject kill-backup needs --mode ft over tcp");
    }
    let key_hex = random_key_hex()?;
    let (mut first, to) = spawn_receiver(a, &key_hex, &observer, Stdio::null(), "backup")?;
    let (protecting_tx, protecting) = std::sync::mpsc::channel();
    let (replacements_tx, replacements) = std::sync::mpsc::channel();
    let primary = {
        let (a, key) = (a.clone(), PreSharedKey::from_hex(&key_hex)?);
        let swap = BackupSwap { protecting: protecting_tx, replacements };
        std::thread::spawn(move || source_half(&a, &to, &key, None, Some(swap)))
    };
    // The first backup dies S seconds into protection; a new one waits for the primary.
    let killed = protecting.recv().ok().map(|since: Instant| {
        std::thread::sleep(Duration::from_secs_f64(after).saturating_sub(since.elapsed()));
        Instant::now()
    });
    // Killed on time, or now: a primary that never protected left its backup waiting.
    let _ = first.kill();
    let first_status = first.wait()?;
    let second = match killed {
        Some(_) => {
            let (child, addr) = spawn_receiver(a, &key_hex, &observer, Stdio::piped(), "new backup")?;
            let _ = replacements_tx.send(addr);
            Some(child)
        }
        None => None,
    };
    drop(replacements_tx);
    let primary = primary.join().map_err(|_| anyhow!("the primary thread panicked"));
    // A primary whose protection ended before the new backup came never connects to it: the new
    // backup, still waiting, is stopped rather than waited for.
    let second = second.map(|child| finish_or_kill(child, Duration::from_secs(30))).transpose()?;
    let mut report = primary??.report;
    use std::os::unix::process::ExitStatusExt;
    report["backup_killed"] = json!(first_status.signal() == Some(libc::SIGKILL));
    report["kill_after_s"] = json!(after);
    if let Some(out) = second {
        let said = String::from_utf8_lossy(&out.stdout);
        let new_backup: serde_json::Value =
            said.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
        report["new_backup"] = new_backup;
        report["new_backup_exit"] = json!(out.status.code());
    }
    finish_report(a, report, observer)
}

/// Waits up to `patience` for `child` to end on its own, then kills it; what it printed.
fn finish_or_kill(mut child: std::process::Child, patience: Duration) -> Result<std::process::Output> {
    let deadline = Instant::now() + patience;
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    Ok(child.wait_with_output()?)
}

/// `demo --inject kill-destination=F`: the destination runs as its own process (`ferry-vmm
/// receive`), which is SIGKILLed once that fraction of the pages has crossed; the source restarts
/// the guest from its image and the last reverse checkpoint.
fn demo_killing_the_destination(a: &Args, observer: output::Observer, at_fraction: f64) -> Result<()> {
    use std::process::Stdio;
    // The kill is timed by the tcp page server's count of pages served, in post-copy.
    if a.mode != Mode::Postcopy || a.local {
        bail!("--inject kill-destination needs --mode postcopy over tcp");
    }
    let key_hex = random_key_hex()?;
    let (mut child, addr) = spawn_receiver(a, &key_hex, &observer, Stdio::null(), "destination")?;
    let kill = Kill { pid: child.id(), at_fraction };
    let source = source_half(a, &addr, &PreSharedKey::from_hex(&key_hex)?, Some(kill), None);
    if source.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let mut report = source?.report;
    use std::os::unix::process::ExitStatusExt;
    report["destination_killed"] = json!(status.signal() == Some(libc::SIGKILL));
    report["kill_at_fraction"] = json!(at_fraction);
    report["checkpoints"] = report["checkpoints_applied"].clone();
    // The destination's own counters, and what it saw of the guest, died with it.
    for k in ["recoveries", "paused_ms", "pages_resent", "pages_installed_twice", "rate_during"] {
        report[k] = serde_json::Value::Null;
    }
    // As the source measured it: from its pause to the destination saying its guest runs.
    report["downtime_ms"] = report["source_downtime_ms"].clone();
    finish_report(a, report, observer)
}

/// One JSON line with every field (`--json`), or a summary a person reads at a glance.
fn print_report(a: &Args, out: &serde_json::Value) -> Result<()> {
    if a.json {
        println!("{out}");
    } else {
        print!("{}", summary::summary(&a.command, out));
    }
    if let Some(path) = &a.plot {
        plot::write(path, out)?;
        if !a.json {
            println!("plot           {}", path.display());
        }
    }
    Ok(())
}
