use ferry_transport::HostAddr;

/// Errors of the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// userfaultfd (or a feature it needs) is not available on this kernel.
    #[error("userfaultfd unsupported here: {0}")]
    Unsupported(String),
    /// An ioctl failed: its name and the error.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, std::io::Error),
    /// A system call failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A fault at a host address outside every registered region.
    #[error("fault at {0:#x} outside guest memory")]
    OutsideGuest(HostAddr),
    /// Installing a page failed.
    #[error("install failed at {addr:#x}: errno {errno}")]
    Install {
        /// Host address of the page.
        addr: HostAddr,
        /// The kernel's error.
        errno: i32,
    },
    /// Reading pages from the source failed.
    #[error("transport: {0}")]
    Transport(#[from] ferry_transport::TransportError),
    /// Destination memory that cannot be registered as given.
    #[error("invalid destination memory: {0}")]
    InvalidMemory(String),
    /// The bulk lane returned what was not asked.
    #[error("bulk lane: {0}")]
    Lane(String),
    /// The kernel kept answering EAGAIN: the mapping is changing (a remove event waits to be
    /// read). Retry after reading the fault events.
    #[error("install at {addr:#x} kept meeting a changing mapping (a remove event is pending)")]
    Busy {
        /// Host address of the page.
        addr: HostAddr,
    },
}

/// A result whose error is a [`FaultError`].
pub type Result<T, E = FaultError> = std::result::Result<T, E>;
