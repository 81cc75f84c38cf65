//! Filled sources and connected destinations for every backend, shared by ferry-bench and the
//! criterion benches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_transport::lane::{BulkRead, PageBuf, PageSource};
use ferry_transport::snapshot::{self, SnapshotImage};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{local, Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey};

pub const PAGE: usize = 4096;

pub fn bench_key() -> PreSharedKey {
    PreSharedKey::new(*b"ferry benchmark key, not secret!").expect("32 bytes")
}

/// Guest memory of `size` bytes with no zero page, so bandwidth figures count real data.
pub fn filled_memory(size: u64, backing: Backing) -> Result<Arc<GuestMemory>> {
    let memory = GuestMemory::create(MemoryLayout::single(size)?, backing)?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_le_bytes());
    }
    let region = &memory.regions()[0];
    for off in (0..size).step_by(chunk.len()) {
        let n = (size - off).min(chunk.len() as u64) as usize;
        region.write(off, &chunk[..n])?;
    }
    Ok(Arc::new(memory))
}

/// A source serving `memory` and a destination connected to it; the fixture keeps both alive.
#[derive(Debug)]
pub enum Fixture {
    Tcp { _server: TcpPageServer, source: PageSource },
    Local { _server: local::LocalPageServer, source: PageSource },
    Snapshot { source: PageSource, path: PathBuf },
}

impl Fixture {
    pub fn tcp(memory: Arc<GuestMemory>, bulk_depth: usize, encryption: tcp::Encryption) -> Result<Self> {
        let opts = TcpOptions { bulk_depth, encryption, ..TcpOptions::default() };
        let server = TcpPageServer::start("127.0.0.1:0", memory.clone(), bench_key(), opts.clone())?;
        let source = tcp::connect(server.local_addr(), &bench_key(), Some(memory.layout()), &opts)?;
        Ok(Fixture::Tcp { _server: server, source })
    }

    pub fn local(memory: Arc<GuestMemory>, bulk_depth: usize) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("ferry-bench-{}.sock", std::process::id()));
        let server = local::LocalPageServer::start(&path, memory.clone(), bench_key())?;
        let source = local::connect(&path, &bench_key(), Some(memory.layout()), bulk_depth)?;
        Ok(Fixture::Local { _server: server, source })
    }

    /// Writes `memory` as an image under `dir` and opens it.
    pub fn snapshot(memory: &GuestMemory, dir: &Path, bulk_depth: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("ferry-bench-{}.img", std::process::id()));
        snapshot::write_image(&path, memory)?;
        let image = SnapshotImage::open(&path, Some(memory.layout()))?;
        Ok(Fixture::Snapshot { source: image.page_source(bulk_depth)?, path })
    }

    pub fn source(&mut self) -> &mut PageSource {
        match self {
            Fixture::Tcp { source, .. } | Fixture::Local { source, .. } | Fixture::Snapshot { source, .. } => source,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Fixture::Snapshot { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Streams `total` bytes through the bulk lane in runs of `run_pages`, cycling over the region.
/// Buffers come from `spare` and return to it, so repeated calls allocate (and fault in) nothing;
/// new ones come from the lane, registered where its backend needs that (RDMA).
/// Returns the elapsed time.
pub fn bulk_stream(source: &mut PageSource, spare: &mut Vec<PageBuf>, run_pages: u32, total: u64) -> Result<Duration> {
    let region_pages = source.layout.region_pages(0).expect("one region");
    let run_bytes = run_pages as usize * PAGE;
    let runs = total / run_bytes as u64;
    spare.retain(|b| b.len() == run_bytes);
    while spare.len() < source.bulk.depth() {
        let mut b = source.bulk.buffer(run_bytes)?;
        b.fill(1);
        spare.push(b);
    }
    let mut next_page = 0u64;
    let start = Instant::now();
    for i in 0..runs {
        if source.bulk.in_flight() == source.bulk.depth() {
            let done = source.bulk.complete()?.expect("reads in flight");
            spare.extend(done.buf.into_buffer());
        }
        if next_page + u64::from(run_pages) > region_pages {
            next_page = 0;
        }
        let buf = spare.pop().expect("a buffer per read in flight");
        source.bulk.submit(BulkRead { run: PageRun::new(0, next_page, run_pages), buf: buf.into(), tag: i })?;
        next_page += u64::from(run_pages);
    }
    while let Some(done) = source.bulk.complete()? {
        spare.extend(done.buf.into_buffer());
    }
    Ok(start.elapsed())
}

/// Reads single pages at pseudo-random positions on the urgent lane.
pub fn urgent_page(source: &mut PageSource, buf: &mut [u8], i: usize) -> Result<()> {
    let pages = source.layout.region_pages(0).expect("one region");
    let page = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % pages;
    source.urgent.read(PageRun::new(0, page, 1), buf)?;
    Ok(())
}
