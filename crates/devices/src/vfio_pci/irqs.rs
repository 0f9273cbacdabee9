//! An assigned function's interrupts, emulated by the VMM: INTx (a level line through
//! the registry's resample path), MSI and MSI-X (each vector a registry source whose
//! route and mask follow the guest's programming; the MSI-X table and pending bits live
//! here, never in the device). Only the mode the guest enables is set up with the
//! device: INTx by default when the function has a pin, MSI or MSI-X once enabled.

use super::backend::VfioDevice;
use irq::{GuestIrq, IrqRegistry, IrqSource, MsiMessage, SourceId, Trigger};
use pci::msi::MsiState;
use pci::msix::{MsixCap, MsixTable};
use std::any::Any;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use vfio_user::proto::{self, SetIrqs};
use vmm_sys_util::eventfd::EventFd;

/// Which interrupt mode the function is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// None set up (no pin, or the device is gone).
    None,
    /// INTx on this GSI.
    Intx(u32),
    /// MSI with this many vectors.
    Msi(u8),
    /// MSI-X.
    Msix,
}

impl std::fmt::Display for IrqMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IrqMode::None => write!(f, "none"),
            IrqMode::Intx(gsi) => write!(f, "intx:{gsi}"),
            IrqMode::Msi(n) => write!(f, "msi:{n}"),
            IrqMode::Msix => write!(f, "msix"),
        }
    }
}

/// The interrupt state of one function.
pub struct Interrupts {
    name: String,
    registry: Arc<IrqRegistry>,
    /// What a source holds while attached (the function).
    owner: Arc<dyn Any + Send + Sync>,
    /// The current mode.
    pub mode: IrqMode,
    /// The MSI-X table (kept even while MSI-X is off: the guest programs it first).
    pub table: Option<MsixTable>,
    /// The MSI-X capability, if any.
    pub msix: Option<MsixCap>,
    /// The vectors the device may raise for each index (from its IRQ info).
    counts: [u32; 3],
}

fn set(flags: u32, index: u32, start: u32, count: u32) -> SetIrqs {
    SetIrqs { flags, index, start, count }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Interrupts {
    /// For a function named `name` whose device offers `counts` vectors of INTx, MSI
    /// and MSI-X.
    pub fn new(
        name: &str,
        registry: Arc<IrqRegistry>,
        owner: Arc<dyn Any + Send + Sync>,
        msix: Option<MsixCap>,
        counts: [u32; 3],
    ) -> Interrupts {
        Interrupts {
            name: name.to_string(),
            registry,
            owner,
            mode: IrqMode::None,
            table: msix.map(|c| MsixTable::new(c.vectors)),
            msix,
            counts,
        }
    }

    /// The registry name of a vector.
    pub fn source(&self, index: u32, vector: u32) -> SourceId {
        SourceId::new(&self.name, index, vector)
    }

    /// Switches to `want` (tearing the current mode down first). On failure the
    /// function is left with no interrupts and the error says why.
    pub fn switch(&mut self, dev: &dyn VfioDevice, want: IrqMode, msi: Option<MsiState>) -> Result<(), String> {
        if want == self.mode && !matches!(want, IrqMode::Msi(_)) {
            return Ok(());
        }
        self.teardown(dev);
        let r = match want {
            IrqMode::None => Ok(()),
            IrqMode::Intx(gsi) => self.start_intx(dev, gsi),
            IrqMode::Msi(n) => self.start_msi(dev, n, msi.unwrap_or_default()),
            IrqMode::Msix => self.start_msix(dev),
        };
        match r {
            Ok(()) => {
                self.mode = want;
                Ok(())
            }
            Err(e) => {
                self.teardown(dev);
                Err(e)
            }
        }
    }

    fn start_intx(&mut self, dev: &dyn VfioDevice, gsi: u32) -> Result<(), String> {
        if self.counts[proto::PCI_INTX as usize] == 0 {
            return Ok(());
        }
        let (trigger, resample) =
            (irq::eventfd().map_err(|e| err("eventfd", e))?, irq::eventfd().map_err(|e| err("eventfd", e))?);
        let (t, r) = (trigger.as_raw_fd(), resample.as_raw_fd());
        let src = IrqSource { id: self.source(proto::PCI_INTX, 0), trigger: Trigger::Level { trigger, resample } };
        self.registry.attach(src, GuestIrq::Level(gsi), Arc::clone(&self.owner)).map_err(|e| err("INTx", e))?;
        let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
        dev.set_irqs(set(trig, proto::PCI_INTX, 0, 1), &[t]).map_err(|e| err("setting up INTx", e))?;
        // The resample eventfd as the device's unmask event (vfio's INTx protocol).
        // libvfio-user accepts it and ignores it; its line drops at the guest's EOI.
        let unmask = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_UNMASK;
        if let Err(e) = dev.set_irqs(set(unmask, proto::PCI_INTX, 0, 1), &[r]) {
            tracing::debug!("{}: INTx unmask eventfd refused ({e}); the EOI lowers the line", self.name);
        }
        Ok(())
    }

    fn start_msi(&mut self, dev: &dyn VfioDevice, n: u8, st: MsiState) -> Result<(), String> {
        let n = u32::from(n).min(self.counts[proto::PCI_MSI as usize]);
        let mut fds: Vec<EventFd> = Vec::new();
        for v in 0..n {
            let fd = irq::eventfd().map_err(|e| err("eventfd", e))?;
            let msg = MsiMessage { address: st.address, data: st.data_of(v as u8) };
            let src = IrqSource {
                id: self.source(proto::PCI_MSI, v),
                trigger: Trigger::Edge(fd.try_clone().map_err(|e| err("eventfd", e))?),
            };
            self.registry.attach(src, GuestIrq::Msi(msg), Arc::clone(&self.owner)).map_err(|e| err("MSI", e))?;
            if st.mask & (1 << v) != 0 {
                let _ = self.registry.set_masked(&self.source(proto::PCI_MSI, v), true);
            }
            fds.push(fd);
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
        dev.set_irqs(set(trig, proto::PCI_MSI, 0, n), &raw).map_err(|e| err("setting up MSI", e))
    }

    fn start_msix(&mut self, dev: &dyn VfioDevice) -> Result<(), String> {
        let n = self.table.as_ref().map_or(0, |t| u32::from(t.len())).min(self.counts[proto::PCI_MSIX as usize]);
        let mut fds: Vec<EventFd> = Vec::new();
        for v in 0..n {
            let fd = irq::eventfd().map_err(|e| err("eventfd", e))?;
            let e = self.table.as_ref().and_then(|t| t.entry(v as u16)).unwrap_or_default();
            let src = IrqSource {
                id: self.source(proto::PCI_MSIX, v),
                trigger: Trigger::Edge(fd.try_clone().map_err(|e| err("eventfd", e))?),
            };
            let msg = MsiMessage { address: e.address, data: e.data };
            self.registry.attach(src, GuestIrq::Msi(msg), Arc::clone(&self.owner)).map_err(|e| err("MSI-X", e))?;
            fds.push(fd);
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
        dev.set_irqs(set(trig, proto::PCI_MSIX, 0, n), &raw).map_err(|e| err("setting up MSI-X", e))?;
        Ok(())
    }

    /// Applies the MSI-X mask-all bit and each vector's table entry to its source.
    pub fn sync_msix(&mut self, mask_all: bool) {
        if self.mode != IrqMode::Msix {
            return;
        }
        let Some(t) = &self.table else { return };
        for v in 0..t.len() {
            self.sync_vector(v, mask_all);
        }
    }

    /// Applies vector `v`'s table entry (message, mask) to its source.
    pub fn sync_vector(&mut self, v: u16, mask_all: bool) {
        if self.mode != IrqMode::Msix {
            return;
        }
        let Some(e) = self.table.as_ref().and_then(|t| t.entry(v)) else { return };
        let id = self.source(proto::PCI_MSIX, u32::from(v));
        let valid = abi::layout::is_msi_address(e.address);
        if valid && let Err(err) = self.registry.set_msi(&id, MsiMessage { address: e.address, data: e.data }) {
            tracing::debug!("{}: MSI-X vector {v}: {err}", self.name);
        }
        // A vector whose address is not an interrupt message stays masked.
        let _ = self.registry.set_masked(&id, e.masked() || mask_all || !valid);
    }

    /// Applies MSI registers (message, masks) to the sources of an enabled MSI.
    pub fn sync_msi(&mut self, st: MsiState) {
        let IrqMode::Msi(n) = self.mode else { return };
        for v in 0..u32::from(n) {
            let id = self.source(proto::PCI_MSI, v);
            let msg = MsiMessage { address: st.address, data: st.data_of(v as u8) };
            if abi::layout::is_msi_address(msg.address) {
                let _ = self.registry.set_msi(&id, msg);
            }
            let _ = self.registry.set_masked(&id, st.mask & (1 << v) != 0);
        }
    }

    /// Masks or unmasks INTx (COMMAND's INTx-disable bit).
    pub fn mask_intx(&self, masked: bool) {
        if matches!(self.mode, IrqMode::Intx(_)) {
            let _ = self.registry.set_masked(&self.source(proto::PCI_INTX, 0), masked);
        }
    }

    /// The pending-bit array at `offset` (a vector is pending when it fired masked).
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        let Some(t) = &mut self.table else {
            data.fill(0);
            return;
        };
        if self.mode == IrqMode::Msix {
            for v in 0..t.len() {
                let pending = self.registry.is_pending(&SourceId::new(&self.name, proto::PCI_MSIX, u32::from(v)));
                t.set_pending(v, pending);
            }
        }
        t.read_pba(offset, data);
    }

    /// Tears the current mode down with the device and the registry.
    pub fn teardown(&mut self, dev: &dyn VfioDevice) {
        let (index, n) = match self.mode {
            IrqMode::None => return,
            IrqMode::Intx(_) => (proto::PCI_INTX, 1),
            IrqMode::Msi(n) => (proto::PCI_MSI, u32::from(n)),
            IrqMode::Msix => (proto::PCI_MSIX, self.counts[proto::PCI_MSIX as usize]),
        };
        self.mode = IrqMode::None;
        for v in 0..n {
            let _ = self.registry.detach(&self.source(index, v));
        }
        if !dev.is_closed() {
            let off = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER;
            if let Err(e) = dev.set_irqs(set(off, index, 0, 0), &[]) {
                tracing::debug!("{}: disabling IRQ index {index}: {e}", self.name);
            }
        }
    }

    /// Forgets every source without talking to the device (it is gone).
    pub fn forget(&mut self) {
        self.mode = IrqMode::None;
        self.registry.detach_device(&self.name);
    }
}
