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
//! Expiry is wall-clock time, compared across hosts: a holder treats its lease as lost
//! `clock_skew` before it expires, and a contender takes an expired lease only `clock_skew` after
//! it expired, so hosts whose clocks differ by less than that never overlap.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{MigrationError, Result};

/// Who holds the lease, in which epoch, and until when (milliseconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: u64,
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

fn check_holder(holder: &str) -> Result<()> {
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
}
