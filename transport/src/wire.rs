//! The wire format: every message is a frame `magic | version | type | length | payload`, all
//! little-endian, with a per-type cap on `length` checked before anything is allocated or read.
//!
//! Control messages (handshake) are decoded whole from a bounded buffer. Page replies are decoded
//! in two steps: a fixed-size part (request id, status, zero-page mask), then the page data, which
//! the reader receives straight into its destination buffer.

use std::io::{Read, Write};

use crate::addr::GuestAddr;
use crate::error::{Result, TransportError};
use crate::layout::{MemoryLayout, PageRun, RegionLayout, MAX_REGIONS, MAX_RUN_BYTES, MAX_RUN_PAGES};

/// `FRRY` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRRY");
/// Bumped on every incompatible change; peers with different versions refuse each other.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of a frame header: magic (4), version (2), type (2), payload length (4).
pub const HEADER_LEN: usize = 12;
/// Cap for handshake and other control payloads.
pub const MAX_CONTROL_PAYLOAD: u32 = 16 * 1024;
/// Longest free-text detail a reject may carry.
pub const MAX_DETAIL_LEN: usize = 1024;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (an HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// Size of a read request payload.
pub const READ_REQUEST_LEN: usize = 24;
/// Size of the fixed part of a read reply payload, before the zero mask.
pub const READ_REPLY_FIXED_LEN: usize = 16;
/// Words in a full zero mask: one bit per page of the longest run.
pub const ZERO_MASK_WORDS: usize = MAX_RUN_PAGES as usize / 64;

/// A frame's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageKind {
    /// Client to server: which lane and session, the client's nonce and expected layout.
    Hello = 1,
    /// Server to client: its session, nonce, proof and layout.
    Challenge = 2,
    /// Client to server: the client's proof.
    Proof = 3,
    /// Server to client: the handshake passed; the lane is open.
    Welcome = 4,
    /// Either way: a refusal with its reason; the connection closes after it.
    Reject = 5,
    /// A migration session's own message; its payload belongs to the layer above the transport.
    Session = 8,
    /// Destination to source: a run of pages wanted.
    ReadRequest = 16,
    /// Source to destination: a run of pages, or why not.
    ReadReply = 17,
}

impl MessageKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Challenge,
            3 => Self::Proof,
            4 => Self::Welcome,
            5 => Self::Reject,
            8 => Self::Session,
            16 => Self::ReadRequest,
            17 => Self::ReadReply,
            _ => return None,
        })
    }

    /// Largest payload a frame of this type may announce.
    fn payload_cap(self) -> u32 {
        match self {
            Self::ReadRequest => READ_REQUEST_LEN as u32,
            Self::ReadReply => (READ_REPLY_FIXED_LEN + ZERO_MASK_WORDS * 8) as u32 + MAX_RUN_BYTES as u32,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }
}

/// A parsed and checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's type.
    pub kind: MessageKind,
    /// Payload bytes that follow the header (already checked against the type's cap).
    pub len: u32,
}

/// The header of a frame of `kind` carrying `len` payload bytes.
pub fn encode_header(kind: MessageKind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// Checks magic, version, type and the length cap. A version mismatch is reported as such even
/// when the rest of the header would not parse in our version.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<FrameHeader> {
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(TransportError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(TransportError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
    }
    let raw_kind = u16::from_le_bytes([h[6], h[7]]);
    let kind = MessageKind::from_u16(raw_kind)
        .ok_or_else(|| TransportError::malformed("frame header", format!("unknown message type {raw_kind}")))?;
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let cap = kind.payload_cap();
    if len > cap {
        return Err(TransportError::FrameTooLarge { kind: raw_kind, len, cap });
    }
    Ok(FrameHeader { kind, len })
}

/// Which connection of a session this is. Urgent and bulk reads travel on separate connections
/// so a fault never queues behind prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Lane {
    /// Session messages and the handshake of the session.
    Control = 0,
    /// Reads a faulting vCPU waits for.
    Urgent = 1,
    /// Pre-paging reads.
    Bulk = 2,
}

impl Lane {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Control,
            1 => Self::Urgent,
            2 => Self::Bulk,
            _ => return None,
        })
    }
}

/// Identifies one migration. A lane that reconnects with the same id resumes the same session;
/// reads are idempotent, so re-asking for a page whose reply was lost is always safe.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// The id a client sends to ask for a new session.
    pub const NEW: SessionId = SessionId([0; 16]);

    /// A fresh id from the system's random source.
    pub fn random() -> Result<Self> {
        Ok(SessionId(crate::auth::random_bytes()?))
    }

    /// Whether this is [`SessionId::NEW`], a request for a new session.
    pub fn is_new(&self) -> bool {
        *self == Self::NEW
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why a peer refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectReason {
    /// The peers speak different protocol versions.
    Version = 1,
    /// The peer does not hold the key (its proof did not verify).
    Auth = 2,
    /// The client expects a different guest memory layout.
    Layout = 3,
    /// The client names a session the server does not have.
    UnknownSession = 4,
    /// A handshake message did not decode.
    Malformed = 5,
    /// Any other reason (the detail says which).
    Other = 6,
    /// The server runs its tcp lanes over TLS and the client spoke in plaintext.
    Encryption = 7,
}

impl RejectReason {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Version,
            2 => Self::Auth,
            3 => Self::Layout,
            4 => Self::UnknownSession,
            5 => Self::Malformed,
            7 => Self::Encryption,
            _ => Self::Other,
        }
    }
}

/// First message, client to server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Which lane of the session this connection is.
    pub lane: Lane,
    /// The session to join, or [`SessionId::NEW`].
    pub session: SessionId,
    /// The client's nonce, which the server's proof covers.
    pub nonce: [u8; NONCE_LEN],
    /// The layout the client expects, or `None` to learn it from the server.
    pub layout: Option<MemoryLayout>,
}

/// Server's answer: its session, its nonce, its proof that it holds the key, and its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The session the server opened or joined.
    pub session: SessionId,
    /// The server's nonce, which the client's proof covers.
    pub nonce: [u8; NONCE_LEN],
    /// The server's proof over both nonces, the session and the layout.
    pub proof: [u8; PROOF_LEN],
    /// The guest memory layout the server serves.
    pub layout: MemoryLayout,
}

/// A handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// The client's proof over both nonces, the session and the layout.
    Proof([u8; PROOF_LEN]),
    /// The handshake passed.
    Welcome,
    /// The connection is refused.
    Reject {
        /// Why, as a code.
        reason: RejectReason,
        /// Why, in words (at most [`MAX_DETAIL_LEN`] bytes).
        detail: String,
    },
}

impl Control {
    /// The frame type this message travels as.
    pub fn kind(&self) -> MessageKind {
        match self {
            Control::Hello(_) => MessageKind::Hello,
            Control::Challenge(_) => MessageKind::Challenge,
            Control::Proof(_) => MessageKind::Proof,
            Control::Welcome => MessageKind::Welcome,
            Control::Reject { .. } => MessageKind::Reject,
        }
    }

    /// The payload alone (what the handshake's MACs cover).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        match self {
            Control::Hello(h) => {
                out.push(h.lane as u8);
                out.extend_from_slice(&h.session.0);
                out.extend_from_slice(&h.nonce);
                match &h.layout {
                    None => out.push(0),
                    Some(l) => {
                        out.push(1);
                        encode_layout(l, &mut out);
                    }
                }
            }
            Control::Challenge(c) => {
                out.extend_from_slice(&c.session.0);
                out.extend_from_slice(&c.nonce);
                out.extend_from_slice(&c.proof);
                encode_layout(&c.layout, &mut out);
            }
            Control::Proof(p) => out.extend_from_slice(p),
            Control::Welcome => {}
            Control::Reject { reason, detail } => {
                out.extend_from_slice(&(*reason as u16).to_le_bytes());
                let detail = truncate_utf8(detail, MAX_DETAIL_LEN);
                out.extend_from_slice(&(detail.len() as u16).to_le_bytes());
                out.extend_from_slice(detail.as_bytes());
            }
        }
        out
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.encode_payload();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&encode_header(self.kind(), payload.len() as u32));
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes a control payload of the given type. The whole payload must be consumed.
    pub fn decode(kind: MessageKind, payload: &[u8]) -> Result<Self> {
        let mut d = Decoder::new(payload, "control message");
        let msg = match kind {
            MessageKind::Hello => {
                let lane_raw = d.u8()?;
                let lane = Lane::from_u8(lane_raw)
                    .ok_or_else(|| TransportError::malformed("hello", format!("lane {lane_raw}")))?;
                let session = SessionId(d.array()?);
                let nonce = d.array()?;
                let layout = match d.u8()? {
                    0 => None,
                    1 => Some(decode_layout(&mut d)?),
                    v => return Err(TransportError::malformed("hello", format!("layout flag {v}"))),
                };
                Control::Hello(Hello { lane, session, nonce, layout })
            }
            MessageKind::Challenge => Control::Challenge(Challenge {
                session: SessionId(d.array()?),
                nonce: d.array()?,
                proof: d.array()?,
                layout: decode_layout(&mut d)?,
            }),
            MessageKind::Proof => Control::Proof(d.array()?),
            MessageKind::Welcome => Control::Welcome,
            MessageKind::Reject => {
                let reason = RejectReason::from_u16(d.u16()?);
                let len = d.u16()? as usize;
                if len > MAX_DETAIL_LEN {
                    return Err(TransportError::malformed("reject", format!("detail of {len} bytes")));
                }
                let detail = String::from_utf8_lossy(d.bytes(len)?).into_owned();
                Control::Reject { reason, detail }
            }
            MessageKind::ReadRequest | MessageKind::ReadReply | MessageKind::Session => {
                return Err(TransportError::Unexpected { expected: "a control message", got: kind as u16 })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn encode_layout(l: &MemoryLayout, out: &mut Vec<u8>) {
    out.extend_from_slice(&l.page_size().to_le_bytes());
    out.extend_from_slice(&(l.regions().len() as u16).to_le_bytes());
    for r in l.regions() {
        out.extend_from_slice(&r.guest_phys_addr.0.to_le_bytes());
        out.extend_from_slice(&r.size.to_le_bytes());
    }
}

fn decode_layout(d: &mut Decoder<'_>) -> Result<MemoryLayout> {
    let page_size = d.u32()?;
    let count = d.u16()? as usize;
    if count > MAX_REGIONS {
        return Err(TransportError::malformed("layout", format!("{count} regions")));
    }
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(RegionLayout { guest_phys_addr: GuestAddr(d.u64()?), size: d.u64()? });
    }
    MemoryLayout::new(page_size, regions)
}

/// Decodes a layout that fills `bytes` up to trailing zero padding (snapshot headers).
pub(crate) fn decode_layout_bytes(bytes: &[u8]) -> Result<MemoryLayout> {
    let mut d = Decoder::new(bytes, "layout");
    let layout = decode_layout(&mut d)?;
    if d.buf.iter().any(|&b| b != 0) {
        return Err(TransportError::malformed("layout", "non-zero bytes after the layout"));
    }
    Ok(layout)
}

/// Reads one control frame, refusing page traffic and oversized frames before allocating.
pub fn read_control(r: &mut impl Read) -> Result<Control> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(TransportError::from_read)?;
    let header = parse_header(&h)?;
    if matches!(header.kind, MessageKind::ReadRequest | MessageKind::ReadReply | MessageKind::Session) {
        return Err(TransportError::Unexpected { expected: "a control message", got: header.kind as u16 });
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).map_err(TransportError::from_read)?;
    Control::decode(header.kind, &payload)
}

/// Longest session message payload.
pub const MAX_SESSION_PAYLOAD: usize = MAX_CONTROL_PAYLOAD as usize;

/// Writes one session message.
pub fn write_session<W: Write + ?Sized>(w: &mut W, payload: &[u8]) -> Result<()> {
    if payload.len() > MAX_SESSION_PAYLOAD {
        return Err(TransportError::FrameTooLarge {
            kind: MessageKind::Session as u16,
            len: payload.len() as u32,
            cap: MAX_CONTROL_PAYLOAD,
        });
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&encode_header(MessageKind::Session, payload.len() as u32));
    frame.extend_from_slice(payload);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one session message. A `Reject` from the peer becomes [`TransportError::Refused`].
pub fn read_session<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(TransportError::from_read)?;
    let header = parse_header(&h)?;
    // The kind before the allocation: no other frame may make a session reader allocate.
    if !matches!(header.kind, MessageKind::Session | MessageKind::Reject) {
        return Err(TransportError::Unexpected { expected: "a session message", got: header.kind as u16 });
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).map_err(TransportError::from_read)?;
    match header.kind {
        MessageKind::Session => Ok(payload),
        MessageKind::Reject => match Control::decode(MessageKind::Reject, &payload)? {
            Control::Reject { reason, detail } => Err(TransportError::Refused { reason, detail }),
            _ => unreachable!("decoded a reject frame"),
        },
        other => Err(TransportError::Unexpected { expected: "a session message", got: other as u16 }),
    }
}

/// Writes `msg` as one frame and flushes.
pub fn write_control(w: &mut impl Write, msg: &Control) -> Result<()> {
    w.write_all(&msg.encode())?;
    w.flush()?;
    Ok(())
}

/// A request for one run of pages. `id` is echoed in the reply; requests are idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Echoed in the reply, so a client matches replies to requests.
    pub id: u64,
    /// The pages wanted.
    pub run: PageRun,
}

/// Bytes of a whole read request frame, header included.
pub const READ_REQUEST_FRAME_LEN: usize = HEADER_LEN + READ_REQUEST_LEN;

impl ReadRequest {
    /// The whole frame (header included).
    pub fn encode(&self) -> [u8; READ_REQUEST_FRAME_LEN] {
        let mut f = [0u8; READ_REQUEST_FRAME_LEN];
        f[..HEADER_LEN].copy_from_slice(&encode_header(MessageKind::ReadRequest, READ_REQUEST_LEN as u32));
        f[12..20].copy_from_slice(&self.id.to_le_bytes());
        f[20..24].copy_from_slice(&self.run.region.to_le_bytes());
        f[24..28].copy_from_slice(&self.run.pages.to_le_bytes());
        f[28..36].copy_from_slice(&self.run.first_page.to_le_bytes());
        f
    }

    /// Decodes a whole request frame (header included).
    pub fn decode(f: &[u8; READ_REQUEST_FRAME_LEN]) -> Result<Self> {
        let h = parse_header(f[..HEADER_LEN].try_into().expect("slice of HEADER_LEN"))?;
        if h.kind != MessageKind::ReadRequest {
            return Err(TransportError::Unexpected { expected: "a read request", got: h.kind as u16 });
        }
        if h.len as usize != READ_REQUEST_LEN {
            return Err(TransportError::malformed("read request", format!("payload of {} bytes", h.len)));
        }
        let mut d = Decoder::new(&f[HEADER_LEN..], "read request");
        let id = d.u64()?;
        let region = d.u32()?;
        let pages = d.u32()?;
        let first_page = d.u64()?;
        Ok(ReadRequest { id, run: PageRun { region, first_page, pages } })
    }
}

/// Status of a read reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ReadStatus {
    /// The pages follow.
    Ok = 0,
    /// The run lies outside the served memory; no pages follow.
    OutOfRange = 1,
}

/// Which pages of a run are all zero. Zero pages cross the wire as one bit, never as data.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMask(pub [u64; ZERO_MASK_WORDS]);

impl ZeroMask {
    /// Whether page `page` of the run is all zero.
    pub fn is_zero(&self, page: u32) -> bool {
        let i = page as usize;
        i < MAX_RUN_PAGES as usize && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks page `page` of the run as all zero.
    pub fn set(&mut self, page: u32) {
        let i = page as usize;
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// How many pages of the run are zero.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Bytes of mask on the wire for a run of `pages` pages.
    pub fn wire_words(pages: u32) -> usize {
        (pages as usize).div_ceil(64)
    }

    /// Calls `f(first, count)` for each maximal stretch of non-zero pages in `0..pages`.
    pub fn for_each_data_run(&self, pages: u32, mut f: impl FnMut(u32, u32)) {
        let mut p = 0;
        while p < pages {
            if self.is_zero(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && !self.is_zero(p) {
                p += 1;
            }
            f(start, p - start);
        }
    }
}

impl std::fmt::Debug for ZeroMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroMask({} zero pages)", self.count())
    }
}

/// The fixed part of a read reply; `data_len` bytes of page data follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadReply {
    /// The request's id, echoed.
    pub id: u64,
    /// Whether pages follow.
    pub status: ReadStatus,
    /// Pages in the run.
    pub pages: u32,
    /// Which of them are zero (and do not follow as data).
    pub zero: ZeroMask,
}

impl ReadReply {
    /// Bytes of header plus fixed part plus mask, for a run of `pages` pages.
    pub fn prefix_len(pages: u32) -> usize {
        HEADER_LEN + READ_REPLY_FIXED_LEN + ZeroMask::wire_words(pages) * 8
    }

    /// Page data bytes that follow the prefix.
    pub fn data_len(&self, page_size: u32) -> usize {
        match self.status {
            ReadStatus::Ok => (self.pages - self.zero.count()) as usize * page_size as usize,
            ReadStatus::OutOfRange => 0,
        }
    }

    /// Encodes header, fixed part and mask into `out` (cleared first).
    pub fn encode_prefix(&self, page_size: u32, out: &mut Vec<u8>) {
        let words = ZeroMask::wire_words(self.pages);
        let payload = READ_REPLY_FIXED_LEN + words * 8 + self.data_len(page_size);
        out.clear();
        out.extend_from_slice(&encode_header(MessageKind::ReadReply, payload as u32));
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&(self.status as u16).to_le_bytes());
        out.extend_from_slice(&(words as u16).to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        for w in &self.zero.0[..words] {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// Decodes a reply prefix for a request of `expected` and checks it answers that request:
    /// same id, same page count, a mask with no bits past the run, and a frame length that matches
    /// the data the mask implies.
    pub fn decode_prefix(prefix: &[u8], expected: &ReadRequest, page_size: u32) -> Result<Self> {
        let want = Self::prefix_len(expected.run.pages);
        if prefix.len() != want || expected.run.pages == 0 || expected.run.pages > MAX_RUN_PAGES {
            return Err(TransportError::malformed("read reply", "prefix length does not fit the request"));
        }
        let h = parse_header(prefix[..HEADER_LEN].try_into().expect("slice of HEADER_LEN"))?;
        if h.kind != MessageKind::ReadReply {
            return Err(TransportError::Unexpected { expected: "a read reply", got: h.kind as u16 });
        }
        let mut d = Decoder::new(&prefix[HEADER_LEN..], "read reply");
        let id = d.u64()?;
        let status = match d.u16()? {
            0 => ReadStatus::Ok,
            1 => ReadStatus::OutOfRange,
            s => return Err(TransportError::malformed("read reply", format!("status {s}"))),
        };
        let words = d.u16()? as usize;
        let pages = d.u32()?;
        if id != expected.id || pages != expected.run.pages || words != ZeroMask::wire_words(pages) {
            return Err(TransportError::malformed(
                "read reply",
                format!("answers id {id} ({pages} pages), expected id {} ({} pages)", expected.id, expected.run.pages),
            ));
        }
        let mut zero = ZeroMask::default();
        for w in zero.0.iter_mut().take(words) {
            *w = d.u64()?;
        }
        d.finish()?;
        let tail_bits = pages % 64;
        if tail_bits != 0 && zero.0[words - 1] >> tail_bits != 0 {
            return Err(TransportError::malformed("read reply", "zero mask marks pages past the run"));
        }
        let reply = ReadReply { id, status, pages, zero };
        let expected_len = READ_REPLY_FIXED_LEN + words * 8 + reply.data_len(page_size);
        if h.len as usize != expected_len {
            return Err(TransportError::malformed(
                "read reply",
                format!("frame of {} bytes, the mask implies {expected_len}", h.len),
            ));
        }
        Ok(reply)
    }
}

/// Bounds-checked little-endian reader over a payload.
struct Decoder<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Decoder { buf, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(TransportError::malformed(
                self.what,
                format!("truncated: needs {n} more bytes, has {}", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("bytes() returned N bytes"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TransportError::malformed(self.what, format!("{} trailing bytes", self.buf.len())))
        }
    }
}
