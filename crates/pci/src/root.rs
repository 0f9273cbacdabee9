//! The root complex: bus 0 with the host bridge at 00:00.0 and functions in slots
//! 1..31; configuration access through ECAM and through the legacy 0xCF8/0xCFC ports;
//! BAR placement at plug time, as firmware would; and each decoding BAR kept on the MMIO
//! or port bus (trapped accesses) and, for the parts a function backs with host memory,
//! in the guest memory map (accesses that never exit).
//!
//! Locks: `slots` is taken for reading on every configuration access and for writing
//! when a function is plugged or unplugged; a slot's `windows` lock is taken after it
//! while windows are re-synchronised, and around bus and memory-map updates (which take
//! their own locks, and the memory map calls its listeners: KVM memory slots, DMA
//! front-ends). A function's own locks are taken inside a configuration access, never
//! the other way round.

use crate::bar::{BarKind, size_from_probe};
use crate::config::{LEGACY_SIZE, valid_access};
use crate::{BarWindow, PciFunction, read8, read16};
use abi::pci::{self as p, command, reg};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_api::{Bus, BusDevice, MemoryMap, RegionKind};

/// Errors of plugging functions (VMM configuration errors, never guest-caused).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All slots are taken.
    #[error("no free PCI slot on bus 0 (31 devices at most)")]
    NoSlot,
    /// The slot is taken.
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
    /// No room for a BAR in its window.
    #[error("{function}: no room for BAR {bar} ({size:#x} bytes) in the {window} window")]
    NoRoom {
        /// The function.
        function: String,
        /// The BAR.
        bar: u8,
        /// Its size.
        size: u64,
        /// Which window.
        window: &'static str,
    },
    /// A bus range could not be set up.
    #[error(transparent)]
    Bus(#[from] vm_api::BusError),
}

/// A window registered on a bus (and in the memory map).
struct Registered {
    window: BarWindow,
    /// Guest addresses of the memory-map regions added for its mapped parts.
    regions: Vec<u64>,
}

struct Slot {
    function: Arc<dyn PciFunction>,
    windows: Mutex<Vec<Registered>>,
    /// Addresses placed for it at plug time (freed at unplug).
    placed: Mutex<Vec<(Window, RangeInclusive)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Mmio32,
    Mmio64,
    Io,
}

struct Allocators {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    io: AddressAllocator,
}

impl Allocators {
    fn of(&mut self, w: Window) -> &mut AddressAllocator {
        match w {
            Window::Mmio32 => &mut self.mmio32,
            Window::Mmio64 => &mut self.mmio64,
            Window::Io => &mut self.io,
        }
    }
}

/// Bus 0.
pub struct PciRoot {
    slots: RwLock<Vec<Option<Arc<Slot>>>>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    memory: Arc<MemoryMap>,
    cf8: AtomicU32,
    alloc: Mutex<Allocators>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot").field("functions", &self.list().len()).finish()
    }
}

/// The host bridge at 00:00.0: identity, class, nothing else.
struct HostBridge(crate::ConfigSpace);

impl PciFunction for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&self, _offset: u16, _data: &[u8]) {}
    fn windows(&self) -> Vec<BarWindow> {
        Vec::new()
    }
    fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// A trapped BAR on a bus: accesses go to the function.
struct BarHandler {
    function: Arc<dyn PciFunction>,
    bar: u8,
}

impl BusDevice for BarHandler {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.function.bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.function.bar_write(self.bar, offset, data);
    }
}

/// ECAM: `offset = bus << 20 | device << 15 | function << 12 | register`.
struct Ecam(Weak<PciRoot>);

impl Ecam {
    fn decode(offset: u64) -> Option<(u8, u16)> {
        let (bus, dev, func, reg) = (offset >> 20, (offset >> 15) & 31, (offset >> 12) & 7, (offset & 0xfff) as u16);
        (bus == 0 && func == 0).then_some((dev as u8, reg))
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (Ecam::decode(offset), self.0.upgrade()) {
            (Some((slot, reg)), Some(root)) => root.config_read(slot, reg, data),
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some((slot, reg)), Some(root)) = (Ecam::decode(offset), self.0.upgrade()) {
            root.config_write(slot, reg, data);
        }
    }
}

/// 0xCF8: the address latch (32-bit accesses only, as QEMU).
struct ConfigAddress(Weak<PciRoot>);

impl BusDevice for ConfigAddress {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = self.0.upgrade().map_or(u32::MAX, |r| r.cf8.load(Ordering::Acquire));
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let (Ok(b), Some(r)) = (<[u8; 4]>::try_from(data), self.0.upgrade()) {
            r.cf8.store(u32::from_le_bytes(b), Ordering::Release);
        }
    }
}

/// 0xCFC..0xCFF: data of the latched register (bus 0, 256 bytes per function).
struct ConfigData(Weak<PciRoot>);

impl ConfigData {
    fn target(root: &PciRoot, offset: u64) -> Option<(u8, u16)> {
        let a = root.cf8.load(Ordering::Acquire);
        let bus = (a >> 16) & 0xff;
        let (dev, func) = ((a >> 11) & 31, (a >> 8) & 7);
        let reg = (a & 0xfc) as u16 + offset as u16;
        (a & p::CONFIG_ENABLE != 0 && bus == 0 && func == 0).then_some((dev as u8, reg))
    }
}

impl BusDevice for ConfigData {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.0.upgrade().as_deref().and_then(|r| ConfigData::target(r, offset).map(|t| (r, t))) {
            Some((root, (slot, reg))) => root.config_read(slot, reg, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(root) = self.0.upgrade()
            && let Some((slot, reg)) = ConfigData::target(&root, offset)
        {
            root.config_write(slot, reg, data);
        }
    }
}

fn shared<D: BusDevice + 'static>(d: D) -> vm_api::SharedDevice {
    Arc::new(Mutex::new(d))
}

impl PciRoot {
    /// Bus 0 on these buses and memory map: ECAM and the legacy ports registered, the
    /// host bridge in slot 0.
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>, memory: Arc<MemoryMap>) -> Result<Arc<PciRoot>, PciError> {
        let alloc = |base: u64, size: u64| AddressAllocator::new(base, size).map_err(|_| PciError::NoSlot);
        let alloc = Allocators {
            mmio32: alloc(p::MMIO32_BASE, p::MMIO32_SIZE)?,
            mmio64: alloc(p::MMIO64_BASE, p::MMIO64_SIZE)?,
            io: alloc(p::IO_BASE, p::IO_SIZE)?,
        };
        let root = Arc::new(PciRoot {
            slots: RwLock::new(vec![None; usize::from(p::SLOTS)]),
            mmio,
            pio,
            memory,
            cf8: AtomicU32::new(0),
            alloc: Mutex::new(alloc),
        });
        let weak = Arc::downgrade(&root);
        root.mmio.insert(p::ECAM_BASE, p::ECAM_SIZE, shared(Ecam(weak.clone())))?;
        root.pio.insert(u64::from(p::CONFIG_ADDRESS), 4, shared(ConfigAddress(weak.clone())))?;
        root.pio.insert(u64::from(p::CONFIG_DATA), 4, shared(ConfigData(weak)))?;
        let bridge = crate::config::Builder::new(p::HOST_BRIDGE_VENDOR, p::HOST_BRIDGE_DEVICE, 0x0600, 0).build();
        root.put(0, Arc::new(HostBridge(bridge)))?;
        Ok(root)
    }

    fn slot(&self, n: u8) -> Option<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).get(usize::from(n)).cloned().flatten()
    }

    /// The function in slot `n`.
    pub fn function(&self, n: u8) -> Option<Arc<dyn PciFunction>> {
        self.slot(n).map(|s| Arc::clone(&s.function))
    }

    /// The functions plugged, by slot.
    pub fn list(&self) -> Vec<(u8, Arc<dyn PciFunction>)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i as u8, Arc::clone(&s.function)))).collect()
    }

    /// The windows of slot `n` registered now.
    pub fn windows(&self, n: u8) -> Vec<BarWindow> {
        self.slot(n).map_or_else(Vec::new, |s| {
            s.windows.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|r| r.window.clone()).collect()
        })
    }

    /// A configuration read of slot `n` (all-ones for an empty slot or a bad access).
    pub fn config_read(&self, n: u8, offset: u16, data: &mut [u8]) {
        match self.slot(n) {
            Some(s) if valid_access(offset, data.len()) => s.function.config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write to slot `n`; the slot's windows follow (a BAR moved or its
    /// decoding switched).
    pub fn config_write(&self, n: u8, offset: u16, data: &[u8]) {
        if let Some(s) = self.slot(n)
            && valid_access(offset, data.len())
        {
            s.function.config_write(offset, data);
            self.sync(&s);
        }
    }

    /// Re-reads slot `n`'s windows (a function that changed them by itself: a device
    /// that died drops its mapped parts).
    pub fn refresh(&self, n: u8) {
        if let Some(s) = self.slot(n) {
            self.sync(&s);
        }
    }

    /// A configuration read through the legacy ports' 256-byte view.
    pub fn legacy_read(&self, n: u8, offset: u16, data: &mut [u8]) {
        if usize::from(offset) + data.len() <= LEGACY_SIZE {
            self.config_read(n, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    /// Plugs `function` in the first free slot: its BARs are placed (naturally aligned,
    /// in their windows), its INTx line is written, memory and I/O decoding are enabled,
    /// and its BARs appear on the buses. Returns the slot.
    pub fn plug(&self, function: Arc<dyn PciFunction>) -> Result<u8, PciError> {
        let n = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            (1..p::SLOTS).find(|&i| slots[usize::from(i)].is_none()).ok_or(PciError::NoSlot)?
        };
        self.plug_at(n, function)?;
        Ok(n)
    }

    /// Plugs `function` in slot `n` (as [`PciRoot::plug`]).
    pub fn plug_at(&self, n: u8, function: Arc<dyn PciFunction>) -> Result<(), PciError> {
        let placed = self.place(n, function.as_ref())?;
        let s = Arc::new(Slot { function, windows: Mutex::new(Vec::new()), placed: Mutex::new(placed) });
        {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let cell = slots.get_mut(usize::from(n)).ok_or(PciError::NoSlot)?;
            if cell.is_some() {
                drop(slots);
                self.free(&s);
                return Err(PciError::SlotTaken(n));
            }
            *cell = Some(Arc::clone(&s));
        }
        self.sync(&s);
        Ok(())
    }

    fn put(&self, n: u8, function: Arc<dyn PciFunction>) -> Result<(), PciError> {
        let s = Arc::new(Slot { function, windows: Mutex::new(Vec::new()), placed: Mutex::new(Vec::new()) });
        self.slots.write().unwrap_or_else(|e| e.into_inner())[usize::from(n)] = Some(s);
        Ok(())
    }

    /// Unplugs slot `n`: its windows leave the buses and the memory map, its addresses
    /// are freed, the function is told. Returns it.
    pub fn unplug(&self, n: u8) -> Option<Arc<dyn PciFunction>> {
        if n == 0 {
            return None;
        }
        let s = self.slots.write().unwrap_or_else(|e| e.into_inner()).get_mut(usize::from(n))?.take()?;
        let mut windows = s.windows.lock().unwrap_or_else(|e| e.into_inner());
        for r in windows.drain(..) {
            self.unregister(&r);
        }
        drop(windows);
        self.free(&s);
        s.function.removed();
        Some(Arc::clone(&s.function))
    }

    fn free(&self, s: &Slot) {
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        for (w, r) in s.placed.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = a.of(w).free(&r);
        }
    }

    /// Firmware's work: size each BAR (all-ones, read back, restore), place it, write
    /// the INTx line, enable decoding.
    fn place(&self, n: u8, f: &dyn PciFunction) -> Result<Vec<(Window, RangeInclusive)>, PciError> {
        let mut placed = Vec::new();
        let mut alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = 0u16;
        while i < 6 {
            let at = reg::BAR0 + 4 * i;
            let probe = |at: u16| {
                let mut orig = [0u8; 4];
                f.config_read(at, &mut orig);
                f.config_write(at, &[0xff; 4]);
                let v = crate::read32(f, at);
                f.config_write(at, &orig);
                v
            };
            let lo = probe(at);
            let wide = lo & abi::pci::bar::IO == 0 && lo & abi::pci::bar::MEM_TYPE_MASK == abi::pci::bar::MEM_TYPE_64;
            let hi = if wide && i < 5 { probe(at + 4) } else { 0 };
            let Some((kind, size)) = size_from_probe(lo, hi) else {
                i += 1;
                continue;
            };
            let mut order = match kind {
                BarKind::Io => vec![Window::Io],
                BarKind::Mem32 { .. } => vec![Window::Mmio32],
                BarKind::Mem64 { .. } => vec![Window::Mmio32, Window::Mmio64],
            };
            let mut got = None;
            for w in order.drain(..) {
                if let Ok(r) = alloc.of(w).allocate(size, size, AllocPolicy::FirstMatch) {
                    got = Some((w, r));
                    break;
                }
            }
            let Some((w, r)) = got else {
                for (w, r) in placed.drain(..) {
                    let _ = alloc.of(w).free(&r);
                }
                let window = if kind == BarKind::Io { "I/O" } else { "memory" };
                return Err(PciError::NoRoom { function: f.name().to_string(), bar: i as u8, size, window });
            };
            let addr = r.start();
            f.config_write(at, &(addr as u32).to_le_bytes());
            if wide {
                f.config_write(at + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            placed.push((w, r));
            i += if wide { 2 } else { 1 };
        }
        drop(alloc);
        let pin = read8(f, reg::INTERRUPT_PIN);
        if (1..=4).contains(&pin) {
            f.config_write(reg::INTERRUPT_LINE, &[p::intx_gsi(n, pin) as u8]);
        }
        let cmd = read16(f, reg::COMMAND) | command::IO | command::MEMORY;
        f.config_write(reg::COMMAND, &cmd.to_le_bytes());
        Ok(placed)
    }

    /// Makes the buses and the memory map show exactly the windows the function
    /// decodes now.
    fn sync(&self, s: &Slot) {
        let want = s.function.windows();
        let mut have = s.windows.lock().unwrap_or_else(|e| e.into_inner());
        let same = |a: &BarWindow, b: &BarWindow| {
            a.bar == b.bar
                && a.io == b.io
                && a.addr == b.addr
                && a.size == b.size
                && a.mapped.len() == b.mapped.len()
                && a.mapped.iter().zip(&b.mapped).all(|(x, y)| {
                    x.0 == y.0 && x.1.host() == y.1.host() && x.1.size == y.1.size && x.1.flags == y.1.flags
                })
        };
        let mut keep = Vec::new();
        for r in have.drain(..) {
            if want.iter().any(|w| same(w, &r.window)) {
                keep.push(r);
            } else {
                self.unregister(&r);
            }
        }
        for w in want {
            if keep.iter().any(|r| same(&w, &r.window)) {
                continue;
            }
            if let Some(r) = self.register(s, w) {
                keep.push(r);
            }
        }
        *have = keep;
    }

    fn register(&self, s: &Slot, w: BarWindow) -> Option<Registered> {
        let bus = if w.io { &self.pio } else { &self.mmio };
        let handler = shared(BarHandler { function: Arc::clone(&s.function), bar: w.bar });
        if let Err(e) = bus.insert(w.addr, w.size, handler) {
            tracing::warn!("{}: BAR {} at {:#x} not mapped: {e}", s.function.name(), w.bar, w.addr);
            return None;
        }
        let mut regions = Vec::new();
        for (off, region) in &w.mapped {
            let gpa = w.addr + off;
            let kind = RegionKind::RamDevice { device: s.function.name().to_string() };
            let mut placed = region.rebased(gpa, kind);
            placed.flags = region.flags;
            match self.memory.add_region(placed) {
                Ok(()) => regions.push(gpa),
                Err(e) => tracing::warn!(
                    "{}: BAR {} memory at {gpa:#x} not mapped (accesses there trap instead): {e}",
                    s.function.name(),
                    w.bar
                ),
            }
        }
        Some(Registered { window: w, regions })
    }

    fn unregister(&self, r: &Registered) {
        for gpa in &r.regions {
            self.memory.remove_region(*gpa);
        }
        let bus = if r.window.io { &self.pio } else { &self.mmio };
        bus.remove(r.window.addr);
    }
}
