//! Back-and-forth in one process, over tcp loopback: a guest stand-in (a thread writing random
//! pages of whichever memory it runs on) moves A -> B -> A -> B -> A. The host a guest leaves keeps
//! its memory; each return offers the changes since, the destination checks the kept image and
//! pulls only those. After every trip the destination's memory is the source's byte for byte.
//! Post-copy returns onto a kept image fault in only the changed pages; a kept image written
//! since the guest left is refused and the trip runs in full.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::backforth::{self, Arrival, BaseVerdict, ChangeTracker, ImageIdentity, RetainedImage};
use ferry::precopy::{DirtyLog, PrecopyConfig};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use ferry::{EngineConfig, FreePages, PostcopyDestination, SourceOptions};

const PAGES: u64 = 2048;
/// The stand-in writes this many distinct pages per trip at most (a small dirty set, as the
/// paper's workloads have between trips).
const HOT: u64 = 200;

/// A guest running on one host's memory: writes random pages of its hot set until paused.
struct Guest {
    paused: Mutex<bool>,
    resumed: Condvar,
    stop: AtomicBool,
    dirty: Mutex<FreePages>,
    writes: AtomicU64,
}

impl Guest {
    /// Starts writing `memory`, from the xorshift state `seed`.
    fn start(memory: Arc<GuestMemory>, seed: u64) -> (Arc<Guest>, JoinHandle<()>) {
        let guest = Arc::new(Guest {
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            stop: AtomicBool::new(false),
            dirty: Mutex::new(FreePages::new(PAGES)),
            writes: AtomicU64::new(0),
        });
        let g = guest.clone();
        let thread = std::thread::spawn(move || {
            let mut x = seed | 1;
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (seed % (PAGES - HOT)) + x % HOT;
                let mut paused = g.paused.lock().unwrap();
                while *paused && !g.stop.load(Ordering::Acquire) {
                    paused = g.resumed.wait(paused).unwrap();
                }
                if g.stop.load(Ordering::Acquire) {
                    return;
                }
                memory.regions()[0].write(page * 4096, &[(x >> 56) as u8 | 1; 4096]).unwrap();
                g.dirty.lock().unwrap().set(ferry::PageIndex(page));
                g.writes.fetch_add(1, Ordering::Relaxed);
                drop(paused);
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        (guest, thread)
    }

    fn pause(&self) {
        *self.paused.lock().unwrap() = true;
    }

    /// Ends the guest here for good (it left): it writes nothing more.
    fn end(&self, thread: JoinHandle<()>) {
        let _held = self.paused.lock().unwrap();
        self.stop.store(true, Ordering::Release);
        self.resumed.notify_all();
        drop(_held);
        thread.join().unwrap();
    }
}

struct Log(Arc<Guest>);

impl DirtyLog for Log {
    fn collect(&mut self) -> ferry::Result<FreePages> {
        Ok(std::mem::replace(&mut *self.0.dirty.lock().unwrap(), FreePages::new(PAGES)))
    }
}

fn snapshot(memory: &GuestMemory) -> Vec<u8> {
    let mut copy = vec![0u8; memory.layout().total_bytes() as usize];
    memory.regions()[0].read(0, &mut copy).unwrap();
    copy
}

/// Where the guest runs between trips.
struct Running {
    memory: Arc<GuestMemory>,
    guest: Arc<Guest>,
    thread: JoinHandle<()>,
    /// None until the guest arrived somewhere on a base it can return to.
    tracker: Option<ChangeTracker<Log>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Precopy,
    Postcopy,
}

struct Trip {
    verdict: BaseVerdict,
    pages_moved: u64,
}

/// Moves the guest from `from` to the host holding `kept`; returns the guest running there and
/// the image the source keeps. `tamper` writes the kept image first.
fn trip(
    from: Running,
    kept: Option<RetainedImage>,
    mode: Mode,
    generation: u64,
    tamper: bool,
) -> (Running, RetainedImage, Trip) {
    let layout = from.memory.layout().clone();
    if let (Some(image), true) = (&kept, tamper) {
        for p in (0..PAGES).step_by(16) {
            image.memory().regions()[0].write(p * 4096 + 8, &[0x5a; 8]).unwrap();
        }
    }
    let key = PreSharedKey::generate().unwrap();
    let server = TcpPageServer::start("127.0.0.1:0", from.memory.clone(), key.clone(), TcpOptions::default()).unwrap();
    let addr = server.local_addr();
    let destination = std::thread::spawn(move || {
        let (lanes, mut control) = tcp::connect_session(addr, &key, Some(&layout), &TcpOptions::default()).unwrap();
        let arrival = backforth::answer(&mut control, kept, &layout).unwrap();
        let (memory, mut changed) = match arrival {
            Arrival::Onto { memory, changed } => (memory, Some(changed)),
            Arrival::Full { .. } => (Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap()), None),
        };
        let moved = match mode {
            Mode::Precopy => {
                ferry::precopy::run_destination(&mut control, &memory, lanes, |_| Ok(())).unwrap();
                None
            }
            Mode::Postcopy => {
                let registered = match changed.take() {
                    Some(changed) => {
                        let onto = backforth::OntoKept::prepare(&mut control, memory.clone(), changed).unwrap();
                        let last = backforth::receive_last_changes(&mut control, layout.total_pages()).unwrap();
                        onto.register(&last).unwrap()
                    }
                    None => {
                        ferry::fault_handler::DestinationMemory::register_with_valid(memory.clone(), |_| false).unwrap()
                    }
                };
                let session = PostcopyDestination::start(
                    Box::new(control),
                    Arc::new(registered),
                    lanes,
                    &EngineConfig::default(),
                    |_| Ok(()),
                )
                .unwrap();
                let r = session.wait().unwrap();
                Some(r.urgent_pages + r.bulk_pages)
            }
        };
        (memory, moved)
    });
    let mut control = server.accept_control(Duration::from_secs(10)).unwrap();
    let Running { memory, guest, thread, tracker } = from;
    let (offer, mut log) = match tracker {
        Some(mut t) => (Some(t.offer(&memory, 256).unwrap()), Log(t.into_log().0)),
        None => (None, Log(guest.clone())),
    };
    let verdict = backforth::propose(&mut control, offer.as_ref()).unwrap();
    let base = match (&verdict, offer) {
        (BaseVerdict::Accepted, Some(offer)) => Some(offer.changed),
        _ => None,
    };
    let mut moved = 0;
    match mode {
        Mode::Precopy => {
            let config = PrecopyConfig { base, ..PrecopyConfig::default() };
            let r = ferry::precopy::run_source(
                &mut control,
                4096,
                &mut log,
                || {
                    guest.pause();
                    Ok(Vec::new())
                },
                &config,
            )
            .unwrap();
            moved = r.pages_per_round.iter().sum();
        }
        Mode::Postcopy => {
            if base.is_some() {
                backforth::await_prepared(&mut control).unwrap();
            }
            guest.pause();
            if base.is_some() {
                backforth::send_last_changes(&mut control, &log.collect().unwrap()).unwrap();
            }
            ferry::run_source(&mut control, Instant::now(), b"", &FreePages::new(PAGES), &SourceOptions::default())
                .unwrap();
        }
    }
    let (arrived, pulled) = destination.join().unwrap();
    moved = pulled.unwrap_or(moved);
    guest.end(thread);
    assert!(snapshot(&memory) == snapshot(&arrived), "generation {generation}: the guest arrived byte for byte");
    let identity = ImageIdentity::new("vm-trips", generation).unwrap();
    let retained = RetainedImage::keep(memory, identity.clone());
    let (guest, thread) = Guest::start(arrived.clone(), generation * 7919 + 13);
    let tracker = ChangeTracker::start(identity, Log(guest.clone()), PAGES).unwrap();
    let running = Running { memory: arrived, guest, thread, tracker: Some(tracker) };
    (running, retained, Trip { verdict, pages_moved: moved })
}

fn first_host() -> Running {
    let memory =
        Arc::new(GuestMemory::create(MemoryLayout::single(PAGES * 4096).unwrap(), Backing::Anonymous).unwrap());
    for p in 0..PAGES {
        memory.regions()[0].write(p * 4096, &[(p % 251) as u8 + 1; 4096]).unwrap();
    }
    let (guest, thread) = Guest::start(memory.clone(), 1);
    Running { memory, guest, thread, tracker: None }
}

fn trips(mode: Mode) {
    let mut running = first_host();
    let mut kept_elsewhere = None;
    for generation in 0..4 {
        std::thread::sleep(Duration::from_millis(30));
        let (arrived, left, t) = trip(running, kept_elsewhere.take(), mode, generation, false);
        if generation == 0 {
            assert!(matches!(t.verdict, BaseVerdict::Refused(_)), "the first trip has no base: {:?}", t.verdict);
            assert!(t.pages_moved >= PAGES, "{mode:?}: a full first trip moves every page, moved {}", t.pages_moved);
        } else {
            assert_eq!(t.verdict, BaseVerdict::Accepted, "{mode:?} trip {generation}");
            // The stand-in writes within 200 pages per stay (and some more during pre-copy rounds).
            assert!(t.pages_moved <= 3 * HOT, "{mode:?} trip {generation} moved {} pages", t.pages_moved);
        }
        eprintln!("{mode:?} trip {generation}: {:?}, {} pages", t.verdict, t.pages_moved);
        running = arrived;
        kept_elsewhere = Some(left);
    }
    running.guest.end(running.thread);
}

#[test]
fn precopy_trips_after_the_first_move_only_what_changed() {
    trips(Mode::Precopy);
}

#[test]
fn postcopy_trips_after_the_first_fault_in_only_what_changed() {
    trips(Mode::Postcopy);
}

#[test]
fn a_kept_image_written_since_the_guest_left_is_refused_and_the_trip_runs_in_full() {
    let running = first_host();
    let (running, kept, t) = trip(running, None, Mode::Precopy, 0, false);
    assert!(matches!(t.verdict, BaseVerdict::Refused(_)));
    std::thread::sleep(Duration::from_millis(30));
    let (running, _, t) = trip(running, Some(kept), Mode::Precopy, 1, true);
    assert!(
        matches!(&t.verdict, BaseVerdict::Refused(why) if why.contains("changed since the VM left")),
        "{:?}",
        t.verdict
    );
    assert!(t.pages_moved >= PAGES, "a refused base means a full trip: {} pages", t.pages_moved);
    running.guest.end(running.thread);
}
