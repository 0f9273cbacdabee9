//! The guest-physical memory map: RAM and RAM-device (device BAR) regions backed by
//! host memory, and the listeners told when regions come and go (KVM memory slots,
//! DMA front-ends that follow the guest's memory).

use std::any::Any;
use std::fs::File;
use std::sync::{Arc, Mutex};

/// Errors of the memory map (VMM configuration errors, never guest-caused).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    /// A region is empty, wraps around, or overlaps another.
    #[error("memory region {gpa:#x}+{size:#x}: {reason}")]
    Region {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: &'static str,
    },
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

/// What the VM must know about how a region is used (memory slot flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionFlags {
    /// A device that does not snoop CPU caches may DMA here: the memory-type policy
    /// and the VMM's own reads (snapshot, migration) must allow for it.
    pub noncoherent_dma: bool,
    /// Writes are logged (migration).
    pub log_dirty: bool,
}

impl std::fmt::Display for RegionFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut words = Vec::new();
        if self.noncoherent_dma {
            words.push("noncoherent");
        }
        if self.log_dirty {
            words.push("log-dirty");
        }
        write!(f, "{}", words.join("|"))
    }
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
/// vouch for it builds one: [`Region::from_raw`] is `unsafe`, and the address is not a
/// public field. Neither of these compiles:
///
/// ```compile_fail,E0133
/// let r = vm_api::Region::from_raw(0, 4096, vm_api::RegionKind::Ram, 0x1000 as *mut u8, None, None);
/// ```
///
/// ```compile_fail,E0451
/// let r = vm_api::Region { gpa: 0, size: 4096, kind: vm_api::RegionKind::Ram, host: 0x1000 as *mut u8,
///                          backing: None, flags: Default::default(), _keepalive: None };
/// ```
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
    /// How it is used (memory slot flags); changed in place with
    /// [`MemoryMap::set_flags`].
    pub flags: RegionFlags,
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
        Region { gpa, size, kind, host, backing, flags: RegionFlags::default(), _keepalive: keepalive }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }

    /// Host address of the first byte.
    pub fn host(&self) -> *mut u8 {
        self.host
    }

    /// The same host memory at another guest-physical address, as another kind (a BAR
    /// the guest placed or moved).
    pub fn rebased(&self, gpa: u64, kind: RegionKind) -> Region {
        Region { gpa, kind, ..self.clone() }
    }

    /// A sub-range of this region: `size` bytes from `offset`, at guest-physical `gpa`.
    /// `None` if the sub-range is not inside the region.
    pub fn slice(&self, offset: u64, size: u64, gpa: u64) -> Option<Region> {
        let end = offset.checked_add(size).filter(|e| *e <= self.size && size > 0)?;
        let _ = end;
        let backing = self.backing.as_ref().map(|b| Backing { fd: Arc::clone(&b.fd), offset: b.offset + offset });
        Some(Region {
            gpa,
            size,
            kind: self.kind.clone(),
            // An offset inside the region's own valid host range.
            host: self.host.wrapping_add(offset as usize),
            backing,
            flags: self.flags,
            _keepalive: self._keepalive.clone(),
        })
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
    /// A region's flags changed (`region` carries the new ones). Cannot fail.
    fn flags_changed(&self, _region: &Region) {}
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
    pub fn add_region(&self, region: Region) -> Result<(), MapError> {
        let end = region.gpa.checked_add(region.size).filter(|_| region.size > 0);
        let Some(end) = end else {
            return Err(MapError::Region { gpa: region.gpa, size: region.size, reason: "empty or wraps around" });
        };
        if region.flags.noncoherent_dma && region.kind == RegionKind::Ram {
            return Err(MapError::Region {
                gpa: region.gpa,
                size: region.size,
                reason: "system RAM cannot be non-coherent",
            });
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.regions.iter().any(|r| region.gpa < r.end() && r.gpa < end) {
            return Err(MapError::Region { gpa: region.gpa, size: region.size, reason: "overlaps an existing region" });
        }
        for (i, l) in inner.listeners.iter().enumerate() {
            if let Err(reason) = l.region_added(&region) {
                for done in &inner.listeners[..i] {
                    done.region_removed(&region);
                }
                tracing::debug!("listener {} refused region {:?}: {reason}", l.name(), region);
                return Err(MapError::Region {
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

    /// Sets the flags of the region starting at `gpa`; listeners are told. System RAM
    /// cannot be flagged non-coherent: non-coherent DMA is a property of device memory
    /// (a BAR, shared memory), and flagging RAM would hand the guest's PAT control of
    /// memory the VMM and every device read through write-back mappings.
    pub fn set_flags(&self, gpa: u64, flags: RegionFlags) -> Result<(), String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let r =
            inner.regions.iter_mut().find(|r| r.gpa == gpa).ok_or_else(|| format!("no region starts at {gpa:#x}"))?;
        if flags.noncoherent_dma && r.kind == RegionKind::Ram {
            return Err(format!(
                "{gpa:#x} is system RAM, which cannot be flagged non-coherent: only device memory (a BAR, shared \
                 memory) that a non-coherent device uses can"
            ));
        }
        if r.flags == flags {
            return Ok(());
        }
        r.flags = flags;
        let r = r.clone();
        for l in &inner.listeners {
            l.flags_changed(&r);
        }
        Ok(())
    }

    /// Registers a listener and replays every existing region to it. If it refuses
    /// one, the regions it accepted are removed from it again and it is not added.
    pub fn add_listener(&self, listener: Arc<dyn MemoryListener>) -> Result<(), MapError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, r) in inner.regions.iter().enumerate() {
            if let Err(reason) = listener.region_added(r) {
                for done in &inner.regions[..i] {
                    listener.region_removed(done);
                }
                tracing::debug!("listener {} refused region {:?}: {reason}", listener.name(), r);
                return Err(MapError::Region { gpa: r.gpa, size: r.size, reason: "a new memory listener refused it" });
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

    /// The file behind guest-physical `gpa`: the file, the offset of `gpa` in it, and
    /// the bytes of the region from `gpa` on. None if `gpa` is in no region with a file.
    pub fn backing_of(&self, gpa: u64) -> Option<(Arc<File>, u64, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let r = inner.regions.iter().find(|r| gpa >= r.gpa && gpa < r.end())?;
        let b = r.backing.as_ref()?;
        Some((Arc::clone(&b.fd), b.offset + (gpa - r.gpa), r.end() - gpa))
    }

    /// A snapshot of the regions, sorted by address.
    pub fn regions(&self) -> Vec<Region> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).regions.clone()
    }
}
