//! The arbiter: an atomic test-and-set with a lease, so that exactly one copy of a VM runs. Before
//! a side goes live (a source restarting a guest whose destination went silent, a backup taking
//! over from its primary) it must hold the lease; a side that cannot renew its lease in time stops
//! its guest. Written once for post-copy recovery and fault-tolerant VMs.
//!
//! [`LeaseFile`] is the embedded arbiter: no server, a small file on storage every contender sees
//! (a local disk for processes of one host; NFSv4 or another filesystem with coherent
//! open-file-description locks across hosts). Every decision is one read-modify-write of the file
//! under an OFD write lock (`F_OFD_SETLK`), written and synced before the lock is released, so two
//! contenders never both see the lease free. Each acquisition bumps an epoch, a fencing token a
//! side can attach to what it writes.
//!
//! [`EtcdArbiter`] (feature `etcd`) is the distributed one: compare-and-swap of a key attached to
//! an etcd lease.
//!
//! A file lease's expiry is wall-clock time, compared across hosts: a holder treats its lease as lost
//! `clock_skew` before it expires, and a contender takes an expired lease only `clock_skew` after
//! it expired, so hosts whose clocks differ by less than that never overlap.

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::EtcdArbiter;
#[cfg(all(feature = "etcd", feature = "testkit"))]
pub use etcd::ScratchEtcd;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{MigrationError, Result};

/// Who holds the lease, in which epoch, and until when (milliseconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The side that holds it.
    pub holder: String,
    /// Bumped each time the lease changes hands: a stale holder's writes are refused.
    pub epoch: u64,
    /// When it lapses unless renewed.
    pub expires_ms: u64,
}

/// An atomic test-and-set with a time-to-live.
pub trait Arbiter: Send + Sync {
    /// Takes the lease for `holder` for `ttl` if it is free, expired, or already `holder`'s.
    /// `Ok(Some(lease))` when `holder` holds it now; `Ok(None)` when another does.
    fn acquire(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>>;
    /// Extends `holder`'s lease by `ttl` from now; `Ok(None)` if it is no longer `holder`'s (it
    /// expired and another took it): stop the guest.
    fn renew(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>>;
    /// Gives the lease up if `holder` holds it.
    fn release(&self, holder: &str) -> Result<()>;
    /// The lease as it stands.
    fn current(&self) -> Result<Option<Lease>>;
}

/// The embedded arbiter: a lease file (see the module doc).
#[derive(Debug)]
pub struct LeaseFile {
    path: PathBuf,
    clock_skew: Duration,
    /// How long to wait for another contender's lock before giving up.
    lock_timeout: Duration,
}

impl LeaseFile {
    /// A lease kept in `path` (created if missing), tolerating `clock_skew` between hosts.
    pub fn new(path: impl AsRef<Path>, clock_skew: Duration) -> Self {
        LeaseFile { path: path.as_ref().to_path_buf(), clock_skew, lock_timeout: Duration::from_secs(5) }
    }

    /// Runs `decide` on the lease under the file's write lock and writes what it returns.
    fn update(&self, decide: impl FnOnce(Option<Lease>, u64) -> Option<Option<Lease>>) -> Result<Option<Lease>> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path).map_err(io)?;
        let _lock = OfdLock::acquire(&file, self.lock_timeout)?;
        let current = read_lease(&file)?;
        let mut file = &file;
        let now = now_ms();
        match decide(current.clone(), now) {
            // Unchanged.
            None => Ok(current),
            Some(next) => {
                let text = next.as_ref().map(encode).unwrap_or_default();
                file.set_len(0).map_err(io)?;
                file.seek(SeekFrom::Start(0)).map_err(io)?;
                file.write_all(text.as_bytes()).map_err(io)?;
                // On disk before anyone else may read it.
                file.sync_data().map_err(io)?;
                Ok(next)
            }
        }
    }

    fn skew_ms(&self) -> u64 {
        self.clock_skew.as_millis() as u64
    }
}

impl Arbiter for LeaseFile {
    fn acquire(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_holder(holder)?;
        let skew = self.skew_ms();
        let lease = self.update(|current, now| {
            let epoch = current.as_ref().map_or(0, |l| l.epoch);
            let expires_ms = now + ttl.as_millis() as u64;
            match current {
                Some(l) if l.holder == holder => Some(Some(Lease { expires_ms, ..l })),
                // Another's, and not surely expired on every clock.
                Some(l) if l.expires_ms + skew > now => None,
                _ => Some(Some(Lease { holder: holder.into(), epoch: epoch + 1, expires_ms })),
            }
        })?;
        Ok(lease.filter(|l| l.holder == holder))
    }

    fn renew(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_holder(holder)?;
        let skew = self.skew_ms();
        let lease = self.update(|current, now| match current {
            // Ours, and not yet possibly expired on another clock.
            Some(l) if l.holder == holder && l.expires_ms > now + skew => {
                Some(Some(Lease { expires_ms: now + ttl.as_millis() as u64, ..l }))
            }
            _ => None,
        })?;
        Ok(lease.filter(|l| l.holder == holder && l.expires_ms > now_ms()))
    }

    fn release(&self, holder: &str) -> Result<()> {
        self.update(|current, _| match current {
            // Keep the epoch: the next holder's is higher.
            Some(l) if l.holder == holder => Some(Some(Lease { holder: String::new(), expires_ms: 0, ..l })),
            _ => None,
        })?;
        Ok(())
    }

    fn current(&self) -> Result<Option<Lease>> {
        let lease = self.update(|_, _| None)?;
        Ok(lease.filter(|l| !l.holder.is_empty()))
    }
}

/// Who takes a lease, through which arbiter, for how long at a time.
#[derive(Clone)]
pub struct LeaseTerms {
    /// Where the lease is kept.
    pub arbiter: Arc<dyn Arbiter>,
    /// This side's name (1-256 bytes, no spaces): unique per host and VM.
    pub holder: String,
    /// How long one acquisition or renewal holds. Renewed every quarter of it.
    pub ttl: Duration,
    /// The most the hosts' clocks differ by: a holder counts its lease lost this long before it
    /// expires (give the arbiter the same).
    pub clock_skew: Duration,
}

impl std::fmt::Debug for LeaseTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseTerms")
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .field("clock_skew", &self.clock_skew)
            .finish_non_exhaustive()
    }
}

/// A lease held and kept: a thread renews it every quarter of its time to live. When it cannot
/// (another took it, or the arbiter stayed unreachable until this side's view of the expiry), it
/// calls `on_lost` once and stops: the holder must stop its guest. Dropping the keeper releases
/// the lease; [`LeaseKeeper::hand_over`] releases it on purpose (the guest stopped here).
pub struct LeaseKeeper {
    terms: LeaseTerms,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    epoch: u64,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("terms", &self.terms)
            .field("epoch", &self.epoch)
            .field("lost", &self.lost.load(Ordering::Relaxed))
            .finish()
    }
}

impl LeaseKeeper {
    /// Takes the lease, trying every 50 ms for up to `wait` (another holder's lease must expire
    /// or be released first), then keeps it. [`MigrationError::LeaseHeld`] if it stayed taken.
    pub fn acquire(terms: &LeaseTerms, wait: Duration, on_lost: impl FnOnce() + Send + 'static) -> Result<Self> {
        if terms.ttl <= terms.clock_skew * 2 || terms.ttl < Duration::from_millis(40) {
            return Err(MigrationError::Protocol(format!(
                "a lease of {:?} cannot outlast twice the clock skew {:?} (and at least 40 ms)",
                terms.ttl, terms.clock_skew
            )));
        }
        let started = Instant::now();
        let (lease, taken_at) = loop {
            let asked = Instant::now();
            match terms.arbiter.acquire(&terms.holder, terms.ttl) {
                Ok(Some(lease)) => break (lease, asked),
                Ok(None) if started.elapsed() < wait => {}
                Err(_) if started.elapsed() < wait => {}
                Ok(None) => {
                    let holder = terms.arbiter.current().ok().flatten().map(|l| l.holder).unwrap_or_default();
                    return Err(MigrationError::LeaseHeld(holder));
                }
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (stop, lost) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (terms, stop, lost) = (terms.clone(), stop.clone(), lost.clone());
            std::thread::Builder::new()
                .name("ferry-lease".into())
                .spawn(move || {
                    // Until when this side may count on the lease, on its own clock.
                    let mut valid_until = taken_at + terms.ttl - terms.clock_skew;
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(terms.ttl / 4);
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        let asked = Instant::now();
                        match terms.arbiter.renew(&terms.holder, terms.ttl) {
                            Ok(Some(_)) => valid_until = asked + terms.ttl - terms.clock_skew,
                            // Another holds it: lost now.
                            Ok(None) => break,
                            // Unreachable: the lease stands until this side's view of its expiry.
                            Err(_) if Instant::now() + terms.ttl / 4 < valid_until => {}
                            Err(_) => break,
                        }
                    }
                    if !stop.load(Ordering::Acquire) {
                        lost.store(true, Ordering::Release);
                        on_lost();
                    }
                })
                .map_err(|e| MigrationError::Protocol(format!("spawning the lease keeper: {e}")))?
        };
        Ok(LeaseKeeper { terms: terms.clone(), stop, lost, epoch: lease.epoch, thread: Some(thread) })
    }

    /// Whether the lease was lost (the guest must not run on this side).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The epoch of this holding: a fencing token.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Stops renewing and gives the lease up (call once the guest no longer runs here).
    pub fn hand_over(mut self) -> Result<()> {
        self.stop_renewing();
        self.terms.arbiter.release(&self.terms.holder)
    }

    fn stop_renewing(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_renewing();
            let _ = self.terms.arbiter.release(&self.terms.holder);
        }
    }
}

/// Whether `holder` can name a lease holder: 1-256 bytes, no spaces or newlines.
pub fn check_holder(holder: &str) -> Result<()> {
    if holder.is_empty() || holder.len() > 256 || holder.contains(['\n', ' ']) {
        return Err(MigrationError::Protocol(format!(
            "a lease holder name must be 1-256 bytes, no spaces: {holder:?}"
        )));
    }
    Ok(())
}

fn io(e: std::io::Error) -> MigrationError {
    MigrationError::Transport(ferry_transport::TransportError::Io(e))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `ferry-lease 1 HOLDER EPOCH EXPIRES_MS`, one line.
fn encode(l: &Lease) -> String {
    format!("ferry-lease 1 {} {} {}\n", if l.holder.is_empty() { "-" } else { &l.holder }, l.epoch, l.expires_ms)
}

fn read_lease(file: &File) -> Result<Option<Lease>> {
    let mut file = file;
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.take(4096).read_to_string(&mut text).map_err(io)?;
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || MigrationError::Protocol(format!("the lease file holds {text:?}, not a lease"));
    let f: Vec<&str> = text.split_whitespace().collect();
    match f.as_slice() {
        ["ferry-lease", "1", holder, epoch, expires] => Ok(Some(Lease {
            holder: if *holder == "-" { String::new() } else { (*holder).into() },
            epoch: epoch.parse().map_err(|_| bad())?,
            expires_ms: expires.parse().map_err(|_| bad())?,
        })),
        _ => Err(bad()),
    }
}

/// An open-file-description write lock on a whole file, released when dropped (or when the file
/// is closed). Unlike POSIX record locks it belongs to this open file, not to the process, so
/// two threads of one process contend like two hosts.
struct OfdLock<'f>(&'f File);

impl<'f> OfdLock<'f> {
    fn acquire(file: &'f File, timeout: Duration) -> Result<Self> {
        let started = Instant::now();
        loop {
            match ofd_setlk(file, libc::F_WRLCK as i16) {
                Ok(()) => return Ok(OfdLock(file)),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
                        && started.elapsed() < timeout =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(io(e)),
            }
        }
    }
}

impl Drop for OfdLock<'_> {
    fn drop(&mut self) {
        let _ = ofd_setlk(self.0, libc::F_UNLCK as i16);
    }
}

fn ofd_setlk(file: &File, kind: i16) -> std::io::Result<()> {
    // SAFETY: flock is plain data; zeroed is a valid value for every field.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as i16;
    // SAFETY: F_OFD_SETLK reads the flock we pass, which lives across the call; the fd is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-arbiter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn one_holder_at_a_time_expiry_hands_over_and_epochs_rise() {
        let path = lease_path("basic");
        let a = LeaseFile::new(&path, Duration::ZERO);
        let b = LeaseFile::new(&path, Duration::ZERO);
        let la = a.acquire("source", Duration::from_secs(60)).unwrap().expect("free: source takes it");
        assert!(b.acquire("destination", Duration::from_secs(60)).unwrap().is_none(), "held by source");
        assert!(b.renew("destination", Duration::from_secs(60)).unwrap().is_none(), "not destination's to renew");
        assert_eq!(a.renew("source", Duration::from_secs(60)).unwrap().unwrap().epoch, la.epoch);
        a.release("source").unwrap();
        assert!(a.current().unwrap().is_none());
        let lb = b.acquire("destination", Duration::from_millis(50)).unwrap().expect("released: destination takes it");
        assert!(lb.epoch > la.epoch, "every acquisition raises the epoch");
        std::thread::sleep(Duration::from_millis(80));
        let la2 = a.acquire("source", Duration::from_secs(60)).unwrap().expect("expired: source takes it back");
        assert!(la2.epoch > lb.epoch);
        assert!(b.renew("destination", Duration::from_secs(60)).unwrap().is_none(), "lost: the destination must stop");
    }

    #[test]
    fn clock_skew_delays_a_takeover_and_shortens_a_holders_view() {
        let path = lease_path("skew");
        let a = LeaseFile::new(&path, Duration::from_millis(300));
        a.acquire("source", Duration::from_millis(100)).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        // Expired by this clock, but maybe not by the holder's: not yet.
        assert!(a.acquire("destination", Duration::from_secs(1)).unwrap().is_none());
        // And the holder no longer counts on it.
        assert!(a.renew("source", Duration::from_secs(1)).unwrap().is_none());
    }

    #[test]
    fn contenders_racing_for_a_free_lease_produce_exactly_one_winner_each_round() {
        let path = lease_path("race");
        for round in 0..50 {
            let _ = std::fs::remove_file(&path);
            let winners: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|i| {
                        let path = &path;
                        s.spawn(move || {
                            let arbiter = LeaseFile::new(path, Duration::ZERO);
                            arbiter.acquire(&format!("host-{i}"), Duration::from_secs(60)).unwrap().is_some()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(winners.iter().filter(|&&w| w).count(), 1, "round {round}: {winners:?}");
        }
    }

    #[test]
    fn a_corrupt_lease_file_is_an_error_not_a_free_lease() {
        let path = lease_path("corrupt");
        std::fs::write(&path, "not a lease at all").unwrap();
        let a = LeaseFile::new(&path, Duration::ZERO);
        assert!(a.acquire("source", Duration::from_secs(1)).is_err());
        assert!(a.acquire("bad name", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_keeper_renews_past_its_ttl_hands_over_and_reports_a_stolen_lease() {
        let path = lease_path("keeper");
        let terms = |holder: &str| LeaseTerms {
            arbiter: Arc::new(LeaseFile::new(&path, Duration::ZERO)),
            holder: holder.into(),
            ttl: Duration::from_millis(400),
            clock_skew: Duration::ZERO,
        };
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let keeper = LeaseKeeper::acquire(&terms("destination"), Duration::ZERO, move || {
            flag.store(true, Ordering::Release);
        })
        .unwrap();
        // Three times its ttl later, still held: the keeper renewed it.
        std::thread::sleep(Duration::from_millis(1200));
        let err = LeaseKeeper::acquire(&terms("source"), Duration::from_millis(100), || {}).unwrap_err();
        assert!(matches!(err, MigrationError::LeaseHeld(ref h) if h == "destination"), "{err:?}");
        keeper.hand_over().unwrap();
        let source = LeaseKeeper::acquire(&terms("source"), Duration::ZERO, || {}).expect("handed over: free");
        assert!(!lost.load(Ordering::Acquire));

        // Stolen: an operator rewrites the lease file for another holder.
        let flag = lost.clone();
        drop(source);
        let keeper = LeaseKeeper::acquire(&terms("destination"), Duration::ZERO, move || {
            flag.store(true, Ordering::Release);
        })
        .unwrap();
        std::fs::write(&path, format!("ferry-lease 1 intruder 99 {}\n", now_ms() + 60_000)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !keeper.lost() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(keeper.lost() && lost.load(Ordering::Acquire), "the keeper noticed and called on_lost");
    }
}
