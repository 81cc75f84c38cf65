//! The handshake every connection starts with:
//!
//! ```text
//! client                                   server
//!   Hello{lane, session, nonce_c, layout?} ->
//!                     <- Challenge{session, nonce_s, server_proof, layout}
//!   Proof{client_proof}                    ->
//!                     <- Welcome | Reject{reason, detail}
//! ```
//! Both proofs are HMACs over the Hello payload and the server's session, nonce and layout, so a
//! proof is bound to this connection, this session and this layout; over TLS also to the TLS
//! session (its exporter, see [`crate::tls`]), so a proof cannot be relayed into another one. Any side that sees a wrong
//! version, a wrong layout, an unknown session or a bad proof sends a `Reject` saying why and
//! returns a typed error.

use std::io::{Read, Write};

use crate::auth::{nonce, PreSharedKey};
use crate::error::{Result, TransportError};
use crate::lane::ControlStream;
use crate::layout::MemoryLayout;
use crate::wire::{read_control, write_control, Challenge, Control, Hello, Lane, RejectReason, SessionId};

/// What the client learns from a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSession {
    /// The session joined (new or resumed).
    pub session: SessionId,
    /// The guest memory layout the server serves.
    pub layout: MemoryLayout,
}

/// Client side. `session` is [`SessionId::NEW`] for a new session or the id to resume;
/// `expected_layout` is checked against the server's when given.
pub fn client_handshake<S: Read + Write>(
    stream: &mut S,
    key: &PreSharedKey,
    lane: Lane,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
) -> Result<ClientSession> {
    client_handshake_bound(stream, key, &[], lane, session, expected_layout)
}

/// [`client_handshake`] whose proofs also cover `binding`, a value only the two ends of the
/// underlying channel know (a TLS exporter): both sides must pass the same.
pub fn client_handshake_bound<S: Read + Write>(
    stream: &mut S,
    key: &PreSharedKey,
    binding: &[u8],
    lane: Lane,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
) -> Result<ClientSession> {
    let hello = Control::Hello(Hello { lane, session, nonce: nonce()?, layout: expected_layout.cloned() });
    let hello_payload = hello.encode_payload();
    write_control(stream, &hello)?;
    let challenge = match read_control(stream)? {
        Control::Challenge(c) => c,
        Control::Reject { reason, detail } => return Err(TransportError::Refused { reason, detail }),
        other => return Err(TransportError::Unexpected { expected: "challenge", got: other.kind() as u16 }),
    };
    let transcript = transcript(&hello_payload, &challenge, binding);
    let parts = transcript.parts();
    if !key.verify_server(&parts, &challenge.proof) {
        reject(stream, RejectReason::Auth, "server proof does not verify");
        return Err(TransportError::AuthFailed("the server could not prove it holds the key"));
    }
    if !session.is_new() && challenge.session != session {
        reject(stream, RejectReason::UnknownSession, "server answered with another session");
        return Err(TransportError::Refused {
            reason: RejectReason::UnknownSession,
            detail: format!("asked for session {session}, server has {}", challenge.session),
        });
    }
    if let Some(why) = expected_layout.and_then(|ours| ours.mismatch(&challenge.layout)) {
        reject(stream, RejectReason::Layout, &why);
        return Err(TransportError::LayoutMismatch(why));
    }
    write_control(stream, &Control::Proof(key.client_proof(&parts)))?;
    match read_control(stream)? {
        Control::Welcome => Ok(ClientSession { session: challenge.session, layout: challenge.layout }),
        Control::Reject { reason, detail } => Err(TransportError::Refused { reason, detail }),
        other => Err(TransportError::Unexpected { expected: "welcome", got: other.kind() as u16 }),
    }
}

/// Server side: authenticates the client and checks that it wants this session and this layout.
/// Returns the lane the client opened.
pub fn server_handshake<S: Read + Write>(
    stream: &mut S,
    key: &PreSharedKey,
    session: SessionId,
    layout: &MemoryLayout,
) -> Result<Lane> {
    server_handshake_bound(stream, key, &[], session, layout)
}

/// [`server_handshake`] whose proofs also cover `binding` (see [`client_handshake_bound`]).
pub fn server_handshake_bound<S: Read + Write>(
    stream: &mut S,
    key: &PreSharedKey,
    binding: &[u8],
    session: SessionId,
    layout: &MemoryLayout,
) -> Result<Lane> {
    let hello = match read_control(stream) {
        Ok(Control::Hello(h)) => h,
        Ok(other) => {
            reject(stream, RejectReason::Malformed, "expected hello");
            return Err(TransportError::Unexpected { expected: "hello", got: other.kind() as u16 });
        }
        Err(e) => {
            let reason = match e {
                TransportError::VersionMismatch { .. } => RejectReason::Version,
                _ => RejectReason::Malformed,
            };
            reject(stream, reason, &e.to_string());
            return Err(e);
        }
    };
    if !hello.session.is_new() && hello.session != session {
        reject(stream, RejectReason::UnknownSession, "no such session on this server");
        return Err(TransportError::Refused {
            reason: RejectReason::UnknownSession,
            detail: format!("client asked for session {}", hello.session),
        });
    }
    if let Some(why) = hello.layout.as_ref().and_then(|theirs| layout.mismatch(theirs)) {
        reject(stream, RejectReason::Layout, &why);
        return Err(TransportError::LayoutMismatch(why));
    }
    let lane = hello.lane;
    let hello_payload = Control::Hello(hello).encode_payload();
    let mut challenge = Challenge { session, nonce: nonce()?, proof: [0; 32], layout: layout.clone() };
    let transcript_owned = transcript(&hello_payload, &challenge, binding);
    let parts = transcript_owned.parts();
    challenge.proof = key.server_proof(&parts);
    write_control(stream, &Control::Challenge(challenge))?;
    match read_control(stream)? {
        Control::Proof(p) if key.verify_client(&parts, &p) => {}
        Control::Proof(_) => {
            reject(stream, RejectReason::Auth, "client proof does not verify");
            return Err(TransportError::AuthFailed("the client could not prove it holds the key"));
        }
        Control::Reject { reason, detail } => return Err(TransportError::Refused { reason, detail }),
        other => return Err(TransportError::Unexpected { expected: "proof", got: other.kind() as u16 }),
    }
    write_control(stream, &Control::Welcome)?;
    Ok(lane)
}

struct Transcript {
    hello: Vec<u8>,
    session: [u8; 16],
    nonce: [u8; 32],
    layout: Vec<u8>,
    binding: Vec<u8>,
}

impl Transcript {
    fn parts(&self) -> [&[u8]; 5] {
        [&self.hello, &self.session, &self.nonce, &self.layout, &self.binding]
    }
}

fn transcript(hello_payload: &[u8], c: &Challenge, binding: &[u8]) -> Transcript {
    // The layout is bound through the challenge encoding with a zeroed proof field.
    let layout = Control::Challenge(Challenge { proof: [0; 32], ..c.clone() }).encode_payload();
    Transcript {
        hello: hello_payload.to_vec(),
        session: c.session.0,
        nonce: c.nonce,
        layout,
        binding: binding.to_vec(),
    }
}

/// Best effort: the peer may already be gone, and the error we return says what happened.
fn reject<S: Write>(stream: &mut S, reason: RejectReason, detail: &str) {
    tracing::warn!(?reason, detail, "refusing a peer's handshake");
    let _ = write_control(stream, &Control::Reject { reason, detail: detail.to_owned() });
}

/// A socket whose reads and writes must all finish by one instant, `limit` after it was wrapped:
/// before each call its timeouts are set to what is left, so a peer that sends a byte at a time
/// cannot keep a handshake open past the limit (a per-read timeout alone would let it). When
/// dropped, the socket's timeouts are `limit` again.
pub(crate) struct Deadline<'a, S: ControlStream> {
    stream: &'a S,
    until: std::time::Instant,
    limit: std::time::Duration,
}

impl<'a, S: ControlStream> Deadline<'a, S> {
    pub(crate) fn new(stream: &'a S, limit: std::time::Duration) -> Self {
        Self::until(stream, std::time::Instant::now() + limit, limit)
    }

    /// A deadline already running (several steps of one handshake share it).
    pub(crate) fn until(stream: &'a S, until: std::time::Instant, limit: std::time::Duration) -> Self {
        Deadline { stream, until, limit }
    }

    fn left(&self) -> std::io::Result<std::time::Duration> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the handshake did not finish within {:?}", self.limit),
            ));
        }
        Ok(left)
    }
}

impl<S: ControlStream> Read for Deadline<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the handshake did not finish within {:?}", self.limit),
            ),
            _ => e,
        })
    }
}

impl<S: ControlStream> Write for Deadline<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = self.stream;
        s.flush()
    }
}

impl<S: ControlStream> Drop for Deadline<'_, S> {
    fn drop(&mut self) {
        let _ = self.stream.set_read_timeout(Some(self.limit));
        let _ = self.stream.set_write_timeout(Some(self.limit));
    }
}
