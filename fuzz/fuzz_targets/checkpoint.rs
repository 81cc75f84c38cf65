//! The checkpoint stream a peer sends (post-copy's reverse checkpoints, a fault-tolerant
//! primary's epochs): a stream of fuzzed session messages fed to a receiver over a two-region
//! guest. Each message is a 16-bit length and that many bytes; an epoch the receiver hands over
//! must be what it announced.
#![no_main]

use ferry::checkpoint::CheckpointReceiver;
use ferry_transport::{MemoryLayout, RegionLayout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = |base, size| RegionLayout { guest_phys_addr: ferry_transport::GuestAddr(base), size };
    let layout = MemoryLayout::new(4096, vec![r(0, 16 * 4096), r(1 << 32, 8 * 4096)]).expect("a sound layout");
    let mut receiver = CheckpointReceiver::new(&layout);
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (msg, tail) = rest[2..].split_at(len);
        rest = tail;
        match receiver.accept(msg) {
            Ok(Some(epoch)) => {
                assert!(epoch.pages.iter().all(|&p| p.0 < layout.total_pages()));
                assert_eq!(epoch.contents.len(), epoch.pages.len() * 4096);
            }
            Ok(None) => {}
            // A refused stream may go on with a new epoch; the receiver must stay sound.
            Err(_) => {}
        }
    }
});
