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
//! `loopback`, a whole migration in one process.

pub mod arbiter;
pub mod backforth;
pub mod checkpoint;
pub mod engine;
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
pub use freepages::FreePages;
pub use liveness::Liveness;
pub use postcopy::{run_source, ControlAcceptor, PostcopyDestination, Protection, SourceOptions, SourceReport};
