//! `ferry-bench`: measures ferry beside the raw limits of this machine, in one process and one run.
//!
//! ```text
//! ferry-bench transport [--json] [--mem-mib N] [--total-mib N] [--samples N] [--reps N] [--dir DIR]
//! ferry-bench postcopy  [--json] [--mem-mib N] [--samples N] [--transport tcp|local] [--plot FILE.svg]
//! ferry-bench restore   [--json] [--mem-mib N] [--ws-pages N] [--dir DIR] [--scale-gib 1,4,16]
//! ferry-bench rdma      --device NAME [--listen ADDR | --peer ADDR] [--mem-mib N] [--samples N] [--json] [--quick]
//! ```
//! `rdma` (feature `rdma`) is described in `ferry_benches::rdma`, `restore` in
//! `ferry_benches::restore`.
//! `transport` prints, for each backend, urgent-lane latency beside the raw round trip of one
//! 4 KiB page and bulk-lane bandwidth beside the raw bulk limit, with their ratios.
//! `postcopy` migrates a guest of `--mem-mib` (default 1024 here: pass it) for every pre-pager x
//! access pattern and prints network faults, total time and guest-side fault latency beside the
//! raw limits (a userfaultfd fault resolved from local memory, a TCP round trip), then the
//! pre-pager's install bandwidth beside the transport's bulk bandwidth. `--json` prints one JSON
//! object per line; `--plot FILE.svg` draws the policies side by side (`ferry_benches::plot`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ferry_benches::fixtures::{bulk_stream, filled_memory, urgent_page, Fixture, PAGE};
use ferry_benches::raw;
use ferry_benches::stats::{gbps, max_rss_mib, median, Latencies};
use ferry_transport::lane::PageBuf;
use ferry_transport::tcp::Encryption;
use ferry_transport::Backing;
use serde_json::json;

/// Measures ferry beside the raw limits of this machine, in one process and one run.
#[derive(clap::Parser, Debug)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(clap::Subcommand, Debug)]
enum Bench {
    /// Each backend's urgent latency and bulk bandwidth beside the raw limits (tcp also over TLS).
    Transport(Options),
    /// Every pre-paging policy on every access pattern, migrated in this process.
    Postcopy(Options),
    /// Snapshot restore: eager, lazy, Firecracker's strategy, working-set replay, scale.
    Restore(ferry_benches::restore::Options),
    /// The rdma transport between two hosts (feature `rdma`).
    #[cfg(feature = "rdma")]
    Rdma(ferry_benches::rdma::Options),
}

#[derive(clap::Args, Debug)]
struct Options {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// postcopy: tcp, or local (same host, shared memfd).
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// transport: bytes moved per bulk measurement, MiB.
    #[arg(long, default_value_t = 2048)]
    total_mib: u64,
    /// Urgent reads (or faults) timed.
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Bulk measurements per figure (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Where snapshot images are written.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// postcopy: draw the policies side by side (memory present, network faults and fault
    /// latency over each pattern) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TransportArg {
    Tcp,
    Local,
}

impl Options {
    fn local(&self) -> bool {
        self.transport == TransportArg::Local
    }
}

fn main() -> Result<()> {
    // Logs (session phases, reconnections, refusals) on stderr, chosen by RUST_LOG (errors only
    // by default).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match <Cli as clap::Parser>::parse().command {
        Bench::Transport(o) => transport(&o),
        Bench::Postcopy(o) => postcopy(&o),
        Bench::Restore(o) => ferry_benches::restore::run(o),
        #[cfg(feature = "rdma")]
        Bench::Rdma(o) => ferry_benches::rdma::run(o),
    }
}

struct Row {
    backend: &'static str,
    urgent: Latencies,
    raw_rtt: Latencies,
    raw_rtt_what: &'static str,
    bulk_gbps: f64,
    raw_bulk_gbps: f64,
    raw_bulk_what: &'static str,
    run_bytes: usize,
}

impl Row {
    fn print(mut self, json_out: bool) {
        let (u50, u99) = (self.urgent.quantile_us(0.5), self.urgent.quantile_us(0.99));
        let (r50, r99) = (self.raw_rtt.quantile_us(0.5), self.raw_rtt.quantile_us(0.99));
        if json_out {
            println!(
                "{}",
                json!({
                    "backend": self.backend,
                    "urgent_p50_us": round(u50), "urgent_p99_us": round(u99),
                    "raw_rtt_p50_us": round(r50), "raw_rtt_p99_us": round(r99), "raw_rtt_what": self.raw_rtt_what,
                    "urgent_over_raw_p50": round(u50 / r50),
                    "bulk_gbps": round(self.bulk_gbps), "raw_bulk_gbps": round(self.raw_bulk_gbps),
                    "raw_bulk_what": self.raw_bulk_what,
                    "bulk_over_raw": round(self.bulk_gbps / self.raw_bulk_gbps),
                    "bulk_run_bytes": self.run_bytes,
                    "max_rss_mib": round(max_rss_mib()),
                })
            );
        } else {
            println!(
                "{:<9} urgent 4 KiB p50 {:>7.2} us p99 {:>7.2} us | raw {:>7.2} / {:>7.2} us ({}) | x{:.2}",
                self.backend,
                u50,
                u99,
                r50,
                r99,
                self.raw_rtt_what,
                u50 / r50
            );
            println!(
                "{:<9} bulk {:>4} KiB runs {:>6.2} GB/s | raw {:>6.2} GB/s ({}) | {:.0}%",
                "",
                self.run_bytes / 1024,
                self.bulk_gbps,
                self.raw_bulk_gbps,
                self.raw_bulk_what,
                100.0 * self.bulk_gbps / self.raw_bulk_gbps
            );
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Runs `ours` and `raw` alternately `reps` times and returns the median bandwidth of each, so
/// that drift on a shared machine hits both alike.
fn paired_bandwidth(
    reps: usize,
    bytes: u64,
    mut ours: impl FnMut() -> Result<std::time::Duration>,
    mut raw: impl FnMut() -> Result<std::time::Duration>,
) -> Result<(f64, f64)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        a.push(gbps(bytes, ours()?));
        b.push(gbps(bytes, raw()?));
    }
    Ok((median(a), median(b)))
}

fn transport(o: &Options) -> Result<()> {
    let mem = o.mem_mib << 20;
    let total = o.total_mib << 20;
    let n = o.samples;

    // tcp: urgent beside a raw 16 B -> 4 KiB round trip; bulk 64 KiB runs beside a raw 64 KiB stream.
    // Then tcp over TLS beside the plaintext lane, both measured in turn in this run.
    {
        let memory = filled_memory(mem, Backing::Anonymous)?;
        let mut plain = Fixture::tcp(memory.clone(), 32, Encryption::Off)?;
        let mut tls = Fixture::tcp(memory, 32, Encryption::Tls)?;
        let mut pool = Vec::new();
        let mut buf = vec![0u8; PAGE];
        let urgent = Latencies::measure(n / 10, n, |i| urgent_page(plain.source(), &mut buf, i))?;
        let tls_urgent = Latencies::measure(n / 10, n, |i| urgent_page(tls.source(), &mut buf, i))?;
        let raw_rtt = raw::tcp_round_trips(n)?;
        let (bulk, raw_bulk) = paired_bandwidth(
            o.reps as usize,
            total,
            || bulk_stream(plain.source(), &mut pool, 16, total),
            || raw::tcp_stream(64 << 10, total),
        )?;
        let mut tls_pool = Vec::new();
        let (tls_bulk, plain_bulk) = paired_bandwidth(
            o.reps as usize,
            total,
            || bulk_stream(tls.source(), &mut tls_pool, 16, total),
            || bulk_stream(plain.source(), &mut pool, 16, total),
        )?;
        let plain_urgent = urgent.clone();
        Row {
            backend: "tcp",
            urgent,
            raw_rtt,
            raw_rtt_what: "tcp 16 B request, 4 KiB reply",
            bulk_gbps: bulk,
            raw_bulk_gbps: raw_bulk,
            raw_bulk_what: "tcp stream of 64 KiB writes",
            run_bytes: 64 << 10,
        }
        .print(o.json);
        Row {
            backend: "tcp+tls",
            urgent: tls_urgent,
            raw_rtt: plain_urgent,
            raw_rtt_what: "the plaintext tcp lane",
            bulk_gbps: tls_bulk,
            raw_bulk_gbps: plain_bulk,
            raw_bulk_what: "the plaintext tcp lane, same runs",
            run_bytes: 64 << 10,
        }
        .print(o.json);
    }

    // local: a copy out of the shared mapping beside memcpy of the same sizes.
    {
        let memory = filled_memory(mem, Backing::Memfd)?;
        let mut fx = Fixture::local(memory.clone(), 32)?;
        let mut pool = Vec::new();
        let mut buf = vec![0u8; PAGE];
        let urgent = Latencies::measure(n / 10, n, |i| urgent_page(fx.source(), &mut buf, i))?;
        let region = &memory.regions()[0];
        let pages = region.len() as u64 / PAGE as u64;
        let raw_rtt = Latencies::measure(n / 10, n, |i| {
            region.read((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % pages * PAGE as u64, &mut buf)
        })?;
        let (bulk, raw_bulk) = paired_bandwidth(
            o.reps as usize,
            total,
            || bulk_stream(fx.source(), &mut pool, 16, total),
            || raw::memcpy_stream(&memory, 64 << 10, total),
        )?;
        Row {
            backend: "local",
            urgent,
            raw_rtt,
            raw_rtt_what: "memcpy of one 4 KiB page",
            bulk_gbps: bulk,
            raw_bulk_gbps: raw_bulk,
            raw_bulk_what: "memcpy in 64 KiB pieces",
            run_bytes: 64 << 10,
        }
        .print(o.json);
    }

    // snapshot: reads through the checksummed image beside raw O_DIRECT io_uring reads of its data.
    {
        let memory = filled_memory(mem, Backing::Anonymous)?;
        let mut fx = Fixture::snapshot(&memory, &o.dir, 32)?;
        let mut pool = Vec::new();
        drop(memory);
        let Fixture::Snapshot { path, .. } = &fx else { unreachable!("built as a snapshot fixture") };
        let path = path.clone();
        let data_offset = ferry_transport::snapshot::SnapshotImage::open(&path, None)?.data_offset();
        let mut page = PageBuf::new(PAGE);
        let urgent = Latencies::measure(n / 10, n, |i| urgent_page(fx.source(), &mut page, i))?;
        let raw_rtt = raw::io_uring_page_reads(&path, data_offset, mem, n, true)?;
        let run = 2 << 20;
        let (bulk, raw_bulk) = paired_bandwidth(
            o.reps as usize,
            total,
            || bulk_stream(fx.source(), &mut pool, (run / PAGE) as u32, total),
            || raw::io_uring_read(&path, data_offset, mem, run, 32, total),
        )?;
        Row {
            backend: "snapshot",
            urgent,
            raw_rtt,
            raw_rtt_what: "io_uring O_DIRECT 4 KiB read",
            bulk_gbps: bulk,
            raw_bulk_gbps: raw_bulk,
            raw_bulk_what: "io_uring O_DIRECT 2 MiB reads, depth 32",
            run_bytes: run,
        }
        .print(o.json);
    }
    Ok(())
}

fn postcopy(o: &Options) -> Result<()> {
    use ferry::loopback::{migrate, LoopbackConfig, LoopbackTransport};
    use ferry::prepager::PolicyKind;
    use ferry::toucher::Pattern;
    use ferry_transport::MemoryLayout;

    let mem = o.mem_mib << 20;
    let layout = MemoryLayout::single(mem)?;
    let pages = layout.total_pages();
    let transport = if o.local() { LoopbackTransport::Local } else { LoopbackTransport::Tcp };
    let mut raw_fault = raw::uffd_local_faults(o.samples.min(20_000))?;
    // The transport's raw round trip: TCP request/reply, or for local a 4 KiB copy out of a mapping.
    let mut raw_rtt = if o.local() {
        let memory = filled_memory(64 << 20, Backing::Memfd)?;
        let region = &memory.regions()[0];
        let mut buf = vec![0u8; PAGE];
        Latencies::measure(o.samples / 10, o.samples, |i| {
            region.read((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % 16384 * PAGE as u64, &mut buf)
        })?
    } else {
        raw::tcp_round_trips(o.samples)?
    };
    let (raw_fault_p50, raw_rtt_p50) = (raw_fault.quantile_us(0.5), raw_rtt.quantile_us(0.5));
    let mut network_faults = std::collections::HashMap::new();
    let mut runs = Vec::new();
    for policy in PolicyKind::ALL {
        for pattern in Pattern::ALL {
            let touches = if pattern == Pattern::Sequential { pages } else { pages / 4 };
            let config = LoopbackConfig {
                transport,
                layout: layout.clone(),
                dest_backing: Backing::Anonymous,
                pattern,
                policy,
                touches,
            };
            let out = migrate(&config)?;
            if out.verify_mismatches + out.during.mismatches > 0 {
                bail!("{policy:?}/{pattern:?}: guest memory differs from the source");
            }
            let mut blocked = Latencies::default();
            for d in &out.during.blocked {
                blocked.record(*d);
            }
            let (f50, f99) = (blocked.quantile_us(0.5), blocked.quantile_us(0.99));
            let d = &out.dest;
            network_faults.insert((policy.name(), pattern.name()), d.network_faults);
            runs.push(ferry_benches::plot::PolicyRun {
                policy: policy.name(),
                pattern: pattern.name(),
                pages_total: d.pages_total,
                timeline: out.timeline.clone(),
                fault_histogram_us: d.fault_histogram_us.clone(),
            });
            let row = json!({
                "policy": policy.name(), "pattern": pattern.name(), "transport": transport.name(),
                "pages_total": d.pages_total, "touches": touches,
                "network_faults": d.network_faults, "inflight_faults": d.inflight_faults, "faults": d.faults,
                "urgent_pages": d.urgent_pages, "bulk_pages": d.bulk_pages, "skipped_free_pages": d.skipped_free_pages,
                "total_ms": round(d.total.as_secs_f64() * 1e3), "downtime_ms": round(out.source.downtime.as_secs_f64() * 1e3),
                "fault_p50_us": round(f50), "fault_p99_us": round(f99),
                "service_p50_us": round(d.fault_p50.as_secs_f64() * 1e6), "service_p99_us": round(d.fault_p99.as_secs_f64() * 1e6),
                "raw_fault_p50_us": round(raw_fault_p50), "raw_rtt_p50_us": round(raw_rtt_p50),
                "fault_over_raw_p50": round(f50 / (raw_fault_p50 + raw_rtt_p50)),
                "blocktime_ms": round(d.blocktime.as_secs_f64() * 1e3),
                "pages_sent_twice": out.served_twice.unwrap_or(0) + d.pages_installed_twice,
                "rate_during": round(out.during.rate()), "rate_after": round(out.after.rate()),
                "rate_during_over_after": round(out.during.rate() / out.after.rate()),
                "max_rss_mib": round(max_rss_mib()),
            });
            if o.json {
                println!("{row}");
            } else {
                println!(
                    "{:<8} {:<7} net faults {:>6} / {:>7} pages | total {:>7.1} ms downtime {:>5.2} ms | fault p50 {:>6.1} us p99 {:>7.1} us (raw {:.1} + {:.1}) | rate during/after {:.2} | sent twice {}",
                    policy.name(), pattern.name(), d.network_faults, d.pages_total, d.total.as_secs_f64() * 1e3,
                    out.source.downtime.as_secs_f64() * 1e3, f50, f99, raw_fault_p50, raw_rtt_p50,
                    out.during.rate() / out.after.rate(), out.served_twice.unwrap_or(0) + d.pages_installed_twice
                );
            }
        }
    }
    if let Some(path) = &o.plot {
        // Patterns as columns: sort the runs by pattern, policies in their order within each.
        runs.sort_by_key(|r| Pattern::ALL.iter().position(|p| p.name() == r.pattern));
        ferry_benches::plot::policies(path, &runs)?;
        eprintln!("ferry-bench: the policies compared in {}", path.display());
    }
    // Bulk install: an idle guest pulled by active push, beside the transport's bulk bandwidth;
    // anonymous memory (UFFDIO_COPY from a buffer) and memfd memory (received in place, CONTINUE).
    let install = |dest_backing, layout: &MemoryLayout| -> Result<f64> {
        let idle = migrate(&LoopbackConfig {
            transport: LoopbackTransport::Tcp,
            layout: layout.clone(),
            dest_backing,
            pattern: Pattern::Sequential,
            policy: PolicyKind::Push,
            touches: 0,
        })?;
        let moved = (idle.dest.bulk_pages + idle.dest.urgent_pages) * u64::from(layout.page_size());
        Ok(gbps(moved, idle.dest.total))
    };
    let copy_gbps = install(Backing::Anonymous, &layout)?;
    let memfd_gbps = install(Backing::Memfd, &layout)?;
    // 2 MiB hugetlbfs pages: one page-table update per 2 MiB instead of per 4 KiB. Needs
    // `mem / 2 MiB` free hugepages (scripts/setup.sh reserves them).
    let huge_layout = MemoryLayout::new(
        2 << 20,
        vec![ferry_transport::RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(0), size: mem }],
    )?;
    let huge_gbps = install(Backing::HugetlbMemfd, &huge_layout).unwrap_or(f64::NAN);
    let install_gbps = huge_gbps;
    let memory = filled_memory(mem, Backing::Anonymous)?;
    let mut fx = Fixture::tcp(memory, 32, Encryption::Tls)?;
    let mut pool = Vec::new();
    let transport_gbps = gbps(mem, bulk_stream(fx.source(), &mut pool, 64, mem)?);
    let ratio = |p: &str| network_faults[&("bubbling", p)] as f64 / network_faults[&("demand", p)].max(1) as f64;
    let summary = json!({
        "summary": "postcopy",
        "bubbling_over_demand_network_faults_seq": round(ratio("seq")),
        "bubbling_over_demand_network_faults_hot_set": round(ratio("hot-set")),
        "install_gbps": round(install_gbps), "install_what": "hugetlbfs 2 MiB pages received in place, UFFDIO_CONTINUE",
        "install_copy_gbps": round(copy_gbps), "install_memfd_4k_gbps": round(memfd_gbps),
        "transport_bulk_gbps": round(transport_gbps),
        "install_over_transport": round(install_gbps / transport_gbps),
        "install_copy_over_transport": round(copy_gbps / transport_gbps),
    });
    if o.json {
        println!("{summary}");
    } else {
        println!(
            "bubbling/demand network faults: seq {:.3}, hot-set {:.3}\nbulk install: in place on 2 MiB hugetlbfs {:.2} GB/s ({:.0}%), in place on 4 KiB memfd {:.2} GB/s ({:.0}%), by UFFDIO_COPY {:.2} GB/s ({:.0}%); transport bulk {:.2} GB/s",
            ratio("seq"), ratio("hot-set"), install_gbps, 100.0 * install_gbps / transport_gbps, memfd_gbps,
            100.0 * memfd_gbps / transport_gbps, copy_gbps, 100.0 * copy_gbps / transport_gbps, transport_gbps
        );
    }
    Ok(())
}
