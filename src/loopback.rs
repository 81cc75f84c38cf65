//! A whole post-copy migration inside one process, over loopback TCP or the same-host `local`
//! transport: a source page server, a
//! destination registered with userfaultfd, and a toucher thread as the guest. Tests and the
//! `ferry-bench postcopy` driver run migrations through this; `ferry-toucher` runs the same
//! session between two processes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_fault_handler::DestinationMemory;
use ferry_prepager::PolicyKind;
use ferry_transport::local::{self, LocalPageServer};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, ControlStream, GuestMemory, MemoryLayout, PreSharedKey};

use crate::engine::{DestinationReport, EngineConfig};
use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::postcopy::{run_source, PostcopyDestination, SourceReport};
use crate::timeline::{Timeline, TimelinePoint};
use crate::toucher::{demo_free_pages, prepare_source, touch, verify_all, Pattern, TouchReport, Walk};

const SEED: u64 = 77;

/// The page transport a loopback migration uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopbackTransport {
    /// A page server over loopback tcp.
    Tcp,
    /// Same host: the source's memfds mapped by the destination; reads are one-sided.
    Local,
}

impl LoopbackTransport {
    /// The transport's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            LoopbackTransport::Tcp => "tcp",
            LoopbackTransport::Local => "local",
        }
    }
}

/// One loopback migration: what moves, over what, how the guest walks meanwhile.
#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    /// The page transport.
    pub transport: LoopbackTransport,
    /// The guest memory's layout.
    pub layout: MemoryLayout,
    /// What backs the destination's memory (anonymous, memfd, hugetlbfs).
    pub dest_backing: Backing,
    /// How the guest walks its memory while it arrives.
    pub pattern: Pattern,
    /// The pre-paging policy.
    pub policy: PolicyKind,
    /// Pages the guest touches while memory arrives.
    pub touches: u64,
}

/// What a loopback migration measured, at both ends and in the guest.
#[derive(Clone, Debug)]
pub struct LoopbackOutcome {
    /// The destination's report.
    pub dest: DestinationReport,
    /// The source's report.
    pub source: SourceReport,
    /// The guest's walk while memory arrived.
    pub during: TouchReport,
    /// The same walk again with all memory local: the baseline for the slowdown.
    pub after: TouchReport,
    /// Pages that differ from the source after the migration (a full pass).
    pub verify_mismatches: u64,
    /// Pages the source served (data and zero markers), and of them those served before; `None`
    /// over `local`, where reads are one-sided and the source sees none of them.
    pub served_pages: Option<u64>,
    /// Pages served more than once (post-copy keeps this at zero); `None` over `local`.
    pub served_twice: Option<u64>,
    /// Pages the source named free (never sent).
    pub free_pages: u64,
    /// The destination's counters every [`TIMELINE_PERIOD`], from the guest's resume to every
    /// page present.
    pub timeline: Vec<TimelinePoint>,
}

/// How often a loopback migration samples its destination's counters.
pub const TIMELINE_PERIOD: Duration = Duration::from_millis(10);

/// Runs one migration. The state blob carries the data seed; free pages follow
/// [`demo_free_pages`] and hold junk at the source, so a free page that crossed would show.
pub fn migrate(config: &LoopbackConfig) -> Result<LoopbackOutcome> {
    let key = PreSharedKey::generate()?;
    let layout = &config.layout;
    let free = demo_free_pages(layout.total_pages());
    let source_backing = match config.transport {
        LoopbackTransport::Tcp => Backing::Anonymous,
        LoopbackTransport::Local => Backing::Memfd,
    };
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), source_backing)?);
    prepare_source(&source_mem, SEED, &free)?;
    let paused = move |mut control: Box<dyn ControlStream>, free: FreePages| -> Result<SourceReport> {
        run_source(control.as_mut(), Instant::now(), &SEED.to_le_bytes(), &free, &Default::default())
    };
    // Register first: the source pauses its guest as soon as our control lane connects.
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), config.dest_backing)?)?);
    let (server, source, lanes, control): (Server, _, _, Box<dyn ControlStream>) = match config.transport {
        LoopbackTransport::Tcp => {
            let server = Arc::new(TcpPageServer::start("127.0.0.1:0", source_mem, key.clone(), TcpOptions::default())?);
            let source = {
                let (server, free) = (server.clone(), free.clone());
                std::thread::spawn(move || paused(Box::new(server.accept_control(Duration::from_secs(30))?), free))
            };
            let (lanes, control) =
                tcp::connect_session(server.local_addr(), &key, Some(layout), &TcpOptions::default())?;
            (Server::Tcp(server), source, lanes, Box::new(control))
        }
        LoopbackTransport::Local => {
            let path = std::env::temp_dir().join(format!("ferry-loopback-{}-{}.sock", std::process::id(), next_id()));
            let server = Arc::new(LocalPageServer::start(&path, source_mem, key.clone())?);
            let source = {
                let (server, free) = (server.clone(), free.clone());
                std::thread::spawn(move || paused(Box::new(server.accept_control(Duration::from_secs(30))?), free))
            };
            let (lanes, control) = local::connect_session(&path, &key, Some(layout), 32)?;
            (Server::Local(server), source, lanes, Box::new(control))
        }
    };
    let mut seed = 0;
    let session = PostcopyDestination::start(
        control,
        memory.clone(),
        lanes,
        &EngineConfig { policy: config.policy, ..EngineConfig::default() },
        |state| {
            seed = u64::from_le_bytes(state.try_into().map_err(|_| "the state blob is not a seed".to_string())?);
            Ok(())
        },
    )?;
    let timeline = Timeline::start(memory.clone(), session.engine().stats_handle(), TIMELINE_PERIOD)
        .map_err(|e| MigrationError::Protocol(format!("spawning the timeline: {e}")))?;
    let walk = Walk::new(config.pattern);
    let watchdog = crate::toucher::EngineWatchdog::start(session.engine().failure_watch());
    let during = touch(memory.guest(), walk, seed, &free, config.touches)?;
    session.finish();
    drop(watchdog);
    let dest = session.wait()?;
    let timeline = timeline.stop();
    let after = touch(memory.guest(), walk, seed, &free, config.touches)?;
    let verify_mismatches = verify_all(memory.guest(), seed, &free)?;
    let source = source.join().map_err(|_| MigrationError::ThreadPanicked)??;
    let (served_pages, served_twice) = match &server {
        Server::Tcp(server) => {
            let stats = server.stats();
            (
                Some(stats.data_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed)),
                Some(stats.pages_served_twice.load(Ordering::Relaxed)),
            )
        }
        Server::Local(_) => (None, None),
    };
    Ok(LoopbackOutcome {
        dest,
        source,
        during,
        after,
        verify_mismatches,
        served_pages,
        served_twice,
        free_pages: free.count(),
        timeline,
    })
}

/// Keeps the source's server alive until the migration is over.
enum Server {
    Tcp(Arc<TcpPageServer>),
    Local(#[allow(dead_code)] Arc<LocalPageServer>),
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
