//! The guest's output device and the observer outside the VMM that checks it.
//!
//! The guest emits a numbered sequence per vCPU ([`crate::guest::PORT_OUTPUT`]). The VMM passes it
//! on to an observer as lines `O VCPU SEQ` (from the guest) or `R VCPU SEQ` (held output that a
//! restart releases again from a checkpoint: the observer may have seen it, as a network peer may
//! see a segment twice). While the guest runs on memory its source may still need to restart it
//! from (post-copy with reverse checkpoints), output is held, tagged with the epoch whose
//! checkpoint captures it, and released only once that epoch is acknowledged: output commit.
//!
//! The observer counts what a user of the guest's output would notice: a gap (a number skipped:
//! output lost), a regression (an `O` number it already saw: the guest said it again, so a
//! restart took back output that had left), duplicates of `R` lines (harmless).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One output the guest emitted and the VMM still holds.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub vcpu: u32,
    pub seq: u32,
    /// The epoch whose checkpoint captured it; `None` until one did.
    #[serde(skip)]
    epoch: Option<u64>,
    /// When the guest emitted it.
    #[serde(skip)]
    at: Option<Instant>,
}

/// Most held-output latencies a device keeps.
const MAX_LATENCY_SAMPLES: usize = 1 << 20;

#[derive(Debug, Default)]
struct Inner {
    sink: Option<UnixStream>,
    hold: bool,
    halted: bool,
    held: VecDeque<Held>,
    emitted: u64,
    released: u64,
    /// From emission to release, of each output that was held (the first
    /// [`MAX_LATENCY_SAMPLES`]).
    held_for: Vec<Duration>,
}

/// The VMM's side of the output device (see the module doc).
#[derive(Debug, Default)]
pub struct OutputDevice(Mutex<Inner>);

impl OutputDevice {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends output to the observer listening at `path` from now on.
    pub fn connect(&self, path: &Path) -> std::io::Result<()> {
        self.inner().sink = Some(UnixStream::connect(path)?);
        Ok(())
    }

    /// Holds output from now on (until [`OutputDevice::commit`] releases it).
    pub fn hold(&self) {
        self.inner().hold = true;
    }

    /// The guest emitted `seq` on `vcpu`.
    pub fn emit(&self, vcpu: u32, seq: u32) {
        let mut inner = self.inner();
        inner.emitted += 1;
        if inner.halted {
            return;
        }
        if inner.hold {
            inner.held.push_back(Held { vcpu, seq, epoch: None, at: Some(Instant::now()) });
        } else {
            inner.send('O', vcpu, seq);
        }
    }

    /// The guest is paused for epoch `epoch`'s checkpoint: what it emitted so far belongs to it.
    /// Returns everything held, for the checkpoint's device state.
    pub fn cut(&self, epoch: u64) -> Vec<Held> {
        let mut inner = self.inner();
        for h in inner.held.iter_mut().filter(|h| h.epoch.is_none()) {
            h.epoch = Some(epoch);
        }
        inner.held.iter().copied().collect()
    }

    /// Epoch `epoch` is safe at the source: its output leaves. `u64::MAX`: all of it, and no more
    /// holding.
    pub fn commit(&self, epoch: u64) {
        let mut inner = self.inner();
        while inner.held.front().is_some_and(|h| h.epoch.is_some_and(|e| e <= epoch) || epoch == u64::MAX) {
            let h = inner.held.pop_front().expect("checked");
            inner.send('O', h.vcpu, h.seq);
            if let (Some(at), true) = (h.at, inner.held_for.len() < MAX_LATENCY_SAMPLES) {
                inner.held_for.push(at.elapsed());
            }
        }
        if epoch == u64::MAX {
            inner.hold = false;
        }
    }

    /// Releases again output a checkpoint held (a restart from it).
    pub fn release_again(&self, held: &[Held]) {
        let mut inner = self.inner();
        for h in held {
            inner.send('R', h.vcpu, h.seq);
        }
    }

    /// The guest will not run here again: what is held never leaves.
    pub fn halt(&self) {
        let mut inner = self.inner();
        inner.halted = true;
        inner.held.clear();
    }

    /// The median time held output waited for its release (output commit's latency), if any was
    /// held.
    pub fn held_latency_p50(&self) -> Option<Duration> {
        let mut held_for = self.inner().held_for.clone();
        held_for.sort_unstable();
        held_for.get(held_for.len() / 2).copied()
    }

    /// (emitted by the guest, released to the observer)
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.inner();
        (inner.emitted, inner.released)
    }
}

impl Inner {
    fn send(&mut self, kind: char, vcpu: u32, seq: u32) {
        self.released += 1;
        if let Some(sink) = &mut self.sink {
            // An observer that went away loses its lines, not the guest its progress.
            if writeln!(sink, "{kind} {vcpu} {seq}").is_err() {
                self.sink = None;
            }
        }
    }
}

/// What the observer saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Observed {
    /// Distinct outputs seen.
    pub outputs_seen: u64,
    /// Numbers skipped (output lost).
    pub output_gaps: u64,
    /// Guest output seen again: taken back by a restart.
    pub output_regressions: u64,
    /// Released again from a checkpoint after the observer already had it.
    pub output_duplicates: u64,
}

/// The observer outside the VMM: a Unix socket every VMM of a demo connects to.
pub struct Observer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<(HashMap<u32, u32>, Observed)>>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    pub fn start(path: PathBuf) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((HashMap::new(), Observed::default())));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut readers = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let seen = seen.clone();
                            readers.push(std::thread::spawn(move || observe(stream, &seen)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                // Writers have closed their ends by now (their VMMs ended or were killed); one
                // that has not within a few seconds is not waited for (its lines may be missed).
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while readers.iter().any(|r| !r.is_finished()) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Ok(Observer { path, stop, seen, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops listening once every VMM that connected closed its end; what was seen.
    pub fn finish(mut self) -> Observed {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }
}

fn observe(stream: UnixStream, seen: &Mutex<(HashMap<u32, u32>, Observed)>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let mut fields = line.split(' ');
        let (Some(kind), Some(Ok(vcpu)), Some(Ok(seq))) =
            (fields.next(), fields.next().map(str::parse::<u32>), fields.next().map(str::parse::<u32>))
        else {
            continue;
        };
        let mut guard = seen.lock().unwrap_or_else(|e| e.into_inner());
        let (last, o) = &mut *guard;
        let last = last.entry(vcpu).or_insert(0);
        if seq == *last + 1 {
            *last = seq;
            o.outputs_seen += 1;
        } else if seq > *last + 1 {
            o.output_gaps += u64::from(seq - *last - 1);
            o.outputs_seen += 1;
            *last = seq;
        } else if kind == "R" {
            o.output_duplicates += 1;
        } else {
            o.output_regressions += 1;
        }
    }
}
