//! Destination guest memory under userfaultfd: registration, fault addresses to pages, and
//! installing claimed pages.
//!
//! Anonymous memory is registered MISSING and filled with UFFDIO_COPY / UFFDIO_ZEROPAGE from a
//! staging buffer. Memfd and hugetlbfs memory is registered MISSING and MINOR and has an alias
//! mapping of the same file: data is received straight into the alias (page cache), then mapped
//! into the guest with UFFDIO_CONTINUE, so no page is copied on the host.
//!
//! Zero pages (the source's zero pages and free pages) are not installed at all: they are marked
//! present and their waiters woken. A fault on one before [`DestinationMemory::release`] is
//! resolved with a zero page by [`DestinationMemory::resolve_present`]; after it, the kernel
//! serves it as for any untouched memory. On this machine kind a fresh page costs more than a
//! copy (see shared/notes), so most such pages, which the guest never touches, cost nothing.

use ferry_transport::{BulkTarget, GuestMemory, HostAddr, MappedRange, PageIndex, RegionMapping, ZeroMask};

use crate::error::{FaultError, Result};
use crate::state::{Claim, PageStates};
use crate::stats::FaultStats;
use crate::uffd::{self, Event, Outcome, Userfault};

/// How pages get into the guest mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallMode {
    /// Anonymous memory: UFFDIO_COPY from a buffer.
    Copy,
    /// Memfd or hugetlbfs memory: fill the alias mapping, then UFFDIO_CONTINUE.
    Continue,
}

/// A destination guest's memory, registered with its own userfaultfd, and the state of its pages.
#[derive(Debug)]
pub struct DestinationMemory {
    guest: std::sync::Arc<GuestMemory>,
    alias: Option<Vec<RegionMapping>>,
    /// Closed on drop only once every page is present or memory was released (see Drop).
    uffd: std::mem::ManuallyDrop<Userfault>,
    released: std::sync::atomic::AtomicBool,
    releasing: std::sync::Mutex<()>,
    /// Set as unregistering begins: an ioctl failing from then on met a range already released.
    unregistering: std::sync::atomic::AtomicBool,
    /// Set once a guest may run on this memory (see [`Self::begin_use`]).
    in_use: std::sync::atomic::AtomicBool,
    states: PageStates,
    page_size: u64,
    /// A zero page to copy from where UFFDIO_ZEROPAGE does not exist (hugetlb in copy mode).
    zero_page: Option<Vec<u8>>,
    /// Installs hold it shared from their check of discarded pages through their ioctl; reading
    /// events and marking what a remove discarded holds it exclusively. Reading a remove event
    /// lets the kernel go on to drop the range; without this an install that checked before the
    /// mark could land after the drop and leave stale data in a page the guest discarded.
    events: std::sync::RwLock<()>,
    /// Where remove events are written as they are read, for a handler that takes over.
    remove_journal: std::sync::Mutex<Option<std::fs::File>>,
}

impl DestinationMemory {
    /// Registers every region of `guest`, which must not have been touched yet (touched pages are
    /// present and never fault). All regions must share one backing: all anonymous or all memfd.
    pub fn register(guest: GuestMemory) -> Result<Self> {
        Self::register_with_valid(std::sync::Arc::new(guest), |_| false)
    }

    /// Registers memory that already holds some valid pages (a hybrid migration's pre-copied
    /// pages): `valid(page)` says which; those are present from the start and never fetched. Every
    /// other page must be absent (never touched, or dropped with [`RegionMapping::discard`]).
    pub fn register_with_valid(guest: std::sync::Arc<GuestMemory>, valid: impl Fn(PageIndex) -> bool) -> Result<Self> {
        if guest.regions().iter().any(|r| r.is_foreign()) {
            return Err(FaultError::InvalidMemory("registering another process's memory here (see adopt)".into()));
        }
        let page_size = u64::from(guest.layout().page_size());
        let with_fd = guest.regions().iter().filter(|r| r.fd().is_some()).count();
        let mode = match with_fd {
            0 => InstallMode::Copy,
            n if n == guest.regions().len() => InstallMode::Continue,
            _ => return Err(FaultError::InvalidMemory("regions mix anonymous and memfd backings".into())),
        };
        let hugetlb = page_size > 4096;
        let features = uffd::FEATURE_EVENT_REMOVE
            | match (mode, hugetlb) {
                (InstallMode::Copy, _) => 0,
                (InstallMode::Continue, false) => uffd::FEATURE_MISSING_SHMEM | uffd::FEATURE_MINOR_SHMEM,
                (InstallMode::Continue, true) => uffd::FEATURE_MISSING_HUGETLBFS | uffd::FEATURE_MINOR_HUGETLBFS,
            };
        let uffd = Userfault::open(features)?;
        let modes = match mode {
            InstallMode::Copy => uffd::MODE_MISSING,
            InstallMode::Continue => uffd::MODE_MISSING | uffd::MODE_MINOR,
        };
        for r in guest.regions() {
            // SAFETY: GuestMemory never exposes its regions as Rust references (every access is a
            // raw copy), and `guest` lives inside the returned value with the userfaultfd, so the
            // range stays mapped while the kernel may write it.
            unsafe { uffd.register(HostAddr::of(r.host_addr().as_ptr()), r.len() as u64, modes)? };
        }
        let alias = match mode {
            InstallMode::Copy => None,
            InstallMode::Continue => {
                Some(guest.regions().iter().map(RegionMapping::alias).collect::<Result<Vec<_>, _>>()?)
            }
        };
        let states = PageStates::new(guest.layout());
        states.mark_valid(valid);
        Ok(DestinationMemory {
            guest,
            alias,
            uffd: std::mem::ManuallyDrop::new(uffd),
            released: std::sync::atomic::AtomicBool::new(false),
            releasing: std::sync::Mutex::new(()),
            unregistering: std::sync::atomic::AtomicBool::new(false),
            in_use: std::sync::atomic::AtomicBool::new(false),
            states,
            page_size,
            zero_page: None,
            events: std::sync::RwLock::new(()),
            remove_journal: std::sync::Mutex::new(None),
        })
    }

    /// Takes over guest memory that another process registered with `uffd` (MISSING mode), as
    /// Firecracker's UFFD protocol hands it over: every region of `guest` must be
    /// [`ferry_transport::RegionMapping::foreign`], filled by UFFDIO_COPY through `uffd`.
    ///
    /// # Safety
    /// `uffd` must be the userfaultfd of the process whose address space `guest`'s regions
    /// describe, with exactly those ranges registered, and they must stay mapped there while this
    /// value lives (the process may exit: its ranges go with it).
    pub unsafe fn adopt(uffd: Userfault, guest: std::sync::Arc<GuestMemory>) -> Result<Self> {
        if guest.regions().iter().any(|r| !r.is_foreign()) {
            return Err(FaultError::InvalidMemory("adopting a userfaultfd for memory of this process".into()));
        }
        let page_size = u64::from(guest.layout().page_size());
        let states = PageStates::new(guest.layout());
        // A handler that died may have read faults it never served: their threads still sleep.
        // Wake every waiter so each faults again, into this handler's queue.
        for r in guest.regions() {
            uffd.wake(HostAddr::of(r.host_addr().as_ptr()), r.len() as u64)?;
        }
        Ok(DestinationMemory {
            guest,
            alias: None,
            uffd: std::mem::ManuallyDrop::new(uffd),
            released: std::sync::atomic::AtomicBool::new(false),
            releasing: std::sync::Mutex::new(()),
            unregistering: std::sync::atomic::AtomicBool::new(false),
            in_use: std::sync::atomic::AtomicBool::new(true),
            states,
            page_size,
            zero_page: (page_size > 4096).then(|| vec![0u8; page_size as usize]),
            events: std::sync::RwLock::new(()),
            remove_journal: std::sync::Mutex::new(None),
        })
    }

    /// How pages are installed: `UFFDIO_CONTINUE` through an alias, or `UFFDIO_COPY`.
    pub fn mode(&self) -> InstallMode {
        if self.alias.is_some() {
            InstallMode::Continue
        } else {
            InstallMode::Copy
        }
    }

    /// The guest memory, shared: once every page is present it can serve as any migration's
    /// source (a VM that arrived by post-copy moving on).
    pub fn shared_guest(&self) -> &std::sync::Arc<GuestMemory> {
        &self.guest
    }

    /// The guest memory.
    pub fn guest(&self) -> &GuestMemory {
        &self.guest
    }

    /// Every page's state.
    pub fn states(&self) -> &PageStates {
        &self.states
    }

    /// Bytes per page.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Global page index of a faulting address, or `None` outside guest memory.
    pub fn page_of(&self, addr: HostAddr) -> Option<PageIndex> {
        self.guest.regions().iter().enumerate().find_map(|(i, r)| {
            let offset = addr.offset_from(HostAddr::of(r.host_addr().as_ptr()))?;
            (offset < r.len() as u64).then(|| self.states.global(i as u32, offset / self.page_size))
        })
    }

    /// Region, host address, offset in region and byte length of a claim in the guest mapping.
    fn span(&self, claim: &Claim) -> (u32, u64, u64, usize) {
        assert!(claim.issued_by(&self.states), "a claim from another destination's page states");
        let run = self.states.to_run(claim);
        let region = &self.guest.regions()[run.region as usize];
        let offset = run.first_page * self.page_size;
        (
            run.region,
            region.host_addr().as_ptr() as u64 + offset,
            offset,
            claim.count() as usize * self.page_size as usize,
        )
    }

    /// Receives a claim's bytes straight into the alias mapping with `fill`, then maps them into
    /// the guest. Only in [`InstallMode::Continue`]; returns `Ok(false)` in copy mode.
    pub fn fill_in_place(
        &self,
        claim: &Claim,
        stats: &FaultStats,
        fill: impl FnOnce(&mut [u8]) -> ferry_transport::Result<ZeroMask>,
    ) -> Result<bool> {
        let Some(alias) = &self.alias else { return Ok(false) };
        let (region, _, offset, len) = self.span(claim);
        // SAFETY: `claim` came from this memory's PageStates, which hands out each page in exactly
        // one claim; until the CONTINUE below maps them, the guest cannot reach these pages (a
        // vCPU touching them blocks in a fault), so this view is the only access to the bytes.
        let dst = unsafe { alias[region as usize].slice_mut(offset, len)? };
        let zero = fill(dst)?;
        FaultStats::add(&stats.zero_pages, u64::from(zero.count()));
        let _installing = self.installing();
        self.map_claim(claim)?;
        Ok(true)
    }

    /// In [`InstallMode::Continue`], the alias mappings that reads land in, for a lane to register
    /// with its device (`register_landing`); empty in copy mode. They stay mapped as long as `self`.
    pub fn landing_ranges(&self) -> Vec<(std::ptr::NonNull<u8>, usize)> {
        self.alias.iter().flatten().map(|a| (a.host_addr(), a.len())).collect()
    }

    /// In [`InstallMode::Continue`], the claim's range of the alias mapping as a bulk-read target,
    /// so the read lands in the guest's page cache directly; finish with [`Self::map_filled`].
    pub fn mapped_target(&self, claim: &Claim) -> Option<BulkTarget> {
        let alias = self.alias.as_ref()?;
        let (region, _, offset, len) = self.span(claim);
        let ptr = alias[region as usize].raw_range_mut(offset, len).ok()?;
        // Not populated: the lane writes only the pages that hold data (zero pages stay holes),
        // and each data page is allocated as the receive first writes it.
        // SAFETY: the claim is this memory's, and PageStates hands each page to one claim only; the
        // guest cannot reach the pages before map_filled's CONTINUE (a vCPU touching them blocks in
        // a fault), and the alias mapping lives as long as `self`, which outlives the session's
        // reads (the pre-pager holds an Arc of it until its lane is drained).
        Some(BulkTarget::Mapped(unsafe { MappedRange::new(ptr, len) }))
    }

    /// Maps a claim whose bytes a bulk read put in place through [`Self::mapped_target`]: its
    /// data pages; its zero pages stay holes (see the module doc).
    pub fn map_filled(&self, claim: &Claim, zero: &ZeroMask, stats: &FaultStats) -> Result<()> {
        let _installing = self.installing();
        FaultStats::add(&stats.zero_pages, u64::from(zero.count()));
        if self.discarded_in(claim) {
            // Page by page: discarded pages are dropped again, zero pages stay holes.
            for (i, page) in claim.pages().enumerate() {
                let one = self.states.present_page(page);
                if self.states.is_present(page) && !self.states.is_discarded(page) {
                    // Mapped by an earlier attempt that met a changing mapping.
                    continue;
                }
                if zero.is_zero(i as u32) && !self.states.is_discarded(page) {
                    self.present_with_holes(&one, 1)?;
                } else {
                    self.map_claim(&one)?;
                }
            }
            return Ok(());
        }
        let (_, addr, _, _) = self.span(claim);
        let ps = self.page_size;
        let mut result = Ok(());
        zero.for_each_data_run(claim.count(), |first, count| {
            if result.is_ok() {
                let (a, l) = (addr + u64::from(first) * ps, count as usize * ps as usize);
                result = self.retrying("UFFDIO_CONTINUE", a, l, |a, l| self.uffd.continue_range(HostAddr(a), l, true));
            }
        });
        result?;
        self.present_with_holes(claim, zero.count())
    }

    /// Marks an installed claim present; if `holes` of its pages were left uninstalled, wakes
    /// whoever faulted on them (they fault again and find the page present).
    fn present_with_holes(&self, claim: &Claim, holes: u32) -> Result<()> {
        self.states.mark_present(claim);
        if holes > 0 && !self.is_released() {
            let (_, addr, _, len) = self.span(claim);
            self.uffd.wake(HostAddr(addr), len as u64)?;
        }
        Ok(())
    }

    /// Whether [`Self::release`] has succeeded: the kernel handles every fault from then on.
    pub fn is_released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Installs a claim whose bytes are in `data` (pages marked in `zero` are zero).
    pub fn install(&self, claim: &Claim, data: &[u8], zero: &ZeroMask, stats: &FaultStats) -> Result<()> {
        let _installing = self.installing();
        self.install_locked(claim, data, zero, stats)
    }

    fn install_locked(&self, claim: &Claim, data: &[u8], zero: &ZeroMask, stats: &FaultStats) -> Result<()> {
        if self.discarded_in(claim) {
            // The guest discarded some of these pages while the read was in flight: they must
            // stay zero, so install the others one by one (skipping those an attempt that met a
            // changing mapping already installed: the claim is ours, so only we marked them).
            let ps = self.page_size as usize;
            for (i, page) in claim.pages().enumerate() {
                if !self.states.is_discarded(page) && !self.states.is_present(page) {
                    let mut one_zero = ZeroMask::default();
                    if zero.is_zero(i as u32) {
                        one_zero.set(0);
                    }
                    self.install_locked(
                        &self.states.present_page(page),
                        &data[i * ps..(i + 1) * ps],
                        &one_zero,
                        stats,
                    )?;
                }
            }
            return Ok(());
        }
        let (region, addr, offset, len) = self.span(claim);
        let data = &data[..len];
        FaultStats::add(&stats.zero_pages, u64::from(zero.count()));
        let ps = self.page_size as usize;
        let mut result = Ok(());
        // Only the pages that hold data; zero pages are left absent (see the module doc).
        zero.for_each_data_run(claim.count(), |first, count| {
            if result.is_err() {
                return;
            }
            let (start, n) = (first as usize * ps, count as usize * ps);
            let (at, bytes) = (addr + start as u64, &data[start..start + n]);
            result = match &self.alias {
                Some(alias) => alias[region as usize]
                    .write(offset + start as u64, bytes)
                    .map_err(FaultError::from)
                    .and_then(|()| {
                        self.retrying("UFFDIO_CONTINUE", at, n, |a, l| self.uffd.continue_range(HostAddr(a), l, true))
                    }),
                None => self.retrying("UFFDIO_COPY", at, n, |a, l| {
                    let from = (a - at) as usize;
                    self.uffd.copy(HostAddr(a), &bytes[from..from + l as usize], true)
                }),
            };
        });
        result?;
        self.present_with_holes(claim, zero.count())
    }

    /// Settles a claim of zero pages (free pages): present, nothing installed (see the module doc).
    pub fn install_zero(&self, claim: &Claim) -> Result<()> {
        self.present_with_holes(claim, claim.count())
    }

    /// Whether the guest discarded any page of `claim` (UFFD_EVENT_REMOVE) after it was claimed.
    fn discarded_in(&self, claim: &Claim) -> bool {
        claim.pages().any(|p| self.states.is_discarded(p))
    }

    fn map_claim(&self, claim: &Claim) -> Result<()> {
        if let (true, Some(alias)) = (self.discarded_in(claim), &self.alias) {
            // The data already landed in the page cache: drop it again for the discarded pages,
            // map the others one by one.
            for page in claim.pages() {
                let one = self.states.present_page(page);
                if self.states.is_discarded(page) {
                    let (region, _, offset, len) = self.span(&one);
                    alias[region as usize].punch_hole(offset, len)?;
                } else if !self.states.is_present(page) {
                    // (Present already: mapped by an earlier attempt that met a changing mapping.)
                    self.map_claim(&one)?;
                }
            }
            return Ok(());
        }
        let (_, addr, _, len) = self.span(claim);
        self.retrying("UFFDIO_CONTINUE", addr, len, |a, l| self.uffd.continue_range(HostAddr(a), l, true))?;
        self.states.mark_present(claim);
        Ok(())
    }

    /// Runs an install ioctl over `addr..addr+len`: on EAGAIN retries the rest, on EEXIST skips the
    /// page that exists (a racing install or a page the guest re-populated) and goes on.
    fn retrying(
        &self,
        _what: &'static str,
        addr: u64,
        len: usize,
        mut op: impl FnMut(u64, u64) -> Outcome,
    ) -> Result<()> {
        let end = addr + len as u64;
        let mut at = addr;
        let mut again = 0;
        while at < end {
            match op(at, end - at) {
                Outcome::Done => return Ok(()),
                Outcome::Exists(done) => at += done + self.page_size,
                Outcome::Again(done) => {
                    at += done;
                    again += 1;
                    if again > 100 {
                        return Err(FaultError::Busy { addr: HostAddr(at) });
                    }
                    std::thread::yield_now();
                }
                Outcome::Failed(errno) => return Err(FaultError::Install { addr: HostAddr(at), errno }),
            }
        }
        Ok(())
    }

    /// Resolves a fault on a page this side already considers present (installed meanwhile, or
    /// discarded by the guest): map what the page cache has (MINOR), else a zero page; a page that
    /// exists already only needs its waiters woken.
    pub fn resolve_present(&self, page: PageIndex, minor: bool) -> Result<()> {
        let _installing = self.installing();
        let claim = self.states.present_page(page);
        let (region, addr, offset, len) = self.span(&claim);
        let outcome = match (&self.alias, minor) {
            (Some(_), true) => self.uffd.continue_range(HostAddr(addr), len as u64, true),
            // A hole of the file (a zero page left absent): allocate it, then map it. Works on
            // hugetlbfs too, which has no UFFDIO_ZEROPAGE.
            (Some(alias), false) => {
                alias[region as usize].allocate_zeroed(offset, len)?;
                self.uffd.continue_range(HostAddr(addr), len as u64, true)
            }
            (None, _) => match &self.zero_page {
                Some(zeros) => self.uffd.copy(HostAddr(addr), &zeros[..len], true),
                None => self.uffd.zeropage(HostAddr(addr), len as u64, true),
            },
        };
        match outcome {
            Outcome::Done => Ok(()),
            // Released meanwhile: unregistering woke the thread, and the kernel serves it now.
            _ if self.unregistering.load(std::sync::atomic::Ordering::Acquire) => Ok(()),
            Outcome::Exists(_) | Outcome::Again(_) => Ok(self.uffd.wake(HostAddr(addr), len as u64)?),
            Outcome::Failed(errno) => Err(FaultError::Install { addr: HostAddr(addr), errno }),
        }
    }

    /// Marks that a guest is about to run on this memory: from now on, dropping it with pages
    /// missing keeps the userfaultfd open (see Drop). Before, nothing can be blocked on it.
    pub fn begin_use(&self) {
        self.in_use.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Unregisters guest memory once every page is present: from then on the kernel handles the
    /// guest's faults itself (a zero page left absent, or a page discarded and touched again, is
    /// simply a zero page), and any thread still waiting on a fault is woken. Fails, changing
    /// nothing, while a page is missing: the kernel would fill it with zeros. Calling it again is
    /// a no-op; the engine calls it as soon as the last page is in.
    pub fn release(&self) -> Result<()> {
        let missing = self.states.pages() - self.states.present_count();
        if missing > 0 {
            return Err(FaultError::InvalidMemory(format!("releasing userfaultfd with {missing} pages missing")));
        }
        // One caller unregisters; the others wait for it, and only success counts as released
        // (the fault thread serves faults until then: zero pages left absent still fault).
        let _releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_released() {
            return Ok(());
        }
        self.unregistering.store(true, std::sync::atomic::Ordering::Release);
        for r in self.guest.regions() {
            let (start, len) = (HostAddr::of(r.host_addr().as_ptr()), r.len() as u64);
            // SAFETY: every page is present (checked above, under the release lock; pages only
            // ever become present), so the kernel has nothing left to fill with zeros.
            unsafe { self.uffd.unregister(start, len)? };
            // Unregistering wakes every waiter already; waking again costs one ioctl and covers a
            // thread seen asleep in handle_userfault after UFFDIO_UNREGISTER under load (the
            // README's open bug; a signal frees it).
            self.uffd.wake(start, len)?;
        }
        self.released.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Waits up to `timeout_ms` for userfaultfd events and reads them. The pages of a remove
    /// event are marked discarded before any install can run again (see `events`); the event is
    /// still returned. `discarded` counts those pages not claimed before.
    pub fn read_events(&self, out: &mut [Event], timeout_ms: i32, discarded: &mut u64) -> Result<usize> {
        if !self.uffd.wait_readable(timeout_ms)? {
            return Ok(0);
        }
        let _reading = self.events.write().unwrap_or_else(|e| e.into_inner());
        let n = self.uffd.read_ready(out)?;
        for event in &out[..n] {
            if let Event::Remove { start, end } = *event {
                self.journal_remove(start, end)?;
                if let Some((first, count)) = self.removed_pages(start, end) {
                    *discarded += self.states.discard(first, count);
                }
            }
        }
        Ok(n)
    }

    /// Keeps every remove this memory reads in `path` (appended, 16 bytes each), after first
    /// applying the removes already there: a handler that takes over from one that died must not
    /// fill a page the guest had discarded. Returns how many removes were replayed. Call it before
    /// any install.
    pub fn journal_removes(&self, path: &std::path::Path) -> Result<u64> {
        let old = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut replayed = 0;
        for rec in old.chunks_exact(16) {
            let start = HostAddr(u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")));
            let end = HostAddr(u64::from_le_bytes(rec[8..].try_into().expect("8 bytes")));
            if let Some((first, count)) = self.removed_pages(start, end) {
                self.states.discard(first, count);
            }
            replayed += 1;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        *self.remove_journal.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        Ok(replayed)
    }

    fn journal_remove(&self, start: HostAddr, end: HostAddr) -> Result<()> {
        use std::io::Write;
        if let Some(file) = self.remove_journal.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let mut rec = [0u8; 16];
            rec[..8].copy_from_slice(&start.0.to_le_bytes());
            rec[8..].copy_from_slice(&end.0.to_le_bytes());
            // In the page cache is enough: it is read back by the next handler, not after a crash
            // of the machine (which takes the guest too).
            file.write_all(&rec)?;
        }
        Ok(())
    }

    /// Held while an install checks for discarded pages and runs its ioctls.
    fn installing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.events.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Global pages covered by a removed host range, clipped to guest memory.
    pub fn removed_pages(&self, start: HostAddr, end: HostAddr) -> Option<(PageIndex, u64)> {
        self.guest.regions().iter().enumerate().find_map(|(i, r)| {
            let base = r.host_addr().as_ptr() as u64;
            let (s, e) = (start.0.max(base), end.0.min(base + r.len() as u64));
            (s < e).then(|| {
                let first = (s - base).div_ceil(self.page_size);
                let last = (e - base) / self.page_size;
                (self.states.global(i as u32, first), last.saturating_sub(first))
            })
        })
    }
}

impl Drop for DestinationMemory {
    fn drop(&mut self) {
        let in_use = self.in_use.load(std::sync::atomic::Ordering::Acquire);
        if !in_use || self.released.load(std::sync::atomic::Ordering::Acquire) || self.states.all_present() {
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.uffd) };
        }
        // Otherwise pages are missing: closing the userfaultfd would let the kernel serve every
        // blocked and future fault with a zero page, a silently corrupted guest. The fd is leaked
        // instead, so such threads stay blocked (and fault for good once the memory is unmapped).
    }
}
