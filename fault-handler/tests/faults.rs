//! Real userfaultfd faults: a thread reads destination guest memory it has never touched, blocks
//! in the kernel, and the fault loop resolves each fault with an urgent read over TCP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_fault_handler::{run_fault_loop, DestinationMemory, FaultQueue, FaultStats, InstallMode};
use ferry_transport::pattern::{check_page, fill_memory};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageIndex, PreSharedKey};
use rand::{Rng, SeedableRng};

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"fault handler test key, 32 bytes").unwrap()
}

fn faults_over(backing: Backing) {
    let layout = MemoryLayout::single(64 << 20).unwrap();
    let source = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    fill_memory(&source, 9).unwrap();
    let server = TcpPageServer::start("127.0.0.1:0", source, key(), TcpOptions::default()).unwrap();
    let mut lanes = tcp::connect(server.local_addr(), &key(), Some(&layout), &TcpOptions::default()).unwrap();
    let dest = Arc::new(DestinationMemory::register(GuestMemory::create(layout, backing).unwrap()).unwrap());
    assert_eq!(dest.mode(), if backing == Backing::Anonymous { InstallMode::Copy } else { InstallMode::Continue });
    let stats = Arc::new(FaultStats::default());
    let queue = Arc::new(FaultQueue::new(64));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (dest, stats, queue, stop) = (dest.clone(), stats.clone(), queue.clone(), stop.clone());
        std::thread::spawn(move || run_fault_loop(&dest, &mut lanes.urgent, None, &queue, &stats, &stop))
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut page = vec![0u8; 4096];
    let mut touched = std::collections::HashSet::new();
    for _ in 0..2000 {
        let p = rng.random_range(0..16384u64);
        touched.insert(p);
        dest.guest().regions()[0].read(p * 4096, &mut page).unwrap();
        assert!(check_page(&page, p, 9), "page {p} differs after its fault");
    }
    stop.store(true, Ordering::Release);
    handler.join().unwrap().unwrap();
    assert_eq!(FaultStats::get(&stats.network_faults), touched.len() as u64, "one network fault per page touched");
    assert_eq!(dest.states().present_count(), touched.len() as u64);
    assert_eq!(dest.states().installed_twice(), 0);
    assert!(!queue.is_empty(), "faults become pivots");
}

#[test]
fn anonymous_memory_faults_are_served_with_copy() {
    faults_over(Backing::Anonymous);
}

#[test]
fn memfd_memory_faults_are_served_in_place_with_continue() {
    faults_over(Backing::Memfd);
}

#[test]
fn discarded_pages_are_never_fetched_and_read_as_zero() {
    let layout = MemoryLayout::single(16 << 20).unwrap();
    let source = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    fill_memory(&source, 9).unwrap();
    let server = TcpPageServer::start("127.0.0.1:0", source, key(), TcpOptions::default()).unwrap();
    let mut lanes = tcp::connect(server.local_addr(), &key(), Some(&layout), &TcpOptions::default()).unwrap();
    let dest = Arc::new(DestinationMemory::register(GuestMemory::create(layout, Backing::Anonymous).unwrap()).unwrap());
    let stats = Arc::new(FaultStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (dest, stats, stop) = (dest.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || run_fault_loop(&dest, &mut lanes.urgent, None, &FaultQueue::new(8), &stats, &stop))
    };
    let region = &dest.guest().regions()[0];
    // The guest discards pages 100..200 before touching them, as a balloon inflating would.
    let base = region.host_addr().as_ptr();
    // SAFETY: MADV_DONTNEED on a page-aligned range of this test's own guest mapping only drops
    // pages; the kernel reports it to the fault thread as UFFD_EVENT_REMOVE before returning.
    let rc = unsafe { libc::madvise(base.add(100 * 4096).cast(), 100 * 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    let mut page = vec![0u8; 4096];
    for p in 100..200u64 {
        page.fill(0xAA);
        region.read(p * 4096, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "discarded page {p} must read as zero");
    }
    region.read(50 * 4096, &mut page).unwrap();
    assert!(check_page(&page, 50, 9), "a page outside the discarded range still arrives");
    stop.store(true, Ordering::Release);
    handler.join().unwrap().unwrap();
    assert_eq!(FaultStats::get(&stats.discarded_pages), 100);
    assert_eq!(FaultStats::get(&stats.network_faults), 1, "only page 50 crossed the network");
    assert_eq!(FaultStats::get(&stats.local_faults), 100);
    assert_eq!(
        server.stats().data_pages.load(Ordering::Relaxed) + server.stats().zero_pages.load(Ordering::Relaxed),
        1
    );
}

/// A REMOVE processed while a bulk read is in flight: the read's data must not be installed over
/// the discarded pages, which read as zero; the rest of the run arrives.
#[test]
fn pages_discarded_while_in_flight_stay_zero() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let layout = MemoryLayout::single(16 << 20).unwrap();
        let source = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
        fill_memory(&source, 9).unwrap();
        let server = TcpPageServer::start("127.0.0.1:0", source, key(), TcpOptions::default()).unwrap();
        let lanes = tcp::connect(server.local_addr(), &key(), Some(&layout), &TcpOptions::default()).unwrap();
        let dest = Arc::new(DestinationMemory::register(GuestMemory::create(layout, backing).unwrap()).unwrap());
        let stats = Arc::new(FaultStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ferry_transport::PageSource { mut urgent, mut bulk, .. } = lanes;
        let handler = {
            let (dest, stats, stop) = (dest.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || run_fault_loop(&dest, &mut urgent, None, &FaultQueue::new(8), &stats, &stop))
        };
        let states = dest.states();
        // Pages 100..108 are claimed and read on the bulk lane ...
        let claim = states.claim_up(PageIndex(100), 8).unwrap();
        let run = states.to_run(&claim);
        bulk.submit(ferry_transport::BulkRead { run, buf: ferry_transport::PageBuf::new(8 * 4096).into(), tag: 0 })
            .unwrap();
        let done = bulk.complete().unwrap().unwrap();
        // ... and while the read was in flight the guest discarded pages 102 and 103.
        assert_eq!(states.discard(PageIndex(102), 2), 0, "already claimed: nothing new to claim");
        dest.install(&claim, &done.buf, &done.zero, &stats).unwrap();
        let region = &dest.guest().regions()[0];
        let mut page = vec![0u8; 4096];
        for p in 100..108u64 {
            page.fill(0xAA);
            region.read(p * 4096, &mut page).unwrap();
            if (102..104).contains(&p) {
                assert!(page.iter().all(|&b| b == 0), "{backing:?}: discarded page {p} must read zero");
            } else {
                assert!(check_page(&page, p, 9), "{backing:?}: page {p} must hold the source's data");
            }
        }
        stop.store(true, Ordering::Release);
        handler.join().unwrap().unwrap();
        assert_eq!(states.installed_twice(), 0, "{backing:?}");
        assert_eq!(
            FaultStats::get(&stats.network_faults),
            0,
            "{backing:?}: nothing was fetched for the discarded pages"
        );
    }
}

/// Zero pages are marked present without an install: a thread touching one before the memory is
/// released reads zeros (the fault thread maps a zero page), and a thread already waiting on one
/// is woken. Releasing with pages missing is refused.
fn zero_pages_left_absent(backing: Backing) {
    let layout = MemoryLayout::single(8 << 20).unwrap();
    let source = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    let server = TcpPageServer::start("127.0.0.1:0", source, key(), TcpOptions::default()).unwrap();
    let mut lanes = tcp::connect(server.local_addr(), &key(), Some(&layout), &TcpOptions::default()).unwrap();
    let dest = Arc::new(DestinationMemory::register(GuestMemory::create(layout, backing).unwrap()).unwrap());
    dest.begin_use();
    let (stats, stop) = (Arc::new(FaultStats::default()), Arc::new(AtomicBool::new(false)));
    let handler = {
        let (dest, stats, stop) = (dest.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || run_fault_loop(&dest, &mut lanes.urgent, None, &FaultQueue::new(8), &stats, &stop))
    };
    let pages = dest.states().pages();
    let zero = dest.states().claim_up(PageIndex(0), (pages / 2) as u32).unwrap();
    // A thread that faults on a claimed page waits for its install.
    let waiter = {
        let dest = dest.clone();
        std::thread::spawn(move || {
            let mut b = vec![1u8; 4096];
            dest.guest().regions()[0].read(5 * 4096, &mut b).unwrap();
            b
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    dest.install_zero(&zero).unwrap();
    assert!(waiter.join().unwrap().iter().all(|&b| b == 0), "woken, and the page reads as zero");
    let mut b = vec![1u8; 4096];
    dest.guest().regions()[0].read(7 * 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "touched before release: a zero page");
    dest.guest().regions()[0].write(9 * 4096, &[3u8; 4096]).unwrap();
    assert!(matches!(dest.release(), Err(ferry_fault_handler::FaultError::InvalidMemory(_))), "pages are missing");
    let rest = dest.states().claim_up(PageIndex(pages / 2), (pages / 2) as u32).unwrap();
    dest.install_zero(&rest).unwrap();
    dest.release().unwrap();
    dest.release().unwrap();
    stop.store(true, Ordering::Release);
    handler.join().unwrap().unwrap();
    dest.guest().regions()[0].read(9 * 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3), "a write to a zero page before release stays");
    dest.guest().regions()[0].read(pages * 4096 - 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "after release the kernel serves untouched pages as zero");
    assert_eq!(FaultStats::get(&stats.network_faults), 0, "no zero page crossed");
}

#[test]
fn anonymous_zero_pages_are_left_absent_until_touched() {
    zero_pages_left_absent(Backing::Anonymous);
}

#[test]
fn memfd_zero_pages_are_left_absent_until_touched() {
    zero_pages_left_absent(Backing::Memfd);
}
