//! The reference guest: no firmware, no kernel. The VMM writes identity-mapped long-mode page
//! tables and a GDT, and starts the vCPU at CPL3 in a workload generated here with iced-x86
//! (CPL0 code is emulated one instruction at a time on these machines; CPL3 code runs natively).
//!
//! Guest ABI (also for `--guest FILE` flat binaries, loaded at [`CODE_GPA`], entered at CPL3 with
//! RFLAGS.IOPL=3 so `out` works):
//! - `out dx, eax` with DX = [`PORT_PROGRESS`]: EAX = work done since the last report (passes or
//!   writes, per workload).
//! - DX = [`PORT_CONSOLE`]: AL = one byte of console output.
//! - DX = [`PORT_VERIFY`]: EAX = pages that failed the guest's self-check, in answer to the VMM
//!   setting the vCPU's mailbox qword to 1 (the guest clears it). vCPU i's mailbox is at
//!   [`MAILBOX_GPA`] + 8i; its address is also the qword at the top of the vCPU's stack.
//! - DX = [`PORT_FREE`]: the guest gives back EAX data pages starting at data page RSI (free-page
//!   reporting, like a balloon): it must not touch them again; they are never migrated and read
//!   as zero at a destination.
//! - DX = [`PORT_TASK`]: EAX = 1 entering, 0 leaving a code segment where stopping is cheap
//!   (task-guided pre-copy; recorded by the VMM).
//! - DX = [`PORT_OUTPUT`]: EAX = the next number of this vCPU's output sequence (1, 2, 3...),
//!   for an observer outside the VMM: output that must never be lost, repeated or taken back. The
//!   generated workloads keep the count in guest memory (the qword at the mailbox + 0x800) and
//!   emit one with every progress report.
//! - Each vCPU gets its own slice: R8 = data base, R9 = data pages, R10 = version table base, R15 = TSC cycles per page written
//!   (0: unlimited; the writers pace themselves with `rdtsc`), RSP = a user stack.

use iced_x86::code_asm::*;

pub const PAGE: u64 = 4096;
pub const PML4_GPA: u64 = 0x1000;
pub const PDPT_GPA: u64 = 0x2000;
pub const PD_GPA: u64 = 0x3000;
pub const GDT_GPA: u64 = 0x20000;
pub const TSS_GPA: u64 = 0x21000;
pub const MAILBOX_GPA: u64 = 0x30000;
/// The phased workload's phase lengths, TSC cycles: heavy at +0, quiet at +8.
pub const PHASES_GPA: u64 = MAILBOX_GPA + 0xc00;
pub const CODE_GPA: u64 = 0x100000;
pub const STACK_TOP_GPA: u64 = 0x1f0000;
/// Stack space per vCPU: vCPU i's stack tops at `STACK_TOP_GPA - i * STACK_BYTES`.
pub const STACK_BYTES: u64 = 0x4000;
pub const VERSION_TABLE_GPA: u64 = 0x400000;
pub const DATA_GPA: u64 = 0x1000000;

/// Operations between progress reports of the random workloads: ~1 ms of work at full speed,
/// so the VMM's rate samples resolve what a migration does to the guest.
const RAND_BATCH: u32 = 1024;

pub const PORT_PROGRESS: u16 = 0x10;
pub const PORT_CONSOLE: u16 = 0x11;
pub const PORT_VERIFY: u16 = 0x12;
pub const PORT_FREE: u16 = 0x13;
pub const PORT_TASK: u16 = 0x14;
pub const PORT_OUTPUT: u16 = 0x15;
/// Where a vCPU's output count lives: this far past its mailbox.
const OUTPUT_COUNT_OFFSET: i32 = 0x800;

pub const USER_CS: u16 = 0x1b;
pub const USER_DS: u16 = 0x23;
pub const TSS_SELECTOR: u16 = 0x28;

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Spins on `pause`, reporting now and then: memory stays as loaded (all data pages zero).
    Idle,
    /// Writes every data page in order, pass after pass; page p holds (p << 32 | pass).
    SeqWrite,
    /// Writes random data pages; page p holds (p << 32 | `version[p]`), the version table counts
    /// the writes of each page.
    RandWrite,
    /// Like rand-write, but reads whole pages 15 times out of 16 and writes once.
    ReadMostly,
    /// Like rand-write, with 15 writes out of 16 in a hot set of 1/16 of the data pages.
    HotSet,
    /// Alternates a heavy phase of rand-write's writes (unmarked) with a quiet phase that writes
    /// nothing inside a task segment ([`PORT_TASK`]): where stopping the guest is cheap. The
    /// phases' lengths in TSC cycles are the qwords at [`PHASES_GPA`] (heavy, then quiet).
    Phased,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Idle,
        Workload::SeqWrite,
        Workload::RandWrite,
        Workload::ReadMostly,
        Workload::HotSet,
        Workload::Phased,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::SeqWrite => "seq-write",
            Workload::RandWrite => "rand-write",
            Workload::ReadMostly => "read-mostly",
            Workload::HotSet => "hot-set",
            Workload::Phased => "phased",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL.into_iter().find(|w| w.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
            format!("unknown workload {s:?}: {}", names.join(", "))
        })
    }
}

/// Page tables (2 MiB identity pages, user-accessible), GDT and TSS for a guest of `mem_bytes`.
/// Returns (guest physical address, bytes) pieces for the VMM to write.
pub fn boot_structures(mem_bytes: u64) -> Vec<(u64, Vec<u8>)> {
    let gib = mem_bytes.div_ceil(1 << 30);
    let mut pml4 = vec![0u8; PAGE as usize];
    pml4[..8].copy_from_slice(&(PDPT_GPA | 0x7).to_le_bytes());
    let mut pdpt = vec![0u8; PAGE as usize];
    let mut pds = vec![0u8; (gib * PAGE) as usize];
    for g in 0..gib {
        let pd = PD_GPA + g * PAGE;
        pdpt[(g * 8) as usize..(g * 8 + 8) as usize].copy_from_slice(&(pd | 0x7).to_le_bytes());
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            let at = ((g * 512 + e) * 8) as usize;
            pds[at..at + 8].copy_from_slice(&(addr | 0x87).to_le_bytes());
        }
    }
    let tss_limit = 0x67u64;
    let tss_low = tss_limit | ((TSS_GPA & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS_GPA >> 24) & 0xff) << 56);
    let gdt: Vec<u8> = [
        0u64,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
        tss_low,
        TSS_GPA >> 32,
    ]
    .iter()
    .flat_map(|e| e.to_le_bytes())
    .collect();
    vec![(PML4_GPA, pml4), (PDPT_GPA, pdpt), (PD_GPA, pds), (GDT_GPA, gdt), (TSS_GPA, vec![0u8; 0x68])]
}

/// Bytes of the GDT (its limit is this minus one).
pub const GDT_BYTES: u16 = 7 * 8;

/// Generates the workload's code, to be loaded at [`CODE_GPA`].
pub fn workload_code(workload: Workload) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    match workload {
        Workload::Idle => {
            // It never uses its data pages: it gives them back first.
            a.xor(esi, esi)?;
            a.mov(eax, r9d)?;
            hypercall(&mut a, PORT_FREE)?;
            // Reports now and then, so the VMM can stop it at a hypercall like the others.
            let (mut top, mut spin) = (a.create_label(), a.create_label());
            a.set_label(&mut top)?;
            a.mov(ecx, 100_000)?;
            a.set_label(&mut spin)?;
            a.pause()?;
            a.dec(ecx)?;
            a.jnz(spin)?;
            a.mov(eax, 1)?;
            hypercall(&mut a, PORT_PROGRESS)?;
            emit_output(&mut a)?;
            // Nothing was written: every data page must still be zero.
            maybe_verify(&mut a, |a| count_bad_pages(a, |a| a.xor(eax, eax)))?;
            a.jmp(top)?;
        }
        Workload::SeqWrite => seq_write(&mut a)?,
        Workload::RandWrite | Workload::ReadMostly | Workload::HotSet => rand_write(&mut a, workload)?,
        Workload::Phased => phased(&mut a)?,
    }
    a.assemble(CODE_GPA)
}

/// RDI = the address of data page R11 (R8 + R11 * 4096).
fn page_address(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdi, r11)?;
    a.shl(rdi, 12)?;
    a.add(rdi, r8)
}

/// `out` to a port with EAX as the value; clobbers EDX.
fn hypercall(a: &mut CodeAssembler, port: u16) -> Result<(), IcedError> {
    a.mov(edx, u32::from(port))?;
    a.out(dx, eax)
}

/// Emits this vCPU's next output number; clobbers RAX, EDX.
fn emit_output(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(rsp))?;
    a.inc(qword_ptr(rax + OUTPUT_COUNT_OFFSET))?;
    a.mov(eax, dword_ptr(rax + OUTPUT_COUNT_OFFSET))?;
    hypercall(a, PORT_OUTPUT)
}

/// If the VMM asked for a self-check, runs `check` (which leaves failed pages in EBX), reports
/// it, and clears the request.
fn maybe_verify(
    a: &mut CodeAssembler,
    check: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    // This vCPU's mailbox: its address is the qword at the top of its stack.
    a.mov(rax, qword_ptr(rsp))?;
    a.cmp(qword_ptr(rax), 0)?;
    a.je(skip)?;
    check(a)?;
    a.mov(eax, ebx)?;
    hypercall(a, PORT_VERIFY)?;
    a.mov(rax, qword_ptr(rsp))?;
    a.mov(qword_ptr(rax), 0)?;
    a.set_label(&mut skip)?;
    Ok(())
}

/// Counts pages p in 0..R9 whose qwords are not all equal to `expected(p)` (computed into RAX by
/// `expected` from the page index in R11); result in EBX.
fn count_bad_pages(
    a: &mut CodeAssembler,
    expected: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let (mut page_loop, mut word_loop, mut bad, mut next) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.xor(ebx, ebx)?;
    a.xor(r11, r11)?;
    a.set_label(&mut page_loop)?;
    expected(a)?;
    page_address(a)?;
    a.mov(ecx, 512)?;
    a.set_label(&mut word_loop)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(bad)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(word_loop)?;
    a.jmp(next)?;
    a.set_label(&mut bad)?;
    a.inc(ebx)?;
    a.set_label(&mut next)?;
    a.inc(r11)?;
    a.cmp(r11, r9)?;
    a.jb(page_loop)?;
    Ok(())
}

/// Waits until RBP (a TSC deadline) and moves it on by R15, if R15 is not 0. A deadline far from
/// the TSC in either direction is reset to now: after a migration the destination's TSC starts
/// elsewhere, and the writer must neither stall nor burst. Clobbers RAX, RDX.
fn pace(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let (mut done, mut wait, mut reset, mut go) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.test(r15, r15)?;
    a.jz(done)?;
    a.set_label(&mut wait)?;
    read_tsc(a)?;
    // far behind: more than 1024 periods late
    a.mov(rdx, r15)?;
    a.shl(rdx, 10)?;
    a.add(rdx, rbp)?;
    a.cmp(rax, rdx)?;
    a.ja(reset)?;
    // far ahead: the deadline is more than 1024 periods away
    a.mov(rdx, r15)?;
    a.shl(rdx, 10)?;
    a.add(rdx, rax)?;
    a.cmp(rbp, rdx)?;
    a.ja(reset)?;
    a.cmp(rax, rbp)?;
    a.jae(go)?;
    a.pause()?;
    a.jmp(wait)?;
    a.set_label(&mut reset)?;
    a.mov(rbp, rax)?;
    a.set_label(&mut go)?;
    a.add(rbp, r15)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// R12 = pass. Each pass writes every page with (page << 32 | pass) and reports every 256 pages.
fn seq_write(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let (mut pass_loop, mut page_loop, mut no_report) = (a.create_label(), a.create_label(), a.create_label());
    a.xor(r12, r12)?;
    a.xor(ebp, ebp)?;
    a.set_label(&mut pass_loop)?;
    a.inc(r12)?;
    a.xor(r11, r11)?;
    a.set_label(&mut page_loop)?;
    pace(a)?;
    a.mov(rax, r11)?;
    a.shl(rax, 32)?;
    a.or(rax, r12)?;
    page_address(a)?;
    a.mov(ecx, 512)?;
    a.rep().stosq()?;
    a.inc(r11)?;
    a.test(r11, 255)?;
    a.jnz(no_report)?;
    a.mov(eax, 256)?;
    hypercall(a, PORT_PROGRESS)?;
    emit_output(a)?;
    a.set_label(&mut no_report)?;
    a.cmp(r11, r9)?;
    a.jb(page_loop)?;
    // Between passes every page holds this pass: the moment to answer a self-check.
    maybe_verify(a, |a| {
        count_bad_pages(a, |a| {
            a.mov(rax, r11)?;
            a.shl(rax, 32)?;
            a.or(rax, r12)
        })
    })?;
    a.jmp(pass_loop)
}

/// The random-access workloads. R13 = xorshift state. A write bumps `version[p]` (u32 at R10 + 4p)
/// and fills page p with (p << 32 | version); reports every [`RAND_BATCH`] operations and answers
/// self-checks between batches.
fn rand_write(a: &mut CodeAssembler, workload: Workload) -> Result<(), IcedError> {
    let (mut batch, mut write, mut next) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(r13, 0x9e37_79b9_7f4a_7c15u64)?;
    // R12 = hot set pages: max(data pages / 16, 1)
    a.mov(r12, r9)?;
    a.shr(r12, 4)?;
    a.jnz(next)?;
    a.mov(r12d, 1)?;
    a.set_label(&mut next)?;
    a.xor(ebp, ebp)?;
    a.set_label(&mut batch)?;
    a.mov(r14d, RAND_BATCH)?;
    a.set_label(&mut write)?;
    pace(a)?;
    // page = state % pages, or for hot-set, 15 times in 16: state % hot pages
    random_page(a)?;
    if workload == Workload::HotSet {
        let mut cold = a.create_label();
        a.mov(rax, r13)?;
        a.shr(rax, 60)?;
        a.jz(cold)?;
        a.mov(rax, r11)?;
        a.xor(edx, edx)?;
        a.div(r12)?;
        a.mov(r11, rdx)?;
        a.set_label(&mut cold)?;
    }
    if workload == Workload::ReadMostly {
        // 15 times in 16: read the whole page instead of writing it.
        let (mut do_write, mut sum, mut counted) = (a.create_label(), a.create_label(), a.create_label());
        a.mov(rax, r13)?;
        a.shr(rax, 60)?;
        a.jz(do_write)?;
        page_address(a)?;
        a.mov(ecx, 512)?;
        a.xor(eax, eax)?;
        a.set_label(&mut sum)?;
        a.add(rax, qword_ptr(rdi))?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(sum)?;
        a.jmp(counted)?;
        a.set_label(&mut do_write)?;
        write_page_version(a)?;
        a.set_label(&mut counted)?;
    } else {
        write_page_version(a)?;
    }
    end_batch(a, write)?;
    a.jmp(batch)
}

/// Closes a batch of writes: back to `write` until R14D counts down to 0, then reports the batch
/// and answers a self-check.
fn end_batch(a: &mut CodeAssembler, write: CodeLabel) -> Result<(), IcedError> {
    a.dec(r14d)?;
    a.jnz(write)?;
    a.mov(eax, RAND_BATCH)?;
    hypercall(a, PORT_PROGRESS)?;
    emit_output(a)?;
    maybe_verify(a, check_versions)
}

/// rand-write's self-check: page p holds (p << 32 | `version[p]`), or zero if never written.
fn check_versions(a: &mut CodeAssembler) -> Result<(), IcedError> {
    count_bad_pages(a, |a| {
        let mut written = a.create_label();
        let mut done = a.create_label();
        a.mov(eax, dword_ptr(r10 + r11 * 4))?;
        a.test(eax, eax)?;
        a.jnz(written)?;
        a.xor(eax, eax)?;
        a.jmp(done)?;
        a.set_label(&mut written)?;
        a.mov(rdx, r11)?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.set_label(&mut done)
    })
}

/// One xorshift64 step of R13, then R11 = R13 % R9 (a random data page). Clobbers RAX, RDX.
fn random_page(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r13)?;
    a.shl(rax, 13)?;
    a.xor(r13, rax)?;
    a.mov(rax, r13)?;
    a.shr(rax, 7)?;
    a.xor(r13, rax)?;
    a.mov(rax, r13)?;
    a.shl(rax, 17)?;
    a.xor(r13, rax)?;
    a.mov(rax, r13)?;
    a.xor(edx, edx)?;
    a.div(r9)?;
    a.mov(r11, rdx)
}

/// RAX = the TSC. Clobbers RDX.
fn read_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// RSI = the TSC plus the phase length at [R12 + `offset`]. Clobbers RAX, RDX.
fn start_phase(a: &mut CodeAssembler, offset: i32) -> Result<(), IcedError> {
    read_tsc(a)?;
    a.mov(rsi, qword_ptr(r12 + offset))?;
    a.add(rsi, rax)
}

/// Jumps to `over` once the phase that [`start_phase`] began with [R12 + `offset`] has ended:
/// when the deadline RSI is behind the TSC or, after a migration to a host whose TSC is
/// elsewhere, further ahead than a whole phase (one unsigned compare covers both). Clobbers RAX,
/// RDX.
fn phase_over(a: &mut CodeAssembler, offset: i32, over: CodeLabel) -> Result<(), IcedError> {
    read_tsc(a)?;
    a.mov(rdx, rsi)?;
    a.sub(rdx, rax)?;
    a.cmp(rdx, qword_ptr(r12 + offset))?;
    a.ja(over)
}

/// The phased workload: R12 = [`PHASES_GPA`], RSI = the current phase's deadline (TSC). The heavy
/// phase writes like rand-write (paced by R15) in batches, reporting progress after each; the
/// quiet phase enters a task segment, spins and answers self-checks, and leaves it.
fn phased(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let (mut heavy, mut batch, mut write, mut quiet, mut spin_burst, mut spin, mut leave) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.mov(r13, 0x9e37_79b9_7f4a_7c15u64)?;
    a.mov(r12, PHASES_GPA)?;
    a.xor(ebp, ebp)?;
    a.set_label(&mut heavy)?;
    start_phase(a, 0)?;
    a.set_label(&mut batch)?;
    a.mov(r14d, RAND_BATCH)?;
    a.set_label(&mut write)?;
    pace(a)?;
    random_page(a)?;
    write_page_version(a)?;
    end_batch(a, write)?;
    phase_over(a, 0, quiet)?;
    a.jmp(batch)?;

    a.set_label(&mut quiet)?;
    a.mov(eax, 1)?;
    hypercall(a, PORT_TASK)?;
    start_phase(a, 8)?;
    a.set_label(&mut spin_burst)?;
    a.mov(ecx, 2000)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(spin)?;
    maybe_verify(a, check_versions)?;
    phase_over(a, 8, leave)?;
    a.jmp(spin_burst)?;
    a.set_label(&mut leave)?;
    a.xor(eax, eax)?;
    hypercall(a, PORT_TASK)?;
    a.jmp(heavy)
}

/// `version[R11] += 1`, then fills page R11 with (R11 << 32 | version).
fn write_page_version(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(r10 + r11 * 4))?;
    a.inc(eax)?;
    a.mov(dword_ptr(r10 + r11 * 4), eax)?;
    a.mov(rdx, r11)?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    page_address(a)?;
    a.mov(ecx, 512)?;
    a.rep().stosq()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_assembles() {
        for w in Workload::ALL {
            let code = workload_code(w).unwrap();
            assert!(!code.is_empty() && code.len() < 4096, "{w:?}: {} bytes", code.len());
        }
    }
}
