//! One atomic bit per global page of a layout: which pages a server has served.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::{MemoryLayout, PageRun};

#[derive(Debug)]
pub(crate) struct PageBits {
    words: Box<[AtomicU64]>,
    region_base: Vec<u64>,
}

impl PageBits {
    pub(crate) fn new(layout: &MemoryLayout) -> Self {
        let words = layout.total_pages().div_ceil(64);
        PageBits { words: (0..words).map(|_| AtomicU64::new(0)).collect(), region_base: layout.region_bases() }
    }

    /// Sets the bits of a checked run; returns how many were already set.
    pub(crate) fn set_run(&self, run: PageRun) -> u64 {
        let base = self.region_base[run.region as usize] + run.first_page;
        (base..base + u64::from(run.pages))
            .filter(|&g| {
                let mask = 1 << (g % 64);
                self.words[(g / 64) as usize].fetch_or(mask, Ordering::Relaxed) & mask != 0
            })
            .count() as u64
    }
}
