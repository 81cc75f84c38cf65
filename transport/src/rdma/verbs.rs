//! Owning wrappers over the libibverbs objects the rdma backend uses: device context, protection
//! domain, memory region, completion queue (with its completion channel) and RC queue pair.
//! Every raw verbs call of the crate is in this file. Objects hold `Arc`s to what they were made
//! from, so a context or domain is freed only after everything made from it.
//!
//! `ibv_post_send`, `ibv_poll_cq` and `ibv_req_notify_cq` are static inline functions in verbs.h
//! (no symbol to link); rdma-sys reimplements them through `ibv_context.ops`, which is what a
//! provider (mlx5, rxe) fills in.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::*;

use crate::error::{Result, TransportError};

/// verbs.h's `IBV_LINK_LAYER_ETHERNET`, a #define that bindgen does not carry over.
const LINK_LAYER_ETHERNET: u8 = 2;

fn verbs_error(op: &'static str, errno: c_int) -> TransportError {
    TransportError::Rdma { op, detail: std::io::Error::from_raw_os_error(errno.abs()).to_string() }
}

fn last_os_error(op: &'static str) -> TransportError {
    TransportError::Rdma { op, detail: std::io::Error::last_os_error().to_string() }
}

/// The names of the verbs devices on this host.
pub fn device_names() -> Result<Vec<String>> {
    let mut n: c_int = 0;
    // SAFETY: n is a valid out-pointer; the list is freed below and only read before that.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(last_os_error("ibv_get_device_list"));
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: list has n valid device pointers; ibv_get_device_name returns a C string owned
        // by the device, valid until the list is freed.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// What a port reports that queue pair setup needs.
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU, as verbs encodes it (1 = 256 B ... 5 = 4 KiB).
    pub active_mtu: u8,
    /// Entries in the port's GID table.
    pub gid_table_len: u32,
    /// Largest message the port carries.
    pub max_msg_size: u32,
    /// An Ethernet (RoCE) link rather than InfiniBand.
    pub ethernet: bool,
    /// The port is up.
    pub active: bool,
    /// verbs.h's encodings of the link: width (1 = 1x, 2 = 4x, 4 = 8x, 8 = 12x, 16 = 2x) and
    /// speed (1 = SDR ... 128 = NDR).
    pub active_width: u8,
    /// See `active_width`.
    pub active_speed: u8,
}

impl PortInfo {
    /// The port's data rate in Gbit/s from its width and speed (signalling rate less line
    /// encoding), or `None` when the codes are unknown (software devices report anything).
    pub fn line_rate_gbps(&self) -> Option<f64> {
        let lanes = match self.active_width {
            1 => 1.0,
            2 => 4.0,
            4 => 8.0,
            8 => 12.0,
            16 => 2.0,
            _ => return None,
        };
        let per_lane = match self.active_speed {
            1 => 2.5 * 0.8,
            2 => 5.0 * 0.8,
            4 => 10.0 * 0.8,
            8 => 10.3125 * 64.0 / 66.0,
            16 => 14.0625 * 64.0 / 66.0,
            32 => 25.78125 * 64.0 / 66.0,
            64 => 53.125 * 64.0 / 66.0,
            128 => 106.25 * 64.0 / 66.0,
            _ => return None,
        };
        Some(lanes * per_lane)
    }
}

/// An open verbs device and the port this process uses on it.
pub struct Context {
    ctx: NonNull<ibv_context>,
    name: String,
    port: u8,
    port_info: PortInfo,
    /// Most RDMA READs this side may have outstanding as initiator, and as responder.
    max_initiator_reads: u8,
    max_responder_reads: u8,
}

// SAFETY: libibverbs objects may be used from any thread; the context is only freed in Drop.
unsafe impl Send for Context {}
// SAFETY: as above; every verb used on a shared context is thread-safe per libibverbs.
unsafe impl Sync for Context {}

impl Context {
    /// Opens `name` (or the first device when `None`) and queries `port`.
    pub fn open(name: Option<&str>, port: u8) -> Result<Arc<Self>> {
        let mut n: c_int = 0;
        // SAFETY: n is a valid out-pointer; the list is freed before returning.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(last_os_error("ibv_get_device_list"));
        }
        let mut chosen = None;
        for i in 0..n.max(0) as usize {
            // SAFETY: list holds n valid device pointers until freed.
            let dev = unsafe { *list.add(i) };
            // SAFETY: dev is valid; the name lives as long as the list.
            let dev_name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }.to_string_lossy().into_owned();
            if name.map_or(true, |want| want == dev_name) {
                chosen = Some((dev, dev_name));
                break;
            }
        }
        let opened = chosen.map(|(dev, dev_name)| {
            // SAFETY: dev is a valid device of the live list; the context outlives the list.
            (unsafe { ibv_open_device(dev) }, dev_name)
        });
        // SAFETY: list came from ibv_get_device_list and is freed once; the opened context does
        // not depend on it.
        unsafe { ibv_free_device_list(list) };
        let (raw, dev_name) = opened.ok_or_else(|| TransportError::Rdma {
            op: "open device",
            detail: match name {
                Some(want) => format!("no RDMA device named {want}"),
                None => "this host has no RDMA device".into(),
            },
        })?;
        let ctx = NonNull::new(raw).ok_or_else(|| last_os_error("ibv_open_device"))?;
        let mut this = Context {
            ctx,
            name: dev_name,
            port,
            port_info: PortInfo {
                lid: 0,
                active_mtu: 0,
                gid_table_len: 0,
                max_msg_size: 0,
                ethernet: false,
                active: false,
                active_width: 0,
                active_speed: 0,
            },
            max_initiator_reads: 1,
            max_responder_reads: 1,
        };
        // SAFETY: zeroed is a valid bit pattern for these plain C structs (integers only).
        let mut dev_attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open and dev_attr a valid out-pointer.
        let rc = unsafe { ibv_query_device(ctx.as_ptr(), &mut dev_attr) };
        if rc != 0 {
            return Err(verbs_error("ibv_query_device", rc));
        }
        // SAFETY: as above.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open and attr a valid out-pointer of the size the wrapper passes.
        let rc = unsafe { ___ibv_query_port(ctx.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(verbs_error("ibv_query_port", rc));
        }
        this.port_info = PortInfo {
            lid: attr.lid,
            active_mtu: attr.active_mtu as u8,
            gid_table_len: attr.gid_tbl_len.max(0) as u32,
            max_msg_size: attr.max_msg_sz,
            ethernet: attr.link_layer == LINK_LAYER_ETHERNET,
            active: attr.state == ibv_port_state::IBV_PORT_ACTIVE,
            active_width: attr.active_width,
            active_speed: attr.active_speed,
        };
        this.max_initiator_reads = dev_attr.max_qp_init_rd_atom.clamp(1, 16) as u8;
        this.max_responder_reads = dev_attr.max_qp_rd_atom.clamp(1, 16) as u8;
        Ok(Arc::new(this))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u8 {
        self.port
    }

    pub fn port_info(&self) -> PortInfo {
        self.port_info
    }

    pub fn max_initiator_reads(&self) -> u8 {
        self.max_initiator_reads
    }

    pub fn max_responder_reads(&self) -> u8 {
        self.max_responder_reads
    }

    pub fn gid(&self, index: u32) -> Result<[u8; 16]> {
        // SAFETY: an all-zero gid is a valid value of this plain union.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open; gid is a valid out-pointer.
        let rc = unsafe { ibv_query_gid(self.ctx.as_ptr(), self.port, index as c_int, &mut gid) };
        if rc != 0 {
            return Err(verbs_error("ibv_query_gid", rc));
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: everything made from this context holds an Arc to it, so none is left.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain: memory regions and queue pairs of one domain may be used together.
pub struct ProtectionDomain {
    pd: NonNull<ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: see Context.
unsafe impl Send for ProtectionDomain {}
// SAFETY: see Context.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>> {
        // SAFETY: ctx is open.
        let pd =
            NonNull::new(unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) }).ok_or_else(|| last_os_error("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain { pd, ctx: ctx.clone() }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every region and queue pair of this domain holds an Arc to it, so none is left.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// What a peer may do with a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Our reads land here (local write).
    LocalWrite,
    /// The peer reads it. `local_write` also pins the pages for writing, which a private
    /// anonymous mapping needs so the pin follows the process's later writes.
    RemoteRead { local_write: bool },
}

/// Memory registered with a protection domain: pinned until dropped.
pub struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    addr: usize,
    len: usize,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: see Context.
unsafe impl Send for MemoryRegion {}
// SAFETY: see Context; the region's fields are read-only after registration.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `addr..addr+len`.
    ///
    /// # Safety
    /// The range must be mapped, by the same mapping, until the region is dropped; with
    /// [`Access::LocalWrite`] the device may write into it whenever a posted read targets it.
    pub unsafe fn register(pd: &Arc<ProtectionDomain>, addr: *mut u8, len: usize, access: Access) -> Result<Self> {
        let flags = match access {
            Access::LocalWrite => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
            Access::RemoteRead { local_write: false } => ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            Access::RemoteRead { local_write: true } => {
                ibv_access_flags::IBV_ACCESS_REMOTE_READ | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            }
        };
        // SAFETY: pd is live; the caller keeps the range mapped for the region's life.
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), addr.cast::<c_void>(), len, flags.0 as c_int) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os_error("ibv_reg_mr"))?;
        Ok(MemoryRegion { mr, addr: addr as usize, len, _pd: pd.clone() })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is a live registration; lkey is immutable after registration.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as in lkey.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `ptr..ptr+len` lies inside this region.
    pub fn covers(&self, ptr: *const u8, len: usize) -> bool {
        let start = ptr as usize;
        start >= self.addr && start.checked_add(len).is_some_and(|end| end <= self.addr + self.len)
    }

    /// Whether this region was registered in `pd`.
    pub fn in_domain(&self, pd: &Arc<ProtectionDomain>) -> bool {
        Arc::ptr_eq(&self._pd, pd)
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: mr is live and deregistered once; queue pairs that used it are destroyed
        // first or no longer have reads posted into it (see the lanes' field order).
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// One finished work request.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub vendor_err: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }

    pub fn describe(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        let s = unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) };
        format!("{} (status {}, vendor error {:#x})", s.to_string_lossy(), self.status, self.vendor_err)
    }
}

/// A completion queue with its own completion channel, so a waiter can sleep on an fd.
pub struct CompletionQueue {
    cq: NonNull<ibv_cq>,
    channel: NonNull<ibv_comp_channel>,
    unacked: AtomicU32,
    _ctx: Arc<Context>,
}

// SAFETY: see Context. Polling one CQ from several threads is allowed by libibverbs; the lanes
// still poll each CQ from one thread.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    pub fn new(ctx: &Arc<Context>, entries: u32) -> Result<Arc<Self>> {
        // SAFETY: ctx is open.
        let channel = NonNull::new(unsafe { ibv_create_comp_channel(ctx.ctx.as_ptr()) })
            .ok_or_else(|| last_os_error("ibv_create_comp_channel"))?;
        // SAFETY: ctx and channel are live; no cq_context is used.
        let cq =
            unsafe { ibv_create_cq(ctx.ctx.as_ptr(), entries as c_int, std::ptr::null_mut(), channel.as_ptr(), 0) };
        let Some(cq) = NonNull::new(cq) else {
            let err = last_os_error("ibv_create_cq");
            // SAFETY: the channel was just created and nothing uses it.
            unsafe { ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(err);
        };
        // The channel's fd is polled with a timeout; it must not block in ibv_get_cq_event.
        // SAFETY: channel is live; fcntl on its fd has no memory effects.
        let fd = unsafe { (*channel.as_ptr()).fd };
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        Ok(Arc::new(CompletionQueue { cq, channel, unacked: AtomicU32::new(0), _ctx: ctx.clone() }))
    }

    /// Appends up to `max` (at most 16) completions to `out` without waiting.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        const BATCH: usize = 16;
        // SAFETY: ibv_wc is plain data; zeroed is a valid value.
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: cq is live; wcs has room for BATCH entries.
        let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), max.min(BATCH) as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs_error("ibv_poll_cq", n));
        }
        for wc in &wcs[..n as usize] {
            out.push(Completion { wr_id: wc.wr_id, status: wc.status, vendor_err: wc.vendor_err });
        }
        Ok(n as usize)
    }

    /// Asks for an event on the channel at the next completion.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: cq is live.
        let rc = unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(verbs_error("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Sleeps until the armed queue signals or `timeout` passes. Returns whether it signalled.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        // SAFETY: channel is live.
        let fd = unsafe { (*self.channel.as_ptr()).fd };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(TransportError::Rdma { op: "poll completion channel", detail: err.to_string() });
        }
        if rc == 0 {
            return Ok(false);
        }
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut cq_ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: channel is live and non-blocking; the out-pointers are valid.
        let rc = unsafe { ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut cq_ctx) };
        if rc == 0 {
            self.unacked.fetch_add(1, Ordering::Relaxed);
            if self.unacked.load(Ordering::Relaxed) >= 64 {
                let n = self.unacked.swap(0, Ordering::Relaxed);
                // SAFETY: cq is live and n events were taken from its channel.
                unsafe { ibv_ack_cq_events(self.cq.as_ptr(), n) };
            }
        }
        Ok(true)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        let n = self.unacked.swap(0, Ordering::Relaxed);
        // SAFETY: the queue pairs using this queue hold an Arc to it, so none is left; every
        // event taken is acknowledged before the queue is destroyed, as ibv_destroy_cq requires.
        unsafe {
            if n > 0 {
                ibv_ack_cq_events(self.cq.as_ptr(), n);
            }
            ibv_destroy_cq(self.cq.as_ptr());
            ibv_destroy_comp_channel(self.channel.as_ptr());
        }
    }
}

/// How to reach the other side's queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Global identifier (RoCE routes on it).
    pub gid: [u8; 16],
    /// Path MTU, as verbs encodes it.
    pub mtu: u8,
    /// RDMA READs this side answers at once (its responder depth): the peer keeps at most this
    /// many outstanding.
    pub max_reads: u8,
}

/// Path settings both queue pairs of a connection share.
#[derive(Clone, Copy, Debug)]
pub struct PathConfig {
    pub gid_index: u8,
    /// Local ACK timeout exponent (4.096 us * 2^timeout) and retries before a read fails.
    pub ack_timeout: u8,
    pub retry_count: u8,
}

/// Where a read lands: registered memory of ours.
#[derive(Clone, Copy, Debug)]
pub struct Local {
    pub ptr: *mut u8,
    pub len: u32,
    pub lkey: u32,
}

/// What a read reads: the peer's registered memory.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    pub addr: u64,
    pub rkey: u32,
}

/// A reliable-connected queue pair.
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    _cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: see Context. A QP is posted to by one thread (its lane).
unsafe impl Send for QueuePair {}
// SAFETY: as above; state changes and posts are serialised by the owning lane.
unsafe impl Sync for QueuePair {}

impl QueuePair {
    pub fn new_rc(pd: &Arc<ProtectionDomain>, cq: &Arc<CompletionQueue>, max_send_wr: u32) -> Result<Self> {
        // SAFETY: plain C struct; zero is valid for every field, the ones used are set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = max_send_wr;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and cq are live; init is fully set.
        let qp = unsafe { ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| last_os_error("ibv_create_qp"))?;
        Ok(QueuePair { qp, _cq: cq.clone(), pd: pd.clone() })
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: qp is live; qp_num is immutable.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, what: &'static str) -> Result<()> {
        // SAFETY: qp is live; attr is a fully initialised attribute block.
        let rc = unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(verbs_error(what, rc));
        }
        Ok(())
    }

    /// RESET -> INIT -> RTR -> RTS towards `remote`. `remote_reads` lets the peer read our
    /// regions (the source's side); outstanding reads are bounded by our initiator depth and the
    /// peer's responder depth (each at most 16).
    pub fn connect(&self, remote: &Endpoint, local_psn: u32, path: &PathConfig, remote_reads: bool) -> Result<()> {
        let ctx = self.pd.context();
        // SAFETY: plain C struct; zero is valid for every field.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = ctx.port();
        attr.qp_access_flags = if remote_reads { ibv_access_flags::IBV_ACCESS_REMOTE_READ.0 } else { 0 };
        use ibv_qp_attr_mask as M;
        self.modify(
            &mut attr,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "qp to INIT",
        )?;

        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(ctx.port_info().active_mtu.min(remote.mtu));
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = ctx.max_responder_reads();
        attr.min_rnr_timer = 12;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = ctx.port();
        if remote.gid != [0; 16] {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = path.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "qp to RTR",
        )?;

        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = path.ack_timeout;
        attr.retry_cnt = path.retry_count;
        attr.rnr_retry = 7;
        attr.sq_psn = local_psn;
        attr.max_rd_atomic = ctx.max_initiator_reads().min(remote.max_reads);
        self.modify(
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "qp to RTS",
        )
    }

    /// Moves the queue pair to the error state: posted requests are flushed and the device
    /// writes nothing more for them.
    pub fn fail(&self) {
        // SAFETY: plain C struct; zero is valid for every field.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE, "qp to ERR");
    }

    /// Posts one RDMA READ of `local.len` bytes from `remote` into `local`.
    ///
    /// # Safety
    /// `local` must lie in a region registered for local write in this queue pair's domain under
    /// its lkey, and be lent exclusively to the device until the read's completion (or a later
    /// signalled completion on this queue pair) is polled, or the queue pair is destroyed or
    /// failed and flushed.
    pub unsafe fn post_read(&self, wr_id: u64, local: Local, remote: Remote, signalled: bool) -> Result<()> {
        let mut sge = ibv_sge { addr: local.ptr as u64, length: local.len, lkey: local.lkey };
        // SAFETY: plain C struct; zero is valid for every field, the ones used are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
        wr.send_flags = if signalled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
        wr.wr.rdma = rdma_t { remote_addr: remote.addr, rkey: remote.rkey };
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: qp is live, wr and sge are valid for the call (the provider copies them);
        // the caller lends the local range to the device.
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(verbs_error("ibv_post_send", rc));
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: qp is live and destroyed once; after this the device writes nothing for it.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}
