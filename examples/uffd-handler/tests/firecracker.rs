//! `ferry-uffd-handler` against a client that does what Firecracker does on `/snapshot/load` with
//! a Uffd memory backend (from its documentation): it maps its guest memory anonymous and private
//! (2 MiB hugetlb pages for hugepage guests), opens a userfaultfd with EVENT_REMOVE, registers
//! every region MISSING, connects to the handler's socket and sends the JSON array of
//! `GuestRegionUffdMapping` with the userfaultfd in the same message, keeps the socket open, and
//! runs. Its guest memory is then checked against the memory file page by page, and the balloon's
//! removes (MADV_DONTNEED) must read as zero.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;

use ferry_fault_handler::uffd::{self, Userfault};
use ferry_uffd_handler::protocol::{send_handshake, GuestRegionUffdMapping};

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What page `p` of the memory file holds: every seventh page is a hole, every eleventh is
/// written as zeros, the rest carry their index.
fn expected(p: u64, page: usize) -> Vec<u8> {
    if p % 7 == 3 || p % 11 == 5 {
        return vec![0; page];
    }
    let mut v = vec![(p as u8) ^ 0x5a; page];
    v[..8].copy_from_slice(&p.to_le_bytes());
    v
}

fn memory_file(path: &Path, bytes: u64, page: usize) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    for p in 0..bytes / page as u64 {
        if p % 7 != 3 {
            f.write_all_at(&expected(p, page), p * page as u64).unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn handler(socket: &Path, mem: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-uffd-handler"))
        .args(["--socket", socket.to_str().unwrap(), "--mem-file", mem.to_str().unwrap(), "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry-uffd-handler");
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    child
}

fn report(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the handler failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the handler's JSON report")
}

/// Firecracker's side of a restore: its guest memory and the userfaultfd it handed over.
struct Firecracker {
    regions: Vec<(NonNull<u8>, usize)>,
    page: usize,
    socket: Option<UnixStream>,
    _uffd: Userfault,
}

impl Firecracker {
    fn load(socket: &Path, sizes: &[usize], page: usize) -> Self {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if page > 4096 {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        }
        let regions: Vec<(NonNull<u8>, usize)> = sizes
            .iter()
            .map(|&len| {
                // SAFETY: a fresh anonymous mapping at an address the kernel picks.
                let p =
                    unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
                assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
                (NonNull::new(p.cast()).unwrap(), len)
            })
            .collect();
        let uffd = Userfault::open(uffd::FEATURE_EVENT_REMOVE).unwrap();
        for &(p, len) in &regions {
            // SAFETY: this test's own fresh mappings, reached only through raw copies below.
            unsafe {
                uffd.register(ferry::transport::HostAddr::of(p.as_ptr()), len as u64, uffd::MODE_MISSING).unwrap()
            };
        }
        let mut offset = 0;
        let mappings: Vec<GuestRegionUffdMapping> = regions
            .iter()
            .map(|&(p, len)| {
                let m = GuestRegionUffdMapping {
                    base_host_virt_addr: p.as_ptr() as u64,
                    size: len as u64,
                    offset,
                    page_size: Some(page as u64),
                    page_size_kib: Some(page as u64),
                };
                offset += len as u64;
                m
            })
            .collect();
        let stream = UnixStream::connect(socket).unwrap();
        send_handshake(&stream, &mappings, uffd.as_raw_fd()).unwrap();
        Firecracker { regions, page, socket: Some(stream), _uffd: uffd }
    }

    /// The page at global index `g`: region and address.
    fn addr(&self, g: u64) -> *mut u8 {
        let mut g = g as usize * self.page;
        for &(p, len) in &self.regions {
            if g < len {
                // SAFETY: inside this region.
                return unsafe { p.as_ptr().add(g) };
            }
            g -= len;
        }
        panic!("page outside guest memory")
    }

    /// Reads a guest page as a vCPU would: it blocks in a fault until the handler supplies it.
    fn read(&self, g: u64) -> Vec<u8> {
        let mut v = vec![0u8; self.page];
        // SAFETY: a page of this test's own mapping, copied out with a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(self.addr(g), v.as_mut_ptr(), self.page) };
        v
    }

    /// The balloon: drops pages `first..first+count` (UFFD_EVENT_REMOVE for the handler).
    fn remove(&self, first: u64, count: u64) {
        // SAFETY: page-aligned pages of this test's own mapping; DONTNEED only drops them.
        let rc = unsafe { libc::madvise(self.addr(first).cast(), count as usize * self.page, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    }

    fn pages(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| (len / self.page) as u64).sum()
    }

    fn hang_up(&mut self) {
        drop(self.socket.take());
    }
}

// SAFETY: the guest regions are only reached through raw copies and madvise, which the kernel
// serializes per page like two vCPUs touching guest memory; nothing hands out references.
unsafe impl Send for Firecracker {}
// SAFETY: as above.
unsafe impl Sync for Firecracker {}

impl Drop for Firecracker {
    fn drop(&mut self) {
        for &(p, len) in &self.regions {
            // SAFETY: the mappings made in load, unmapped once.
            unsafe { libc::munmap(p.as_ptr().cast(), len) };
        }
    }
}

fn restore_all(page: usize, sizes: &[usize], prepager: &str) {
    let d = dir(&format!("all-{page}-{prepager}"));
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    memory_file(&mem, sizes.iter().sum::<usize>() as u64, page);
    let child = handler(&socket, &mem, &["--prepager", prepager]);
    let fc = Firecracker::load(&socket, sizes, page);
    let pages = fc.pages();
    // The vCPU touches pages in a scattered order while the rest arrive.
    for i in 0..pages.min(512) {
        let g = (i * 7919) % pages;
        assert_eq!(fc.read(g), expected(g, page), "page {g} when first touched");
    }
    let r = report(child);
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["pages_installed_twice"], 0, "{r}");
    assert_eq!(r["pages_total"], pages, "{r}");
    assert!(r["zero_pages"].as_u64().unwrap() > 0, "holes and zero pages are never installed: {r}");
    for g in 0..pages {
        assert_eq!(fc.read(g), expected(g, page), "page {g} after the restore");
    }
    // After the handler released the memory, the balloon's removes are the kernel's: zero.
    fc.remove(2, 3);
    assert!(fc.read(3).iter().all(|&b| b == 0));
}

#[test]
fn a_4k_guest_in_two_regions_restores_with_bubbling_and_push() {
    restore_all(4096, &[24 << 20, 8 << 20], "bubbling");
    restore_all(4096, &[8 << 20], "push");
}

#[test]
fn a_2m_hugetlb_guest_restores() {
    let have = ferry::toucher::reserve_hugepages(48);
    if have < 48 {
        let _ =
            writeln!(std::io::stderr(), "SKIPPED: a_2m_hugetlb_guest_restores: {have} free 2 MiB hugepages, needs 48");
        return;
    }
    restore_all(2 << 20, &[32 << 20, 16 << 20], "bubbling");
}

/// A demand handler serves faults only, so removes meet registered memory: a removed page reads
/// as zero on its next fault whether it had been supplied or not, and the handler ends when
/// Firecracker hangs up.
fn removes_read_as_zero(page: usize) {
    let d = dir(&format!("remove-{page}"));
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    let size = if page > 4096 { 16 << 20 } else { 4 << 20 };
    memory_file(&mem, size as u64, page);
    let child = handler(&socket, &mem, &["--prepager", "demand"]);
    let mut fc = Firecracker::load(&socket, &[size], page);
    let pages = fc.pages();
    for g in 0..pages / 2 {
        assert_eq!(fc.read(g), expected(g, page), "page {g}");
    }
    // Supplied pages, and pages never touched, dropped by the balloon.
    fc.remove(1, 2);
    fc.remove(pages - 2, 2);
    for g in [1, 2, pages - 2, pages - 1] {
        assert!(fc.read(g).iter().all(|&b| b == 0), "page {g} was removed: it reads as zero");
    }
    for g in [0, 3, pages / 2, pages - 3] {
        assert_eq!(fc.read(g), expected(g, page), "page {g} was not removed");
    }
    fc.hang_up();
    // Demand serves until Firecracker goes (or, on a guest this small, until every page was
    // touched, removed or a hole): either way the handler ends.
    let r = report(child);
    if page == 4096 {
        assert_eq!(r["complete"], false, "half the pages were never touched: {r}");
    }
    assert!(r["network_faults"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn removes_read_as_zero_on_4k_pages() {
    removes_read_as_zero(4096);
}

#[test]
fn removes_read_as_zero_on_2m_pages() {
    let have = ferry::toucher::reserve_hugepages(8);
    if have < 8 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: removes_read_as_zero_on_2m_pages: {have} free 2 MiB hugepages, needs 8"
        );
        return;
    }
    removes_read_as_zero(2 << 20);
}

#[test]
fn a_recorded_working_set_is_replayed_next_time() {
    let d = dir("replay");
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    memory_file(&mem, 16 << 20, 4096);
    let child = handler(&socket, &mem, &["--record"]);
    let fc = Firecracker::load(&socket, &[16 << 20], 4096);
    for i in 0..256u64 {
        let g = (i * 613) % fc.pages();
        assert_eq!(fc.read(g), expected(g, 4096));
    }
    let recorded = report(child);
    drop(fc);
    assert!(recorded["recorded_working_set_pages"].as_u64().unwrap() > 0, "{recorded}");
    let child = handler(&socket, &mem, &["--replay"]);
    let fc = Firecracker::load(&socket, &[16 << 20], 4096);
    for g in 0..fc.pages() {
        assert_eq!(fc.read(g), expected(g, 4096));
    }
    let replayed = report(child);
    assert_eq!(replayed["working_set_pages"], recorded["recorded_working_set_pages"], "{replayed}");
    assert!(replayed["replayed_pages"].as_u64().unwrap() > 0, "{replayed}");
}

#[test]
fn a_hostile_or_silent_peer_is_a_typed_error_not_a_hang() {
    let d = dir("hostile");
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    memory_file(&mem, 4 << 20, 4096);
    // Mappings without a userfaultfd.
    let child = handler(&socket, &mem, &[]);
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("file descriptors"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A region past the end of the memory file, with a real userfaultfd.
    let child = handler(&socket, &mem, &[]);
    let fc_uffd = Userfault::open(uffd::FEATURE_EVENT_REMOVE).unwrap();
    let s = UnixStream::connect(&socket).unwrap();
    let big = GuestRegionUffdMapping {
        base_host_virt_addr: 1 << 30,
        size: 64 << 20,
        offset: 0,
        page_size: Some(4096),
        page_size_kib: None,
    };
    send_handshake(&s, std::slice::from_ref(&big), fc_uffd.as_raw_fd()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the file"), "{}", String::from_utf8_lossy(&out.stderr));
    // Something that is not a userfaultfd.
    let child = handler(&socket, &mem, &[]);
    let s = UnixStream::connect(&socket).unwrap();
    let file = std::fs::File::open(&mem).unwrap();
    let ok = GuestRegionUffdMapping { size: 4 << 20, ..big };
    send_handshake(&s, &[ok], file.as_raw_fd()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a userfaultfd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The balloon races the pre-pager: while bubbling installs the first half of memory, ranges of
/// it are removed and must read as zero right after (never the file's stale bytes, whichever of
/// install and remove won), while the second half reads as the file.
#[test]
fn removes_racing_bulk_installs_always_read_as_zero() {
    let d = dir("race");
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    let size = 64usize << 20;
    memory_file(&mem, size as u64, 4096);
    let child = handler(&socket, &mem, &["--prepager", "push"]);
    let fc = Firecracker::load(&socket, &[size], 4096);
    let pages = fc.pages();
    let fc = std::sync::Arc::new(fc);
    let remover = {
        let fc = fc.clone();
        std::thread::spawn(move || {
            let mut removed = 0;
            let mut g = 1;
            while g + 4 < pages / 2 {
                fc.remove(g, 4);
                for p in g..g + 4 {
                    assert!(fc.read(p).iter().all(|&b| b == 0), "page {p} read stale data after its remove");
                }
                removed += 4;
                g += 37;
            }
            removed
        })
    };
    for g in pages / 2..pages {
        assert_eq!(fc.read(g), expected(g, 4096), "page {g}");
    }
    let removed = remover.join().unwrap();
    assert!(removed > 0);
    let fc = std::sync::Arc::try_unwrap(fc).ok().expect("the remover is done");
    let r = report(child);
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["pages_installed_twice"], 0, "{r}");
    drop(fc);
}

/// Under `--supervise` the worker serving Firecracker is killed mid-restore: a new worker takes
/// over the same userfaultfd, the pages it had not served still arrive, the pages the balloon
/// removed before the kill still read as zero, and Firecracker never sees a failure.
#[test]
fn a_supervised_handler_survives_its_worker_being_killed() {
    let d = dir("supervise");
    let (socket, mem) = (d.join("uffd.sock"), d.join("mem"));
    memory_file(&mem, 8 << 20, 4096);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-uffd-handler"))
        .args(["--socket", socket.to_str().unwrap(), "--mem-file", mem.to_str().unwrap(), "--json"])
        .args(["--supervise", "--prepager", "demand"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    let mut fc = Firecracker::load(&socket, &[8 << 20], 4096);
    line.clear();
    stderr.read_line(&mut line).unwrap();
    let pid: i32 = line.split_whitespace().nth(2).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    let pages = fc.pages();
    for g in 0..pages / 4 {
        assert_eq!(fc.read(g), expected(g, 4096), "page {g}");
    }
    fc.remove(10, 5);
    fc.remove(pages - 10, 5);
    // The worker journals a remove just after reading it, which is what lets madvise return: a
    // kill inside that window loses the remove (the handler's doc says so). Kill after it.
    let journal = socket.with_extension("removed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::metadata(&journal).map_or(0, |m| m.len()) < 32 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: kill(2) on the worker's pid, which this test read from the supervisor.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    for g in 0..pages {
        let removed = (10..15).contains(&g) || (pages - 10..pages - 5).contains(&g);
        let want = if removed { vec![0; 4096] } else { expected(g, 4096) };
        let got = fc.read(g);
        assert!(got == want, "page {g} after the worker died: {:?}.. instead of {:?}..", &got[..16], &want[..16]);
    }
    fc.hang_up();
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert!(out.status.success(), "{rest}");
    assert!(rest.contains("starting another"), "{rest}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["removes_replayed"].as_u64().unwrap() >= 2, "the new worker replayed the removes: {r}");
}
