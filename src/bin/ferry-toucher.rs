//! `ferry-toucher`: post-copy migration of a process workload between two processes, no KVM
//! needed. The source fills guest memory with a verifiable pattern, runs a toucher on it, pauses
//! it and hands it over; the destination resumes the toucher at once while memory arrives, then
//! verifies every byte.
//!
//! ```text
//! ferry-toucher demo   [--mem-mib 1024] [--pattern seq|random|hot-set] [--policy demand|push|bubbling]
//!                      [--backing anon|memfd|hugetlb] [--touches N] [--cut-lanes N]
//! ferry-toucher source --listen ADDR [--mem-mib N] [--page-size 4096|2097152]
//! ferry-toucher dest   --connect ADDR [--mem-mib N] [--page-size ...] [--pattern ...] [--policy ...]
//!                      [--backing ...] [--touches N]
//! every role: [--transport tcp|rdma] [--rdma-device NAME]   (rdma: built with feature `rdma`)
//! ```
//! The pre-shared key comes from the environment variable `FERRY_KEY` (hex); `demo` makes one.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::toucher::{demo_free_pages, prepare_source, touch, verify_all, Pattern, Walk};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use ferry::{run_source, EngineConfig, PostcopyDestination};
use serde_json::json;

const SEED: u64 = 0xfe55_1234;

struct Args {
    role: String,
    addr: String,
    mem_mib: u64,
    page_size: u32,
    pattern: Pattern,
    policy: PolicyKind,
    backing: Backing,
    touches: Option<u64>,
    /// Source: break the data lanes this many times, 100 ms apart, once the destination is in.
    cut_lanes: u32,
    rdma: Option<RdmaChoice>,
}

/// `--transport rdma`, on the named device or the first.
#[derive(Clone, Debug)]
struct RdmaChoice {
    device: Option<String>,
}

/// A process whose memory migrates post-copy to another process (or within one, `demo`), touched
/// by a guest stand-in that checks every byte: ferry without KVM. FERRY_KEY holds the hex key.
#[derive(clap::Parser, Debug)]
#[command(name = "ferry-toucher", version)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand, Debug)]
enum Role {
    /// Source and destination in this process, over tcp loopback.
    Demo(Opts),
    /// Serves the memory and hands the stand-in over to a `dest`.
    Source(Opts),
    /// Connects to a `source` and runs the stand-in on arriving memory.
    Dest(Opts),
}

#[derive(clap::Args, Debug)]
struct Opts {
    /// Where a source listens, or the source a destination connects to.
    #[arg(long, visible_alias = "connect", default_value = "127.0.0.1:0")]
    listen: String,
    /// Memory size in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    mem_mib: u64,
    /// Page size in bytes (2 MiB with --backing hugetlb).
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    /// How the stand-in touches memory: seq, random or hot-set.
    #[arg(long, default_value = "hot-set", value_parser = |s: &str| s.parse::<Pattern>())]
    pattern: Pattern,
    /// Pre-paging: demand, push or bubbling.
    #[arg(long, default_value = "bubbling", value_parser = |s: &str| s.parse::<PolicyKind>())]
    policy: PolicyKind,
    /// Memory backing.
    #[arg(long, value_enum, default_value_t = BackingArg::Anon)]
    backing: BackingArg,
    /// Pages the stand-in touches (default: a quarter of them, all for seq).
    #[arg(long)]
    touches: Option<u64>,
    /// Source: break the data lanes this many times, 100 ms apart, once the destination is in.
    #[arg(long, default_value_t = 0)]
    cut_lanes: u32,
    /// tcp, or rdma (one-sided READs; a build with the rdma feature).
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// With --transport rdma: the device (default: the first).
    #[arg(long)]
    rdma_device: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackingArg {
    Anon,
    Memfd,
    Hugetlb,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TransportArg {
    Tcp,
    Rdma,
}

fn parse() -> Result<Args> {
    let cli = <Cli as clap::Parser>::parse();
    let (role, o) = match cli.role {
        Role::Demo(o) => ("demo", o),
        Role::Source(o) => ("source", o),
        Role::Dest(o) => ("dest", o),
    };
    let backing = match o.backing {
        BackingArg::Anon => Backing::Anonymous,
        BackingArg::Memfd => Backing::Memfd,
        BackingArg::Hugetlb => Backing::HugetlbMemfd,
    };
    Ok(Args {
        role: role.into(),
        addr: o.listen,
        mem_mib: o.mem_mib,
        page_size: if backing == Backing::HugetlbMemfd { 2 << 20 } else { o.page_size },
        pattern: o.pattern,
        policy: o.policy,
        backing,
        touches: o.touches,
        cut_lanes: o.cut_lanes,
        rdma: (o.transport == TransportArg::Rdma || o.rdma_device.is_some())
            .then_some(RdmaChoice { device: o.rdma_device }),
    })
}

fn key() -> Result<PreSharedKey> {
    let hex = std::env::var("FERRY_KEY").context("FERRY_KEY (hex pre-shared key) is not set")?;
    Ok(PreSharedKey::from_hex(&hex)?)
}

fn layout(a: &Args) -> Result<MemoryLayout> {
    Ok(MemoryLayout::new(
        a.page_size,
        vec![ferry::transport::RegionLayout { guest_phys_addr: ferry::transport::GuestAddr(0), size: a.mem_mib << 20 }],
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
    let a = parse()?;
    match a.role.as_str() {
        "source" => source(&a),
        "dest" => dest(&a),
        "demo" => demo(&a),
        other => bail!("unknown role {other:?}: demo, source or dest"),
    }
}

/// State the toucher carries across the migration: where its walk is.
fn encode_state(position: u64) -> Vec<u8> {
    [SEED.to_le_bytes(), position.to_le_bytes()].concat()
}

fn source(a: &Args) -> Result<()> {
    let layout = layout(a)?;
    let free = demo_free_pages(layout.total_pages());
    let memory = Arc::new(GuestMemory::create(layout, Backing::Anonymous)?);
    prepare_source(&memory, SEED, &free)?;
    let server = Arc::new(PageServer::start(a, memory.clone())?);
    println!("listening {}", server.local_addr());
    std::io::stdout().flush()?;
    let mut control = server.accept_control(Duration::from_secs(60))?;
    // The workload runs until the migration starts; its position travels in the state blob.
    let before = touch(&memory, Walk::new(a.pattern), SEED, &free, 4096)?;
    let paused_at = Instant::now();
    let cutter = (a.cut_lanes > 0).then(|| {
        let (server, cuts) = (server.clone(), a.cut_lanes);
        std::thread::spawn(move || {
            for _ in 0..cuts {
                std::thread::sleep(Duration::from_millis(100));
                server.cut();
            }
        })
    });
    let options = ferry::SourceOptions { reaccept: Some(server.acceptor()), ..Default::default() };
    let report = run_source(control.as_mut(), paused_at, &encode_state(before.touches), &free, &options)?;
    if let Some(cutter) = cutter {
        let _ = cutter.join();
    }
    let mut out = json!({
        "role": "source",
        "downtime_ms": ms(report.downtime),
        "total_ms": ms(report.total),
        "pages_present": report.done.pages_present,
        "rate_before": before.rate(),
    });
    out["lane_cuts"] = json!(a.cut_lanes);
    match server.as_ref() {
        PageServer::Tcp(server) => {
            let stats = server.stats();
            let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            out["pages_served_twice"] = json!(load(&stats.pages_served_twice));
            out["data_pages_served"] = json!(load(&stats.data_pages));
            out["zero_pages_served"] = json!(load(&stats.zero_pages));
        }
        // One-sided reads never reach the source's CPU: the destination counts what it read.
        #[cfg(feature = "rdma")]
        PageServer::Rdma(server) => out["rdma_device"] = json!(server.device_name()),
    }
    println!("{out}");
    Ok(())
}

/// The source's page server for the chosen transport.
enum PageServer {
    Tcp(TcpPageServer),
    #[cfg(feature = "rdma")]
    Rdma(ferry::transport::rdma::RdmaPageServer),
}

impl PageServer {
    fn start(a: &Args, memory: Arc<GuestMemory>) -> Result<Self> {
        match &a.rdma {
            None => Ok(PageServer::Tcp(TcpPageServer::start(a.addr.as_str(), memory, key()?, TcpOptions::default())?)),
            #[cfg(feature = "rdma")]
            Some(choice) => Ok(PageServer::Rdma(ferry::transport::rdma::RdmaPageServer::start(
                a.addr.as_str(),
                memory,
                key()?,
                rdma_options(choice),
            )?)),
            #[cfg(not(feature = "rdma"))]
            Some(_) => bail!("this ferry-toucher was built without the rdma feature"),
        }
    }

    /// Breaks the destination's data lanes (it reconnects under the session).
    fn cut(&self) {
        match self {
            PageServer::Tcp(s) => s.cut_data_lanes(),
            #[cfg(feature = "rdma")]
            PageServer::Rdma(s) => s.drop_connections(),
        }
    }

    /// Where a broken control lane comes back.
    fn acceptor(&self) -> &dyn ferry::ControlAcceptor {
        match self {
            PageServer::Tcp(s) => s,
            #[cfg(feature = "rdma")]
            PageServer::Rdma(s) => s,
        }
    }

    fn local_addr(&self) -> std::net::SocketAddr {
        match self {
            PageServer::Tcp(s) => s.local_addr(),
            #[cfg(feature = "rdma")]
            PageServer::Rdma(s) => s.local_addr(),
        }
    }

    fn accept_control(&self, timeout: Duration) -> Result<Box<dyn ferry::transport::ControlStream>> {
        Ok(match self {
            PageServer::Tcp(s) => Box::new(s.accept_control(timeout)?),
            #[cfg(feature = "rdma")]
            PageServer::Rdma(s) => Box::new(s.accept_control(timeout)?),
        })
    }
}

#[cfg(feature = "rdma")]
fn rdma_options(choice: &RdmaChoice) -> ferry::transport::rdma::RdmaOptions {
    ferry::transport::rdma::RdmaOptions { device: choice.device.clone(), ..Default::default() }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn dest(a: &Args) -> Result<()> {
    let layout = layout(a)?;
    let pages = layout.total_pages();
    let free = demo_free_pages(pages);
    // Register first: the source pauses its guest as soon as our control lane connects.
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), a.backing)?)?);
    let (lanes, control, ledger) = connect(a, &layout, &memory)?;
    let mut position = 0;
    let session = PostcopyDestination::start(
        control,
        memory.clone(),
        lanes,
        &EngineConfig { policy: a.policy, ..EngineConfig::default() },
        |state| {
            let seed = state.get(..8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
            let pos = state.get(8..16).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
            match (seed, pos) {
                (Some(SEED), Some(p)) => {
                    position = p;
                    Ok(())
                }
                _ => Err("state blob is not this toucher's".to_string()),
            }
        },
    )?;
    let touches = a.touches.unwrap_or(match a.pattern {
        Pattern::Sequential => pages,
        _ => pages / 4,
    });
    // The walk goes on where the source's stopped; a second walk with the same seed after the
    // migration, over memory that is all local, is the baseline the first is compared with.
    let walk = Walk { pattern: a.pattern, seed: SEED ^ position, start: position };
    let watchdog = ferry::toucher::EngineWatchdog::start(session.engine().failure_watch());
    let during = touch(memory.guest(), walk, SEED, &free, touches)?;
    session.finish();
    drop(watchdog);
    let report = session.wait()?;
    let after = touch(memory.guest(), walk, SEED, &free, touches)?;
    let mismatches = during.mismatches + after.mismatches + verify_all(memory.guest(), SEED, &free)?;
    let out = json!({
        "role": "dest",
        "policy": report.policy,
        "pattern": a.pattern.name(),
        "backing": format!("{:?}", a.backing),
        "pages_total": report.pages_total,
        "total_ms": ms(report.total),
        "resume_ms": ms(report.resume_latency),
        "faults": report.faults,
        "network_faults": report.network_faults,
        "inflight_faults": report.inflight_faults,
        "local_faults": report.local_faults,
        "urgent_pages": report.urgent_pages,
        "bulk_pages": report.bulk_pages,
        "zero_pages": report.zero_pages,
        "skipped_free_pages": report.skipped_free_pages,
        "pages_installed_twice": report.pages_installed_twice,
        "pages_read_twice": ledger.as_ref().map(|twice| twice()),
        "recoveries": report.recoveries,
        "pages_resent": report.resent_pages,
        "transport": if a.rdma.is_some() { "rdma" } else { "tcp" },
        "fault_p50_us": report.fault_p50.as_secs_f64() * 1e6,
        "fault_p99_us": report.fault_p99.as_secs_f64() * 1e6,
        "fault_max_us": report.fault_max.as_secs_f64() * 1e6,
        "fault_histogram_pow2_us": report.fault_histogram_us,
        "blocktime_ms": ms(report.blocktime),
        "rate_during": during.rate(),
        "rate_after": after.rate(),
        "guest_mismatches": mismatches,
    });
    println!("{out}");
    if mismatches > 0 {
        bail!("{mismatches} pages differ from the source");
    }
    // Reads asked again after a lane broke are resends, not a page crossing twice.
    let read_twice = out["pages_read_twice"].as_u64().unwrap_or(0).saturating_sub(report.resent_pages);
    let twice = report.pages_installed_twice + read_twice;
    if twice > 0 {
        bail!("{twice} pages crossed or were installed twice");
    }
    Ok(())
}

/// Reads how many pages crossed twice, counted where the transport can see it.
type TwiceCounter = Box<dyn Fn() -> u64>;

/// Opens the session's lanes and control lane over the chosen transport.
fn connect(
    a: &Args,
    layout: &MemoryLayout,
    memory: &DestinationMemory,
) -> Result<(ferry::transport::PageSource, Box<dyn ferry::transport::ControlStream>, Option<TwiceCounter>)> {
    match &a.rdma {
        None => {
            let (lanes, control) =
                tcp::connect_session(a.addr.as_str(), &key()?, Some(layout), &TcpOptions::default())?;
            Ok((lanes, Box::new(control), None))
        }
        #[cfg(feature = "rdma")]
        Some(choice) => {
            let s = ferry::transport::rdma::connect_session(
                a.addr.as_str(),
                &key()?,
                Some(layout),
                &rdma_options(choice),
                |lanes| {
                    // SAFETY: `memory` (its alias mappings) outlives the lanes: the session's
                    // threads drop them while holding clones of the Arc this borrows from.
                    unsafe { ferry::register_landings(memory, lanes) }
                },
            )?;
            let ledger = s.ledger;
            let twice: TwiceCounter =
                Box::new(move || ledger.pages_read_twice.load(std::sync::atomic::Ordering::Relaxed));
            Ok((s.source, Box::new(s.control), Some(twice)))
        }
        #[cfg(not(feature = "rdma"))]
        Some(_) => {
            let _ = memory;
            bail!("this ferry-toucher was built without the rdma feature")
        }
    }
}

/// Runs the source as a child process of this binary and the destination here.
fn demo(a: &Args) -> Result<()> {
    let key_hex: String = match std::env::var("FERRY_KEY") {
        Ok(k) => k,
        Err(_) => {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    std::env::set_var("FERRY_KEY", &key_hex);
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "source",
            "--listen",
            "127.0.0.1:0",
            "--mem-mib",
            &a.mem_mib.to_string(),
            "--page-size",
            &a.page_size.to_string(),
        ])
        .args(["--pattern", a.pattern.name()])
        .args(["--cut-lanes", &a.cut_lanes.to_string()])
        .args(match &a.rdma {
            Some(RdmaChoice { device: Some(d) }) => vec!["--rdma-device".to_string(), d.clone()],
            Some(RdmaChoice { device: None }) => vec!["--transport".into(), "rdma".into()],
            None => vec![],
        })
        .env("FERRY_KEY", &key_hex)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no child stdout"))?).lines();
    let first = lines.next().ok_or_else(|| anyhow!("source exited before listening"))??;
    let addr = first.strip_prefix("listening ").ok_or_else(|| anyhow!("source said {first:?}"))?.to_string();
    let dest_args = Args { addr, role: "dest".into(), rdma: a.rdma.clone(), ..*a };
    let result = dest(&dest_args);
    for line in lines {
        println!("{}", line?);
    }
    let status = child.wait()?;
    result?;
    if !status.success() {
        bail!("source process failed: {status}");
    }
    Ok(())
}
