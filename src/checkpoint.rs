//! The checkpoint stream, written once for every session that keeps a second copy of a running
//! guest: post-copy's reverse checkpoints (the destination keeps its source able to restart the
//! guest, after PostCopyFT) and, on the same parts, fault-tolerant primary/backup pairs.
//!
//! An epoch is captured with the guest paused ([`CheckpointCapture`]): the pages it wrote since
//! the previous epoch and its state blob. It travels as session messages on a control lane:
//!
//! ```text
//! sender                                         receiver
//!   CkptBegin{epoch, pages, state_len}     ->
//!   CkptPages{count, indices, contents}... ->      (staged, not applied)
//!   CkptState{offset, bytes}...            ->
//!   CkptEnd{epoch, crc32c}                 ->      applied whole, then
//!                                          <-   CkptAck{epoch}
//! ```
//! The receiver applies an epoch only once all of it arrived and its checksum matched: a sender
//! that dies or a lane that breaks mid-epoch leaves the receiver at the previous epoch, intact.
//! Epochs only go up; an epoch that was never acknowledged is not lost to the sender, whose next
//! epoch carries its pages again ([`Checkpointer`]). Output commit rides on the ack:
//! [`CheckpointCapture::committed`] tells the VMM that what the guest did before that epoch's pause
//! is safe, so its output may leave.
//!
//! Every field is checked against the receiver's layout: page indices in range and not repeated,
//! counts and lengths exact, a state blob of at most [`MAX_STATE_BYTES`]. A hostile sender can make
//! the receiver stage at most one guest's worth of pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fault_handler::DestinationMemory;
use ferry_transport::{GuestMemory, MemoryLayout, PageIndex, PageRun};

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff::MAX_STATE_BYTES;

pub(crate) const CKPT_BEGIN: u8 = 10;
pub(crate) const CKPT_PAGES: u8 = 11;
pub(crate) const CKPT_STATE: u8 = 12;
pub(crate) const CKPT_END: u8 = 13;
pub(crate) const CKPT_ACK: u8 = 14;
pub(crate) const CKPT_FINAL: u8 = 15;

/// Whether a session message belongs to the checkpoint stream (sender to receiver).
pub(crate) fn is_checkpoint_message(msg: &[u8]) -> bool {
    matches!(msg.first(), Some(&(CKPT_BEGIN | CKPT_PAGES | CKPT_STATE | CKPT_END | CKPT_FINAL)))
}

/// The epoch an acknowledgement names, if `msg` is one.
pub(crate) fn ack_epoch(msg: &[u8]) -> Option<u64> {
    match msg {
        [CKPT_ACK, rest @ ..] if rest.len() == 8 => Some(u64::from_le_bytes(rest.try_into().expect("8 bytes"))),
        _ => None,
    }
}

pub(crate) fn ack_message(epoch: u64) -> Vec<u8> {
    [&[CKPT_ACK][..], &epoch.to_le_bytes()].concat()
}

fn protocol(why: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(format!("checkpoint: {}", why.into()))
}

/// Guest memory a checkpoint is captured from or applied to.
pub trait GuestView: Send + Sync {
    /// The memory itself.
    fn guest_memory(&self) -> &GuestMemory;
}

impl GuestView for GuestMemory {
    fn guest_memory(&self) -> &GuestMemory {
        self
    }
}

impl GuestView for DestinationMemory {
    fn guest_memory(&self) -> &GuestMemory {
        self.guest()
    }
}

/// One epoch: the contents of the pages the guest wrote, and its state blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The epoch's number: epochs only go up.
    pub epoch: u64,
    /// The pages, ascending.
    pub pages: Vec<PageIndex>,
    /// `pages.len()` pages of contents, in the order of `pages`.
    pub contents: Vec<u8>,
    /// The VMM's state blob at the pause.
    pub state: Vec<u8>,
}

/// Most digests a verified stop sends: they fit one session message.
const MAX_DIGESTS: u64 = 2048;

/// crc32c of every chunk of every region of `memory`, in layout order: what a verified stop
/// compares (chunk by chunk, so a mismatch says where). A chunk is 1 MiB, or larger (a power of
/// two) for a guest of over [`MAX_DIGESTS`] MiB.
fn memory_digests(memory: &GuestMemory) -> Result<Vec<u32>> {
    let mut chunk = vec![0u8; digest_chunk_len(memory.layout())];
    let mut digests = Vec::new();
    for region in memory.regions() {
        let mut offset = 0;
        while offset < region.len() {
            let n = chunk.len().min(region.len() - offset);
            region.read(offset as u64, &mut chunk[..n])?;
            digests.push(crc32c::crc32c(&chunk[..n]));
            offset += n;
        }
    }
    Ok(digests)
}

/// Bytes each digest of [`memory_digests`] covers for a guest of `layout`.
fn digest_chunk_len(layout: &MemoryLayout) -> usize {
    (layout.total_bytes() / MAX_DIGESTS).next_power_of_two().max(1 << 20) as usize
}

/// How many digests [`memory_digests`] makes for a guest of `layout` (a region's last chunk may
/// be short).
fn digest_count(layout: &MemoryLayout) -> usize {
    let chunk = digest_chunk_len(layout) as u64;
    layout.regions().iter().map(|r| r.size.div_ceil(chunk) as usize).sum()
}

fn final_message(epoch: u64, digests: &[u32]) -> Vec<u8> {
    let mut msg = vec![CKPT_FINAL];
    msg.extend_from_slice(&epoch.to_le_bytes());
    msg.extend(digests.iter().flat_map(|d| d.to_le_bytes()));
    msg
}

/// The run of `count` pages from global page `first`, which must lie in one region.
fn run_of(bases: &[u64], first: u64, count: u32) -> PageRun {
    let region = bases.partition_point(|&b| b <= first) - 1;
    PageRun::new(region as u32, first - bases[region], count)
}

impl Checkpoint {
    /// Copies the `dirty` pages of `memory` (call it with the guest paused: a page written during
    /// the copy would be torn).
    pub fn capture(epoch: u64, memory: &GuestMemory, dirty: &FreePages, state: Vec<u8>) -> Result<Self> {
        let layout = memory.layout();
        if dirty.pages() != layout.total_pages() {
            return Err(protocol(format!("a dirty log of {} pages for {}", dirty.pages(), layout.total_pages())));
        }
        let page = layout.page_size() as usize;
        let bases = layout.region_bases();
        let pages: Vec<PageIndex> = dirty.marked().collect();
        let mut contents = vec![0u8; pages.len() * page];
        // Contiguous dirty pages of one region are copied as one run.
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i].0;
            let region = bases.partition_point(|&b| b <= first) - 1;
            let region_end = bases.get(region + 1).copied().unwrap_or(layout.total_pages());
            let mut n = 1;
            while i + n < pages.len() && pages[i + n].0 == first + n as u64 && first + (n as u64) < region_end {
                n += 1;
            }
            let run = run_of(&bases, first, n as u32);
            memory.read_run(run, &mut contents[i * page..(i + n) * page])?;
            i += n;
        }
        Ok(Checkpoint { epoch, pages, contents, state })
    }

    /// Writes the pages into `memory`.
    pub fn apply(&self, memory: &GuestMemory) -> Result<()> {
        let layout = memory.layout();
        let page = layout.page_size() as usize;
        let bases = layout.region_bases();
        for (i, &PageIndex(p)) in self.pages.iter().enumerate() {
            let run = run_of(&bases, p, 1);
            let (offset, len) = layout.run_bytes(run);
            memory.regions()[run.region as usize].write(offset, &self.contents[i * page..i * page + len])?;
        }
        Ok(())
    }

    fn checksum(&self) -> u32 {
        let indices: Vec<u8> = self.pages.iter().flat_map(|p| p.0.to_le_bytes()).collect();
        let crc = crc32c::crc32c_append(self.epoch as u32, &indices);
        let crc = crc32c::crc32c_append(crc, &self.contents);
        crc32c::crc32c_append(crc, &self.state)
    }

    /// The epoch as session messages, each at most a session frame.
    pub(crate) fn messages(&self, page_size: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut begin = vec![CKPT_BEGIN];
        for v in [self.epoch, self.pages.len() as u64, self.state.len() as u64] {
            begin.extend_from_slice(&v.to_le_bytes());
        }
        out.push(begin);
        let per_frame = ((ferry_transport::wire::MAX_SESSION_PAYLOAD - 5) / (8 + page_size)).max(1);
        for (n, chunk) in self.pages.chunks(per_frame).enumerate() {
            let first = n * per_frame;
            let mut msg = Vec::with_capacity(5 + chunk.len() * (8 + page_size));
            msg.push(CKPT_PAGES);
            msg.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for p in chunk {
                msg.extend_from_slice(&p.0.to_le_bytes());
            }
            msg.extend_from_slice(&self.contents[first * page_size..(first + chunk.len()) * page_size]);
            out.push(msg);
        }
        let state_chunk = ferry_transport::wire::MAX_SESSION_PAYLOAD - 9;
        for (n, chunk) in self.state.chunks(state_chunk).enumerate() {
            let mut msg = vec![CKPT_STATE];
            msg.extend_from_slice(&((n * state_chunk) as u64).to_le_bytes());
            msg.extend_from_slice(chunk);
            out.push(msg);
        }
        let mut end = vec![CKPT_END];
        end.extend_from_slice(&self.epoch.to_le_bytes());
        end.extend_from_slice(&self.checksum().to_le_bytes());
        out.push(end);
        out
    }
}

/// An epoch arriving: what its header announced and what came so far.
#[derive(Debug)]
struct Staging {
    expected_pages: u64,
    state_len: u64,
    seen: FreePages,
    checkpoint: Checkpoint,
}

/// The receiving side of the stream: stages an epoch's messages and hands it over whole.
#[derive(Debug)]
pub struct CheckpointReceiver {
    pages: u64,
    page_size: usize,
    /// The last epoch handed over: a later one must be higher.
    last_epoch: u64,
    staging: Option<Staging>,
}

impl CheckpointReceiver {
    /// A receiver for a guest of `layout`, at no epoch yet.
    pub fn new(layout: &MemoryLayout) -> Self {
        CheckpointReceiver {
            pages: layout.total_pages(),
            page_size: layout.page_size() as usize,
            last_epoch: 0,
            staging: None,
        }
    }

    /// Takes one message of the stream; the epoch when it is complete and sound. A new epoch's
    /// header drops an unfinished one (its sender gave up on it; its pages come again).
    pub fn accept(&mut self, msg: &[u8]) -> Result<Option<Checkpoint>> {
        let u64_at = |i: usize| -> Result<u64> {
            msg.get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| protocol("a truncated message"))
        };
        match msg.first() {
            Some(&CKPT_BEGIN) if msg.len() == 25 => {
                let (epoch, pages, state_len) = (u64_at(1)?, u64_at(9)?, u64_at(17)?);
                if epoch <= self.last_epoch {
                    return Err(protocol(format!("epoch {epoch} after epoch {}", self.last_epoch)));
                }
                if pages > self.pages || state_len > MAX_STATE_BYTES {
                    return Err(protocol(format!("{pages} pages and a {state_len}-byte state announced")));
                }
                self.staging = Some(Staging {
                    expected_pages: pages,
                    state_len,
                    seen: FreePages::new(self.pages),
                    checkpoint: Checkpoint { epoch, pages: Vec::new(), contents: Vec::new(), state: Vec::new() },
                });
                Ok(None)
            }
            Some(&CKPT_PAGES) => {
                let st = self.staging.as_mut().ok_or_else(|| protocol("pages outside an epoch"))?;
                let count = msg.get(1..5).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).unwrap_or(0);
                let count = count as usize;
                if count == 0 || msg.len() != 5 + count * (8 + self.page_size) {
                    return Err(protocol("a page message of the wrong size"));
                }
                if st.checkpoint.pages.len() + count > st.expected_pages as usize {
                    return Err(protocol("more pages than the epoch announced"));
                }
                for i in 0..count {
                    let p = PageIndex(u64_at(5 + 8 * i)?);
                    if p.0 >= self.pages || st.seen.is_free(p) {
                        return Err(protocol(format!("{p} out of range or sent twice")));
                    }
                    st.seen.set(p);
                    st.checkpoint.pages.push(p);
                }
                st.checkpoint.contents.extend_from_slice(&msg[5 + 8 * count..]);
                Ok(None)
            }
            Some(&CKPT_STATE) if msg.len() > 9 => {
                let st = self.staging.as_mut().ok_or_else(|| protocol("state outside an epoch"))?;
                let state = &mut st.checkpoint.state;
                if u64_at(1)? != state.len() as u64 || (state.len() + msg.len() - 9) as u64 > st.state_len {
                    return Err(protocol("state out of order or past its length"));
                }
                state.extend_from_slice(&msg[9..]);
                Ok(None)
            }
            Some(&CKPT_END) if msg.len() == 13 => {
                let st = self.staging.take().ok_or_else(|| protocol("an end outside an epoch"))?;
                let crc = u32::from_le_bytes(msg[9..13].try_into().expect("4 bytes"));
                let c = st.checkpoint;
                if u64_at(1)? != c.epoch
                    || c.pages.len() as u64 != st.expected_pages
                    || c.state.len() as u64 != st.state_len
                {
                    return Err(protocol(format!("epoch {} ended incomplete", c.epoch)));
                }
                if c.checksum() != crc {
                    return Err(protocol(format!("epoch {} fails its checksum", c.epoch)));
                }
                self.last_epoch = c.epoch;
                Ok(Some(c))
            }
            _ => Err(protocol("not a checkpoint message, or one of the wrong size")),
        }
    }
}

/// The receiving host's copy of the guest: its memory (the source's kept image) with every
/// complete epoch applied, and the state blob of the last.
pub struct KeptImage {
    memory: Arc<GuestMemory>,
    receiver: Mutex<CheckpointReceiver>,
    last: Mutex<Option<(u64, Vec<u8>)>>,
    last_at: Mutex<Option<Instant>>,
    /// From the pause to the guest running at the destination, once it was.
    downtime: Mutex<Option<Duration>>,
    applied: AtomicU64,
    applied_pages: AtomicU64,
    /// The chunks (of a verified stop's digests) where the kept memory differed from the sender's
    /// at its final epoch, once it said: empty when the copy is the guest's.
    verified: Mutex<Option<Vec<usize>>>,
}

impl std::fmt::Debug for KeptImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptImage")
            .field("applied", &self.applied.load(Ordering::Relaxed))
            .field("last_epoch", &self.last_epoch())
            .finish_non_exhaustive()
    }
}

impl KeptImage {
    /// Keeps `memory`, the guest as it was handed over; epochs are applied to it as they come.
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        let receiver = Mutex::new(CheckpointReceiver::new(memory.layout()));
        KeptImage {
            memory,
            receiver,
            last: Mutex::new(None),
            last_at: Mutex::new(None),
            downtime: Mutex::new(None),
            applied: AtomicU64::new(0),
            applied_pages: AtomicU64::new(0),
            verified: Mutex::new(None),
        }
    }

    /// Takes one message of the stream; the epoch's number once it was applied (acknowledge it
    /// then, not before).
    pub fn accept(&self, msg: &[u8]) -> Result<Option<u64>> {
        if msg.first() == Some(&CKPT_FINAL) {
            self.check_final(msg)?;
            return Ok(None);
        }
        let done = self.receiver.lock().unwrap_or_else(|e| e.into_inner()).accept(msg)?;
        let Some(c) = done else { return Ok(None) };
        c.apply(&self.memory)?;
        self.applied.fetch_add(1, Ordering::Relaxed);
        self.applied_pages.fetch_add(c.pages.len() as u64, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((c.epoch, c.state));
        *self.last_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(Some(c.epoch))
    }

    /// The handoff's downtime (pause to the guest running at the destination), once the
    /// destination said it resumed: known also when the session fails later.
    pub fn downtime(&self) -> Option<Duration> {
        *self.downtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_downtime(&self, downtime: Duration) {
        *self.downtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(downtime);
    }

    /// When the last epoch was applied.
    pub fn last_applied_at(&self) -> Option<Instant> {
        *self.last_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a restart resumes from: the last epoch's state blob, or `handoff` (the state the
    /// guest was handed over in) when no epoch came; with the epoch, if one did.
    pub fn restart_state(&self, handoff: &[u8]) -> (Option<u64>, Vec<u8>) {
        match self.last() {
            Some((epoch, state)) => (Some(epoch), state),
            None => (None, handoff.to_vec()),
        }
    }

    /// The last applied epoch and its state blob: what a restart resumes from (memory is
    /// already this epoch's). `None`: no epoch came; the guest restarts from the handoff.
    pub fn last(&self) -> Option<(u64, Vec<u8>)> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last epoch applied, if one was.
    pub fn last_epoch(&self) -> Option<u64> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(e, _)| *e)
    }

    /// Compares the kept memory with the sender's digest of its guest at the final epoch, which
    /// must be the last applied.
    fn check_final(&self, msg: &[u8]) -> Result<()> {
        // Every check that costs nothing comes before the pass over the whole memory, which a
        // sender gets once.
        let [CKPT_FINAL, rest @ ..] = msg else { return Err(protocol("not a final check")) };
        if rest.len() != 8 + 4 * digest_count(self.memory.layout()) {
            return Err(protocol("a final check of the wrong size"));
        }
        let epoch = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        if self.receiver.lock().unwrap_or_else(|e| e.into_inner()).staging.is_some() {
            return Err(protocol("a final check inside an epoch"));
        }
        if self.last_epoch() != Some(epoch) {
            return Err(protocol(format!(
                "a final check of epoch {epoch}; the last applied is {:?}",
                self.last_epoch()
            )));
        }
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Err(protocol("a second final check"));
        }
        let ours = memory_digests(&self.memory)?;
        let theirs = rest[8..].chunks_exact(4).map(|d| u32::from_le_bytes(d.try_into().expect("4 bytes")));
        let differ: Vec<usize> =
            ours.iter().zip(theirs).enumerate().filter(|(_, (a, b))| *a != b).map(|(i, _)| i).collect();
        if !differ.is_empty() {
            tracing::warn!(
                epoch,
                chunks = differ.len(),
                first = ?&differ[..differ.len().min(16)],
                "checkpoint: the kept copy differs from the sender's guest (chunks in layout order)"
            );
        }
        *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(differ);
        Ok(())
    }

    /// Whether the kept memory equalled the sender's guest at its final epoch: `None` until the
    /// sender ended with a verified stop ([`Checkpointer::stop_verified`]).
    pub fn verified(&self) -> Option<bool> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Vec::is_empty)
    }

    /// Where a verified stop found the kept memory different: chunk indices in layout order (1
    /// MiB each, larger for guests over 2 GiB). `None` before a verified stop.
    pub fn differing_chunks(&self) -> Option<Vec<usize>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Epochs applied, and pages they wrote.
    pub fn applied(&self) -> (u64, u64) {
        (self.applied.load(Ordering::Relaxed), self.applied_pages.load(Ordering::Relaxed))
    }

    /// The kept memory, every applied epoch in it.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
}

/// What the VMM does for a consistent capture. Called from the checkpointer's thread.
pub trait CheckpointCapture: Send {
    /// Stops every vCPU (returns when none runs, or fails without stopping any if one does not
    /// stop in time) and returns the state blob the guest would resume from, device state (held
    /// output among it) included. Output produced until now belongs to `epoch`.
    fn pause(&mut self, epoch: u64) -> std::result::Result<Vec<u8>, String>;
    /// Pages the guest wrote since the previous call (the first: since it resumed here); pages
    /// it discarded count as written.
    fn dirty(&mut self) -> std::result::Result<FreePages, String>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> std::result::Result<(), String>;
    /// Epoch `epoch` is safe at the receiver: output produced before its pause may leave.
    /// [`u64::MAX`]: the session ended with the guest wholly here; all of it may leave.
    fn committed(&mut self, epoch: u64);
}

/// How often and how a checkpointer captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Between the starts of two captures (an epoch sent and acknowledged within it leaves the
    /// rest for the guest), but never less than the guest was last paused for after it resumed:
    /// a guest that writes faster than its epochs can carry still runs at least half the time.
    /// Default 100 ms.
    pub period: Duration,
    /// How long an epoch may wait for its acknowledgement before its pages go with the next.
    /// Default 5 s.
    pub ack_timeout: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { period: Duration::from_millis(100), ack_timeout: Duration::from_secs(5) }
    }
}

/// Where a checkpointer sends its epochs.
///
/// An epoch's messages all travel on one lane: were the rest of an epoch sent on a lane reopened
/// after its beginning was lost with the old one, the receiver would see pages outside any epoch.
/// A lane that can be reopened numbers its lanes ([`CheckpointLane::current`]) and refuses a
/// message of an epoch begun on an earlier one; the epoch then counts as lost and its pages go
/// with the next, which begins on the new lane.
pub trait CheckpointLane: Send + Sync {
    /// Sends one session message (whole) of an epoch begun on lane `on`; fails without sending if
    /// the lane was reopened since.
    fn send(&self, on: u64, msg: &[u8]) -> Result<()>;
    /// The lane messages go on now. Default: a lane never reopened.
    fn current(&self) -> u64 {
        0
    }
}

/// What a checkpointer measured.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    /// Epochs acknowledged.
    pub committed: u64,
    /// Epochs sent but never acknowledged (their pages went again).
    pub failed: u64,
    /// Captures given up because the guest would not pause in time.
    pub skipped: u64,
    /// Pages the acknowledged epochs carried.
    pub pages: u64,
    /// Bytes they carried (pages and state).
    pub bytes: u64,
    /// The guest's pauses for captures: total and longest.
    pub paused: Duration,
    /// The longest pause.
    pub longest_pause: Duration,
    /// Each capture's pause, in order (the first [`MAX_PAUSE_SAMPLES`]).
    pub pauses: Vec<Duration>,
    /// A verified stop's digest went to the receiver ([`Checkpointer::stop_verified`]).
    pub verify_sent: bool,
}

/// How many times a verified stop tries its last capture (a vCPU may not stop in time).
const MAX_FINAL_ATTEMPTS: u32 = 10;

/// Most pauses a checkpointer's stats keep one by one (a day of 10 ms epochs is 8.6M).
pub const MAX_PAUSE_SAMPLES: usize = 1 << 16;

/// The sending side: a thread that captures an epoch every period, sends it, and waits for its
/// acknowledgement before the next. Pages of an epoch that was not acknowledged go again with the
/// next, so the receiver misses nothing whichever epochs it got.
pub struct Checkpointer {
    shared: Arc<CheckpointerShared>,
    thread: Option<JoinHandle<(CheckpointStats, Box<dyn CheckpointCapture>)>>,
}

struct CheckpointerShared {
    stop: std::sync::atomic::AtomicBool,
    /// Take one last epoch, then compare whole memories ([`Checkpointer::stop_verified`]).
    verify_and_stop: std::sync::atomic::AtomicBool,
    /// Bounded: acks come from the peer, which must not make us queue without end.
    acks: Mutex<mpsc::SyncSender<u64>>,
    wake: (Mutex<bool>, std::sync::Condvar),
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

/// A handle to a running checkpointer's inputs (acknowledgements, early-capture requests).
#[derive(Clone)]
pub struct CheckpointerHandle(Arc<CheckpointerShared>);

impl std::fmt::Debug for CheckpointerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointerHandle").finish_non_exhaustive()
    }
}

impl CheckpointerHandle {
    /// The receiver acknowledged `epoch`. Acks past what the queue holds are dropped (a peer
    /// acking what was never sent gains nothing; the epoch waited for comes with room to spare).
    pub fn acked(&self, epoch: u64) {
        let _ = self.0.acks.lock().unwrap_or_else(|e| e.into_inner()).try_send(epoch);
    }

    /// Capture soon (output is waiting), without waiting out the period.
    pub fn request(&self) {
        let (flag, cv) = &self.0.wake;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }
}

impl Checkpointer {
    /// Starts capturing `memory` through `capture`, sending on `lane`.
    pub fn start(
        memory: Arc<dyn GuestView>,
        mut capture: Box<dyn CheckpointCapture>,
        lane: Arc<dyn CheckpointLane>,
        config: CheckpointConfig,
    ) -> Result<Self> {
        // One epoch is in flight at a time: a few slots hold its ack and stale ones.
        let (ack_tx, ack_rx) = mpsc::sync_channel(16);
        let shared = Arc::new(CheckpointerShared {
            stop: std::sync::atomic::AtomicBool::new(false),
            verify_and_stop: std::sync::atomic::AtomicBool::new(false),
            acks: Mutex::new(ack_tx),
            wake: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferry-checkpointer".into())
                .spawn(move || {
                    let mut stats = CheckpointStats::default();
                    let total = memory.guest_memory().layout().total_pages();
                    let page = memory.guest_memory().layout().page_size() as usize;
                    // Pages written since the last acknowledged epoch.
                    let mut unacked = FreePages::new(total);
                    let mut epoch = 0;
                    let mut next_capture = Instant::now() + config.period;
                    let mut final_attempts = 0;
                    loop {
                        if !shared.sleep_until(next_capture) {
                            break;
                        }
                        let last = shared.verify_and_stop.load(Ordering::Acquire);
                        epoch += 1;
                        let paused_at = Instant::now();
                        let captured = (|| {
                            let state = capture.pause(epoch)?;
                            let mut dirty = capture.dirty()?;
                            dirty.union_with(&unacked);
                            Checkpoint::capture(epoch, memory.guest_memory(), &dirty, state)
                                .map_err(|e| e.to_string())
                                .map(|c| (c, dirty))
                        })();
                        // The guest runs again before the epoch travels; after the last, once the
                        // memories were compared.
                        let resumed = if last && captured.is_ok() { Ok(()) } else { capture.resume() };
                        let pause = paused_at.elapsed();
                        next_capture = (paused_at + config.period).max(Instant::now() + pause);
                        stats.paused += pause;
                        stats.longest_pause = stats.longest_pause.max(pause);
                        if stats.pauses.len() < MAX_PAUSE_SAMPLES {
                            stats.pauses.push(pause);
                        }
                        let (checkpoint, dirty) = match (captured, resumed) {
                            (Ok(c), Ok(())) => c,
                            // A vCPU that would not stop in time (one waiting for a page while a
                            // lane recovers): the dirty log was not taken, try again next period.
                            (Err(_), Ok(())) => {
                                stats.skipped += 1;
                                // The last epoch is tried again a few periods on before the
                                // stop goes without its comparison.
                                final_attempts += u32::from(last);
                                match final_attempts >= MAX_FINAL_ATTEMPTS {
                                    true => break,
                                    false => continue,
                                }
                            }
                            // The VMM cannot run its guest: nothing more to checkpoint.
                            (_, Err(_)) => break,
                        };
                        unacked = dirty;
                        let on = lane.current();
                        let sent = checkpoint.messages(page).iter().try_for_each(|m| lane.send(on, m));
                        // An ack that would have come on a lane since reopened never comes.
                        let still_on = || lane.current() == on;
                        let acked = sent.is_ok() && wait_ack(&ack_rx, epoch, config.ack_timeout, &shared, still_on);
                        if acked {
                            stats.committed += 1;
                            stats.pages += checkpoint.pages.len() as u64;
                            stats.bytes += (checkpoint.contents.len() + checkpoint.state.len()) as u64;
                            unacked = FreePages::new(total);
                            capture.committed(epoch);
                        } else {
                            stats.failed += 1;
                        }
                        if last {
                            // Still paused: the receiver now holds exactly this memory.
                            if acked {
                                let check = memory_digests(memory.guest_memory())
                                    .map(|digests| final_message(epoch, &digests))
                                    .and_then(|msg| lane.send(on, &msg));
                                stats.verify_sent = check.is_ok();
                            }
                            let _ = capture.resume();
                            break;
                        }
                    }
                    (stats, capture)
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the checkpointer: {e}")))?
        };
        Ok(Checkpointer { shared, thread: Some(thread) })
    }

    /// A handle for acknowledgements and early-capture requests.
    pub fn handle(&self) -> CheckpointerHandle {
        CheckpointerHandle(self.shared.clone())
    }

    /// Stops capturing (after the epoch in progress); what it measured, and the capture back
    /// (`None` if its thread panicked).
    pub fn stop(mut self) -> (CheckpointStats, Option<Box<dyn CheckpointCapture>>) {
        self.finish()
    }

    /// Stops after one last epoch, taken at once: with the guest still paused after its
    /// acknowledgement, a digest of the whole guest memory goes to the receiver, which compares
    /// its own ([`KeptImage::verified`]). The guest pauses for that digest (a pass over its
    /// memory). `verify_sent` in the stats says whether the digest went.
    pub fn stop_verified(mut self) -> (CheckpointStats, Option<Box<dyn CheckpointCapture>>) {
        self.shared.verify_and_stop.store(true, Ordering::Release);
        self.handle().request();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok((stats, capture))) => (stats, Some(capture)),
            _ => (CheckpointStats::default(), None),
        }
    }

    fn finish(&mut self) -> (CheckpointStats, Option<Box<dyn CheckpointCapture>>) {
        self.shared.stop.store(true, Ordering::Release);
        self.handle().request();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok((stats, capture))) => (stats, Some(capture)),
            _ => (CheckpointStats::default(), None),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish();
        }
    }
}

impl CheckpointerShared {
    /// Sleeps until `deadline` or a request; false once stopped.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let (flag, cv) = &self.wake;
        let mut requested = flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*requested && !self.stop.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            requested = cv.wait_timeout(requested, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *requested = false;
        !self.stop.load(Ordering::Acquire)
    }
}

/// Waits for `epoch`'s acknowledgement (older ones are stale); false on timeout, stop, or once
/// `lane_kept` says the lane it was sent on is gone.
fn wait_ack(
    acks: &mpsc::Receiver<u64>,
    epoch: u64,
    timeout: Duration,
    shared: &CheckpointerShared,
    lane_kept: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if shared.stop.load(Ordering::Acquire) || !lane_kept() {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match acks.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(e) if e == epoch => return true,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::{Backing, RegionLayout};

    fn two_regions() -> MemoryLayout {
        let r = |base, size| RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(base), size };
        MemoryLayout::new(4096, vec![r(0, 64 * 4096), r(1 << 30, 32 * 4096)]).unwrap()
    }

    fn memory() -> Arc<GuestMemory> {
        Arc::new(GuestMemory::create(two_regions(), Backing::Anonymous).unwrap())
    }

    /// Writes `tag` into every page of `pages` (a guest at work) and marks them dirty.
    fn scribble(m: &GuestMemory, pages: &[u64], tag: u8, dirty: &mut FreePages) {
        let bases = m.layout().region_bases();
        for &p in pages {
            let run = run_of(&bases, p, 1);
            let (offset, len) = m.layout().run_bytes(run);
            m.regions()[run.region as usize].write(offset, &vec![tag ^ p as u8; len]).unwrap();
            dirty.set(PageIndex(p));
        }
    }

    fn same(a: &GuestMemory, b: &GuestMemory) -> bool {
        let len = a.layout().total_bytes() as usize;
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        let mut at = 0;
        for (ra, rb) in a.regions().iter().zip(b.regions()) {
            ra.read(0, &mut x[at..at + ra.len()]).unwrap();
            rb.read(0, &mut y[at..at + rb.len()]).unwrap();
            at += ra.len();
        }
        x == y
    }

    fn epoch(n: u64, guest: &GuestMemory, pages: &[u64], tag: u8) -> Checkpoint {
        let mut dirty = FreePages::new(guest.layout().total_pages());
        scribble(guest, pages, tag, &mut dirty);
        Checkpoint::capture(n, guest, &dirty, vec![tag; 100]).unwrap()
    }

    #[test]
    fn epochs_apply_whole_and_an_interrupted_one_leaves_the_last_intact() {
        let (guest, kept_mem) = (memory(), memory());
        let kept = KeptImage::new(kept_mem.clone());
        // Pages across the region boundary (63, 64) and runs in both.
        let first = epoch(1, &guest, &[0, 1, 2, 63, 64, 65, 95], 0xa0);
        for m in first.messages(4096) {
            kept.accept(&m).unwrap();
        }
        assert_eq!(kept.last(), Some((1, vec![0xa0; 100])));
        assert!(same(&guest, &kept_mem), "epoch 1 applied whole");
        // Epoch 2 loses its end: nothing of it may show.
        let second = epoch(2, &guest, &[2, 3, 70], 0xb0);
        let messages = second.messages(4096);
        for m in &messages[..messages.len() - 1] {
            assert_eq!(kept.accept(m).unwrap(), None);
        }
        assert_eq!(kept.last_epoch(), Some(1));
        assert!(!same(&guest, &kept_mem), "epoch 2's pages stay staged");
        // Epoch 3 carries epoch 2's pages again (the sender never heard an ack) and replaces it.
        let mut dirty = FreePages::new(guest.layout().total_pages());
        scribble(&guest, &[2, 3, 70, 80], 0xc0, &mut dirty);
        let third = Checkpoint::capture(3, &guest, &dirty, vec![3]).unwrap();
        let applied: Vec<_> = third.messages(4096).iter().map(|m| kept.accept(m).unwrap()).collect();
        assert_eq!(applied.last(), Some(&Some(3)));
        assert!(same(&guest, &kept_mem));
        assert_eq!(kept.applied(), (2, 11));
    }

    #[test]
    fn hostile_streams_are_protocol_errors() {
        let guest = memory();
        let good = epoch(5, &guest, &[1, 2], 1).messages(4096);
        let begin = |epoch: u64, pages: u64, state: u64| {
            [&[CKPT_BEGIN][..], &epoch.to_le_bytes(), &pages.to_le_bytes(), &state.to_le_bytes()].concat()
        };
        let page_msg = |p: u64| [&[CKPT_PAGES][..], &1u32.to_le_bytes(), &p.to_le_bytes(), &[0u8; 4096]].concat();
        let mut corrupt = good.clone();
        corrupt[1][20] ^= 1;
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("pages before a header", vec![page_msg(1)]),
            ("more pages than the guest", vec![begin(1, 97, 0)]),
            ("an oversized state", vec![begin(1, 1, MAX_STATE_BYTES + 1)]),
            ("a page out of range", vec![begin(1, 1, 0), page_msg(96)]),
            ("a page twice", vec![begin(1, 2, 0), page_msg(3), page_msg(3)]),
            ("more pages than announced", vec![begin(1, 1, 0), page_msg(3), page_msg(4)]),
            ("a short page", vec![begin(1, 1, 0), page_msg(3)[..100].to_vec()]),
            ("an end too early", vec![begin(1, 2, 0), page_msg(3), good.last().unwrap().clone()]),
            ("a flipped bit", corrupt),
            ("an unknown message", vec![vec![CKPT_ACK, 0]]),
        ];
        for (what, messages) in cases {
            let mut r = CheckpointReceiver::new(guest.layout());
            let err = messages.iter().map(|m| r.accept(m)).find_map(Result::err);
            assert!(matches!(err, Some(MigrationError::Protocol(_))), "{what}: {err:?}");
        }
        // Epochs only go up.
        let mut r = CheckpointReceiver::new(guest.layout());
        for m in &good {
            r.accept(m).unwrap();
        }
        assert!(r.accept(&good[0]).is_err(), "epoch 5 again");
    }

    /// The test's guest: writes happen under `gate`'s lock and only while it is not paused.
    #[derive(Default)]
    struct Gate {
        paused: Mutex<bool>,
        resumed: std::sync::Condvar,
    }

    impl Gate {
        /// Runs one guest write once the guest is not paused.
        fn write(&self, f: impl FnOnce()) {
            let mut paused = self.paused.lock().unwrap();
            while *paused {
                paused = self.resumed.wait(paused).unwrap();
            }
            f();
        }
    }

    struct FakeCapture {
        gate: Arc<Gate>,
        dirty: Arc<Mutex<FreePages>>,
        committed: Arc<Mutex<Vec<u64>>>,
    }

    impl CheckpointCapture for FakeCapture {
        fn pause(&mut self, _epoch: u64) -> std::result::Result<Vec<u8>, String> {
            *self.gate.paused.lock().unwrap() = true;
            Ok(b"state".to_vec())
        }
        fn dirty(&mut self) -> std::result::Result<FreePages, String> {
            let mut d = self.dirty.lock().unwrap();
            let total = d.pages();
            Ok(std::mem::replace(&mut *d, FreePages::new(total)))
        }
        fn resume(&mut self) -> std::result::Result<(), String> {
            *self.gate.paused.lock().unwrap() = false;
            self.gate.resumed.notify_all();
            Ok(())
        }
        fn committed(&mut self, epoch: u64) {
            self.committed.lock().unwrap().push(epoch);
        }
    }

    /// What goes wrong on the test's lane during one epoch.
    #[derive(Clone, Copy)]
    enum Mishap {
        /// The epoch's end is lost and its sender told so.
        EndLost(u64),
        /// The epoch's beginning is lost with its lane, which is reopened before its next message.
        ReopenedAfterBegin(u64),
    }

    /// The lane of the test: straight into a kept image, acks straight back.
    struct Direct {
        kept: KeptImage,
        acks: Mutex<Option<CheckpointerHandle>>,
        mishap: Mishap,
        epoch: AtomicU64,
        lane: AtomicU64,
        /// What the receiver refused: a sound sender gets nothing refused.
        refused: Mutex<Vec<String>>,
    }

    impl CheckpointLane for Direct {
        fn send(&self, on: u64, msg: &[u8]) -> Result<()> {
            if on != self.current() {
                return Err(MigrationError::Transport(ferry_transport::TransportError::PeerClosed));
            }
            if msg[0] == CKPT_BEGIN {
                self.epoch.store(u64::from_le_bytes(msg[1..9].try_into().unwrap()), Ordering::Relaxed);
            }
            let epoch = self.epoch.load(Ordering::Relaxed);
            match self.mishap {
                Mishap::EndLost(e) if e == epoch && msg[0] == CKPT_END => {
                    return Err(MigrationError::Transport(ferry_transport::TransportError::PeerClosed));
                }
                // Written into a socket that then broke: the sender hears nothing of it.
                Mishap::ReopenedAfterBegin(e) if e == epoch && msg[0] == CKPT_BEGIN => {
                    self.lane.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                _ => {}
            }
            match self.kept.accept(msg) {
                Ok(Some(epoch)) => self.acks.lock().unwrap().as_ref().unwrap().acked(epoch),
                Ok(None) => {}
                Err(e) => self.refused.lock().unwrap().push(e.to_string()),
            }
            Ok(())
        }

        fn current(&self) -> u64 {
            self.lane.load(Ordering::Relaxed)
        }
    }

    /// A checkpointer over a fresh guest, sending straight into a kept image on a lane with
    /// `mishap`: the guest, the kept memory, the guest's dirty log, the epochs committed, the
    /// gate its writes pass, the lane, and the checkpointer.
    struct Rig {
        guest: Arc<GuestMemory>,
        kept_mem: Arc<GuestMemory>,
        dirty: Arc<Mutex<FreePages>>,
        committed: Arc<Mutex<Vec<u64>>>,
        gate: Arc<Gate>,
        lane: Arc<Direct>,
        cp: Checkpointer,
    }

    fn rig(mishap: Mishap, ack_timeout: Duration) -> Rig {
        let (guest, kept_mem) = (memory(), memory());
        let dirty = Arc::new(Mutex::new(FreePages::new(96)));
        let committed = Arc::new(Mutex::new(Vec::new()));
        let lane = Arc::new(Direct {
            kept: KeptImage::new(kept_mem.clone()),
            acks: Mutex::new(None),
            mishap,
            epoch: AtomicU64::new(0),
            lane: AtomicU64::new(0),
            refused: Mutex::new(Vec::new()),
        });
        let gate = Arc::new(Gate::default());
        let capture = FakeCapture { gate: gate.clone(), dirty: dirty.clone(), committed: committed.clone() };
        let config = CheckpointConfig { period: Duration::from_millis(5), ack_timeout };
        let cp = Checkpointer::start(guest.clone(), Box::new(capture), lane.clone(), config).unwrap();
        *lane.acks.lock().unwrap() = Some(cp.handle());
        Rig { guest, kept_mem, dirty, committed, gate, lane, cp }
    }

    /// Runs a checkpointer over a guest written to in 40 rounds, with `mishap` on its lane, until
    /// two epochs committed after the writes; the stats, the epochs committed, and the lane.
    fn checkpoint_through(mishap: Mishap) -> (CheckpointStats, Vec<u64>, Arc<Direct>, bool) {
        let Rig { guest, kept_mem, dirty, committed, gate, lane, cp } = rig(mishap, Duration::from_millis(200));
        for round in 0..40u64 {
            let pages: Vec<u64> = (0..5).map(|i| (round * 7 + i * 13) % 96).collect();
            gate.write(|| scribble(&guest, &pages, round as u8, &mut dirty.lock().unwrap()));
            std::thread::sleep(Duration::from_millis(2));
        }
        // Let a last epoch take whatever was written since the previous one.
        while committed.lock().unwrap().len() < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let writes_done = committed.lock().unwrap().len();
        while committed.lock().unwrap().len() < writes_done + 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stats, capture) = cp.stop();
        assert!(capture.is_some());
        let committed = committed.lock().unwrap().clone();
        let in_step = same(&guest, &kept_mem);
        (stats, committed, lane, in_step)
    }

    #[test]
    fn a_checkpointer_keeps_the_receiver_in_step_through_a_lost_epoch() {
        let (stats, committed, lane, in_step) = checkpoint_through(Mishap::EndLost(2));
        assert!(stats.failed >= 1, "epoch 2 lost its end: {stats:?}");
        assert!(!committed.contains(&2), "epoch 2 was never committed");
        assert!(in_step, "the receiver holds every write, epoch 2's included");
        assert_eq!(lane.kept.last_epoch(), committed.last().copied());
        assert_eq!(*lane.refused.lock().unwrap(), Vec::<String>::new());
    }

    /// Runs a checkpointer for a few epochs of writes, optionally spoils the receiver's copy, then
    /// stops it verified: what the receiver concluded.
    fn verified_stop(spoil_receiver: bool) -> (Option<bool>, CheckpointStats) {
        let Rig { guest, kept_mem, dirty, committed, gate, lane, cp } =
            rig(Mishap::EndLost(u64::MAX), Duration::from_millis(500));
        for round in 0..10u64 {
            let pages: Vec<u64> = (0..5).map(|i| (round * 11 + i * 7) % 90).collect();
            gate.write(|| scribble(&guest, &pages, round as u8, &mut dirty.lock().unwrap()));
            std::thread::sleep(Duration::from_millis(2));
        }
        while committed.lock().unwrap().len() < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        if spoil_receiver {
            // A page the guest never writes, changed behind the stream's back.
            kept_mem.regions()[1].write(0x1000 * 30, &[0xee; 8]).unwrap();
        }
        let (stats, _) = cp.stop_verified();
        assert_eq!(*lane.refused.lock().unwrap(), Vec::<String>::new());
        (lane.kept.verified(), stats)
    }

    #[test]
    fn hostile_final_checks_are_protocol_errors() {
        let kept = KeptImage::new(memory());
        let count = digest_count(kept.memory().layout());
        assert_eq!(count, 2, "one chunk per region of the test's guest");
        // Before any epoch, of the wrong size, or a second one: refused.
        assert!(kept.accept(&final_message(0, &[0; 2])).is_err(), "no epoch applied yet");
        assert!(kept.accept(&[CKPT_FINAL, 1, 2, 3]).is_err());
        let source = memory();
        let good = epoch(1, &source, &[3, 70], 9);
        for m in good.messages(4096) {
            kept.accept(&m).unwrap();
        }
        assert!(kept.accept(&final_message(1, &[0; 3])).is_err(), "too many digests");
        assert!(kept.accept(&final_message(2, &[0; 2])).is_err(), "an epoch never applied");
        kept.accept(&final_message(1, &[0; 2])).unwrap();
        assert_eq!(kept.verified(), Some(false));
        assert!(kept.accept(&final_message(1, &[0; 2])).is_err(), "a second final check");
    }

    #[test]
    fn a_verified_stop_tells_the_receiver_whether_its_copy_is_the_guests() {
        let (verified, stats) = verified_stop(false);
        assert!(stats.verify_sent, "{stats:?}");
        assert_eq!(verified, Some(true));
        let (verified, _) = verified_stop(true);
        assert_eq!(verified, Some(false), "a spoilt copy must not pass");
    }

    #[test]
    fn an_epoch_whose_lane_is_reopened_is_given_up_not_finished_on_the_new_lane() {
        let (stats, committed, lane, in_step) = checkpoint_through(Mishap::ReopenedAfterBegin(2));
        assert_eq!(*lane.refused.lock().unwrap(), Vec::<String>::new(), "the rest of epoch 2 reached the receiver");
        assert!(stats.failed >= 1, "epoch 2 lost its beginning: {stats:?}");
        assert!(!committed.contains(&2), "epoch 2 was never committed");
        assert!(in_step, "the receiver holds every write, epoch 2's included");
        assert_eq!(lane.kept.last_epoch(), committed.last().copied());
    }
}
