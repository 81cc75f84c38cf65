//! Firecracker's UFFD handshake, both sides: one message on the Unix socket whose bytes are the
//! JSON array of [`GuestRegionUffdMapping`] and whose SCM_RIGHTS control message carries the
//! userfaultfd. Written from Firecracker's documentation
//! (docs/snapshotting/handling-page-faults-on-snapshot-resume.md) and its `GuestRegionUffdMapping`.
//! All raw socket calls of the crate are here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{HandlerError, Result};

/// One guest memory region as Firecracker describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region lives in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where the region's bytes are in the memory file.
    pub offset: u64,
    /// The region's page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Older name of the same field; it holds bytes too, despite its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// Largest handshake accepted: a JSON array of a few regions is far smaller.
pub const MAX_HANDSHAKE_BYTES: usize = 64 << 10;
/// Most regions a handshake may describe.
pub const MAX_REGIONS: usize = 64;

fn handshake(why: impl Into<String>) -> HandlerError {
    HandlerError::Handshake(why.into())
}

/// The page size all regions share (4 KiB or 2 MiB), checked against every region's address,
/// size and offset.
pub fn page_size_of(mappings: &[GuestRegionUffdMapping]) -> Result<u64> {
    let first = mappings.first().ok_or_else(|| handshake("no regions"))?;
    let page_size = first.page_size.or(first.page_size_kib).ok_or_else(|| handshake("no page size"))?;
    if page_size != 4096 && page_size != 2 << 20 {
        return Err(handshake(format!("page size {page_size} (4096 or 2097152)")));
    }
    for (i, m) in mappings.iter().enumerate() {
        if m.page_size.or(m.page_size_kib) != Some(page_size) {
            return Err(handshake(format!("region {i} has another page size")));
        }
        let aligned = |v: u64| v % page_size == 0;
        if m.size == 0 || !aligned(m.size) || !aligned(m.base_host_virt_addr) || !aligned(m.offset) {
            return Err(handshake(format!("region {i} is empty or not aligned to {page_size}: {m:?}")));
        }
        if m.base_host_virt_addr.checked_add(m.size).is_none() || m.offset.checked_add(m.size).is_none() {
            return Err(handshake(format!("region {i} wraps: {m:?}")));
        }
    }
    Ok(page_size)
}

/// A control-message buffer with room for `fds` file descriptors.
fn control_buffer(fds: usize) -> Vec<u8> {
    // SAFETY: CMSG_SPACE only computes a size.
    vec![0u8; unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) } as usize]
}

/// A message header over one iovec and a control buffer; both must outlive its use.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Firecracker's side: sends `mappings` with `uffd` in one message.
pub fn send_handshake(stream: &UnixStream, mappings: &[GuestRegionUffdMapping], uffd: RawFd) -> Result<()> {
    let body = serde_json::to_vec(mappings).map_err(|e| handshake(e.to_string()))?;
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    let mut control = control_buffer(1);
    let msg = message(&mut iov, &mut control);
    // SAFETY: msg points at `control`, which has room for one header and one fd (CMSG_SPACE), so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), uffd);
    }
    // SAFETY: msg and everything it points at (iov, body, control) live across the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if sent as usize != body.len() {
        return Err(handshake(format!("sent {sent} of {} bytes", body.len())));
    }
    Ok(())
}

/// The JSON array of mappings Firecracker sends: 1 to [`MAX_REGIONS`] regions (their sizes and
/// page sizes are checked where they are used, by [`page_size_of`] and the memory layout).
pub fn parse_mappings(body: &[u8]) -> Result<Vec<GuestRegionUffdMapping>> {
    let mappings: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(body).map_err(|e| handshake(format!("the mappings: {e}")))?;
    if mappings.is_empty() || mappings.len() > MAX_REGIONS {
        return Err(handshake(format!("{} regions (1 to {MAX_REGIONS})", mappings.len())));
    }
    Ok(mappings)
}

/// The guest memory layout the mappings describe: one region per mapping, at its offset in the
/// memory file, all of one page size.
pub fn layout_of(mappings: &[GuestRegionUffdMapping]) -> Result<ferry::transport::MemoryLayout> {
    let page_size = page_size_of(mappings)?;
    let regions = mappings
        .iter()
        .map(|m| ferry::transport::RegionLayout {
            guest_phys_addr: ferry::transport::GuestAddr(m.offset),
            size: m.size,
        })
        .collect();
    ferry::transport::MemoryLayout::new(page_size as u32, regions)
        .map_err(|e| handshake(format!("the regions do not form a layout: {e}")))
}

/// The handler's side: waits up to `timeout` for the handshake and returns the mappings and the
/// userfaultfd. Malformed JSON, a missing or extra fd, or too many regions are typed errors.
pub fn receive_handshake(stream: &UnixStream, timeout: Duration) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd)> {
    stream.set_read_timeout(Some(timeout))?;
    let mut body = vec![0u8; MAX_HANDSHAKE_BYTES];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
    // Room for a few fds: a peer sending more than one must not leak them into our table unseen.
    let mut control = control_buffer(4);
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: msg points at buffers that live across the call; MSG_CMSG_CLOEXEC marks received fds.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                handshake(format!("nothing within {timeout:?}"))
            }
            _ => err.into(),
        });
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg's control buffer; CMSG_FIRSTHDR/NXTHDR walk it within
    // msg_controllen, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds that are
    // now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(handshake(format!("a message over {MAX_HANDSHAKE_BYTES} bytes or with too many fds")));
    }
    if n == 0 {
        return Err(handshake("the peer closed the socket before the handshake"));
    }
    if fds.len() != 1 {
        return Err(handshake(format!("{} file descriptors with the mappings (one userfaultfd)", fds.len())));
    }
    let mappings = parse_mappings(&body[..n as usize])?;
    stream.set_read_timeout(None)?;
    Ok((mappings, fds.pop().expect("one fd")))
}

/// Watches the socket for Firecracker going away and cancels the engine when it does.
#[derive(Debug)]
pub struct HangupWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<bool>,
}

impl HangupWatch {
    /// Watches `stream` and stops `engine` when Firecracker hangs up.
    pub fn start(stream: &UnixStream, engine: ferry::EngineControl) -> Result<Self> {
        let stream = stream.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("ferry-uffd-hangup".into()).spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
                    // SAFETY: one valid pollfd that lives across the call.
                    let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if rc > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                        engine.cancel();
                        return true;
                    }
                }
                false
            })?
        };
        Ok(HangupWatch { stop, thread })
    }

    /// Stops watching; whether the peer had gone.
    pub fn stop(self) -> bool {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(addr: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping { base_host_virt_addr: addr, size, offset, page_size: Some(4096), page_size_kib: None }
    }

    #[test]
    fn page_sizes_from_either_field_and_bad_regions_are_refused() {
        let old =
            GuestRegionUffdMapping { page_size: None, page_size_kib: Some(2 << 20), ..region(2 << 20, 4 << 20, 0) };
        assert_eq!(page_size_of(&[old]).unwrap(), 2 << 20, "page_size_kib holds bytes");
        assert_eq!(page_size_of(&[region(0x1000, 8192, 0), region(0x10000, 4096, 8192)]).unwrap(), 4096);
        assert!(page_size_of(&[]).is_err());
        assert!(page_size_of(&[region(0x1001, 4096, 0)]).is_err(), "unaligned address");
        assert!(page_size_of(&[region(0x1000, 100, 0)]).is_err(), "unaligned size");
        assert!(page_size_of(&[region(u64::MAX - 4095, 8192, 0)]).is_err(), "wraps");
        let mut odd = region(0x1000, 4096, 0);
        odd.page_size = Some(8192);
        assert!(page_size_of(&[odd]).is_err());
        let json = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let parsed: Vec<GuestRegionUffdMapping> = serde_json::from_str(json).unwrap();
        assert_eq!(page_size_of(&parsed).unwrap(), 4096);
    }

    #[test]
    fn the_handshake_crosses_a_socket_and_hostile_ones_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_handshake(&a, &[region(0x1000, 4096, 0)], file.as_raw_fd()).unwrap();
        let (m, fd) = receive_handshake(&b, Duration::from_secs(5)).unwrap();
        assert_eq!(m, vec![region(0x1000, 4096, 0)]);
        assert!(fd.as_raw_fd() >= 0);
        // No fd.
        use std::io::Write;
        (&a).write_all(b"[]").unwrap();
        assert!(matches!(receive_handshake(&b, Duration::from_secs(5)), Err(HandlerError::Handshake(_))));
        // No regions.
        send_handshake(&a, &[], file.as_raw_fd()).unwrap();
        assert!(matches!(receive_handshake(&b, Duration::from_secs(5)), Err(HandlerError::Handshake(_))));
        // Silence.
        let err = receive_handshake(&b, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, HandlerError::Handshake(ref why) if why.contains("nothing within")), "{err}");
        // A peer that goes away.
        drop(a);
        assert!(matches!(receive_handshake(&b, Duration::from_secs(5)), Err(HandlerError::Handshake(_))));
    }
}
