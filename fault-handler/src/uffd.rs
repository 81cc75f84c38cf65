//! A small, complete wrapper of the userfaultfd ioctls ferry uses. This is the crate's only raw
//! syscall place.
//!
//! Why not the `userfaultfd` crate the design card names: version 0.9 cannot request the
//! `MINOR_SHMEM`/`MINOR_HUGETLBFS` features (MINOR mode with `UFFDIO_CONTINUE` is how ferry fills
//! memfd and hugetlbfs guests without a host copy), and its `-sys` part runs bindgen, which needs
//! libclang on every machine that builds ferry. The ABI below is stable kernel UAPI
//! (`linux/userfaultfd.h`) and small enough to own.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ferry_transport::HostAddr;

use crate::error::{FaultError, Result};

const UFFD_API: u64 = 0xAA;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct ContinueArg {
    range: Range,
    mode: u64,
    mapped: i64,
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<ApiArg>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, std::mem::size_of::<RegisterArg>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<Range>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<Range>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, std::mem::size_of::<CopyArg>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, std::mem::size_of::<ZeroArg>());
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0x07, std::mem::size_of::<ContinueArg>());

/// `UFFD_FEATURE_EVENT_REMOVE`: report ranges the guest discards.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`: missing faults on hugetlbfs.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shmem (memfd).
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_THREAD_ID`: the faulting thread's id with each fault.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults on hugetlbfs.
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem.
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// `UFFDIO_REGISTER_MODE_MISSING`: faults on absent pages.
pub const MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MINOR`: faults on pages present in the page cache but not mapped.
pub const MODE_MINOR: u64 = 1 << 2;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

const MSG_LEN: usize = 32;

/// One event read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched an absent page (MISSING) or an unmapped page-cache page (MINOR).
    PageFault {
        /// Host address that faulted.
        address: HostAddr,
        /// A write fault.
        write: bool,
        /// A minor fault (the page is in the page cache).
        minor: bool,
    },
    /// The range `start..end` was discarded (`MADV_DONTNEED`, `MADV_REMOVE`): its pages read as
    /// zero from now on and must never be filled from the source.
    Remove {
        /// First host address of the range.
        start: HostAddr,
        /// One past its last.
        end: HostAddr,
    },
    /// An event ferry did not ask for; carried for logging.
    Other(u8),
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    features: u64,
}

impl Userfault {
    /// Opens a userfaultfd that also traps faults taken in kernel mode (a KVM vCPU touching guest
    /// memory faults from the kernel), requesting `wanted` features. Features the kernel lacks are
    /// an error that names them.
    pub fn open(wanted: u64) -> Result<Self> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as RawFd;
        if raw < 0 {
            raw = open_dev_userfaultfd()?;
        }
        // SAFETY: raw is a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = ApiArg { api: UFFD_API, features: wanted, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly one ApiArg, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
            let err = std::io::Error::last_os_error();
            return Err(FaultError::Unsupported(format!("UFFDIO_API with features {wanted:#x}: {err}")));
        }
        if api.features & wanted != wanted {
            return Err(FaultError::Unsupported(format!(
                "kernel lacks userfaultfd features {:#x}",
                wanted & !api.features
            )));
        }
        Ok(Userfault { fd, features: api.features })
    }

    /// Adopts a userfaultfd another process opened and registered (Firecracker's UFFD protocol
    /// hands one over a Unix socket with SCM_RIGHTS). Refuses an fd that is not a userfaultfd.
    /// Its features are not known here and read as 0.
    ///
    /// # Safety
    /// The ioctls of the returned value write into every range the fd has registered. Those ranges
    /// must be memory that no Rust reference in this process aliases: in the protocol's case they
    /// belong to another process's address space.
    pub unsafe fn adopt(fd: OwnedFd) -> Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.to_str() != Some("anon_inode:[userfaultfd]") {
            return Err(FaultError::InvalidMemory(format!(
                "fd {} is {}, not a userfaultfd",
                fd.as_raw_fd(),
                link.display()
            )));
        }
        Ok(Userfault { fd, features: 0 })
    }

    /// The features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `start..start+len` in `mode` (`MODE_MISSING`, `MODE_MINOR`, or both).
    ///
    /// # Safety
    /// From now on the kernel writes into this range on behalf of `copy`, `zeropage` and
    /// `continue_range`, which are safe to call. The range must therefore be memory that no Rust
    /// reference aliases (guest memory reached only through raw copies), and it must stay mapped
    /// while this userfaultfd is open or until it is unregistered.
    pub unsafe fn register(&self, start: HostAddr, len: u64, mode: u64) -> Result<()> {
        let mut arg = RegisterArg { range: Range { start: start.0, len }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one RegisterArg that lives across the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut arg) } < 0 {
            return Err(FaultError::Ioctl("UFFDIO_REGISTER", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Ends userfaultfd over `start..start+len`: from then on the kernel serves every fault there
    /// itself, a missing page as a zero page.
    ///
    /// # Safety
    /// Every page of the range must hold its final contents (present), or a thread blocked on a
    /// missing page, and any later touch of one, reads zeros: a silently corrupted guest.
    pub unsafe fn unregister(&self, start: HostAddr, len: u64) -> Result<()> {
        let mut arg = Range { start: start.0, len };
        // SAFETY: UFFDIO_UNREGISTER reads one Range; unregistering never writes memory.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut arg) } < 0 {
            return Err(FaultError::Ioctl("UFFDIO_UNREGISTER", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Copies `src` into the registered range at `dst` (UFFDIO_COPY). Returns bytes copied, which
    /// is less than `src.len()` when the kernel stopped at an already present page (`Exists`) or a
    /// changing mapping (`Again`).
    pub fn copy(&self, dst: HostAddr, src: &[u8], wake: bool) -> Outcome {
        let mut arg =
            CopyArg { dst: dst.0, src: src.as_ptr() as u64, len: src.len() as u64, mode: dont_wake(wake), copy: 0 };
        // SAFETY: the kernel reads src.len() bytes from src (a live slice) and writes only into
        // registered ranges, which register() made the caller vouch for; dst outside them is EINVAL.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
        Outcome::of(rc, arg.copy)
    }

    /// Maps zero pages over `start..start+len` (UFFDIO_ZEROPAGE).
    pub fn zeropage(&self, start: HostAddr, len: u64, wake: bool) -> Outcome {
        let mut arg = ZeroArg { range: Range { start: start.0, len }, mode: dont_wake(wake), zeropage: 0 };
        // SAFETY: writes only into registered ranges (see copy).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
        Outcome::of(rc, arg.zeropage)
    }

    /// Maps the page-cache pages already present under `start..start+len` (UFFDIO_CONTINUE).
    pub fn continue_range(&self, start: HostAddr, len: u64, wake: bool) -> Outcome {
        let mut arg = ContinueArg { range: Range { start: start.0, len }, mode: dont_wake(wake), mapped: 0 };
        // SAFETY: maps existing page-cache pages into registered ranges only (see copy).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE as _, &mut arg) };
        Outcome::of(rc, arg.mapped)
    }

    /// Wakes threads waiting on faults in the range (after a racing install resolved them).
    pub fn wake(&self, start: HostAddr, len: u64) -> Result<()> {
        let mut arg = Range { start: start.0, len };
        // SAFETY: UFFDIO_WAKE reads one Range and writes no memory.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut arg) } < 0 {
            return Err(FaultError::Ioctl("UFFDIO_WAKE", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for events and reads up to `out.len()` of them. Returns 0 on
    /// timeout, so a fault loop can check for shutdown.
    pub fn read_events(&self, out: &mut [Event], timeout_ms: i32) -> Result<usize> {
        if !self.wait_readable(timeout_ms)? {
            return Ok(0);
        }
        self.read_ready(out)
    }

    /// Waits up to `timeout_ms` for an event to read; whether there is one.
    pub fn wait_readable(&self, timeout_ms: i32) -> Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            return if err.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(FaultError::Io(err)) };
        }
        Ok(rc > 0)
    }

    /// Reads the events queued now, without waiting (none if another reader took them).
    pub fn read_ready(&self, out: &mut [Event]) -> Result<usize> {
        let mut buf = [0u8; MSG_LEN * 64];
        let want = out.len().min(64) * MSG_LEN;
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd that lives across the call; a zero timeout never blocks, so a
        // blocking userfaultfd is never read without an event.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
            return Ok(0);
        }
        // SAFETY: reads at most `want` bytes into buf, which has room for them.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return if err.kind() == std::io::ErrorKind::WouldBlock { Ok(0) } else { Err(FaultError::Io(err)) };
        }
        let count = n as usize / MSG_LEN;
        for (slot, msg) in out.iter_mut().zip(buf[..count * MSG_LEN].chunks_exact(MSG_LEN)) {
            *slot = parse_msg(msg);
        }
        Ok(count)
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn parse_msg(m: &[u8]) -> Event {
    let word = |i: usize| u64::from_ne_bytes(m[8 + i * 8..16 + i * 8].try_into().expect("8 bytes"));
    match m[0] {
        EVENT_PAGEFAULT => Event::PageFault {
            address: HostAddr(word(1)),
            write: word(0) & PAGEFAULT_FLAG_WRITE != 0,
            minor: word(0) & PAGEFAULT_FLAG_MINOR != 0,
        },
        EVENT_REMOVE => Event::Remove { start: HostAddr(word(0)), end: HostAddr(word(1)) },
        other => Event::Other(other),
    }
}

fn dont_wake(wake: bool) -> u64 {
    // Bit 0 is DONTWAKE for COPY, ZEROPAGE and CONTINUE alike.
    u64::from(!wake)
}

fn open_dev_userfaultfd() -> Result<RawFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .map_err(|e| FaultError::Unsupported(format!("no userfaultfd syscall and /dev/userfaultfd: {e}")))?;
    const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its argument and returns a new fd.
    let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if raw < 0 {
        return Err(FaultError::Unsupported(format!("USERFAULTFD_IOC_NEW: {}", std::io::Error::last_os_error())));
    }
    Ok(raw)
}

/// What an install ioctl did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole range was installed.
    Done,
    /// Bytes installed before a page that was already present (EEXIST).
    Exists(u64),
    /// Bytes installed before the mapping changed under us (EAGAIN): retry the rest.
    Again(u64),
    /// Any other failure.
    Failed(i32),
}

impl Outcome {
    fn of(rc: i32, progress: i64) -> Self {
        if rc == 0 {
            return Outcome::Done;
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let done = progress.max(0) as u64;
        match errno {
            libc::EEXIST => Outcome::Exists(done),
            libc::EAGAIN => Outcome::Again(done),
            e => Outcome::Failed(e),
        }
    }
}
