//! `ferry` builds live-migration sessions from its parts: [`ferry_transport`] moves pages,
//! [`ferry_fault_handler`] traps and installs them, [`ferry_prepager`] decides what comes next.
//! This crate holds the post-copy [`engine`] (a guest running on memory that is still arriving,
//! over any page source: fault thread, pre-pager, installs, counters) and the sessions, thin
//! protocols over it and the lanes: [`postcopy`] (the handoff of state and free pages, a
//! destination that resumes at once and lets the engine pull memory behind the running guest, the
//! source's side) and [`precopy`] (dirty-log rounds pulled by the destination until the
//! predicted downtime meets its target, and hybrid: rounds, then post-copy for the stale pages),
//! and [`restore`] (snapshots saved in ferry's image format and restored eagerly, or lazily by the
//! engine over the image, fetching a recorded working set first),
//! all speaking the session messages of [`handoff`]. The three mechanisms every session shares
//! live here too: [`liveness`] (heartbeats and deadlines on the control lane; the engine reopens
//! broken data lanes itself) and the [`arbiter`] (a lease, so exactly one copy of a VM runs) and
//! the [`checkpoint`] stream (epochs of dirty pages and state, applied whole and
//! acknowledged; post-copy's reverse checkpoints, so a source restarts a guest whose destination
//! died), and [`ft`], fault-tolerant pairs on the same three (a primary streams epochs to a live
//! backup, which takes over when the primary is lost), [`backforth`] (a host a VM left keeps
//! its image; the way back moves only the pages the guest changed since) and [`taskguided`]
//! (pre-copy's stop held until the guest is inside a segment it marked as cheap to stop). With
//! the `testkit` feature (tests, benchmarks and demos without KVM;
//! not part of the API): `toucher`, a guest stand-in that verifies every page it touches, and
//! `loopback`, a whole migration in one process. With the `vm-memory` feature, a VMM on the
//! rust-vmm crates hands its `GuestMemoryMmap` over as it is
//! (`transport::GuestMemory::from_vm_memory`).
//!
//! # Post-copy, both ends
//!
//! The source serves its (paused) guest's memory and hands over the vCPU state; the destination
//! resumes at once, faulting pages in over the urgent lane while the pre-pager pushes the rest.
//! Here both ends run in one process over tcp loopback (TLS, as between hosts):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//!
//! use ferry::fault_handler::DestinationMemory;
//! use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
//! use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
//! use ferry::{EngineConfig, FreePages, PostcopyDestination, SourceOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layout = MemoryLayout::single(16 << 20)?;
//! let key = PreSharedKey::generate()?;
//!
//! // Source: the guest's memory (a VMM adopts its own mappings; here a fresh one) behind a page
//! // server. Once a destination connects, hand the paused guest over.
//! let guest = GuestMemory::create(layout.clone(), Backing::Anonymous)?;
//! guest.regions()[0].write(4096, b"guest data")?;
//! let server = Arc::new(TcpPageServer::start("127.0.0.1:0", Arc::new(guest), key.clone(), TcpOptions::default())?);
//! let source = {
//!     let (server, pages) = (server.clone(), layout.total_pages());
//!     std::thread::spawn(move || -> ferry::Result<()> {
//!         let mut control = server.accept_control(Duration::from_secs(30))?;
//!         let vcpu_state = b"the VMM's opaque state";
//!         ferry::run_source(&mut control, Instant::now(), vcpu_state, &FreePages::new(pages), &SourceOptions::default())?;
//!         Ok(()) // every page is at the destination: the source may let the guest go
//!     })
//! };
//!
//! // Destination: empty memory registered with userfaultfd, a session on the source, and the
//! // guest resumed as soon as its state arrives.
//! let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), Backing::Anonymous)?)?);
//! let (lanes, control) = tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default())?;
//! let session = PostcopyDestination::start(Box::new(control), memory.clone(), lanes, &EngineConfig::default(), |state| {
//!     assert_eq!(state, b"the VMM's opaque state"); // load it into the vCPUs and run them
//!     Ok(())
//! })?;
//! let mut read = [0u8; 10];
//! memory.guest().regions()[0].read(4096, &mut read)?; // a fault, served over the urgent lane
//! assert_eq!(&read, b"guest data");
//! let report = session.wait()?; // every page present
//! source.join().expect("the source thread")?;
//! assert_eq!(report.pages_total, layout.total_pages());
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod arbiter;
pub mod backforth;
pub mod checkpoint;
pub mod engine;
/// Errors of a migration session.
pub mod error;
pub mod freepages;
pub mod ft;
pub mod handoff;
pub mod liveness;
#[cfg(feature = "testkit")]
pub mod loopback;
pub mod postcopy;
pub mod precopy;
pub mod restore;
pub mod taskguided;
pub mod timeline;
#[cfg(feature = "testkit")]
pub mod toucher;

pub use engine::{register_landings, DestinationReport, EngineConfig, EngineControl, FailureWatch, PostcopyEngine};
pub use error::{MigrationError, Result};
pub use ferry_fault_handler as fault_handler;
pub use ferry_prepager as prepager;
pub use ferry_transport as transport;
pub use ferry_transport::PageIndex;
pub use freepages::FreePages;
pub use liveness::Liveness;
pub use postcopy::{run_source, ControlAcceptor, PostcopyDestination, Protection, SourceOptions, SourceReport};
