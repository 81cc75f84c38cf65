use crate::wire::RejectReason;

/// Everything that can go wrong while moving pages or control messages.
///
/// Wire input never panics: every malformed, hostile or truncated message ends as one of these.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A system call failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection (or it broke).
    #[error("peer closed the connection")]
    PeerClosed,
    /// A frame did not start with [`crate::wire::MAGIC`].
    #[error("bad magic {0:#010x}: the peer does not speak the ferry protocol")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak version {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// [`crate::wire::PROTOCOL_VERSION`].
        ours: u16,
        /// The version the peer's frame carried.
        theirs: u16,
    },
    /// A frame announced more payload than its type allows (refused before reading it).
    #[error("frame of type {kind} with {len} bytes exceeds its cap of {cap} bytes")]
    FrameTooLarge {
        /// The frame's type.
        kind: u16,
        /// The payload length it announced.
        len: u32,
        /// The most its type allows.
        cap: u32,
    },
    /// A message did not decode.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What was wrong with it.
        why: String,
    },
    /// A message of another type than the protocol allows at this point.
    #[error("unexpected message: expected {expected}, got message type {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: &'static str,
        /// The type that came.
        got: u16,
    },
    /// The peer's proof did not verify: it does not hold the key.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// A key too short or too long.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// A memory layout that breaks a rule (page size, region count, alignment, overlap).
    #[error("invalid memory layout: {0}")]
    InvalidLayout(String),
    /// The two ends hold guests of different layouts.
    #[error("memory layout mismatch: {0}")]
    LayoutMismatch(String),
    /// The peer refused the connection.
    #[error("the peer refused us ({reason:?}): {detail}")]
    Refused {
        /// Why, as the wire names it.
        reason: RejectReason,
        /// Why, in the peer's words.
        detail: String,
    },
    /// A run of pages outside the guest.
    #[error("read out of range: {0}")]
    OutOfRange(String),
    /// A bulk read submitted while the lane's depth is in flight.
    #[error("the bulk lane is full: {0} reads already in flight")]
    LaneFull(usize),
    /// A buffer of the wrong size for a run.
    #[error("the destination buffer holds {got} bytes, the run needs {need}")]
    BufferSize {
        /// Bytes the run needs.
        need: usize,
        /// Bytes the buffer holds.
        got: usize,
    },
    /// Memory a local peer shared cannot be mapped as announced.
    #[error("the peer's shared memory is unusable: {0}")]
    BadSharedMemory(String),
    /// A snapshot image cannot be read or written, or is not one.
    #[error("snapshot image {path}: {why}")]
    Snapshot {
        /// The image file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// An RDMA verb or setup step failed.
    #[error("rdma {op}: {detail}")]
    Rdma {
        /// The verb or step.
        op: &'static str,
        /// What the device or the peer said.
        detail: String,
    },
    /// A snapshot page whose contents do not match its checksum.
    #[error("snapshot checksum mismatch in region {region}, page {page}")]
    Checksum {
        /// The page's region.
        region: u32,
        /// The page, counted in its region.
        page: u64,
    },
    /// The TLS layer of a tcp lane failed: a handshake the peer broke off or a record that does
    /// not decrypt.
    #[error("tls: {0}")]
    Tls(String),
    /// Nothing arrived within a deadline: the peer (or the link) went silent.
    #[error("the peer went silent: {0}")]
    Silent(String),
}

/// A result whose error is a [`TransportError`].
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
