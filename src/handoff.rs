//! The session messages of a post-copy handoff, carried in the transport's `Session` frames:
//!
//! ```text
//! source                                      destination
//!   Handoff{state_len, total_pages}      ->
//!   Chunk{stream, offset, bytes}...      ->   (the state blob, then the free-page bitmap)
//!                                        <-   Resumed            (vCPUs run: downtime ends)
//!                                        <-   Done{counters}     (every page present)
//!   Ckpt{...} / CkptAck{epoch}   reverse checkpoints while memory arrives (crate::checkpoint)
//!   Abort{reason} either way on failure
//!   Heartbeat either way, from the handoff's first message on (see crate::liveness)
//! ```
//! Pre-copy uses `Round{dirty bitmap}` (answered by `RoundDone{pages, micros}`) and a final
//! `Round{dirty bitmap, state blob}` (answered by `Resumed`).
//! Every field is bounds-checked: a peer cannot make us allocate more than `MAX_STATE_BYTES` plus
//! the bitmap its layout implies, and chunks must arrive in order.

use ferry_transport::wire::{read_session, write_session, MAX_SESSION_PAYLOAD};
use ferry_transport::ControlStream;

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;

/// Largest vCPU and device state blob a destination accepts.
pub const MAX_STATE_BYTES: u64 = 256 << 20;
const CHUNK_DATA: usize = MAX_SESSION_PAYLOAD - 32;

const HANDOFF: u8 = 1;
const CHUNK: u8 = 2;
const RESUMED: u8 = 3;
const DONE: u8 = 4;
const ABORT: u8 = 5;
const ROUND: u8 = 6;
const ROUND_DONE: u8 = 7;
const DONE_SEEN: u8 = 9;

const STREAM_STATE: u8 = 1;
const STREAM_FREE: u8 = 2;
const STREAM_DIRTY: u8 = 3;
/// A back-and-forth offer's changed pages and sampled checksums (crate::backforth).
pub(crate) const STREAM_CHANGED: u8 = 4;
pub(crate) const STREAM_SAMPLES: u8 = 5;

/// What the destination tells the source when every page is present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoneCounters {
    /// Pages present at the destination.
    pub pages_present: u64,
    /// Faults that waited for the network.
    pub network_faults: u64,
    /// Pages the urgent lane brought.
    pub urgent_pages: u64,
    /// Pages pre-paging brought.
    pub bulk_pages: u64,
    /// Pages the source named free, never read.
    pub skipped_free_pages: u64,
}

fn protocol(why: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(why.into())
}

fn u64_at(b: &[u8], i: usize) -> Result<u64> {
    b.get(i..i + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| protocol("truncated session message"))
}

/// Source side: sends the state blob and free-page bitmap.
pub fn send_handoff(control: &mut dyn ControlStream, state: &[u8], free: &FreePages) -> Result<()> {
    let mut msg = vec![HANDOFF];
    msg.extend_from_slice(&(state.len() as u64).to_le_bytes());
    msg.extend_from_slice(&free.pages().to_le_bytes());
    write_session(control, &msg)?;
    send_stream(control, STREAM_STATE, state)?;
    let bitmap: Vec<u8> = free.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    send_stream(control, STREAM_FREE, &bitmap)
}

pub(crate) fn send_stream(control: &mut dyn ControlStream, stream: u8, bytes: &[u8]) -> Result<()> {
    for (i, chunk) in bytes.chunks(CHUNK_DATA).enumerate() {
        let mut msg = Vec::with_capacity(10 + chunk.len());
        msg.push(CHUNK);
        msg.push(stream);
        msg.extend_from_slice(&((i * CHUNK_DATA) as u64).to_le_bytes());
        msg.extend_from_slice(chunk);
        write_session(control, &msg)?;
    }
    Ok(())
}

/// Destination side: receives the handoff for a guest of `total_pages` pages.
pub fn receive_handoff(control: &mut dyn ControlStream, total_pages: u64) -> Result<(Vec<u8>, FreePages)> {
    let msg = read_message(control)?;
    if msg.first() != Some(&HANDOFF) || msg.len() != 17 {
        return Err(protocol("expected a handoff"));
    }
    let state_len = u64_at(&msg, 1)?;
    let pages = u64_at(&msg, 9)?;
    if state_len > MAX_STATE_BYTES {
        return Err(protocol(format!("state blob of {state_len} bytes (at most {MAX_STATE_BYTES})")));
    }
    if pages != total_pages {
        return Err(protocol(format!("handoff for {pages} pages, this guest has {total_pages}")));
    }
    let state = receive_stream(control, STREAM_STATE, state_len as usize)?;
    let bitmap = receive_stream(control, STREAM_FREE, pages.div_ceil(64) as usize * 8)?;
    let words = bitmap.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let free =
        FreePages::from_words(words, pages).ok_or_else(|| protocol("free-page bitmap marks pages past the end"))?;
    Ok((state, free))
}

pub(crate) fn receive_stream(control: &mut dyn ControlStream, stream: u8, len: usize) -> Result<Vec<u8>> {
    // Grows as chunks arrive: an announced length is not allocated before its bytes come.
    let mut out = Vec::new();
    while out.len() < len {
        let msg = read_message(control)?;
        if msg.len() < 10 || msg[0] != CHUNK || msg[1] != stream {
            return Err(protocol("expected a chunk of the handoff"));
        }
        if u64_at(&msg, 2)? != out.len() as u64 || out.len() + msg.len() - 10 > len {
            return Err(protocol("handoff chunk out of order or past its stream's end"));
        }
        // An empty chunk moves nothing: a peer could send them forever.
        if msg.len() == 10 {
            return Err(protocol("an empty handoff chunk"));
        }
        out.extend_from_slice(&msg[10..]);
    }
    Ok(out)
}

/// What a pre-copy round asks of the destination.
#[derive(Debug, PartialEq, Eq)]
pub enum RoundKind {
    /// Pull these pages; the guest still runs at the source.
    Pull,
    /// The guest is paused: pull these pages, then resume with the state blob.
    Final(Vec<u8>),
    /// Hybrid: the guest is paused and these pages are stale here; switch to post-copy (a
    /// post-copy handoff follows).
    SwitchToPostcopy,
}

/// A pre-copy round as the destination receives it.
#[derive(Debug)]
pub struct Round {
    /// The pages to pull this round.
    pub dirty: FreePages,
    /// Whether the guest runs on after it, stops, or switches to post-copy.
    pub kind: RoundKind,
}

const ROUND_PULL: u8 = 0;
const ROUND_FINAL: u8 = 1;
const ROUND_SWITCH: u8 = 2;

/// Source: tells the destination which pages to pull this round (`dirty`) and what follows it.
pub fn send_round(control: &mut dyn ControlStream, dirty: &FreePages, kind: &RoundKind) -> Result<()> {
    let (tag, state) = match kind {
        RoundKind::Pull => (ROUND_PULL, None),
        RoundKind::Final(state) => (ROUND_FINAL, Some(state.as_slice())),
        RoundKind::SwitchToPostcopy => (ROUND_SWITCH, None),
    };
    let mut msg = vec![ROUND, tag];
    msg.extend_from_slice(&(state.map_or(0, <[u8]>::len) as u64).to_le_bytes());
    msg.extend_from_slice(&dirty.pages().to_le_bytes());
    write_session(control, &msg)?;
    let bitmap: Vec<u8> = dirty.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    send_stream(control, STREAM_DIRTY, &bitmap)?;
    if let Some(state) = state {
        send_stream(control, STREAM_STATE, state)?;
    }
    Ok(())
}

/// Destination: the next round the source announces.
pub fn receive_round(control: &mut dyn ControlStream, total_pages: u64) -> Result<Round> {
    let msg = read_message(control)?;
    if msg.first() != Some(&ROUND) || msg.len() != 18 || msg[1] > ROUND_SWITCH {
        return Err(protocol("expected a pre-copy round"));
    }
    let state_len = u64_at(&msg, 2)?;
    if u64_at(&msg, 10)? != total_pages {
        return Err(protocol("a round for another number of pages"));
    }
    if state_len > MAX_STATE_BYTES {
        return Err(protocol(format!("state blob of {state_len} bytes (at most {MAX_STATE_BYTES})")));
    }
    let bitmap = receive_stream(control, STREAM_DIRTY, total_pages.div_ceil(64) as usize * 8)?;
    let words = bitmap.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let dirty =
        FreePages::from_words(words, total_pages).ok_or_else(|| protocol("dirty bitmap marks pages past the end"))?;
    let kind = match msg[1] {
        ROUND_FINAL => RoundKind::Final(receive_stream(control, STREAM_STATE, state_len as usize)?),
        ROUND_SWITCH => RoundKind::SwitchToPostcopy,
        _ => RoundKind::Pull,
    };
    Ok(Round { dirty, kind })
}

/// Destination: the round is pulled (`pages` pages in `elapsed_us` microseconds).
pub fn send_round_done(control: &mut dyn ControlStream, pages: u64, elapsed_us: u64) -> Result<()> {
    let msg = [&[ROUND_DONE][..], &pages.to_le_bytes(), &elapsed_us.to_le_bytes()].concat();
    Ok(write_session(control, &msg)?)
}

/// (pages pulled, microseconds the destination spent pulling them)
pub fn expect_round_done(control: &mut dyn ControlStream) -> Result<(u64, u64)> {
    let msg = read_message(control)?;
    if msg.first() != Some(&ROUND_DONE) || msg.len() != 17 {
        return Err(protocol("expected the end of a round"));
    }
    Ok((u64_at(&msg, 1)?, u64_at(&msg, 9)?))
}

/// Destination: the guest runs here now.
pub fn send_resumed(control: &mut dyn ControlStream) -> Result<()> {
    Ok(write_session(control, &[RESUMED])?)
}

/// Destination: every page is present; the counters go with it.
pub fn send_done(control: &mut dyn ControlStream, c: &DoneCounters) -> Result<()> {
    let mut msg = vec![DONE];
    for v in [c.pages_present, c.network_faults, c.urgent_pages, c.bulk_pages, c.skipped_free_pages] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    Ok(write_session(control, &msg)?)
}

/// Destination: after `Done`, waits for the source to say it heard it (heartbeats, and acks of
/// epochs the checkpointer no longer waits for, are passed over). Only then does the lane close
/// with nothing unread on either side: a close over unread bytes resets the connection, and a
/// reset can take with it a `Done` not yet delivered, which would leave the source believing the
/// destination failed. Waits at most the lane's liveness timeout in all: a source that keeps
/// beating (or acking) without confirming does not hold the destination.
pub fn expect_done_seen(control: &mut crate::liveness::LiveControl) -> Result<()> {
    let wait = control.liveness().timeout;
    let deadline = std::time::Instant::now() + wait;
    let mut last_heard = std::time::Instant::now();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(MigrationError::Transport(ferry_transport::TransportError::Silent(format!(
                "no confirmation of done within {wait:?}"
            ))));
        }
        match control.poll(left, &mut last_heard)? {
            Some(msg) if msg.as_slice() == [DONE_SEEN] => return Ok(()),
            Some(msg) if crate::checkpoint::ack_epoch(&msg).is_none() => {
                return Err(protocol("expected the source to have seen done"))
            }
            // A heartbeat, a stale ack, or nothing yet.
            _ => {}
        }
    }
}

/// Source: `Done` was heard; the lane's last message (see [`expect_done_seen`]).
pub fn done_seen_message() -> &'static [u8] {
    &[DONE_SEEN]
}

/// Either side: gives up, saying why (best effort: the lane may be gone).
pub fn send_abort(control: &mut dyn ControlStream, reason: &str) {
    let mut msg = vec![ABORT];
    msg.extend_from_slice(&reason.as_bytes()[..reason.len().min(1024)]);
    let _ = write_session(control, &msg);
}

/// Source: waits for the destination to say the guest runs there (or why it does not).
pub fn expect_resumed(control: &mut dyn ControlStream) -> Result<()> {
    match read_message(control)?.as_slice() {
        [RESUMED] => Ok(()),
        _ => Err(protocol("expected resumed")),
    }
}

/// Source: waits for the destination to say every page is present.
pub fn expect_done(control: &mut dyn ControlStream) -> Result<DoneCounters> {
    done_counters(&read_message(control)?)
}

/// The counters of a `Done` message; a protocol error if `msg` is not one.
pub(crate) fn done_counters(msg: &[u8]) -> Result<DoneCounters> {
    if msg.first() != Some(&DONE) || msg.len() != 41 {
        return Err(protocol("expected done"));
    }
    Ok(DoneCounters {
        pages_present: u64_at(msg, 1)?,
        network_faults: u64_at(msg, 9)?,
        urgent_pages: u64_at(msg, 17)?,
        bulk_pages: u64_at(msg, 25)?,
        skipped_free_pages: u64_at(msg, 33)?,
    })
}

/// Reads a session message, skipping heartbeats ([`crate::liveness`]) and turning the peer's
/// `Abort` into an error.
pub(crate) fn read_message(control: &mut dyn ControlStream) -> Result<Vec<u8>> {
    loop {
        let msg = read_session(control)?;
        match msg.first() {
            Some(&ABORT) => return Err(MigrationError::PeerAborted(String::from_utf8_lossy(&msg[1..]).into_owned())),
            Some(&crate::liveness::HEARTBEAT) if msg.len() == 1 => continue,
            _ => return Ok(msg),
        }
    }
}

/// The reason in an `Abort` message, if `msg` is one.
pub(crate) fn abort_reason(msg: &[u8]) -> Option<String> {
    (msg.first() == Some(&ABORT)).then(|| String::from_utf8_lossy(&msg[1..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Sends `messages` as session frames from one end and runs `receive_handoff` on the other.
    fn receive(messages: Vec<Vec<u8>>, pages: u64) -> Result<(Vec<u8>, FreePages)> {
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            for m in messages {
                let _ = write_session(&mut tx, &m);
            }
        });
        let result = receive_handoff(&mut rx, pages);
        sender.join().unwrap();
        result
    }

    fn handoff(state_len: u64, pages: u64) -> Vec<u8> {
        [&[HANDOFF][..], &state_len.to_le_bytes(), &pages.to_le_bytes()].concat()
    }

    fn chunk(stream: u8, offset: u64, data: &[u8]) -> Vec<u8> {
        [&[CHUNK, stream][..], &offset.to_le_bytes(), data].concat()
    }

    #[test]
    fn a_good_handoff_round_trips() {
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        let mut free = FreePages::new(100);
        free.set_range(ferry_transport::PageIndex(10), 5);
        let state = vec![7u8; 40_000];
        let (s2, f2) = (state.clone(), free.clone());
        let sender = std::thread::spawn(move || send_handoff(&mut tx, &s2, &f2).unwrap());
        let (got_state, got_free) = receive_handoff(&mut rx, 100).unwrap();
        sender.join().unwrap();
        assert_eq!(got_state, state);
        assert_eq!(got_free, free);
    }

    #[test]
    fn hostile_handoffs_are_protocol_errors() {
        let bitmap = [0u8; 16];
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("oversized state", vec![handoff(MAX_STATE_BYTES + 1, 100)]),
            ("other page count", vec![handoff(0, 99)]),
            ("not a handoff", vec![vec![RESUMED]]),
            ("chunk out of order", vec![handoff(8, 100), chunk(STREAM_STATE, 4, &[1; 4])]),
            ("chunk past the end", vec![handoff(4, 100), chunk(STREAM_STATE, 0, &[1; 8])]),
            ("wrong stream", vec![handoff(4, 100), chunk(STREAM_FREE, 0, &[1; 4])]),
            ("empty chunks", vec![handoff(4, 100), chunk(STREAM_STATE, 0, &[]), chunk(STREAM_STATE, 0, &[])]),
            (
                "bits past the last page",
                vec![
                    handoff(0, 100),
                    chunk(STREAM_FREE, 0, &[&bitmap[..8], &[0, 0, 0, 0, 0x10, 0, 0, 0][..]].concat()),
                ],
            ),
        ];
        for (what, messages) in cases {
            let err = receive(messages, 100).unwrap_err();
            assert!(matches!(err, MigrationError::Protocol(_)), "{what}: {err:?}");
        }
        let err = receive(vec![[&[ABORT][..], b"source gave up"].concat()], 100).unwrap_err();
        assert!(matches!(err, MigrationError::PeerAborted(ref why) if why == "source gave up"), "{err:?}");
        let err = receive(vec![], 100).unwrap_err();
        assert!(matches!(err, MigrationError::Transport(ferry_transport::TransportError::PeerClosed)), "{err:?}");
    }

    /// A destination's wait for the source to confirm `Done`: over heartbeats and stale epoch
    /// acks to the confirmation; a source that closes or says something else is an error.
    #[test]
    fn the_end_of_a_migration_waits_for_the_source_to_have_heard_done() {
        let run = |messages: Vec<Vec<u8>>| {
            let (mut tx, rx) = UnixStream::pair().unwrap();
            let mut live = crate::liveness::LiveControl::start(&rx, crate::Liveness::default()).unwrap();
            for m in messages {
                write_session(&mut tx, &m).unwrap();
            }
            drop(tx);
            expect_done_seen(&mut live)
        };
        let heartbeat = vec![crate::liveness::HEARTBEAT];
        let ack = crate::checkpoint::ack_message(7);
        run(vec![heartbeat.clone(), ack.clone(), done_seen_message().to_vec()]).unwrap();
        let err = run(vec![heartbeat, ack]).unwrap_err();
        assert!(matches!(err, MigrationError::Transport(ferry_transport::TransportError::PeerClosed)), "{err:?}");
        let err = run(vec![vec![RESUMED]]).unwrap_err();
        assert!(matches!(err, MigrationError::Protocol(_)), "{err:?}");
        // A source that beats on and never confirms: a typed error once the timeout has passed.
        let liveness = crate::Liveness {
            interval: std::time::Duration::from_millis(10),
            timeout: std::time::Duration::from_millis(150),
            ..Default::default()
        };
        let (tx, rx) = UnixStream::pair().unwrap();
        let mut live = crate::liveness::LiveControl::start(&rx, liveness).unwrap();
        let _beating = crate::liveness::LiveControl::start(&tx, liveness).unwrap();
        let err = expect_done_seen(&mut live).unwrap_err();
        assert!(matches!(err, MigrationError::Transport(ferry_transport::TransportError::Silent(_))), "{err:?}");
    }

    /// Every session message kind, of every module that shares the control lane, is its own.
    #[test]
    fn message_kinds_on_the_control_lane_are_distinct() {
        use crate::{backforth as b, checkpoint as c};
        let kinds = [
            HANDOFF,
            CHUNK,
            RESUMED,
            DONE,
            ABORT,
            ROUND,
            ROUND_DONE,
            DONE_SEEN,
            crate::liveness::HEARTBEAT,
            c::CKPT_BEGIN,
            c::CKPT_PAGES,
            c::CKPT_STATE,
            c::CKPT_END,
            c::CKPT_ACK,
            c::CKPT_FINAL,
            b::BASE_OFFER,
            b::BASE_VERDICT,
            b::LAST_CHANGES,
            b::ONTO_PREPARED,
        ];
        let distinct: std::collections::BTreeSet<u8> = kinds.iter().copied().collect();
        assert_eq!(distinct.len(), kinds.len(), "{kinds:?}");
    }
}
