//! Post-copy end to end in one process (the two-process version is `toucher_processes.rs`): a
//! source page server, a destination whose guest memory is registered with userfaultfd, and a
//! toucher thread playing the guest. Checks: every byte verified, every non-free page crossed
//! exactly once, free pages never crossed and read as zero, nothing installed twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::toucher::{demo_free_pages, prepare_source, touch, verify_all, Pattern};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use ferry::{run_source, DestinationConfig, PostcopyDestination};

const SEED: u64 = 77;

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"postcopy test key, thirty-two by").unwrap()
}

struct Outcome {
    dest: ferry::DestinationReport,
    source: ferry::SourceReport,
    touch_mismatches: u64,
    verify_mismatches: u64,
    served_pages: u64,
    served_twice: u64,
    free_pages: u64,
}

fn migrate(layout: MemoryLayout, dest_backing: Backing, pattern: Pattern, policy: PolicyKind, touches: u64) -> Outcome {
    let pages = layout.total_pages();
    let free = demo_free_pages(pages);
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    prepare_source(&source_mem, SEED, &free).unwrap();
    let server = Arc::new(TcpPageServer::start("127.0.0.1:0", source_mem, key(), TcpOptions::default()).unwrap());
    let source = {
        let (server, free) = (server.clone(), free.clone());
        std::thread::spawn(move || {
            let mut control = server.accept_control(Duration::from_secs(10)).unwrap();
            run_source(&mut control, Instant::now(), &SEED.to_le_bytes(), &free).unwrap()
        })
    };
    let (lanes, control) =
        tcp::connect_session(server.local_addr(), &key(), Some(&layout), &TcpOptions::default()).unwrap();
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout, dest_backing).unwrap()).unwrap());
    let mut seed_seen = 0;
    let dest = PostcopyDestination::start(
        Box::new(control),
        memory.clone(),
        lanes,
        &DestinationConfig { policy, ..DestinationConfig::default() },
        |state| {
            seed_seen = u64::from_le_bytes(state.try_into().map_err(|_| "state blob is not a seed")?);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seed_seen, SEED, "the state blob arrives intact");
    let touched = touch(memory.guest(), pattern, SEED, &free, touches, 0).unwrap();
    dest.finish();
    let report = dest.wait().unwrap();
    let verify_mismatches = verify_all(memory.guest(), SEED, &free).unwrap();
    let source = source.join().unwrap();
    let stats = server.stats();
    Outcome {
        dest: report,
        source,
        touch_mismatches: touched.mismatches,
        verify_mismatches,
        served_pages: stats.data_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed),
        served_twice: stats.pages_served_twice.load(Ordering::Relaxed),
        free_pages: free.count(),
    }
}

fn check(o: &Outcome) {
    assert_eq!(o.touch_mismatches, 0, "the guest saw a page that differs from the source");
    assert_eq!(o.verify_mismatches, 0, "memory differs from the source after migration");
    assert_eq!(o.dest.pages_installed_twice, 0);
    assert_eq!(o.served_twice, 0, "a page crossed twice");
    assert_eq!(o.served_pages, o.dest.pages_total - o.free_pages, "every non-free page crossed once, no free page did");
    assert_eq!(o.dest.skipped_free_pages, o.free_pages);
    assert_eq!(o.dest.urgent_pages + o.dest.bulk_pages + o.dest.skipped_free_pages, o.dest.pages_total);
    assert_eq!(o.source.done.pages_present, o.dest.pages_total);
    assert!(o.source.downtime <= o.source.total);
}

#[test]
fn every_policy_and_pattern_over_tcp() {
    let layout = MemoryLayout::single(64 << 20).unwrap();
    for policy in PolicyKind::ALL {
        for pattern in Pattern::ALL {
            let o = migrate(layout.clone(), Backing::Anonymous, pattern, policy, 16384);
            check(&o);
            if policy == PolicyKind::Demand {
                assert!(o.dest.network_faults > 0, "{pattern:?}: demand paging faults over the network");
            }
        }
    }
}

#[test]
fn memfd_destination_fills_in_place() {
    let o =
        migrate(MemoryLayout::single(64 << 20).unwrap(), Backing::Memfd, Pattern::Random, PolicyKind::Bubbling, 8192);
    check(&o);
}
