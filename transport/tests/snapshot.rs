//! Snapshot images that are corrupt, truncated, foreign or of another layout are refused with
//! a typed error; a flipped byte in page data is caught by that page's checksum.

use std::io::{Seek, SeekFrom, Write};

use ferry_transport::pattern::{check_page, fill_memory};
use ferry_transport::snapshot::{write_image, write_snapshot, SnapshotImage};
use ferry_transport::{Backing, GuestMemory, MemoryLayout, PageRun, TransportError};

fn image(name: &str) -> (std::path::PathBuf, MemoryLayout) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let layout = MemoryLayout::single(8 << 20).unwrap();
    let memory = GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap();
    fill_memory(&memory, 3).unwrap();
    let path = dir.join("image");
    write_image(&path, &memory).unwrap();
    (path, layout)
}

fn poke(path: &std::path::Path, offset: u64, byte: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[byte]).unwrap();
}

#[test]
fn a_good_image_reads_back_on_both_lanes() {
    let (path, layout) = image("good");
    let img = SnapshotImage::open(&path, Some(&layout)).unwrap();
    let mut src = img.page_source(4).unwrap();
    let mut buf = vec![0u8; 8 * 4096];
    // An unaligned destination takes the buffered path; the data must be the same.
    let zero = src.urgent.read(PageRun::new(0, 0, 7), &mut buf[1..]).unwrap();
    for i in 0..7 {
        assert!(check_page(&buf[1 + i * 4096..1 + (i + 1) * 4096], i as u64, 3));
    }
    assert!(zero.is_zero(3), "page 3 of the pattern is a zero page");
}

#[test]
fn a_flipped_data_byte_fails_that_page_checksum() {
    let (path, layout) = image("flip");
    let img = SnapshotImage::open(&path, Some(&layout)).unwrap();
    let data_offset = std::fs::metadata(&path).unwrap().len() - layout.total_bytes();
    drop(img);
    poke(&path, data_offset + 11 * 4096 + 17, 0xAA);
    let img = SnapshotImage::open(&path, Some(&layout)).unwrap();
    let mut src = img.page_source(4).unwrap();
    let mut buf = vec![0u8; 4096];
    src.urgent.read(PageRun::new(0, 10, 1), &mut buf).unwrap();
    let err = src.urgent.read(PageRun::new(0, 11, 1), &mut buf).unwrap_err();
    assert!(matches!(err, TransportError::Checksum { region: 0, page: 11 }), "{err:?}");
}

#[test]
fn corrupt_header_zero_map_table_or_truncation_is_refused() {
    let (path, _) = image("corrupt");
    poke(&path, 30, 0x55);
    assert!(
        matches!(SnapshotImage::open(&path, None), Err(TransportError::Snapshot { why, .. }) if why.contains("header"))
    );

    // The checksum table is read lazily: a corrupt entry fails its page's read, not the open.
    let (path, layout) = image("table");
    poke(&path, 8192 + 4 * 11, 0x55);
    let img = SnapshotImage::open(&path, None).unwrap();
    let mut source = img.page_source(4).unwrap();
    let mut buf = vec![0u8; 4096];
    let page = |p: u64| PageRun::new(0, p, 1);
    let r = source.urgent.read(page(11), &mut buf);
    assert!(matches!(r, Err(TransportError::Checksum { page: 11, .. })), "{r:?}");
    assert!(source.urgent.read(page(12), &mut buf).is_ok(), "the other pages of the chunk still read");

    let (path, _) = image("zero-map");
    let zero_map_at = 8192 + (layout.total_pages() * 4).next_multiple_of(4096);
    poke(&path, zero_map_at, 0x55);
    assert!(
        matches!(SnapshotImage::open(&path, None), Err(TransportError::Snapshot { why, .. }) if why.contains("zero map is corrupt"))
    );

    let (path, _) = image("trunc");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 4096).unwrap();
    assert!(
        matches!(SnapshotImage::open(&path, None), Err(TransportError::Snapshot { why, .. }) if why.contains("truncated"))
    );

    let (path, _) = image("magic");
    poke(&path, 0, b'X');
    assert!(
        matches!(SnapshotImage::open(&path, None), Err(TransportError::Snapshot { why, .. }) if why.contains("magic"))
    );

    let (path, _) = image("layout");
    let other = MemoryLayout::single(16 << 20).unwrap();
    assert!(matches!(SnapshotImage::open(&path, Some(&other)), Err(TransportError::LayoutMismatch(_))));
    assert!(SnapshotImage::open(&path, Some(&layout)).is_ok());

    let tiny = path.with_extension("tiny");
    std::fs::write(&tiny, b"short").unwrap();
    assert!(matches!(SnapshotImage::open(&tiny, None), Err(TransportError::Snapshot { .. })));
}

#[test]
fn state_blob_and_free_pages_round_trip_and_a_corrupt_blob_is_refused() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snap-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let layout = MemoryLayout::single(8 << 20).unwrap();
    let memory = GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap();
    fill_memory(&memory, 5).unwrap();
    let path = dir.join("image");
    let state: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    // Pages 100..200 are free: never read, restored as zero whatever they held.
    let stats = write_snapshot(&path, &memory, &state, &|p| (100..200).contains(&p.0)).unwrap();
    assert_eq!(stats.free_pages, 100);
    let img = SnapshotImage::open(&path, Some(&layout)).unwrap();
    assert_eq!(img.state(), &state[..]);
    assert_eq!(img.free_pages(), 100);
    let zero = img.zero_map();
    let is_zero = |p: u64| zero[(p / 64) as usize] & (1 << (p % 64)) != 0;
    assert!((100..200).all(is_zero), "free pages restore as zero");
    let mut src = img.page_source(4).unwrap();
    let mut buf = vec![0u8; 4096];
    for p in [0u64, 99, 150, 200, 2047] {
        let z = src.urgent.read(PageRun::new(0, p, 1), &mut buf).unwrap();
        if (100..200).contains(&p) {
            assert!(z.is_zero(0) && buf.iter().all(|&b| b == 0), "free page {p}");
        } else {
            assert!(check_page(&buf, p, 5), "page {p}");
        }
    }
    drop((src, img));
    // The state blob follows the data; a flipped byte in it is refused.
    let blob_at = std::fs::metadata(&path).unwrap().len() - (state.len() as u64).next_multiple_of(4096);
    poke(&path, blob_at + 5, 0xFF);
    assert!(
        matches!(SnapshotImage::open(&path, None), Err(TransportError::Snapshot { why, .. }) if why.contains("state")),
    );
}
