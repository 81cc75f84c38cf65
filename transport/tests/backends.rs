//! Every backend moves a 1 GiB, two-region image in sequential runs (bulk lane) and in shuffled
//! runs of random length (urgent and bulk lanes mixed); every byte of every page is verified against
//! the pattern it was written with, and every page is read exactly once per pass.

use std::sync::Arc;

use ferry_transport::lane::{BulkRead, PageBuf, PageSource};
use ferry_transport::pattern::{check_page, fill_memory, page_is_zero, region_bases};
use ferry_transport::tcp::{self, TcpOptions};
use ferry_transport::{local, snapshot, Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey, RegionLayout};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x5eed_f00d;

fn layout_1gib() -> MemoryLayout {
    MemoryLayout::new(
        4096,
        vec![
            RegionLayout { guest_phys_addr: 0, size: 768 << 20 },
            RegionLayout { guest_phys_addr: 4 << 30, size: 256 << 20 },
        ],
    )
    .unwrap()
}

fn source_memory(backing: Backing) -> Arc<GuestMemory> {
    let memory = GuestMemory::create(layout_1gib(), backing).unwrap();
    fill_memory(&memory, SEED).unwrap();
    Arc::new(memory)
}

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"ferry test key, 32 bytes long!!!").unwrap()
}

/// Tracks which pages a pass has verified, and checks each exactly once.
struct Verifier {
    layout: MemoryLayout,
    bases: Vec<u64>,
    seen: Vec<bool>,
    zero_marked: u64,
}

impl Verifier {
    fn new(layout: &MemoryLayout) -> Self {
        Verifier {
            layout: layout.clone(),
            bases: region_bases(layout),
            seen: vec![false; layout.total_pages() as usize],
            zero_marked: 0,
        }
    }

    fn check(&mut self, run: PageRun, data: &[u8], zero: &ferry_transport::ZeroMask) {
        let ps = self.layout.page_size() as usize;
        for i in 0..run.pages {
            let g = self.bases[run.region as usize] + run.first_page + u64::from(i);
            let page = &data[i as usize * ps..(i as usize + 1) * ps];
            assert!(check_page(page, g, SEED), "page {g} ({run:?} + {i}) differs from the source");
            if zero.is_zero(i) {
                assert!(page_is_zero(g), "page {g} marked zero but the source has data");
                self.zero_marked += 1;
            }
            assert!(!std::mem::replace(&mut self.seen[g as usize], true), "page {g} read twice in one pass");
        }
    }

    fn assert_complete(&self) {
        let missing = self.seen.iter().filter(|s| !**s).count();
        assert_eq!(missing, 0, "{missing} pages never read");
    }
}

fn drain_one(src: &mut PageSource, v: &mut Verifier) {
    let done = src.bulk.complete().unwrap().expect("a read in flight");
    v.check(done.run, &done.buf, &done.zero);
}

fn sequential_pass(src: &mut PageSource, run_pages: u32) -> Verifier {
    let mut v = Verifier::new(&src.layout);
    let ps = src.layout.page_size() as usize;
    for region in 0..src.layout.regions().len() as u32 {
        let pages = src.layout.region_pages(region).unwrap();
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(u64::from(run_pages)) as u32;
            if src.bulk.in_flight() == src.bulk.depth() {
                drain_one(src, &mut v);
            }
            let run = PageRun::new(region, p, n);
            src.bulk.submit(BulkRead { run, buf: PageBuf::new(n as usize * ps).into(), tag: p }).unwrap();
            p += u64::from(n);
        }
    }
    while src.bulk.in_flight() > 0 {
        drain_one(src, &mut v);
    }
    v.assert_complete();
    v
}

fn random_pass(src: &mut PageSource) -> Verifier {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let ps = src.layout.page_size() as usize;
    let mut runs = Vec::new();
    for region in 0..src.layout.regions().len() as u32 {
        let pages = src.layout.region_pages(region).unwrap();
        let mut p = 0;
        while p < pages {
            let n = rng.random_range(1..=64u64).min(pages - p) as u32;
            runs.push(PageRun::new(region, p, n));
            p += u64::from(n);
        }
    }
    runs.shuffle(&mut rng);
    let mut v = Verifier::new(&src.layout);
    let mut urgent_buf = vec![0u8; 64 * ps];
    for run in runs {
        if run.pages <= 4 {
            let zero = src.urgent.read(run, &mut urgent_buf).unwrap();
            v.check(run, &urgent_buf, &zero);
        } else {
            if src.bulk.in_flight() == src.bulk.depth() {
                drain_one(src, &mut v);
            }
            src.bulk.submit(BulkRead { run, buf: PageBuf::new(run.pages as usize * ps).into(), tag: 0 }).unwrap();
        }
    }
    while src.bulk.in_flight() > 0 {
        drain_one(src, &mut v);
    }
    v.assert_complete();
    v
}

#[test]
fn tcp_moves_1gib_sequentially_and_randomly() {
    let memory = source_memory(Backing::Anonymous);
    let server = tcp::TcpPageServer::start("127.0.0.1:0", memory.clone(), key(), TcpOptions::default()).unwrap();
    let mut src = tcp::connect(server.local_addr(), &key(), Some(memory.layout()), &TcpOptions::default()).unwrap();
    assert_eq!(src.session, server.session());
    let seq = sequential_pass(&mut src, 16);
    let zero_pages = (0..memory.layout().total_pages()).filter(|&g| page_is_zero(g)).count() as u64;
    assert_eq!(seq.zero_marked, zero_pages, "every zero page crosses as a marker");
    random_pass(&mut src);
    let total = memory.layout().total_pages();
    let stats = server.stats();
    let served = stats.data_pages.load(std::sync::atomic::Ordering::Relaxed)
        + stats.zero_pages.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(served, 2 * total, "two passes serve each page twice, no more");
    assert_eq!(stats.zero_pages.load(std::sync::atomic::Ordering::Relaxed), 2 * zero_pages);
}

#[test]
fn local_moves_1gib_sequentially_and_randomly() {
    let memory = source_memory(Backing::Memfd);
    let path = std::env::temp_dir().join(format!("ferry-local-test-{}.sock", std::process::id()));
    let server = local::LocalPageServer::start(&path, memory.clone(), key()).unwrap();
    let mut src = local::connect(server.path(), &key(), Some(memory.layout()), 32).unwrap();
    assert_eq!(src.session, server.session());
    sequential_pass(&mut src, 16);
    random_pass(&mut src);
}

#[test]
fn snapshot_moves_1gib_sequentially_and_randomly() {
    let memory = source_memory(Backing::Anonymous);
    let dir = tempdir("snapshot-1gib");
    let path = dir.join("image");
    let stats = snapshot::write_image(&path, &memory).unwrap();
    let zero_pages = (0..memory.layout().total_pages()).filter(|&g| page_is_zero(g)).count() as u64;
    assert_eq!(stats.zero_pages, zero_pages);
    assert_eq!(stats.data_pages + stats.zero_pages, memory.layout().total_pages());
    drop(memory);
    let image = snapshot::SnapshotImage::open(&path, Some(&layout_1gib())).unwrap();
    let mut src = image.page_source(32).unwrap();
    let seq = sequential_pass(&mut src, 512);
    assert_eq!(seq.zero_marked, zero_pages);
    random_pass(&mut src);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A scratch directory on the project's disk (O_DIRECT needs a real filesystem, not tmpfs).
pub fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
