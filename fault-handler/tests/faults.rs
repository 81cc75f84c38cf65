//! Real userfaultfd faults: a thread reads destination guest memory it has never touched, blocks
//! in the kernel, and the fault loop resolves each fault with an urgent read over TCP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_fault_handler::{run_fault_loop, DestinationMemory, FaultQueue, FaultStats, InstallMode};
use ferry_transport::pattern::{check_page, fill_memory};
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
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
        std::thread::spawn(move || run_fault_loop(&dest, lanes.urgent.as_mut(), &queue, &stats, &stop))
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
