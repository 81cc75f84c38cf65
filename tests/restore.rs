//! Snapshots saved and restored without KVM: a patterned two-region guest with free pages and a
//! state blob is saved, then restored eagerly and lazily (anonymous and memfd destinations) while
//! a thread touches random pages, every byte verified; a working set recorded by one lazy restore
//! is fetched first by the next; an image of another layout is refused.

use std::sync::Arc;

use ferry::engine::EngineConfig;
use ferry::fault_handler::DestinationMemory;
use ferry::prepager::PolicyKind;
use ferry::restore::{restore_eager, save, LazyRestore, WorkingSet};
use ferry::transport::pattern::{check_page, fill_memory};
use ferry::transport::snapshot::SnapshotImage;
use ferry::transport::{Backing, GuestMemory, MemoryLayout, RegionLayout};
use ferry::FreePages;

const SEED: u64 = 77;

fn layout() -> MemoryLayout {
    MemoryLayout::new(
        4096,
        vec![
            RegionLayout { guest_phys_addr: ferry::transport::GuestAddr(0), size: 24 << 20 },
            RegionLayout { guest_phys_addr: ferry::transport::GuestAddr(1 << 32), size: 8 << 20 },
        ],
    )
    .unwrap()
}

/// Pages 1000..3000 are free: saved as holes, restored as zero.
fn is_free(p: u64) -> bool {
    (1000..3000).contains(&p)
}

fn saved(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("restore-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let memory = GuestMemory::create(layout(), Backing::Anonymous).unwrap();
    fill_memory(&memory, SEED).unwrap();
    let mut free = FreePages::new(layout().total_pages());
    free.set_range(ferry::PageIndex(1000), 2000);
    let path = dir.join("guest.img");
    let w = save(&path, &memory, b"vcpu state", &free).unwrap();
    assert_eq!(w.free_pages, 2000);
    path
}

/// Every page of `memory`: the pattern, or zero for a free page.
fn verify(memory: &GuestMemory) -> u64 {
    let ps = 4096usize;
    let mut page = vec![0u8; ps];
    let mut wrong = 0;
    let mut g = 0u64;
    for region in memory.regions() {
        for p in 0..(region.len() / ps) as u64 {
            region.read(p * ps as u64, &mut page).unwrap();
            let ok = if is_free(g) { page.iter().all(|&b| b == 0) } else { check_page(&page, g, SEED) };
            wrong += u64::from(!ok);
            g += 1;
        }
    }
    wrong
}

#[test]
fn eager_restore_reads_every_data_page_and_nothing_else() {
    let path = saved("eager");
    let image = SnapshotImage::open(&path, Some(&layout())).unwrap();
    let memory = GuestMemory::create(layout(), Backing::Anonymous).unwrap();
    let r = restore_eager(&image, &memory).unwrap();
    let zero_pattern =
        (0..layout().total_pages()).filter(|&p| !is_free(p) && ferry::transport::pattern::page_is_zero(p));
    assert_eq!(r.pages_read, layout().total_pages() - 2000 - zero_pattern.count() as u64);
    assert_eq!(image.state(), b"vcpu state");
    assert_eq!(verify(&memory), 0);
}

fn lazy(path: &std::path::Path, backing: Backing, config: &EngineConfig) -> ferry::DestinationReport {
    let image = SnapshotImage::open(path, Some(&layout())).unwrap();
    let memory = Arc::new(DestinationMemory::register(GuestMemory::create(layout(), backing).unwrap()).unwrap());
    let mut state = Vec::new();
    let restore = LazyRestore::start(&image, memory.clone(), config, |s| {
        state = s.to_vec();
        Ok(())
    })
    .unwrap();
    assert_eq!(state, b"vcpu state");
    // The guest stand-in touches pages while they arrive: each must already be right.
    let watchdog = ferry::toucher::EngineWatchdog::start(restore.engine().failure_watch());
    let total = layout().total_pages();
    let mut page = vec![0u8; 4096];
    let bases = layout().region_bases();
    for i in 0..3000u64 {
        let g = (i * 7919) % total;
        let region = bases.partition_point(|&b| b <= g) - 1;
        memory.guest().regions()[region].read((g - bases[region]) * 4096, &mut page).unwrap();
        let ok = if is_free(g) { page.iter().all(|&b| b == 0) } else { check_page(&page, g, SEED) };
        assert!(ok, "page {g} was wrong when first touched");
    }
    if config.policy == PolicyKind::Demand {
        restore.engine().finish();
    }
    drop(watchdog);
    let report = restore.wait().unwrap();
    assert_eq!(verify(memory.guest()), 0);
    assert_eq!(report.pages_installed_twice, 0);
    assert!(report.skipped_free_pages >= 2000, "free and zero pages are never read: {report:?}");
    report
}

#[test]
fn lazy_restore_serves_faults_from_the_image_on_both_backings() {
    let path = saved("lazy");
    for backing in [Backing::Anonymous, Backing::Memfd] {
        for policy in PolicyKind::ALL {
            let r = lazy(&path, backing, &EngineConfig { policy, ..EngineConfig::default() });
            assert_eq!(r.policy, policy.name());
        }
    }
}

#[test]
fn a_recorded_working_set_is_fetched_first_next_time() {
    let path = saved("replay");
    let recorded = lazy(
        &path,
        Backing::Anonymous,
        &EngineConfig { policy: PolicyKind::Demand, record_first_faults: true, ..EngineConfig::default() },
    );
    assert!(!recorded.first_faults.is_empty(), "demand paging records every first touch");
    let ws_path = WorkingSet::path_for(&path);
    WorkingSet { pages: recorded.first_faults.clone() }.save(&ws_path).unwrap();
    let ws = WorkingSet::load(&ws_path, layout().total_pages()).unwrap();
    assert_eq!(ws.pages, recorded.first_faults);
    let config = ws.replay_config(PolicyKind::Bubbling, &EngineConfig::default());
    let replayed = lazy(&path, Backing::Anonymous, &config);
    assert!(replayed.replayed_pages > 0, "{replayed:?}");
}

#[test]
fn an_image_of_another_layout_is_refused() {
    let path = saved("layout");
    let image = SnapshotImage::open(&path, None).unwrap();
    let other = MemoryLayout::single(32 << 20).unwrap();
    let memory =
        Arc::new(DestinationMemory::register(GuestMemory::create(other.clone(), Backing::Anonymous).unwrap()).unwrap());
    let err = LazyRestore::start(&image, memory, &EngineConfig::default(), |_| Ok(())).unwrap_err();
    assert!(
        matches!(err, ferry::MigrationError::Transport(ferry::transport::TransportError::LayoutMismatch(_))),
        "{err}"
    );
    let plain = GuestMemory::create(other, Backing::Anonymous).unwrap();
    assert!(restore_eager(&image, &plain).is_err());
}
