//! Guest memory as the transport sees it: one host mapping per region of a [`MemoryLayout`].
//!
//! This module is one of the crate's raw-memory places. A mapping is either created here
//! (anonymous, memfd, hugetlbfs memfd; unmapped on drop) or adopted from a VMM through the
//! `unsafe` [`RegionMapping::from_raw`]. Guest memory may change under us while a guest runs, so it
//! is never exposed as a Rust slice: bytes leave and enter it only through copies made here.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::addr::HostAddr;
use crate::error::{Result, TransportError};
use crate::layout::{MemoryLayout, PageRun};

/// How a region's memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (userfaultfd MISSING mode at a destination).
    Anonymous,
    /// A sealed memfd, shareable with another process (local transport, MINOR mode).
    Memfd,
    /// A sealed memfd on 2 MiB hugetlbfs pages.
    HugetlbMemfd,
}

/// One region's host mapping.
#[derive(Debug)]
pub struct RegionMapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
    /// Whether dropping this value unmaps the memory (false for adopted mappings).
    owns_mapping: bool,
    writable: bool,
    /// An address range of another process (see [`RegionMapping::foreign`]): never accessed here.
    foreign: bool,
    /// What keeps an adopted mapping alive (a vm-memory region), held as long as this value.
    #[allow(dead_code)]
    owner: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: a RegionMapping is a pointer to process-wide shared memory; every access goes through
// volatile copies in this module (`volatile_copy`), which tolerate concurrent writers, so sharing
// between threads is sound.
unsafe impl Send for RegionMapping {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for RegionMapping {}

impl RegionMapping {
    /// Maps `len` bytes of fresh memory with the given backing, read-write.
    pub fn create(len: usize, backing: Backing) -> Result<Self> {
        match backing {
            Backing::Anonymous => {
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
                let ptr = mmap(len, libc::PROT_READ | libc::PROT_WRITE, flags, None)?;
                Ok(RegionMapping {
                    ptr,
                    len,
                    fd: None,
                    owns_mapping: true,
                    writable: true,
                    foreign: false,
                    owner: None,
                })
            }
            Backing::Memfd | Backing::HugetlbMemfd => {
                let hugetlb = backing == Backing::HugetlbMemfd;
                let fd = memfd_create(len, hugetlb)?;
                let ptr = mmap(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd.as_fd()))?;
                Ok(RegionMapping {
                    ptr,
                    len,
                    fd: Some(fd),
                    owns_mapping: true,
                    writable: true,
                    foreign: false,
                    owner: None,
                })
            }
        }
    }

    /// Maps a peer's memfd read-only, after checking that it is at least `len` bytes and sealed
    /// against shrinking: a peer that could shrink it could make our reads fault with SIGBUS.
    pub fn map_shared_readonly(fd: OwnedFd, len: usize) -> Result<Self> {
        let size = fd_size(fd.as_fd())?;
        if size < len as u64 {
            return Err(TransportError::BadSharedMemory(format!("memfd of {size} bytes for a region of {len}")));
        }
        // SAFETY: fcntl on a valid owned fd; F_GET_SEALS takes no argument and only reads state.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(TransportError::BadSharedMemory(format!(
                "not a sealable memfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(TransportError::BadSharedMemory("memfd is not sealed against shrinking".into()));
        }
        let ptr = mmap(len, libc::PROT_READ, libc::MAP_SHARED, Some(fd.as_fd()))?;
        Ok(RegionMapping { ptr, len, fd: Some(fd), owns_mapping: true, writable: false, foreign: false, owner: None })
    }

    /// Maps this region's backing file a second time, read-write and shared: the alias through
    /// which a post-copy destination fills pages that userfaultfd then maps into the guest
    /// mapping with UFFDIO_CONTINUE, without a host copy.
    pub fn alias(&self) -> Result<Self> {
        let fd = self.fd().ok_or_else(|| TransportError::BadSharedMemory("anonymous memory has no alias".into()))?;
        let fd = fd.try_clone_to_owned()?;
        let ptr = mmap(self.len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd.as_fd()))?;
        Ok(RegionMapping {
            ptr,
            len: self.len,
            fd: Some(fd),
            owns_mapping: true,
            writable: true,
            foreign: false,
            owner: None,
        })
    }

    /// A mutable view of `len` bytes at `offset`, for receiving data straight into the mapping.
    ///
    /// # Safety
    /// For the lifetime of the returned slice nothing else may read or write these bytes: no other
    /// thread through this mapping or another mapping of the same memory, and no guest vCPU.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: usize) -> Result<&mut [u8]> {
        if !self.writable {
            return Err(TransportError::OutOfRange("mutable view of a read-only mapping".into()));
        }
        let off = self.check(offset, len)?;
        // SAFETY: in bounds (checked), writable (checked); exclusivity is the caller's promise.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) })
    }

    /// Raw pointer to `offset` for `len` bytes of a writable mapping, for targets handed to
    /// syscalls or lanes under a caller's exclusivity guarantee.
    pub fn raw_range_mut(&self, offset: u64, len: usize) -> Result<NonNull<u8>> {
        if !self.writable {
            return Err(TransportError::OutOfRange("mutable range of a read-only mapping".into()));
        }
        let off = self.check(offset, len)?;
        // SAFETY: off is inside the mapping (checked), so the pointer is in bounds and non-null.
        Ok(unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) })
    }

    /// Drops the pages of `offset..offset+len` (MADV_DONTNEED): anonymous memory reads as zero
    /// afterwards, or faults into a userfaultfd registered later; a file's pages are only unmapped.
    /// For a hybrid migration's destination, whose pre-copied pages went stale.
    pub fn discard(&self, offset: u64, len: usize) -> Result<()> {
        let off = self.check(offset, len)?;
        // SAFETY: an in-bounds range of our own mapping; DONTNEED changes contents only as said
        // above, and guest memory is never referenced by Rust slices.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().add(off).cast(), len, libc::MADV_DONTNEED) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Allocates and maps `offset..offset+len` writable in one call (MADV_POPULATE_WRITE), so data
    /// received there next does not take a page fault per page.
    pub fn populate_write(&self, offset: u64, len: usize) -> Result<()> {
        if !self.writable {
            return Err(TransportError::OutOfRange("populating a read-only mapping".into()));
        }
        let off = self.check(offset, len)?;
        // SAFETY: an in-bounds range of our own writable mapping; populating only allocates and
        // maps pages (existing contents are kept), it writes no data.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().add(off).cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Drops `offset..offset+len` from the backing file (FALLOC_FL_PUNCH_HOLE): reads see zeros.
    pub fn punch_hole(&self, offset: u64, len: usize) -> Result<()> {
        self.check(offset, len)?;
        let fd = self.fd().ok_or_else(|| TransportError::BadSharedMemory("anonymous memory has no file".into()))?;
        // SAFETY: fallocate on a valid fd with in-bounds integer arguments; KEEP_SIZE keeps the
        // file's size, so no mapping of it can fault past its end.
        let rc = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Allocates zeroed backing pages for `offset..offset+len` of the file (memfd backings only),
    /// so MINOR-mode zero pages can be mapped with UFFDIO_CONTINUE without writing them.
    pub fn allocate_zeroed(&self, offset: u64, len: usize) -> Result<()> {
        self.check(offset, len)?;
        let fd = self.fd().ok_or_else(|| TransportError::BadSharedMemory("anonymous memory has no file".into()))?;
        // SAFETY: fallocate on a valid fd with in-bounds integer arguments; mode 0 only allocates
        // (already allocated pages keep their contents).
        if unsafe { libc::fallocate(fd.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Adopts memory a VMM already mapped. `fd` is its backing file, if any.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a single readable mapping (writable too if `writable`) that stays
    /// mapped, and is not remapped, for as long as the returned value lives. If `fd` is given it
    /// must be the file backing exactly that range from offset 0.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, fd: Option<OwnedFd>, writable: bool) -> Self {
        RegionMapping { ptr, len, fd, owns_mapping: false, writable, foreign: false, owner: None }
    }

    /// [`Self::from_raw`], holding `owner` (what keeps the mapping alive) as long as this value.
    ///
    /// # Safety
    /// As [`Self::from_raw`], with "for as long as the returned value lives" guaranteed by
    /// `owner` staying alive.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    pub(crate) unsafe fn adopt_owned(
        ptr: NonNull<u8>,
        len: usize,
        fd: Option<OwnedFd>,
        writable: bool,
        owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        RegionMapping { ptr, len, fd, owns_mapping: false, writable, foreign: false, owner: Some(owner) }
    }

    /// A range of another process's address space, known only by address and length: the guest
    /// memory of a VMM that registered it with a userfaultfd and handed that over (Firecracker's
    /// UFFD protocol), to be filled through ioctls on that userfaultfd. Nothing here reads or
    /// writes it: every accessor fails, only [`Self::host_addr`] and [`Self::len`] answer.
    pub fn foreign(addr: HostAddr, len: usize) -> Result<Self> {
        let ptr = NonNull::new(addr.0 as *mut u8)
            .filter(|_| len > 0 && addr.checked_add(len as u64).is_some())
            .ok_or_else(|| TransportError::InvalidLayout(format!("a foreign range of {len} bytes at {addr:#x}")))?;
        Ok(RegionMapping { ptr, len, fd: None, owns_mapping: false, writable: false, foreign: true, owner: None })
    }

    /// Whether this is another process's range ([`Self::foreign`]).
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }

    /// Bytes in the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the mapping, for VMM registration (KVM memory slots, userfaultfd, RDMA).
    pub fn host_addr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The file behind the mapping (a memfd or a hugetlbfs file), if it has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize> {
        if self.foreign {
            return Err(TransportError::OutOfRange("another process's memory is not accessible here".into()));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(TransportError::OutOfRange(format!("{len} bytes at {offset} in a region of {}", self.len))),
        }
    }

    /// Copies bytes out of the region (volatile reads: a running guest may be writing them).
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let off = self.check(offset, dst.len())?;
        // SAFETY: check() proved off..off+len lies inside the mapping, which lives as long as self;
        // dst is a distinct Rust buffer, so the ranges cannot overlap.
        unsafe { volatile_copy(dst.as_mut_ptr(), self.ptr.as_ptr().add(off), dst.len(), Guest::Src) };
        Ok(())
    }

    /// Copies bytes into the region (volatile writes: a guest may be reading them).
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(TransportError::OutOfRange("write to a read-only mapping".into()));
        }
        let off = self.check(offset, src.len())?;
        // SAFETY: in bounds as above, and the mapping is writable (checked); src is a distinct
        // Rust buffer.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), src.as_ptr(), src.len(), Guest::Dst) };
        Ok(())
    }

    /// Whether `len` bytes at `offset` are all zero. Reads with volatile loads: the guest may be
    /// writing, and the answer only has to be right for a paused guest.
    pub fn is_zero(&self, offset: u64, len: usize) -> Result<bool> {
        let off = self.check(offset, len)?;
        if off % 8 != 0 || len % 64 != 0 {
            return Err(TransportError::OutOfRange("zero check needs 8-byte aligned, 64-byte multiple ranges".into()));
        }
        if self.is_hole(offset, len) {
            // Reading a hole of a memfd through the mapping would allocate a page for it.
            return Ok(true);
        }
        // SAFETY: in bounds (checked) and 8-byte aligned (the mapping is page aligned and off % 8 == 0).
        let base = unsafe { self.ptr.as_ptr().add(off) }.cast::<u64>();
        for line in 0..len / 64 {
            let mut acc = 0u64;
            for w in 0..8 {
                // SAFETY: line * 8 + w < len / 8 words, all inside the checked range.
                acc |= unsafe { base.add(line * 8 + w).read_volatile() };
            }
            if acc != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the file behind this mapping has no data in `offset..offset+len` (false for
    /// anonymous memory, and where the file system cannot tell: hugetlbfs reports all data).
    fn is_hole(&self, offset: u64, len: usize) -> bool {
        let Some(fd) = &self.fd else { return false };
        // SAFETY: lseek on a valid fd with integer arguments; it moves only the file offset,
        // which nothing here uses (every access goes through the mapping).
        let data = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after `offset`.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset + len as u64
    }

    /// Raw pointer to `offset` after a bounds check, for syscalls that read guest memory directly
    /// (writev, io_uring). The pointer is valid for `len` bytes while `self` lives.
    pub(crate) fn raw_range(&self, offset: u64, len: usize) -> Result<*const u8> {
        let off = self.check(offset, len)?;
        // SAFETY: off is inside the mapping (checked).
        Ok(unsafe { self.ptr.as_ptr().add(off) })
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        if self.owns_mapping {
            // SAFETY: we created this mapping with exactly ptr/len and nobody else unmaps it.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// All of a guest's regions, matching a layout one to one.
#[derive(Debug)]
pub struct GuestMemory {
    layout: MemoryLayout,
    regions: Vec<RegionMapping>,
}

impl GuestMemory {
    /// Pairs a layout with its mappings; each mapping must be exactly its region's size.
    pub fn new(layout: MemoryLayout, regions: Vec<RegionMapping>) -> Result<Self> {
        if regions.len() != layout.regions().len() {
            return Err(TransportError::InvalidLayout(format!(
                "{} mappings for {} regions",
                regions.len(),
                layout.regions().len()
            )));
        }
        for (i, (m, r)) in regions.iter().zip(layout.regions()).enumerate() {
            if m.len() as u64 != r.size {
                return Err(TransportError::InvalidLayout(format!(
                    "mapping {i} has {} bytes, region {}",
                    m.len(),
                    r.size
                )));
            }
        }
        Ok(GuestMemory { layout, regions })
    }

    /// Fresh memory for every region of `layout`.
    pub fn create(layout: MemoryLayout, backing: Backing) -> Result<Self> {
        let regions = layout
            .regions()
            .iter()
            .map(|r| RegionMapping::create(r.size as usize, backing))
            .collect::<Result<Vec<_>>>()?;
        Self::new(layout, regions)
    }

    /// The guest's layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Every region's mapping, in layout order.
    pub fn regions(&self) -> &[RegionMapping] {
        &self.regions
    }

    /// The mapping of region `index`, if there is one.
    pub fn region(&self, index: u32) -> Option<&RegionMapping> {
        self.regions.get(index as usize)
    }

    /// Copies a checked run of pages into `dst`.
    pub fn read_run(&self, run: PageRun, dst: &mut [u8]) -> Result<()> {
        self.layout.check_run(run)?;
        let (offset, len) = self.layout.run_bytes(run);
        let got = dst.len();
        let dst = dst.get_mut(..len).ok_or(TransportError::BufferSize { need: len, got })?;
        self.regions[run.region as usize].read(offset, dst)
    }
}

/// Which side of a copy is guest memory: accessed with volatile operations on aligned words.
/// The other side is ferry's own buffer, accessed plainly (and at any alignment).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    Src,
    Dst,
}

/// Copies `len` bytes from `src` to `dst`, the guest side with volatile accesses, 16 bytes at a
/// time once the guest pointer is 16-aligned: guest memory is written by a running guest (another
/// thread, or another process through a shared file) while ferry reads it, which a plain copy
/// would make a data race in Rust's model; rust-vmm's vm-memory copies with volatile accesses for
/// the same reason. Every guest byte is accessed exactly once, nothing is elided or invented; a
/// page the guest writes meanwhile may read as a mix of old and new words, which its dirty log
/// reports (pre-copy sends it again). The non-guest side may have any alignment (a reply staged
/// behind its header). 89-95% of a plain memcpy's rate here (`ferry-bench transport`, local).
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable, and the two must not overlap.
unsafe fn volatile_copy(dst: *mut u8, src: *const u8, len: usize, guest: Guest) {
    let guest_ptr = if guest == Guest::Src { src } else { dst.cast_const() };
    let wide = if has_avx2() { 32 } else { std::mem::align_of::<Wide>() };
    let head = guest_ptr.align_offset(wide).min(len);
    // SAFETY: forwarded contract; the pieces [0, head), [head, head + words), then the rest lie
    // inside both ranges, and after `head` the guest side is aligned for the widest word used.
    unsafe {
        copy_bytes(dst, src, head);
        let mut done = head;
        if wide == 32 {
            done += copy_words_avx2(dst.add(done), src.add(done), len - done, guest);
        }
        done += copy_words::<Wide>(dst.add(done), src.add(done), len - done, guest);
        copy_bytes(dst.add(done), src.add(done), len - done);
    }
}

/// Whether 32-byte (AVX2) volatile accesses are available: 20% faster than 16-byte ones on memory
/// that is not in cache here, as fast as memcpy.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`copy_words`] with 32-byte words.
///
/// # Safety
/// As [`copy_words`], the guest side 32-aligned, and the CPU has AVX2 ([`has_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_words_avx2(dst: *mut u8, src: *const u8, len: usize, guest: Guest) -> usize {
    // SAFETY: forwarded contract.
    unsafe { copy_words::<std::arch::x86_64::__m256i>(dst, src, len, guest) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_words_avx2(_dst: *mut u8, _src: *const u8, _len: usize, _guest: Guest) -> usize {
    0
}

/// Asks for the cache lines `PREFETCH_DISTANCE` past `at..at + len` to be loaded: the hardware's
/// streamer stops at each 4 KiB page, so a run of guest pages read cold restarts it every page;
/// this keeps memory busy across them (16.2 against 14.5 GB/s here reading memory not in cache).
/// A prefetch never faults, whatever the address, and reads nothing Rust can see.
#[inline(always)]
fn prefetch_ahead(at: *const u8, len: usize) {
    const PREFETCH_DISTANCE: usize = 2048;
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(64) {
        // SAFETY: PREFETCHT0 only hints the cache; it has no architectural effect and does not
        // fault on any address (wrapping_add makes no claim that the address is in bounds).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                at.wrapping_add(PREFETCH_DISTANCE + line).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

/// Byte by byte, both sides volatile.
///
/// # Safety
/// As [`volatile_copy`].
unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    for j in 0..len {
        // SAFETY: j < len: inside both ranges.
        unsafe { dst.add(j).write_volatile(src.add(j).read_volatile()) };
    }
}

/// The widest word a volatile access moves in one instruction here (an SSE register on x86_64).
#[cfg(target_arch = "x86_64")]
type Wide = std::arch::x86_64::__m128i;
#[cfg(not(target_arch = "x86_64"))]
type Wide = u64;

/// Copies the whole words of `W` in `len` bytes, four a turn (volatile accesses cannot be merged,
/// but the loop need not wait on each); returns the bytes copied.
///
/// # Safety
/// As [`volatile_copy`], and the guest side aligned for `W`.
#[inline(always)]
unsafe fn copy_words<W: Copy>(dst: *mut u8, src: *const u8, len: usize, guest: Guest) -> usize {
    let words = len / std::mem::size_of::<W>();
    let (d, s) = (dst.cast::<W>(), src.cast::<W>());
    // SAFETY: called with i < words, so word i lies inside both ranges; the guest side is aligned
    // (caller contract), the other is accessed unaligned.
    let load = |i: usize| unsafe {
        match guest {
            Guest::Src => s.add(i).read_volatile(),
            Guest::Dst => s.add(i).read_unaligned(),
        }
    };
    // SAFETY: as `load`.
    let store = |i: usize, v: W| unsafe {
        match guest {
            Guest::Src => d.add(i).write_unaligned(v),
            Guest::Dst => d.add(i).write_volatile(v),
        }
    };
    let mut i = 0;
    while i + 4 <= words {
        if guest == Guest::Src {
            prefetch_ahead(src.wrapping_add(i * std::mem::size_of::<W>()), 4 * std::mem::size_of::<W>());
        }
        let w = [load(i), load(i + 1), load(i + 2), load(i + 3)];
        for (k, v) in w.into_iter().enumerate() {
            store(i + k, v);
        }
        i += 4;
    }
    while i < words {
        store(i, load(i));
        i += 1;
    }
    words * std::mem::size_of::<W>()
}

fn mmap(len: usize, prot: i32, flags: i32, fd: Option<BorrowedFd<'_>>) -> Result<NonNull<u8>> {
    if len == 0 {
        return Err(TransportError::InvalidLayout("empty mapping".into()));
    }
    let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: a fresh mapping at a kernel-chosen address; it aliases no Rust object.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw_fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(NonNull::new(p.cast()).expect("mmap never returns null on success"))
}

fn memfd_create(len: usize, hugetlb: bool) -> Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated literal; memfd_create has no other pointer arguments.
    let raw = unsafe { libc::memfd_create(c"ferry-guest".as_ptr(), flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: raw is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on a valid fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // Fixed size from here on: a peer mapping it can never see it shrink under its reads.
    // SAFETY: fcntl F_ADD_SEALS on a valid fd with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

fn fd_size(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into st, which is a valid, exclusively borrowed stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st.st_size as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn volatile_copies_move_every_byte_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for src_off in 0..17 {
            for dst_off in 0..17 {
                for len in [0, 1, 7, 8, 15, 16, 17, 63, 64, 65, 100, 150] {
                    for guest in [Guest::Src, Guest::Dst] {
                        let mut dst = vec![0u8; 200];
                        // SAFETY: both ranges lie inside their own vectors (offsets + len <= 200).
                        unsafe { volatile_copy(dst.as_mut_ptr().add(dst_off), src.as_ptr().add(src_off), len, guest) };
                        assert_eq!(
                            &dst[dst_off..dst_off + len],
                            &src[src_off..src_off + len],
                            "{src_off} {dst_off} {len}"
                        );
                        assert!(dst[..dst_off].iter().chain(&dst[dst_off + len..]).all(|&b| b == 0), "wrote outside");
                    }
                }
            }
        }
    }

    use super::*;

    #[test]
    fn reads_writes_and_bounds() {
        let m = RegionMapping::create(1 << 20, Backing::Anonymous).unwrap();
        assert!(m.is_zero(0, 1 << 20).unwrap());
        m.write(4096, &[7u8; 4096]).unwrap();
        let mut b = [0u8; 4096];
        m.read(4096, &mut b).unwrap();
        assert_eq!(b, [7u8; 4096]);
        assert!(!m.is_zero(4096, 4096).unwrap());
        assert!(m.read((1 << 20) - 100, &mut b).is_err());
        assert!(m.read(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn memfd_holes_are_zero_without_allocating() {
        let m = RegionMapping::create(4 << 20, Backing::Memfd).unwrap();
        m.write(1 << 20, &[1u8; 8]).unwrap();
        let allocated = |m: &RegionMapping| {
            // SAFETY: libc::stat is plain old data, written by fstat on a valid fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes only into st.
            assert_eq!(unsafe { libc::fstat(m.fd().unwrap().as_raw_fd(), &mut st) }, 0);
            st.st_blocks * 512
        };
        let before = allocated(&m);
        assert!(m.is_zero(0, 1 << 20).unwrap(), "a hole before the data");
        assert!(!m.is_zero(1 << 20, 4096).unwrap());
        assert!(m.is_zero(2 << 20, 2 << 20).unwrap(), "a hole to the end");
        assert_eq!(allocated(&m), before, "checking holes allocated memory");
        m.write(3 << 20, &[0u8; 4096]).unwrap();
        assert!(m.is_zero(3 << 20, 4096).unwrap(), "written zeros are data, and zero");
    }

    #[test]
    fn shared_memfd_is_checked_and_readonly() {
        let m = RegionMapping::create(1 << 20, Backing::Memfd).unwrap();
        m.write(0, b"hello").unwrap();
        let dup = m.fd().unwrap().try_clone_to_owned().unwrap();
        let ro = RegionMapping::map_shared_readonly(dup, 1 << 20).unwrap();
        let mut b = [0u8; 5];
        ro.read(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(ro.write(0, b"x").is_err());
        let dup = m.fd().unwrap().try_clone_to_owned().unwrap();
        assert!(matches!(RegionMapping::map_shared_readonly(dup, 2 << 20), Err(TransportError::BadSharedMemory(_))));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(matches!(
            RegionMapping::map_shared_readonly(file.into(), 4096),
            Err(TransportError::BadSharedMemory(_))
        ));
    }
}
