//! `ferry-transport` moves guest memory pages and control messages between the two hosts of a
//! migration. It owns the wire protocol (framed, versioned, length-capped messages and an
//! HMAC-authenticated handshake that binds a session id and the guest memory layout), the
//! destination's two-lane page reading API ([`UrgentLane`] for faults, [`BulkLane`] for
//! pre-paging), and the backends that implement it: [`tcp`] (a page server on the source),
//! [`local`] (same host: the source's sealed memfds mapped read-only, so a read costs the source
//! nothing), [`snapshot`] (a checksummed memory image written and read through io_uring) and
//! [`rawfile`] (a flat memory file, as Firecracker saves guest memory). tcp lanes run over TLS 1.3
//! by default ([`tls`]), authenticated by the pre-shared key. Guest-physical and host addresses
//! are distinct types ([`GuestAddr`], [`HostAddr`]) wherever the public API takes or gives one.
//! Raw memory and syscalls are confined to `memory`, `lane::PageBuf`, and the small
//! `unsafe` helpers of each backend; everything above them is safe Rust.

#![deny(missing_docs)]

mod acceptor;
pub mod addr;
pub mod auth;
/// Errors of every transport.
pub mod error;
pub mod handshake;
pub mod lane;
pub mod layout;
pub mod local;
pub mod memory;
mod pagebits;
#[cfg(feature = "testkit")]
pub mod pattern;
pub mod rawfile;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod snapshot;
pub mod tcp;
pub mod tls;
#[cfg(feature = "vm-memory")]
mod vm_memory;
pub mod wire;

pub use addr::{GuestAddr, HostAddr, PageIndex};
pub use auth::PreSharedKey;
pub use error::{Result, TransportError};
pub use lane::{
    BulkDone, BulkLane, BulkRead, BulkTarget, ControlStream, Interrupter, MappedRange, PageBuf, PageSource, Reconnect,
    UrgentLane,
};
pub use layout::{MemoryLayout, PageRun, RegionLayout};
pub use memory::{Backing, GuestMemory, RegionMapping};
pub use wire::{Lane, SessionId, ZeroMask};
