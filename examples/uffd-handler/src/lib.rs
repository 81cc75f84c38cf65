//! A drop-in page-fault handler for Firecracker's snapshot restore with `mem_backend:
//! {backend_type: "Uffd", backend_path}`: it listens on that Unix socket, receives Firecracker's
//! JSON array of `GuestRegionUffdMapping` with the userfaultfd in the same message (SCM_RIGHTS),
//! keeps the socket open, and serves the guest's faults from Firecracker's raw memory file with
//! ferry's post-copy engine: urgent reads for faults, bubbling (or push, or demand) on the bulk
//! path behind them, holes of the file and zero pages never installed, working-set recording and
//! replay. It follows Firecracker's rules for the balloon: after `UFFD_EVENT_REMOVE` the removed
//! pages read as zero on their next fault, an install meeting EAGAIN (a remove pending) is retried
//! after the remove is read, a fault may arrive before the remove that precedes it, and EEXIST is
//! success.
//!
//! [`protocol`] is the wire format (both sides, so tests can be Firecracker); [`serve`] runs one
//! restore. The raw socket calls (SCM_RIGHTS) live in `protocol`, on `libc` directly: the two
//! calls did not justify `nix` or an fd-passing crate beside the workspace's own `libc` wrappers.

#![deny(missing_docs)]

pub mod protocol;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::engine::{DestinationReport, EngineConfig, PostcopyEngine};
use ferry::restore::WorkingSet;
use ferry::FreePages;
use ferry_fault_handler::uffd::Userfault;
use ferry_fault_handler::DestinationMemory;
use ferry_transport::rawfile::RawMemoryFile;
use ferry_transport::{GuestMemory, RegionMapping};

pub use protocol::GuestRegionUffdMapping;

/// Errors of the handler.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Firecracker's handshake was missing, malformed or late.
    #[error("the Firecracker handshake: {0}")]
    Handshake(String),
    /// A system call failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Reading the memory file failed.
    #[error("transport: {0}")]
    Transport(#[from] ferry_transport::TransportError),
    /// Registering or installing pages failed.
    #[error("fault handler: {0}")]
    Fault(#[from] ferry_fault_handler::FaultError),
    /// The post-copy engine failed.
    #[error("engine: {0}")]
    Engine(#[from] ferry::MigrationError),
}

/// A result whose error is a [`HandlerError`].
pub type Result<T, E = HandlerError> = std::result::Result<T, E>;

/// How one restore is served.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Firecracker's guest memory file (`mem_file_path` of its snapshot).
    pub mem_file: PathBuf,
    /// The pre-pager and its settings.
    pub engine: EngineConfig,
    /// Record the order of first faults beside the memory file (`MEMFILE.ws`).
    pub record: bool,
    /// Fetch the working set recorded beside the memory file first.
    pub replay: bool,
    /// How long Firecracker may take to send its handshake once connected.
    pub handshake_timeout: Duration,
    /// Under a supervisor: the removes of this restore, journaled by each worker and replayed by
    /// the next.
    pub remove_journal: Option<PathBuf>,
}

/// What a served restore measured.
#[derive(Debug)]
pub struct Served {
    /// Regions Firecracker registered.
    pub regions: usize,
    /// Bytes per page.
    pub page_size: u64,
    /// From the handshake received to the engine serving faults.
    pub ready: Duration,
    /// The engine's report once every page was present; `None` when Firecracker went away first
    /// (a demand handler serves until then).
    pub report: Option<DestinationReport>,
    /// Faults the guest took.
    pub faults: u64,
    /// Faults that waited for the memory file.
    pub network_faults: u64,
    /// Pages of the working set recorded, when recording.
    pub working_set_pages: Option<usize>,
    /// Removes read by a handler before this one, applied before serving.
    pub removes_replayed: u64,
}

/// Serves one Firecracker restore on `stream` (accepted on the handler's socket) until every page
/// of its guest is present; the userfaultfd is then released and Firecracker's later faults are
/// the kernel's.
pub fn serve(stream: &UnixStream, config: &ServeConfig) -> Result<Served> {
    let (mappings, fd) = protocol::receive_handshake(stream, config.handshake_timeout)?;
    let t0 = Instant::now();
    let layout = protocol::layout_of(&mappings)?;
    let regions = mappings
        .iter()
        .map(|m| RegionMapping::foreign(ferry::transport::HostAddr(m.base_host_virt_addr), m.size as usize))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let guest = Arc::new(GuestMemory::new(layout.clone(), regions)?);
    // SAFETY: the fd came from the peer with these mappings in one message, as Firecracker's
    // protocol sends its guest memory's userfaultfd and the ranges it registered with it; the
    // ranges are Firecracker's address space, which no reference in this process aliases.
    let uffd = unsafe { Userfault::adopt(fd)? };
    // SAFETY: as above: `guest`'s foreign regions are exactly the ranges registered with `uffd`.
    let memory = Arc::new(unsafe { DestinationMemory::adopt(uffd, guest)? });
    // Removes a worker before us read: the guest discarded those pages for good.
    let removes_replayed = match &config.remove_journal {
        Some(path) => memory.journal_removes(path)?,
        None => 0,
    };
    let file = RawMemoryFile::open(&config.mem_file, layout.clone(), mappings.iter().map(|m| m.offset).collect())?;
    let holes = FreePages::from_words(file.holes()?, layout.total_pages())
        .ok_or_else(|| HandlerError::Handshake("the hole map does not fit the layout".into()))?;
    let ws_path = WorkingSet::path_for(&config.mem_file);
    let mut engine_config = EngineConfig { record_first_faults: config.record, ..config.engine.clone() };
    let mut working_set_pages = None;
    if config.replay {
        let ws = WorkingSet::load(&ws_path, layout.total_pages())?;
        working_set_pages = Some(ws.pages.len());
        engine_config = ws.replay_config(config.engine.policy, &engine_config);
    }
    let mut engine = PostcopyEngine::start(memory, file.page_source(32), &engine_config, &holes)?;
    engine.start_prepaging()?;
    let ready = t0.elapsed();
    let stats = engine.stats_handle();
    // Firecracker closing the socket (or dying) ends the restore: a demand handler, which only
    // serves faults, runs until then, like Firecracker's example handler.
    let watcher = protocol::HangupWatch::start(stream, engine.control())?;
    let outcome = engine.wait();
    let peer_gone = watcher.stop();
    let get = ferry_fault_handler::FaultStats::get;
    let (faults, network_faults) = (get(&stats.faults), get(&stats.network_faults));
    let report = match outcome {
        Ok(report) => Some(report),
        Err(_) if peer_gone => None,
        Err(e) => return Err(e.into()),
    };
    if let (true, Some(r)) = (config.record, &report) {
        WorkingSet { pages: r.first_faults.clone() }.save(&ws_path)?;
    }
    Ok(Served {
        regions: mappings.len(),
        page_size: u64::from(layout.page_size()),
        ready,
        report,
        faults,
        network_faults,
        working_set_pages,
        removes_replayed,
    })
}

/// Whether `path` is a socket someone listens on (a second handler must not steal it).
pub fn socket_in_use(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}
