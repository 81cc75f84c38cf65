//! Snapshots in ferry's own image format ([`ferry_transport::snapshot`]): a paused guest saved
//! with its state blob and free pages, and restored either eagerly (every page read before the
//! guest runs) or lazily: post-copy from a file, the [`PostcopyEngine`] running over the image's
//! io_uring lanes while the guest runs at once. A lazy restore can record the order of the guest's
//! first faults (its working set) and the next restore fetch that set first ([`WorkingSet`],
//! after REAP, ASPLOS'21).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_fault_handler::DestinationMemory;
use ferry_prepager::PolicyKind;
use ferry_transport::snapshot::{write_snapshot, SnapshotImage, WriteStats};
use ferry_transport::{GuestMemory, PageIndex};

use crate::engine::{DestinationReport, EngineConfig, PostcopyEngine};
use crate::error::{MigrationError, Result};
use crate::freepages::FreePages;

/// Bulk reads in flight on an image's ring.
const IMAGE_BULK_DEPTH: usize = 32;

/// Saves a paused guest: `memory` (free pages neither read nor stored) and the VMM's `state`.
pub fn save(path: impl AsRef<Path>, memory: &GuestMemory, state: &[u8], free: &FreePages) -> Result<WriteStats> {
    if free.pages() != 0 && free.pages() != memory.layout().total_pages() {
        return Err(MigrationError::Protocol(format!(
            "a free-page map of {} pages for a guest of {}",
            free.pages(),
            memory.layout().total_pages()
        )));
    }
    let is_free = |p: PageIndex| free.pages() != 0 && free.is_free(p);
    Ok(write_snapshot(path, memory, state, &is_free)?)
}

/// The pages an image restores as zero: never read, claimed before the guest runs.
fn zero_pages(image: &SnapshotImage) -> Result<FreePages> {
    let pages = image.layout().total_pages();
    FreePages::from_words(image.zero_map(), pages)
        .ok_or_else(|| MigrationError::Protocol("the image's zero map does not fit its layout".into()))
}

/// What an eager restore did.
#[derive(Clone, Debug, Default)]
pub struct EagerReport {
    /// Pages read from the image.
    pub pages_read: u64,
    /// How long the restore took.
    pub took: Duration,
}

/// Reads every non-zero page of `image` into `memory` (fresh, untouched memory of the image's
/// layout) through the image's bulk lane. The guest may resume with [`SnapshotImage::state`] after.
pub fn restore_eager(image: &Arc<SnapshotImage>, memory: &GuestMemory) -> Result<EagerReport> {
    let t0 = Instant::now();
    if let Some(why) = memory.layout().mismatch(image.layout()) {
        return Err(MigrationError::Transport(ferry_transport::TransportError::LayoutMismatch(why)));
    }
    let mut wanted = zero_pages(image)?;
    wanted.invert();
    let mut source = image.page_source(IMAGE_BULK_DEPTH)?;
    let pages_read = crate::precopy::pull(memory, &mut source, &wanted)?;
    Ok(EagerReport { pages_read, took: t0.elapsed() })
}

/// A lazy restore in progress: the guest runs while the engine brings its memory in from the image.
#[derive(Debug)]
pub struct LazyRestore {
    engine: PostcopyEngine,
    resume_latency: Duration,
}

impl LazyRestore {
    /// Starts the engine over `image` (its zero pages claimed, never read), calls `resume` with
    /// the image's state blob (the VMM loads it and starts its vCPUs), then starts pre-paging.
    /// `memory` must be registered, untouched, and of the image's layout.
    pub fn start(
        image: &Arc<SnapshotImage>,
        memory: Arc<DestinationMemory>,
        config: &EngineConfig,
        resume: impl FnOnce(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        if let Some(why) = memory.guest().layout().mismatch(image.layout()) {
            return Err(MigrationError::Transport(ferry_transport::TransportError::LayoutMismatch(why)));
        }
        let zero = zero_pages(image)?;
        let mut engine = PostcopyEngine::start(memory, image.page_source(IMAGE_BULK_DEPTH)?, config, &zero)?;
        resume(image.state()).map_err(MigrationError::Resume)?;
        let resume_latency = t0.elapsed();
        engine.start_prepaging()?;
        Ok(LazyRestore { engine, resume_latency })
    }

    /// From the call to `start` to the guest running.
    pub fn resume_latency(&self) -> Duration {
        self.resume_latency
    }

    /// The engine behind this restore: its memory, counters, control (cancel), failure watch, and
    /// `finish` (which only a `demand` restore needs to complete).
    pub fn engine(&self) -> &PostcopyEngine {
        &self.engine
    }

    /// Waits until every page is in and reports; the report's `first_faults` is the working set
    /// when the engine was configured to record it.
    pub fn wait(self) -> Result<DestinationReport> {
        let mut report = self.engine.wait()?;
        report.resume_latency = self.resume_latency;
        Ok(report)
    }
}

/// The pages a guest touched first after a restore, in order: what the next restore of the same
/// image fetches before anything else. Stored beside the image (`IMAGE.ws`): magic, version,
/// count, the pages, crc32c.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// The pages, in the order the guest first touched them.
    pub pages: Vec<PageIndex>,
}

const WS_MAGIC: &[u8; 8] = b"FRRYWSET";
const WS_VERSION: u32 = 1;
/// Most pages a working-set file may list (bounds what reading one allocates).
pub const MAX_WORKING_SET_PAGES: u64 = 1 << 26;

impl WorkingSet {
    /// Where the working set of `image` lives.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".ws");
        PathBuf::from(p)
    }

    /// Writes the working set to `path` (checksummed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(24 + self.pages.len() * 8);
        out.extend_from_slice(WS_MAGIC);
        out.extend_from_slice(&WS_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&p.0.to_le_bytes());
        }
        out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
        // Written aside and renamed: a crash leaves the old set or the new one, never half.
        let tmp = path.with_extension("ws.tmp");
        std::fs::write(&tmp, &out).map_err(ferry_transport::TransportError::from)?;
        std::fs::rename(&tmp, path).map_err(ferry_transport::TransportError::from)?;
        Ok(())
    }

    /// Reads a working set for a guest of `total_pages`; every page must lie inside it.
    pub fn load(path: &Path, total_pages: u64) -> Result<Self> {
        let bad = |why: &str| MigrationError::Protocol(format!("working set {}: {why}", path.display()));
        let bytes = std::fs::read(path).map_err(ferry_transport::TransportError::from)?;
        if bytes.len() < 24 || &bytes[..8] != WS_MAGIC {
            return Err(bad("not a working-set file"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != WS_VERSION {
            return Err(bad(&format!("version {version}, this build reads {WS_VERSION}")));
        }
        let count = u64::from_le_bytes(body[12..20].try_into().expect("8 bytes"));
        if count > MAX_WORKING_SET_PAGES || body.len() as u64 != 20 + count * 8 {
            return Err(bad("its length does not match its count"));
        }
        let pages: Vec<PageIndex> =
            body[20..].chunks_exact(8).map(|c| PageIndex(u64::from_le_bytes(c.try_into().expect("8 bytes")))).collect();
        if let Some(p) = pages.iter().find(|p| p.0 >= total_pages) {
            return Err(bad(&format!("{p} outside a guest of {total_pages} pages")));
        }
        Ok(WorkingSet { pages })
    }

    /// The engine configuration that replays this set first, then goes on with `then`.
    pub fn replay_config(&self, then: PolicyKind, base: &EngineConfig) -> EngineConfig {
        EngineConfig { policy: then, replay: Some(Arc::new(self.pages.clone())), ..base.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_sets_round_trip_and_hostile_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-ws-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image.ws");
        let ws = WorkingSet { pages: [5, 6, 7, 100, 3].map(PageIndex).to_vec() };
        ws.save(&path).unwrap();
        assert_eq!(WorkingSet::load(&path, 101).unwrap(), ws);
        assert!(WorkingSet::load(&path, 100).is_err(), "page 100 outside a guest of 100 pages");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[25] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(WorkingSet::load(&path, 101).is_err(), "checksum");
        std::fs::write(&path, b"FRRYWSET").unwrap();
        assert!(WorkingSet::load(&path, 101).is_err(), "truncated");
        assert_eq!(WorkingSet::path_for(Path::new("/x/snap.img")), Path::new("/x/snap.img.ws"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
