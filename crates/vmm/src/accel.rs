//! The accelerator: what runs the machine. [`KvmAccel`] is a KVM VM with an in-kernel
//! irqchip; [`QtestAccel`] runs the same machine with no vCPU and no KVM, for the
//! qtest driver port. Both offer the same services to the rest of the VMM: memory
//! slots, ioeventfds, irqfds, MSI routes and direct interrupt injection.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

pub use irq::MsiMessage;

pub use vm_api::IoAddr;

/// Which accelerator a machine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelKind {
    /// KVM with one vCPU.
    Kvm,
    /// No vCPU: the machine is driven through the qtest port.
    Qtest,
}

/// First GSI above the IOAPIC pins: free for MSI routes.
pub const FIRST_MSI_GSI: u32 = abi::layout::IOAPIC_PINS;
/// Pins of the in-kernel IOAPIC.
const IOAPIC_PINS: u32 = abi::layout::IOAPIC_PINS;
/// Pins of the two cascaded in-kernel PICs.
const PIC_PINS: u32 = 16;

/// An accelerator's ioeventfds as the VM service devices ask for.
pub struct AccelIo(pub Arc<dyn Accel>);

impl vm_api::IoEvents for AccelIo {
    fn register_ioevent(&self, fd: &EventFd, addr: IoAddr) -> std::io::Result<()> {
        self.0.register_ioevent(fd, addr).map_err(std::io::Error::other)
    }
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoAddr) -> std::io::Result<()> {
        self.0.unregister_ioevent(fd, addr).map_err(std::io::Error::other)
    }
}

/// Services the machine needs from whatever runs it (interrupt services come from
/// the [`irq::IrqChip`] supertrait).
pub trait Accel: irq::IrqChip {
    /// Which accelerator this is.
    fn kind(&self) -> AccelKind;

    /// Makes `[gpa, gpa + size)` guest RAM backed by host memory at `host`.
    ///
    /// # Safety
    /// `host` must stay mapped and valid for `size` bytes until the slot is removed.
    unsafe fn add_memslot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: *mut u8,
        flags: vm_api::RegionFlags,
    ) -> Result<()>;

    /// Removes a memory slot added with [`Accel::add_memslot`].
    fn remove_memslot(&self, slot: u32, gpa: u64) -> Result<()>;

    /// Signals `fd` on guest writes to `addr` instead of exiting to the VMM.
    fn register_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()>;

    /// Undoes [`Accel::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()>;

    /// For accelerators that emulate ioeventfds in the VMM (qtest): signals and
    /// returns true if a write to `addr` is caught by a registered ioeventfd.
    fn emulate_ioevent(&self, _addr: IoAddr) -> bool {
        false
    }
}

/// KVM: a VM with an in-kernel irqchip (PIC, IOAPIC, LAPIC).
pub struct KvmAccel {
    kvm: kvm_ioctls::Kvm,
    vm: kvm_ioctls::VmFd,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// Environment variable that overrides [`KVM_PATH`] (tests use it to check the
/// message a machine without KVM gets).
pub const KVM_PATH_ENV: &str = "PASSTHRU_KVM_DEVICE";

/// The KVM device to open.
pub fn kvm_path() -> String {
    std::env::var(KVM_PATH_ENV).unwrap_or_else(|_| KVM_PATH.to_string())
}

impl KvmAccel {
    /// Opens the KVM device and creates a VM with an in-kernel irqchip.
    pub fn new() -> Result<KvmAccel> {
        let path = kvm_path();
        let unavailable = |e| Error::KvmUnavailable { path: path.clone(), source: e };
        let cpath =
            std::ffi::CString::new(path.clone()).map_err(|_| unavailable(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = kvm_ioctls::Kvm::new_with_path(&cpath).map_err(unavailable)?;
        let vm = kvm.create_vm().map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        // Intel VMX needs a TSS region below 4 GiB for real-mode emulation; harmless elsewhere.
        vm.set_tss_address(0xfffb_d000).map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        Ok(KvmAccel { kvm, vm, routes: Mutex::new(BTreeMap::new()) })
    }

    /// The KVM system fd (for CPUID queries).
    pub fn kvm(&self) -> &kvm_ioctls::Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn vm(&self) -> &kvm_ioctls::VmFd {
        &self.vm
    }

    /// Installs the whole GSI routing table: the default irqchip routes plus `msi`.
    fn push_routes(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<()> {
        use kvm_bindings::{KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < PIC_PINS {
                let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
                e.u.irqchip.irqchip = if gsi < 8 { 0 } else { 1 };
                e.u.irqchip.pin = gsi % 8;
                entries.push(e);
            }
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
            e.u.irqchip.irqchip = 2;
            e.u.irqchip.pin = gsi;
            entries.push(e);
        }
        for (&gsi, m) in msi {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| Error::TooManyRoutes(entries.len()))?;
        self.vm.set_gsi_routing(&table).map_err(|e| Error::Kvm("KVM_SET_GSI_ROUTING", e))
    }
}

impl Accel for KvmAccel {
    fn kind(&self) -> AccelKind {
        AccelKind::Kvm
    }

    unsafe fn add_memslot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: *mut u8,
        flags: vm_api::RegionFlags,
    ) -> Result<()> {
        // KVM has no per-slot flag for non-coherent DMA (that is per VM, through the
        // KVM-VFIO device): the slot carries what KVM knows, dirty logging.
        let kvm_flags = if flags.log_dirty { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: kvm_flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller guarantees `host` is valid for `size` bytes for the life of
        // the slot (this function's contract).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn remove_memslot(&self, slot: u32, gpa: u64) -> Result<()> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn register_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()> {
        self.vm
            .register_ioevent(fd, &kvm_addr(addr), kvm_ioctls::NoDatamatch)
            .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()> {
        self.vm
            .unregister_ioevent(fd, &kvm_addr(addr), kvm_ioctls::NoDatamatch)
            .map_err(|e| Error::Kvm("KVM_IOEVENTFD (deassign)", e))
    }
}

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn reserved(gsi: u32) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, Error::GsiReserved(gsi).to_string())
}

impl irq::IrqChip for KvmAccel {
    fn assign_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> std::io::Result<()> {
        match resample {
            Some(r) => self.vm.register_irqfd_with_resample(fd, r, gsi),
            None => self.vm.register_irqfd(fd, gsi),
        }
        .map_err(io_err)
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io_err)
    }

    fn set_msi_route(&self, gsi: u32, msi: MsiMessage) -> std::io::Result<()> {
        if gsi < FIRST_MSI_GSI {
            return Err(reserved(gsi));
        }
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let old = routes.insert(gsi, msi);
        let pushed = self.push_routes(&routes);
        if pushed.is_err() {
            match old {
                Some(m) => routes.insert(gsi, m),
                None => routes.remove(&gsi),
            };
        }
        pushed.map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn remove_msi_route(&self, gsi: u32) -> std::io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.remove(&gsi).is_some() {
            self.push_routes(&routes).map_err(|e| std::io::Error::other(e.to_string()))
        } else {
            Ok(())
        }
    }

    fn signal_msi(&self, msi: MsiMessage) -> std::io::Result<()> {
        let m = kvm_bindings::kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        self.vm.signal_msi(m).map(|_| ()).map_err(io_err)
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> std::io::Result<()> {
        self.vm.set_irq_line(gsi, level).map_err(io_err)
    }

    fn first_msi_gsi(&self) -> u32 {
        FIRST_MSI_GSI
    }
}

fn kvm_addr(addr: IoAddr) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoAddr::Pio(p) => kvm_ioctls::IoEventAddress::Pio(p),
        IoAddr::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

/// Where the qtest accelerator reports interrupts (the qtest session's output).
pub trait IrqSink: Send + Sync {
    /// `gsi` was raised (edge) or its line went high.
    fn raise(&self, gsi: u32);
    /// The line of `gsi` went low.
    fn lower(&self, gsi: u32);
    /// An MSI was injected directly.
    fn msi(&self, msi: MsiMessage);
}

/// No vCPU, no KVM: ioeventfds are emulated by the VMM's dispatch and interrupts are
/// reported to an [`IrqSink`] (the qtest session) by a watcher thread.
pub struct QtestAccel {
    /// Per address: (the caller's descriptor number, our duplicate).
    ioevents: Mutex<BTreeMap<IoAddr, Vec<(RawFd, EventFd)>>>,
    watcher: crate::irq_watch::IrqWatcher,
    sink: Arc<Mutex<Option<Arc<dyn IrqSink>>>>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
    /// Resample eventfds of level-triggered irqfds, by GSI: (caller's number, ours).
    resamples: Mutex<BTreeMap<u32, Vec<(RawFd, EventFd)>>>,
}

impl QtestAccel {
    /// A qtest accelerator; interrupts are dropped until a sink is set.
    pub fn new() -> Result<QtestAccel> {
        let sink: Arc<Mutex<Option<Arc<dyn IrqSink>>>> = Arc::new(Mutex::new(None));
        let s = Arc::clone(&sink);
        let watcher = crate::irq_watch::IrqWatcher::new(Box::new(move |gsi| {
            if let Some(sink) = s.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                sink.raise(gsi);
            }
        }))?;
        Ok(QtestAccel {
            ioevents: Mutex::new(BTreeMap::new()),
            watcher,
            sink,
            routes: Mutex::new(BTreeMap::new()),
            resamples: Mutex::new(BTreeMap::new()),
        })
    }

    /// Sets (or clears) where interrupts are reported.
    pub fn set_sink(&self, sink: Option<Arc<dyn IrqSink>>) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = sink;
    }

    /// The end of interrupt of level-triggered `gsi`, as the guest's EOI reaching the
    /// IOAPIC would do it: the line's resample eventfds are signalled (a device that
    /// still asserts raises it again). Returns how many were signalled.
    pub fn eoi(&self, gsi: u32) -> usize {
        let map = self.resamples.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&gsi).map_or(0, |list| list.iter().filter(|(_, e)| e.write(1).is_ok()).count())
    }

    /// The MSI route of `gsi`, if any (for tests).
    pub fn msi_route(&self, gsi: u32) -> Option<MsiMessage> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(&gsi).copied()
    }

    fn with_sink(&self, f: impl FnOnce(&dyn IrqSink)) {
        if let Some(sink) = self.sink.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            f(sink.as_ref());
        }
    }
}

impl Accel for QtestAccel {
    fn kind(&self) -> AccelKind {
        AccelKind::Qtest
    }

    unsafe fn add_memslot(
        &self,
        _slot: u32,
        _gpa: u64,
        _size: u64,
        _host: *mut u8,
        _flags: vm_api::RegionFlags,
    ) -> Result<()> {
        Ok(())
    }

    fn remove_memslot(&self, _slot: u32, _gpa: u64) -> Result<()> {
        Ok(())
    }

    fn register_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()> {
        let clone = fd.try_clone().map_err(Error::EventFd)?;
        let mut map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(addr).or_default();
        if list.iter().any(|(key, _)| *key == fd.as_raw_fd()) {
            return Err(Error::AlreadyRegistered("ioeventfd"));
        }
        list.push((fd.as_raw_fd(), clone));
        Ok(())
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: IoAddr) -> Result<()> {
        let mut map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.get_mut(&addr).ok_or(Error::NotRegistered("ioeventfd"))?;
        let key = fd.as_raw_fd();
        let pos = list.iter().position(|(k, _)| *k == key).ok_or(Error::NotRegistered("ioeventfd"))?;
        list.remove(pos);
        if list.is_empty() {
            map.remove(&addr);
        }
        Ok(())
    }

    fn emulate_ioevent(&self, addr: IoAddr) -> bool {
        let map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&addr) {
            Some(list) => {
                for (_, e) in list {
                    let _ = e.write(1);
                }
                true
            }
            None => false,
        }
    }
}

impl irq::IrqChip for QtestAccel {
    fn assign_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> std::io::Result<()> {
        self.watcher.add(fd, gsi).map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(r) = resample {
            let ours = r.try_clone()?;
            self.resamples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(gsi)
                .or_default()
                .push((fd.as_raw_fd(), ours));
        }
        Ok(())
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        {
            let mut map = self.resamples.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = map.get_mut(&gsi) {
                list.retain(|(n, _)| *n != fd.as_raw_fd());
                if list.is_empty() {
                    map.remove(&gsi);
                }
            }
        }
        self.watcher.remove(fd, gsi).map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn set_msi_route(&self, gsi: u32, msi: MsiMessage) -> std::io::Result<()> {
        if gsi < FIRST_MSI_GSI {
            return Err(reserved(gsi));
        }
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(gsi, msi);
        Ok(())
    }

    fn remove_msi_route(&self, gsi: u32) -> std::io::Result<()> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&gsi);
        Ok(())
    }

    fn signal_msi(&self, msi: MsiMessage) -> std::io::Result<()> {
        self.with_sink(|s| s.msi(msi));
        Ok(())
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> std::io::Result<()> {
        self.with_sink(|s| if level { s.raise(gsi) } else { s.lower(gsi) });
        Ok(())
    }

    fn first_msi_gsi(&self) -> u32 {
        FIRST_MSI_GSI
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Count(AtomicU64);
    impl IrqSink for Count {
        fn raise(&self, _gsi: u32) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn lower(&self, _gsi: u32) {}
        fn msi(&self, _msi: MsiMessage) {}
    }

    fn wait_for(c: &Count, n: u64) -> bool {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(5) {
            if c.0.load(Ordering::Relaxed) >= n {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn two_irqfds_on_one_gsi_are_two_irqfds_and_a_huge_count_is_one_interrupt() {
        use irq::IrqChip;
        let q = QtestAccel::new().unwrap();
        let sink = Arc::new(Count::default());
        q.set_sink(Some(sink.clone()));
        let (a, b) = (irq::eventfd().unwrap(), irq::eventfd().unwrap());
        q.assign_irqfd(&a, 30, None).unwrap();
        q.assign_irqfd(&b, 30, None).unwrap(); // every eventfd shares one inode: not a reason to refuse
        assert!(q.assign_irqfd(&a, 30, None).is_err(), "the same irqfd twice is refused");
        a.write(u64::MAX - 1).unwrap();
        assert!(wait_for(&sink, 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(sink.0.load(Ordering::Relaxed), 1, "one wake-up, one interrupt (as KVM's irqfd)");
        q.deassign_irqfd(&a, 30).unwrap();
        b.write(1).unwrap();
        assert!(wait_for(&sink, 2), "the other irqfd still delivers");
        a.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(sink.0.load(Ordering::Relaxed), 2, "the deassigned one does not");
        assert!(q.deassign_irqfd(&a, 30).is_err());
        q.deassign_irqfd(&b, 30).unwrap();
    }

    #[test]
    fn two_ioeventfds_on_one_address_are_told_apart() {
        let q = QtestAccel::new().unwrap();
        let (a, b) = (irq::eventfd().unwrap(), irq::eventfd().unwrap());
        q.register_ioevent(&a, IoAddr::Pio(0x80)).unwrap();
        q.register_ioevent(&b, IoAddr::Pio(0x80)).unwrap();
        q.unregister_ioevent(&b, IoAddr::Pio(0x80)).unwrap();
        assert!(q.emulate_ioevent(IoAddr::Pio(0x80)));
        assert_eq!(a.read().unwrap(), 1, "the one still registered was signalled");
        assert!(b.read().is_err(), "the unregistered one was not");
    }
}
