//! The `rdma` backend (cargo feature `rdma`): post-copy reads as one-sided RDMA READs, so the
//! source's CPU does no work per page.
//!
//! The source registers each guest memory region `REMOTE_READ` (never remotely writable) and
//! serves an authenticated TCP endpoint: a destination's control lane is handed to the session
//! owner as with [`crate::tcp`]; its setup connection exchanges queue pair endpoints (LID, GID,
//! QPN, PSN, MTU) for two reliable-connected queue pairs and receives {address, length, rkey} of
//! every region. The setup connection stays open while the destination reads; when it closes the
//! source destroys that destination's queue pairs.
//!
//! At the destination the urgent queue pair serves faults one read at a time, polled busily for a
//! short while and then through its completion channel; the bulk queue pair keeps many READs in
//! flight and signals only every few (RC completes in order, so one completion retires all the
//! reads before it). Reads land in registered memory: a lane's own buffers ([`UrgentLane::buffer`],
//! [`BulkLane::buffer`]), a registered alias mapping of guest memory
//! ([`UrgentLane::register_landing`]) so memfd and hugetlbfs pages go straight into the page
//! cache for `UFFDIO_CONTINUE`, or else a registered staging buffer and one copy. A failed work
//! completion or a read that outlives the lane's timeout fails the lane with a typed error; the
//! queue pair is moved to the error state first, so the device writes nothing after the call.
//!
//! Bindings: rdma-sys (bindgen over the system's verbs.h, linked to the system's libibverbs), not
//! the `ibverbs` crate: `ibverbs` builds its own copy of rdma-core with cmake and exposes no RDMA
//! READ, while rdma-sys is a thin -sys crate that reimplements verbs.h's inline `ibv_post_send`,
//! `ibv_poll_cq` and `ibv_req_notify_cq` through the provider's ops table. Building it needs
//! libibverbs-dev, librdmacm-dev and libclang (`scripts/setup.sh --rdma`). All raw verbs calls
//! live in `verbs`.

mod verbs;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub use verbs::{device_names, Endpoint, PortInfo};
use verbs::{Access, CompletionQueue, Context, Local, MemoryRegion, PathConfig, ProtectionDomain, QueuePair};

use crate::acceptor::{Acceptor, Served};
use crate::auth::PreSharedKey;
use crate::error::{Result, TransportError};
use crate::handshake::server_handshake;
use crate::lane::{run_dst, BulkDone, BulkLane, BulkRead, BulkTarget, PageBuf, PageSource, UrgentLane};
use crate::layout::{MemoryLayout, PageRun};
use crate::memory::GuestMemory;
use crate::pagebits::PageBits;
use crate::wire::{read_session, write_session, Lane, SessionId, ZeroMask};

/// Tunables of both sides.
#[derive(Clone, Debug)]
pub struct RdmaOptions {
    /// Device name (`mlx5_0`, `rxe0`); the first device when `None`.
    pub device: Option<String>,
    /// Port number on the device (1 on most devices).
    pub port: u8,
    /// GID table index; when `None`, a RoCE v2 IPv4-mapped GID on Ethernet ports, else index 0.
    pub gid_index: Option<u8>,
    /// Bounds the handshake and every read: a read not completed by then fails the lane.
    pub io_timeout: Duration,
    /// Bulk reads in flight.
    pub bulk_depth: usize,
    /// Signal one bulk read in this many (and always the read that fills the lane).
    pub signal_every: usize,
    /// How long the urgent lane spins on its completion queue before sleeping on the channel.
    pub urgent_spin: Duration,
    /// RC transport ACK timeout exponent (4.096 us * 2^n) and retry count: how long a read to a
    /// vanished peer takes to fail.
    pub ack_timeout: u8,
    /// How many times the RC transport retries before failing a read.
    pub retry_count: u8,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            device: None,
            port: 1,
            gid_index: None,
            io_timeout: Duration::from_secs(10),
            bulk_depth: 32,
            signal_every: 8,
            urgent_spin: Duration::from_micros(200),
            ack_timeout: 14,
            retry_count: 7,
        }
    }
}

impl RdmaOptions {
    fn path(&self, gid_index: u8) -> PathConfig {
        PathConfig { gid_index, ack_timeout: self.ack_timeout, retry_count: self.retry_count }
    }
}

/// A region as the destination reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// The region's address in the source's address space (what the destination reads from).
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The remote key that lets the destination read it.
    pub rkey: u32,
}

/// The destination's half of the setup exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupRequest {
    /// The queue pair urgent reads go on.
    pub urgent: Endpoint,
    /// The queue pair bulk reads go on.
    pub bulk: Endpoint,
}

/// The source's answer: its queue pairs and where every region is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupReply {
    /// The source's urgent queue pair.
    pub urgent: Endpoint,
    /// The source's bulk queue pair.
    pub bulk: Endpoint,
    /// Every region of the guest, in layout order.
    pub regions: Vec<RemoteRegion>,
}

const SETUP_REQUEST_TAG: u8 = 1;
const SETUP_REPLY_TAG: u8 = 2;
const ENDPOINT_LEN: usize = 2 + 4 + 4 + 16 + 1 + 1;
const REGION_LEN: usize = 8 + 8 + 4;

fn encode_endpoint(e: &Endpoint, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.lid.to_le_bytes());
    out.extend_from_slice(&e.qpn.to_le_bytes());
    out.extend_from_slice(&e.psn.to_le_bytes());
    out.extend_from_slice(&e.gid);
    out.push(e.mtu);
    out.push(e.max_reads);
}

fn decode_endpoint(b: &[u8]) -> Result<Endpoint> {
    let bad = |why: String| Err(TransportError::malformed("rdma endpoint", why));
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let e = Endpoint {
        lid: u16::from_le_bytes([b[0], b[1]]),
        qpn: u32_at(2),
        psn: u32_at(6),
        gid: b[10..26].try_into().expect("16 bytes"),
        mtu: b[26],
        max_reads: b[27],
    };
    if e.qpn == 0 || e.qpn > 0x00ff_ffff {
        return bad(format!("queue pair number {:#x} is not a 24-bit non-zero value", e.qpn));
    }
    if e.psn > 0x00ff_ffff {
        return bad(format!("packet sequence number {:#x} exceeds 24 bits", e.psn));
    }
    if e.max_reads == 0 {
        return bad("a responder depth of 0 reads".into());
    }
    if !(1..=5).contains(&e.mtu) {
        return bad(format!("MTU code {} is not 1 (256 B) to 5 (4 KiB)", e.mtu));
    }
    Ok(e)
}

impl SetupRequest {
    /// The message as the control lane carries it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SETUP_REQUEST_TAG];
        encode_endpoint(&self.urgent, &mut out);
        encode_endpoint(&self.bulk, &mut out);
        out
    }

    /// Decodes a request, checking every field.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 1 + 2 * ENDPOINT_LEN || b[0] != SETUP_REQUEST_TAG {
            return Err(TransportError::malformed("rdma setup request", format!("{} bytes", b.len())));
        }
        Ok(SetupRequest {
            urgent: decode_endpoint(&b[1..1 + ENDPOINT_LEN])?,
            bulk: decode_endpoint(&b[1 + ENDPOINT_LEN..])?,
        })
    }
}

impl SetupReply {
    /// The message as the control lane carries it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SETUP_REPLY_TAG];
        encode_endpoint(&self.urgent, &mut out);
        encode_endpoint(&self.bulk, &mut out);
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            out.extend_from_slice(&r.addr.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&r.rkey.to_le_bytes());
        }
        out
    }

    /// Decodes a reply and checks it against the session's layout: one region per layout
    /// region, each at least as long as the guest's, none wrapping the address space.
    pub fn decode(b: &[u8], layout: &MemoryLayout) -> Result<Self> {
        let bad = |why: String| Err(TransportError::malformed("rdma setup reply", why));
        let fixed = 1 + 2 * ENDPOINT_LEN + 4;
        if b.len() < fixed || b[0] != SETUP_REPLY_TAG {
            return bad(format!("{} bytes, or not a setup reply", b.len()));
        }
        let n = u32::from_le_bytes(b[fixed - 4..fixed].try_into().expect("4 bytes")) as usize;
        if n != layout.regions().len() {
            return bad(format!("{n} regions for a layout of {}", layout.regions().len()));
        }
        if b.len() != fixed + n * REGION_LEN {
            return bad(format!("{} bytes for {n} regions", b.len()));
        }
        let mut regions = Vec::with_capacity(n);
        for (i, (chunk, ours)) in b[fixed..].chunks_exact(REGION_LEN).zip(layout.regions()).enumerate() {
            let r = RemoteRegion {
                addr: u64::from_le_bytes(chunk[0..8].try_into().expect("8 bytes")),
                len: u64::from_le_bytes(chunk[8..16].try_into().expect("8 bytes")),
                rkey: u32::from_le_bytes(chunk[16..20].try_into().expect("4 bytes")),
            };
            if r.len < ours.size || r.addr.checked_add(r.len).is_none() {
                return bad(format!(
                    "region {i}: {} bytes at {:#x} for a region of {} bytes",
                    r.len, r.addr, ours.size
                ));
            }
            regions.push(r);
        }
        Ok(SetupReply {
            urgent: decode_endpoint(&b[1..1 + ENDPOINT_LEN])?,
            bulk: decode_endpoint(&b[1 + ENDPOINT_LEN..1 + 2 * ENDPOINT_LEN])?,
            regions,
        })
    }
}

/// What a benchmark reports about the device it ran on.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// The port the benchmark used.
    pub port: PortInfo,
    /// A software device (soft-RoCE's rxe, soft-iWARP's siw): its figures measure CPU, not a NIC.
    pub software: bool,
}

/// Opens `name` (or the first device) and describes its port.
pub fn device_info(name: Option<&str>, port: u8) -> Result<DeviceInfo> {
    let ctx = Context::open(name, port)?;
    let name = ctx.name().to_owned();
    let parent = std::fs::read_to_string(format!("/sys/class/infiniband/{name}/parent")).is_ok();
    let software = name.starts_with("rxe") || name.starts_with("siw") || parent;
    Ok(DeviceInfo { port: ctx.port_info(), software, name })
}

fn random_psn() -> Result<u32> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| TransportError::Io(std::io::Error::other(e.to_string())))?;
    Ok(u32::from_le_bytes(b) & 0x00ff_ffff)
}

/// The GID to address queue pairs with: the one asked for, else on Ethernet (RoCE) the first
/// RoCE v2 GID holding an IPv4 address (routable, what rxe and ConnectX use over IP), else any
/// RoCE v2 GID, else index 0 (InfiniBand, where the LID routes and the GID is only carried).
fn choose_gid(ctx: &Context, want: Option<u8>) -> Result<(u8, [u8; 16])> {
    if let Some(i) = want {
        return Ok((i, ctx.gid(u32::from(i))?));
    }
    let info = ctx.port_info();
    if !info.ethernet {
        return Ok((0, ctx.gid(0).unwrap_or([0; 16])));
    }
    let gid_type = |i: u32| {
        std::fs::read_to_string(format!(
            "/sys/class/infiniband/{}/ports/{}/gid_attrs/types/{i}",
            ctx.name(),
            ctx.port()
        ))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
    };
    let mut fallback = None;
    for i in 0..info.gid_table_len.min(32) {
        let Ok(gid) = ctx.gid(i) else { continue };
        if gid == [0; 16] {
            continue;
        }
        let v2 = gid_type(i).eq_ignore_ascii_case("RoCE v2");
        let ipv4_mapped = gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff];
        if v2 && ipv4_mapped {
            return Ok((i as u8, gid));
        }
        if v2 && fallback.is_none() {
            fallback = Some((i as u8, gid));
        }
        if fallback.is_none() {
            fallback = Some((i as u8, gid));
        }
    }
    fallback.ok_or_else(|| TransportError::Rdma {
        op: "choose gid",
        detail: format!("{} port {} has no usable GID (is the link up and addressed?)", ctx.name(), ctx.port()),
    })
}

/// One side's device, domain and chosen GID.
struct Device {
    pd: Arc<ProtectionDomain>,
    gid_index: u8,
    gid: [u8; 16],
}

impl Device {
    fn open(options: &RdmaOptions) -> Result<Self> {
        let ctx = Context::open(options.device.as_deref(), options.port)?;
        if !ctx.port_info().active {
            return Err(TransportError::Rdma {
                op: "open device",
                detail: format!("{} port {} is not active", ctx.name(), ctx.port()),
            });
        }
        let (gid_index, gid) = choose_gid(&ctx, options.gid_index)?;
        Ok(Device { pd: ProtectionDomain::new(&ctx)?, gid_index, gid })
    }

    fn endpoint(&self, qp: &QueuePair, psn: u32) -> Endpoint {
        let info = self.pd.context().port_info();
        let max_reads = self.pd.context().max_responder_reads();
        Endpoint { lid: info.lid, qpn: qp.qpn(), psn, gid: self.gid, mtu: info.active_mtu, max_reads }
    }
}

/// Counters a source's RDMA server keeps. Reads themselves never reach the source's CPU, so the
/// destination counts pages read ([`ReadLedger`]).
#[derive(Debug, Default)]
pub struct RdmaServerStats {
    /// Destinations whose queue pairs were set up.
    pub destinations: AtomicU64,
    /// Connections refused in the handshake.
    pub failed_handshakes: AtomicU64,
    /// Setups that failed after the handshake.
    pub failed_setups: AtomicU64,
}

struct ServerShared {
    key: PreSharedKey,
    session: SessionId,
    layout: MemoryLayout,
    options: RdmaOptions,
    device: Device,
    regions: Vec<MemoryRegion>,
    stats: RdmaServerStats,
    /// The registered memory must outlive the registrations (dropped after `regions`).
    _memory: Arc<GuestMemory>,
}

/// Exposes a paused guest's memory for one-sided RDMA READs by authenticated destinations.
pub struct RdmaPageServer {
    acceptor: Acceptor<TcpStream>,
    shared: Arc<ServerShared>,
}

impl std::fmt::Debug for RdmaPageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPageServer")
            .field("addr", &self.acceptor.local_addr())
            .field("session", &self.shared.session)
            .finish()
    }
}

impl RdmaPageServer {
    /// Registers every region of `memory` for remote reads and listens on `addr` for
    /// destinations. Memfd and hugetlbfs regions are registered read-only; private anonymous
    /// regions also for local write, because a read-only long-term pin of an untouched anonymous
    /// page may pin the shared zero page, which the guest's next write would leave behind (this
    /// also allocates the whole region). No region is ever remotely writable.
    pub fn start(
        addr: impl ToSocketAddrs,
        memory: Arc<GuestMemory>,
        key: PreSharedKey,
        options: RdmaOptions,
    ) -> Result<Self> {
        let device = Device::open(&options)?;
        let mut regions = Vec::with_capacity(memory.regions().len());
        for r in memory.regions() {
            let access = Access::RemoteRead { local_write: r.fd().is_none() };
            // SAFETY: the mapping belongs to `memory`, which ServerShared holds (and drops after
            // the registrations), so it stays mapped for the registration's life.
            regions.push(unsafe { MemoryRegion::register(&device.pd, r.host_addr().as_ptr(), r.len(), access)? });
        }
        let shared = Arc::new(ServerShared {
            key,
            session: SessionId::random()?,
            layout: memory.layout().clone(),
            options,
            device,
            regions,
            stats: RdmaServerStats::default(),
            _memory: memory,
        });
        let conn_shared = shared.clone();
        let acceptor = Acceptor::start(addr, "ferry-rdma", move |stream, authenticated| {
            serve_connection(stream, &conn_shared, authenticated).unwrap_or_else(|e| {
                let counter = match e {
                    TransportError::AuthFailed(_) | TransportError::Refused { .. } => {
                        &conn_shared.stats.failed_handshakes
                    }
                    _ => &conn_shared.stats.failed_setups,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Served::Closed
            })
        })?;
        Ok(RdmaPageServer { acceptor, shared })
    }

    /// Waits up to `timeout` for a destination to open the session's control lane.
    pub fn accept_control(&self, timeout: Duration) -> Result<TcpStream> {
        self.acceptor.accept_control(timeout)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    /// The session the server serves.
    pub fn session(&self) -> SessionId {
        self.shared.session
    }

    /// What the server counted.
    pub fn stats(&self) -> &RdmaServerStats {
        &self.shared.stats
    }

    /// The device the server registered memory on.
    pub fn device_name(&self) -> &str {
        self.shared.device.pd.context().name()
    }

    /// Closes every setup connection, which destroys the destinations' queue pairs: their
    /// reads fail from then on, and they may [`resume`].
    pub fn drop_connections(&self) {
        self.acceptor.drop_connections();
    }
}

/// Serves one connection: a control lane goes to the session owner; a setup connection gets
/// its queue pairs, which live until it closes.
fn serve_connection(stream: &TcpStream, shared: &ServerShared, authenticated: &dyn Fn()) -> Result<Served<TcpStream>> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(shared.options.io_timeout))?;
    stream.set_write_timeout(Some(shared.options.io_timeout))?;
    let lane = server_handshake(
        &mut crate::handshake::Deadline::new(stream, shared.options.io_timeout),
        &shared.key,
        shared.session,
        &shared.layout,
    )?;
    authenticated();
    if lane == Lane::Control {
        return Ok(Served::Control(stream.try_clone()?));
    }
    let request = SetupRequest::decode(&read_session(&mut &*stream)?)?;
    let device = &shared.device;
    // The source only answers reads: its completion queue never sees a completion.
    let cq = CompletionQueue::new(device.pd.context(), 2)?;
    let urgent = QueuePair::new_rc(&device.pd, &cq, 1)?;
    let bulk = QueuePair::new_rc(&device.pd, &cq, 1)?;
    let path = shared.options.path(device.gid_index);
    let (urgent_psn, bulk_psn) = (random_psn()?, random_psn()?);
    urgent.connect(&request.urgent, urgent_psn, &path, true)?;
    bulk.connect(&request.bulk, bulk_psn, &path, true)?;
    let reply = SetupReply {
        urgent: device.endpoint(&urgent, urgent_psn),
        bulk: device.endpoint(&bulk, bulk_psn),
        regions: shared
            .regions
            .iter()
            .map(|mr| RemoteRegion { addr: mr.addr() as u64, len: mr.len() as u64, rkey: mr.rkey() })
            .collect(),
    };
    write_session(&mut &*stream, &reply.encode())?;
    shared.stats.destinations.fetch_add(1, Ordering::Relaxed);
    // The queue pairs live while the destination holds this connection open.
    stream.set_read_timeout(None)?;
    let mut byte = [0u8; 1];
    while std::io::Read::read(&mut &*stream, &mut byte)? != 0 {}
    drop((urgent, bulk));
    Ok(Served::Closed)
}

/// Pages the destination read, counted as they are posted: a page read twice is a page sent
/// twice, which post-copy must never do.
#[derive(Debug)]
pub struct ReadLedger {
    read: PageBits,
    /// Pages read, counting each page once.
    pub pages_read: AtomicU64,
    /// Pages read again after they were read once (a reconnect re-asks; a healthy run reads none twice).
    pub pages_read_twice: AtomicU64,
}

impl ReadLedger {
    fn new(layout: &MemoryLayout) -> Self {
        ReadLedger { read: PageBits::new(layout), pages_read: AtomicU64::new(0), pages_read_twice: AtomicU64::new(0) }
    }

    fn record(&self, run: PageRun) {
        let again = self.read.set_run(run);
        self.pages_read.fetch_add(u64::from(run.pages), Ordering::Relaxed);
        self.pages_read_twice.fetch_add(again, Ordering::Relaxed);
    }
}

/// A destination's connection to an RDMA source: the lanes, the control lane and the ledger.
pub struct RdmaSession {
    /// The urgent and bulk lanes.
    pub source: PageSource,
    /// The session's control lane (plain tcp: RDMA carries pages only).
    pub control: TcpStream,
    /// What was read, page by page.
    pub ledger: Arc<ReadLedger>,
}

impl std::fmt::Debug for RdmaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSession").field("source", &self.source).finish()
    }
}

/// Opens a new session's queue pairs, lets `prepare` register landing zones on them (slow: it
/// pins memory), then opens the control lane: what a post-copy destination holds for the whole
/// migration. The control lane comes last because a source pauses its guest when it opens, and
/// nothing slow should happen after that.
pub fn connect_session(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    options: &RdmaOptions,
    prepare: impl FnOnce(&mut PageSource) -> Result<()>,
) -> Result<RdmaSession> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let (mut source, ledger) = open_lanes(&addrs, key, SessionId::NEW, expected_layout, options, None)?;
    prepare(&mut source)?;
    let (control, _) = crate::tcp::open_plain_lane(
        &addrs,
        key,
        Lane::Control,
        source.session,
        Some(&source.layout),
        options.io_timeout,
    )?;
    control.set_read_timeout(None)?;
    Ok(RdmaSession { source, control, ledger })
}

/// Opens lanes of a new session (no control lane): for benchmarks and plain reads.
pub fn connect(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    expected_layout: Option<&MemoryLayout>,
    options: &RdmaOptions,
) -> Result<(PageSource, Arc<ReadLedger>)> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    open_lanes(&addrs, key, SessionId::NEW, expected_layout, options, None)
}

/// Reopens a session's queue pairs after its setup connection broke: reads that failed are simply
/// asked again (they are idempotent). Landing zones must be registered on the new lanes again.
pub fn resume(
    addr: impl ToSocketAddrs,
    key: &PreSharedKey,
    session: SessionId,
    layout: &MemoryLayout,
    options: &RdmaOptions,
) -> Result<(PageSource, Arc<ReadLedger>)> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    open_lanes(&addrs, key, session, Some(layout), options, None)
}

/// What lanes opened again carry over from the session's first: its ledger, and the landing
/// zones registered on it (registered again on the new lanes' domain).
#[derive(Clone, Debug)]
struct Carried {
    ledger: Arc<ReadLedger>,
    landings: Arc<Mutex<Vec<(usize, usize)>>>,
}

/// What reopens an rdma session's lanes after its queue pairs failed (the source dropped them,
/// or the setup connection broke): a new setup connection and queue pairs under the same
/// session, the landing zones registered again. Reopening one lane opens a pair and keeps the
/// lane asked for (its setup connection goes with it).
#[derive(Debug)]
struct RdmaLanes {
    addrs: Vec<SocketAddr>,
    key: PreSharedKey,
    session: SessionId,
    layout: MemoryLayout,
    options: RdmaOptions,
    carried: Carried,
}

impl RdmaLanes {
    fn open(&self) -> Result<PageSource> {
        open_lanes(&self.addrs, &self.key, self.session, Some(&self.layout), &self.options, Some(&self.carried))
            .map(|(source, _)| source)
    }
}

impl crate::lane::Reconnect for RdmaLanes {
    fn control(&self) -> Result<Box<dyn crate::lane::ControlStream>> {
        crate::tcp::reopen_control(
            &self.addrs,
            &self.key,
            self.session,
            &self.layout,
            self.options.io_timeout,
            crate::tls::Encryption::Off,
        )
    }

    fn urgent(&self) -> Result<Box<dyn UrgentLane>> {
        Ok(self.open()?.urgent)
    }

    fn bulk(&self) -> Result<Box<dyn BulkLane>> {
        Ok(self.open()?.bulk)
    }
}

fn open_lanes(
    addrs: &[SocketAddr],
    key: &PreSharedKey,
    session: SessionId,
    expected_layout: Option<&MemoryLayout>,
    options: &RdmaOptions,
    carried: Option<&Carried>,
) -> Result<(PageSource, Arc<ReadLedger>)> {
    let (mut setup, cs) =
        crate::tcp::open_plain_lane(addrs, key, Lane::Bulk, session, expected_layout, options.io_timeout)?;
    let device = Device::open(options)?;
    let depth = options.bulk_depth.clamp(1, 1024);
    let ctx = device.pd.context().clone();
    let urgent_cq = CompletionQueue::new(&ctx, 4)?;
    // Each marker follows at least one read, so at most `depth` of them are outstanding.
    let bulk_cq = CompletionQueue::new(&ctx, 2 * depth as u32 + 4)?;
    let urgent_qp = QueuePair::new_rc(&device.pd, &urgent_cq, 2)?;
    let bulk_qp = QueuePair::new_rc(&device.pd, &bulk_cq, 2 * depth as u32 + 2)?;
    let (urgent_psn, bulk_psn) = (random_psn()?, random_psn()?);
    let request =
        SetupRequest { urgent: device.endpoint(&urgent_qp, urgent_psn), bulk: device.endpoint(&bulk_qp, bulk_psn) };
    write_session(&mut setup, &request.encode())?;
    let reply = SetupReply::decode(&read_session(&mut setup)?, &cs.layout)?;
    let path = options.path(device.gid_index);
    urgent_qp.connect(&reply.urgent, urgent_psn, &path, false)?;
    bulk_qp.connect(&reply.bulk, bulk_psn, &path, false)?;
    setup.set_read_timeout(None)?;
    // Both lanes keep it: the source's queue pairs live while it is open.
    let setup = Arc::new(setup);

    let max_run = cs.layout.max_run_pages() as usize * cs.layout.page_size() as usize;
    let max_msg = ctx.port_info().max_msg_size as usize;
    if max_run > max_msg {
        return Err(TransportError::Rdma {
            op: "open lanes",
            detail: format!("{} takes messages of at most {max_msg} bytes; a run may be {max_run}", ctx.name()),
        });
    }
    let carried = match carried {
        Some(c) => c.clone(),
        None => Carried { ledger: Arc::new(ReadLedger::new(&cs.layout)), landings: Arc::new(Mutex::new(Vec::new())) },
    };
    let registry = Arc::new(Registry {
        pd: device.pd.clone(),
        landings: Mutex::new(Vec::new()),
        ranges: carried.landings.clone(),
    });
    let again: Vec<(usize, usize)> = carried.landings.lock().expect("landing list poisoned").clone();
    for (ptr, len) in again {
        let ptr = NonNull::new(ptr as *mut u8).expect("a registered landing is not null");
        // SAFETY: these lanes replace lanes of the same session on which the range was
        // registered, and are used (and dropped) where those were: the engine's threads, which
        // drop their lanes before the memory the range belongs to.
        unsafe { registry.register_landing(ptr, len)? };
    }
    let ledger = carried.ledger.clone();
    let remote = Remote { regions: reply.regions, layout: cs.layout.clone(), ledger: ledger.clone() };
    let urgent = RdmaUrgent {
        qp: urgent_qp,
        _setup: setup.clone(),
        cq: urgent_cq,
        bounce: registry.buffer(max_run)?,
        handed_out: Vec::new(),
        registry: registry.clone(),
        remote: remote.clone(),
        timeout: options.io_timeout,
        spin: options.urgent_spin,
        broken: None,
        next_wr: 0,
        wcs: Vec::with_capacity(16),
    };
    let marker = registry.buffer(8)?;
    let bulk = RdmaBulk {
        qp: bulk_qp,
        cq: bulk_cq,
        posted: VecDeque::new(),
        done: VecDeque::new(),
        staging: Vec::new(),
        marker,
        registry,
        remote,
        depth,
        signal_every: options.signal_every.max(1),
        timeout: options.io_timeout,
        broken: None,
        next_wr: 0,
        wcs: Vec::with_capacity(16),
        _setup: setup.clone(),
    };
    let lanes = RdmaLanes {
        addrs: addrs.to_vec(),
        key: key.clone(),
        session: cs.session,
        layout: cs.layout.clone(),
        options: options.clone(),
        carried,
    };
    let source = PageSource {
        session: cs.session,
        layout: cs.layout,
        urgent: Box::new(urgent),
        bulk: Box::new(bulk),
        reconnect: Some(Arc::new(lanes)),
    };
    Ok((source, ledger))
}

/// The registration a lane attaches to the buffers it hands out.
struct Registered(Arc<MemoryRegion>);

/// What both lanes of one destination register: their domain and the landing zones.
struct Registry {
    pd: Arc<ProtectionDomain>,
    landings: Mutex<Vec<Arc<MemoryRegion>>>,
    /// The landing ranges, for lanes opened again (shared with [`Carried`]).
    ranges: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl Registry {
    /// A registered buffer whose registration lives and dies with it.
    fn buffer(&self, len: usize) -> Result<PageBuf> {
        let mut buf = PageBuf::new(len);
        let ptr = buf.as_mut_ptr();
        // SAFETY: the registration is attached to the buffer, which drops it before freeing the
        // memory, so the range stays mapped for the registration's life.
        let mr = unsafe { MemoryRegion::register(&self.pd, ptr, buf.len(), Access::LocalWrite)? };
        Ok(buf.with_registration(Box::new(Registered(Arc::new(mr)))))
    }

    /// # Safety
    /// As [`UrgentLane::register_landing`].
    unsafe fn register_landing(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let mut landings = self.landings.lock().expect("landing list poisoned");
        if landings.iter().any(|mr| mr.covers(ptr.as_ptr(), len)) {
            return Ok(());
        }
        // SAFETY: the caller keeps the range mapped until the lanes, which hold this registry,
        // are dropped.
        let mr = unsafe { MemoryRegion::register(&self.pd, ptr.as_ptr(), len, Access::LocalWrite)? };
        landings.push(Arc::new(mr));
        let mut ranges = self.ranges.lock().expect("landing list poisoned");
        if !ranges.contains(&(ptr.as_ptr() as usize, len)) {
            ranges.push((ptr.as_ptr() as usize, len));
        }
        Ok(())
    }

    fn landing_lkey(&self, ptr: *const u8, len: usize) -> Option<u32> {
        let landings = self.landings.lock().expect("landing list poisoned");
        landings.iter().find(|mr| mr.covers(ptr, len)).map(|mr| mr.lkey())
    }

    /// The lkey of a buffer this registry registered, if `buf` is one.
    fn buffer_lkey(&self, buf: &PageBuf, len: usize) -> Option<u32> {
        let reg = buf.registration()?.downcast_ref::<Registered>()?;
        (reg.0.in_domain(&self.pd) && reg.0.covers(buf.as_ptr(), len)).then(|| reg.0.lkey())
    }
}

/// Where the source's regions are, and the destination's count of what it read.
#[derive(Clone)]
struct Remote {
    regions: Vec<RemoteRegion>,
    layout: MemoryLayout,
    ledger: Arc<ReadLedger>,
}

impl Remote {
    /// Remote address and rkey of a checked run.
    fn locate(&self, run: PageRun) -> Result<(u64, u32, usize)> {
        self.layout.check_run(run)?;
        let (offset, len) = self.layout.run_bytes(run);
        let r = &self.regions[run.region as usize];
        Ok((r.addr + offset, r.rkey, len))
    }
}

fn lane_broken(why: &str) -> TransportError {
    TransportError::Rdma { op: "lane", detail: format!("the lane failed earlier: {why}") }
}

/// Polls `cq` until a completion arrives or `deadline`; spins for `spin` first, then sleeps on the
/// completion channel.
fn wait_completion(
    cq: &CompletionQueue,
    out: &mut Vec<verbs::Completion>,
    spin: Duration,
    deadline: Instant,
) -> Result<bool> {
    let spin_until = Instant::now() + spin;
    loop {
        if cq.poll(out, 16)? > 0 {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        if now < spin_until {
            std::hint::spin_loop();
            continue;
        }
        cq.arm()?;
        // A completion that arrived before arming raises no event: look once more.
        if cq.poll(out, 16)? > 0 {
            return Ok(true);
        }
        cq.wait((deadline - now).min(Duration::from_millis(100)))?;
    }
}

/// Fails a lane's queue pair and waits briefly for the flush, so nothing is written afterwards
/// into memory the caller gets back.
fn fail_and_flush(qp: &QueuePair, cq: &CompletionQueue) {
    qp.fail();
    let mut sink = Vec::new();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        sink.clear();
        if cq.poll(&mut sink, 16).map(|n| n == 0).unwrap_or(true) {
            std::thread::sleep(Duration::from_millis(1));
            if cq.poll(&mut sink, 16).map(|n| n == 0).unwrap_or(true) {
                return;
            }
        }
    }
}

struct RdmaUrgent {
    // Field order is drop order: the queue pair goes before any memory it may write.
    qp: QueuePair,
    /// The setup connection: the source's queue pairs live while it is open.
    _setup: Arc<TcpStream>,
    cq: Arc<CompletionQueue>,
    bounce: PageBuf,
    /// Buffers handed out by `buffer`; weak, so a dropped buffer is never matched again.
    handed_out: Vec<Weak<MemoryRegion>>,
    registry: Arc<Registry>,
    remote: Remote,
    timeout: Duration,
    spin: Duration,
    broken: Option<String>,
    next_wr: u64,
    /// Reused for every fault: the fault path allocates nothing.
    wcs: Vec<verbs::Completion>,
}

impl RdmaUrgent {
    fn lkey_for(&self, ptr: *const u8, len: usize) -> Option<u32> {
        if let Some(k) = self.registry.landing_lkey(ptr, len) {
            return Some(k);
        }
        self.handed_out.iter().filter_map(Weak::upgrade).find(|mr| mr.covers(ptr, len)).map(|mr| mr.lkey())
    }

    fn read_into(&mut self, ptr: *mut u8, len: usize, lkey: u32, remote: u64, rkey: u32) -> Result<()> {
        self.next_wr += 1;
        // SAFETY: ptr..ptr+len is registered under lkey in this domain (a landing, a handed-out
        // buffer still alive, or the bounce buffer) and exclusively borrowed by the caller until
        // the completion below is polled or the queue pair is failed and flushed.
        unsafe {
            self.qp.post_read(
                self.next_wr,
                Local { ptr, len: len as u32, lkey },
                verbs::Remote { addr: remote, rkey },
                true,
            )?
        };
        self.wcs.clear();
        let deadline = Instant::now() + self.timeout;
        if !wait_completion(&self.cq, &mut self.wcs, self.spin, deadline)? {
            fail_and_flush(&self.qp, &self.cq);
            let why = format!("an urgent read took longer than {:?}", self.timeout);
            self.broken = Some(why.clone());
            return Err(TransportError::Rdma { op: "rdma read", detail: why });
        }
        let wc = self.wcs[0];
        if !wc.ok() {
            fail_and_flush(&self.qp, &self.cq);
            let why = wc.describe();
            self.broken = Some(why.clone());
            return Err(TransportError::Rdma { op: "rdma read", detail: why });
        }
        Ok(())
    }
}

impl UrgentLane for RdmaUrgent {
    fn read(&mut self, run: PageRun, dst: &mut [u8]) -> Result<ZeroMask> {
        if let Some(why) = &self.broken {
            return Err(lane_broken(why));
        }
        let (remote, rkey, len) = self.remote.locate(run)?;
        let dst = run_dst(&self.remote.layout, run, dst)?;
        self.remote.ledger.record(run);
        match self.lkey_for(dst.as_ptr(), len) {
            Some(lkey) => self.read_into(dst.as_mut_ptr(), len, lkey, remote, rkey)?,
            None => {
                let lkey = self.registry.buffer_lkey(&self.bounce, len).expect("the bounce buffer is registered");
                let bounce = self.bounce.as_mut_ptr();
                self.read_into(bounce, len, lkey, remote, rkey)?;
                dst.copy_from_slice(&self.bounce[..len]);
            }
        }
        Ok(ZeroMask::default())
    }

    fn buffer(&mut self, len: usize) -> Result<PageBuf> {
        let buf = self.registry.buffer(len)?;
        self.handed_out.retain(|w| w.strong_count() > 0);
        if let Some(reg) = buf.registration().and_then(|r| r.downcast_ref::<Registered>()) {
            self.handed_out.push(Arc::downgrade(&reg.0));
        }
        Ok(buf)
    }

    unsafe fn register_landing(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.registry.register_landing(ptr, len) }
    }

    fn interrupter(&self) -> Option<crate::lane::Interrupter> {
        setup_interrupter(&self._setup)
    }
}

/// Closes the setup connection from another thread: the source destroys the queue pairs, and a
/// read waiting for its completion fails within the transport's retry time.
fn setup_interrupter(setup: &TcpStream) -> Option<crate::lane::Interrupter> {
    let setup = setup.try_clone().ok()?;
    Some(Arc::new(move || {
        let _ = setup.shutdown(std::net::Shutdown::Both);
    }))
}

/// A posted bulk work request.
enum Posted {
    Read {
        read: BulkRead,
        wr_id: u64,
        signalled: bool,
        staging: Option<PageBuf>,
    },
    /// A small signalled read posted only so that unsignalled reads before it complete.
    Marker {
        wr_id: u64,
    },
}

impl Posted {
    fn wr_id(&self) -> u64 {
        match self {
            Posted::Read { wr_id, .. } | Posted::Marker { wr_id } => *wr_id,
        }
    }

    fn signalled(&self) -> bool {
        match self {
            Posted::Read { signalled, .. } => *signalled,
            Posted::Marker { .. } => true,
        }
    }
}

struct RdmaBulk {
    // Field order is drop order: the queue pair goes before any memory it may write.
    qp: QueuePair,
    cq: Arc<CompletionQueue>,
    posted: VecDeque<Posted>,
    done: VecDeque<BulkDone>,
    staging: Vec<PageBuf>,
    marker: PageBuf,
    registry: Arc<Registry>,
    remote: Remote,
    depth: usize,
    signal_every: usize,
    timeout: Duration,
    broken: Option<String>,
    next_wr: u64,
    /// Reused by every wait, so completing a read allocates nothing.
    wcs: Vec<verbs::Completion>,
    /// Held open: the source keeps our queue pairs while it is.
    _setup: Arc<TcpStream>,
}

impl RdmaBulk {
    fn reads_in_flight(&self) -> usize {
        self.posted.iter().filter(|p| matches!(p, Posted::Read { .. })).count()
    }

    fn take_staging(&mut self, len: usize) -> Result<PageBuf> {
        match self.staging.iter().position(|b| b.len() >= len) {
            Some(i) => Ok(self.staging.swap_remove(i)),
            None => self.registry.buffer(len.next_power_of_two()),
        }
    }

    fn fail(&mut self, why: String) -> TransportError {
        fail_and_flush(&self.qp, &self.cq);
        self.broken = Some(why.clone());
        TransportError::Rdma { op: "rdma read", detail: why }
    }

    /// Posts a small signalled read after unsignalled ones, so their completion is reported.
    fn post_marker(&mut self) -> Result<()> {
        let region = self.remote.regions[0];
        let lkey = self.registry.buffer_lkey(&self.marker, 8).expect("the marker buffer is registered");
        self.next_wr += 1;
        let wr_id = self.next_wr;
        let ptr = self.marker.as_mut_ptr();
        let (local, remote) = (Local { ptr, len: 8, lkey }, verbs::Remote { addr: region.addr, rkey: region.rkey });
        // SAFETY: the marker buffer is registered under lkey and owned by this lane, which drops
        // its queue pair first; every region is at least one page long. Markers only ever read
        // into it, so concurrent markers writing the same bytes are harmless.
        unsafe { self.qp.post_read(wr_id, local, remote, true)? };
        self.posted.push_back(Posted::Marker { wr_id });
        Ok(())
    }

    /// Retires every posted request up to and including `wr_id`.
    fn retire_through(&mut self, wr_id: u64) {
        while self.posted.front().is_some_and(|p| p.wr_id() <= wr_id) {
            let Some(Posted::Read { read, staging, .. }) = self.posted.pop_front() else { continue };
            let mut buf = read.buf;
            if let Some(staging) = staging {
                let len = self.remote.layout.run_bytes(read.run).1;
                buf[..len].copy_from_slice(&staging[..len]);
                self.staging.push(staging);
            }
            self.done.push_back(BulkDone { run: read.run, buf, tag: read.tag, zero: ZeroMask::default() });
        }
    }
}

impl BulkLane for RdmaBulk {
    fn depth(&self) -> usize {
        self.depth
    }

    fn interrupter(&self) -> Option<crate::lane::Interrupter> {
        setup_interrupter(&self._setup)
    }

    fn in_flight(&self) -> usize {
        self.reads_in_flight() + self.done.len()
    }

    fn submit(&mut self, mut read: BulkRead) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(lane_broken(why));
        }
        if self.in_flight() >= self.depth {
            return Err(TransportError::LaneFull(self.depth));
        }
        let (remote, rkey, len) = self.remote.locate(read.run)?;
        if read.buf.len() < len {
            return Err(TransportError::BufferSize { need: len, got: read.buf.len() });
        }
        // The device writes the target: take its address through a unique borrow.
        let direct = match &mut read.buf {
            BulkTarget::Mapped(m) => self.registry.landing_lkey(m.as_ptr(), len).map(|k| (m.as_ptr(), k)),
            BulkTarget::Buffer(b) => self.registry.buffer_lkey(b, len).map(|k| (b.as_mut_ptr(), k)),
        };
        let (ptr, lkey, staging) = match direct {
            Some((ptr, lkey)) => (ptr, lkey, None),
            None => {
                let mut s = self.take_staging(len)?;
                let lkey = self.registry.buffer_lkey(&s, len).expect("staging buffers are registered");
                (s.as_mut_ptr(), lkey, Some(s))
            }
        };
        self.next_wr += 1;
        let wr_id = self.next_wr;
        let signalled = wr_id % self.signal_every as u64 == 0 || self.in_flight() + 1 == self.depth;
        self.remote.ledger.record(read.run);
        // SAFETY: ptr..ptr+len is registered under lkey in this domain, and the memory behind it
        // (the read's own target or a staging buffer) moves into `posted`, owned by this lane
        // until the read is retired; the queue pair is dropped before `posted`.
        unsafe {
            self.qp.post_read(
                wr_id,
                Local { ptr, len: len as u32, lkey },
                verbs::Remote { addr: remote, rkey },
                signalled,
            )?
        };
        self.posted.push_back(Posted::Read { read, wr_id, signalled, staging });
        Ok(())
    }

    fn complete(&mut self) -> Result<Option<BulkDone>> {
        if let Some(done) = self.done.pop_front() {
            return Ok(Some(done));
        }
        if self.posted.is_empty() {
            return Ok(None);
        }
        if let Some(why) = &self.broken {
            return Err(lane_broken(why));
        }
        let deadline = Instant::now() + self.timeout;
        let mut wcs = std::mem::take(&mut self.wcs);
        while self.done.is_empty() {
            // The newest request must be signalled, or the wait below could outlast every
            // signalled completion still to come.
            if !self.posted.back().is_some_and(Posted::signalled) {
                self.post_marker()?;
            }
            wcs.clear();
            if !wait_completion(&self.cq, &mut wcs, Duration::from_micros(20), deadline)? {
                return Err(self.fail(format!("no bulk read completed in {:?}", self.timeout)));
            }
            for wc in &wcs {
                if !wc.ok() {
                    return Err(self.fail(wc.describe()));
                }
                self.retire_through(wc.wr_id);
            }
        }
        self.wcs = wcs;
        Ok(self.done.pop_front())
    }

    fn buffer(&mut self, len: usize) -> Result<PageBuf> {
        self.registry.buffer(len)
    }

    unsafe fn register_landing(&mut self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.registry.register_landing(ptr, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(qpn: u32) -> Endpoint {
        Endpoint { lid: 7, qpn, psn: 0x12345, gid: [9; 16], mtu: 3, max_reads: 16 }
    }

    #[test]
    fn setup_messages_round_trip_and_hostile_ones_are_refused() {
        let layout = MemoryLayout::single(1 << 20).unwrap();
        let req = SetupRequest { urgent: endpoint(0x11), bulk: endpoint(0x12) };
        assert_eq!(SetupRequest::decode(&req.encode()).unwrap(), req);
        let reply = SetupReply {
            urgent: endpoint(0x21),
            bulk: endpoint(0x22),
            regions: vec![RemoteRegion { addr: 0x7f00_0000_0000, len: 1 << 20, rkey: 0xabcd }],
        };
        assert_eq!(SetupReply::decode(&reply.encode(), &layout).unwrap(), reply);

        // Truncated, overlong, wrong tag.
        let bytes = req.encode();
        for b in [&bytes[..bytes.len() - 1], &[bytes.clone(), vec![0]].concat()[..], &reply.encode()[..]] {
            assert!(matches!(SetupRequest::decode(b), Err(TransportError::Malformed { .. })));
        }
        // Out-of-range queue pair number, PSN and MTU.
        for bad in [
            Endpoint { qpn: 0, ..endpoint(1) },
            Endpoint { qpn: 1 << 24, ..endpoint(1) },
            Endpoint { psn: 1 << 24, ..endpoint(1) },
            Endpoint { mtu: 0, ..endpoint(1) },
            Endpoint { mtu: 6, ..endpoint(1) },
            Endpoint { max_reads: 0, ..endpoint(1) },
        ] {
            let m = SetupRequest { urgent: bad, bulk: endpoint(2) }.encode();
            assert!(SetupRequest::decode(&m).is_err(), "{bad:?} accepted");
        }
        // A region shorter than the guest's, one that wraps, a wrong region count.
        for regions in [
            vec![RemoteRegion { addr: 0, len: 4096, rkey: 1 }],
            vec![RemoteRegion { addr: u64::MAX - 10, len: 1 << 20, rkey: 1 }],
            vec![],
            vec![RemoteRegion { addr: 0, len: 1 << 20, rkey: 1 }; 2],
        ] {
            let m = SetupReply { regions, ..reply.clone() }.encode();
            assert!(SetupReply::decode(&m, &layout).is_err());
        }
        // A count that promises more regions than the bytes hold.
        let mut m = reply.encode();
        let at = 1 + 2 * ENDPOINT_LEN;
        m[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SetupReply::decode(&m, &layout).is_err());
    }
}
