//! Guest memory as the VMM reaches it: RAM hot-added and removed, the VMM's own reads
//! and writes (a dump, a snapshot: flushed where flagged non-coherent), the qtest and
//! vCPU dispatch's physical accesses, and the memory type the guest gets in each
//! region.

use crate::error::{Error, Result};
use crate::vm::{NonCoherentReads, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

impl Vm {
    /// Hot-adds `size` bytes of RAM at `gpa` (its own memfd): KVM slots, device DMA and
    /// the identity front-end follow. The guest is not told (no ACPI); it must know.
    pub fn add_ram(&self, gpa: u64, size: u64) -> Result<()> {
        let r = crate::memory::hot_ram(gpa, size)?;
        self.memory_map.add_region(r)?;
        Ok(())
    }

    /// Hot-removes the RAM region starting at `gpa` (only RAM added with
    /// [`Vm::add_ram`]: the boot RAM stays). Devices lose it before this returns.
    pub fn remove_ram(&self, gpa: u64) -> Result<()> {
        let boot = self.ram.regions().iter().any(|r| r.gpa == gpa);
        let ram = self.memory_map.regions().iter().any(|r| r.gpa == gpa && r.kind == vm_api::RegionKind::Ram);
        if boot || !ram {
            return Err(Error::Memory(format!("no hot-added RAM starts at {gpa:#x}")));
        }
        self.memory_map.remove_region(gpa);
        Ok(())
    }

    /// Reads guest memory (RAM or device memory in the memory map) for the VMM itself:
    /// a dump, a snapshot. Memory flagged non-coherent is flushed from the CPU caches
    /// first (exactly the flagged bytes read), or the read is refused under
    /// `NonCoherentReads::Refuse` while a non-coherent device is attached. Fails if a
    /// byte is in no region.
    pub fn read_memory_for_host(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let nc = self.devices.noncoherent().count();
        if nc > 0 && self.noncoherent_reads == NonCoherentReads::Refuse {
            return Err(Error::Memory(format!(
                "{nc} non-coherent device(s) attached ({}): reading guest memory is refused \
                 (--noncoherent-migration refuse); use --noncoherent-migration flush",
                self.devices.noncoherent().devices().join(", ")
            )));
        }
        self.host_access(gpa, buf.len(), |host, off, len, flagged| {
            // SAFETY: `host` is valid for `len` bytes (a region of the memory map, held
            // alive by the caller for the duration).
            if flagged && !unsafe { crate::flush::flush_range(host, len, None) } {
                return Err(Error::Memory("this CPU cannot flush caches (no CLFLUSH)".into()));
            }
            // SAFETY: as above; the buffer range is inside `buf`.
            let s = unsafe { vm_memory::VolatileSlice::new(host as *mut u8, len) };
            s.copy_to(&mut buf[off..off + len]);
            Ok(())
        })
    }

    /// Writes guest memory for the VMM itself (a restore); memory flagged non-coherent
    /// is flushed after the write, so a non-snooping device reads the new bytes.
    pub fn write_memory_for_host(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.host_access(gpa, data.len(), |host, off, len, flagged| {
            // SAFETY: `host` is valid for `len` bytes (a region held alive by the caller).
            let s = unsafe { vm_memory::VolatileSlice::new(host as *mut u8, len) };
            s.copy_from(&data[off..off + len]);
            // SAFETY: as above.
            if flagged && !unsafe { crate::flush::flush_range(host, len, None) } {
                return Err(Error::Memory("this CPU cannot flush caches (no CLFLUSH)".into()));
            }
            Ok(())
        })
    }

    /// Walks `[gpa, gpa + len)` over the memory map's regions: `f(host, offset in the
    /// buffer, bytes, flagged non-coherent)` per piece.
    fn host_access(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(*const u8, usize, usize, bool) -> Result<()>,
    ) -> Result<()> {
        let regions = self.memory_map.regions();
        let mut done = 0usize;
        while done < len {
            let at = gpa.checked_add(done as u64).ok_or_else(|| Error::Memory("address overflow".into()))?;
            let r = regions
                .iter()
                .find(|r| at >= r.gpa && at < r.end())
                .ok_or_else(|| Error::Memory(format!("{at:#x} is not guest memory")))?;
            let n = ((r.end() - at) as usize).min(len - done);
            // The region (and its mapping) stays alive: `regions` holds it.
            let host = r.host().wrapping_add((at - r.gpa) as usize) as *const u8;
            f(host, done, n, r.flags.noncoherent_dma)?;
            done += n;
        }
        Ok(())
    }

    /// Each memory-map region with its non-coherent flag and the memory type the guest
    /// gets there for a WB and a WC PAT entry, under passthru's per-slot model and
    /// under today's VM-wide kernels: `(region, flagged, [per-slot WB, per-slot WC,
    /// VM-wide WB, VM-wide WC])`.
    pub fn memory_types(&self) -> Vec<(vm_api::Region, bool, [crate::memtype::MemType; 4])> {
        // A PAT whose entry 0 is WB (6) and entry 1 WC (1), caches enabled.
        self.memory_types_for(0x0106, false)
            .into_iter()
            .map(|(r, [per_slot, vm_wide])| {
                let flagged = r.flags.noncoherent_dma;
                (r, flagged, [per_slot[0], per_slot[1], vm_wide[0], vm_wide[1]])
            })
            .collect()
    }

    /// The guest's IA32_PAT and CR0.CD, read on the vCPU's thread between two of its
    /// KVM_RUNs (no pause, no device stopped; see [`crate::run_control::RunControl::ask`]). None without a
    /// running vCPU, or one busy for longer than 200 ms (in a device's call).
    pub fn guest_cache_control(&self) -> Option<(u64, bool)> {
        self.run
            .ask(std::time::Duration::from_millis(200), |v| {
                let fd = v.downcast_mut::<kvm_ioctls::VcpuFd>()?;
                let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                    index: crate::memtype::IA32_PAT,
                    ..Default::default()
                }])
                .ok()?;
                let pat = (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)?;
                let cd = fd.get_sregs().ok()?.cr0 & (1 << 30) != 0;
                Some((pat, cd))
            })
            .ok()
            .flatten()
    }

    /// For each memory-map region: its flag and, for each of the guest's eight PAT
    /// entries (`pat`, with CR0.CD `cd`), the effective memory type under passthru's
    /// per-slot model and under today's VM-wide kernels.
    pub fn memory_types_for(&self, pat: u64, cd: bool) -> Vec<(vm_api::Region, [[crate::memtype::MemType; 8]; 2])> {
        use crate::memtype::{Kernel, Page, decide, pat_entries};
        let vm_nc = self.devices.noncoherent().count() > 0;
        let entries = pat_entries(pat);
        self.memory_map
            .regions()
            .into_iter()
            .map(|r| {
                let page = Page {
                    vm_noncoherent: vm_nc,
                    slot_noncoherent: r.flags.noncoherent_dma,
                    cr0_cd: cd,
                    ..Page::default()
                };
                let t = |k, p| decide(k, &Page { guest_pat: p, ..page }).effective(p);
                let per_slot = entries.map(|p| t(Kernel::PerSlot, p));
                let vm_wide = entries.map(|p| t(Kernel::Current, p));
                (r, [per_slot, vm_wide])
            })
            .collect()
    }

    /// A guest-physical write as the CPU would do it: RAM if the range is RAM (boot or
    /// hot-added), otherwise the MMIO bus. False if neither takes it.
    pub fn phys_write(&self, addr: u64, data: &[u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().write_slice(data, GuestAddress(addr)).is_ok();
        }
        if let Some(s) = self.hot_ram_slice(addr, data.len()) {
            s.copy_from(data);
            return true;
        }
        self.mmio_write(addr, data)
    }

    /// A guest-physical read (RAM, else MMIO). False if neither takes it.
    pub fn phys_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if self.is_ram(addr, data.len()) {
            return self.memory().read_slice(data, GuestAddress(addr)).is_ok();
        }
        if let Some(s) = self.hot_ram_slice(addr, data.len()) {
            s.copy_to(data);
            return true;
        }
        self.mmio_read(addr, data)
    }

    /// `[addr, addr + len)` inside one hot-added RAM region, as a volatile slice that
    /// keeps the region (and its mapping) alive while it is used.
    fn hot_ram_slice(&self, addr: u64, len: usize) -> Option<HotSlice> {
        let end = addr.checked_add(len as u64)?;
        let r = self
            .memory_map
            .regions()
            .into_iter()
            .find(|r| r.kind == vm_api::RegionKind::Ram && addr >= r.gpa && end <= r.end())?;
        Some(HotSlice { offset: (addr - r.gpa) as usize, len, region: r })
    }

    /// True when `[addr, addr + len)` lies inside one RAM region.
    pub fn is_ram(&self, addr: u64, len: usize) -> bool {
        let Some(end) = addr.checked_add(len as u64) else {
            return false;
        };
        self.memory().find_region(GuestAddress(addr)).is_some_and(|r| {
            use vm_memory::GuestMemoryRegion;
            end <= r.start_addr().0 + r.len()
        })
    }
}

/// A window into hot-added RAM, holding its region.
struct HotSlice {
    region: vm_api::Region,
    offset: usize,
    len: usize,
}

impl HotSlice {
    fn slice(&self) -> vm_memory::VolatileSlice<'_> {
        // SAFETY: the region's host memory is valid for its size while the region (held
        // here) lives; `offset + len` lies inside it (checked by `hot_ram_slice`).
        unsafe { vm_memory::VolatileSlice::new(self.region.host().add(self.offset), self.len) }
    }

    fn copy_from(&self, data: &[u8]) {
        self.slice().copy_from(data);
    }

    fn copy_to(&self, data: &mut [u8]) {
        self.slice().copy_to(data);
    }
}
