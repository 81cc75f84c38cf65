//! A peer that goes silent (no FIN, no RST: a power loss, a cut cable) is a typed error within
//! the liveness timeout on both sides of a post-copy session, over tcp and the local transport:
//! mid-migration and mid-frame. No thread is left behind. Each scenario plays one side for real
//! and a hand-written peer for the other that follows the protocol up to a point, then stops
//! talking while keeping its connections open. (The rdma backend's control lane is TCP, the same
//! code; its lanes are exercised by scripts/rdma-softroce.sh.)

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::fault_handler::DestinationMemory;
use ferry::handoff;
use ferry::prepager::PolicyKind;
use ferry::transport::tcp::{self, TcpOptions, TcpPageServer};
use ferry::transport::wire::write_session;
use ferry::transport::{
    local, Backing, ControlStream, GuestMemory, MemoryLayout, PageSource, PreSharedKey, TransportError,
};
use ferry::{EngineConfig, FreePages, Liveness, MigrationError, PostcopyDestination};

const LIVENESS: Liveness = Liveness {
    interval: Duration::from_millis(50),
    timeout: Duration::from_millis(600),
    handoff_wait: Duration::from_millis(600),
};
/// Far past the liveness timeout: only a hang gets here.
const HANG: Duration = Duration::from_secs(60);

/// Silence is not recovered from here: no page server to take the control lane again from.
fn source_options() -> ferry::postcopy::SourceOptions<'static> {
    ferry::postcopy::SourceOptions { liveness: LIVENESS, ..Default::default() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::single(8 << 20).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Tcp,
    Local,
}

/// A page server for `layout()` and a connected session: (server guard, destination lanes,
/// destination control, source control).
struct Session {
    _server: Box<dyn std::any::Any>,
    lanes: PageSource,
    dest_control: Box<dyn ControlStream>,
    source_control: Box<dyn ControlStream>,
}

fn session(backend: Backend, key: &PreSharedKey) -> Session {
    let memory = Arc::new(GuestMemory::create(layout(), Backing::Memfd).unwrap());
    match backend {
        Backend::Tcp => {
            let server = TcpPageServer::start("127.0.0.1:0", memory, key.clone(), TcpOptions::default()).unwrap();
            let addr = server.local_addr();
            let k = key.clone();
            let dest = std::thread::spawn(move || {
                tcp::connect_session(addr, &k, Some(&layout()), &TcpOptions::default()).unwrap()
            });
            let source_control = server.accept_control(HANG).unwrap();
            let (lanes, control) = dest.join().unwrap();
            Session {
                _server: Box::new(server),
                lanes,
                dest_control: Box::new(control),
                source_control: Box::new(source_control),
            }
        }
        Backend::Local => {
            let path = std::env::temp_dir().join(format!("ferry-liveness-{}.sock", std::process::id()));
            let server = local::LocalPageServer::start(&path, memory, key.clone()).unwrap();
            let k = key.clone();
            let p = path.clone();
            let dest = std::thread::spawn(move || local::connect_session(&p, &k, Some(&layout()), 8).unwrap());
            let source_control = server.accept_control(HANG).unwrap();
            let (lanes, control) = dest.join().unwrap();
            Session {
                _server: Box::new(server),
                lanes,
                dest_control: Box::new(control),
                source_control: Box::new(source_control),
            }
        }
    }
}

/// Untouched guest memory registered with userfaultfd, as a destination holds it.
fn destination_memory() -> Arc<DestinationMemory> {
    Arc::new(DestinationMemory::register(GuestMemory::create(layout(), Backing::Anonymous).unwrap()).unwrap())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Runs `f` on a thread and waits for it, failing (not hanging) if it never returns.
fn within_hang_guard<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG).unwrap_or_else(|_| panic!("{what}: still blocked after {HANG:?}"))
}

fn assert_silent<T: std::fmt::Debug>(what: &str, result: Result<T, MigrationError>) {
    match result {
        Err(MigrationError::Transport(TransportError::Silent(why))) => eprintln!("{what}: silent: {why}"),
        other => panic!("{what}: expected a silent peer, got {other:?}"),
    }
}

/// The first `n` bytes of a session frame carrying `payload`.
fn partial_frame(payload: &[u8], n: usize) -> Vec<u8> {
    let mut frame = Vec::new();
    write_session(&mut frame, payload).unwrap();
    frame.truncate(n);
    frame
}

/// The destination resumes, then goes silent: the source's `run_source` fails with Silent.
fn silent_destination(backend: Backend) {
    let key = PreSharedKey::generate().unwrap();
    let s = session(backend, &key);
    let (mut dest_control, mut source_control) = (s.dest_control, s.source_control);
    let source = std::thread::spawn(move || {
        ferry::run_source(source_control.as_mut(), Instant::now(), b"state", &FreePages::new(2048), &source_options())
    });
    let (state, _) = handoff::receive_handoff(dest_control.as_mut(), layout().total_pages()).unwrap();
    assert_eq!(state, b"state");
    handoff::send_resumed(dest_control.as_mut()).unwrap();
    // Silent from here on: nothing sent, nothing read, the connection left open.
    let result = within_hang_guard("run_source", move || source.join().unwrap());
    assert_silent(&format!("{backend:?}: silent destination"), result);
    drop(dest_control);
}

/// The destination sends half a frame, then goes silent: the source fails with Silent.
fn destination_silent_mid_frame(backend: Backend) {
    let key = PreSharedKey::generate().unwrap();
    let s = session(backend, &key);
    let (mut dest_control, mut source_control) = (s.dest_control, s.source_control);
    let source = std::thread::spawn(move || {
        ferry::run_source(source_control.as_mut(), Instant::now(), b"state", &FreePages::new(2048), &source_options())
    });
    handoff::receive_handoff(dest_control.as_mut(), layout().total_pages()).unwrap();
    dest_control.write_all(&partial_frame(&[3], 7)).unwrap();
    let result = within_hang_guard("run_source", move || source.join().unwrap());
    assert_silent(&format!("{backend:?}: destination silent mid-frame"), result);
    drop(dest_control);
}

/// The source hands over, then goes silent (its page server still up): the destination's engine
/// stops and `wait` fails with Silent.
fn silent_source(backend: Backend) {
    let key = PreSharedKey::generate().unwrap();
    let s = session(backend, &key);
    let memory = destination_memory();
    let mut source_control = s.source_control;
    let fake_source = std::thread::spawn(move || {
        handoff::send_handoff(source_control.as_mut(), b"state", &FreePages::new(2048)).unwrap();
        handoff::expect_resumed(source_control.as_mut()).unwrap();
        // Silent from here on; the lane stays open until the destination is done with it.
        source_control
    });
    // Demand: with no guest touching memory, only the source's silence can end this session.
    // It rejoins the control lane (the page server is up) but hears nothing there either: after
    // the recovery window the silence stands.
    let config = EngineConfig {
        policy: PolicyKind::Demand,
        liveness: LIVENESS,
        recovery_window: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let dest = PostcopyDestination::start(s.dest_control, memory, s.lanes, &config, |_| Ok(())).unwrap();
    let source_control = fake_source.join().unwrap();
    let result = within_hang_guard("the destination's wait", move || dest.wait());
    assert_silent(&format!("{backend:?}: silent source"), result);
    drop(source_control);
}

/// A source that never begins its handoff: the destination's start fails with Silent after
/// `handoff_wait`.
fn source_that_never_hands_over(backend: Backend) {
    let key = PreSharedKey::generate().unwrap();
    let s = session(backend, &key);
    let memory = destination_memory();
    let config = EngineConfig { liveness: LIVENESS, ..EngineConfig::default() };
    let (dest_control, lanes) = (s.dest_control, s.lanes);
    let result = within_hang_guard("the destination's start", move || {
        PostcopyDestination::start(dest_control, memory, lanes, &config, |_| Ok(())).map(|_| ())
    });
    assert_silent(&format!("{backend:?}: source that never hands over"), result);
    drop(s.source_control);
}

/// The source sends half of its handoff's first frame, then goes silent: the destination's start
/// fails with Silent.
fn source_silent_mid_frame(backend: Backend) {
    let key = PreSharedKey::generate().unwrap();
    let s = session(backend, &key);
    let memory = destination_memory();
    let mut source_control = s.source_control;
    source_control.write_all(&partial_frame(&[1; 17], 9)).unwrap();
    let config = EngineConfig { liveness: LIVENESS, ..EngineConfig::default() };
    let (dest_control, lanes) = (s.dest_control, s.lanes);
    let result = within_hang_guard("the destination's start", move || {
        PostcopyDestination::start(dest_control, memory, lanes, &config, |_| Ok(())).map(|_| ())
    });
    assert_silent(&format!("{backend:?}: source silent mid-frame"), result);
    drop(source_control);
}

use std::io::Write;

#[test]
fn a_silent_peer_is_an_error_within_the_liveness_timeout_and_no_thread_is_left() {
    for backend in [Backend::Tcp, Backend::Local] {
        for (name, scenario) in [
            ("silent destination", silent_destination as fn(Backend)),
            ("destination silent mid-frame", destination_silent_mid_frame),
            ("silent source", silent_source),
            ("source silent mid-frame", source_silent_mid_frame),
            ("source that never hands over", source_that_never_hands_over),
        ] {
            let before = threads();
            scenario(backend);
            // Threads finish their last instructions after they report: give them a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            while threads() > before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(threads(), before, "{backend:?}: {name} left threads behind");
        }
    }
}
