/// Errors of a migration session.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("transport: {0}")]
    Transport(#[from] ferry_transport::TransportError),
    #[error("fault handler: {0}")]
    Fault(#[from] ferry_fault_handler::FaultError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the VMM's resume callback failed: {0}")]
    Resume(String),
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    #[error("the VMM failed: {0}")]
    Vmm(String),
    #[error("the arbiter: {0}")]
    Arbiter(String),
    #[error("the lease is held by {0:?}: this side must not run the guest")]
    LeaseHeld(String),
    #[error("the lease was lost: this side must not run the guest")]
    LeaseLost,
    #[error("a session thread panicked")]
    ThreadPanicked,
}

pub type Result<T, E = MigrationError> = std::result::Result<T, E>;
