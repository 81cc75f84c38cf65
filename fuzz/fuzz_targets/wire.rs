//! Every transport decoder a peer reaches: frame headers, handshake and control messages (with
//! their memory layouts), read requests, read-reply prefixes, and session frames.
#![no_main]

use ferry_transport::wire::{parse_header, read_control, read_session, ReadReply, ReadRequest, HEADER_LEN, READ_REQUEST_FRAME_LEN};
use ferry_transport::{PageRun};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <[u8; HEADER_LEN]>::try_from(&data[..data.len().min(HEADER_LEN)]) {
        let _ = parse_header(&h);
    }
    let _ = read_control(&mut std::io::Cursor::new(data));
    let _ = read_session(&mut std::io::Cursor::new(data));
    if let Ok(f) = <[u8; READ_REQUEST_FRAME_LEN]>::try_from(&data[..data.len().min(READ_REQUEST_FRAME_LEN)]) {
        let _ = ReadRequest::decode(&f);
    }
    // A reply prefix against a request of the size its first byte says.
    if let Some((&pages, rest)) = data.split_first() {
        let req = ReadRequest { id: 1, run: PageRun::new(0, 0, u32::from(pages).max(1)) };
        let _ = ReadReply::decode_prefix(rest, &req, 4096);
    }
});
