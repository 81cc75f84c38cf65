//! The order each policy fetches in, checked page by page, and the property that every policy,
//! under any interleaving of faults, claims every page exactly once.

use ferry_fault_handler::{Claim, PageIndex, PageStates};
use ferry_prepager::{BatchSizer, Bubbling, Demand, Policy, PolicyKind, Push};
use ferry_transport::GuestAddr;
use ferry_transport::{MemoryLayout, RegionLayout};
use proptest::prelude::*;

fn states(pages: u64) -> PageStates {
    PageStates::new(&MemoryLayout::single(pages * 4096).unwrap())
}

fn spans(policy: &mut dyn Policy, s: &PageStates, max: u32, n: usize) -> Vec<(u64, u32)> {
    (0..n).filter_map(|_| policy.next(s, max).map(|c| (c.first().0, c.count()))).collect()
}

#[test]
fn demand_fetches_nothing() {
    let s = states(100);
    assert_eq!(Demand.next(&s, 8), None);
}

#[test]
fn push_sweeps_in_address_order_around_claimed_pages() {
    let s = states(20);
    let _fault = s.claim(PageIndex(5)).unwrap();
    let mut p = Push::default();
    assert_eq!(spans(&mut p, &s, 4, 10), vec![(0, 4), (4, 1), (6, 4), (10, 4), (14, 4), (18, 2)]);
}

#[test]
fn a_bubble_grows_both_ways_from_its_pivot_and_stops_at_claimed_pages() {
    let s = states(100);
    let _sent = s.claim_up(PageIndex(40), 5).unwrap(); // pages 40..45 already sent
    let _fault = s.claim(PageIndex(50)).unwrap();
    let mut b = Bubbling::default();
    b.on_fault(PageIndex(50));
    assert_eq!(
        spans(&mut b, &s, 4, 4),
        vec![(51, 4), (46, 4), (55, 4), (45, 1)],
        "up, down, up, then down meets page 44 and that side stops"
    );
    assert_eq!(spans(&mut b, &s, 4, 2), vec![(59, 4), (63, 4)], "only the upward side still grows");
}

#[test]
fn newest_pivot_first_then_older_bubbles_then_push() {
    let s = states(64);
    let mut b = Bubbling::default();
    for pivot in [10, 40] {
        let _fault = s.claim(PageIndex(pivot)).unwrap();
        b.on_fault(PageIndex(pivot));
    }
    assert_eq!(spans(&mut b, &s, 2, 2), vec![(41, 2), (38, 2)], "the newest pivot (40) grows first");
    let _fault = s.claim(PageIndex(60)).unwrap();
    b.on_fault(PageIndex(60));
    assert_eq!(spans(&mut b, &s, 8, 2), vec![(61, 3), (52, 8)]);
    // Bubble 60 finishes (its down side meets 43.. after two more steps), then 40 resumes, then 10.
    let rest = spans(&mut b, &s, 8, 64);
    let covered: u64 = rest.iter().map(|&(_, n)| u64::from(n)).sum();
    assert_eq!(covered + 2 + 2 + 3 + 8 + 3, 64, "every page claimed once in the end");
}

#[test]
fn bubbles_stop_at_region_edges() {
    let layout = MemoryLayout::new(
        4096,
        vec![
            RegionLayout { guest_phys_addr: GuestAddr(0), size: 10 * 4096 },
            RegionLayout { guest_phys_addr: GuestAddr(1 << 30), size: 10 * 4096 },
        ],
    )
    .unwrap();
    let s = PageStates::new(&layout);
    let _fault = s.claim(PageIndex(8)).unwrap();
    let mut b = Bubbling::default();
    b.on_fault(PageIndex(8));
    assert_eq!(spans(&mut b, &s, 4, 3), vec![(9, 1), (4, 4), (0, 4)], "the up side stops at region 0's end");
}

#[test]
fn batch_size_follows_bandwidth() {
    let mut z = BatchSizer::new(4096, 1024);
    assert_eq!(z.pages(), 16);
    z.record(4 << 30, std::time::Duration::from_secs(1)); // 4 GiB/s: 100 us is ~105 pages
    assert_eq!(z.pages(), 104);
    let mut slow = BatchSizer::new(4096, 1024);
    slow.record(10 << 20, std::time::Duration::from_secs(1));
    assert_eq!(slow.pages(), 1);
}

proptest! {
    /// Random faults interleaved with pre-pager steps: every page is claimed by exactly one of
    /// them, and when the policy has nothing left, a push sweep (the session's finish) claims the rest.
    #[test]
    fn every_policy_claims_every_page_exactly_once(
        kind in prop_oneof![Just(PolicyKind::Demand), Just(PolicyKind::Push), Just(PolicyKind::Bubbling)],
        pages in 1u64..600,
        steps in prop::collection::vec((any::<bool>(), any::<u64>(), 1u32..40), 0..300),
    ) {
        let s = states(pages);
        let mut policy = kind.build();
        let mut owner = vec![0u32; pages as usize];
        let take = |c: Claim, owner: &mut Vec<u32>| {
            for p in c.pages() {
                owner[p.0 as usize] += 1;
            }
        };
        for (fault, at, max) in steps {
            if fault {
                let page = at % pages;
                if let Some(c) = s.claim(PageIndex(page)) {
                    take(c, &mut owner);
                }
                policy.on_fault(PageIndex(page));
            } else if let Some(c) = policy.next(&s, max) {
                prop_assert!(c.count() >= 1 && c.count() <= max);
                take(c, &mut owner);
            }
        }
        let mut finish = Push::default();
        while let Some(c) = policy.next(&s, 16).or_else(|| finish.next(&s, 16)) {
            take(c, &mut owner);
        }
        prop_assert!(owner.iter().all(|&n| n == 1), "claims per page: {:?}", owner);
    }
}

#[test]
fn replay_fetches_the_working_set_in_order_coalescing_runs_then_defers() {
    let s = states(100);
    let _fault = s.claim(PageIndex(31)).unwrap();
    let order = std::sync::Arc::new([30, 31, 32, 33, 7, 8, 90, 91, 92, 93, 94, 200].map(PageIndex).to_vec());
    let mut r = ferry_prepager::Replay::new(order, Box::new(Push::default()));
    assert_eq!(
        spans(&mut r, &s, 4, 6),
        // 30 alone (31 was claimed by a fault), then 32..34, 7..9, 90..94 in runs of at most 4,
        // 94; page 200 lies outside the guest; then the push sweep from page 0.
        vec![(30, 1), (32, 2), (7, 2), (90, 4), (94, 1), (0, 4)]
    );
    assert_eq!(r.replayed(), 10);
    assert_eq!(r.replayed_pages(), 10);
}

#[test]
fn replay_jumps_past_a_fault_further_along_the_set() {
    let s = states(100);
    let order = std::sync::Arc::new([10, 20, 30, 40, 50, 60].map(PageIndex).to_vec());
    let mut r = ferry_prepager::Replay::new(order, Box::new(Demand));
    assert_eq!(spans(&mut r, &s, 1, 1), vec![(10, 1)]);
    // The guest overtook the replay: it faulted on 40 (claimed by the fault thread).
    let _fault = s.claim(PageIndex(40)).unwrap();
    r.on_fault(PageIndex(40));
    // 20 and 30 are behind the guest now: the replay goes on from 50.
    assert_eq!(spans(&mut r, &s, 1, 3), vec![(50, 1), (60, 1)]);
    // A fault behind the replay's position moves nothing.
    r.on_fault(PageIndex(10));
    assert_eq!(spans(&mut r, &s, 1, 1), Vec::<(u64, u32)>::new());
}
