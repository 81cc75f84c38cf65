//! A snapshot image and a working-set file as a file on disk can hold them: opened, verified,
//! and every page read back; every corruption must be a typed error. Inputs are either a whole
//! file, or (first byte odd) patches to a sound image of a small guest, so the fuzzer gets past
//! the header's checksum and into the zero map, the checksum table, the pages and the state.
#![no_main]

use std::sync::OnceLock;

use ferry::restore::WorkingSet;
use ferry_transport::snapshot::{write_snapshot, SnapshotImage};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageRun};
use libfuzzer_sys::fuzz_target;

fn dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A sound image of a 24-page guest: data pages, zero pages, free pages, a state blob.
fn sound_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let memory = GuestMemory::create(MemoryLayout::single(24 * 4096).unwrap(), Backing::Anonymous).unwrap();
        ferry_transport::pattern::fill_memory(&memory, 3).unwrap();
        let path = dir().join("sound");
        write_snapshot(&path, &memory, b"vcpu state", &|p| (20..22).contains(&p.0)).unwrap();
        std::fs::read(&path).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode % 2 == 1 {
        let mut image = sound_image().to_vec();
        for patch in rest.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([patch[0], patch[1]])) * 3 % image.len();
            image[at] ^= patch[2];
        }
        image
    } else {
        rest.to_vec()
    };
    let path = dir().join("image");
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    if let Ok(image) = SnapshotImage::open(&path, None) {
        let _ = image.zero_map();
        let _ = image.state();
        if let Ok(mut source) = image.page_source(4) {
            let layout = image.layout().clone();
            let ps = layout.page_size() as usize;
            let mut buf = vec![0u8; ps];
            for region in 0..layout.regions().len() as u32 {
                for page in 0..layout.region_pages(region).unwrap_or(0).min(64) {
                    let _ = source.urgent.read(PageRun::new(region, page, 1), &mut buf);
                }
            }
        }
    }
    let _ = WorkingSet::load(&path, 1 << 20);
});
