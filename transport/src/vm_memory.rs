//! Guest memory from rust-vmm's `vm-memory` (feature `vm-memory`): a VMM built on the rust-vmm
//! crates (Firecracker, Cloud Hypervisor, crosvm-style projects) hands its `GuestMemoryMmap` to
//! ferry as it is, each region adopted in place, with its backing file when it maps one from
//! offset 0 (which the local transport and zero-copy installs need).

use crate::addr::GuestAddr;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::{GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Result, TransportError};
use crate::layout::{MemoryLayout, RegionLayout};
use crate::memory::{GuestMemory, RegionMapping};

impl GuestMemory {
    /// Adopts every region of `memory` with pages of `page_size` bytes. The regions stay mapped as
    /// long as the returned value lives (it holds a clone of `memory`, whose regions are shared,
    /// not copied), so this is safe.
    pub fn from_vm_memory(memory: &GuestMemoryMmap, page_size: u32) -> Result<Self> {
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(memory.clone());
        let mut layout = Vec::new();
        let mut regions = Vec::new();
        for region in memory.iter() {
            let len = region.len() as usize;
            let ptr = NonNull::new(region.as_ptr())
                .ok_or_else(|| TransportError::InvalidLayout("a vm-memory region at address 0".into()))?;
            let fd = match region.file_offset() {
                Some(f) if f.start() == 0 => Some(OwnedFd::from(f.file().try_clone()?)),
                _ => None,
            };
            let writable = region.prot() & libc::PROT_WRITE != 0;
            layout.push(RegionLayout { guest_phys_addr: GuestAddr(region.start_addr().0), size: len as u64 });
            // SAFETY: `region` is a live mapping of `len` bytes at `ptr` (readable, and writable
            // when its protection says so); vm-memory never remaps a region, and `owner` keeps
            // it mapped for as long as the RegionMapping lives. The fd backs it from offset 0.
            regions.push(unsafe { RegionMapping::adopt_owned(ptr, len, fd, writable, owner.clone()) });
        }
        GuestMemory::new(MemoryLayout::new(page_size, layout)?, regions)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn regions_are_adopted_in_place_and_outlive_the_vmm_handle() {
        let vmm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 2 << 20)])
            .unwrap();
        vmm.write_slice(b"written by the VMM", GuestAddress((1 << 32) + 4096)).unwrap();
        let ours = GuestMemory::from_vm_memory(&vmm, 4096).unwrap();
        drop(vmm);
        assert_eq!(ours.layout().regions().len(), 2);
        assert_eq!(ours.layout().regions()[1].guest_phys_addr, GuestAddr(1 << 32));
        let mut buf = [0u8; 18];
        ours.regions()[1].read(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"written by the VMM", "the same memory, still mapped after the VMM's handle went");
        assert!(GuestMemory::from_vm_memory(&GuestMemoryMmap::default(), 4096).is_err(), "no regions: no layout");
    }
}
