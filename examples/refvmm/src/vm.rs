//! One KVM virtual machine with one vCPU over ferry guest memory. This module and `main.rs` are the
//! only code in ferry that talks to /dev/kvm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_fault_handler::DestinationMemory;
use ferry_transport::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::guest::{self, Workload};

/// Guest memory as the VM sees it: plain, or arriving through a post-copy destination.
#[derive(Clone, Debug)]
pub enum Memory {
    Plain(Arc<GuestMemory>),
    Arriving(Arc<DestinationMemory>),
}

impl Memory {
    pub fn guest(&self) -> &GuestMemory {
        match self {
            Memory::Plain(m) => m,
            Memory::Arriving(d) => d.guest(),
        }
    }

    /// Writes guest-physical bytes (region 0 starts at guest address 0).
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        Ok(self.guest().regions()[0].write(gpa, bytes)?)
    }
}

/// What the vCPU thread reports while it runs.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub progress: AtomicU64,
    /// Pages the vCPUs' self-checks found wrong, and how many vCPUs have answered.
    pub verify_wrong: AtomicU64,
    pub verify_answers: AtomicU64,
    pub stop: AtomicBool,
    /// Data page ranges (first, count) the guest reported free, at most [`MAX_FREE_REPORTS`];
    /// reports past that, or outside the guest's data pages, are dropped (and counted): free-page
    /// skipping is an optimisation, and the guest must not make the VMM grow without bound.
    pub freed: std::sync::Mutex<Vec<(u64, u64)>>,
    pub free_reports_dropped: AtomicU64,
    /// Data pages the guest has, set at boot: free reports must fall inside them.
    pub data_pages: AtomicU64,
    /// Whether the guest is inside a task-guided segment, and how many it entered.
    pub in_segment: AtomicBool,
    pub segments: AtomicU64,
    /// Where the vCPUs wait while a checkpoint is captured.
    pub gate: PauseGate,
    /// The guest's output (see `output`).
    pub output: crate::output::OutputDevice,
}

/// Pauses running vCPUs at their next exit without taking their threads down (a checkpoint's
/// pause is short and frequent): each parks at the gate with its registers saved.
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    parked: std::sync::Mutex<Parked>,
    changed: std::sync::Condvar,
}

/// The vCPUs at the gate, and the threads to kick out of KVM_RUN.
#[derive(Debug, Default)]
struct Parked {
    states: Vec<Option<VcpuState>>,
    /// Each running vCPU's thread; `None` once it left its loop.
    threads: Vec<Option<libc::pthread_t>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (also out of a wait for a missing page:
/// KVM returns EINTR with a signal pending). Its handler does nothing.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn nothing(_: libc::c_int) {}
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data (zeroed is valid); the handler is an async-signal-safe
        // no-op; without SA_RESTART, KVM_RUN returns EINTR to the vCPU loop, which carries on.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut());
        }
    });
}

impl PauseGate {
    /// The calling thread runs vCPU `index` (until [`PauseGate::leave`]).
    fn enter(&self, index: usize) {
        install_kick_handler();
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if parked.threads.len() <= index {
            parked.threads.resize(index + 1, None);
        }
        // SAFETY: pthread_self has no preconditions.
        parked.threads[index] = Some(unsafe { libc::pthread_self() });
    }

    /// The calling thread stops running vCPU `index`: it must not be signalled any more.
    fn leave(&self, index: usize) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = parked.threads.get_mut(index) {
            *t = None;
        }
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while a pause is requested (and the VM not stopping).
    fn park_if_requested(&self, index: usize, vcpu: &VcpuFd, stop: &AtomicBool) -> Result<()> {
        if !self.requested.load(Ordering::Acquire) {
            return Ok(());
        }
        let state = VcpuState { regs: vcpu.get_regs()?, sregs: vcpu.get_sregs()? };
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if parked.states.len() <= index {
            parked.states.resize_with(index + 1, || None);
        }
        parked.states[index] = Some(state);
        self.changed.notify_all();
        while self.requested.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            parked = self.changed.wait_timeout(parked, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
        parked.states[index] = None;
        Ok(())
    }

    /// Signals every vCPU thread once (each leaves KVM_RUN and goes round its loop).
    fn kick_all(&self) {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        for t in parked.threads.iter().flatten() {
            // SAFETY: the thread is alive: it removes itself (under this lock) before it ends;
            // the signal's handler does nothing.
            unsafe { libc::pthread_kill(*t, KICK_SIGNAL) };
        }
    }

    /// Stops all `vcpus` at their next exits and returns their states; if one does not stop
    /// within `timeout` (blocked on a page that has not come), lets the others go and fails.
    pub fn pause(&self, vcpus: usize, timeout: Duration) -> Result<Vec<VcpuState>> {
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.requested.store(true, Ordering::Release);
        loop {
            if parked.states.len() >= vcpus && parked.states[..vcpus].iter().all(Option::is_some) {
                return Ok(parked.states[..vcpus].iter_mut().map(|s| s.take().expect("checked")).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(parked);
                self.resume();
                bail!("a vCPU did not stop within {timeout:?}");
            }
            // Kick those still running, again each millisecond: a kick that lands just before a
            // vCPU enters KVM_RUN is lost.
            let Parked { states, threads } = &*parked;
            for (i, t) in threads.iter().enumerate() {
                if let (Some(t), None) = (t, states.get(i).and_then(Option::as_ref)) {
                    // SAFETY: the thread is alive: it removes itself (under this lock) before it
                    // ends; the signal's handler does nothing.
                    unsafe { libc::pthread_kill(*t, KICK_SIGNAL) };
                }
            }
            parked = self
                .changed
                .wait_timeout(parked, left.min(Duration::from_millis(1)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }
}

impl Telemetry {
    /// The guest's free-page reports as a bitmap of guest pages (of `page_size` bytes).
    pub fn free_pages(&self, total_pages: u64, page_size: u64) -> ferry::FreePages {
        let mut free = ferry::FreePages::new(total_pages);
        let small_per_page = page_size / guest::PAGE;
        for &(first, count) in self.freed.lock().expect("free list poisoned").iter() {
            // Only whole pages: a 2 MiB page is free when all of its 4 KiB pages are.
            // record_free only keeps ranges inside the data pages, so these sums cannot overflow.
            let start = (guest::DATA_GPA / guest::PAGE + first).div_ceil(small_per_page);
            let end = (guest::DATA_GPA / guest::PAGE + first + count) / small_per_page;
            if end > start {
                free.set_range(ferry::PageIndex(start), end - start);
            }
        }
        free
    }
}

/// Most free-page reports the VMM keeps (a guest reports ranges, so a few suffice).
pub const MAX_FREE_REPORTS: usize = 65536;

impl Telemetry {
    /// Records a free-page report of `count` data pages from `first`, or drops it when it is not
    /// inside the data pages or the list is full. All arithmetic is on guest-chosen values.
    fn record_free(&self, first: Option<u64>, count: u64) {
        let data_pages = self.data_pages.load(Ordering::Acquire);
        let inside = first.and_then(|f| f.checked_add(count)).is_some_and(|end| end <= data_pages);
        let mut freed = self.freed.lock().expect("free list poisoned");
        match (first, inside) {
            (Some(first), true) if freed.len() < MAX_FREE_REPORTS => freed.push((first, count)),
            _ => {
                self.free_reports_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The vCPU's architectural state: what travels in the migration's state blob.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

pub struct Vm {
    // Field order is drop order: the VM (and its memory slots) goes before the memory it maps.
    /// Empty while the vCPUs run on their threads.
    vcpus: Vec<VcpuFd>,
    vcpu_count: usize,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    memory: Memory,
    pub telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("memory", &self.memory).finish_non_exhaustive()
    }
}

impl Vm {
    pub fn new(memory: Memory, vcpu_count: usize) -> Result<Self> {
        if !(1..=MAX_VCPUS).contains(&vcpu_count) {
            bail!("{vcpu_count} vCPUs: 1 to {MAX_VCPUS}");
        }
        let kvm = Kvm::new().context("open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        set_memory_slots(&vm, &memory, 0)?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).context("KVM_GET_SUPPORTED_CPUID")?;
        let vcpus = (0..vcpu_count)
            .map(|i| {
                let vcpu = vm.create_vcpu(i as u64).context("KVM_CREATE_VCPU")?;
                vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Vm { vcpus, vcpu_count, vm: Arc::new(vm), _kvm: kvm, memory, telemetry: Arc::new(Telemetry::default()) })
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Turns on KVM's dirty log for every slot: the pre-copy source's view of what the guest wrote.
    pub fn dirty_log(&self) -> Result<KvmDirtyLog> {
        set_memory_slots(&self.vm, &self.memory, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)?;
        let slots = self.memory.guest().regions().iter().map(|r| r.len() as u64).collect();
        let layout = self.memory.guest().layout();
        Ok(KvmDirtyLog {
            memory: self.memory.clone(),
            vm: self.vm.clone(),
            slots,
            pages: layout.total_pages(),
            small_per_page: u64::from(layout.page_size()) / guest::PAGE,
        })
    }

    /// Loads page tables, GDT and the workload, and points the vCPU at it (CPL3, long mode).
    /// `rate_mib` limits the writers to that many MiB/s (None: unlimited).
    pub fn boot(&mut self, workload: Workload, data_pages: u64, rate_mib: Option<f64>) -> Result<()> {
        let code = guest::workload_code(workload).map_err(|e| anyhow!("assembling: {e}"))?;
        self.boot_code(&code, data_pages, rate_mib)
    }

    /// Boots a flat binary (loaded at [`guest::CODE_GPA`], entered at CPL3 per the guest ABI).
    pub fn boot_code(&mut self, code: &[u8], data_pages: u64, rate_mib: Option<f64>) -> Result<()> {
        if code.len() as u64 > guest::STACK_TOP_GPA - guest::CODE_GPA - 0x10000 {
            bail!("a guest binary of {} bytes does not fit below the stack", code.len());
        }
        let mem_bytes = self.memory.guest().layout().total_bytes();
        if guest::DATA_GPA + data_pages * guest::PAGE > mem_bytes
            || data_pages * 4 > guest::DATA_GPA - guest::VERSION_TABLE_GPA
        {
            bail!("{data_pages} data pages do not fit a guest of {mem_bytes} bytes");
        }
        for (gpa, bytes) in guest::boot_structures(mem_bytes) {
            self.memory.write(gpa, &bytes)?;
        }
        self.memory.write(guest::CODE_GPA, code)?;
        if self.vcpus.len() != self.vcpu_count {
            bail!("the vCPUs are running");
        }
        // Each vCPU works on its own slice of the data pages and of the version table.
        let per_vcpu = data_pages / self.vcpu_count as u64;
        self.telemetry.data_pages.store(per_vcpu * self.vcpu_count as u64, Ordering::Release);
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let stack_top = guest::STACK_TOP_GPA - i as u64 * guest::STACK_BYTES;
            self.memory.write(stack_top, &(guest::MAILBOX_GPA + 8 * i as u64).to_le_bytes())?;
            let slice = i as u64 * per_vcpu;
            boot_vcpu(
                vcpu,
                stack_top,
                guest::DATA_GPA + slice * guest::PAGE,
                per_vcpu,
                guest::VERSION_TABLE_GPA + slice * 4,
                rate_mib,
            )?;
        }
        Ok(())
    }

    /// Sets the phased workload's phase lengths (see [`guest::Workload::Phased`]).
    pub fn set_phases(&self, heavy: Duration, quiet: Duration) -> Result<()> {
        let vcpu = self.vcpus.first().ok_or_else(|| anyhow!("the vCPUs are running"))?;
        let hz = f64::from(vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")?) * 1e3;
        let cycles = |d: Duration| ((d.as_secs_f64() * hz) as u64).max(1);
        let phases: Vec<u8> = [cycles(heavy), cycles(quiet)].iter().flat_map(|c| c.to_le_bytes()).collect();
        self.memory.write(guest::PHASES_GPA, &phases)
    }

    /// Maps all guest memory in KVM's second-level page tables now (KVM_PRE_FAULT_MEMORY, Linux
    /// 6.10), as a guest that has run for a while has it: a source's rate is then its steady state,
    /// not first-touch EPT faults. `Ok(false)` where the kernel or its MMU mode cannot.
    pub fn prefault(&self) -> Result<bool> {
        use std::os::fd::AsRawFd;
        /// _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
        const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xC040_AED5;
        let vcpu = self.vcpus.first().ok_or_else(|| anyhow!("the vCPUs are running"))?;
        let mut range = kvm_bindings::kvm_pre_fault_memory {
            gpa: 0,
            size: self.memory.guest().layout().total_bytes(),
            ..Default::default()
        };
        while range.size > 0 {
            // SAFETY: the ioctl reads and updates (gpa, size) of this struct, which lives across
            // the call; it only populates KVM's own page tables for memory already in our slots.
            let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_PRE_FAULT_MEMORY, &mut range) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN) => continue,
                    Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOENT) => return Ok(false),
                    _ => return Err(err).context("KVM_PRE_FAULT_MEMORY"),
                }
            }
        }
        Ok(true)
    }

    /// The vCPUs' state, for the state blob.
    pub fn save(&self) -> Result<Vec<u8>> {
        if self.vcpus.len() != self.vcpu_count {
            bail!("the vCPUs are running");
        }
        let states = self
            .vcpus
            .iter()
            .map(|v| Ok(VcpuState { regs: v.get_regs()?, sregs: v.get_sregs()? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(serde_json::to_vec(&states)?)
    }

    /// How many vCPUs a state blob describes (a restore builds its VM to match).
    pub fn vcpus_in(blob: &[u8]) -> Result<usize> {
        let states: Vec<VcpuState> = serde_json::from_slice(blob).context("state blob")?;
        if !(1..=MAX_VCPUS).contains(&states.len()) {
            bail!("the state blob holds {} vCPUs (1 to {MAX_VCPUS})", states.len());
        }
        Ok(states.len())
    }

    pub fn restore(&mut self, blob: &[u8]) -> Result<()> {
        let states: Vec<VcpuState> = serde_json::from_slice(blob).context("state blob")?;
        self.restore_states(&states)
    }

    pub fn restore_states(&mut self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.vcpus.len() {
            bail!("the state blob holds {} vCPUs, this VM has {}", states.len(), self.vcpus.len());
        }
        for (vcpu, state) in self.vcpus.iter().zip(states) {
            vcpu.set_sregs(&state.sregs)?;
            vcpu.set_regs(&state.regs)?;
        }
        Ok(())
    }

    /// Runs every vCPU on its own thread until [`Telemetry::stop`] is seen at a hypercall.
    pub fn start(&mut self) -> Result<Running> {
        if self.vcpus.len() != self.vcpu_count {
            bail!("the vCPUs are already running");
        }
        self.telemetry.stop.store(false, Ordering::Release);
        let started = Instant::now();
        let mut threads = Vec::with_capacity(self.vcpu_count);
        for (i, mut vcpu) in self.vcpus.drain(..).enumerate() {
            let telemetry = self.telemetry.clone();
            threads.push(std::thread::Builder::new().name(format!("ferry-vcpu{i}")).spawn(move || {
                telemetry.gate.enter(i);
                let result = run_vcpu(i, &mut vcpu, &telemetry);
                telemetry.gate.leave(i);
                (vcpu, Instant::now(), result)
            })?);
        }
        Ok(Running { threads, started })
    }

    /// Stops the running vCPUs, kicking them out of KVM_RUN, and takes them back. Returns when
    /// the last one stopped (from then on no vCPU runs).
    pub fn stop(&mut self, running: Running) -> Result<Instant> {
        self.telemetry.stop.store(true, Ordering::Release);
        // A guest that makes no hypercalls for a while (a quiet phase) exits only when kicked; a
        // kick that lands just before KVM_RUN is lost, so again each millisecond.
        while !running.threads.iter().all(JoinHandle::is_finished) {
            self.telemetry.gate.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut last = running.started;
        let mut first_error = None;
        for thread in running.threads {
            let (vcpu, stopped, result) = thread.join().map_err(|_| anyhow!("a vCPU thread panicked"))?;
            self.vcpus.push(vcpu);
            last = last.max(stopped);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(last), Err)
    }

    /// Task-guided stop: parks every vCPU, then, unless `anyway`, lets a guest found outside its
    /// task segment run on (`Err(running)`); otherwise stops it for good as [`Vm::stop`]. The
    /// guest's place is exact while its vCPUs are parked: the segment marks are exits.
    pub fn stop_in_segment(&mut self, running: Running, anyway: bool) -> Result<Result<Instant, Running>> {
        let gate = &self.telemetry.gate;
        gate.pause(self.vcpu_count, Duration::from_secs(10))?;
        if !anyway && !self.telemetry.in_segment.load(Ordering::Acquire) {
            gate.resume();
            return Ok(Err(running));
        }
        self.telemetry.stop.store(true, Ordering::Release);
        gate.resume();
        self.stop(running).map(Ok)
    }
}

impl ferry::taskguided::TaskSegments for Telemetry {
    fn in_segment(&self) -> bool {
        self.in_segment.load(Ordering::Acquire)
    }
}

/// Points one vCPU at the workload: long mode, CPL3, its stack, its data slice.
fn boot_vcpu(
    vcpu: &VcpuFd,
    stack_top: u64,
    data: u64,
    data_pages: u64,
    versions: u64,
    rate_mib: Option<f64>,
) -> Result<()> {
    {
        let mut sregs = vcpu.get_sregs()?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: guest::USER_CS,
            type_: 11,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment { selector: guest::USER_DS, type_: 3, db: 1, l: 0, ..code };
        (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (code, data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: guest::TSS_GPA,
            limit: 0x67,
            selector: guest::TSS_SELECTOR,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.gdt.base = guest::GDT_GPA;
        sregs.gdt.limit = guest::GDT_BYTES - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = guest::PML4_GPA;
        sregs.cr4 = 0x20;
        sregs.cr0 = 0x8005_0033;
        sregs.efer = 0x500;
        vcpu.set_sregs(&sregs)?;
    }
    let cycles_per_page = match rate_mib {
        Some(mib) if mib > 0.0 => {
            let hz = f64::from(vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")?) * 1e3;
            (hz * guest::PAGE as f64 / (mib * 1048576.0)).max(1.0) as u64
        }
        _ => 0,
    };
    let regs = kvm_regs {
        r15: cycles_per_page,
        rip: guest::CODE_GPA,
        rsp: stack_top,
        rflags: 0x3002,
        r8: data,
        r9: data_pages,
        r10: versions,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// (Re)defines every memory slot over `memory` with `flags`.
fn set_memory_slots(vm: &VmFd, memory: &Memory, flags: u32) -> Result<()> {
    for (slot, (r, layout)) in memory.guest().regions().iter().zip(memory.guest().layout().regions()).enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: layout.guest_phys_addr.0,
            memory_size: r.len() as u64,
            userspace_addr: r.host_addr().as_ptr() as u64,
        };
        // SAFETY: the slot maps a live mapping owned by `memory`, which the Vm holds and drops only
        // after the VM fd (field order), so the guest never sees unmapped host memory.
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

/// KVM's dirty log (KVM_GET_DIRTY_LOG, which also clears it) as ferry's pre-copy dirty log.
pub struct KvmDirtyLog {
    memory: Memory,
    vm: Arc<VmFd>,
    slots: Vec<u64>,
    /// ferry pages in the guest.
    pages: u64,
    /// KVM logs 4 KiB pages; a ferry page (2 MiB on hugetlbfs) is dirty when any of its are.
    small_per_page: u64,
}

impl KvmDirtyLog {
    /// Turns the log off: the guest's writes cost nothing extra from here on.
    pub fn stop(&self) -> Result<()> {
        set_memory_slots(&self.vm, &self.memory, 0)
    }
}

impl ferry::precopy::DirtyLog for KvmDirtyLog {
    fn collect(&mut self) -> ferry::Result<ferry::FreePages> {
        let mut dirty = ferry::FreePages::new(self.pages);
        let mut base = 0;
        for (slot, &size) in self.slots.iter().enumerate() {
            let words = self
                .vm
                .get_dirty_log(slot as u32, size as usize)
                .map_err(|e| ferry::MigrationError::Vmm(format!("KVM_GET_DIRTY_LOG: {e}")))?;
            for (i, w) in words.iter().enumerate() {
                let mut w = *w;
                while w != 0 {
                    let bit = w.trailing_zeros() as u64;
                    dirty.set(ferry::PageIndex(base + (i as u64 * 64 + bit) / self.small_per_page));
                    w &= w - 1;
                }
            }
            base += size / (guest::PAGE * self.small_per_page);
        }
        Ok(dirty)
    }
}

/// Most vCPUs a VM may have (their stacks share the space below [`guest::STACK_TOP_GPA`]).
pub const MAX_VCPUS: usize = 32;

/// The vCPUs running on their threads.
#[derive(Debug)]
pub struct Running {
    threads: Vec<JoinHandle<(VcpuFd, Instant, Result<()>)>>,
    pub started: Instant,
}

fn run_vcpu(index: usize, vcpu: &mut VcpuFd, t: &Telemetry) -> Result<()> {
    loop {
        t.gate.park_if_requested(index, vcpu, &t.stop)?;
        if t.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let value = u32::from_le_bytes(v);
                if port == guest::PORT_FREE {
                    // RSI counts from this vCPU's own data slice (R8).
                    let regs = vcpu.get_regs()?;
                    let first = regs
                        .r8
                        .checked_sub(guest::DATA_GPA)
                        .map(|off| off / guest::PAGE)
                        .and_then(|slice| slice.checked_add(regs.rsi));
                    t.record_free(first, u64::from(value));
                    continue;
                }
                match port {
                    guest::PORT_PROGRESS => {
                        t.progress.fetch_add(u64::from(value), Ordering::Relaxed);
                    }
                    guest::PORT_VERIFY => {
                        t.verify_wrong.fetch_add(u64::from(value), Ordering::AcqRel);
                        t.verify_answers.fetch_add(1, Ordering::AcqRel);
                    }
                    guest::PORT_CONSOLE => eprint!("{}", char::from(value as u8)),
                    guest::PORT_OUTPUT => t.output.emit(index as u32, value),
                    guest::PORT_TASK => {
                        let entering = value != 0;
                        if entering && !t.in_segment.swap(true, Ordering::AcqRel) {
                            t.segments.fetch_add(1, Ordering::Relaxed);
                        } else if !entering {
                            t.in_segment.store(false, Ordering::Release);
                        }
                    }
                    other => bail!("guest wrote to unknown port {other:#x}"),
                }
            }
            Ok(VcpuExit::Hlt) => return Ok(()),
            Ok(VcpuExit::Shutdown) => bail!("the guest shut down (triple fault)"),
            Ok(other) => bail!("unexpected vCPU exit: {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => bail!("KVM_RUN: {e}"),
        }
    }
}
