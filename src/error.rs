/// Errors of a migration session.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Moving pages or messages failed.
    #[error("transport: {0}")]
    Transport(#[from] ferry_transport::TransportError),
    /// Installing pages or reading faults failed.
    #[error("fault handler: {0}")]
    Fault(#[from] ferry_fault_handler::FaultError),
    /// The peer sent what the session protocol does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The VMM's resume callback failed.
    #[error("the VMM's resume callback failed: {0}")]
    Resume(String),
    /// The peer aborted, saying why.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    /// A VMM callback failed.
    #[error("the VMM failed: {0}")]
    Vmm(String),
    /// The arbiter could not be reached or answered badly.
    #[error("the arbiter: {0}")]
    Arbiter(String),
    /// Another side holds the lease: this side must not run the guest.
    #[error("the lease is held by {0:?}: this side must not run the guest")]
    LeaseHeld(String),
    /// This side lost the lease it held: it must stop running the guest.
    #[error("the lease was lost: this side must not run the guest")]
    LeaseLost,
    /// A thread of the session panicked.
    #[error("a session thread panicked")]
    ThreadPanicked,
}

/// A result whose error is a [`MigrationError`].
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;
