//! Back-and-forth migration (Lee, Lai, Lee, UCC'16): a host a VM left keeps its image, and the
//! way back moves only what the guest changed since.
//!
//! - The host the VM leaves keeps its memory as a [`RetainedImage`], named by an
//!   [`ImageIdentity`]: the VM's id and the generation (how many migrations the VM had made when
//!   it left; each arrival makes the next).
//! - The host the VM arrives at wraps the VMM's dirty log in a [`ChangeTracker`] before the guest
//!   resumes: every page the guest writes from then on (and every page the VMM marks, e.g.
//!   reported free) joins the changed set. A page that arrives by post-copy after the resume is
//!   the base's own until the guest writes it, and a write is in the dirty log whenever the page
//!   arrived, so post-copy arrivals need nothing more.
//! - Leaving again, the source sends a [`BaseOffer`] before the migration proper ([`propose`]):
//!   the identity of the base it changed, the layout's digest, the changed set, and checksums of a
//!   sample of unchanged pages taken from its running guest. The destination ([`answer`]) checks
//!   them against its kept image: identity, generation, layout, every sampled page. Accepted, the
//!   migration runs over the kept memory: pre-copy's round 0 is the changed set
//!   ([`crate::precopy::PrecopyConfig::base`]) and later rounds what the guest writes meanwhile;
//!   post-copy waits for the destination to drop the changed pages from its kept image
//!   ([`OntoKept::prepare`], [`await_prepared`]), pauses, sends the pages changed since the offer
//!   ([`send_last_changes`]), and the destination registers its kept memory with only the changed
//!   pages absent ([`OntoKept::register`]).
//!   Refused, with the reason, it runs as a full migration into fresh memory.
//!
//! Sampling catches an image that was written widely since the VM left (a restart there, another
//! VM's data, a restore over it): with 1024 samples, an image changed in 1% of its pages escapes
//! with probability 0.99^1024 < 4e-5. A change to a handful of pages is not caught by sampling; a
//! host that must rule that out keeps the retained memory unwritable (a sealed memfd) or checks
//! every page, which costs a full read of the image at the destination per trip.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::wire::write_session;
use ferry_transport::{ControlStream, GuestMemory, MemoryLayout, PageIndex, TransportError};

use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;
use crate::handoff;
use crate::precopy::DirtyLog;

/// The longest VM id an offer carries.
pub const MAX_VM_ID_BYTES: usize = 64;
/// Most sampled pages an offer may carry (a hostile offer cannot make the destination read more).
pub const MAX_SAMPLES: usize = 4096;
/// Samples a source sends unless told otherwise.
pub const DEFAULT_SAMPLES: usize = 1024;

/// How long a side waits for its peer's next back-and-forth message. What the peer does in
/// between (sampling or checking 1024 pages, dropping changed pages from an image, pausing its
/// guest) takes milliseconds to seconds; past this a silent peer is an error, not a hang.
pub const PEER_DEADLINE: Duration = Duration::from_secs(60);

pub(crate) const BASE_OFFER: u8 = 20;
pub(crate) const BASE_VERDICT: u8 = 21;
pub(crate) const LAST_CHANGES: u8 = 22;
pub(crate) const ONTO_PREPARED: u8 = 23;

/// Which image a retained copy is, or which image a running guest's changes are relative to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageIdentity {
    /// The VM's name, the same on every host.
    pub vm_id: String,
    /// Migrations the VM had made when this image was left behind.
    pub generation: u64,
}

impl ImageIdentity {
    /// A checked identity: the id is 1 to [`MAX_VM_ID_BYTES`] bytes.
    pub fn new(vm_id: impl Into<String>, generation: u64) -> Result<Self> {
        let vm_id = vm_id.into();
        if vm_id.is_empty() || vm_id.len() > MAX_VM_ID_BYTES {
            return Err(MigrationError::Protocol(format!("a VM id of {} bytes (1 to {MAX_VM_ID_BYTES})", vm_id.len())));
        }
        Ok(ImageIdentity { vm_id, generation })
    }
}

/// Guest memory a host kept when its VM left, as it was at the departure.
#[derive(Debug)]
pub struct RetainedImage {
    identity: ImageIdentity,
    memory: Arc<GuestMemory>,
}

impl RetainedImage {
    /// Keeps `memory`, which must hold the guest exactly as it left (its vCPUs stopped for good
    /// here), under `identity`.
    pub fn keep(memory: Arc<GuestMemory>, identity: ImageIdentity) -> Self {
        RetainedImage { identity, memory }
    }

    /// Which image this is.
    pub fn identity(&self) -> &ImageIdentity {
        &self.identity
    }

    /// The kept memory. Anything written to it makes the image differ from the base a returning
    /// VM changed: the sampled check refuses such an image when the writes are widespread.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
}

/// The pages a guest changed since it arrived on a base image. Wraps the VMM's dirty log: pass the
/// tracker wherever the log was used (pre-copy rounds take it as their [`DirtyLog`]), so no write
/// it reports is missed.
#[derive(Debug)]
pub struct ChangeTracker<L> {
    base: ImageIdentity,
    changed: FreePages,
    log: L,
}

impl<L: DirtyLog> ChangeTracker<L> {
    /// Starts tracking a guest of `pages` pages that arrived on `base`. `log` must have been
    /// logging since before the guest resumed here; what it holds now is counted as changed.
    pub fn start(base: ImageIdentity, mut log: L, pages: u64) -> Result<Self> {
        let mut changed = FreePages::new(pages);
        let first = log.collect()?;
        if first.pages() != pages {
            return Err(MigrationError::Vmm(format!("a dirty log of {} pages for {pages}", first.pages())));
        }
        changed.union_with(&first);
        Ok(ChangeTracker { base, changed, log })
    }

    /// Counts `pages` as changed (pages the guest discarded or reported free: they read as zero
    /// here, not as the base).
    pub fn mark_changed(&mut self, pages: &FreePages) {
        self.changed.union_with(pages);
    }

    /// The image the changes are relative to.
    pub fn base(&self) -> &ImageIdentity {
        &self.base
    }

    /// Every page changed so far (as of the last collection).
    pub fn changed(&self) -> &FreePages {
        &self.changed
    }

    /// The offer of a source leaving on this base: collects the log, checksums up to `samples`
    /// unchanged pages of `memory` (the guest may be running), and drops every sample whose page
    /// the guest wrote meanwhile.
    pub fn offer(&mut self, memory: &GuestMemory, samples: usize) -> Result<BaseOffer> {
        self.collect()?;
        let layout = memory.layout();
        let unchanged = self.changed.pages() - self.changed.count();
        let want = samples.min(MAX_SAMPLES) as u64;
        let mut taken = Vec::new();
        if unchanged > 0 && want > 0 {
            // One page at random from each run of `stride` unchanged pages: spread over the whole
            // image, so wide changes meet a sample wherever they are, and at random within each
            // run, so changes with a period (every 16th page) cannot fall between evenly spaced
            // samples.
            let stride = (unchanged / want).max(1);
            let mut rng = Splitmix(seed());
            let mut pick = rng.next() % stride;
            let mut page = vec![0u8; layout.page_size() as usize];
            for (i, p) in (0..self.changed.pages()).map(PageIndex).filter(|&p| !self.changed.is_free(p)).enumerate() {
                let i = i as u64;
                if i != pick {
                    continue;
                }
                read_page(memory, p, &mut page)?;
                taken.push((p, crc32c::crc32c(&page)));
                if taken.len() as u64 == want {
                    break;
                }
                pick = (i / stride + 1) * stride + rng.next() % stride;
            }
        }
        // A sampled page written while it was read would be refused for no fault of the image.
        let during = self.collect()?;
        taken.retain(|&(p, _)| !during.is_free(p));
        Ok(BaseOffer {
            base: self.base.clone(),
            layout_digest: layout_digest(layout),
            changed: self.changed.clone(),
            samples: taken,
        })
    }

    /// The wrapped log.
    pub fn into_log(self) -> L {
        self.log
    }
}

impl<L: DirtyLog> DirtyLog for ChangeTracker<L> {
    fn collect(&mut self) -> Result<FreePages> {
        let dirty = self.log.collect()?;
        if dirty.pages() != self.changed.pages() {
            return Err(MigrationError::Vmm(format!(
                "a dirty log of {} pages for {}",
                dirty.pages(),
                self.changed.pages()
            )));
        }
        self.changed.union_with(&dirty);
        Ok(dirty)
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// splitmix64: where the samples fall. They guard against accidents (an image written over), not
/// against the destination host itself, which holds the image anyway.
struct Splitmix(u64);

impl Splitmix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn read_page(memory: &GuestMemory, PageIndex(page): PageIndex, out: &mut [u8]) -> Result<()> {
    let layout = memory.layout();
    let bases = layout.region_bases();
    let region = bases.partition_point(|&b| b <= page) - 1;
    let ps = u64::from(layout.page_size());
    Ok(memory.regions()[region].read((page - bases[region]) * ps, out)?)
}

/// A digest of page size and regions: two layouts with one digest are the same layout.
fn layout_digest(layout: &MemoryLayout) -> u32 {
    let mut bytes = layout.page_size().to_le_bytes().to_vec();
    for r in layout.regions() {
        bytes.extend_from_slice(&r.guest_phys_addr.0.to_le_bytes());
        bytes.extend_from_slice(&r.size.to_le_bytes());
    }
    crc32c::crc32c(&bytes)
}

/// What a returning VM's source claims about the image it left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseOffer {
    /// The image the source says the VM left.
    pub base: ImageIdentity,
    /// A digest of the guest's layout (both ends must hold the same).
    pub layout_digest: u32,
    /// Pages that differ from the base.
    pub changed: FreePages,
    /// (page, crc32c of its contents) for pages that do not.
    pub samples: Vec<(PageIndex, u32)>,
}

/// The destination's answer, as the source sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseVerdict {
    /// Only the changed pages move.
    Accepted,
    /// The kept image cannot serve (the reason says why): a full migration follows.
    Refused(String),
}

/// How the destination receives the guest.
#[derive(Debug)]
pub enum Arrival {
    /// Onto its kept image: only `changed` pages are to come.
    Onto {
        /// The kept image, which becomes the guest's memory.
        memory: Arc<GuestMemory>,
        /// The pages that will arrive.
        changed: FreePages,
    },
    /// A full migration into fresh memory. `refused` says why the kept image could not serve
    /// (None: the source had no base to offer); `image` is the kept image, for the host to
    /// keep or drop (it is not the guest's base).
    Full {
        /// Why the kept image was refused, if there was one.
        refused: Option<String>,
        /// The kept image, to keep or drop.
        image: Option<RetainedImage>,
    },
}

/// Source side, before the migration proper: offers `offer` (None: this guest has no base to go
/// back to) and returns the destination's verdict.
pub fn propose(control: &mut dyn ControlStream, offer: Option<&BaseOffer>) -> Result<BaseVerdict> {
    within_deadline(control, |control| {
        let mut msg = vec![BASE_OFFER, u8::from(offer.is_some())];
        if let Some(o) = offer {
            msg.extend_from_slice(&o.base.generation.to_le_bytes());
            msg.extend_from_slice(&o.layout_digest.to_le_bytes());
            msg.extend_from_slice(&o.changed.pages().to_le_bytes());
            msg.extend_from_slice(&(o.samples.len() as u32).to_le_bytes());
            msg.push(o.base.vm_id.len() as u8);
            msg.extend_from_slice(o.base.vm_id.as_bytes());
        }
        write_session(control, &msg)?;
        if let Some(o) = offer {
            let bitmap: Vec<u8> = o.changed.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            handoff::send_stream(control, handoff::STREAM_CHANGED, &bitmap)?;
            let samples: Vec<u8> =
                o.samples.iter().flat_map(|&(p, crc)| p.0.to_le_bytes().into_iter().chain(crc.to_le_bytes())).collect();
            handoff::send_stream(control, handoff::STREAM_SAMPLES, &samples)?;
        }
        let verdict = handoff::read_message(control)?;
        match verdict.split_first() {
            Some((&BASE_VERDICT, [1])) => Ok(BaseVerdict::Accepted),
            Some((&BASE_VERDICT, [0, reason @ ..])) => {
                let why = String::from_utf8_lossy(reason).into_owned();
                tracing::info!(%why, "the destination refused the kept image: the trip runs whole");
                Ok(BaseVerdict::Refused(why))
            }
            _ => Err(MigrationError::Protocol("expected the destination's verdict on the base".into())),
        }
    })
}

/// Destination side, before the migration proper: receives the source's offer for a guest of
/// `layout`, checks it against `image` (what this host kept, if anything) and answers.
pub fn answer(control: &mut dyn ControlStream, image: Option<RetainedImage>, layout: &MemoryLayout) -> Result<Arrival> {
    within_deadline(control, |control| {
        let offer = receive_offer(control, layout.total_pages())?;
        let verdict = match &offer {
            None => Err(None),
            Some(offer) => match &image {
                None => Err(Some("no image of this VM is kept here".to_string())),
                Some(image) => check(offer, image, layout).map_err(Some),
            },
        };
        let msg = match &verdict {
            Ok(()) => vec![BASE_VERDICT, 1],
            Err(reason) => {
                let why = reason.as_deref().unwrap_or("the guest has no base to return to");
                [&[BASE_VERDICT, 0][..], &why.as_bytes()[..why.len().min(1024)]].concat()
            }
        };
        write_session(control, &msg)?;
        Ok(match (verdict, offer, image) {
            (Ok(()), Some(offer), Some(image)) => Arrival::Onto { memory: image.memory, changed: offer.changed },
            (Err(refused), _, image) => Arrival::Full { refused, image },
            _ => unreachable!("an accepted base has an offer and an image"),
        })
    })
}

/// Why `image` cannot be the base `offer` changed, if it cannot.
fn check(offer: &BaseOffer, image: &RetainedImage, layout: &MemoryLayout) -> std::result::Result<(), String> {
    let (ours, theirs) = (&image.identity, &offer.base);
    if ours.vm_id != theirs.vm_id {
        return Err(format!("the image kept here is of VM {:?}, not {:?}", ours.vm_id, theirs.vm_id));
    }
    if ours.generation != theirs.generation {
        return Err(format!(
            "the image kept here is generation {}, the guest's base is generation {}",
            ours.generation, theirs.generation
        ));
    }
    let kept_layout = image.memory.layout();
    if let Some(why) = kept_layout.mismatch(layout) {
        return Err(format!("the kept image's layout differs from the guest's: {why}"));
    }
    if offer.layout_digest != layout_digest(kept_layout) {
        return Err("the source's layout differs from the kept image's".into());
    }
    let mut page = vec![0u8; layout.page_size() as usize];
    for &(p, crc) in &offer.samples {
        read_page(&image.memory, p, &mut page).map_err(|e| e.to_string())?;
        if crc32c::crc32c(&page) != crc {
            return Err(format!("{p} of the kept image differs from the guest's base: it changed since the VM left"));
        }
    }
    Ok(())
}

fn protocol(why: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(why.into())
}

fn receive_offer(control: &mut dyn ControlStream, total_pages: u64) -> Result<Option<BaseOffer>> {
    let msg = handoff::read_message(control)?;
    match msg.as_slice() {
        [BASE_OFFER, 0] => return Ok(None),
        [BASE_OFFER, 1, ..] if msg.len() >= 27 => {}
        _ => return Err(protocol("expected the source's offer of a base")),
    }
    let u64_at = |i: usize| u64::from_le_bytes(msg[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().expect("4 bytes"));
    let generation = u64_at(2);
    let layout_digest = u32_at(10);
    let pages = u64_at(14);
    let samples = u32_at(22) as usize;
    let id_len = msg[26] as usize;
    if pages != total_pages {
        return Err(protocol(format!("an offer for {pages} pages, this guest has {total_pages}")));
    }
    if samples > MAX_SAMPLES {
        return Err(protocol(format!("an offer of {samples} samples (at most {MAX_SAMPLES})")));
    }
    if msg.len() != 27 + id_len {
        return Err(protocol("an offer whose VM id does not fill it"));
    }
    let vm_id = std::str::from_utf8(&msg[27..]).map_err(|_| protocol("a VM id that is not UTF-8"))?;
    let base = ImageIdentity::new(vm_id, generation)?;
    let bitmap = handoff::receive_stream(control, handoff::STREAM_CHANGED, pages.div_ceil(64) as usize * 8)?;
    let words = bitmap.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let changed = FreePages::from_words(words, pages).ok_or_else(|| protocol("changed pages past the end"))?;
    let raw = if samples == 0 {
        Vec::new()
    } else {
        handoff::receive_stream(control, handoff::STREAM_SAMPLES, samples * 12)?
    };
    let mut taken = Vec::with_capacity(samples);
    for s in raw.chunks_exact(12) {
        let page = PageIndex(u64::from_le_bytes(s[..8].try_into().expect("8 bytes")));
        if page.0 >= pages || changed.is_free(page) {
            return Err(protocol(format!("a sample of {page}, which is not an unchanged page of the guest")));
        }
        taken.push((page, u32::from_le_bytes(s[8..].try_into().expect("4 bytes"))));
    }
    Ok(Some(BaseOffer { base, layout_digest, changed, samples: taken }))
}

/// Source side of a post-copy onto an accepted base, before pausing the guest: waits until the
/// destination has dropped the changed pages from its kept image ([`OntoKept::prepare`]), so that
/// work is not part of the downtime.
pub fn await_prepared(control: &mut dyn ControlStream) -> Result<()> {
    within_deadline(control, |control| {
        if handoff::read_message(control)? != [ONTO_PREPARED] {
            return Err(protocol("expected the destination to have prepared its kept image"));
        }
        Ok(())
    })
}

/// Source side of a post-copy onto an accepted base, once the guest is paused: the pages it
/// changed since the offer (collect them from the tracker after the pause). Pre-copy needs no
/// such message: its rounds carry these pages.
pub fn send_last_changes(control: &mut dyn ControlStream, last: &FreePages) -> Result<()> {
    write_session(control, &[LAST_CHANGES])?;
    let bitmap: Vec<u8> = last.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    handoff::send_stream(control, handoff::STREAM_CHANGED, &bitmap)
}

/// Destination side of [`send_last_changes`]: the pages the guest changed since the offer, for a
/// guest of `pages` pages. The guest is paused at the source meanwhile: call it just before
/// [`OntoKept::register`].
pub fn receive_last_changes(control: &mut dyn ControlStream, pages: u64) -> Result<FreePages> {
    within_deadline(control, |control| {
        if handoff::read_message(control)? != [LAST_CHANGES] {
            return Err(protocol("expected the pages changed since the offer"));
        }
        let bitmap = handoff::receive_stream(control, handoff::STREAM_CHANGED, pages.div_ceil(64) as usize * 8)?;
        let words = bitmap.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        FreePages::from_words(words, pages).ok_or_else(|| protocol("changed pages past the end"))
    })
}

/// Runs `exchange` with every read on `control` bounded by [`PEER_DEADLINE`].
fn within_deadline<T>(
    control: &mut dyn ControlStream,
    exchange: impl FnOnce(&mut dyn ControlStream) -> Result<T>,
) -> Result<T> {
    control.set_read_timeout(Some(PEER_DEADLINE)).map_err(TransportError::Io)?;
    let result = exchange(control);
    // Session lanes read without a timeout between the deadlines of their own exchanges, as after
    // the handshake.
    control.set_read_timeout(None).map_err(TransportError::Io)?;
    result
}

/// Drops every page of `memory`, which held a kept image that did not serve as the guest's base:
/// a full post-copy may then register it (registered memory must hold no stale page).
pub fn forget_image(memory: &GuestMemory) -> Result<()> {
    crate::precopy::discard(memory, &FreePages::all(memory.layout().total_pages()))
}

/// A kept image that post-copy will fill, its changed pages already dropped: made while the guest
/// still runs at the source, so that dropping them (one madvise per run, ~30 ms for a quarter of
/// 2 GiB here) is not part of the downtime.
#[derive(Debug)]
pub struct OntoKept {
    memory: Arc<GuestMemory>,
    absent: FreePages,
}

impl OntoKept {
    /// Drops the pages `changed` as of the offer from `memory` (they are to come), then tells the
    /// source, which waits for it ([`await_prepared`]) before it pauses the guest.
    pub fn prepare(control: &mut dyn ControlStream, memory: Arc<GuestMemory>, changed: FreePages) -> Result<Self> {
        crate::precopy::discard(&memory, &changed)?;
        write_session(control, &[ONTO_PREPARED])?;
        Ok(OntoKept { memory, absent: changed })
    }

    /// Once the guest is paused at the source: drops the pages it changed since the offer
    /// (`last`, from [`receive_last_changes`]) too and registers the memory with userfaultfd, every
    /// page present but the changed ones.
    pub fn register(mut self, last: &FreePages) -> Result<ferry_fault_handler::DestinationMemory> {
        let mut newly = last.clone();
        newly.subtract(&self.absent);
        crate::precopy::discard(&self.memory, &newly)?;
        self.absent.union_with(last);
        let absent = self.absent;
        Ok(ferry_fault_handler::DestinationMemory::register_with_valid(self.memory, |p| !absent.is_free(p))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::GuestAddr;
    use ferry_transport::{Backing, RegionLayout};
    use std::os::unix::net::UnixStream;

    /// A dirty log that reports what the test put in it.
    #[derive(Default)]
    struct Scripted(std::collections::VecDeque<FreePages>, u64);

    impl DirtyLog for Scripted {
        fn collect(&mut self) -> Result<FreePages> {
            Ok(self.0.pop_front().unwrap_or_else(|| FreePages::new(self.1)))
        }
    }

    fn layout() -> MemoryLayout {
        MemoryLayout::new(
            4096,
            vec![
                RegionLayout { guest_phys_addr: GuestAddr(0), size: 64 * 4096 },
                RegionLayout { guest_phys_addr: GuestAddr(1 << 30), size: 64 * 4096 },
            ],
        )
        .unwrap()
    }

    fn filled() -> Arc<GuestMemory> {
        let m = GuestMemory::create(layout(), Backing::Anonymous).unwrap();
        for p in 0..128u64 {
            let (r, off) = ((p / 64) as usize, (p % 64) * 4096);
            m.regions()[r].write(off, &[p as u8 + 1; 4096]).unwrap();
        }
        Arc::new(m)
    }

    fn copy(from: &GuestMemory) -> Arc<GuestMemory> {
        let m = GuestMemory::create(layout(), Backing::Anonymous).unwrap();
        let mut buf = vec![0u8; 64 * 4096];
        for r in 0..2 {
            from.regions()[r].read(0, &mut buf).unwrap();
            m.regions()[r].write(0, &buf).unwrap();
        }
        Arc::new(m)
    }

    /// Runs propose with `offer` against answer with `image`; returns both sides' results.
    fn negotiate(offer: Option<BaseOffer>, image: Option<RetainedImage>) -> (BaseVerdict, Arrival) {
        let (mut s, mut d) = UnixStream::pair().unwrap();
        let source = std::thread::spawn(move || propose(&mut s, offer.as_ref()).unwrap());
        let arrival = answer(&mut d, image, &layout()).unwrap();
        (source.join().unwrap(), arrival)
    }

    fn tracker(guest: &GuestMemory, written: &[u64]) -> ChangeTracker<Scripted> {
        let mut dirty = FreePages::new(128);
        for &p in written {
            dirty.set(PageIndex(p));
            let (r, off) = ((p / 64) as usize, (p % 64) * 4096);
            guest.regions()[r].write(off, &[0xee; 4096]).unwrap();
        }
        let id = ImageIdentity::new("vm-1", 3).unwrap();
        ChangeTracker::start(id, Scripted([dirty].into(), 128), 128).unwrap()
    }

    #[test]
    fn a_matching_image_is_accepted_and_only_the_changed_pages_are_to_come() {
        let kept = filled();
        let guest = copy(&kept);
        let mut t = tracker(&guest, &[5, 70]);
        let offer = t.offer(&guest, 64).unwrap();
        assert_eq!(offer.samples.len(), 64);
        let image = RetainedImage::keep(kept, ImageIdentity::new("vm-1", 3).unwrap());
        let (verdict, arrival) = negotiate(Some(offer), Some(image));
        assert_eq!(verdict, BaseVerdict::Accepted);
        let Arrival::Onto { changed, .. } = arrival else { panic!("{arrival:?}") };
        assert_eq!(changed.runs(), vec![(PageIndex(5), 1), (PageIndex(70), 1)]);
    }

    #[test]
    fn an_image_of_another_generation_vm_or_contents_is_refused_with_the_reason() {
        let kept = filled();
        let guest = copy(&kept);
        let offer = tracker(&guest, &[5]).offer(&guest, 128).unwrap();
        let cases: Vec<(&str, RetainedImage)> = vec![
            ("generation 2", RetainedImage::keep(kept.clone(), ImageIdentity::new("vm-1", 2).unwrap())),
            ("not \"vm-1\"", RetainedImage::keep(kept.clone(), ImageIdentity::new("vm-2", 3).unwrap())),
            ("changed since the VM left", {
                let tampered = copy(&kept);
                // One page in 8 written: some sample meets one.
                for p in (0..128u64).step_by(8) {
                    tampered.regions()[(p / 64) as usize].write((p % 64) * 4096 + 100, &[0x55]).unwrap();
                }
                RetainedImage::keep(tampered, ImageIdentity::new("vm-1", 3).unwrap())
            }),
        ];
        for (why, image) in cases {
            let (verdict, arrival) = negotiate(Some(offer.clone()), Some(image));
            assert!(matches!(&verdict, BaseVerdict::Refused(r) if r.contains(why)), "{why}: {verdict:?}");
            assert!(matches!(arrival, Arrival::Full { refused: Some(_), image: Some(_) }), "{why}");
        }
        let (verdict, arrival) = negotiate(Some(offer), None);
        assert!(matches!(verdict, BaseVerdict::Refused(ref r) if r.contains("no image")), "{verdict:?}");
        assert!(matches!(arrival, Arrival::Full { image: None, .. }));
        let (verdict, arrival) =
            negotiate(None, Some(RetainedImage::keep(kept, ImageIdentity::new("vm-1", 3).unwrap())));
        assert!(matches!(verdict, BaseVerdict::Refused(_)));
        assert!(matches!(arrival, Arrival::Full { refused: None, image: Some(_) }));
    }

    #[test]
    fn a_memfd_kept_image_reads_zero_where_it_changed_once_prepared() {
        // A changed page that arrives as zero is settled with nothing installed: the file must not
        // still hold the old contents for the mapping to find again.
        let kept = Arc::new(GuestMemory::create(layout(), Backing::Memfd).unwrap());
        kept.regions()[1].write(3 * 4096, &[0x77; 4096]).unwrap();
        let (mut control, _peer) = UnixStream::pair().unwrap();
        let mut changed = FreePages::new(128);
        changed.set(PageIndex(64 + 3));
        OntoKept::prepare(&mut control, kept.clone(), changed).unwrap();
        let mut page = [0xffu8; 4096];
        kept.regions()[1].read(3 * 4096, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "the old contents came back");
    }

    #[test]
    fn samples_fall_at_random_within_their_stretch_not_at_a_period() {
        // 128 unchanged pages, 32 samples: one in each stretch of 4. Evenly spaced samples would
        // all share one position in their stretch, and miss an image written every 4th page 3
        // times in 4.
        let guest = filled();
        let offer = tracker(&guest, &[]).offer(&guest, 32).unwrap();
        assert_eq!(offer.samples.len(), 32);
        for (i, &(p, _)) in offer.samples.iter().enumerate() {
            assert_eq!(p.0 / 4, i as u64, "sample {i} at {p}: one per stretch");
        }
        let positions: std::collections::HashSet<u64> = offer.samples.iter().map(|&(p, _)| p.0 % 4).collect();
        assert!(positions.len() > 1, "every sample at position {positions:?} of its stretch");
    }

    #[test]
    fn a_sample_written_while_the_offer_is_made_is_dropped_and_counted_as_changed() {
        let kept = filled();
        let guest = copy(&kept);
        let mut during = FreePages::new(128);
        for p in 0..128 {
            during.set(PageIndex(p));
        }
        let id = ImageIdentity::new("vm-1", 3).unwrap();
        // The second collection (after the checksums) says every page was written meanwhile.
        let mut t =
            ChangeTracker::start(id, Scripted([FreePages::new(128), FreePages::new(128), during].into(), 128), 128)
                .unwrap();
        let offer = t.offer(&guest, 16).unwrap();
        assert!(offer.samples.is_empty());
        assert_eq!(offer.changed.count(), 128);
    }

    #[test]
    fn hostile_offers_are_protocol_errors() {
        let header = |pages: u64, samples: u32, id: &[u8], id_len: u8| {
            let mut m = vec![BASE_OFFER, 1];
            m.extend_from_slice(&1u64.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&pages.to_le_bytes());
            m.extend_from_slice(&samples.to_le_bytes());
            m.push(id_len);
            m.extend_from_slice(id);
            m
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("other page count", header(127, 0, b"vm", 2)),
            ("too many samples", header(128, MAX_SAMPLES as u32 + 1, b"vm", 2)),
            ("id length lies", header(128, 0, b"vm", 9)),
            ("empty id", header(128, 0, b"", 0)),
            ("truncated", vec![BASE_OFFER, 1, 0]),
            ("not an offer", vec![BASE_VERDICT, 1]),
        ];
        for (what, msg) in cases {
            let (mut s, mut d) = UnixStream::pair().unwrap();
            write_session(&mut s, &msg).unwrap();
            let err = answer(&mut d, None, &layout()).unwrap_err();
            assert!(matches!(err, MigrationError::Protocol(_)), "{what}: {err:?}");
        }
        // A sample naming a changed page is a lie about the offer.
        let (mut s, mut d) = UnixStream::pair().unwrap();
        let mut changed = FreePages::new(128);
        changed.set(PageIndex(9));
        let offer = BaseOffer {
            base: ImageIdentity::new("vm", 1).unwrap(),
            layout_digest: 0,
            changed,
            samples: vec![(PageIndex(9), 0)],
        };
        let source = std::thread::spawn(move || {
            let _ = propose(&mut s, Some(&offer));
        });
        let err = answer(&mut d, None, &layout()).unwrap_err();
        assert!(matches!(err, MigrationError::Protocol(ref why) if why.contains("page 9")), "{err:?}");
        // No verdict comes: the source sees the destination go.
        drop(d);
        source.join().unwrap();
    }
}
