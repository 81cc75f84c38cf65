//! Automatic link recovery: the source's page server breaks the session's data lanes again and
//! again while a guest stand-in touches memory and the pre-pager brings the rest; the destination
//! reopens each lane under the same session and asks again for what was in flight. Every page
//! arrives right, none is installed twice, and every page the source served twice is one the
//! destination asked again for (a resend, counted apart), never a duplicate install.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::toucher::{demo_free_pages, prepare_source, touch, verify_all, Pattern, Walk};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use ferry::{EngineConfig, Liveness, PostcopyDestination};

const SEED: u64 = 5;

/// One migration of a 64 MiB guest with `cuts` breaks of the data lanes, spread over its pages.
fn migrate_with_cuts(policy: PolicyKind, backing: Backing, cuts: u64) {
    let layout = MemoryLayout::single(64 << 20).unwrap();
    let pages = layout.total_pages();
    let free = demo_free_pages(pages);
    let source_mem = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    prepare_source(&source_mem, SEED, &free).unwrap();
    let key = PreSharedKey::generate().unwrap();
    let server = Arc::new(TcpPageServer::start("127.0.0.1:0", source_mem, key.clone(), TcpOptions::default()).unwrap());
    let source = {
        let (server, free) = (server.clone(), free.clone());
        std::thread::spawn(move || {
            let mut control = server.accept_control(Duration::from_secs(30)).unwrap();
            ferry::run_source(&mut control, Instant::now(), &SEED.to_le_bytes(), &free, Liveness::default())
        })
    };
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout.clone(), backing).unwrap()).unwrap());
    let (lanes, control) =
        tcp::connect_session(server.local_addr(), &key, Some(&layout), &TcpOptions::default()).unwrap();
    let config = EngineConfig { policy, recovery_window: Duration::from_secs(20), ..EngineConfig::default() };
    let session = PostcopyDestination::start(Box::new(control), memory.clone(), lanes, &config, |_| Ok(())).unwrap();
    // Cut at evenly spread fractions of the pages present, so the cuts land mid-migration
    // however fast this machine is.
    let done = Arc::new(AtomicBool::new(false));
    let cutter = {
        let (server, memory, done) = (server.clone(), memory.clone(), done.clone());
        std::thread::spawn(move || {
            let mut made = 0;
            while made < cuts && !done.load(Ordering::Acquire) {
                let present = memory.states().present_count();
                if present >= (made + 1) * pages / (cuts + 2) {
                    server.cut_data_lanes();
                    made += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            made
        })
    };
    let during = touch(memory.guest(), Walk::new(Pattern::Random), SEED, &free, pages / 4).unwrap();
    session.finish();
    let report = session.wait().unwrap();
    done.store(true, Ordering::Release);
    let made = cutter.join().unwrap();
    let source_report = source.join().unwrap().unwrap();
    let wrong = verify_all(memory.guest(), SEED, &free).unwrap();
    let served_twice = server.stats().pages_served_twice.load(Ordering::Relaxed);
    eprintln!(
        "{policy:?}/{backing:?}: {made} cuts, {} recoveries, {} pages resent, {served_twice} served twice, paused {:?}, {} wrong",
        report.recoveries, report.resent_pages, report.paused, wrong + during.mismatches
    );
    assert_eq!(wrong + during.mismatches, 0, "guest memory differs from the source");
    assert_eq!(report.pages_installed_twice, 0);
    assert!(made > 0, "no cut landed before the migration ended");
    assert!(report.recoveries > 0, "{made} cuts, no recovery");
    assert!(served_twice <= report.resent_pages, "{served_twice} pages served twice, {} resent", report.resent_pages);
    assert_eq!(source_report.done.pages_present, pages);
}

/// 60 cuts here and 40 in the KVM test: 100 per CI run.
#[test]
fn cut_data_lanes_recover_and_the_migration_completes() {
    migrate_with_cuts(PolicyKind::Bubbling, Backing::Anonymous, 15);
    migrate_with_cuts(PolicyKind::Push, Backing::Memfd, 15);
    migrate_with_cuts(PolicyKind::Demand, Backing::Anonymous, 15);
    migrate_with_cuts(PolicyKind::Bubbling, Backing::Memfd, 15);
}
