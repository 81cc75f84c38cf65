//! `ferry-fault-handler` is the destination half of post-copy below the policy: it registers guest
//! memory with userfaultfd (MISSING mode with UFFDIO_COPY for anonymous memory; MISSING and MINOR
//! mode with UFFDIO_CONTINUE for memfd and hugetlbfs memory, filled through an alias mapping so no
//! page is copied on the host), or adopts a userfaultfd another process registered over its own
//! memory (Firecracker's UFFD protocol); keeps every page's state in atomic bitmaps so a page is
//! requested once and installed once (zero pages are never installed: present, and resolved when
//! touched); serves faults on the transport's urgent lane, and feeds faulting pages to the
//! pre-pager through a bounded lock-free queue; [`BulkInstaller`] keeps a bulk lane busy with the
//! runs the pre-pager claims and installs them as they land; [`Recovery`] reopens a lane that broke
//! and asks again what was in flight on it. The raw ioctls live in [`uffd`], the crate's only
//! syscall place.

#![deny(missing_docs)]

pub mod bulk;
/// Errors of the fault handler.
pub mod error;
pub mod handler;
pub mod install;
pub mod recovery;
pub mod state;
pub mod stats;
pub mod uffd;

pub use bulk::{BulkInstaller, Installed};
pub use error::{FaultError, Result};
/// The page numbers of this crate's states and claims (re-exported: its users need no transport).
pub use ferry_transport::PageIndex;
pub use handler::{run_fault_loop, FaultQueue};
pub use install::{DestinationMemory, InstallMode};
pub use recovery::{LaneInterrupts, Recovery};
pub use state::{Claim, PageStates};
pub use stats::{FaultStats, Histogram};
