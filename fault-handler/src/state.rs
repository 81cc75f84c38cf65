//! Page state across all regions of a guest: absent -> in flight (claimed) -> present, one atomic
//! bitmap per state. Whoever sets a page's claimed bit (the fault thread or the pre-pager) is the
//! only one that reads and installs it, so a page is requested once and installed once.
//!
//! Pages are numbered globally: region 0's pages first, then region 1's, and so on. A claim never
//! crosses a region boundary.

use std::sync::atomic::{AtomicU64, Ordering};

use ferry_transport::{MemoryLayout, PageIndex, PageRun};

/// A run of pages this caller has claimed and must install. Only [`PageStates`] creates claims,
/// and it hands out each page in at most one; a claim remembers which `PageStates` issued it.
#[derive(Debug, PartialEq, Eq)]
pub struct Claim {
    first: u64,
    count: u32,
    owner: usize,
}

impl Claim {
    /// The claim's first page.
    pub fn first(&self) -> PageIndex {
        PageIndex(self.first)
    }

    /// Pages in the claim.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The claim's pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageIndex> {
        (self.first..self.first + u64::from(self.count)).map(PageIndex)
    }

    /// `(first, count)`, for comparisons in tests and logs.
    pub fn span(&self) -> (PageIndex, u32) {
        (PageIndex(self.first), self.count)
    }

    pub(crate) fn issued_by(&self, states: &PageStates) -> bool {
        self.owner == states as *const PageStates as usize
    }
}

#[derive(Debug)]
struct Bitmap(Box<[AtomicU64]>);

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets the bit; true if this call set it.
    fn set(&self, i: u64) -> bool {
        let mask = 1 << (i % 64);
        self.0[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// Sets all 64 bits of word `w` if none was set; true if this call did.
    fn set_word_if_clear(&self, w: u64) -> bool {
        self.0[w as usize].compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Sets all 64 bits of word `w`; returns how many were clear.
    fn set_word(&self, w: u64) -> u32 {
        self.0[w as usize].fetch_or(u64::MAX, Ordering::AcqRel).count_zeros()
    }

    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// First clear bit in `from..to`.
    fn next_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let word = self.0[(i / 64) as usize].load(Ordering::Acquire) | ((1u64 << (i % 64)) - 1);
            if word != u64::MAX {
                let bit = (i / 64) * 64 + u64::from(word.trailing_ones());
                return (bit < to).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

/// Per-page state of a guest whose memory is arriving.
#[derive(Debug)]
pub struct PageStates {
    pages: u64,
    /// Global index of each region's first page, plus the total at the end.
    bounds: Vec<u64>,
    claimed: Bitmap,
    present: Bitmap,
    discarded: Bitmap,
    present_count: AtomicU64,
    installed_twice: AtomicU64,
}

impl PageStates {
    /// Every page of `layout` absent and unclaimed.
    pub fn new(layout: &MemoryLayout) -> Self {
        let mut bounds = vec![0];
        for i in 0..layout.regions().len() as u32 {
            bounds.push(bounds.last().copied().unwrap_or(0) + layout.region_pages(i).expect("region in range"));
        }
        let pages = layout.total_pages();
        PageStates {
            pages,
            bounds,
            claimed: Bitmap::new(pages),
            present: Bitmap::new(pages),
            discarded: Bitmap::new(pages),
            present_count: AtomicU64::new(0),
            installed_twice: AtomicU64::new(0),
        }
    }

    /// Pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The pages `start..end` of the region holding `page`.
    pub fn region_span(&self, page: PageIndex) -> (PageIndex, PageIndex) {
        let (start, end) = self.span_of(page.0);
        (PageIndex(start), PageIndex(end))
    }

    fn span_of(&self, page: u64) -> (u64, u64) {
        let i = self.bounds.partition_point(|&b| b <= page) - 1;
        (self.bounds[i], self.bounds[i + 1])
    }

    /// Converts a claim (which never crosses a region) to a transport run.
    pub fn to_run(&self, claim: &Claim) -> PageRun {
        let i = self.bounds.partition_point(|&b| b <= claim.first) - 1;
        PageRun::new(i as u32, claim.first - self.bounds[i], claim.count)
    }

    /// The index of page `page` of region `region` (counted from the region's start).
    pub fn global(&self, region: u32, page: u64) -> PageIndex {
        PageIndex(self.bounds[region as usize] + page)
    }

    /// Claims one page; `None` if it was already claimed.
    pub fn claim(&self, PageIndex(page): PageIndex) -> Option<Claim> {
        (page < self.pages && self.claimed.set(page)).then(|| self.issue(page, 1))
    }

    /// Claims up to `max` consecutive pages upward from `start`, stopping at the first page already
    /// claimed or at the end of `start`'s region.
    pub fn claim_up(&self, PageIndex(start): PageIndex, max: u32) -> Option<Claim> {
        if start >= self.pages {
            return None;
        }
        let (_, end) = self.span_of(start);
        let mut n = 0;
        while n < max && start + u64::from(n) < end {
            let page = start + u64::from(n);
            // A whole clear word at once: claiming the zero pages of a large guest before it
            // resumes must not cost an atomic operation per page.
            if page % 64 == 0 && max - n >= 64 && page + 64 <= end && self.claimed.set_word_if_clear(page / 64) {
                n += 64;
            } else if self.claimed.set(page) {
                n += 1;
            } else {
                break;
            }
        }
        (n > 0).then(|| self.issue(start, n))
    }

    /// Claims up to `max` consecutive pages downward from `start` (inclusive), stopping at the
    /// first page already claimed or at the start of `start`'s region.
    pub fn claim_down(&self, PageIndex(start): PageIndex, max: u32) -> Option<Claim> {
        if start >= self.pages {
            return None;
        }
        let (begin, _) = self.span_of(start);
        let mut n = 0u32;
        while n < max && start >= begin + u64::from(n) && self.claimed.set(start - u64::from(n)) {
            n += 1;
        }
        (n > 0).then(|| self.issue(start + 1 - u64::from(n), n))
    }

    fn issue(&self, first: u64, count: u32) -> Claim {
        Claim { first, count, owner: self as *const PageStates as usize }
    }

    /// A view of one page that claims nothing, for resolving faults on pages already present.
    pub(crate) fn present_page(&self, PageIndex(page): PageIndex) -> Claim {
        self.issue(page, 1)
    }

    /// Whether page `page` is claimed (being fetched or present).
    pub fn is_claimed(&self, PageIndex(page): PageIndex) -> bool {
        self.claimed.get(page)
    }

    /// Whether page `page` is present.
    pub fn is_present(&self, PageIndex(page): PageIndex) -> bool {
        self.present.get(page)
    }

    /// Whether page `page` was discarded by the guest (reads as zero, never fetched).
    pub fn is_discarded(&self, PageIndex(page): PageIndex) -> bool {
        self.discarded.get(page)
    }

    /// First unclaimed page at or after `from`, in any region.
    pub fn next_unclaimed(&self, PageIndex(from): PageIndex) -> Option<PageIndex> {
        self.claimed.next_clear(from, self.pages).map(PageIndex)
    }

    /// Records a claim as installed. A page installed twice is counted, never hidden.
    pub fn mark_present(&self, claim: &Claim) {
        let (mut fresh, mut twice) = (0, 0);
        let end = claim.first + u64::from(claim.count);
        let mut p = claim.first;
        while p < end {
            if p % 64 == 0 && p + 64 <= end {
                let clear = u64::from(self.present.set_word(p / 64));
                fresh += clear;
                twice += 64 - clear;
                p += 64;
            } else {
                if self.present.set(p) {
                    fresh += 1;
                } else {
                    twice += 1;
                }
                p += 1;
            }
        }
        if twice > 0 {
            self.installed_twice.fetch_add(twice, Ordering::Relaxed);
        }
        self.present_count.fetch_add(fresh, Ordering::AcqRel);
    }

    /// Marks the pages for which `valid(page)` holds as claimed and present: they arrived before
    /// this state existed (pre-copy rounds of a hybrid migration).
    pub fn mark_valid(&self, valid: impl Fn(PageIndex) -> bool) {
        // A word of pages per atomic update, not a page: registering a kept image of 2 GiB with
        // most pages valid took 5 ms of downtime page by page.
        let mut words = vec![0u64; self.present.0.len()];
        for p in (0..self.pages).filter(|&p| valid(PageIndex(p))) {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.mark_present_words(&words);
    }

    /// Marks the pages set in `words` (one bit per global page) claimed and present, a word at a
    /// time: zero and free pages known before the guest runs, which are never installed. Returns
    /// how many were not present yet. Bits past the last page must be clear.
    pub fn mark_present_words(&self, words: &[u64]) -> u64 {
        let mut fresh = 0;
        for (i, &w) in words.iter().enumerate().take(self.present.0.len()).filter(|(_, &w)| w != 0) {
            self.claimed.0[i].fetch_or(w, Ordering::AcqRel);
            let before = self.present.0[i].fetch_or(w, Ordering::AcqRel);
            fresh += u64::from((w & !before).count_ones());
        }
        self.present_count.fetch_add(fresh, Ordering::AcqRel);
        fresh
    }

    /// Marks pages the guest discarded: they read as zero and must never be filled from the source.
    /// Returns how many of them were not claimed yet.
    pub fn discard(&self, PageIndex(first): PageIndex, count: u64) -> u64 {
        let mut unclaimed = 0;
        for p in first..(first + count).min(self.pages) {
            self.discarded.set(p);
            if self.claimed.set(p) {
                unclaimed += 1;
            }
            if self.present.set(p) {
                self.present_count.fetch_add(1, Ordering::AcqRel);
            }
        }
        unclaimed
    }

    /// Pages present.
    pub fn present_count(&self) -> u64 {
        self.present_count.load(Ordering::Acquire)
    }

    /// Whether every page is present.
    pub fn all_present(&self) -> bool {
        self.present_count() == self.pages
    }

    /// Pages installed more than once (a healthy run installs none twice).
    pub fn installed_twice(&self) -> u64 {
        self.installed_twice.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::{GuestAddr, RegionLayout};

    fn two_regions() -> PageStates {
        let l = MemoryLayout::new(
            4096,
            vec![
                RegionLayout { guest_phys_addr: GuestAddr(0), size: 100 * 4096 },
                RegionLayout { guest_phys_addr: GuestAddr(1 << 30), size: 50 * 4096 },
            ],
        )
        .unwrap();
        PageStates::new(&l)
    }

    #[test]
    fn claims_are_exclusive_and_stop_at_claimed_pages_and_regions() {
        let s = two_regions();
        assert_eq!(s.claim(PageIndex(10)).map(|c| c.span()), Some((PageIndex(10), 1)));
        assert_eq!(s.claim(PageIndex(10)), None);
        assert_eq!(s.claim_up(PageIndex(5), 100).map(|c| c.span()), Some((PageIndex(5), 5)));
        assert_eq!(s.claim_down(PageIndex(20), 100).map(|c| c.span()), Some((PageIndex(11), 10)));
        assert_eq!(
            s.claim_up(PageIndex(95), 100).map(|c| c.span()),
            Some((PageIndex(95), 5)),
            "stops at region 0's end"
        );
        let c = s.claim_down(PageIndex(101), 100).unwrap();
        assert_eq!(c.span(), (PageIndex(100), 2), "stops at region 1's start");
        assert_eq!(s.to_run(&c), PageRun::new(1, 0, 2));
        assert_eq!(s.next_unclaimed(PageIndex(0)), Some(PageIndex(0)));
        assert_eq!(s.next_unclaimed(PageIndex(5)), Some(PageIndex(21)));
        assert_eq!(s.claim_up(PageIndex(150), 1), None);
    }

    #[test]
    fn whole_words_are_claimed_and_marked_at_once_but_never_over_a_claimed_page() {
        let l =
            MemoryLayout::new(4096, vec![RegionLayout { guest_phys_addr: GuestAddr(0), size: 1000 * 4096 }]).unwrap();
        let s = PageStates::new(&l);
        let _fault = s.claim(PageIndex(200)).unwrap();
        let c = s.claim_up(PageIndex(10), 500).unwrap();
        assert_eq!(c.span(), (PageIndex(10), 190), "words 64..128 and 128..192 at once, then page by page to 200");
        assert!(
            (10..200).all(|p| s.is_claimed(PageIndex(p)))
                && !s.is_claimed(PageIndex(201))
                && !s.is_claimed(PageIndex(9))
        );
        s.mark_present(&c);
        assert_eq!(s.present_count(), 190);
        assert!(
            (10..200).all(|p| s.is_present(PageIndex(p)))
                && !s.is_present(PageIndex(9))
                && !s.is_present(PageIndex(200))
        );
        let again = s.claim_up(PageIndex(640), 64).unwrap();
        s.mark_present(&again);
        s.mark_present(&s.present_page(PageIndex(700)));
        s.mark_present(&again);
        assert_eq!(s.installed_twice(), 65, "a word marked twice counts every page in it");
        assert_eq!(s.present_count(), 254);
    }

    #[test]
    fn known_zero_pages_are_marked_a_word_at_a_time() {
        let s = two_regions();
        let _fault = s.claim(PageIndex(3)).unwrap();
        let mut words = vec![0u64; 3];
        words[0] = 0b1110; // pages 1, 2, 3
        words[2] = 1 << 20; // page 148
        assert_eq!(s.mark_present_words(&words), 4);
        assert!(
            s.is_present(PageIndex(1))
                && s.is_present(PageIndex(3))
                && s.is_present(PageIndex(148))
                && !s.is_present(PageIndex(4))
        );
        assert!(s.is_claimed(PageIndex(2)) && s.claim(PageIndex(148)).is_none(), "nobody fetches them");
        assert_eq!(s.mark_present_words(&words), 0, "already present");
        assert_eq!(s.present_count(), 4);
    }

    #[test]
    fn presence_counts_and_double_installs_are_seen() {
        let s = two_regions();
        let c = s.claim_up(PageIndex(0), 150).unwrap();
        assert_eq!(c.count, 100);
        s.mark_present(&c);
        assert_eq!(s.present_count(), 100);
        s.mark_present(&s.present_page(PageIndex(0)));
        assert_eq!(s.installed_twice(), 1);
        assert_eq!(s.discard(PageIndex(100), 50), 50);
        assert!(s.all_present());
        assert!(s.is_discarded(PageIndex(120)));
        assert_eq!(s.next_unclaimed(PageIndex(0)), None);
    }
}
