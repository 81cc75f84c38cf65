//! The session messages a peer sends over a control lane: a post-copy handoff (state blob and
//! free-page bitmap in chunks), pre-copy rounds, and back-and-forth's offer of a base image, its
//! verdict and the last changes, each from a stream of fuzzed frames.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::time::Duration;

use ferry::handoff::{receive_handoff, receive_round};
use ferry_transport::ControlStream;
use libfuzzer_sys::fuzz_target;

/// A control lane whose peer sent `data` and then closed.
#[derive(Debug)]
struct Replay(Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ControlStream for Replay {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlStream>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn wait_readable(&self, _: Duration) -> std::io::Result<bool> {
        Ok(true)
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the guest's size, so bitmaps of every length are reached.
    let Some((&size, frames)) = data.split_first() else { return };
    let pages = 1 + u64::from(size) * 37;
    let _ = receive_handoff(&mut Replay(Cursor::new(frames.to_vec())), pages);
    let _ = receive_round(&mut Replay(Cursor::new(frames.to_vec())), pages);
    if let Ok(layout) = ferry_transport::MemoryLayout::single(pages * 4096) {
        let _ = ferry::backforth::answer(&mut Replay(Cursor::new(frames.to_vec())), None, &layout);
    }
    let _ = ferry::backforth::propose(&mut Replay(Cursor::new(frames.to_vec())), None);
    let _ = ferry::backforth::receive_last_changes(&mut Replay(Cursor::new(frames.to_vec())), pages);
    let _ = ferry::backforth::await_prepared(&mut Replay(Cursor::new(frames.to_vec())));
});
