//! Guest memory: RAM backed by a memfd (so device processes can map it by fd), and
//! the guest memory map, which knows RAM and RAM-device (device BAR) regions and tells
//! listeners when regions come and go.

use crate::error::{Error, Result};
use abi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use std::any::Any;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
pub use vm_api::memory::{Backing, MapError, MemoryListener, MemoryMap, Region, RegionKind};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Smallest machine: the fixed layout plus room for guest buffers.
pub const MIN_RAM: u64 = 32 << 20;
/// Largest machine we agree to build here.
pub const MAX_RAM: u64 = 64 << 30;

/// Guest RAM: one memfd, mapped into the VMM and split around the MMIO hole.
#[derive(Debug)]
pub struct GuestRam {
    memory: Arc<GuestMemoryMmap>,
    memfd: Arc<File>,
    size: u64,
}

/// (guest-physical base, size, offset in the memfd) of each RAM range for `size` bytes.
pub fn ram_layout(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut out = vec![(0, low, 0)];
    if size > low {
        out.push((MMIO_HOLE_END, size - low, low));
    }
    out
}

/// For `size` bytes of RAM: the offset in the memfd of guest-physical `gpa` and the
/// bytes of RAM from there to the end of its region, or None if `gpa` is not RAM.
pub fn memfd_offset(size: u64, gpa: u64) -> Option<(u64, u64)> {
    ram_layout(size)
        .into_iter()
        .find(|(base, len, _)| gpa >= *base && gpa < base + len)
        .map(|(base, len, off)| (off + (gpa - base), base + len - gpa))
}

/// A memfd of `size` bytes sealed against shrinking, growing and further seals.
fn sealed_memfd(size: u64) -> Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or
    // -1. We take ownership of the fd right away.
    let fd = unsafe { libc::memfd_create(c"passthru-guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::Memory(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Memory(format!("sizing the guest RAM memfd to {size:#x}: {e}")))?;
    // Device processes map this file: it may never shrink under them (a SIGBUS in the
    // device), grow, or take further seals (F_SEAL_FUTURE_WRITE from a hostile device
    // would stop the VMM mapping it again).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(Error::Memory(format!("sealing the guest RAM memfd: {}", std::io::Error::last_os_error())));
    }
    Ok(file)
}

/// RAM hot-added at `gpa`: `size` bytes in a memfd of its own, as a memory-map region
/// (its mapping lives as long as the region).
pub fn hot_ram(gpa: u64, size: u64) -> Result<Region> {
    if size == 0 || !size.is_multiple_of(4096) || !gpa.is_multiple_of(4096) || size > MAX_RAM {
        return Err(Error::MemorySize { size, reason: "hot-added RAM must be 4 KiB-aligned, at most 64 GiB" });
    }
    let memfd = Arc::new(sealed_memfd(size)?);
    let f = memfd.try_clone().map_err(|e| Error::Memory(format!("dup of the RAM memfd: {e}")))?;
    let len = usize::try_from(size).map_err(|_| Error::MemorySize { size, reason: "too large" })?;
    let memory = Arc::new(
        GuestMemoryMmap::<()>::from_ranges_with_files(vec![(GuestAddress(gpa), len, Some(FileOffset::new(f, 0)))])
            .map_err(|e| Error::Memory(e.to_string()))?,
    );
    let host = memory
        .iter()
        .next()
        .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
        .ok_or_else(|| Error::Memory("mapping hot-added RAM".into()))?;
    let keepalive: Arc<dyn Any + Send + Sync> = memory;
    // SAFETY: `host` is the start of the mapping of the whole memfd (`size` bytes), kept
    // alive by the region (its keepalive).
    Ok(unsafe {
        Region::from_raw(gpa, size, RegionKind::Ram, host, Some(Backing { fd: memfd, offset: 0 }), Some(keepalive))
    })
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM in a memfd.
    pub fn new(size: u64) -> Result<GuestRam> {
        if size < MIN_RAM {
            return Err(Error::MemorySize { size, reason: "below the 32 MiB minimum; pass --memory 32M or more" });
        }
        if size > MAX_RAM {
            return Err(Error::MemorySize { size, reason: "above the 64 GiB maximum" });
        }
        if !size.is_multiple_of(4096) {
            return Err(Error::MemorySize { size, reason: "not a multiple of 4 KiB" });
        }
        let memfd = Arc::new(sealed_memfd(size)?);
        let mut ranges = Vec::new();
        for (gpa, len, off) in ram_layout(size) {
            let f = memfd.try_clone().map_err(|e| Error::Memory(format!("dup of the RAM memfd: {e}")))?;
            ranges.push((GuestAddress(gpa), len as usize, Some(FileOffset::new(f, off))));
        }
        let memory =
            Arc::new(GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::Memory(e.to_string()))?);
        Ok(GuestRam { memory, memfd, size })
    }

    /// The mapped guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The mapped guest memory, shared (the DMA core holds it too).
    pub fn memory_arc(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// The memfd backing all of guest RAM.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions as memory-map regions.
    pub fn regions(&self) -> Vec<Region> {
        let mut out = Vec::new();
        for (r, (_, _, off)) in self.memory.iter().zip(ram_layout(self.size)) {
            let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else { continue };
            let backing = Some(Backing { fd: Arc::clone(&self.memfd), offset: off });
            let keepalive: Arc<dyn Any + Send + Sync> = Arc::clone(&self.memory) as _;
            // SAFETY: `host` is the start of this region's mapping in guest memory, valid
            // for `r.len()` bytes; the region holds the guest memory (its keepalive) so
            // the mapping outlives it.
            out.push(unsafe {
                Region::from_raw(r.start_addr().0, r.len(), RegionKind::Ram, host, backing, Some(keepalive))
            });
        }
        out
    }
}

/// A memory slot: (guest-physical start, slot number, flags).
pub type Slot = (u64, u32, vm_api::RegionFlags);

/// Keeps KVM memory slots equal to the memory map (flags included).
pub struct MemslotListener {
    accel: Arc<dyn crate::accel::Accel>,
    /// (next slot number, the slots).
    slots: Mutex<(u32, Vec<Slot>)>,
}

impl MemslotListener {
    /// A listener that creates memslots through `accel`.
    pub fn new(accel: Arc<dyn crate::accel::Accel>) -> MemslotListener {
        MemslotListener { accel, slots: Mutex::new((0, Vec::new())) }
    }

    /// The memory slots: (guest-physical start, slot number, flags).
    pub fn slots(&self) -> Vec<Slot> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }
}

impl MemoryListener for MemslotListener {
    fn name(&self) -> &str {
        "kvm-memslots"
    }

    fn region_added(&self, r: &Region) -> std::result::Result<(), String> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..=s.0).find(|n| !s.1.iter().any(|(_, used, _)| used == n)).unwrap_or(s.0);
        // SAFETY: a Region's host address is valid for its size while the region lives
        // (Region::from_raw's contract); the memory map keeps the region until
        // region_removed, which deletes the slot first.
        unsafe { self.accel.add_memslot(slot, r.gpa, r.size, r.host(), r.flags) }.map_err(|e| e.to_string())?;
        s.1.push((r.gpa, slot, r.flags));
        s.0 = s.0.max(slot + 1);
        Ok(())
    }

    fn region_removed(&self, r: &Region) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = s.1.iter().position(|(gpa, _, _)| *gpa == r.gpa) {
            let (_, slot, _) = s.1.remove(pos);
            if let Err(e) = self.accel.remove_memslot(slot, r.gpa) {
                tracing::error!("removing memslot {slot} at {:#x}: {e}", r.gpa);
            }
        }
    }

    fn flags_changed(&self, r: &Region) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = s.1.iter_mut().find(|(gpa, _, _)| *gpa == r.gpa) {
            entry.2 = r.flags;
            // SAFETY: as in region_added: the region (and its host memory) is in the map.
            if let Err(e) = unsafe { self.accel.add_memslot(entry.1, r.gpa, r.size, r.host(), r.flags) } {
                tracing::error!("updating memslot {} at {:#x} to {}: {e}", entry.1, r.gpa, r.flags);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[derive(Default)]
    struct Log {
        events: Mutex<Vec<String>>,
        refuse_at: Option<u64>,
    }
    impl MemoryListener for Log {
        fn name(&self) -> &str {
            "log"
        }
        fn region_added(&self, r: &Region) -> std::result::Result<(), String> {
            if Some(r.gpa) == self.refuse_at {
                return Err("refused".into());
            }
            self.events.lock().unwrap().push(format!("+{:#x}", r.gpa));
            Ok(())
        }
        fn region_removed(&self, r: &Region) {
            self.events.lock().unwrap().push(format!("-{:#x}", r.gpa));
        }
        fn flags_changed(&self, r: &Region) {
            self.events.lock().unwrap().push(format!("~{:#x}:{}", r.gpa, r.flags));
        }
    }

    #[test]
    fn flags_reach_listeners_and_kvm_memory_slots() {
        let map = MemoryMap::new();
        let log = Arc::new(Log::default());
        map.add_listener(log.clone()).unwrap();
        let ram = GuestRam::new(MIN_RAM).unwrap();
        let kvm = crate::kvm_available().then(|| Arc::new(crate::accel::KvmAccel::new().unwrap()));
        let slots = kvm.as_ref().map(|k| Arc::new(MemslotListener::new(k.clone())));
        if let Some(s) = &slots {
            map.add_listener(s.clone()).unwrap();
        }
        for r in ram.regions() {
            map.add_region(r).unwrap();
        }
        let nc = vm_api::RegionFlags { noncoherent_dma: true, log_dirty: true };
        let e = map.set_flags(0, nc).unwrap_err();
        assert!(e.contains("system RAM, which cannot be flagged non-coherent"), "{e}");
        let flags = vm_api::RegionFlags { log_dirty: true, ..Default::default() };
        assert_eq!(map.set_flags(0, flags), Ok(()));
        assert!(map.set_flags(0x1234, flags).is_err(), "no region starts there");
        assert_eq!(map.regions()[0].flags, flags);
        assert_eq!(log.events.lock().unwrap().last().unwrap(), "~0x0:log-dirty");
        map.add_region(dev(0xd000_0000, 0x1000)).unwrap();
        map.set_flags(0xd000_0000, nc).unwrap();
        assert_eq!(
            log.events.lock().unwrap().last().unwrap(),
            "~0xd0000000:noncoherent|log-dirty",
            "device memory can"
        );
        if let Some(s) = &slots {
            // KVM took the slot again with dirty logging on (an error would be logged and
            // the bookkeeping below would still change, so ask KVM directly too).
            assert_eq!(s.slots()[0].2, flags);
            let r = &map.regions()[0];
            let accel: &dyn crate::accel::Accel = kvm.as_ref().unwrap().as_ref();
            // SAFETY: the same slot, address and host memory the map holds alive.
            unsafe { accel.add_memslot(s.slots()[0].1, r.gpa, r.size, r.host(), flags) }.unwrap();
        }
    }

    fn dev(gpa: u64, size: u64) -> Region {
        // SAFETY: these regions only go through listeners that never touch memory.
        unsafe {
            Region::from_raw(
                gpa,
                size,
                RegionKind::RamDevice { device: "bar".into() },
                std::ptr::null_mut(),
                None,
                None,
            )
        }
    }

    #[test]
    fn ram_splits_around_the_mmio_hole() {
        assert_eq!(ram_layout(256 << 20), vec![(0, 256 << 20, 0)]);
        assert_eq!(ram_layout(4 << 30), vec![(0, 3 << 30, 0), (4 << 30, 1 << 30, 3 << 30)]);
    }

    #[test]
    fn ram_is_memfd_backed_and_readable_through_the_fd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(MIN_RAM).unwrap();
        ram.memory().write_slice(b"shared", GuestAddress(0x2000)).unwrap();
        let mut buf = [0u8; 6];
        ram.memfd().read_exact_at(&mut buf, 0x2000).unwrap();
        assert_eq!(&buf, b"shared");
        let regions = ram.regions();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].kind, RegionKind::Ram);
        assert!(!regions[0].host().is_null());
    }

    #[test]
    fn the_ram_memfd_is_sealed_against_resizing_and_further_seals() {
        let ram = GuestRam::new(MIN_RAM).unwrap();
        assert_eq!(ram.memfd().set_len(MIN_RAM / 2).unwrap_err().raw_os_error(), Some(libc::EPERM), "shrink");
        assert_eq!(ram.memfd().set_len(MIN_RAM * 2).unwrap_err().raw_os_error(), Some(libc::EPERM), "grow");
        // SAFETY: F_ADD_SEALS on our own memfd; no memory is passed.
        let r = unsafe { libc::fcntl(ram.memfd().as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) };
        assert_eq!(r, -1, "no more seals can be added");
    }

    #[test]
    fn bad_sizes_are_refused_with_the_fix() {
        let e = GuestRam::new(1 << 20).unwrap_err().to_string();
        assert!(e.contains("--memory 32M"), "{e}");
        assert!(GuestRam::new(MIN_RAM + 1).is_err());
    }

    #[test]
    fn listeners_see_replay_add_and_remove_in_order() {
        let map = MemoryMap::new();
        map.add_region(dev(0x1000, 0x1000)).unwrap();
        let log = Arc::new(Log::default());
        map.add_listener(log.clone()).unwrap();
        map.add_region(dev(0x3000, 0x1000)).unwrap();
        assert!(map.add_region(dev(0x3800, 0x1000)).is_err(), "overlap refused");
        assert!(map.remove_region(0x1000).is_some());
        assert!(map.remove_region(0x1000).is_none());
        let l: Arc<dyn MemoryListener> = log.clone();
        map.remove_listener(&l);
        assert_eq!(*log.events.lock().unwrap(), vec!["+0x1000", "+0x3000", "-0x1000", "-0x3000"]);
    }

    #[test]
    fn a_refusing_listener_rolls_the_add_back_everywhere() {
        let map = MemoryMap::new();
        let ok = Arc::new(Log::default());
        let picky = Arc::new(Log { refuse_at: Some(0x5000), ..Default::default() });
        map.add_listener(ok.clone()).unwrap();
        map.add_listener(picky.clone()).unwrap();
        assert!(map.add_region(dev(0x5000, 0x1000)).is_err());
        assert!(map.regions().is_empty());
        assert_eq!(*ok.events.lock().unwrap(), vec!["+0x5000", "-0x5000"]);
        assert!(picky.events.lock().unwrap().is_empty());
    }
}
