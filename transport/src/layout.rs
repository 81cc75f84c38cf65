//! Guest memory layout: regions, page size, and runs of pages inside them.

use crate::addr::GuestAddr;
use crate::error::{Result, TransportError};

/// Smallest page size the transport accepts (x86 base pages).
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size: 2 MiB hugetlbfs pages. 1 GiB pages are refused: no guest we run can use them
/// and one read of that size would starve the urgent lane.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Most regions one layout may describe (bounds the handshake message).
pub const MAX_REGIONS: usize = 256;
/// Largest single read, in bytes. Bounds every buffer a hostile peer can make us allocate.
pub const MAX_RUN_BYTES: u64 = 4 << 20;
/// Largest single read in pages (at the smallest page size).
pub const MAX_RUN_PAGES: u32 = (MAX_RUN_BYTES / MIN_PAGE_SIZE as u64) as u32;

/// One contiguous range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionLayout {
    /// Where the region starts in guest-physical memory.
    pub guest_phys_addr: GuestAddr,
    /// Its length in bytes, a multiple of the page size.
    pub size: u64,
}

/// The shape of a guest's memory: what source and destination must agree on before a page moves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MemoryLayout {
    page_size: u32,
    regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// Validates and builds a layout: power-of-two page size within bounds, 1 to [`MAX_REGIONS`]
    /// non-empty, page-aligned, non-overlapping regions.
    pub fn new(page_size: u32, regions: Vec<RegionLayout>) -> Result<Self> {
        let bad = |why: String| Err(TransportError::InvalidLayout(why));
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return bad(format!("page size {page_size} is not a power of two in 4 KiB..=2 MiB"));
        }
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return bad(format!("{} regions; 1 to {MAX_REGIONS} are allowed", regions.len()));
        }
        let ps = u64::from(page_size);
        let mut spans = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0 || r.size % ps != 0 || r.guest_phys_addr.0 % ps != 0 {
                return bad(format!(
                    "region {i} ({:#x}+{:#x}) is empty or not page aligned",
                    r.guest_phys_addr, r.size
                ));
            }
            let Some(end) = r.guest_phys_addr.checked_add(r.size) else {
                return bad(format!("region {i} wraps the address space"));
            };
            spans.push((r.guest_phys_addr, end, i));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return bad(format!("regions {} and {} overlap", w[0].2, w[1].2));
            }
        }
        Ok(MemoryLayout { page_size, regions })
    }

    /// One region of `size` bytes at guest-physical address 0 with 4 KiB pages.
    pub fn single(size: u64) -> Result<Self> {
        Self::new(MIN_PAGE_SIZE, vec![RegionLayout { guest_phys_addr: GuestAddr(0), size }])
    }

    /// Bytes per page: 4 KiB, or a huge page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }

    /// Pages in region `region`, if there is one.
    pub fn region_pages(&self, region: u32) -> Option<u64> {
        self.regions.get(region as usize).map(|r| r.size / u64::from(self.page_size))
    }

    /// Global index of each region's first page (pages are numbered across regions in order).
    pub fn region_bases(&self) -> Vec<u64> {
        let mut base = 0;
        self.regions
            .iter()
            .map(|r| {
                let b = base;
                base += r.size / u64::from(self.page_size);
                b
            })
            .collect()
    }

    /// Pages in all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.size / u64::from(self.page_size)).sum()
    }

    /// Bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Most pages one read may cover with this page size.
    pub fn max_run_pages(&self) -> u32 {
        (MAX_RUN_BYTES / u64::from(self.page_size)) as u32
    }

    /// Checks that `run` names an existing region, lies inside it and is not larger than one read
    /// may be. Every server calls this before touching memory.
    pub fn check_run(&self, run: PageRun) -> Result<()> {
        let Some(region_pages) = self.region_pages(run.region) else {
            return Err(TransportError::OutOfRange(format!("region {} does not exist", run.region)));
        };
        if run.pages == 0 || run.pages > self.max_run_pages() {
            return Err(TransportError::OutOfRange(format!(
                "a run of {} pages (1 to {} allowed)",
                run.pages,
                self.max_run_pages()
            )));
        }
        match run.first_page.checked_add(u64::from(run.pages)) {
            Some(end) if end <= region_pages => Ok(()),
            _ => Err(TransportError::OutOfRange(format!(
                "pages {}+{} outside region {} of {region_pages} pages",
                run.first_page, run.pages, run.region
            ))),
        }
    }

    /// Byte offset of `run` inside its region and its length. Call [`Self::check_run`] first.
    pub fn run_bytes(&self, run: PageRun) -> (u64, usize) {
        let ps = u64::from(self.page_size);
        (run.first_page * ps, run.pages as usize * self.page_size as usize)
    }

    /// Says how `self` differs from `theirs`, or `None` when they are the same.
    pub fn mismatch(&self, theirs: &MemoryLayout) -> Option<String> {
        if self.page_size != theirs.page_size {
            return Some(format!("page size: ours {}, theirs {}", self.page_size, theirs.page_size));
        }
        if self.regions.len() != theirs.regions.len() {
            return Some(format!("region count: ours {}, theirs {}", self.regions.len(), theirs.regions.len()));
        }
        self.regions.iter().zip(&theirs.regions).enumerate().find(|(_, (a, b))| a != b).map(|(i, (a, b))| {
            format!(
                "region {i}: ours {:#x}+{:#x}, theirs {:#x}+{:#x}",
                a.guest_phys_addr, a.size, b.guest_phys_addr, b.size
            )
        })
    }
}

/// A run of consecutive pages inside one region: the unit every read moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// The region the run lies in.
    pub region: u32,
    /// Its first page, counted in the region.
    pub first_page: u64,
    /// How many pages it has.
    pub pages: u32,
}

impl PageRun {
    /// The run of `pages` pages from page `first_page` of region `region`.
    pub fn new(region: u32, first_page: u64, pages: u32) -> Self {
        PageRun { region, first_page, pages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_layouts() {
        let r = |a, s| RegionLayout { guest_phys_addr: GuestAddr(a), size: s };
        assert!(MemoryLayout::new(4096, vec![r(0, 1 << 20)]).is_ok());
        assert!(MemoryLayout::new(4097, vec![r(0, 1 << 20)]).is_err());
        assert!(MemoryLayout::new(1 << 30, vec![r(0, 1 << 30)]).is_err());
        assert!(MemoryLayout::new(4096, vec![]).is_err());
        assert!(MemoryLayout::new(4096, vec![r(0, 4095)]).is_err());
        assert!(MemoryLayout::new(4096, vec![r(0, 8192), r(4096, 4096)]).is_err());
        assert!(MemoryLayout::new(4096, vec![r(u64::MAX - 4095, 8192)]).is_err());
        assert!(MemoryLayout::new(4096, vec![r(8192, 4096), r(0, 8192)]).is_ok());
    }

    #[test]
    fn checks_runs_against_regions() {
        let l = MemoryLayout::single(1 << 20).unwrap();
        assert!(l.check_run(PageRun::new(0, 0, 256)).is_ok());
        assert!(l.check_run(PageRun::new(0, 255, 2)).is_err());
        assert!(l.check_run(PageRun::new(1, 0, 1)).is_err());
        assert!(l.check_run(PageRun::new(0, 0, 0)).is_err());
        assert!(l.check_run(PageRun::new(0, u64::MAX, 1)).is_err());
        let big = MemoryLayout::single(1 << 30).unwrap();
        assert!(big.check_run(PageRun::new(0, 0, MAX_RUN_PAGES)).is_ok());
        assert!(big.check_run(PageRun::new(0, 0, MAX_RUN_PAGES + 1)).is_err());
    }

    #[test]
    fn describes_mismatches() {
        let a = MemoryLayout::single(1 << 20).unwrap();
        let b = MemoryLayout::single(2 << 20).unwrap();
        assert_eq!(a.mismatch(&a), None);
        assert!(a.mismatch(&b).unwrap().contains("region 0"));
    }
}
