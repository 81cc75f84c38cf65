//! The bulk-install driver: claimed runs go out on a bulk lane and come back installed. Reads land
//! straight in the guest's page cache where the memory allows it (continue mode), otherwise in
//! buffers the lane hands out, kept in a small pool for reuse. What to fetch is the pre-pager's
//! business; this only moves and installs what it is given.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_transport::{BulkLane, BulkRead, BulkTarget, PageBuf};

use crate::error::{FaultError, Result};
use crate::install::DestinationMemory;
use crate::state::Claim;
use crate::stats::FaultStats;

/// One bulk read that completed and is now installed.
#[derive(Debug)]
pub struct Installed {
    /// Pages the read installed.
    pub pages: u32,
    /// Bytes it moved.
    pub bytes: u64,
    /// Lane time this read accounts for: since the previous completion, or since the lane went
    /// from idle to busy. The pre-pager sizes its runs from it.
    pub lane_time: Duration,
}

/// Keeps a bulk lane busy with claimed runs and installs them as they complete.
pub struct BulkInstaller {
    lane: Box<dyn BulkLane>,
    in_flight: HashMap<u64, Claim>,
    pool: Vec<PageBuf>,
    next_tag: u64,
    max_run_bytes: usize,
    last_completion: Instant,
}

impl std::fmt::Debug for BulkInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkInstaller").field("in_flight", &self.in_flight.len()).finish_non_exhaustive()
    }
}

impl BulkInstaller {
    /// `max_run_bytes` bounds the buffers kept: at most the lane's depth of them, each this long.
    pub fn new(lane: Box<dyn BulkLane>, max_run_bytes: usize) -> Self {
        BulkInstaller {
            lane,
            in_flight: HashMap::new(),
            pool: Vec::new(),
            next_tag: 0,
            max_run_bytes,
            last_completion: Instant::now(),
        }
    }

    /// Whether another read fits on the lane now.
    pub fn has_room(&self) -> bool {
        self.lane.in_flight() < self.lane.depth()
    }

    /// Reads submitted and not yet installed.
    pub fn in_flight(&self) -> usize {
        self.lane.in_flight()
    }

    /// Starts reading `claim`, which must belong to `memory` and be at most `max_run_bytes` long.
    /// If the lane fails, the claim is kept with those in flight, for [`Self::replace_lane`].
    pub fn submit(&mut self, memory: &DestinationMemory, claim: Claim) -> Result<()> {
        let bytes = claim.count() as usize * memory.page_size() as usize;
        if bytes > self.max_run_bytes {
            return Err(FaultError::InvalidMemory(format!(
                "a bulk run of {bytes} bytes, more than the {} the installer was made for",
                self.max_run_bytes
            )));
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        self.in_flight.insert(tag, claim);
        self.send(memory, tag)
    }

    /// Puts the read of in-flight claim `tag` on the lane.
    fn send(&mut self, memory: &DestinationMemory, tag: u64) -> Result<()> {
        let claim = self.in_flight.get(&tag).expect("a claim in flight");
        let bytes = claim.count() as usize * memory.page_size() as usize;
        let buf = match memory.mapped_target(claim) {
            Some(target) => target,
            None => match self.pool.iter().position(|b| b.len() >= bytes) {
                Some(i) => self.pool.swap_remove(i).into(),
                None => self.lane.buffer(bytes.next_power_of_two().min(self.max_run_bytes))?.into(),
            },
        };
        if self.lane.in_flight() == 0 {
            self.last_completion = Instant::now();
        }
        let run = memory.states().to_run(claim);
        self.lane.submit(BulkRead { run, buf, tag })?;
        Ok(())
    }

    /// Swaps in a reopened lane after the old one broke, and asks again, in their order, for every
    /// read that was in flight on it (their claims never left this installer, so each page is
    /// still installed once). Each page asked again counts in `stats.resent_pages` as it is,
    /// also when the new lane breaks before the rest are.
    pub fn replace_lane(
        &mut self,
        memory: &DestinationMemory,
        lane: Box<dyn BulkLane>,
        stats: &FaultStats,
    ) -> Result<()> {
        // The old lane goes first: its buffers and any read it still had land nowhere after this.
        drop(std::mem::replace(&mut self.lane, lane));
        let mut tags: Vec<u64> = self.in_flight.keys().copied().collect();
        tags.sort_unstable();
        for tag in tags {
            FaultStats::add(&stats.resent_pages, u64::from(self.in_flight[&tag].count()));
            self.send(memory, tag)?;
        }
        self.last_completion = Instant::now();
        Ok(())
    }

    /// Waits for one read and installs it; `None` when nothing is in flight.
    pub fn complete(&mut self, memory: &DestinationMemory, stats: &FaultStats) -> Result<Option<Installed>> {
        let Some(done) = self.lane.complete()? else {
            return if self.in_flight.is_empty() {
                Ok(None)
            } else {
                Err(FaultError::Lane(format!("the bulk lane lost {} reads", self.in_flight.len())))
            };
        };
        let claim =
            self.in_flight.remove(&done.tag).ok_or_else(|| FaultError::Lane("a bulk completion for no read".into()))?;
        // The fault thread takes in the remove that makes the kernel answer EAGAIN; wait for it.
        let deadline = Instant::now() + crate::handler::BUSY_DEADLINE;
        loop {
            let installed = match &done.buf {
                BulkTarget::Mapped(_) => memory.map_filled(&claim, &done.zero, stats),
                BulkTarget::Buffer(buf) => memory.install(&claim, buf, &done.zero, stats),
            };
            match installed {
                Err(FaultError::Busy { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                other => break other?,
            }
        }
        if let BulkTarget::Buffer(buf) = done.buf {
            self.pool.push(buf);
        }
        FaultStats::add(&stats.bulk_pages, u64::from(claim.count()));
        let now = Instant::now();
        let lane_time = now - self.last_completion;
        self.last_completion = now;
        Ok(Some(Installed { pages: claim.count(), bytes: u64::from(claim.count()) * memory.page_size(), lane_time }))
    }
}
