//! Post-copy that survives its destination: the reference VMM's side of ferry's reverse
//! checkpoints. At the destination, a [`VmCapture`] pauses the vCPUs at the gate, reads KVM's dirty
//! log and cuts the held output into the epoch; at the source, [`restart`] brings the guest back
//! from the image it kept, with the last epoch applied, once it holds the lease.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry::arbiter::{LeaseFile, LeaseTerms};
use ferry::checkpoint::{CheckpointCapture, CheckpointConfig, KeptImage};
use ferry::Protection;

use crate::output::Held;
use crate::vm::{KvmDirtyLog, Telemetry, VcpuState, Vm};

/// How long a checkpoint waits for every vCPU to reach the gate before it skips the epoch (a vCPU
/// waiting for a page while a lane recovers cannot stop).
const PAUSE_TIMEOUT: Duration = Duration::from_millis(200);

/// What a reverse checkpoint's state blob holds: the vCPUs and the output held at the pause.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CheckpointBlob {
    pub vcpus: Vec<VcpuState>,
    pub held_output: Vec<Held>,
}

/// A destination VM's consistent capture.
pub struct VmCapture {
    telemetry: Arc<Telemetry>,
    vcpus: usize,
    dirty: KvmDirtyLog,
}

impl VmCapture {
    /// A capture of the VM whose vCPUs report to `telemetry`, writes logged by `dirty`.
    pub fn new(telemetry: Arc<Telemetry>, vcpus: usize, dirty: KvmDirtyLog) -> Self {
        VmCapture { telemetry, vcpus, dirty }
    }
}

impl CheckpointCapture for VmCapture {
    fn pause(&mut self, epoch: u64) -> std::result::Result<Vec<u8>, String> {
        let vcpus = self.telemetry.gate.pause(self.vcpus, PAUSE_TIMEOUT).map_err(|e| e.to_string())?;
        let held_output = self.telemetry.output.cut(epoch);
        serde_json::to_vec(&CheckpointBlob { vcpus, held_output }).map_err(|e| e.to_string())
    }

    fn dirty(&mut self) -> std::result::Result<ferry::FreePages, String> {
        use ferry::precopy::DirtyLog;
        self.dirty.collect().map_err(|e| e.to_string())
    }

    fn resume(&mut self) -> std::result::Result<(), String> {
        self.telemetry.gate.resume();
        Ok(())
    }

    fn committed(&mut self, epoch: u64) {
        self.telemetry.output.commit(epoch);
        if epoch == u64::MAX {
            // No more epochs: stop paying for the log (on shadow paging, a fault per first write).
            if let Err(e) = self.dirty.stop() {
                eprintln!("ferry-vmm: turning KVM's dirty log off: {e:#}");
            }
        }
    }
}

/// The arbiter of a VM: its key on the etcd cluster of `--etcd`, or a lease file named after it
/// in `--lease-dir`.
pub fn lease_terms(a: &crate::Args, vm_id: &str, holder: String) -> Result<LeaseTerms> {
    let arbiter: Arc<dyn ferry::arbiter::Arbiter> = match &a.etcd {
        #[cfg(feature = "etcd")]
        Some(endpoint) => Arc::new(ferry::arbiter::EtcdArbiter::connect(
            &[endpoint.as_str()],
            &format!("/ferry/lease/{vm_id}"),
            Duration::from_secs(2),
        )?),
        #[cfg(not(feature = "etcd"))]
        Some(_) => anyhow::bail!("--etcd: this ferry-vmm was built without the etcd feature"),
        None => {
            let path: PathBuf = a.lease_dir.join(format!("ferry-lease-{vm_id}"));
            Arc::new(LeaseFile::new(path, Duration::ZERO))
        }
    };
    Ok(LeaseTerms { arbiter, holder, ttl: Duration::from_secs(2), clock_skew: Duration::ZERO })
}

/// A VM id from an unauthenticated peer names a file: letters, digits and '-' only.
pub fn check_vm_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        anyhow::bail!("VM id {id:?}: 1-64 letters, digits or '-'");
    }
    Ok(())
}

/// Protection for a destination VM: call before the guest resumes (KVM's dirty log and output
/// holding must start with it).
pub fn protection(vm: &Vm, period: Duration, lease: Option<LeaseTerms>) -> Result<Protection> {
    let dirty = vm.dirty_log()?;
    vm.telemetry.output.hold();
    let telemetry = vm.telemetry.clone();
    let halt = {
        let telemetry = vm.telemetry.clone();
        Box::new(move || {
            // The vCPUs leave at their next exits; one waiting for a page never runs again.
            telemetry.output.halt();
            telemetry.stop.store(true, Ordering::Release);
            telemetry.gate.resume();
        })
    };
    Ok(Protection {
        capture: Box::new(VmCapture::new(telemetry, vm.vcpu_count(), dirty)),
        checkpoints: CheckpointConfig { period, ..CheckpointConfig::default() },
        lease,
        halt,
    })
}

/// Brings the guest back on the source: memory already holds the last epoch (or is as it was
/// handed over), the vCPUs take that epoch's state, and the output it held is released again.
/// The caller holds the lease. Returns the epoch restarted from.
pub fn restart(source: &mut Vm, kept: &KeptImage, handoff: &[u8]) -> Result<Option<u64>> {
    let (epoch, state) = kept.restart_state(handoff);
    match epoch {
        Some(_) => {
            let blob: CheckpointBlob = serde_json::from_slice(&state).context("the checkpoint's state blob")?;
            source.restore_states(&blob.vcpus)?;
            source.telemetry.output.release_again(&blob.held_output);
        }
        None => source.restore(&state).map_err(|e| anyhow!("the handoff's state blob: {e}"))?,
    }
    Ok(epoch)
}
