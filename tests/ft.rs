//! A fault-tolerant pair in one process, over tcp loopback: a guest stand-in (a thread writing
//! random pages under a pause gate) runs at the primary; the backup gets its first copy by a
//! pre-copy that does not switch over (the guest never stops for longer than the final round),
//! then epochs every 10 ms. The primary dies (its channel and page server vanish mid-stream): the
//! backup ends, and its copy is byte for byte the guest as the last acknowledged epoch captured
//! it; an epoch cut off midway left nothing behind. A primary that stops cleanly tells the backup
//! so, and a backup lost is noticed by the primary.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry::checkpoint::{CheckpointCapture, CheckpointConfig, KeptImage};
use ferry::ft::{run_backup, FtConfig, Primary};
use ferry::precopy::{DirtyLog, PrecopyConfig};
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::{Backing, GuestMemory, MemoryLayout, PreSharedKey};
use ferry::{FreePages, Liveness};

const PAGES: u64 = 512;

/// The stand-in guest: writes under `paused`'s lock only while not paused, and keeps its own
/// dirty log.
#[derive(Default)]
struct Guest {
    paused: Mutex<bool>,
    resumed: Condvar,
    dirty: Mutex<Option<FreePages>>,
    writes: std::sync::atomic::AtomicU64,
}

impl Guest {
    fn write(&self, memory: &GuestMemory, page: u64, value: u8) {
        let mut paused = self.paused.lock().unwrap();
        while *paused {
            paused = self.resumed.wait(paused).unwrap();
        }
        memory.regions()[0].write(page * 4096, &[value; 4096]).unwrap();
        self.dirty.lock().unwrap().get_or_insert_with(|| FreePages::new(PAGES)).set(ferry::PageIndex(page));
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn pause(&self) {
        *self.paused.lock().unwrap() = true;
    }

    fn resume(&self) {
        *self.paused.lock().unwrap() = false;
        self.resumed.notify_all();
    }

    fn take_dirty(&self) -> FreePages {
        self.dirty.lock().unwrap().replace(FreePages::new(PAGES)).unwrap_or_else(|| FreePages::all(PAGES))
    }
}

fn snapshot(memory: &GuestMemory) -> Vec<u8> {
    let mut copy = vec![0u8; memory.layout().total_bytes() as usize];
    memory.regions()[0].read(0, &mut copy).unwrap();
    copy
}

/// The primary's capture: pauses the stand-in, remembers what memory held at each epoch.
struct Capture {
    guest: Arc<Guest>,
    memory: Arc<GuestMemory>,
    at_epoch: Arc<Mutex<HashMap<u64, Vec<u8>>>>,
    committed: Arc<Mutex<Vec<u64>>>,
}

impl CheckpointCapture for Capture {
    fn pause(&mut self, epoch: u64) -> Result<Vec<u8>, String> {
        self.guest.pause();
        self.at_epoch.lock().unwrap().insert(epoch, snapshot(&self.memory));
        Ok(epoch.to_le_bytes().to_vec())
    }
    fn dirty(&mut self) -> Result<FreePages, String> {
        Ok(self.guest.take_dirty())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.guest.resume();
        Ok(())
    }
    fn committed(&mut self, epoch: u64) {
        self.committed.lock().unwrap().push(epoch);
    }
}

struct Log(Arc<Guest>);

impl DirtyLog for Log {
    fn collect(&mut self) -> ferry::Result<FreePages> {
        Ok(self.0.take_dirty())
    }
}

const LIVENESS: Liveness = Liveness {
    interval: Duration::from_millis(50),
    timeout: Duration::from_millis(500),
    handoff_wait: Duration::from_secs(10),
};

#[test]
fn a_backup_holds_the_last_acknowledged_epoch_when_the_primary_dies() {
    let layout = MemoryLayout::single(PAGES * 4096).unwrap();
    let memory = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    let guest = Arc::new(Guest::default());
    let key = PreSharedKey::generate().unwrap();
    let server = TcpPageServer::start("127.0.0.1:0", memory.clone(), key.clone(), TcpOptions::default()).unwrap();
    let addr = server.local_addr();
    // The guest writes from the start, during the first copy too.
    let stop_guest = Arc::new(AtomicBool::new(false));
    let writer = {
        let (guest, memory, stop) = (guest.clone(), memory.clone(), stop_guest.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                guest.write(&memory, x % PAGES, (x >> 56) as u8 | 1);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    // The backup's side of the first copy: pull the rounds, keep the state, never resume.
    let backup_mem = Arc::new(GuestMemory::create(layout.clone(), Backing::Anonymous).unwrap());
    let backup = {
        let (key, layout, backup_mem) = (key.clone(), layout.clone(), backup_mem.clone());
        std::thread::spawn(move || {
            let (lanes, mut control) = tcp::connect_session(addr, &key, Some(&layout), &TcpOptions::default()).unwrap();
            let mut first_state = None;
            ferry::precopy::run_destination(&mut control, &backup_mem, lanes, |state| {
                first_state = Some(state.to_vec());
                Ok(())
            })
            .unwrap();
            let kept = KeptImage::new(backup_mem.clone());
            let end = run_backup(&control, &kept, LIVENESS, &AtomicBool::new(false)).unwrap();
            (first_state.expect("the first copy's state"), end, kept.last())
        })
    };
    let mut control = server.accept_control(Duration::from_secs(10)).unwrap();
    let at_epoch = Arc::new(Mutex::new(HashMap::new()));
    let started = Instant::now();
    ferry::precopy::run_source(
        &mut control,
        4096,
        &mut Log(guest.clone()),
        || {
            guest.pause();
            Ok(b"first".to_vec())
        },
        &PrecopyConfig::default(),
    )
    .unwrap();
    guest.resume();
    let first_copy_took = started.elapsed();
    let committed = Arc::new(Mutex::new(Vec::new()));
    let capture = Capture {
        guest: guest.clone(),
        memory: memory.clone(),
        at_epoch: at_epoch.clone(),
        committed: committed.clone(),
    };
    let config = FtConfig {
        liveness: LIVENESS,
        checkpoints: CheckpointConfig { period: Duration::from_millis(10), ack_timeout: Duration::from_secs(2) },
    };
    let primary = Primary::start(&control, memory.clone(), Box::new(capture), &config).unwrap();
    while committed.lock().unwrap().len() < 20 {
        assert!(primary.backup_lost().is_none(), "{:?}", primary.backup_lost());
        std::thread::sleep(Duration::from_millis(5));
    }
    // The primary dies: its channel goes mid-stream (an epoch may be half sent).
    control.shutdown(Shutdown::Both).unwrap();
    drop(server);
    let (first_state, end, last) = backup.join().unwrap();
    stop_guest.store(true, Ordering::Release);
    writer.join().unwrap();
    let _ = primary.stop();
    assert_eq!(first_state, b"first");
    assert!(end.epochs >= 19, "{end:?}");
    let (epoch, state) = last.expect("epochs were applied");
    assert_eq!(state, epoch.to_le_bytes(), "the state is the last applied epoch's");
    let expected = at_epoch.lock().unwrap().remove(&epoch).expect("a captured epoch");
    assert!(snapshot(&backup_mem) == expected, "the backup's copy is epoch {epoch} byte for byte");
    assert!(guest.writes.load(Ordering::Relaxed) > 0);
    eprintln!("first copy {first_copy_took:?}, then {} epochs; the backup ended: {}", end.epochs, end.why);
}

#[test]
fn a_primary_notices_a_lost_backup() {
    let layout = MemoryLayout::single(PAGES * 4096).unwrap();
    let memory = Arc::new(GuestMemory::create(layout, Backing::Anonymous).unwrap());
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let guest = Arc::new(Guest::default());
    let committed = Arc::new(Mutex::new(Vec::new()));
    let capture = Capture {
        guest: guest.clone(),
        memory: memory.clone(),
        at_epoch: Arc::new(Mutex::new(HashMap::new())),
        committed: committed.clone(),
    };
    let config = FtConfig {
        liveness: LIVENESS,
        checkpoints: CheckpointConfig { period: Duration::from_millis(10), ..Default::default() },
    };
    let primary = Primary::start(&a, memory.clone(), Box::new(capture), &config).unwrap();
    // A backup that says nothing at all: silent past the liveness timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.backup_lost().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let why = primary.backup_lost().expect("the silent backup was noticed");
    assert!(why.contains("silent"), "{why}");
    let (stats, capture) = primary.stop();
    assert!(capture.is_some());
    assert_eq!(stats.committed, 0, "nothing was acknowledged: {stats:?}");
    assert!(committed.lock().unwrap().is_empty());
    drop(b);
}
