//! `ferry` builds live-migration sessions from its parts: [`ferry_transport`] moves pages,
//! [`ferry_fault_handler`] traps and installs them, [`ferry_prepager`] decides what comes next.
//! This crate holds the sessions themselves: [`postcopy`] (the handoff of state and free pages, a
//! destination that resumes at once and pulls memory behind the running guest, the source's side
//! and both reports) and [`precopy`] (dirty-log rounds pulled by the destination until the
//! predicted downtime meets its target, and hybrid: rounds, then post-copy for the stale pages),
//! all speaking the session messages of [`handoff`]. Back-and-forth and fault tolerance are to
//! follow on the same parts. [`toucher`] is a guest stand-in that verifies every page it touches,
//! for tests, benchmarks and demos without KVM; [`loopback`] runs a whole migration in one process.

pub mod error;
pub mod freepages;
pub mod handoff;
pub mod loopback;
pub mod postcopy;
pub mod precopy;
pub mod toucher;

pub use error::{MigrationError, Result};
pub use ferry_fault_handler as fault_handler;
pub use ferry_prepager as prepager;
pub use ferry_transport as transport;
pub use freepages::FreePages;
pub use postcopy::{
    register_landings, run_source, Canceller, DestinationConfig, DestinationReport, PostcopyDestination, SourceReport,
};
