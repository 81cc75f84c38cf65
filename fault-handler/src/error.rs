/// Errors of the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("userfaultfd unsupported here: {0}")]
    Unsupported(String),
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, std::io::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("fault at {0:#x} outside guest memory")]
    OutsideGuest(u64),
    #[error("install failed at {addr:#x}: errno {errno}")]
    Install { addr: u64, errno: i32 },
    #[error("transport: {0}")]
    Transport(#[from] ferry_transport::TransportError),
    #[error("invalid destination memory: {0}")]
    InvalidMemory(String),
    #[error("bulk lane: {0}")]
    Lane(String),
    /// The kernel kept answering EAGAIN: the mapping is changing (a remove event waits to be
    /// read). Retry after reading the fault events.
    #[error("install at {addr:#x} kept meeting a changing mapping (a remove event is pending)")]
    Busy { addr: u64 },
}

pub type Result<T, E = FaultError> = std::result::Result<T, E>;
