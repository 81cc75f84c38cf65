//! A rust-vmm VMM's guest memory migrated post-copy: both ends hold `vm-memory`'s
//! `GuestMemoryMmap`, hand it to ferry with `GuestMemory::from_vm_memory`, and the destination
//! VMM reads every byte back through its own handle.
#![cfg(feature = "vm-memory")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{GuestMemory, PreSharedKey};
use ferry::{EngineConfig, FreePages, PostcopyDestination, SourceOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGIONS: [(u64, usize); 2] = [(0, 8 << 20), (1 << 32, 4 << 20)];

/// Every page different: its guest address and a fill byte derived from it.
fn page_bytes(gpa: u64) -> Vec<u8> {
    let mut page = vec![(gpa >> 12) as u8 ^ 0x5a; 4096];
    page[..8].copy_from_slice(&gpa.to_le_bytes());
    page
}

fn vmm_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
}

#[test]
fn a_guest_memory_mmap_migrates_post_copy() {
    let source_vmm = vmm_memory();
    for &(base, len) in &REGIONS {
        for gpa in (base..base + len as u64).step_by(4096) {
            source_vmm.write_slice(&page_bytes(gpa), GuestAddress(gpa)).unwrap();
        }
    }
    let source = Arc::new(GuestMemory::from_vm_memory(&source_vmm, 4096).unwrap());
    let layout = source.layout().clone();
    let key = PreSharedKey::generate().unwrap();
    let server = Arc::new(TcpPageServer::start("127.0.0.1:0", source, key.clone(), TcpOptions::default()).unwrap());
    let source_side = {
        let server = server.clone();
        let pages = layout.total_pages();
        std::thread::spawn(move || {
            let mut control = server.accept_control(Duration::from_secs(30)).unwrap();
            ferry::run_source(
                &mut control,
                Instant::now(),
                b"vcpu state",
                &FreePages::new(pages),
                &SourceOptions::default(),
            )
        })
    };

    let destination_vmm = vmm_memory();
    let memory =
        Arc::new(DestinationMemory::register(GuestMemory::from_vm_memory(&destination_vmm, 4096).unwrap()).unwrap());
    let (lanes, control) =
        tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default()).unwrap();
    let config = EngineConfig { policy: PolicyKind::Bubbling, ..EngineConfig::default() };
    let session = PostcopyDestination::start(Box::new(control), memory, lanes, &config, |state| {
        assert_eq!(state, b"vcpu state");
        Ok(())
    })
    .unwrap();
    // The "vCPU": the VMM reads a page in the second region through its own handle while memory
    // arrives (a fault served on the urgent lane, or a page already there).
    let gpa = REGIONS[1].0 + 3 * 4096;
    let mut page = vec![0u8; 4096];
    destination_vmm.read_slice(&mut page, GuestAddress(gpa)).unwrap();
    assert_eq!(page, page_bytes(gpa));
    let report = session.wait().unwrap();
    source_side.join().unwrap().unwrap();
    assert_eq!(report.pages_total, layout.total_pages());
    for &(base, len) in &REGIONS {
        for gpa in (base..base + len as u64).step_by(4096) {
            destination_vmm.read_slice(&mut page, GuestAddress(gpa)).unwrap();
            assert_eq!(page, page_bytes(gpa), "page at {gpa:#x}");
        }
    }
}
