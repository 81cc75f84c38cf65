//! The JSON of guest-region mappings a Firecracker-protocol peer sends the UFFD handler, and the
//! memory layout made of them.
#![no_main]

use ferry_uffd_handler::protocol::{layout_of, parse_mappings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mappings) = parse_mappings(data) {
        let _ = layout_of(&mappings);
    }
});
