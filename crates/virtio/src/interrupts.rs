//! A virtio function's MSI-X vectors: each an eventfd attached to the VM's interrupt
//! registry (forwarded by KVM or delivered by the VMM, switchable like any source)
//! while MSI-X is enabled, its message and mask following the guest's table.

use irq::{GuestIrq, IrqRegistry, IrqSource, MsiMessage, SourceId, Trigger};
use pci::msix::MsixTable;
use std::any::Any;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// The registry index a function's MSI-X vectors are named with (VFIO's MSI-X index).
pub const MSIX_INDEX: u32 = 2;

/// The MSI-X vectors of one function.
pub struct Vectors {
    name: String,
    registry: Arc<IrqRegistry>,
    owner: Arc<dyn Any + Send + Sync>,
    /// The table and pending bits as the guest programs them.
    pub table: MsixTable,
    triggers: Vec<EventFd>,
    enabled: bool,
    mask_all: bool,
}

impl Vectors {
    /// `count` vectors of function `name` (sources `name/2/v`), held by `owner`.
    pub fn new(
        name: &str,
        registry: Arc<IrqRegistry>,
        owner: Arc<dyn Any + Send + Sync>,
        count: u16,
    ) -> std::io::Result<Vectors> {
        let triggers = (0..count).map(|_| irq::eventfd()).collect::<std::io::Result<Vec<_>>>()?;
        Ok(Vectors {
            name: name.to_string(),
            registry,
            owner,
            table: MsixTable::new(count),
            triggers,
            enabled: false,
            mask_all: false,
        })
    }

    fn id(&self, v: u16) -> SourceId {
        SourceId::new(&self.name, MSIX_INDEX, u32::from(v))
    }

    /// MSI-X enabled or disabled, all vectors masked or not (the capability's control).
    pub fn set_control(&mut self, enabled: bool, mask_all: bool) {
        if enabled && !self.enabled {
            for v in 0..self.table.len() {
                let Some(fd) = self.triggers.get(usize::from(v)).and_then(|f| f.try_clone().ok()) else { continue };
                let e = self.table.entry(v).unwrap_or_default();
                let source = IrqSource { id: self.id(v), trigger: Trigger::Edge(fd) };
                let msg = GuestIrq::Msi(MsiMessage { address: e.address, data: e.data });
                if let Err(err) = self.registry.attach(source, msg, Arc::clone(&self.owner)) {
                    tracing::warn!("{}: MSI-X vector {v}: {err}", self.name);
                }
            }
        } else if !enabled && self.enabled {
            for v in 0..self.table.len() {
                let _ = self.registry.detach(&self.id(v));
            }
        }
        self.enabled = enabled;
        self.mask_all = mask_all;
        if enabled {
            for v in 0..self.table.len() {
                self.sync(v);
            }
        }
    }

    /// Applies vector `v`'s table entry (message, mask) to its source.
    pub fn sync(&mut self, v: u16) {
        if !self.enabled {
            return;
        }
        let Some(e) = self.table.entry(v) else { return };
        let id = self.id(v);
        let valid = abi::layout::is_msi_address(e.address);
        if valid {
            let _ = self.registry.set_msi(&id, MsiMessage { address: e.address, data: e.data });
        }
        // A vector whose address is not an interrupt message stays masked.
        let _ = self.registry.set_masked(&id, e.masked() || self.mask_all || !valid);
    }

    /// Signals vector `v` (nothing if MSI-X is off or `v` is none: the ISR bit, set by
    /// the caller, is all the driver gets).
    pub fn signal(&self, v: u16) {
        if !self.enabled || v == abi::virtio::NO_VECTOR {
            return;
        }
        if let Some(fd) = self.triggers.get(usize::from(v)) {
            let _ = fd.write(1);
        }
    }

    /// The pending bits at `offset` (a vector is pending when it fired masked).
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        for v in 0..self.table.len() {
            let pending = self.enabled && self.registry.is_pending(&self.id(v));
            self.table.set_pending(v, pending);
        }
        self.table.read_pba(offset, data);
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Back to reset: MSI-X off (sources detached), the table cleared.
    pub fn reset(&mut self) {
        self.set_control(false, false);
        self.table.reset();
    }
}

impl Drop for Vectors {
    fn drop(&mut self) {
        if self.enabled {
            for v in 0..self.table.len() {
                let _ = self.registry.detach(&self.id(v));
            }
        }
    }
}
