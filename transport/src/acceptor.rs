//! The accept loop the TCP-based page servers (`tcp`, `rdma`) share: a thread per connection, a
//! handle to close each one, a clean stop, and the hand-over of a session's control lane to its
//! owner. Connections not yet authenticated are bounded: past [`MAX_UNAUTHENTICATED`] the oldest
//! is closed to make room, so peers without the key that open connections and trickle bytes can
//! neither exhaust the server's threads and descriptors nor lock the rightful destination out. A
//! failing accept (out of descriptors) backs off instead of spinning.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Result;

/// How a connection's server function finished with it.
pub(crate) enum Served<C> {
    /// Done: the acceptor closes the connection.
    Closed,
    /// A control lane: handed to the session owner through [`Acceptor::accept_control`].
    Control(C),
}

type Connections = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// Most connections waiting to authenticate at once.
pub(crate) const MAX_UNAUTHENTICATED: usize = 64;

/// Connections accepted and not yet authenticated, oldest first, each with its number.
type Unauthenticated = Arc<Mutex<std::collections::VecDeque<(u64, TcpStream)>>>;

pub(crate) struct Acceptor<C> {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Connections,
    thread: Option<JoinHandle<()>>,
    control_rx: Mutex<std::sync::mpsc::Receiver<C>>,
}

impl<C: crate::lane::ControlStream + 'static> Acceptor<C> {
    /// Listens on `addr` and serves each connection with `serve` on a thread of its own, named
    /// `{name}-serve`.
    /// `serve` calls its second argument once the peer authenticated.
    pub(crate) fn start(
        addr: impl ToSocketAddrs,
        name: &str,
        serve: impl Fn(&TcpStream, &dyn Fn()) -> Served<C> + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Connections = Arc::new(Mutex::new(Vec::new()));
        // A few control lanes may wait for their owner; more are refused (closed).
        let (control_tx, control_rx) = std::sync::mpsc::sync_channel(4);
        let (stop2, conns2, serve) = (stop.clone(), connections.clone(), Arc::new(serve));
        let serve_name = format!("{name}-serve");
        let unauthenticated: Unauthenticated = Arc::default();
        let thread = std::thread::Builder::new().name(format!("{name}-accept")).spawn(move || {
            let mut next = 0u64;
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let stream = match stream {
                    Ok(s) => s,
                    // Out of descriptors or memory: give the connections being served time to end
                    // instead of spinning on the same failure.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let (Ok(handle), Ok(waiting)) = (stream.try_clone(), stream.try_clone()) else { continue };
                next += 1;
                let id = next;
                {
                    let mut queue = unauthenticated.lock().expect("queue poisoned");
                    while queue.len() >= MAX_UNAUTHENTICATED {
                        // The oldest has had the longest to authenticate.
                        if let Some((_, oldest)) = queue.pop_front() {
                            let _ = oldest.shutdown(Shutdown::Both);
                        }
                    }
                    queue.push_back((id, waiting));
                }
                let (serve, control_tx, queue) = (serve.clone(), control_tx.clone(), unauthenticated.clone());
                let spawned = std::thread::Builder::new().name(serve_name.clone()).spawn(move || {
                    let authenticated = || queue.lock().expect("queue poisoned").retain(|(i, _)| *i != id);
                    let served = serve(&stream, &authenticated);
                    // Authenticated or not, it no longer waits.
                    authenticated();
                    if let Served::Control(owned) = served {
                        if control_tx.try_send(owned).is_ok() {
                            return;
                        }
                    }
                    // The accept loop holds a duplicate of this socket: close it explicitly.
                    let _ = stream.shutdown(Shutdown::Both);
                });
                let mut conns = conns2.lock().expect("connection list poisoned");
                conns.retain(|(_, t)| !t.is_finished());
                if let Ok(t) = spawned {
                    conns.push((handle, t));
                }
            }
        })?;
        Ok(Acceptor { addr, stop, connections, thread: Some(thread), control_rx: Mutex::new(control_rx) })
    }

    /// Waits up to `timeout` for a destination to open the session's control lane.
    pub(crate) fn accept_control(&self, timeout: Duration) -> Result<C> {
        crate::lane::receive_control(&self.control_rx, timeout)
    }
}

impl<C> Acceptor<C> {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and joins its thread; keeps accepting.
    pub(crate) fn drop_connections(&self) {
        let conns = std::mem::take(&mut *self.connections.lock().expect("connection list poisoned"));
        for (stream, thread) in conns {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }

    /// Closes the connections still being served (data lanes, handshakes), not the control lanes
    /// handed to their owner (their threads have ended); keeps accepting.
    pub(crate) fn drop_served_connections(&self) {
        let mut conns = self.connections.lock().expect("connection list poisoned");
        let (live, ended): (Vec<_>, Vec<_>) =
            std::mem::take(&mut *conns).into_iter().partition(|(_, t)| !t.is_finished());
        *conns = ended;
        drop(conns);
        for (stream, thread) in live {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }

    /// Stops accepting, closes every connection and joins every thread. Idempotent.
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); failure means the listener is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = thread.join();
        self.drop_connections();
    }
}

impl<C> Drop for Acceptor<C> {
    fn drop(&mut self) {
        self.stop();
    }
}
