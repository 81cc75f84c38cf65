//! Deterministic page contents for tests, benchmarks and demos: every page of a guest gets bytes
//! derived from its global index and a seed, and some pages are all zero, so a reader can verify
//! any page it receives without keeping a copy of the source.

use crate::error::Result;
use crate::memory::GuestMemory;

/// One page in `zero_every` is all zero (exercises zero-page markers and holes).
pub const ZERO_EVERY: u64 = 7;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether global page `global_page` is one the test pattern leaves zero (one in every few).
pub fn page_is_zero(global_page: u64) -> bool {
    global_page % ZERO_EVERY == 3
}

/// Fills `page` with the contents of page `global_page` under `seed`.
pub fn fill_page(page: &mut [u8], global_page: u64, seed: u64) {
    if page_is_zero(global_page) {
        page.fill(0);
        return;
    }
    let base = mix(seed ^ global_page.wrapping_mul(0x2545_f491_4f6c_dd1d));
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(base.wrapping_add(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_le_bytes());
    }
}

/// Whether `page` holds exactly what [`fill_page`] writes.
pub fn check_page(page: &[u8], global_page: u64, seed: u64) -> bool {
    if page_is_zero(global_page) {
        return page.iter().all(|&b| b == 0);
    }
    let base = mix(seed ^ global_page.wrapping_mul(0x2545_f491_4f6c_dd1d));
    page.chunks_exact(8).enumerate().all(|(i, w)| {
        u64::from_le_bytes(w.try_into().expect("8 bytes"))
            == base.wrapping_add(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
    })
}

/// Writes the pattern into every page of `memory`.
pub fn fill_memory(memory: &GuestMemory, seed: u64) -> Result<()> {
    let ps = memory.layout().page_size() as usize;
    let chunk_pages = (1 << 20) / ps;
    let mut buf = vec![0u8; chunk_pages.max(1) * ps];
    let mut global = 0u64;
    for region in memory.regions() {
        let pages = region.len() / ps;
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(chunk_pages.max(1));
            for (i, page) in buf[..n * ps].chunks_exact_mut(ps).enumerate() {
                fill_page(page, global + (p + i) as u64, seed);
            }
            region.write((p * ps) as u64, &buf[..n * ps])?;
            p += n;
        }
        global += pages as u64;
    }
    Ok(())
}
