//! `ferry-vmm demo --trips N`: back-and-forth. The guest moves between two hosts in this process
//! (A -> B -> A ...), over tcp loopback, in the chosen mode. The host it leaves keeps its memory
//! (`ferry::backforth::RetainedImage`); the host it arrives at logs what the guest writes from
//! the resume on (KVM's dirty log in a `ChangeTracker`). Between trips the guest runs for
//! `--seconds`, writing its data pages, which `--dirty-percent` makes that share of its memory;
//! the way back offers the changed set and sampled checksums, and moves only those pages when
//! the kept image matches.
//! `--tamper-kept` writes every 16th page of the kept image before each return, which must be
//! refused (and the trip run in full).
//!
//! A fresh guest's memory is mostly zero, and zero pages cross as a bit: a first trip would move
//! little more than a return. So the memory above the guest's data is filled at boot with data the
//! guest keeps and never writes (a page cache, say), a pattern the VMM checks after every trip
//! beside the guest's own check of its data. One JSON object per trip.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Result};
use ferry::backforth::{self, Arrival, BaseVerdict, ChangeTracker, ImageIdentity, RetainedImage};
use ferry::precopy::{DirtyLog, PrecopyConfig};
use ferry::prepager::PolicyKind;
use ferry::{EngineConfig, FreePages, PostcopyDestination, SourceOptions};
use ferry_fault_handler::DestinationMemory;
use ferry_transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry_transport::{GuestMemory, MemoryLayout, PreSharedKey};
use serde_json::json;

use crate::vm::{self, KvmDirtyLog, Memory, Vm};
use crate::{Args, Mode};

/// The guest where it runs: its VM, memory, and what it changed since it arrived.
struct Host {
    vm: Vm,
    running: vm::Running,
    memory: Arc<GuestMemory>,
    tracker: Option<ChangeTracker<KvmDirtyLog>>,
}

/// What the destination half of a trip hands back.
struct Arrived {
    vm: Vm,
    running: vm::Running,
    memory: Arc<GuestMemory>,
    log: KvmDirtyLog,
    resumed_at: SystemTime,
    /// Post-copy: pages that crossed after the resume.
    postcopy_pages: Option<u64>,
    done_at: Instant,
    refused: Option<String>,
}

pub fn demo_trips(a: &Args) -> Result<()> {
    // cli.rs refused the combinations this cannot run (local transport, fault injection,
    // reverse checkpoints, ft, --dirty-percent with --data-mib).
    let mut a = a.clone();
    if let Some(percent) = a.dirty_percent {
        // The workload writes its data pages over and over: they are what it changes per stay.
        a.data_mib = Some(((a.mem_mib as f64 * percent / 100.0).round() as u64).max(1));
    }
    let a = &a;
    let layout = crate::layout(a)?;
    let pages = layout.total_pages();
    let memory = Arc::new(GuestMemory::create(layout.clone(), a.backing)?);
    memory.regions()[0].populate_write(crate::guest::DATA_GPA, (crate::data_pages(a) * crate::guest::PAGE) as usize)?;
    let mut vm = Vm::new(Memory::Plain(memory.clone()), a.vcpus)?;
    crate::boot(&mut vm, a)?;
    vm.prefault()?;
    let filler = Filler::of(&layout, crate::data_pages(a));
    filler.fill(&memory)?;
    let running = vm.start()?;
    let vm_id = format!("vm-{}", std::process::id());
    let mut here = Host { vm, running, memory, tracker: None };
    let mut kept_there: Option<RetainedImage> = None;
    let mut failures = 0;
    for trip in 1..=a.trips {
        let stay = stay(&mut here, a)?;
        if a.tamper_kept {
            if let Some(image) = &kept_there {
                let page = u64::from(layout.page_size());
                for p in (0..pages).step_by(16) {
                    image.memory().regions()[0].write(p * page + 8, &[0x5a; 8])?;
                }
            }
        }
        let generation = trip - 1;
        let (arrived, left, mut report) = one_trip(a, here, kept_there.take(), &layout, &vm_id, generation)?;
        report["trip"] = json!(trip);
        report["changed_pages_at_departure"] = json!(stay.changed);
        report["stay_ms"] = json!(stay.ms);
        let mut vm = arrived.vm;
        let wrong_data = crate::self_check(&mut vm, arrived.running)?;
        let wrong_filler = filler.check(&arrived.memory)?;
        report["filler_mismatches"] = json!(wrong_filler);
        let mismatches = wrong_data + wrong_filler;
        report["guest_mismatches"] = json!(mismatches);
        failures += u64::from(mismatches != 0);
        crate::print_report(a, &report)?;
        let running = vm.start()?;
        let base = ImageIdentity::new(vm_id.clone(), generation)?;
        let tracker = ChangeTracker::start(base, arrived.log, pages)?;
        here = Host { vm, running, memory: arrived.memory, tracker: Some(tracker) };
        kept_there = Some(left);
    }
    here.vm.stop(here.running)?;
    if failures > 0 {
        bail!("the guest found wrong pages after {failures} of {} trips", a.trips);
    }
    Ok(())
}

struct Stay {
    changed: Option<u64>,
    ms: f64,
}

/// Runs the guest here for `--seconds`; returns the pages it changed since it arrived.
fn stay(here: &mut Host, a: &Args) -> Result<Stay> {
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let changed = match &mut here.tracker {
        Some(tracker) => {
            tracker.collect()?;
            Some(tracker.changed().count())
        }
        None => None,
    };
    Ok(Stay { changed, ms: started.elapsed().as_secs_f64() * 1e3 })
}

/// Moves the guest from `here` to the host keeping `kept`. Returns it running there, the image
/// left here, and the trip's report.
fn one_trip(
    a: &Args,
    here: Host,
    kept: Option<RetainedImage>,
    layout: &MemoryLayout,
    vm_id: &str,
    generation: u64,
) -> Result<(Arrived, RetainedImage, serde_json::Value)> {
    let started = Instant::now();
    let key = PreSharedKey::generate()?;
    let options = TcpOptions { encryption: a.encryption, ..TcpOptions::default() };
    let server = TcpPageServer::start("127.0.0.1:0", here.memory.clone(), key.clone(), options)?;
    let addr = server.local_addr();
    let destination = {
        let (a, layout) = (a.clone(), layout.clone());
        std::thread::spawn(move || arrive(&a, addr, &key, &layout, kept))
    };
    let mut control = server.accept_control(Duration::from_secs(30))?;
    let Host { mut vm, running, memory, tracker } = here;
    let (offer, mut log) = match tracker {
        Some(mut t) => (Some(t.offer(&memory, backforth::DEFAULT_SAMPLES)?), t.into_log()),
        None => (None, vm.dirty_log()?),
    };
    let verdict = backforth::propose(&mut control, offer.as_ref())?;
    let negotiated = started.elapsed();
    let base = match (&verdict, offer) {
        (BaseVerdict::Accepted, Some(offer)) => Some(offer.changed),
        _ => None,
    };
    let onto_kept = base.is_some();
    let mut running = Some(running);
    let mut paused_at = None;
    let mut pause = || -> ferry::Result<Vec<u8>> {
        let vmm = |e: anyhow::Error| ferry::MigrationError::Vmm(e.to_string());
        let r = running.take().ok_or_else(|| ferry::MigrationError::Vmm("the guest is not running".into()))?;
        vm.stop(r).map_err(vmm)?;
        paused_at = Some(SystemTime::now());
        vm.save().map_err(vmm)
    };
    let page_size = u64::from(layout.page_size());
    let config = PrecopyConfig {
        downtime_target: Duration::from_millis(a.downtime_ms),
        max_rounds: a.max_rounds,
        base,
        ..PrecopyConfig::default()
    };
    let mut report = json!({ "mode": crate::mode_name(a.mode), "base": if onto_kept { "kept-image" } else { "full" } });
    let precopy_pages = match a.mode {
        Mode::Precopy => {
            let r = ferry::precopy::run_source(&mut control, page_size, &mut log, &mut pause, &config)?;
            report["rounds"] = json!(r.rounds);
            report["first_pass_pages"] = json!(r.pages_per_round.first());
            Some(r.pages_per_round.iter().sum::<u64>())
        }
        Mode::Hybrid => {
            let (r, _) = ferry::precopy::run_hybrid_source(&mut control, page_size, &mut log, &mut pause, &config)?;
            report["rounds"] = json!(r.rounds);
            report["first_pass_pages"] = json!(r.pages_per_round.first());
            // The final set crossed by post-copy: the destination counts those.
            Some(r.pages_per_round[..r.pages_per_round.len() - 1].iter().sum::<u64>())
        }
        Mode::Postcopy => {
            if onto_kept {
                backforth::await_prepared(&mut control)?;
            }
            let paused = Instant::now();
            let state = pause()?;
            if onto_kept {
                backforth::send_last_changes(&mut control, &log.collect()?)?;
            }
            ferry::run_source(
                &mut control,
                paused,
                &state,
                &FreePages::new(layout.total_pages()),
                &SourceOptions::default(),
            )?;
            None
        }
        Mode::Ft => bail!("--trips moves a guest; ft keeps a backup"),
    };
    let arrived = destination.join().map_err(|_| anyhow!("the destination thread panicked"))??;
    let paused_at = paused_at.ok_or_else(|| anyhow!("the source never paused"))?;
    let pages_sent = precopy_pages.unwrap_or(0) + arrived.postcopy_pages.unwrap_or(0);
    let stats = server.stats();
    let (data, zero) = (stats.data_pages.load(Ordering::Relaxed), stats.zero_pages.load(Ordering::Relaxed));
    report["pages_sent"] = json!(pages_sent);
    report["zero_pages"] = json!(zero);
    // What crossed as page contents: a zero page is a bit in its reply.
    report["bytes_sent"] = json!(data * page_size);
    if data + zero != pages_sent {
        bail!("the page server served {data} + {zero} zero pages, the migration counts {pages_sent}");
    }
    report["total_ms"] = json!((arrived.done_at - started).as_secs_f64() * 1e3);
    report["downtime_ms"] = json!(arrived.resumed_at.duration_since(paused_at).unwrap_or_default().as_secs_f64() * 1e3);
    report["negotiate_ms"] = json!(negotiated.as_secs_f64() * 1e3);
    report["refused"] = json!(match &verdict {
        BaseVerdict::Refused(why) if arrived.refused.is_some() => Some(why.clone()),
        _ => None,
    });
    drop(vm);
    let left = RetainedImage::keep(memory, ImageIdentity::new(vm_id, generation)?);
    Ok((arrived, left, report))
}

/// The destination half: answers the offer with the kept image, builds a VM on the kept memory
/// (or fresh memory), logs the guest's writes from before its resume, and receives it.
fn arrive(
    a: &Args,
    addr: std::net::SocketAddr,
    key: &PreSharedKey,
    layout: &MemoryLayout,
    kept: Option<RetainedImage>,
) -> Result<Arrived> {
    let options = TcpOptions { encryption: a.encryption, ..TcpOptions::default() };
    let (lanes, mut control) = tcp::connect_session(addr, key, Some(layout), &options)?;
    let (memory, changed, refused) = match backforth::answer(&mut control, kept, layout)? {
        Arrival::Onto { memory, changed } => (memory, Some(changed), None),
        // Not the guest's base: it goes, and the guest arrives into fresh memory.
        Arrival::Full { refused, image: _ } => {
            (Arc::new(GuestMemory::create(layout.clone(), a.backing)?), None, refused)
        }
    };
    let mut running = None;
    let mut resumed_at = None;
    let config = EngineConfig { policy: a.prepager, ..EngineConfig::default() };
    let (vm, log, postcopy_pages) = match a.mode {
        Mode::Precopy => {
            let mut vm = Vm::new(Memory::Plain(memory.clone()), a.vcpus)?;
            let log = vm.dirty_log()?;
            ferry::precopy::run_destination(&mut control, &memory, lanes, |blob| {
                resume(&mut vm, blob, &mut running, &mut resumed_at)
            })?;
            (vm, log, None)
        }
        Mode::Hybrid => {
            // The post-copy part registers this memory with userfaultfd under the VM's slots.
            let mut vm = Vm::new(Memory::Plain(memory.clone()), a.vcpus)?;
            let log = vm.dirty_log()?;
            let (_, session) =
                ferry::precopy::run_hybrid_destination(Box::new(control), memory.clone(), lanes, &config, |blob| {
                    resume(&mut vm, blob, &mut running, &mut resumed_at)
                })?;
            let r = until_present(session, a)?;
            (vm, log, Some(r.urgent_pages + r.bulk_pages))
        }
        Mode::Postcopy => {
            let registered = match changed {
                Some(changed) => {
                    // Dropped while the guest still runs there: outside the downtime.
                    let onto = backforth::OntoKept::prepare(&mut control, memory.clone(), changed)?;
                    let last = backforth::receive_last_changes(&mut control, layout.total_pages())?;
                    onto.register(&last)?
                }
                None => DestinationMemory::register_with_valid(memory.clone(), |_| false)?,
            };
            let registered = Arc::new(registered);
            let mut vm = Vm::new(Memory::Arriving(registered.clone()), a.vcpus)?;
            let log = vm.dirty_log()?;
            let session = PostcopyDestination::start(Box::new(control), registered, lanes, &config, |blob| {
                resume(&mut vm, blob, &mut running, &mut resumed_at)
            })?;
            let r = until_present(session, a)?;
            (vm, log, Some(r.urgent_pages + r.bulk_pages))
        }
        Mode::Ft => bail!("--trips moves a guest; ft keeps a backup"),
    };
    let done_at = Instant::now();
    Ok(Arrived {
        vm,
        running: running.ok_or_else(|| anyhow!("the destination never resumed"))?,
        memory,
        log,
        resumed_at: resumed_at.ok_or_else(|| anyhow!("the destination never resumed"))?,
        postcopy_pages,
        done_at,
        refused,
    })
}

/// Waits until every page is present. Demand paging alone never brings the pages the guest does
/// not touch: as the demo does, they are swept after the workload's phase.
fn until_present(session: PostcopyDestination, a: &Args) -> Result<ferry::DestinationReport> {
    if a.prepager == PolicyKind::Demand {
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
        session.finish();
    }
    Ok(session.wait()?)
}

fn resume(
    vm: &mut Vm,
    blob: &[u8],
    running: &mut Option<vm::Running>,
    resumed_at: &mut Option<SystemTime>,
) -> std::result::Result<(), String> {
    vm.restore(blob).map_err(|e| e.to_string())?;
    *running = Some(vm.start().map_err(|e| e.to_string())?);
    *resumed_at = Some(SystemTime::now());
    Ok(())
}

/// The memory above the guest's data: filled at boot with a pattern of its page numbers, which the
/// guest never writes, so every trip must carry it over intact.
struct Filler {
    first_page: u64,
    pages: u64,
    page_size: u64,
}

impl Filler {
    fn of(layout: &MemoryLayout, data_pages: u64) -> Self {
        let page_size = u64::from(layout.page_size());
        let first_page = (crate::guest::DATA_GPA + data_pages * crate::guest::PAGE).div_ceil(page_size);
        Filler { first_page, pages: layout.total_pages().saturating_sub(first_page), page_size }
    }

    fn page(&self, p: u64) -> Vec<u8> {
        let word = (p | 0xf111_0000_0000_0000).to_le_bytes();
        word.iter().copied().cycle().take(self.page_size as usize).collect()
    }

    fn fill(&self, memory: &GuestMemory) -> Result<()> {
        for p in self.first_page..self.first_page + self.pages {
            memory.regions()[0].write(p * self.page_size, &self.page(p))?;
        }
        Ok(())
    }

    /// Filler pages that do not hold their pattern.
    fn check(&self, memory: &GuestMemory) -> Result<u64> {
        let mut got = vec![0u8; self.page_size as usize];
        let mut wrong = 0;
        for p in self.first_page..self.first_page + self.pages {
            memory.regions()[0].read(p * self.page_size, &mut got)?;
            wrong += u64::from(got != self.page(p));
        }
        Ok(wrong)
    }
}
