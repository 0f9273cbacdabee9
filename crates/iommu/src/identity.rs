//! The identity front-end: no guest-visible IOMMU. A device's DMA addresses are
//! guest-physical addresses, inside the PCI bus's upstream window (`--dma-window`).
//!
//! One domain, shared by every device on this front-end, follows the guest memory map
//! as a memory listener (as QEMU's vfio memory listener does): every RAM region and
//! every RAM-device region (a BAR a device offers for mmap) inside the window is mapped
//! at IOVA = guest-physical while it is in the map. Regions added or removed (RAM
//! hot-add, a BAR the guest moves, a device unplugged) are mapped and unmapped as they
//! happen, inside the change, so before the guest's access that caused it returns.
//! RAM-device regions mapped this way are what peer-to-peer DMA between assigned
//! devices goes through.
//!
//! What fails, and how (the rules of the thread that settled them for QEMU):
//! - RAM not aligned to the domain's granule: a configuration error (the region is
//!   refused; at the first device's attach the attach is refused, naming the fix);
//! - a RAM-device region not aligned: reported (a warning naming the device, a
//!   counter) and skipped, never fatal; DMA to it faults;
//! - a RAM-device map that fails at run time: a warning that peer-to-peer DMA to that
//!   BAR is unavailable (in the stats too); the guest goes on;
//! - a RAM map that fails at run time: every device on the domain is failed (a
//!   surprise removal: they cannot reach guest memory); the VMM goes on;
//! - RAM outside the DMA window: not reachable by devices, reported once per region.
//!
//! Pins: the domain pins the RAM it maps (once, however many devices share it); BAR
//! memory is device memory and is not counted against the locked-memory limit.

use crate::frontend::Registration;
use crate::frontend::{Context, Device, FailDevice, Frontend, FrontendError, Stats};
use dma::{Domain, Gpa, Iova, MapError, Perm, VmDma};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use vm_api::{MemoryListener, MemoryMap, Region, RegionKind};

/// `dma=identity`.
pub const REGISTRATION: Registration = Registration {
    name: "identity",
    help: "guest memory at IOVA = guest-physical, following the memory map (no guest-visible IOMMU)",
    build: |ctx| Ok(Identity::new(ctx) as Arc<dyn Frontend>),
    params: &[],
    tools: &[],
};

struct Shared {
    domain: Option<Arc<Domain>>,
    listener: Option<Arc<dyn MemoryListener>>,
}

#[derive(Default)]
struct Counters {
    mapped_regions: AtomicU64,
    skipped_unaligned: AtomicU64,
    bar_map_failures: AtomicU64,
    ram_map_failures: AtomicU64,
    outside_window: AtomicU64,
}

/// The identity front-end of one VM.
pub struct Identity {
    dma: Arc<VmDma>,
    memory_map: Arc<MemoryMap>,
    window: Range<u64>,
    /// Lock order: `shared` -> the memory map -> `fails`.
    shared: Mutex<Shared>,
    /// The devices on the domain, with how to fail them.
    fails: Mutex<BTreeMap<u16, FailDevice>>,
    counters: Counters,
    /// BARs peer-to-peer DMA cannot reach (unaligned or failed): "device@0xaddr".
    p2p_unavailable: Mutex<Vec<String>>,
    me: Weak<Identity>,
}

/// The listener registered while a device uses the domain.
struct Listener {
    identity: Weak<Identity>,
    domain: Arc<Domain>,
    /// True during the replay at the first attach: failures refuse the attach.
    replaying: std::sync::atomic::AtomicBool,
    /// Why the replay was refused (the attach's error names the fix).
    refused: Mutex<Option<String>>,
}

impl Identity {
    /// The front-end for the VM of `ctx`.
    pub fn new(ctx: &Context) -> Arc<Identity> {
        Arc::new_cyclic(|me| Identity {
            dma: Arc::clone(&ctx.dma),
            memory_map: Arc::clone(&ctx.memory_map),
            window: ctx.dma_window.clone(),
            shared: Mutex::new(Shared { domain: None, listener: None }),
            fails: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            p2p_unavailable: Mutex::new(Vec::new()),
            me: me.clone(),
        })
    }

    /// The shared domain, while a device uses it.
    pub fn domain(&self) -> Option<Arc<Domain>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).domain.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, FailDevice>> {
        self.fails.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every device on the domain. Called inside a memory-map change: a device's
    /// teardown goes back to the memory map (and to this front-end), so it runs on a
    /// thread of its own once the change is done.
    fn fail_all(&self, why: &str) {
        crate::frontend::fail_later(self.devices().values().cloned().collect(), why.to_string());
    }

    fn locked_memory_hint(&self, e: &MapError) -> String {
        match e {
            MapError::NoMemory { limit, .. } => {
                let ram: u64 = self.dma.spans().iter().filter(|s| s.2).map(|s| s.1).sum::<u64>() >> 20;
                format!(
                    "its identity DMA domain pins all {ram} MiB of guest RAM, over the locked-memory limit of {} \
                     MiB; pass --locked-memory {ram}M (or raise `ulimit -l`), or give the guest less --memory",
                    limit >> 20
                )
            }
            other => other.to_string(),
        }
    }
}

fn describe(r: &Region) -> String {
    match &r.kind {
        RegionKind::Ram => format!("RAM {:#x}+{:#x}", r.gpa, r.size),
        RegionKind::RamDevice { device } => format!("device {device} memory {:#x}+{:#x}", r.gpa, r.size),
    }
}

impl MemoryListener for Listener {
    fn name(&self) -> &str {
        "identity-dma"
    }

    fn region_added(&self, r: &Region) -> Result<(), String> {
        let Some(id) = self.identity.upgrade() else { return Ok(()) };
        let ram = matches!(r.kind, RegionKind::Ram);
        let replaying = self.replaying.load(Ordering::Acquire);
        // The part of the region inside the DMA window.
        let (start, end) = (r.gpa.max(id.window.start), r.gpa.saturating_add(r.size).min(id.window.end));
        if start >= end {
            if ram {
                id.counters.outside_window.fetch_add(1, Ordering::Relaxed);
                eprintln!("passthru: {} is outside the DMA window: devices cannot reach it", describe(r));
            }
            return Ok(());
        }
        if start != r.gpa || end != r.gpa + r.size {
            id.counters.outside_window.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "passthru: {} crosses the DMA window's edge: devices reach {start:#x}..{end:#x} only",
                describe(r)
            );
        }
        let g = self.domain.granule();
        if !start.is_multiple_of(g) || !end.is_multiple_of(g) {
            if ram {
                return Err(format!(
                    "{} is not aligned to the DMA page size ({g:#x}): align guest RAM to {g:#x}",
                    describe(r)
                ));
            }
            id.counters.skipped_unaligned.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "passthru: {} is not aligned to the DMA page size ({g:#x}): skipped, peer-to-peer DMA to it faults",
                describe(r)
            );
            id.p2p_unavailable.lock().unwrap_or_else(|e| e.into_inner()).push(describe(r));
            return Ok(());
        }
        match self.domain.map(Iova(start), Gpa(start), end - start, Perm::READ_WRITE) {
            Ok(()) => {
                id.counters.mapped_regions.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if ram && replaying => {
                let why = id.locked_memory_hint(&e);
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                Err(why)
            }
            Err(e) if ram => {
                id.counters.ram_map_failures.fetch_add(1, Ordering::Relaxed);
                let why = format!("{} could not be mapped for DMA: {e}", describe(r));
                eprintln!("passthru: {why}; the devices that need it are failed");
                id.fail_all(&why);
                Ok(())
            }
            Err(e) => {
                id.counters.bar_map_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "passthru: {} could not be mapped for DMA ({e}): peer-to-peer DMA to it is unavailable",
                    describe(r)
                );
                id.p2p_unavailable.lock().unwrap_or_else(|e| e.into_inner()).push(describe(r));
                Ok(())
            }
        }
    }

    fn region_removed(&self, r: &Region) {
        let Some(id) = self.identity.upgrade() else { return };
        let (start, end) = (r.gpa.max(id.window.start), r.gpa.saturating_add(r.size).min(id.window.end));
        if start < end && self.domain.lookup(Iova(start)).is_some_and(|m| m.iova.0 == start) {
            // Unmap means gone: when this returns, no device reaches the region.
            if let Err(e) = self.domain.unmap(Iova(start), end - start) {
                tracing::error!("identity DMA: unmapping {}: {e}", describe(r));
            }
            id.counters.mapped_regions.fetch_sub(1, Ordering::Relaxed);
        }
        id.p2p_unavailable.lock().unwrap_or_else(|e| e.into_inner()).retain(|d| *d != describe(r));
    }
}

impl Frontend for Identity {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn attach(&self, device: &Device) -> Result<(), FrontendError> {
        let mut s = self.lock();
        let domain = match &s.domain {
            Some(d) => Arc::clone(d),
            None => {
                // The first device: the domain is built by replaying the memory map.
                let d = self.dma.create_domain("identity", dma::DomainConfig::default());
                let l = Arc::new(Listener {
                    identity: self.me.clone(),
                    domain: Arc::clone(&d),
                    replaying: std::sync::atomic::AtomicBool::new(true),
                    refused: Mutex::new(None),
                });
                if let Err(e) = self.memory_map.add_listener(l.clone() as Arc<dyn MemoryListener>) {
                    let why = l.refused.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Err(FrontendError::Refused(
                        why.unwrap_or_else(|| format!("its identity DMA domain cannot map guest memory ({e})")),
                    ));
                }
                l.replaying.store(false, Ordering::Release);
                s.listener = Some(l);
                s.domain = Some(Arc::clone(&d));
                d
            }
        };
        if let Err(e) = device.endpoint.attach(Some(domain)) {
            if self.devices().is_empty() {
                self.release(&mut s);
            }
            return Err(FrontendError::Refused(format!("attaching it to the identity domain: {e}")));
        }
        self.devices().insert(device.id, Arc::clone(&device.fail));
        Ok(())
    }

    fn detach(&self, id: u16) {
        // "The last device left" is decided and acted on under `shared`, the lock an
        // attach joins the domain under: a device attaching meanwhile either comes
        // before (and there is no last device) or after (and builds a new domain).
        let mut s = self.lock();
        let last = {
            let mut d = self.devices();
            d.remove(&id).is_some() && d.is_empty()
        };
        if last {
            self.release(&mut s);
        }
    }

    fn stats(&self) -> Stats {
        let s = self.lock();
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats::new()
            .gauge("devices", self.devices().len() as u64)
            .gauge("regions", n(&c.mapped_regions))
            .gauge("mappings", s.domain.as_ref().map_or(0, |d| d.mapping_count() as u64))
            .total("skipped_unaligned", n(&c.skipped_unaligned))
            .total("bar_map_failures", n(&c.bar_map_failures))
            .total("ram_map_failures", n(&c.ram_map_failures))
            .total("outside_window", n(&c.outside_window))
            .gauge("p2p_unavailable", self.p2p_unavailable.lock().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn device_stats(&self, id: u16) -> Option<Stats> {
        let s = self.lock();
        let unavailable = self.p2p_unavailable.lock().unwrap_or_else(|e| e.into_inner()).join(",");
        let known = self.devices().contains_key(&id);
        known.then(|| {
            Stats::new()
                .gauge("mappings", s.domain.as_ref().map_or(0, |d| d.mapping_count() as u64))
                .text("p2p_unavailable", unavailable)
        })
    }
}

impl Identity {
    /// The last device left: stop following the map and unpin everything (with
    /// `shared` held: lock order shared -> the memory map).
    fn release(&self, s: &mut Shared) {
        if let Some(l) = s.listener.take() {
            self.memory_map.remove_listener(&l);
        }
        if let Some(d) = s.domain.take() {
            d.unmap_all();
        }
        self.counters.mapped_regions.store(0, Ordering::Relaxed);
    }
}
