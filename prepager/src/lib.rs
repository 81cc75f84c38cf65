//! `ferry-prepager` decides which pages a post-copy destination fetches next on the bulk lane.
//! A policy sees every fault (a pivot) and, when the bulk lane has room, claims the next run from
//! the page states: `demand` claims nothing (faults only), `push` sweeps memory in address order
//! (active push), and `bubbling` (Hines & Gopalan, VEE'09) grows a bubble outward from each pivot in
//! both directions, newest pivot first, each side stopping where it meets pages already claimed;
//! when no bubble can grow it continues the push sweep; [`Replay`] fetches a recorded working set
//! first, in its order, then defers to another policy. [`BatchSizer`] sizes runs to the link's
//! measured bandwidth. Policies are pure logic over [`PageStates`], so their order is testable
//! without a transport.

#![deny(missing_docs)]

use std::collections::VecDeque;
use std::time::Duration;

use ferry_fault_handler::{Claim, PageIndex, PageStates};

/// Chooses the next pages to fetch.
pub trait Policy: Send {
    /// The policy's name in reports (`demand`, `push`, `bubbling`, ...).
    fn name(&self) -> &'static str;
    /// A fault happened on `page` (the fault thread has already claimed or found it).
    fn on_fault(&mut self, page: PageIndex);
    /// Claims the next run of at most `max_pages` pages, or `None` when this policy has nothing
    /// more to fetch now.
    fn next(&mut self, states: &PageStates, max_pages: u32) -> Option<Claim>;
    /// Pages this policy claimed around fault pivots so far (bubbles), as opposed to its sweep.
    fn pivot_pages(&self) -> u64 {
        0
    }
    /// Pages this policy claimed from a recorded working set so far ([`Replay`]).
    fn replayed_pages(&self) -> u64 {
        0
    }
}

/// The pre-paging policies a user chooses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Faults only: nothing is fetched that the guest did not touch.
    Demand,
    /// Faults, and a sweep from the first page to the last.
    Push,
    /// Faults, and a bubble growing outward both ways from the latest fault (Hines & Gopalan).
    Bubbling,
}

impl PolicyKind {
    /// Every policy, in the order reports list them.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Demand, PolicyKind::Push, PolicyKind::Bubbling];

    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::Demand => Box::new(Demand),
            PolicyKind::Push => Box::new(Push::default()),
            PolicyKind::Bubbling => Box::new(Bubbling::default()),
        }
    }

    /// The policy's name in reports and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Demand => "demand",
            PolicyKind::Push => "push",
            PolicyKind::Bubbling => "bubbling",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown pre-pager {s:?}: demand, push or bubbling"))
    }
}

/// Faults only: nothing is fetched in the background.
#[derive(Debug, Default)]
pub struct Demand;

impl Policy for Demand {
    fn name(&self) -> &'static str {
        "demand"
    }
    fn on_fault(&mut self, _page: PageIndex) {}
    fn next(&mut self, _states: &PageStates, _max_pages: u32) -> Option<Claim> {
        None
    }
}

/// Active push: every page in address order, skipping pages already claimed.
#[derive(Debug, Default)]
pub struct Push {
    cursor: PageIndex,
}

impl Policy for Push {
    fn name(&self) -> &'static str {
        "push"
    }
    fn on_fault(&mut self, _page: PageIndex) {}
    fn next(&mut self, states: &PageStates, max_pages: u32) -> Option<Claim> {
        loop {
            let page = states.next_unclaimed(self.cursor).or_else(|| states.next_unclaimed(PageIndex(0)))?;
            if let Some(claim) = states.claim_up(page, max_pages) {
                self.cursor = PageIndex(claim.first().0 + u64::from(claim.count()));
                return Some(claim);
            }
            // Claimed by the fault thread between the scan and the claim: look again.
            self.cursor = page;
        }
    }
}

/// The page before `page`, if there is one.
fn below(page: PageIndex) -> Option<PageIndex> {
    page.0.checked_sub(1).map(PageIndex)
}

/// Most bubbles tracked at once; a newer fault evicts the oldest bubble.
pub const MAX_BUBBLES: usize = 64;

#[derive(Debug)]
struct Bubble {
    /// Next page to take below the pivot, if that side is still growing.
    down: Option<PageIndex>,
    /// Next page to take above the pivot, if that side is still growing.
    up: Option<PageIndex>,
    next_up: bool,
}

/// Bubbling pre-paging: bubbles grow out of fault pivots, newest first, then active push.
#[derive(Debug, Default)]
pub struct Bubbling {
    /// Newest at the back.
    bubbles: VecDeque<Bubble>,
    push: Push,
    pivot_pages: u64,
}

impl Policy for Bubbling {
    fn name(&self) -> &'static str {
        "bubbling"
    }

    fn on_fault(&mut self, page: PageIndex) {
        if self.bubbles.len() == MAX_BUBBLES {
            self.bubbles.pop_front();
        }
        self.bubbles.push_back(Bubble { down: below(page), up: page.checked_add(1), next_up: true });
    }

    fn next(&mut self, states: &PageStates, max_pages: u32) -> Option<Claim> {
        while let Some(b) = self.bubbles.back_mut() {
            // Alternate sides so a bubble grows both ways at the same pace.
            for _ in 0..2 {
                let up = b.next_up;
                b.next_up = !b.next_up;
                let claim = if up {
                    b.up.and_then(|p| states.claim_up(p, max_pages))
                } else {
                    b.down.and_then(|p| states.claim_down(p, max_pages))
                };
                let side = if up { &mut b.up } else { &mut b.down };
                match claim {
                    Some(c) => {
                        // Fewer pages than asked means the side met claimed pages or a region edge.
                        let full = c.count() == max_pages;
                        *side = match (full, up) {
                            (false, _) => None,
                            (true, true) => c.first().checked_add(u64::from(c.count())),
                            (true, false) => below(c.first()),
                        };
                        self.pivot_pages += u64::from(c.count());
                        return Some(c);
                    }
                    None => *side = None,
                }
            }
            if b.up.is_none() && b.down.is_none() {
                self.bubbles.pop_back();
            }
        }
        self.push.next(states, max_pages)
    }

    fn pivot_pages(&self) -> u64 {
        self.pivot_pages
    }
}

/// Working-set replay (after REAP, ASPLOS'21): the pages a previous run of the guest touched
/// first, in that order (consecutive pages fetched as one run), then `then`. A fault on a page
/// further along the set means the guest has overtaken the replay: it jumps to just past that
/// page, so what it fetches next is what the guest needs next, not what it already passed.
/// Faults also go to `then`, whose bubbles grow once the set is in.
pub struct Replay {
    order: std::sync::Arc<Vec<PageIndex>>,
    /// Where each page first appears in `order`.
    position: std::collections::HashMap<PageIndex, usize>,
    next: usize,
    then: Box<dyn Policy>,
    replayed: u64,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").field("next", &self.next).field("of", &self.order.len()).finish_non_exhaustive()
    }
}

impl Replay {
    /// Claims the pages of `order` first (a recorded working set), then what `then` chooses.
    pub fn new(order: std::sync::Arc<Vec<PageIndex>>, then: Box<dyn Policy>) -> Self {
        let mut position = std::collections::HashMap::with_capacity(order.len());
        for (i, &page) in order.iter().enumerate() {
            position.entry(page).or_insert(i);
        }
        Replay { order, position, next: 0, then, replayed: 0 }
    }

    /// Pages claimed from the working set so far.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }
}

impl Policy for Replay {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn on_fault(&mut self, page: PageIndex) {
        if let Some(&at) = self.position.get(&page) {
            self.next = self.next.max(at + 1);
        }
        self.then.on_fault(page);
    }

    fn next(&mut self, states: &PageStates, max_pages: u32) -> Option<Claim> {
        while let Some(&first) = self.order.get(self.next) {
            self.next += 1;
            if first.0 >= states.pages() || states.is_claimed(first) {
                continue;
            }
            let mut n = 1u32;
            while n < max_pages && self.order.get(self.next) == Some(&PageIndex(first.0 + u64::from(n))) {
                n += 1;
                self.next += 1;
            }
            if let Some(claim) = states.claim_up(first, n) {
                // Stopped short at a claimed page or a region's end: the rest are looked at again.
                self.next -= (n - claim.count()) as usize;
                self.replayed += u64::from(claim.count());
                return Some(claim);
            }
        }
        self.then.next(states, max_pages)
    }

    fn pivot_pages(&self) -> u64 {
        self.then.pivot_pages()
    }

    fn replayed_pages(&self) -> u64 {
        self.replayed
    }
}

/// Sizes bulk runs to the link: a run should take about `target` to transfer at the measured
/// bandwidth, so fast links get long runs and a fault's neighbours still arrive soon on slow ones.
#[derive(Debug)]
pub struct BatchSizer {
    page_size: u64,
    min_pages: u32,
    max_pages: u32,
    target: Duration,
    /// Exponentially weighted bandwidth estimate in bytes per second.
    bandwidth: Option<f64>,
}

impl BatchSizer {
    /// A sizer for pages of `page_size` bytes, runs of at most `max_pages`.
    pub fn new(page_size: u64, max_pages: u32) -> Self {
        BatchSizer {
            page_size,
            min_pages: 1,
            max_pages: max_pages.max(1),
            target: Duration::from_micros(100),
            bandwidth: None,
        }
    }

    /// Records that `bytes` arrived over `elapsed` of bulk-lane time.
    pub fn record(&mut self, bytes: u64, elapsed: Duration) {
        if elapsed.is_zero() {
            return;
        }
        let sample = bytes as f64 / elapsed.as_secs_f64();
        self.bandwidth = Some(match self.bandwidth {
            None => sample,
            Some(bw) => 0.8 * bw + 0.2 * sample,
        });
    }

    /// The bandwidth estimate, in bytes per second, once a read was recorded.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// Pages for the next run.
    pub fn pages(&self) -> u32 {
        let Some(bw) = self.bandwidth else { return 16.clamp(self.min_pages, self.max_pages) };
        let pages = (bw * self.target.as_secs_f64() / self.page_size as f64) as u64;
        pages.clamp(u64::from(self.min_pages), u64::from(self.max_pages)) as u32
    }
}
