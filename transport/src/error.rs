use crate::wire::RejectReason;

/// Everything that can go wrong while moving pages or control messages.
///
/// Wire input never panics: every malformed, hostile or truncated message ends as one of these.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("bad magic {0:#010x}: the peer does not speak the ferry protocol")]
    BadMagic(u32),
    #[error("protocol version mismatch: we speak version {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("frame of type {kind} with {len} bytes exceeds its cap of {cap} bytes")]
    FrameTooLarge { kind: u16, len: u32, cap: u32 },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("unexpected message: expected {expected}, got message type {got}")]
    Unexpected { expected: &'static str, got: u16 },
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    #[error("invalid memory layout: {0}")]
    InvalidLayout(String),
    #[error("memory layout mismatch: {0}")]
    LayoutMismatch(String),
    #[error("the peer refused us ({reason:?}): {detail}")]
    Refused { reason: RejectReason, detail: String },
    #[error("read out of range: {0}")]
    OutOfRange(String),
    #[error("the bulk lane is full: {0} reads already in flight")]
    LaneFull(usize),
    #[error("the destination buffer holds {got} bytes, the run needs {need}")]
    BufferSize { need: usize, got: usize },
    #[error("the peer's shared memory is unusable: {0}")]
    BadSharedMemory(String),
    #[error("snapshot image {path}: {why}")]
    Snapshot { path: String, why: String },
    #[error("rdma {op}: {detail}")]
    Rdma { op: &'static str, detail: String },
    #[error("snapshot checksum mismatch in region {region}, page {page}")]
    Checksum { region: u32, page: u64 },
    /// The TLS layer of a tcp lane failed: a handshake the peer broke off or a record that does
    /// not decrypt.
    #[error("tls: {0}")]
    Tls(String),
    /// Nothing arrived within a deadline: the peer (or the link) went silent.
    #[error("the peer went silent: {0}")]
    Silent(String),
}

pub type Result<T, E = TransportError> = std::result::Result<T, E>;

impl TransportError {
    pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> Self {
        TransportError::Malformed { what, why: why.into() }
    }

    /// Maps an end-of-stream while reading to [`TransportError::PeerClosed`], and a read that hit
    /// its deadline (SO_RCVTIMEO) to [`TransportError::Silent`], so callers can tell a vanished or
    /// silent peer from other I/O failures.
    pub fn from_read(err: std::io::Error) -> Self {
        match err.kind() {
            std::io::ErrorKind::UnexpectedEof => TransportError::PeerClosed,
            std::io::ErrorKind::WouldBlock => TransportError::Silent("nothing arrived within the read deadline".into()),
            // Our own timeouts carry their own words (see ferry's LiveControl).
            std::io::ErrorKind::TimedOut => TransportError::Silent(err.to_string()),
            _ => TransportError::Io(err),
        }
    }
}
