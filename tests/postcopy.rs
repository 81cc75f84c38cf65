//! Post-copy end to end in one process (`toucher_processes.rs` runs it between two): checks that
//! every byte arrives, every non-free page crosses exactly once, free pages never cross and read
//! as zero, nothing is installed twice, and the counters add up.

use ferry::loopback::{migrate, LoopbackConfig, LoopbackOutcome, LoopbackTransport};
use ferry::prepager::PolicyKind;
use ferry::toucher::Pattern;
use ferry::transport::{Backing, MemoryLayout};

fn check(o: &LoopbackOutcome) {
    assert_eq!(o.during.mismatches + o.after.mismatches, 0, "the guest saw a page that differs from the source");
    assert_eq!(o.verify_mismatches, 0, "memory differs from the source after migration");
    assert_eq!(o.dest.pages_installed_twice, 0);
    if let (Some(served), Some(twice)) = (o.served_pages, o.served_twice) {
        assert_eq!(twice, 0, "a page crossed twice");
        assert_eq!(served, o.dest.pages_total - o.free_pages, "every non-free page crossed once, no free page did");
    }
    assert_eq!(o.dest.skipped_free_pages, o.free_pages);
    assert_eq!(o.dest.urgent_pages + o.dest.bulk_pages + o.dest.skipped_free_pages, o.dest.pages_total);
    assert_eq!(o.source.done.pages_present, o.dest.pages_total);
    assert!(o.source.downtime <= o.source.total);
}

fn config(pattern: Pattern, policy: PolicyKind, backing: Backing) -> LoopbackConfig {
    LoopbackConfig {
        transport: LoopbackTransport::Tcp,
        layout: MemoryLayout::single(64 << 20).unwrap(),
        dest_backing: backing,
        pattern,
        policy,
        touches: 16384,
    }
}

#[test]
fn every_policy_and_pattern_over_tcp() {
    for policy in PolicyKind::ALL {
        for pattern in Pattern::ALL {
            let o = migrate(&config(pattern, policy, Backing::Anonymous)).unwrap();
            check(&o);
            if policy == PolicyKind::Demand {
                assert!(o.dest.network_faults > 0, "{pattern:?}: demand paging faults over the network");
                assert_eq!(Some(o.dest.bulk_pages + o.dest.urgent_pages), o.served_pages);
            }
        }
    }
}

#[test]
fn every_policy_over_the_local_transport() {
    for policy in PolicyKind::ALL {
        for dest in [Backing::Anonymous, Backing::Memfd] {
            let o = migrate(&LoopbackConfig {
                transport: LoopbackTransport::Local,
                ..config(Pattern::HotSet, policy, dest)
            })
            .unwrap();
            check(&o);
            assert_eq!(o.served_pages, None, "local reads are one-sided: the source serves nothing");
        }
    }
}

#[test]
fn memfd_destination_fills_in_place() {
    check(&migrate(&config(Pattern::Random, PolicyKind::Bubbling, Backing::Memfd)).unwrap());
}

#[test]
fn bubbling_turns_sequential_faults_into_local_ones() {
    let demand = migrate(&config(Pattern::Sequential, PolicyKind::Demand, Backing::Anonymous)).unwrap();
    let bubbling = migrate(&config(Pattern::Sequential, PolicyKind::Bubbling, Backing::Anonymous)).unwrap();
    check(&demand);
    check(&bubbling);
    assert!(
        bubbling.dest.network_faults < demand.dest.network_faults,
        "bubbling {} network faults, demand {}",
        bubbling.dest.network_faults,
        demand.dest.network_faults
    );
}
