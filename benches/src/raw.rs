//! The raw limits each backend is compared with, measured with the same sizes and patterns: a raw
//! TCP request/reply round trip and stream, memcpy, and raw io_uring reads of a file.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_transport::lane::PageBuf;
use ferry_transport::{GuestMemory, HostAddr};
use io_uring::{opcode, types, IoUring};

use crate::stats::Latencies;

/// Round trips of a 16-byte request and a 4 KiB reply over loopback TCP with TCP_NODELAY.
pub fn tcp_round_trips(n: usize) -> Result<Latencies> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut req = [0u8; 16];
        let reply = vec![7u8; 4096];
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&reply)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut reply = vec![0u8; 4096];
    let lat = Latencies::measure(n / 10, n, |_| -> std::io::Result<()> {
        c.write_all(&[1u8; 16])?;
        c.read_exact(&mut reply)
    })?;
    drop(c);
    server.join().expect("raw tcp server thread")?;
    Ok(lat)
}

/// One-way stream of `total` bytes in `chunk`-byte writes over loopback TCP.
pub fn tcp_stream(chunk: usize, total: u64) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let buf = vec![7u8; chunk];
        let mut sent = 0;
        while sent < total {
            s.write_all(&buf)?;
            sent += chunk as u64;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut got = 0u64;
    while got < total {
        c.read_exact(&mut buf)?;
        got += chunk as u64;
    }
    let elapsed = start.elapsed();
    server.join().expect("raw tcp stream thread")?;
    Ok(elapsed)
}

/// Copies `total` bytes out of `memory` in `chunk`-byte pieces into recycled page-aligned buffers,
/// the same access pattern as the local backend's bulk lane.
pub fn memcpy_stream(memory: &GuestMemory, chunk: usize, total: u64) -> Result<Duration> {
    let region = &memory.regions()[0];
    let mut bufs: Vec<PageBuf> = (0..32).map(|_| PageBuf::new(chunk)).collect();
    let start = Instant::now();
    let mut off = 0u64;
    for i in 0..total / chunk as u64 {
        if off + chunk as u64 > region.len() as u64 {
            off = 0;
        }
        let buf = &mut bufs[i as usize % 32];
        // The raw limit is a plain memcpy: ferry's own copies out of guest memory are volatile
        // (they race a running guest), and this shows what that costs.
        let src = region.host_addr().as_ptr().wrapping_add(off as usize);
        // SAFETY: off + chunk <= the region's length (checked above), the mapping lives as long
        // as `memory`, and nothing writes it during the benchmark; buf is a distinct buffer of
        // `chunk` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), chunk) };
        off += chunk as u64;
    }
    Ok(start.elapsed())
}

/// Reads `len` bytes of `path` from `offset` with O_DIRECT io_uring reads of `chunk` bytes,
/// `depth` in flight, looping over the range until `total` bytes are read.
pub fn io_uring_read(path: &Path, offset: u64, len: u64, chunk: usize, depth: usize, total: u64) -> Result<Duration> {
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).context("O_DIRECT open")?;
    let mut ring = IoUring::new(depth.next_power_of_two() as u32)?;
    let mut bufs: Vec<PageBuf> = (0..depth).map(|_| PageBuf::new(chunk)).collect();
    let mut free: Vec<usize> = (0..depth).collect();
    let chunks_in_range = len / chunk as u64;
    let requests = total / chunk as u64;
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut failure = None;
    let start = Instant::now();
    // On failure stop submitting but reap every read in flight: the kernel writes into `bufs`.
    while completed < submitted || (failure.is_none() && completed < requests) {
        while submitted < requests && failure.is_none() {
            let Some(slot) = free.pop() else { break };
            let at = offset + (submitted % chunks_in_range) * chunk as u64;
            let e = opcode::Read::new(types::Fd(file.as_raw_fd()), bufs[slot].as_mut_ptr(), chunk as u32)
                .offset(at)
                .build()
                .user_data(slot as u64);
            // SAFETY: the slot's buffer is off the free list until this read's completion is
            // reaped below, and every read is reaped before the buffers are dropped.
            unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("submission queue full"))?;
            submitted += 1;
        }
        ring.submit_and_wait(1)?;
        for c in ring.completion() {
            if c.result() != chunk as i32 {
                failure.get_or_insert(c.result());
            }
            free.push(c.user_data() as usize);
            completed += 1;
        }
    }
    if let Some(res) = failure {
        bail!("raw io_uring read returned {res}");
    }
    Ok(start.elapsed())
}

/// Latencies of single 4 KiB io_uring reads at pseudo-random page offsets in a range: O_DIRECT
/// with `direct`, else through the page cache.
pub fn io_uring_page_reads(path: &Path, offset: u64, len: u64, n: usize, direct: bool) -> Result<Latencies> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path)?;
    let mut ring = IoUring::new(4)?;
    let mut buf = PageBuf::new(4096);
    let pages = len / 4096;
    let lat = Latencies::measure(n / 10, n, |i| -> Result<()> {
        let at = offset + (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % pages * 4096;
        let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), 4096).offset(at).build();
        // SAFETY: buf outlives the read, whose completion we wait for before the next iteration.
        unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("submission queue full"))?;
        ring.submit_and_wait(1)?;
        match ring.completion().next() {
            Some(c) if c.result() == 4096 => Ok(()),
            other => bail!("raw page read: {:?}", other.map(|c| c.result())),
        }
    })?;
    Ok(lat)
}

/// Guest-side latency of userfaultfd faults resolved from local memory: a thread reads pages of a
/// registered region in a pseudo-random order while a handler thread answers each fault with
/// UFFDIO_COPY from a buffer. The floor under any post-copy fault on this machine.
pub fn uffd_local_faults(n: usize) -> Result<Latencies> {
    use ferry_fault_handler::uffd::{Event, Outcome, Userfault, MODE_MISSING};
    use ferry_transport::{Backing, RegionMapping};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // A power of two: the odd multiplier below then visits distinct pages, so every read faults.
    let pages = (n as u64 * 2).next_power_of_two();
    let region = Arc::new(RegionMapping::create(pages as usize * 4096, Backing::Anonymous)?);
    let uffd = Arc::new(Userfault::open(0)?);
    let base = HostAddr::of(region.host_addr().as_ptr());
    // SAFETY: the region is this function's own fresh mapping, reached only through raw copies,
    // and it outlives the handler thread, which is joined before it is dropped.
    unsafe { uffd.register(base, pages * 4096, MODE_MISSING)? };
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop) = (uffd.clone(), stop.clone());
        std::thread::spawn(move || -> Result<()> {
            let page = vec![7u8; 4096];
            let mut events = [Event::Other(0); 16];
            while !stop.load(Ordering::Acquire) {
                let n = uffd.read_events(&mut events, 20)?;
                for e in &events[..n] {
                    if let Event::PageFault { address, .. } = *e {
                        match uffd.copy(address.align_down(4096), &page, true) {
                            Outcome::Done | Outcome::Exists(_) => {}
                            other => bail!("raw UFFDIO_COPY: {other:?}"),
                        }
                    }
                }
            }
            Ok(())
        })
    };
    let mut buf = [0u8; 4096];
    let result = Latencies::measure(0, n, |i| {
        let p = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % pages;
        region.read(p * 4096, &mut buf)
    });
    stop.store(true, Ordering::Release);
    handler.join().expect("raw uffd handler thread")?;
    Ok(result?)
}
