//! `ferry-bench`: measures ferry beside the raw limits of this machine, in one process and one run.
//!
//! ```text
//! ferry-bench transport [--json] [--mem-mib N] [--total-mib N] [--samples N] [--reps N] [--dir DIR]
//! ```
//! Prints, for each backend, urgent-lane latency beside the raw round trip of one 4 KiB page and
//! bulk-lane bandwidth beside the raw bulk limit, with their ratios. `--json` prints one JSON
//! object per backend per line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ferry_benches::fixtures::{bulk_stream, filled_memory, urgent_page, Fixture, PAGE};
use ferry_benches::raw;
use ferry_benches::stats::{gbps, max_rss_mib, median, Latencies};
use ferry_transport::lane::PageBuf;
use ferry_transport::Backing;
use serde_json::json;

struct Options {
    json: bool,
    mem_mib: u64,
    total_mib: u64,
    samples: usize,
    reps: usize,
    dir: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o =
        Options { json: false, mem_mib: 512, total_mib: 2048, samples: 20_000, reps: 3, dir: std::env::temp_dir() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value")).cloned();
        match a.as_str() {
            "--json" => o.json = true,
            "--mem-mib" => o.mem_mib = value(a)?.parse()?,
            "--total-mib" => o.total_mib = value(a)?.parse()?,
            "--samples" => o.samples = value(a)?.parse()?,
            "--reps" => o.reps = value(a)?.parse::<usize>()?.max(1),
            "--dir" => o.dir = PathBuf::from(value(a)?),
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("transport") => transport(&parse(&args[1..])?),
        _ => {
            eprintln!("usage: ferry-bench transport [--json] [--mem-mib N] [--total-mib N] [--samples N] [--reps N] [--dir DIR]");
            std::process::exit(2);
        }
    }
}

/// One backend's figures beside its raw limits.
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
    {
        let memory = filled_memory(mem, Backing::Anonymous)?;
        let mut fx = Fixture::tcp(memory, 32)?;
        let mut pool = Vec::new();
        let mut buf = vec![0u8; PAGE];
        let urgent = Latencies::measure(n / 10, n, |i| urgent_page(fx.source(), &mut buf, i))?;
        let raw_rtt = raw::tcp_round_trips(n)?;
        let (bulk, raw_bulk) = paired_bandwidth(
            o.reps,
            total,
            || bulk_stream(fx.source(), &mut pool, 16, total),
            || raw::tcp_stream(64 << 10, total),
        )?;
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
            o.reps,
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
        let data_offset = std::fs::metadata(&path)?.len() - mem;
        let mut page = PageBuf::new(PAGE);
        let urgent = Latencies::measure(n / 10, n, |i| urgent_page(fx.source(), &mut page, i))?;
        let raw_rtt = raw::io_uring_page_reads(&path, data_offset, mem, n)?;
        let run = 2 << 20;
        let (bulk, raw_bulk) = paired_bandwidth(
            o.reps,
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
