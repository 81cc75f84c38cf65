//! `ferry-vmm`, ferry's reference VMM: runs a KVM guest whose workload runs at CPL3 and migrates
//! it with ferry.
//!
//! ```text
//! ferry-vmm run  [--mem-mib 256] [--data-mib N] [--workload idle|seq-write|rand-write|read-mostly|hot-set]
//!                [--guest FILE] [--rate-mib N] [--vcpus N]
//!                [--seconds 2] [--json]
//! ferry-vmm demo [--mem-mib 2048] [--data-mib 512] [--workload ...] [--mode postcopy]
//!                [--mode postcopy|precopy|hybrid] [--prepager demand|push|bubbling] [--downtime-ms 50]
//!                [--max-rounds 30] [--transport tcp] [--backing anon|memfd|hugetlb] [--vcpus N] [--json]
//! ```
//! `demo` runs both ends in this process: a source VM runs the workload, is paused and handed
//! over; a destination VM resumes at once while ferry brings its memory; then the guest checks its
//! own memory and the report is printed.

mod guest;
mod vm;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::prepager::PolicyKind;
use ferry::{run_source, DestinationConfig, PostcopyDestination};
use ferry_fault_handler::DestinationMemory;
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use guest::Workload;
use serde_json::json;
use vm::{Memory, Vm};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Postcopy,
    Precopy,
    Hybrid,
}

struct Args {
    command: String,
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
}

fn parse() -> Result<Args> {
    let mut raw = std::env::args().skip(1);
    let command = raw.next().ok_or_else(|| anyhow!("usage: ferry-vmm run|demo [options]"))?;
    let mut a = Args {
        command,
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
    };
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--mem-mib" => a.mem_mib = value()?.parse()?,
            "--mem" => a.mem_mib = parse_size(&value()?)?,
            "--data-mib" => a.data_mib = Some(value()?.parse()?),
            "--workload" => a.workload = value()?.parse().map_err(|e: String| anyhow!(e))?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--rate-mib" => a.rate_mib = Some(value()?.parse()?),
            "--guest" => a.guest_file = Some(value()?.into()),
            "--vcpus" => a.vcpus = value()?.parse()?,
            "--prepager" => a.prepager = value()?.parse().map_err(|e: String| anyhow!(e))?,
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "postcopy" => Mode::Postcopy,
                    "precopy" => Mode::Precopy,
                    "hybrid" => Mode::Hybrid,
                    other => bail!("--mode {other}: postcopy, precopy or hybrid"),
                }
            }
            "--downtime-ms" => a.downtime_ms = value()?.parse()?,
            "--max-rounds" => a.max_rounds = value()?.parse()?,
            "--transport" => {
                let t = value()?;
                if t != "tcp" {
                    bail!("--transport {t}: the demo runs over tcp");
                }
            }
            "--backing" => {
                a.backing = match value()?.as_str() {
                    "anon" => Backing::Anonymous,
                    "memfd" => Backing::Memfd,
                    "hugetlb" => Backing::HugetlbMemfd,
                    other => bail!("--backing {other}: anon, memfd or hugetlb"),
                }
            }
            "--json" => a.json = true,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(a)
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
    Ok(MemoryLayout::new(page_size, vec![ferry_transport::RegionLayout { guest_phys_addr: 0, size: a.mem_mib << 20 }])?)
}

fn main() -> Result<()> {
    let a = parse()?;
    match a.command.as_str() {
        "run" => run(&a),
        "demo" => demo(&a),
        other => bail!("unknown command {other:?}: run or demo"),
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
        println!(
            "{}",
            json!({"guest": a.guest_file.as_ref().map(|p| p.display().to_string()), "rate": rate, "task_segments": segments})
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
        None => vm.boot(a.workload, data_pages(a), a.rate_mib),
    }
}

/// The source side of a demo: a booted guest running its workload, and a page server over its memory.
fn start_source(a: &Args, layout: &MemoryLayout, key: &PreSharedKey) -> Result<(Vm, vm::Running, TcpPageServer)> {
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), a.backing)?);
    // A running guest's memory is populated: so is this one's, or its rate before migrating would
    // measure first-touch page allocation instead of the workload.
    source_mem.regions()[0].populate_write(guest::DATA_GPA, (data_pages(a) * guest::PAGE) as usize)?;
    let mut source = Vm::new(Memory::Plain(source_mem.clone()), a.vcpus)?;
    boot(&mut source, a)?;
    let running = source.start()?;
    let server = TcpPageServer::start("127.0.0.1:0", source_mem, key.clone(), TcpOptions::default())?;
    Ok((source, running, server))
}

/// The workload's rate over `seconds`.
fn measure_rate(vm: &Vm, seconds: f64) -> f64 {
    let p0 = vm.telemetry.progress.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    (vm.telemetry.progress.load(Ordering::Relaxed) - p0) as f64 / seconds
}

fn demo(a: &Args) -> Result<()> {
    match a.mode {
        Mode::Postcopy => demo_postcopy(a),
        Mode::Precopy => demo_precopy(a),
        Mode::Hybrid => demo_hybrid(a),
    }
}

/// Pre-copy rounds (at most --max-rounds), then the rest post-copy.
fn demo_hybrid(a: &Args) -> Result<()> {
    let layout = layout(a)?;
    let key = PreSharedKey::generate()?;
    let (mut source, running, server) = start_source(a, &layout, &key)?;
    let (lanes, control) = tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default())?;
    let dest_mem = Arc::new(GuestMemory::create(layout, a.backing)?);
    let mut dest = Vm::new(Memory::Plain(dest_mem.clone()), a.vcpus)?;
    let mut source_control = server.accept_control(Duration::from_secs(10))?;
    let rate_before = measure_rate(&source, a.seconds);

    let mut dirty_log = source.dirty_log()?;
    let page_size = u64::from(dest_mem.layout().page_size());
    let config = ferry::precopy::PrecopyConfig {
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
    };
    let source_side = std::thread::spawn(move || {
        let mut paused = None;
        let report = ferry::precopy::run_hybrid_source(
            &mut source_control,
            page_size,
            &mut dirty_log,
            || {
                paused = Some(source.stop(running).map_err(|e| ferry::MigrationError::Vmm(e.to_string()))?);
                source.save().map_err(|e| ferry::MigrationError::Vmm(e.to_string()))
            },
            &config,
        );
        (report, paused)
    });
    let mut dest_running = None;
    let post_config = DestinationConfig { policy: a.prepager, ..DestinationConfig::default() };
    let (_, session) =
        ferry::precopy::run_hybrid_destination(Box::new(control), dest_mem, lanes, &post_config, |blob| {
            dest.restore(blob).map_err(|e| e.to_string())?;
            dest_running = Some(dest.start().map_err(|e| e.to_string())?);
            Ok(())
        })?;
    let dest_running = dest_running.ok_or_else(|| anyhow!("the destination never resumed"))?;
    let (during_from, progress_from) = (Instant::now(), dest.telemetry.progress.load(Ordering::Relaxed));
    session.finish();
    let post = session.wait()?;
    let rate_during = (dest.telemetry.progress.load(Ordering::Relaxed) - progress_from) as f64
        / during_from.elapsed().as_secs_f64().max(1e-6);
    let (report, paused) = source_side.join().map_err(|_| anyhow!("the source thread panicked"))?;
    let (pre, post_source) = report?;
    let paused_at = paused.ok_or_else(|| anyhow!("the source never paused"))?;
    drop(server);
    let rate_after = measure_rate(&dest, a.seconds);
    let resumed_at = dest_running.started;
    let mismatches = self_check(&mut dest, dest_running)?;
    let out = json!({
        "mode": "hybrid",
        "workload": a.workload.name(),
        "prepager": post.policy,
        "transport": "tcp",
        "mem_mib": a.mem_mib,
        "total_ms": pre.total.as_secs_f64() * 1e3,
        "postcopy_ms": post_source.total.as_secs_f64() * 1e3,
        "precopy_rounds": pre.rounds,
        "pages_per_round": pre.pages_per_round,
        "downtime_ms": resumed_at.duration_since(paused_at).as_secs_f64() * 1e3,
        "postcopy_pages": post.urgent_pages + post.bulk_pages,
        "network_faults": post.network_faults,
        "fault_p50_us": post.fault_p50.as_secs_f64() * 1e6,
        "pages_sent_twice_postcopy": post.pages_installed_twice,
        "rate_before": rate_before,
        "rate_during_postcopy": rate_during,
        "rate_after": rate_after,
        "guest_mismatches": mismatches,
    });
    print_report(a, &out)?;
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages after migration");
    }
    Ok(())
}

fn demo_precopy(a: &Args) -> Result<()> {
    let layout = layout(a)?;
    let key = PreSharedKey::generate()?;
    let (mut source, running, server) = start_source(a, &layout, &key)?;
    let (lanes, mut control) = tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default())?;
    let dest_mem = Arc::new(GuestMemory::create(layout, a.backing)?);
    let mut dest = Vm::new(Memory::Plain(dest_mem.clone()), a.vcpus)?;
    let mut source_control = server.accept_control(Duration::from_secs(10))?;
    let rate_before = measure_rate(&source, a.seconds);

    let mut dirty_log = source.dirty_log()?;
    let page_size = u64::from(dest_mem.layout().page_size());
    let (during_from, progress_from) = (Instant::now(), source.telemetry.progress.load(Ordering::Relaxed));
    let config = ferry::precopy::PrecopyConfig {
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
    };
    let source_side = std::thread::spawn(move || {
        let mut paused = None;
        let report = ferry::precopy::run_source(
            &mut source_control,
            page_size,
            &mut dirty_log,
            || {
                let at = source.stop(running).map_err(|e| ferry::MigrationError::Vmm(e.to_string()))?;
                paused = Some((at, source.telemetry.progress.load(Ordering::Relaxed)));
                source.save().map_err(|e| ferry::MigrationError::Vmm(e.to_string()))
            },
            &config,
        );
        (report, paused)
    });
    let mut dest_running = None;
    ferry::precopy::run_destination(&mut control, &dest_mem, lanes, |blob| {
        dest.restore(blob).map_err(|e| e.to_string())?;
        dest_running = Some(dest.start().map_err(|e| e.to_string())?);
        Ok(())
    })?;
    let (report, paused) = source_side.join().map_err(|_| anyhow!("the source thread panicked"))?;
    let report = report?;
    let (paused_at, progress_at_pause) = paused.ok_or_else(|| anyhow!("the source never paused"))?;
    let dest_running = dest_running.ok_or_else(|| anyhow!("the destination never resumed"))?;
    drop(server);
    let rate_during =
        (progress_at_pause - progress_from) as f64 / paused_at.duration_since(during_from).as_secs_f64().max(1e-6);
    let rate_after = measure_rate(&dest, a.seconds);
    let resumed_at = dest_running.started;
    let mismatches = self_check(&mut dest, dest_running)?;
    let out = json!({
        "mode": "precopy",
        "workload": a.workload.name(),
        "transport": "tcp",
        "mem_mib": a.mem_mib,
        "total_ms": report.total.as_secs_f64() * 1e3,
        "downtime_ms": resumed_at.duration_since(paused_at).as_secs_f64() * 1e3,
        "downtime_target_ms": a.downtime_ms,
        "predicted_downtime_ms": report.predicted_downtime.as_secs_f64() * 1e3,
        "rounds": report.rounds,
        "pages_per_round": report.pages_per_round,
        "bandwidth_gbps": report.bandwidth / 1e9,
        "rate_before": rate_before,
        "rate_during": rate_during,
        "rate_after": rate_after,
        "guest_mismatches": mismatches,
    });
    print_report(a, &out)?;
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages after migration");
    }
    Ok(())
}

fn print_report(a: &Args, out: &serde_json::Value) -> Result<()> {
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(out)?);
    }
    Ok(())
}

fn demo_postcopy(a: &Args) -> Result<()> {
    let layout = layout(a)?;
    let key = PreSharedKey::generate()?;
    let (mut source, running, server) = start_source(a, &layout, &key)?;
    // Destination: memory registered with userfaultfd, a VM over it, connected to the source.
    let (lanes, control) = tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default())?;
    let dest_mem = Arc::new(DestinationMemory::register(GuestMemory::create(layout, a.backing)?)?);
    let mut dest = Vm::new(Memory::Arriving(dest_mem.clone()), a.vcpus)?;
    let mut source_control = server.accept_control(Duration::from_secs(10))?;
    let rate_before = measure_rate(&source, a.seconds);

    // Pause the source, hand over, resume the destination at once.
    let paused_at = source.stop(running)?;
    let blob = source.save()?;
    let free = source.telemetry.free_pages(dest_mem.states().pages(), dest_mem.page_size());
    let handoff = std::thread::spawn(move || run_source(&mut source_control, paused_at, &blob, &free));
    let mut dest_running = None;
    let config = DestinationConfig { policy: a.prepager, ..DestinationConfig::default() };
    let session = PostcopyDestination::start(Box::new(control), dest_mem.clone(), lanes, &config, |blob| {
        dest.restore(blob).map_err(|e| e.to_string())?;
        dest_running = Some(dest.start().map_err(|e| e.to_string())?);
        Ok(())
    })?;
    let dest_running = dest_running.ok_or_else(|| anyhow!("the destination never resumed"))?;
    let downtime = dest_running.started.duration_since(paused_at);
    let during_start = (Instant::now(), dest.telemetry.progress.load(Ordering::Relaxed));
    session.finish();
    let report = session.wait()?;
    let rate_during = (dest.telemetry.progress.load(Ordering::Relaxed) - during_start.1) as f64
        / during_start.0.elapsed().as_secs_f64().max(1e-6);
    let source_report = handoff.join().map_err(|_| anyhow!("the handoff thread panicked"))??;
    drop(server);
    let rate_after = measure_rate(&dest, a.seconds);
    let mismatches = self_check(&mut dest, dest_running)?;
    let out = json!({
        "mode": "postcopy",
        "workload": a.workload.name(),
        "prepager": report.policy,
        "transport": "tcp",
        "mem_mib": a.mem_mib,
        "total_ms": source_report.total.as_secs_f64() * 1e3,
        "downtime_ms": downtime.as_secs_f64() * 1e3,
        "pages_total": report.pages_total,
        "urgent_pages": report.urgent_pages,
        "bulk_pages": report.bulk_pages,
        "zero_pages": report.zero_pages,
        "network_faults": report.network_faults,
        "faults_avoided": report.inflight_faults + report.local_faults,
        "fault_p50_us": report.fault_p50.as_secs_f64() * 1e6,
        "fault_p99_us": report.fault_p99.as_secs_f64() * 1e6,
        "blocktime_ms": report.blocktime.as_secs_f64() * 1e3,
        "pages_sent_twice": report.pages_installed_twice,
        "skipped_free_pages": report.skipped_free_pages,
        "rate_before": rate_before,
        "rate_during": rate_during,
        "rate_after": rate_after,
        "guest_mismatches": mismatches,
    });
    print_report(a, &out)?;
    if mismatches != 0 {
        bail!("the guest found {mismatches} wrong pages after migration");
    }
    Ok(())
}
