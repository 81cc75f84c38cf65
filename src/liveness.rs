//! Liveness, written once for every session: each side of a control lane says it is alive every
//! [`Liveness::interval`], and a side that hears nothing (no message, no heartbeat) for
//! [`Liveness::timeout`] reports the peer as silent ([`TransportError::Silent`]) instead of
//! waiting forever. A power loss or a cut cable sends no FIN and no RST; without this a session
//! would block on it for good.
//!
//! [`LiveControl`] wraps a control lane: a thread writes the heartbeats, every message (the
//! session's and the heartbeats) is written whole under one lock, and [`LiveControl::read`] skips
//! heartbeats and gives up after the timeout. The data lanes carry their own deadlines (a read
//! that gets no reply in time is [`TransportError::Silent`] too).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::wire::{read_session, write_session};
use ferry_transport::{ControlStream, TransportError};

use crate::error::{MigrationError, Result};

/// The session message that says "still here"; carries nothing.
pub(crate) const HEARTBEAT: u8 = 8;

/// How often a side says it is alive, and how long the other waits before calling it silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Between heartbeats. Default 250 ms.
    pub interval: Duration,
    /// Silence after which the peer is gone. Default 3 s: twelve heartbeats missed, long enough
    /// for a loaded host's scheduling hiccups, short enough that a guest waits little on a dead one.
    pub timeout: Duration,
    /// How long a destination waits for the source to begin its handoff (the source sends no
    /// heartbeat before: it pauses its guest when it chooses). Default 10 minutes.
    pub handoff_wait: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(3),
            handoff_wait: Duration::from_secs(600),
        }
    }
}

impl Liveness {
    fn check(&self) -> Result<()> {
        if self.interval.is_zero() || self.timeout <= self.interval {
            return Err(MigrationError::Protocol(format!(
                "liveness: the timeout ({:?}) must exceed a non-zero interval ({:?})",
                self.timeout, self.interval
            )));
        }
        Ok(())
    }
}

/// A control lane with heartbeats both ways (see the module doc).
#[derive(Debug)]
pub struct LiveControl {
    reader: Box<dyn ControlStream>,
    writer: Arc<Mutex<Box<dyn ControlStream>>>,
    liveness: Liveness,
    stop: Arc<AtomicBool>,
    beat: Option<JoinHandle<()>>,
}

impl LiveControl {
    /// Starts heartbeats on `control` (the caller keeps its own handle; this one is a clone).
    pub fn start(control: &dyn ControlStream, liveness: Liveness) -> Result<Self> {
        liveness.check()?;
        let io = |e: std::io::Error| MigrationError::Transport(TransportError::Io(e));
        let reader = control.try_clone_box().map_err(io)?;
        reader.set_read_timeout(Some(liveness.timeout)).map_err(io)?;
        let writer = control.try_clone_box().map_err(io)?;
        // A peer that stops reading must not block a writer for longer than it would a reader.
        writer.set_write_timeout(Some(liveness.timeout)).map_err(io)?;
        let writer = Arc::new(Mutex::new(writer));
        let stop = Arc::new(AtomicBool::new(false));
        let beat = {
            let (writer, stop) = (writer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("ferry-heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                        if write_session(&mut **w, &[HEARTBEAT]).is_err() {
                            // The lane is broken: the reader on either side finds out.
                            return;
                        }
                        drop(w);
                        std::thread::park_timeout(liveness.interval);
                    }
                })
                .map_err(io)?
        };
        Ok(LiveControl { reader, writer, liveness, stop, beat: Some(beat) })
    }

    /// A handle that writes whole session messages on this lane from another thread.
    pub fn writer(&self) -> LiveWriter {
        LiveWriter(self.writer.clone())
    }

    /// Writes one session message, whole, between heartbeats.
    pub fn write(&self, payload: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        Ok(write_session(&mut **w, payload)?)
    }

    /// The next message that is not a heartbeat. Waits indefinitely for one to begin while
    /// heartbeats keep coming, and fails with [`TransportError::Silent`] after
    /// [`Liveness::timeout`] without any (also in the middle of a message).
    pub fn read(&mut self) -> Result<Vec<u8>> {
        loop {
            let msg = self.read_frame()?;
            if msg.as_slice() != [HEARTBEAT] {
                return Ok(msg);
            }
        }
    }

    /// Waits up to `wait` for a message; `Ok(None)` if only heartbeats (or nothing, while the
    /// peer is not yet silent since `last_heard`) came. Updates `last_heard`.
    pub fn poll(&mut self, wait: Duration, last_heard: &mut Instant) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.reader.wait_readable(left).map_err(TransportError::Io)? {
                if last_heard.elapsed() > self.liveness.timeout {
                    return Err(self.silent().into());
                }
                return Ok(None);
            }
            let msg = self.read_frame()?;
            *last_heard = Instant::now();
            if msg.as_slice() != [HEARTBEAT] {
                return Ok(Some(msg));
            }
        }
    }

    /// One frame, heartbeat or not, each of its reads bounded by the timeout.
    fn read_frame(&mut self) -> Result<Vec<u8>> {
        self.reader.set_read_timeout(Some(self.liveness.timeout)).map_err(TransportError::Io)?;
        read_session(&mut *self.reader).map_err(|e| match e {
            TransportError::Silent(_) => self.silent().into(),
            other => other.into(),
        })
    }

    fn silent(&self) -> TransportError {
        TransportError::Silent(format!("nothing on the control lane for {:?}", self.liveness.timeout))
    }

    /// Stops the heartbeats, then writes `payload` as this side's last message: the peer that
    /// waits for it finds nothing after it to leave unread.
    pub fn end_with(mut self, payload: &[u8]) -> Result<()> {
        self.stop_beating();
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        Ok(write_session(&mut **w, payload)?)
    }

    fn stop_beating(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(beat) = self.beat.take() {
            beat.thread().unpark();
            let _ = beat.join();
        }
    }

    /// The heartbeat period and timeout this lane runs with.
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }
}

/// Writes whole session messages on a [`LiveControl`]'s lane, between its heartbeats.
#[derive(Clone, Debug)]
pub struct LiveWriter(Arc<Mutex<Box<dyn ControlStream>>>);

impl LiveWriter {
    /// Writes one session message.
    pub fn write(&self, payload: &[u8]) -> Result<()> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Ok(write_session(&mut **w, payload)?)
    }
}

/// Session messages read and written through a [`LiveControl`] (the `handoff` functions) skip
/// heartbeats and share its deadline; a write is one whole frame (`write_session` writes each frame
/// with one `write_all`), so it never interleaves with a heartbeat.
impl std::io::Read for LiveControl {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing on the control lane for {:?}", self.liveness.timeout),
            ),
            _ => e,
        })
    }
}

impl std::io::Write for LiveControl {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl ControlStream for LiveControl {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        // Never longer than the liveness timeout: heartbeats keep a live peer's reads short.
        let t = timeout.map_or(self.liveness.timeout, |t| t.min(self.liveness.timeout));
        self.reader.set_read_timeout(Some(t))
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).set_write_timeout(timeout)
    }

    fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlStream>> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "a live control lane has one owner"))
    }

    fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        self.reader.wait_readable(timeout)
    }

    fn shutdown(&self) -> std::io::Result<()> {
        self.reader.shutdown()
    }
}

impl Drop for LiveControl {
    fn drop(&mut self) {
        self.stop_beating();
    }
}
