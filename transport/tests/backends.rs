//! Every backend moves a 1 GiB, two-region image in sequential runs (bulk lane) and in shuffled
//! runs of random length (urgent and bulk lanes mixed); every byte of every page is verified against
//! the pattern it was written with, and every page is read exactly once per pass.

use ferry_transport::GuestAddr;
use std::sync::Arc;

use ferry_transport::lane::{BulkRead, PageBuf, PageSource};
use ferry_transport::pattern::{check_page, fill_memory, page_is_zero};
use ferry_transport::tcp::{self, TcpOptions};
use ferry_transport::{local, snapshot, Backing, GuestMemory, MemoryLayout, PageRun, PreSharedKey, RegionLayout};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x5eed_f00d;

fn layout_1gib() -> MemoryLayout {
    two_regions(1 << 30)
}

/// Three quarters below 4 GiB, a quarter above, like a PC guest.
fn two_regions(total: u64) -> MemoryLayout {
    MemoryLayout::new(
        4096,
        vec![
            RegionLayout { guest_phys_addr: GuestAddr(0), size: total / 4 * 3 },
            RegionLayout { guest_phys_addr: GuestAddr(4 << 30), size: total / 4 },
        ],
    )
    .unwrap()
}

fn source_memory(backing: Backing) -> Arc<GuestMemory> {
    source_memory_of(layout_1gib(), backing)
}

fn source_memory_of(layout: MemoryLayout, backing: Backing) -> Arc<GuestMemory> {
    let memory = GuestMemory::create(layout, backing).unwrap();
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
            bases: layout.region_bases(),
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
    sequential_pass_into(src, run_pages, false)
}

/// With `lane_buffers`, reads land in buffers the lane made (registered, for RDMA).
fn sequential_pass_into(src: &mut PageSource, run_pages: u32, lane_buffers: bool) -> Verifier {
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
            let buf =
                if lane_buffers { src.bulk.buffer(n as usize * ps).unwrap() } else { PageBuf::new(n as usize * ps) };
            src.bulk.submit(BulkRead { run, buf: buf.into(), tag: p }).unwrap();
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

#[cfg(feature = "rdma")]
mod rdma {
    //! Need an RDMA device: `scripts/rdma-softroce.sh` runs them on soft-RoCE inside a VM; on a
    //! host without one each says SKIPPED.

    use std::ptr::NonNull;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use ferry_transport::lane::{BulkTarget, MappedRange};
    use ferry_transport::rdma::{self, RdmaOptions, RdmaPageServer};
    use ferry_transport::{RegionMapping, TransportError};

    use super::*;

    fn device(test: &str) -> bool {
        match rdma::device_names() {
            Ok(names) if !names.is_empty() => true,
            other => {
                use std::io::Write;
                let why = match other {
                    Ok(_) => "no RDMA device on this host".to_owned(),
                    Err(e) => e.to_string(),
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {test}: {why} (scripts/rdma-softroce.sh runs it on soft-RoCE)"
                );
                false
            }
        }
    }

    /// 32 MiB: soft-RoCE under emulation moves about ten MB/s.
    fn small_source(backing: Backing) -> Arc<GuestMemory> {
        source_memory_of(two_regions(32 << 20), backing)
    }

    fn server(memory: &Arc<GuestMemory>, options: &RdmaOptions) -> RdmaPageServer {
        RdmaPageServer::start("127.0.0.1:0", memory.clone(), key(), options.clone()).unwrap()
    }

    #[test]
    fn rdma_moves_every_page_once_per_pass_from_anonymous_and_memfd_sources() {
        if !device("rdma_moves_every_page_once_per_pass_from_anonymous_and_memfd_sources") {
            return;
        }
        let options = RdmaOptions::default();
        for backing in [Backing::Anonymous, Backing::Memfd] {
            let memory = small_source(backing);
            let server = server(&memory, &options);
            let total = memory.layout().total_pages();
            let passes: [&dyn Fn(&mut PageSource); 3] = [
                &|src| drop(sequential_pass_into(src, 16, false)),
                &|src| drop(sequential_pass_into(src, 64, true)),
                &|src| drop(random_pass(src)),
            ];
            for pass in passes {
                let (mut src, ledger) =
                    rdma::connect(server.local_addr(), &key(), Some(memory.layout()), &options).unwrap();
                assert_eq!(src.session, server.session());
                pass(&mut src);
                assert_eq!(ledger.pages_read.load(Ordering::Relaxed), total);
                assert_eq!(ledger.pages_read_twice.load(Ordering::Relaxed), 0);
            }
            assert!(server.stats().destinations.load(Ordering::Relaxed) >= 3);
        }
    }

    #[test]
    fn rdma_bulk_reads_complete_when_none_of_them_was_signalled() {
        if !device("rdma_bulk_reads_complete_when_none_of_them_was_signalled") {
            return;
        }
        // One read in eight is signalled and the lane is never filled, so every wait below needs
        // the lane's own signalled marker; completions are checked in submission order.
        let options = RdmaOptions { signal_every: 8, bulk_depth: 32, ..Default::default() };
        let memory = small_source(Backing::Memfd);
        let server = server(&memory, &options);
        let (mut src, ledger) = rdma::connect(server.local_addr(), &key(), Some(memory.layout()), &options).unwrap();
        let mut v = Verifier::new(&src.layout);
        let mut page = 0;
        for batch in [3u64, 1, 5, 2] {
            for _ in 0..batch {
                let run = PageRun::new(0, page, 2);
                src.bulk.submit(BulkRead { run, buf: PageBuf::new(2 * 4096).into(), tag: page }).unwrap();
                page += 2;
            }
            let mut tags = Vec::new();
            while src.bulk.in_flight() > 0 {
                let done = src.bulk.complete().unwrap().unwrap();
                v.check(done.run, &done.buf, &done.zero);
                tags.push(done.tag);
            }
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "completions out of order: {tags:?}");
            assert_eq!(tags.len() as u64, batch);
            assert!(src.bulk.complete().unwrap().is_none());
        }
        assert_eq!(ledger.pages_read.load(Ordering::Relaxed), page);
    }

    #[test]
    fn rdma_reads_land_in_a_registered_alias_of_destination_memory() {
        if !device("rdma_reads_land_in_a_registered_alias_of_destination_memory") {
            return;
        }
        let options = RdmaOptions::default();
        let memory = small_source(Backing::Memfd);
        let server = server(&memory, &options);
        let layout = memory.layout().clone();
        let (mut src, _) = rdma::connect(server.local_addr(), &key(), Some(&layout), &options).unwrap();
        let ps = layout.page_size() as usize;
        // The destination's guest memory and the alias it fills, as post-copy's continue mode has.
        let dest: Vec<RegionMapping> =
            layout.regions().iter().map(|r| RegionMapping::create(r.size as usize, Backing::Memfd).unwrap()).collect();
        let aliases: Vec<RegionMapping> = dest.iter().map(|m| m.alias().unwrap()).collect();
        for a in &aliases {
            // SAFETY: the aliases outlive `src` (dropped at the end of the test, after it).
            unsafe {
                src.urgent.register_landing(a.host_addr(), a.len()).unwrap();
                src.bulk.register_landing(a.host_addr(), a.len()).unwrap();
            }
        }
        for (region, alias) in aliases.iter().enumerate() {
            let pages = layout.region_pages(region as u32).unwrap();
            let mut p = 0;
            while p < pages {
                let n = (pages - p).min(32) as u32;
                let run = PageRun::new(region as u32, p, n);
                let ptr = alias.raw_range_mut(p * ps as u64, n as usize * ps).unwrap();
                if p % 3 == 0 {
                    // SAFETY: the range is mapped by `alias` and nothing else touches it now.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), n as usize * ps) };
                    src.urgent.read(run, dst).unwrap();
                } else {
                    if src.bulk.in_flight() == src.bulk.depth() {
                        src.bulk.complete().unwrap().unwrap();
                    }
                    // SAFETY: as above; the range is lent to the lane until its completion.
                    let target = unsafe { MappedRange::new(NonNull::new(ptr.as_ptr()).unwrap(), n as usize * ps) };
                    src.bulk.submit(BulkRead { run, buf: BulkTarget::Mapped(target), tag: p }).unwrap();
                }
                p += u64::from(n);
            }
        }
        while src.bulk.complete().unwrap().is_some() {}
        // Every byte is now in the destination's memory, read through its own mapping.
        let bases = layout.region_bases();
        let mut page = vec![0u8; ps];
        for (region, m) in dest.iter().enumerate() {
            for p in 0..layout.region_pages(region as u32).unwrap() {
                m.read(p * ps as u64, &mut page).unwrap();
                let g = bases[region] + p;
                assert!(check_page(&page, g, SEED), "page {g} did not land in the destination");
            }
        }
        drop(src);
    }

    #[test]
    fn rdma_refuses_a_wrong_key_fails_cleanly_when_the_source_goes_and_resumes() {
        if !device("rdma_refuses_a_wrong_key_fails_cleanly_when_the_source_goes_and_resumes") {
            return;
        }
        // Short transport timeouts so a vanished peer is noticed in milliseconds.
        let options =
            RdmaOptions { ack_timeout: 8, retry_count: 2, io_timeout: Duration::from_secs(5), ..Default::default() };
        let memory = small_source(Backing::Memfd);
        let server = server(&memory, &options);
        let wrong = PreSharedKey::new(*b"not the key, also 32 bytes long!").unwrap();
        let refused = rdma::connect(server.local_addr(), &wrong, None, &options);
        assert!(matches!(refused, Err(TransportError::AuthFailed(_) | TransportError::Refused { .. })), "{refused:?}");

        let (mut src, _) = rdma::connect(server.local_addr(), &key(), Some(memory.layout()), &options).unwrap();
        let mut buf = src.urgent.buffer(4096).unwrap();
        src.urgent.read(PageRun::new(0, 0, 1), &mut buf).unwrap();
        assert!(check_page(&buf, 0, SEED));
        // Out of range before anything is posted.
        assert!(src.urgent.read(PageRun::new(0, u64::MAX / 2, 1), &mut buf).is_err());

        // The source destroys our queue pairs: reads fail with an error, not a hang.
        server.drop_connections();
        std::thread::sleep(Duration::from_millis(100));
        let err = src.urgent.read(PageRun::new(0, 1, 1), &mut buf).unwrap_err();
        assert!(matches!(err, TransportError::Rdma { .. }), "{err}");
        let again = src.urgent.read(PageRun::new(0, 2, 1), &mut buf).unwrap_err();
        assert!(again.to_string().contains("failed earlier"), "{again}");
        src.bulk.submit(BulkRead { run: PageRun::new(0, 3, 4), buf: PageBuf::new(4 * 4096).into(), tag: 1 }).unwrap();
        assert!(matches!(src.bulk.complete(), Err(TransportError::Rdma { .. })));

        // The session's own Reconnect opens each lane again (what the engine does after a lane
        // failed), and the failed reads succeed on it.
        let reconnect = src.reconnect.clone().expect("an rdma session can reopen its lanes");
        let mut urgent = reconnect.urgent().unwrap();
        let mut page = urgent.buffer(4096).unwrap();
        urgent.read(PageRun::new(0, 1, 1), &mut page).unwrap();
        assert!(check_page(&page, 1, SEED));
        let mut bulk = reconnect.bulk().unwrap();
        bulk.submit(BulkRead { run: PageRun::new(0, 3, 4), buf: PageBuf::new(4 * 4096).into(), tag: 1 }).unwrap();
        let done = bulk.complete().unwrap().expect("a read in flight");
        for i in 0..4 {
            assert!(check_page(&done.buf[i * 4096..(i + 1) * 4096], 3 + i as u64, SEED));
        }
        drop((urgent, bulk));

        // The same session resumes over new queue pairs and the failed reads succeed.
        let (mut resumed, _) =
            rdma::resume(server.local_addr(), &key(), src.session, memory.layout(), &options).unwrap();
        assert_eq!(resumed.session, src.session);
        let mut buf = resumed.urgent.buffer(4096).unwrap();
        resumed.urgent.read(PageRun::new(0, 1, 1), &mut buf).unwrap();
        assert!(check_page(&buf, 1, SEED));
        let mut big = vec![0u8; 4 * 4096];
        resumed.urgent.read(PageRun::new(0, 3, 4), &mut big).unwrap();
        for i in 0..4 {
            assert!(check_page(&big[i * 4096..(i + 1) * 4096], 3 + i as u64, SEED));
        }
        // A destination that authenticates and then sends a malformed setup request is dropped
        // and counted; the server goes on serving.
        let mut raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
        ferry_transport::handshake::client_handshake(
            &mut raw,
            &key(),
            ferry_transport::Lane::Bulk,
            ferry_transport::SessionId::NEW,
            None,
        )
        .unwrap();
        ferry_transport::wire::write_session(&mut raw, &[1, 2, 3]).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut byte = [0u8; 1];
        assert!(matches!(std::io::Read::read(&mut raw, &mut byte), Ok(0) | Err(_)), "the server kept a bad setup");
        assert_eq!(server.stats().failed_setups.load(Ordering::Relaxed), 1);
        resumed.urgent.read(PageRun::new(0, 9, 1), &mut buf).unwrap();
        assert!(check_page(&buf, 9, SEED));

        // Another session's id is refused.
        let other = ferry_transport::SessionId([7; 16]);
        assert!(rdma::resume(server.local_addr(), &key(), other, memory.layout(), &options).is_err());
    }
}

/// A scratch directory on the project's disk (O_DIRECT needs a real filesystem, not tmpfs).
pub fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
