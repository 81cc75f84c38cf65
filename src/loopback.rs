//! A whole post-copy migration inside one process, over loopback TCP: a source page server, a
//! destination registered with userfaultfd, and a toucher thread as the guest. Tests and the
//! `ferry-bench postcopy` driver run migrations through this; `ferry-toucher` runs the same
//! session between two processes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_fault_handler::DestinationMemory;
use ferry_prepager::PolicyKind;
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};

use crate::error::{MigrationError, Result};
use crate::postcopy::{run_source, DestinationConfig, DestinationReport, PostcopyDestination, SourceReport};
use crate::toucher::{demo_free_pages, prepare_source, touch, verify_all, Pattern, TouchReport, Walk};

const SEED: u64 = 77;

#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    pub layout: MemoryLayout,
    pub dest_backing: Backing,
    pub pattern: Pattern,
    pub policy: PolicyKind,
    /// Pages the guest touches while memory arrives.
    pub touches: u64,
}

#[derive(Clone, Debug)]
pub struct LoopbackOutcome {
    pub dest: DestinationReport,
    pub source: SourceReport,
    /// The guest's walk while memory arrived.
    pub during: TouchReport,
    /// The same walk again with all memory local: the baseline for the slowdown.
    pub after: TouchReport,
    /// Pages that differ from the source after the migration (a full pass).
    pub verify_mismatches: u64,
    /// Pages the source served (data and zero markers).
    pub served_pages: u64,
    pub served_twice: u64,
    pub free_pages: u64,
}

/// Runs one migration. The state blob carries the data seed; free pages follow
/// [`demo_free_pages`] and hold junk at the source, so a free page that crossed would show.
pub fn migrate(config: &LoopbackConfig) -> Result<LoopbackOutcome> {
    let key = PreSharedKey::generate()?;
    let layout = &config.layout;
    let free = demo_free_pages(layout.total_pages());
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous)?);
    prepare_source(&source_mem, SEED, &free)?;
    let server = Arc::new(TcpPageServer::start("127.0.0.1:0", source_mem, key.clone(), TcpOptions::default())?);
    let source = {
        let (server, free) = (server.clone(), free.clone());
        std::thread::spawn(move || -> Result<SourceReport> {
            let mut control = server.accept_control(Duration::from_secs(30))?;
            run_source(&mut control, Instant::now(), &SEED.to_le_bytes(), &free)
        })
    };
    let (lanes, control) = tcp::connect_session(server.local_addr(), &key, Some(layout), &TcpOptions::default())?;
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), config.dest_backing)?)?);
    let mut seed = 0;
    let session = PostcopyDestination::start(
        Box::new(control),
        memory.clone(),
        lanes,
        &DestinationConfig { policy: config.policy, ..DestinationConfig::default() },
        |state| {
            seed = u64::from_le_bytes(state.try_into().map_err(|_| "the state blob is not a seed".to_string())?);
            Ok(())
        },
    )?;
    let walk = Walk::new(config.pattern);
    let during = touch(memory.guest(), walk, seed, &free, config.touches)?;
    session.finish();
    let dest = session.wait()?;
    let after = touch(memory.guest(), walk, seed, &free, config.touches)?;
    let verify_mismatches = verify_all(memory.guest(), seed, &free)?;
    let source = source.join().map_err(|_| MigrationError::ThreadPanicked)??;
    let stats = server.stats();
    Ok(LoopbackOutcome {
        dest,
        source,
        during,
        after,
        verify_mismatches,
        served_pages: stats.data_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed),
        served_twice: stats.pages_served_twice.load(Ordering::Relaxed),
        free_pages: free.count(),
    })
}
