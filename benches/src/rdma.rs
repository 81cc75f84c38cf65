//! `ferry-bench rdma`: the RDMA microbenchmark suite for real testbeds (feature `rdma`).
//!
//! ```text
//! ferry-bench rdma --device NAME [--listen ADDR] [--peer ADDR] [--mem-mib N] [--samples N] [--json] [--quick]
//! ```
//! Without `--peer` the source runs in this process and the device reads its own host's memory
//! (one host, loopback through the NIC). Between two hosts, start `--listen 0.0.0.0:7471` on the
//! source host, then `--peer SOURCE:7471` on the destination host. Prints 4 KiB READ latency
//! p50/p99 on the urgent lane, bulk READ bandwidth by run size (beside the port's line rate when
//! it reports one), and post-copy fault service latency: a thread touching pages of memory
//! registered with userfaultfd, each fault served by the fault loop over the urgent lane.

use std::sync::Arc;

use anyhow::{bail, Result};
use ferry::fault_handler::{run_fault_loop, DestinationMemory, FaultQueue, FaultStats};
use ferry::toucher::{prepare_source, touch, Pattern, Walk};
use ferry::FreePages;
use ferry_transport::lane::PageSource;
use ferry_transport::rdma::{self, RdmaOptions, RdmaPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout};
use serde_json::json;

use crate::fixtures::{bench_key, bulk_stream, urgent_page, PAGE};
use crate::stats::{gbps, Latencies};

/// The source's memory is filled with the toucher's pattern under this seed, so the destination
/// can check every page it faults in.
const SEED: u64 = 0xbe4c_0001;

/// `ferry-bench rdma`'s options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// The RDMA device (default: the first).
    #[arg(long)]
    device: Option<String>,
    /// Serve the memory on this address (the other host runs with --peer).
    #[arg(long, conflicts_with = "peer")]
    listen: Option<String>,
    /// Measure against the server at this address.
    #[arg(long)]
    peer: Option<String>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Urgent reads timed.
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Soft-RoCE under emulation: 64 MiB and 300 samples (the figures check correctness).
    #[arg(long)]
    quick: bool,
}

fn options(o: &Options) -> RdmaOptions {
    RdmaOptions { device: o.device.clone(), ..RdmaOptions::default() }
}

fn source_memory(o: &Options) -> Result<Arc<GuestMemory>> {
    let layout = MemoryLayout::single(o.mem_mib << 20)?;
    let memory = GuestMemory::create(layout, Backing::Memfd)?;
    prepare_source(&memory, SEED, &FreePages::new(memory.layout().total_pages()))?;
    Ok(Arc::new(memory))
}

pub fn run(mut o: Options) -> Result<()> {
    if o.quick {
        o.mem_mib = 64;
        o.samples = 300;
    }
    if let Some(addr) = &o.listen {
        let server = RdmaPageServer::start(addr.as_str(), source_memory(&o)?, bench_key(), options(&o))?;
        println!(
            "ferry-bench rdma: serving {} MiB on {} ({}); Ctrl-C to stop",
            o.mem_mib,
            server.local_addr(),
            server.device_name()
        );
        loop {
            std::thread::park();
        }
    }
    let info = rdma::device_info(o.device.as_deref(), 1)?;
    let _local_server;
    let addr = match &o.peer {
        Some(peer) => peer.clone(),
        None => {
            let server = RdmaPageServer::start("127.0.0.1:0", source_memory(&o)?, bench_key(), options(&o))?;
            let addr = server.local_addr().to_string();
            _local_server = server;
            addr
        }
    };
    let (mut lanes, _) = rdma::connect(addr.as_str(), &bench_key(), None, &options(&o))?;
    let layout = lanes.layout.clone();
    let pages = layout.total_pages();

    // 4 KiB READ latency on the urgent lane, random pages, into a registered buffer.
    let mut buf = lanes.urgent.buffer(PAGE)?;
    let mut latency = Latencies::measure(o.samples / 10, o.samples, |i| urgent_page(&mut lanes, &mut buf, i))?;
    let (l50, l99) = (latency.quantile_us(0.5), latency.quantile_us(0.99));

    // Bulk READ bandwidth by run size: the whole memory once, `depth` reads in flight, into the
    // lane's registered buffers.
    let mut bulk = Vec::new();
    let total = pages * PAGE as u64;
    for run_kib in [4u64, 64, 256, 1024, 4096] {
        let run_pages = (run_kib * 1024 / PAGE as u64).min(u64::from(layout.max_run_pages())) as u32;
        let elapsed = bulk_stream(&mut lanes, &mut Vec::new(), run_pages, total)?;
        bulk.push((run_kib, gbps(total, elapsed)));
    }
    drop(lanes);

    // Post-copy fault service: a fresh session whose urgent lane serves a real userfaultfd.
    let (fault_p50, fault_p99, faults) = fault_service(&addr, &o)?;

    // A software device's port reports a nominal speed that says nothing about what it can move.
    let line = if info.software { None } else { info.port.line_rate_gbps() };
    let note = if info.software {
        "software RDMA device: these figures measure the CPU (and an emulator, under TCG), for correctness only"
    } else {
        "hardware device"
    };
    if o.json {
        println!(
            "{}",
            json!({
                "bench": "rdma", "device": info.name, "software_device": info.software, "note": note,
                "line_rate_gbps": line, "read_4k_p50_us": l50, "read_4k_p99_us": l99,
                "bulk_gbps_by_run_kib": bulk.iter().map(|(k, g)| json!({"run_kib": k, "gbps": g, "of_line_rate": line.map(|l| g * 8.0 / l)})).collect::<Vec<_>>(),
                "fault_service_p50_us": fault_p50, "fault_service_p99_us": fault_p99, "faults": faults,
            })
        );
    } else {
        println!("rdma on {} ({note})", info.name);
        println!("  4 KiB READ, urgent lane: p50 {l50:.2} us, p99 {l99:.2} us ({} samples)", o.samples);
        for (k, g) in &bulk {
            match line {
                Some(l) => {
                    println!("  bulk {k:>5} KiB runs: {g:.3} GB/s = {:.0}% of {l:.0} Gbit/s", 100.0 * g * 8.0 / l)
                }
                None => println!("  bulk {k:>5} KiB runs: {g:.3} GB/s"),
            }
        }
        println!("  post-copy fault service: p50 {fault_p50:.2} us, p99 {fault_p99:.2} us ({faults} faults)");
    }
    Ok(())
}

/// Touches random pages of userfaultfd-registered memory; the fault loop serves each fault over
/// the urgent lane. Returns p50 and p99 of the touch latency as the toucher sees it, and the count.
fn fault_service(addr: &str, o: &Options) -> Result<(f64, f64, usize)> {
    let (source, _) = rdma::connect(addr, &bench_key(), None, &options(o))?;
    let pages = source.layout.total_pages();
    let memory =
        Arc::new(DestinationMemory::register(GuestMemory::create(source.layout.clone(), Backing::Anonymous)?)?);
    let PageSource { mut urgent, .. } = source;
    let (queue, stats) = (Arc::new(FaultQueue::new(1024)), Arc::new(FaultStats::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fault_thread = {
        let (memory, queue, stats, stop) = (memory.clone(), queue.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || {
            let r = run_fault_loop(&memory, &mut urgent, None, &queue, &stats, &stop);
            drop(urgent);
            r
        })
    };
    let touches = (o.samples as u64).min(pages / 2).max(1);
    let report = touch(memory.guest(), Walk::new(Pattern::Random), SEED, &FreePages::new(pages), touches);
    stop.store(true, std::sync::atomic::Ordering::Release);
    // The fault loop wakes every 20 ms to look at `stop`.
    fault_thread.join().map_err(|_| anyhow::anyhow!("the fault thread panicked"))??;
    let report = report?;
    if report.mismatches > 0 {
        bail!("{} faulted pages differ from the source", report.mismatches);
    }
    let mut l = Latencies::default();
    for d in &report.blocked {
        l.record(*d);
    }
    Ok((l.quantile_us(0.5), l.quantile_us(0.99), report.blocked.len()))
}
