//! A bitmap of guest pages. Post-copy uses it for the pages the guest reported free (the paper's
//! dynamic self-ballooning: they never cross and appear at the destination as zero pages);
//! pre-copy for the pages dirtied in a round.

use ferry_transport::PageIndex;

/// One bit per global page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreePages {
    words: Vec<u64>,
    pages: u64,
}

impl FreePages {
    /// A map of `pages` pages, none marked.
    pub fn new(pages: u64) -> Self {
        FreePages { words: vec![0; pages.div_ceil(64) as usize], pages }
    }

    /// Rebuilds a bitmap received from a peer; `None` if its size does not fit `pages` or it
    /// marks pages past the end.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Option<Self> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        let tail = pages % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(FreePages { words, pages })
    }

    /// The bitmap's words (page `p` is bit `p % 64` of word `p / 64`), as it travels on the wire.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Pages the map covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks page `page`.
    pub fn set(&mut self, PageIndex(page): PageIndex) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Marks `count` pages from `first`.
    pub fn set_range(&mut self, PageIndex(first): PageIndex, count: u64) {
        for p in first..first.saturating_add(count).min(self.pages) {
            self.set(PageIndex(p));
        }
    }

    /// Whether page `page` is marked.
    pub fn is_free(&self, PageIndex(page): PageIndex) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Every page set.
    pub fn all(pages: u64) -> Self {
        let mut b = FreePages::new(pages);
        b.set_range(PageIndex(0), pages);
        b
    }

    /// Sets every page set in `other` (same size).
    pub fn union_with(&mut self, other: &FreePages) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes `other`'s pages from these (pages past either end are unaffected).
    pub fn subtract(&mut self, other: &FreePages) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// Flips every page: set pages become clear and clear ones set.
    pub fn invert(&mut self) {
        for w in &mut self.words {
            *w = !*w;
        }
        let tail = self.pages % 64;
        if let (true, Some(last)) = (tail != 0, self.words.last_mut()) {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// Pages marked.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The marked pages, in order.
    pub fn marked(&self) -> impl Iterator<Item = PageIndex> + '_ {
        self.words.iter().enumerate().filter(|(_, &w)| w != 0).flat_map(|(i, &w)| {
            (0..64).filter(move |bit| w & (1 << bit) != 0).map(move |bit| PageIndex(i as u64 * 64 + bit))
        })
    }

    /// Maximal runs `(first, count)` of set pages. Skips empty and full 64-page words whole: it
    /// runs inside a migration's downtime, over bitmaps of millions of pages.
    pub fn runs(&self) -> Vec<(PageIndex, u64)> {
        let mut runs = Vec::new();
        let mut start: Option<u64> = None;
        for (i, &w) in self.words.iter().enumerate() {
            let base = i as u64 * 64;
            match (w, start) {
                (0, None) | (u64::MAX, Some(_)) => continue,
                (0, Some(s)) => {
                    runs.push((PageIndex(s), base - s));
                    start = None;
                    continue;
                }
                (u64::MAX, None) => {
                    start = Some(base);
                    continue;
                }
                _ => {}
            }
            for bit in 0..64 {
                let set = w & (1 << bit) != 0;
                match (set, start) {
                    (true, None) => start = Some(base + bit),
                    (false, Some(s)) => {
                        runs.push((PageIndex(s), base + bit - s));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            runs.push((PageIndex(s), self.pages - s));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(f: &FreePages) -> Vec<(u64, u64)> {
        f.runs().into_iter().map(|(p, n)| (p.0, n)).collect()
    }

    #[test]
    fn runs_and_bounds() {
        let mut f = FreePages::new(130);
        f.set_range(PageIndex(3), 4);
        f.set_range(PageIndex(127), 10);
        assert_eq!(runs(&f), vec![(3, 4), (127, 3)]);
        let mut g = FreePages::new(300);
        g.set_range(PageIndex(60), 200);
        g.set(PageIndex(299));
        assert_eq!(runs(&g), vec![(60, 200), (299, 1)], "runs across full words and to the end");
        assert_eq!(runs(&FreePages::all(130)), vec![(0, 130)]);
        assert_eq!(runs(&FreePages::new(1 << 20)), vec![]);
        assert_eq!(f.count(), 7);
        let marked: Vec<u64> = g.marked().map(|p| p.0).collect();
        assert_eq!(marked, (60..260).chain([299]).collect::<Vec<_>>());
        assert!(FreePages::from_words(f.words().to_vec(), 130).is_some());
        assert!(FreePages::from_words(vec![0; 2], 130).is_none());
        assert!(FreePages::from_words(vec![0, 0, 1 << 5], 130).is_none(), "bits past the end");
    }
}
