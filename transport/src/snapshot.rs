//! The `snapshot` backend: a guest memory image on disk, written and read through io_uring.
//!
//! Format (little-endian, every section 4 KiB aligned so the data can be read with O_DIRECT):
//! ```text
//! 0        header (8 KiB): magic, format version, page size, page count, section offsets,
//!          the memory layout, crc32c of the zero-page bitmap, length and crc32c of the state
//!          blob, crc32c of the header itself (last 4 bytes)
//! 8 KiB    one crc32c per page, all regions in order
//! ...      zero-page bitmap, one bit per page (zero pages and the free pages the VMM named)
//! ...      page data, aligned to the page size; zero and free pages are holes and cost no disk
//! ...      the VMM's state blob (vCPUs, devices), 4 KiB aligned
//! ```
//! The header is written last and the file synced, so an interrupted write leaves an image that
//! fails to open instead of one that restores a corrupt guest. Every page read back is checked
//! against its checksum. Opening reads the header, the zero map and the state blob, not the
//! checksum table: its entries are read a 4 KiB chunk at a time when a page first needs one, so
//! opening a large image costs little more than a small one. The table needs no checksum of its
//! own: a corrupt entry makes its page fail its check, an error, never a page accepted wrongly;
//! the zero map does (a corrupt bit there would turn a data page into zeros).
//!
//! The writer copies guest memory through bounce buffers before it checksums and writes: the copy
//! is what both the checksum and the disk see, so a guest writing meanwhile cannot make them differ,
//! and O_DIRECT gets aligned buffers whatever the guest memory's alignment.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::addr::PageIndex;
use crate::error::{Result, TransportError};
use crate::lane::{run_dst, BulkDone, BulkLane, BulkRead, PageBuf, PageSource, UrgentLane, PAGE_BUF_ALIGN};
use crate::layout::{MemoryLayout, PageRun};
use crate::memory::GuestMemory;
use crate::wire::{SessionId, ZeroMask};

const MAGIC: &[u8; 8] = b"FRRYSNAP";
/// 2: the state blob section and the free-page count. 3: the header's metadata checksum covers
/// the zero map alone, and the checksum table is read lazily.
const FORMAT_VERSION: u16 = 3;
/// Checksum table entries read at a time (one 4 KiB read).
const TABLE_CHUNK: u64 = ALIGN / 4;
/// Where the layout starts in the header.
const HEADER_LAYOUT_AT: usize = 80;
/// Largest state blob an image may hold.
pub const MAX_STATE_BYTES: u64 = 256 << 20;
const HEADER_LEN: u64 = 8192;
const ALIGN: u64 = 4096;
/// Bytes the writer moves per io_uring write at most.
const WRITE_CHUNK: usize = 1 << 20;
const WRITE_BUFFERS: usize = 8;

/// Where the sections of an image lie, derived from its layout alone.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sections {
    total_pages: u64,
    table_offset: u64,
    bitmap_offset: u64,
    data_offset: u64,
    file_len: u64,
}

/// Largest guest an image may describe. Bounds the metadata a (possibly hostile, possibly sparse)
/// image can make the reader allocate: 1 bit per page at open, and 4 bytes per page as the
/// checksums are read, 1.1 GiB in all at this size.
pub const MAX_IMAGE_GUEST_BYTES: u64 = 1 << 40;

impl Sections {
    fn of(layout: &MemoryLayout) -> Self {
        let total_pages = layout.total_pages();
        let table_offset = HEADER_LEN;
        let bitmap_offset = table_offset + (total_pages * 4).next_multiple_of(ALIGN);
        let data_align = ALIGN.max(u64::from(layout.page_size()));
        let data_offset =
            (bitmap_offset + total_pages.div_ceil(8).next_multiple_of(ALIGN)).next_multiple_of(data_align);
        let file_len = data_offset + layout.total_bytes();
        Sections { total_pages, table_offset, bitmap_offset, data_offset, file_len }
    }

    fn metadata_len(&self) -> usize {
        (self.data_offset - self.table_offset) as usize
    }
}

/// The per-page checksums, read from the image a chunk at a time on first use. Any thread may
/// ask; two that race on a chunk both read it, and one copy is kept.
#[derive(Debug)]
struct ChecksumTable {
    file: File,
    offset: u64,
    chunks: Vec<std::sync::OnceLock<Box<[u32]>>>,
}

impl ChecksumTable {
    fn new(file: File, sections: &Sections) -> Self {
        let chunks = sections.total_pages.div_ceil(TABLE_CHUNK) as usize;
        ChecksumTable { file, offset: sections.table_offset, chunks: (0..chunks).map(|_| Default::default()).collect() }
    }

    fn get(&self, page: u64, path: &Path) -> Result<u32> {
        let chunk = &self.chunks[(page / TABLE_CHUNK) as usize];
        if chunk.get().is_none() {
            // The table section is padded to ALIGN, so every chunk is a whole 4 KiB read.
            let mut bytes = vec![0u8; ALIGN as usize];
            let at = self.offset + page / TABLE_CHUNK * ALIGN;
            std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut bytes, at)
                .map_err(|e| snap_err(path, format!("reading the checksum table: {e}")))?;
            let _ =
                chunk.set(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect());
        }
        Ok(chunk.get().expect("set above")[(page % TABLE_CHUNK) as usize])
    }
}

/// What writing an image did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Pages written as data.
    pub data_pages: u64,
    /// Pages found zero (free pages not included).
    pub zero_pages: u64,
    /// Pages the VMM named free: neither read nor written.
    pub free_pages: u64,
    /// Bytes written to the image, headers and checksums included.
    pub bytes_written: u64,
}

fn snap_err(path: &Path, why: impl Into<String>) -> TransportError {
    TransportError::Snapshot { path: path.display().to_string(), why: why.into() }
}

/// Opens `path` with O_DIRECT when the filesystem supports it, else buffered.
fn open_maybe_direct(path: &Path, opts: &mut OpenOptions) -> Result<(File, bool)> {
    match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((opts.open(path)?, false)),
        Err(e) => Err(e.into()),
    }
}

/// Writes `memory` as an image at `path` (replacing any file there), with no state blob and no
/// free pages. The guest should be paused: see [`write_snapshot`].
pub fn write_image(path: impl AsRef<Path>, memory: &GuestMemory) -> Result<WriteStats> {
    write_snapshot(path, memory, &[], &|_| false)
}

/// Writes a paused guest as an image at `path` (replacing any file there): its memory (pages for
/// which `free(page)` holds are neither read nor stored, and restore as zero) and the
/// VMM's `state` blob. The image is a consistent copy of each chunk, not of the whole memory at
/// one instant: the guest must be paused. Crash-safe: the header is written and synced last.
pub fn write_snapshot(
    path: impl AsRef<Path>,
    memory: &GuestMemory,
    state: &[u8],
    free: &dyn Fn(PageIndex) -> bool,
) -> Result<WriteStats> {
    let path = path.as_ref();
    if state.len() as u64 > MAX_STATE_BYTES {
        return Err(snap_err(path, format!("a state blob of {} bytes (at most {MAX_STATE_BYTES})", state.len())));
    }
    let layout = memory.layout();
    let sections = Sections::of(layout);
    let (file, _direct) = open_maybe_direct(path, OpenOptions::new().write(true).create(true).truncate(true))?;
    file.set_len(sections.file_len + (state.len() as u64).next_multiple_of(ALIGN))?;
    let ps = layout.page_size() as usize;
    let pages_per_chunk = (WRITE_CHUNK / ps).max(1);
    let mut writer = ChunkWriter::new(pages_per_chunk * ps, path)?;
    let mut metadata = PageBuf::new(sections.metadata_len());
    let bitmap_at = (sections.bitmap_offset - sections.table_offset) as usize;
    let mut stats = WriteStats::default();
    let mut global_page = 0u64;
    for region in memory.regions() {
        let region_pages = (region.len() / ps) as u64;
        let mut page = 0u64;
        while page < region_pages {
            let n = (region_pages - page).min(pages_per_chunk as u64) as usize;
            let b = writer.acquire()?;
            let buf = &mut writer.buffers[b];
            // Free pages are never read (a balloon's pages may not even be mapped in).
            let mut i = 0;
            while i < n {
                let start = i;
                let is_free = free(PageIndex(global_page + i as u64));
                while i < n && free(PageIndex(global_page + i as u64)) == is_free {
                    i += 1;
                }
                let (at, len) = ((page + start as u64) * ps as u64, (i - start) * ps);
                if is_free {
                    buf[start * ps..start * ps + len].fill(0);
                    stats.free_pages += (i - start) as u64;
                } else {
                    region.read(at, &mut buf[start * ps..start * ps + len])?;
                }
            }
            let mut zero = vec![false; n];
            for (i, z) in zero.iter_mut().enumerate() {
                let bytes = &buf[i * ps..(i + 1) * ps];
                let g = (global_page + i as u64) as usize;
                if free(PageIndex(g as u64)) {
                    *z = true;
                    metadata[bitmap_at + g / 8] |= 1 << (g % 8);
                } else if bytes.iter().all(|&x| x == 0) {
                    *z = true;
                    metadata[bitmap_at + g / 8] |= 1 << (g % 8);
                    stats.zero_pages += 1;
                } else {
                    metadata[g * 4..g * 4 + 4].copy_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
                    stats.data_pages += 1;
                }
            }
            let mut i = 0;
            while i < n {
                if zero[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && !zero[i] {
                    i += 1;
                }
                let offset = sections.data_offset + (global_page + start as u64) * ps as u64;
                writer.write(b, start * ps, (i - start) * ps, &file, offset)?;
                stats.bytes_written += ((i - start) * ps) as u64;
            }
            writer.release(b);
            writer.ring.submit()?;
            page += n as u64;
            global_page += n as u64;
        }
    }
    writer.drain()?;
    let mut header = PageBuf::new(HEADER_LEN as usize);
    let blob = StateSection { len: state.len() as u64, crc: crc32c::crc32c(state), free_pages: stats.free_pages };
    encode_header(layout, &sections, crc32c::crc32c(&metadata[bitmap_at..]), &blob, &mut header);
    write_all_at(&mut writer.ring, &file, &metadata, sections.table_offset, path)?;
    if !state.is_empty() {
        let mut aligned = PageBuf::new(state.len().next_multiple_of(ALIGN as usize));
        aligned[..state.len()].copy_from_slice(state);
        write_all_at(&mut writer.ring, &file, &aligned, sections.file_len, path)?;
        stats.bytes_written += aligned.len() as u64;
    }
    file.sync_data()?;
    write_all_at(&mut writer.ring, &file, &header, 0, path)?;
    file.sync_data()?;
    Ok(stats)
}

/// Bounce buffers and the ring that writes them. A buffer is reused only once every write from it
/// has completed, and dropping the writer waits for writes still in flight.
struct ChunkWriter<'p> {
    ring: IoUring,
    buffers: Vec<PageBuf>,
    /// Writes in flight from each buffer.
    pending: [usize; WRITE_BUFFERS],
    /// The buffer being filled, which completions must not free.
    held: Option<usize>,
    free: VecDeque<usize>,
    path: &'p Path,
}

impl<'p> ChunkWriter<'p> {
    fn new(buffer_len: usize, path: &'p Path) -> Result<Self> {
        Ok(ChunkWriter {
            ring: IoUring::new(WRITE_BUFFERS as u32 * 4)?,
            buffers: (0..WRITE_BUFFERS).map(|_| PageBuf::new(buffer_len)).collect(),
            pending: [0; WRITE_BUFFERS],
            held: None,
            free: (0..WRITE_BUFFERS).collect(),
            path,
        })
    }

    fn acquire(&mut self) -> Result<usize> {
        while self.free.is_empty() {
            self.reap()?;
        }
        let b = self.free.pop_front().expect("a free buffer after reaping");
        self.held = Some(b);
        Ok(b)
    }

    /// Ends filling buffer `b`; it returns to the free list once its writes complete.
    fn release(&mut self, b: usize) {
        self.held = None;
        if self.pending[b] == 0 {
            self.free.push_back(b);
        }
    }

    /// Queues a write of `buffers[b][at..at + len]` to `offset`.
    fn write(&mut self, b: usize, at: usize, len: usize, file: &File, offset: u64) -> Result<()> {
        let src = &self.buffers[b][at..at + len];
        let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), src.as_ptr(), len as u32)
            .offset(offset)
            .build()
            .user_data(((b as u64) << 32) | len as u64);
        loop {
            // SAFETY: the entry reads from buffers[b], which stays allocated and unmodified until
            // this write's completion is reaped: pending[b] > 0 keeps it off the free list, and
            // Drop waits for every write in flight before the buffers are freed.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            self.ring.submit()?;
            self.reap()?;
        }
        self.pending[b] += 1;
        Ok(())
    }

    fn reap(&mut self) -> Result<()> {
        self.ring.submit_and_wait(1)?;
        let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut first_error = None;
        for (data, res) in done {
            let (b, len) = ((data >> 32) as usize, data & 0xffff_ffff);
            self.pending[b] -= 1;
            if self.pending[b] == 0 && self.held != Some(b) {
                self.free.push_back(b);
            }
            if res < 0 {
                first_error.get_or_insert(std::io::Error::from_raw_os_error(-res).into());
            } else if res as u64 != len {
                first_error.get_or_insert(snap_err(self.path, format!("short write: {res} of {len} bytes")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn drain(&mut self) -> Result<()> {
        while self.pending.iter().any(|&p| p > 0) {
            self.reap()?;
        }
        Ok(())
    }
}

impl Drop for ChunkWriter<'_> {
    fn drop(&mut self) {
        while self.pending.iter().any(|&p| p > 0) {
            if self.ring.submit_and_wait(1).is_err() {
                // Leak rather than free memory the kernel may still read.
                std::mem::forget(std::mem::take(&mut self.buffers));
                return;
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for data in done {
                self.pending[(data >> 32) as usize] -= 1;
            }
        }
    }
}

/// One synchronous io_uring write of a whole aligned buffer.
fn write_all_at(ring: &mut IoUring, file: &File, buf: &PageBuf, offset: u64, path: &Path) -> Result<()> {
    let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), buf.len() as u32).offset(offset).build();
    // SAFETY: buf outlives the call and we wait for the completion below before returning.
    unsafe { ring.submission().push(&entry) }.map_err(|_| snap_err(path, "submission queue full"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().map(|c| c.result()).ok_or_else(|| snap_err(path, "no completion"))?;
    if res < 0 {
        return Err(std::io::Error::from_raw_os_error(-res).into());
    }
    if res as usize != buf.len() {
        return Err(snap_err(path, format!("short write: {res} of {} bytes", buf.len())));
    }
    Ok(())
}

/// The state blob's place in an image (it starts at the end of the data section).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StateSection {
    len: u64,
    crc: u32,
    free_pages: u64,
}

fn encode_header(layout: &MemoryLayout, s: &Sections, zero_map_crc: u32, state: &StateSection, out: &mut [u8]) {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&zero_map_crc.to_le_bytes());
    for v in [s.total_pages, s.table_offset, s.bitmap_offset, s.data_offset, s.file_len] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&state.len.to_le_bytes());
    h.extend_from_slice(&state.crc.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&state.free_pages.to_le_bytes());
    debug_assert_eq!(h.len(), HEADER_LAYOUT_AT);
    crate::wire::encode_layout(layout, &mut h);
    out[..h.len()].copy_from_slice(&h);
    let crc = crc32c::crc32c(&out[..HEADER_LEN as usize - 4]);
    out[HEADER_LEN as usize - 4..HEADER_LEN as usize].copy_from_slice(&crc.to_le_bytes());
}

/// An image opened for reading: its layout, zero map and state blob, verified.
#[derive(Debug)]
pub struct SnapshotImage {
    path: PathBuf,
    layout: MemoryLayout,
    sections: Sections,
    /// O_DIRECT where the filesystem allows; used for aligned destinations.
    direct: File,
    direct_ok: bool,
    buffered: File,
    checksums: ChecksumTable,
    zero: Vec<u8>,
    /// Global index of each region's first page.
    region_base: Vec<u64>,
    state: Vec<u8>,
    free_pages: u64,
}

/// How an image's pages are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageReads {
    /// O_DIRECT where the filesystem allows it: from the disk, bypassing (and not filling) the
    /// page cache; for an image read once, or larger than the cache.
    #[default]
    Direct,
    /// Through the page cache: for an image that is already there (just written, or restored
    /// often, as a function's template), where a read is a copy out of memory.
    PageCache,
}

impl SnapshotImage {
    /// Opens and verifies an image, read with [`ImageReads::Direct`]. With `expected_layout`, an
    /// image of another layout is refused.
    pub fn open(path: impl AsRef<Path>, expected_layout: Option<&MemoryLayout>) -> Result<Arc<Self>> {
        Self::open_with(path, expected_layout, ImageReads::Direct)
    }

    /// [`Self::open`], choosing how pages are read.
    pub fn open_with(
        path: impl AsRef<Path>,
        expected_layout: Option<&MemoryLayout>,
        reads: ImageReads,
    ) -> Result<Arc<Self>> {
        let path = path.as_ref();
        let buffered = File::open(path)?;
        let (direct, direct_ok) = match reads {
            ImageReads::Direct => open_maybe_direct(path, OpenOptions::new().read(true))?,
            ImageReads::PageCache => (buffered.try_clone()?, false),
        };
        let file_len = buffered.metadata()?.len();
        if file_len < HEADER_LEN {
            return Err(snap_err(path, format!("{file_len} bytes: too short for a header")));
        }
        let mut header = PageBuf::new(HEADER_LEN as usize);
        let mut ring = IoUring::new(4)?;
        read_exact_at(&mut ring, &buffered, &mut header, 0, path)?;
        let (layout, sections, zero_map_crc, state_section) = decode_header(&header, path)?;
        if let Some(why) = expected_layout.and_then(|ours| ours.mismatch(&layout)) {
            return Err(TransportError::LayoutMismatch(why));
        }
        let full_len = sections.file_len + state_section.len.next_multiple_of(ALIGN);
        if file_len < full_len {
            return Err(snap_err(path, format!("truncated: {file_len} bytes, the header says {full_len}")));
        }
        let mut zero_map = PageBuf::new((sections.data_offset - sections.bitmap_offset) as usize);
        read_exact_at(&mut ring, &buffered, &mut zero_map, sections.bitmap_offset, path)?;
        if crc32c::crc32c(&zero_map) != zero_map_crc {
            return Err(snap_err(path, "the zero map is corrupt"));
        }
        let n = sections.total_pages as usize;
        let zero = zero_map[..n.div_ceil(8)].to_vec();
        let checksums = ChecksumTable::new(buffered.try_clone()?, &sections);
        let mut state = PageBuf::new(state_section.len.next_multiple_of(ALIGN) as usize);
        if state_section.len > 0 {
            read_exact_at(&mut ring, &buffered, &mut state, sections.file_len, path)?;
        }
        let state = state[..state_section.len as usize].to_vec();
        if crc32c::crc32c(&state) != state_section.crc {
            return Err(snap_err(path, "the state blob is corrupt"));
        }
        let region_base = layout.region_bases();
        Ok(Arc::new(SnapshotImage {
            path: path.to_path_buf(),
            layout,
            sections,
            direct,
            direct_ok,
            buffered,
            checksums,
            zero,
            region_base,
            state,
            free_pages: state_section.free_pages,
        }))
    }

    /// The VMM's state blob saved with the image (empty if none was).
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Pages the VMM named free when saving.
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// The pages that restore as zero (zero when saved, or free), one bit per global page in
    /// 64-bit words: a restore claims them up front and never reads them.
    pub fn zero_map(&self) -> Vec<u64> {
        self.zero
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect()
    }

    /// The guest memory layout the image holds.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Where the pages' data starts in the file (the data of global page g is at
    /// `data_offset() + g * page_size`), for raw reads of the same bytes beside ferry's.
    pub fn data_offset(&self) -> u64 {
        self.sections.data_offset
    }

    /// Whether reads into aligned buffers bypass the page cache.
    pub fn uses_direct_io(&self) -> bool {
        self.direct_ok
    }

    /// Both lanes over this image: each has its own ring, so urgent reads never queue behind bulk.
    pub fn page_source(self: &Arc<Self>, bulk_depth: usize) -> Result<PageSource> {
        let depth = bulk_depth.clamp(1, 4096);
        Ok(PageSource {
            reconnect: None,
            session: SessionId::NEW,
            layout: self.layout.clone(),
            urgent: Box::new(SnapshotUrgent { image: self.clone(), ring: IoUring::new(4)? }),
            bulk: Box::new(SnapshotBulk {
                image: self.clone(),
                ring: IoUring::new(depth.next_power_of_two() as u32)?,
                depth,
                slots: (0..depth).map(|_| None).collect(),
                free: (0..depth).collect(),
            }),
        })
    }

    fn is_zero(&self, global: u64) -> bool {
        self.zero[(global / 8) as usize] & (1 << (global % 8)) != 0
    }

    /// Where `run`'s data starts in the file.
    fn data_offset_of(&self, run: PageRun) -> u64 {
        let global = self.region_base[run.region as usize] + run.first_page;
        self.sections.data_offset + global * u64::from(self.layout.page_size())
    }

    fn read_entry(&self, run: PageRun, dst: &mut [u8]) -> io_uring::squeue::Entry {
        let offset = self.data_offset_of(run);
        let aligned = dst.as_ptr() as usize % PAGE_BUF_ALIGN == 0 && dst.len() as u64 % ALIGN == 0;
        let fd = if aligned && self.direct_ok { self.direct.as_raw_fd() } else { self.buffered.as_raw_fd() };
        opcode::Read::new(types::Fd(fd), dst.as_mut_ptr(), dst.len() as u32).offset(offset).build()
    }

    /// Checks a run that has landed in `dst`: zero pages are forced to zero (they are holes on disk),
    /// every other page must match its checksum.
    fn verify(&self, run: PageRun, dst: &mut [u8], result: i32) -> Result<ZeroMask> {
        if result < 0 {
            return Err(std::io::Error::from_raw_os_error(-result).into());
        }
        if result as usize != dst.len() {
            return Err(snap_err(&self.path, format!("short read: {result} of {} bytes", dst.len())));
        }
        let ps = self.layout.page_size() as usize;
        let base = self.region_base[run.region as usize] + run.first_page;
        let mut zero = ZeroMask::default();
        for (i, page) in dst.chunks_exact_mut(ps).enumerate() {
            let g = base + i as u64;
            if self.is_zero(g) {
                page.fill(0);
                zero.set(i as u32);
            } else if crc32c::crc32c(page) != self.checksums.get(g, &self.path)? {
                return Err(TransportError::Checksum { region: run.region, page: run.first_page + i as u64 });
            }
        }
        Ok(zero)
    }
}

fn decode_header(h: &[u8], path: &Path) -> Result<(MemoryLayout, Sections, u32, StateSection)> {
    let crc = u32::from_le_bytes(h[HEADER_LEN as usize - 4..].try_into().expect("4 bytes"));
    if &h[..8] != MAGIC {
        return Err(snap_err(path, "not a ferry snapshot (bad magic)"));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != FORMAT_VERSION {
        return Err(snap_err(path, format!("format version {version}, this build reads {FORMAT_VERSION}")));
    }
    if crc32c::crc32c(&h[..HEADER_LEN as usize - 4]) != crc {
        return Err(snap_err(path, "header checksum mismatch (incomplete or corrupt image)"));
    }
    let zero_map_crc = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    let word = |i: usize| u64::from_le_bytes(h[16 + i * 8..24 + i * 8].try_into().expect("8 bytes"));
    let stored = Sections {
        total_pages: word(0),
        table_offset: word(1),
        bitmap_offset: word(2),
        data_offset: word(3),
        file_len: word(4),
    };
    let state = StateSection {
        len: word(5),
        crc: u32::from_le_bytes(h[64..68].try_into().expect("4 bytes")),
        free_pages: u64::from_le_bytes(h[72..80].try_into().expect("8 bytes")),
    };
    if state.len > MAX_STATE_BYTES {
        return Err(snap_err(path, format!("a state blob of {} bytes (at most {MAX_STATE_BYTES})", state.len)));
    }
    let layout = crate::wire::decode_layout_bytes(&h[HEADER_LAYOUT_AT..HEADER_LEN as usize - 4])
        .map_err(|e| snap_err(path, format!("layout: {e}")))?;
    if layout.total_bytes() > MAX_IMAGE_GUEST_BYTES {
        return Err(snap_err(
            path,
            format!("a guest of {} bytes (at most {MAX_IMAGE_GUEST_BYTES})", layout.total_bytes()),
        ));
    }
    let expected = Sections::of(&layout);
    if stored != expected {
        return Err(snap_err(path, "section offsets do not match the layout"));
    }
    if state.free_pages > expected.total_pages {
        return Err(snap_err(path, format!("{} free pages of {}", state.free_pages, expected.total_pages)));
    }
    Ok((layout, expected, zero_map_crc, state))
}

fn read_exact_at(ring: &mut IoUring, file: &File, buf: &mut PageBuf, offset: u64, path: &Path) -> Result<()> {
    let entry =
        opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).offset(offset).build();
    // SAFETY: buf outlives the call and we wait for the completion before returning.
    unsafe { ring.submission().push(&entry) }.map_err(|_| snap_err(path, "submission queue full"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().map(|c| c.result()).ok_or_else(|| snap_err(path, "no completion"))?;
    if res < 0 {
        return Err(std::io::Error::from_raw_os_error(-res).into());
    }
    if res as usize != buf.len() {
        return Err(snap_err(path, format!("short read: {res} of {} bytes", buf.len())));
    }
    Ok(())
}

struct SnapshotUrgent {
    image: Arc<SnapshotImage>,
    ring: IoUring,
}

impl UrgentLane for SnapshotUrgent {
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        let dst = run_dst(&self.image.layout, run, dst)?;
        if !self.image.direct_ok {
            // Through the page cache: one pread is a copy, with no ring to submit to and reap.
            let offset = self.image.data_offset_of(run);
            let res = match std::os::unix::fs::FileExt::read_exact_at(&self.image.buffered, dst, offset) {
                Ok(()) => dst.len() as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            return self.image.verify(run, dst, res);
        }
        let entry = self.image.read_entry(run, dst);
        // SAFETY: dst is exclusively borrowed until we have reaped this read's completion below.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| snap_err(&self.image.path, "submission queue full"))?;
        self.ring.submit_and_wait(1)?;
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| snap_err(&self.image.path, "no completion"))?;
        self.image.verify(run, dst, res)
    }
}

struct SnapshotBulk {
    image: Arc<SnapshotImage>,
    ring: IoUring,
    depth: usize,
    /// Reads in flight, indexed by their user_data; the kernel writes into their buffers.
    slots: Vec<Option<BulkRead>>,
    free: Vec<usize>,
}

impl SnapshotBulk {
    const SUBMIT_BATCH: usize = 4;
}

impl BulkLane for SnapshotBulk {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.depth - self.free.len()
    }

    fn submit(&mut self, mut read: BulkRead) -> Result<()> {
        let Some(&slot) = self.free.last() else { return Err(TransportError::LaneFull(self.depth)) };
        let dst = run_dst(&self.image.layout, read.run, &mut read.buf)?;
        let entry = self.image.read_entry(read.run, dst).user_data(slot as u64);
        // SAFETY: the buffer moves into slots[slot] below (moving a PageBuf does not move its heap
        // allocation) and stays there until this read's completion is reaped; Drop reaps every
        // outstanding read before the buffers are freed. The ring has at least depth entries.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| snap_err(&self.image.path, "submission queue full"))?;
        self.free.pop();
        self.slots[slot] = Some(read);
        // Submissions ride along with the next wait unless enough pile up to be worth a syscall.
        if self.ring.submission().len() >= Self::SUBMIT_BATCH {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<Option<BulkDone>> {
        if self.in_flight() == 0 {
            return Ok(None);
        }
        let cqe = loop {
            if let Some(c) = self.ring.completion().next() {
                break c;
            }
            // Also submits whatever submit() queued.
            self.ring.submit_and_wait(1)?;
        };
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        let slot = cqe.user_data() as usize;
        let mut read = self
            .slots
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| snap_err(&self.image.path, "completion for no read"))?;
        self.free.push(slot);
        let (_, len) = self.image.layout.run_bytes(read.run);
        let zero = self.image.verify(read.run, &mut read.buf[..len], cqe.result())?;
        Ok(Some(BulkDone { run: read.run, buf: read.buf, tag: read.tag, zero }))
    }
}

impl Drop for SnapshotBulk {
    fn drop(&mut self) {
        // The kernel may still write into buffers of reads in flight: wait for all of them.
        while self.in_flight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                // Leak the buffers rather than free memory the kernel may still write.
                for s in self.slots.iter_mut() {
                    if let Some(read) = s.take() {
                        std::mem::forget(read);
                    }
                }
                return;
            }
            let slots: Vec<usize> = self.ring.completion().map(|c| c.user_data() as usize).collect();
            for slot in slots {
                if let Some(s) = self.slots.get_mut(slot) {
                    *s = None;
                    self.free.push(slot);
                }
            }
        }
    }
}
