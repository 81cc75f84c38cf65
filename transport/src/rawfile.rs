//! The `rawfile` backend: guest memory kept as a flat file, each region's bytes at its own
//! offset, as Firecracker writes its snapshot memory file. Reads are positioned reads (`pread`),
//! not a mapping: a file that shrinks under us gives a typed short-read error, never SIGBUS. The
//! holes of a sparse file are found without reading them (SEEK_DATA/SEEK_HOLE) and read as zero;
//! every page read is checked for zero so the destination need not install it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, TransportError};
use crate::lane::{run_dst, BulkDone, BulkLane, BulkRead, PageSource, UrgentLane};
use crate::layout::{MemoryLayout, PageRun};
use crate::wire::{SessionId, ZeroMask};

/// A raw guest memory file opened for reading.
#[derive(Debug)]
pub struct RawMemoryFile {
    path: PathBuf,
    file: File,
    layout: MemoryLayout,
    /// File offset of each region's first byte.
    offsets: Vec<u64>,
}

fn raw_err(path: &Path, why: impl Into<String>) -> TransportError {
    TransportError::Snapshot { path: path.display().to_string(), why: why.into() }
}

impl RawMemoryFile {
    /// Opens `path`, whose region `i` of `layout` lies at `offsets[i]`. Every region must lie
    /// inside the file.
    pub fn open(path: impl AsRef<Path>, layout: MemoryLayout, offsets: Vec<u64>) -> Result<Arc<Self>> {
        let path = path.as_ref();
        if offsets.len() != layout.regions().len() {
            return Err(raw_err(path, format!("{} offsets for {} regions", offsets.len(), layout.regions().len())));
        }
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        for (i, (&off, r)) in offsets.iter().zip(layout.regions()).enumerate() {
            if off.checked_add(r.size).map_or(true, |end| end > len) {
                return Err(raw_err(
                    path,
                    format!("region {i} ({} bytes at {off}) ends past the file ({len} bytes)", r.size),
                ));
            }
        }
        Ok(Arc::new(RawMemoryFile { path: path.to_path_buf(), file, layout, offsets }))
    }

    /// The guest memory layout the file holds.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The pages that lie wholly in holes of the file, one bit per global page in 64-bit words:
    /// they read as zero and need never be read.
    pub fn holes(&self) -> Result<Vec<u64>> {
        let ps = u64::from(self.layout.page_size());
        let total = self.layout.total_pages();
        let mut words = vec![0u64; total.div_ceil(64) as usize];
        let mut global = 0u64;
        for (i, &base) in self.offsets.iter().enumerate() {
            let pages = self.layout.region_pages(i as u32).unwrap_or(0);
            let end = base + pages * ps;
            let mut at = base;
            while at < end {
                let data = seek(&self.file, at, libc::SEEK_DATA)?.unwrap_or(end).min(end);
                // Pages wholly inside at..data are a hole.
                let (first, last) = ((at - base).div_ceil(ps), (data - base) / ps);
                for p in first..last {
                    let g = global + p;
                    words[(g / 64) as usize] |= 1 << (g % 64);
                }
                if data >= end {
                    break;
                }
                at = seek(&self.file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            }
            global += pages;
        }
        Ok(words)
    }

    /// Both lanes over this file. The bulk lane queues up to `depth` reads and performs each when
    /// it is completed: reads come from the page cache or the disk at the caller's pace.
    pub fn page_source(self: &Arc<Self>, depth: usize) -> PageSource {
        PageSource {
            reconnect: None,
            session: SessionId::NEW,
            layout: self.layout.clone(),
            urgent: Box::new(RawUrgent { file: self.clone() }),
            bulk: Box::new(RawBulk { file: self.clone(), depth: depth.clamp(1, 4096), queued: VecDeque::new() }),
        }
    }

    /// Reads `run` into `dst` (its exact size) and says which pages are zero.
    fn read(&self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        let dst = run_dst(&self.layout, run, dst)?;
        let (offset, _) = self.layout.run_bytes(run);
        let at = self.offsets[run.region as usize] + offset;
        self.file.read_exact_at(dst, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => raw_err(&self.path, format!("short read at {at}: the file shrank")),
            _ => e.into(),
        })?;
        let mut zero = ZeroMask::default();
        for (i, page) in dst.chunks_exact(self.layout.page_size() as usize).enumerate() {
            if page.iter().all(|&b| b == 0) {
                zero.set(i as u32);
            }
        }
        Ok(zero)
    }
}

/// lseek that answers `None` where the file has no more data (ENXIO).
fn seek(file: &File, at: u64, whence: i32) -> Result<Option<u64>> {
    // SAFETY: lseek on a valid fd with integer arguments; only this file's offset changes, and
    // every read here is positioned.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        // A file system that cannot tell holes: everything is data.
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(at)),
        _ => Err(err.into()),
    }
}

struct RawUrgent {
    file: Arc<RawMemoryFile>,
}

impl UrgentLane for RawUrgent {
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        self.file.read(run, dst)
    }
}

struct RawBulk {
    file: Arc<RawMemoryFile>,
    depth: usize,
    queued: VecDeque<BulkRead>,
}

impl BulkLane for RawBulk {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.queued.len()
    }

    fn submit(&mut self, mut read: BulkRead) -> Result<()> {
        if self.queued.len() >= self.depth {
            return Err(TransportError::LaneFull(self.queued.len()));
        }
        run_dst(&self.file.layout, read.run, &mut read.buf)?;
        self.queued.push_back(read);
        Ok(())
    }

    fn complete(&mut self) -> Result<Option<BulkDone>> {
        let Some(mut read) = self.queued.pop_front() else { return Ok(None) };
        let zero = self.file.read(read.run, &mut read.buf)?;
        Ok(Some(BulkDone { run: read.run, buf: read.buf, tag: read.tag, zero }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::GuestAddr;
    use crate::layout::RegionLayout;

    #[test]
    fn regions_at_offsets_holes_and_short_files() {
        let dir = std::env::temp_dir().join(format!("ferry-rawfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        // Region 0 at 0 (4 MiB), region 1 at 4 MiB (4 MiB); data on pages 3 and 1024 + 5.
        f.write_all_at(&[7u8; 4096], 3 * 4096).unwrap();
        f.write_all_at(&[9u8; 4096], (4 << 20) + 5 * 4096).unwrap();
        f.sync_all().unwrap();
        let layout = MemoryLayout::new(
            4096,
            vec![
                RegionLayout { guest_phys_addr: GuestAddr(0), size: 4 << 20 },
                RegionLayout { guest_phys_addr: GuestAddr(1 << 32), size: 4 << 20 },
            ],
        )
        .unwrap();
        let raw = RawMemoryFile::open(&path, layout.clone(), vec![0, 4 << 20]).unwrap();
        let holes = raw.holes().unwrap();
        let hole = |g: u64| holes[(g / 64) as usize] & (1 << (g % 64)) != 0;
        assert!(hole(0) && hole(1023) && hole(2047) && !hole(3) && !hole(1024 + 5));
        let mut src = raw.page_source(4);
        let mut buf = vec![1u8; 2 * 4096];
        let zero = src.urgent.read(PageRun::new(1, 5, 2), &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9) && zero.is_zero(1) && !zero.is_zero(0));
        src.bulk
            .submit(BulkRead { run: PageRun::new(0, 2, 2), buf: crate::lane::PageBuf::new(8192).into(), tag: 4 })
            .unwrap();
        let done = src.bulk.complete().unwrap().unwrap();
        assert_eq!(done.tag, 4);
        assert!(done.zero.is_zero(0) && !done.zero.is_zero(1) && done.buf[4096..].iter().all(|&b| b == 7));
        assert!(RawMemoryFile::open(&path, layout.clone(), vec![0, 5 << 20]).is_err(), "region 1 past the end");
        assert!(RawMemoryFile::open(&path, layout, vec![0]).is_err(), "one offset per region");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
