//! Dirty tracking of guest memory, ready for live migration: one list of written
//! pages from KVM's dirty log (the vCPU), the DMA core's log (in-process devices and
//! message-mode device processes) and each device process's own log.

use crate::error::{Error, Result};
use crate::vm::Vm;

impl Vm {
    /// Dirty tracking on (what live migration needs): KVM logs the vCPU's writes to
    /// RAM (its slots get KVM_MEM_LOG_DIRTY_PAGES), the DMA core logs every write made
    /// through a `DmaSpace` (in-process devices, and device processes' writes by
    /// message), and each device process logs its own in-place writes (vfio-user DMA
    /// dirty logging). [`Vm::dirty_take`] merges the three.
    pub fn dirty_start(&self) -> Result<()> {
        for r in self.memory_map.regions() {
            if r.kind == vm_api::RegionKind::Ram && !r.flags.log_dirty {
                self.memory_map
                    .set_flags(r.gpa, vm_api::RegionFlags { log_dirty: true, ..r.flags })
                    .map_err(Error::Memory)?;
            }
        }
        let _ = self.dma.dirty().take();
        for d in self.devices() {
            d.function().dirty_start().map_err(|e| Error::Device(d.name().to_string(), e))?;
        }
        Ok(())
    }

    /// Dirty tracking off.
    pub fn dirty_stop(&self) -> Result<()> {
        // Every source is stopped; the first device that refused is reported.
        let mut refused = None;
        for d in self.devices() {
            if let Err(e) = d.function().dirty_stop() {
                refused.get_or_insert(Error::Device(d.name().to_string(), e));
            }
        }
        for r in self.memory_map.regions() {
            if r.kind == vm_api::RegionKind::Ram && r.flags.log_dirty {
                self.memory_map
                    .set_flags(r.gpa, vm_api::RegionFlags { log_dirty: false, ..r.flags })
                    .map_err(Error::Memory)?;
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// The guest-physical pages (4 KiB) written since dirty tracking started or the
    /// last call, by anyone: the vCPU, in-process devices, device processes. One sorted
    /// list per VM; every source clears what it reports.
    pub fn dirty_take(&self) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        if let Some(kvm) = &self.kvm {
            let regions = self.memory_map.regions();
            for (gpa, slot, flags) in self.slots.slots() {
                let Some(r) = regions.iter().find(|r| r.gpa == gpa) else { continue };
                if !flags.log_dirty {
                    continue;
                }
                let size = usize::try_from(r.size).map_err(|_| Error::Memory("slot too large".into()))?;
                let bits = kvm.vm().get_dirty_log(slot, size).map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))?;
                dma::pages_of_bits(gpa, &bits, r.size.div_ceil(4096), &mut pages);
            }
        }
        pages.extend(self.dma.dirty().take());
        for d in self.devices() {
            d.function().dirty_take(&mut pages).map_err(|e| Error::Device(d.name().to_string(), e))?;
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}
