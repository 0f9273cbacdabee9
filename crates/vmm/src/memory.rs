//! Guest memory: RAM backed by a memfd (so device processes can map it by fd), and
//! the guest memory map, which knows RAM and RAM-device (device BAR) regions and tells
//! listeners when regions come and go.

use crate::error::{Error, Result};
use abi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use std::any::Any;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
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
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new
        // fd or -1. We take ownership of the fd right away.
        let fd =
            unsafe { libc::memfd_create(c"passthru-guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(Error::Memory(format!("memfd_create: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| Error::Memory(format!("sizing the guest RAM memfd to {size:#x}: {e}")))?;
        // Device processes map this file: it may never shrink under them (a SIGBUS in
        // the device), grow, or take further seals (F_SEAL_FUTURE_WRITE from a hostile
        // device would stop the VMM mapping it again).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd; no memory is passed.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(Error::Memory(format!("sealing the guest RAM memfd: {}", std::io::Error::last_os_error())));
        }
        let memfd = Arc::new(file);
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

/// What a region of the guest address space is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Guest RAM.
    Ram,
    /// Memory of a device mapped into the guest (a BAR backed by host memory).
    RamDevice {
        /// Name of the owning device.
        device: String,
    },
}

/// The file behind a region, for sharing it with another process.
#[derive(Clone, Debug)]
pub struct Backing {
    /// The file (a memfd for RAM).
    pub fd: Arc<File>,
    /// Offset of the region's first byte in the file.
    pub offset: u64,
}

/// A region of the guest-physical address space backed by host memory.
///
/// Its host address reaches KVM (a memory slot) and devices, so only code that can
/// vouch for it builds one: [`Region::from_raw`] is `unsafe`.
#[derive(Clone)]
pub struct Region {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// RAM or device memory.
    pub kind: RegionKind,
    /// Host virtual address of the first byte (valid while the region lives).
    host: *mut u8,
    /// The file behind it, when it can be shared by fd.
    pub backing: Option<Backing>,
    /// Keeps the host mapping alive while the region is in the map (held, never read).
    _keepalive: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: `host` is an address into a mapping kept alive by `keepalive` (or by the
// caller of `from_raw`, as its contract says); the region itself never dereferences
// it, and whoever does (KVM, a device) synchronises its own accesses.
unsafe impl Send for Region {}
// SAFETY: as above; the region is immutable.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("size", &format_args!("{:#x}", self.size))
            .field("kind", &self.kind)
            .finish()
    }
}

impl Region {
    /// A region of `size` bytes at `gpa` whose host memory starts at `host`.
    ///
    /// # Safety
    /// `host` must be valid for reads and writes of `size` bytes for as long as the
    /// region (or a clone of it) lives: either `keepalive` owns that mapping, or the
    /// caller keeps it mapped until the region has left every memory map.
    pub unsafe fn from_raw(
        gpa: u64,
        size: u64,
        kind: RegionKind,
        host: *mut u8,
        backing: Option<Backing>,
        keepalive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Region {
        Region { gpa, size, kind, host, backing, _keepalive: keepalive }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }

    /// Host address of the first byte.
    pub fn host(&self) -> *mut u8 {
        self.host
    }
}

/// Told about every region of the memory map (the KVM memslot listener, the identity
/// DMA domain of devices without a guest IOMMU, ...).
pub trait MemoryListener: Send + Sync {
    /// Name for logs.
    fn name(&self) -> &str;
    /// A region appeared. An error makes the whole add fail (and be rolled back).
    fn region_added(&self, region: &Region) -> std::result::Result<(), String>;
    /// A region is going away. Cannot fail: a listener must let go.
    fn region_removed(&self, region: &Region);
}

/// The guest-physical memory map.
#[derive(Default)]
pub struct MemoryMap {
    inner: Mutex<MapInner>,
}

#[derive(Default)]
struct MapInner {
    regions: Vec<Region>,
    listeners: Vec<Arc<dyn MemoryListener>>,
}

impl MemoryMap {
    /// An empty map.
    pub fn new() -> MemoryMap {
        MemoryMap::default()
    }

    /// Adds a region; every listener is told. If one refuses, those already told are
    /// told it was removed and the map is unchanged.
    pub fn add_region(&self, region: Region) -> Result<()> {
        let end = region.gpa.checked_add(region.size).filter(|_| region.size > 0);
        let Some(end) = end else {
            return Err(Error::Region { gpa: region.gpa, size: region.size, reason: "empty or wraps around" });
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.regions.iter().any(|r| region.gpa < r.end() && r.gpa < end) {
            return Err(Error::Region { gpa: region.gpa, size: region.size, reason: "overlaps an existing region" });
        }
        for (i, l) in inner.listeners.iter().enumerate() {
            if let Err(reason) = l.region_added(&region) {
                for done in &inner.listeners[..i] {
                    done.region_removed(&region);
                }
                tracing::error!("listener {} refused region {:?}: {reason}", l.name(), region);
                return Err(Error::Region {
                    gpa: region.gpa,
                    size: region.size,
                    reason: "a memory listener refused it",
                });
            }
        }
        inner.regions.push(region);
        inner.regions.sort_by_key(|r| r.gpa);
        Ok(())
    }

    /// Removes the region starting at `gpa`; listeners are told first. Returns it.
    pub fn remove_region(&self, gpa: u64) -> Option<Region> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let pos = inner.regions.iter().position(|r| r.gpa == gpa)?;
        let region = inner.regions.remove(pos);
        for l in inner.listeners.iter().rev() {
            l.region_removed(&region);
        }
        Some(region)
    }

    /// Registers a listener and replays every existing region to it. If it refuses
    /// one, the regions it accepted are removed from it again and it is not added.
    pub fn add_listener(&self, listener: Arc<dyn MemoryListener>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, r) in inner.regions.iter().enumerate() {
            if let Err(reason) = listener.region_added(r) {
                for done in &inner.regions[..i] {
                    listener.region_removed(done);
                }
                tracing::error!("listener {} refused region {:?}: {reason}", listener.name(), r);
                return Err(Error::Region { gpa: r.gpa, size: r.size, reason: "a new memory listener refused it" });
            }
        }
        inner.listeners.push(listener);
        Ok(())
    }

    /// Unregisters a listener; it is told every region is removed.
    pub fn remove_listener(&self, listener: &Arc<dyn MemoryListener>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = inner.listeners.iter().position(|l| Arc::ptr_eq(l, listener)) {
            let l = inner.listeners.remove(pos);
            for r in inner.regions.iter().rev() {
                l.region_removed(r);
            }
        }
    }

    /// A snapshot of the regions, sorted by address.
    pub fn regions(&self) -> Vec<Region> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).regions.clone()
    }
}

/// Keeps KVM memory slots equal to the memory map.
pub struct MemslotListener {
    accel: Arc<dyn crate::accel::Accel>,
    slots: Mutex<(u32, Vec<(u64, u32)>)>,
}

impl MemslotListener {
    /// A listener that creates memslots through `accel`.
    pub fn new(accel: Arc<dyn crate::accel::Accel>) -> MemslotListener {
        MemslotListener { accel, slots: Mutex::new((0, Vec::new())) }
    }
}

impl MemoryListener for MemslotListener {
    fn name(&self) -> &str {
        "kvm-memslots"
    }

    fn region_added(&self, r: &Region) -> std::result::Result<(), String> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..=s.0).find(|n| !s.1.iter().any(|(_, used)| used == n)).unwrap_or(s.0);
        // SAFETY: a Region's host address is valid for its size while the region lives
        // (Region::from_raw's contract); the memory map keeps the region until
        // region_removed, which deletes the slot first.
        unsafe { self.accel.add_memslot(slot, r.gpa, r.size, r.host()) }.map_err(|e| e.to_string())?;
        s.1.push((r.gpa, slot));
        s.0 = s.0.max(slot + 1);
        Ok(())
    }

    fn region_removed(&self, r: &Region) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = s.1.iter().position(|(gpa, _)| *gpa == r.gpa) {
            let (_, slot) = s.1.remove(pos);
            if let Err(e) = self.accel.remove_memslot(slot, r.gpa) {
                tracing::error!("removing memslot {slot} at {:#x}: {e}", r.gpa);
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
