//! An assigned device as a component that pauses and saves itself: paused, it is
//! stopped through vfio-user migration (no DMA in flight, no interrupt raised);
//! saved, its section holds its guest-visible configuration (as the guest last wrote
//! it), its emulated MSI-X table, and the device's own state (vfio-user migration
//! data). Its BAR memory is streamed to the snapshot's `devmem` file by the snapshot
//! itself.

use crate::device_manager::AssignedDevice;
use serde::{Deserialize, Serialize};
use vfio_user::proto::mig;
use vm_api::{ComponentError, Pausable, Section, Snapshottable};

/// The format version of [`DeviceState`].
pub const STATE_VERSION: u32 = 1;

/// One assigned device in a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// The configuration space as the guest read it.
    pub config: Vec<u8>,
    /// The emulated MSI-X table: BAR, offset, bytes.
    pub msix: Option<(u8, u64, Vec<u8>)>,
    /// The device's own state (vfio-user migration data).
    pub device: Vec<u8>,
    /// It was non-coherent.
    pub noncoherent: bool,
}

impl DeviceState {
    /// Checks its shape (before anything is applied): a configuration space of a
    /// header at least and 4 KiB at most, an MSI-X table inside a BAR's range.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if !(0x40..=4096).contains(&self.config.len()) {
            return Err(format!("device {name}: a malformed configuration space"));
        }
        if let Some((bar, off, table)) = &self.msix
            && (*bar >= 6 || table.len() > 2048 * 16 || off.checked_add(table.len() as u64).is_none())
        {
            return Err(format!("device {name}: a malformed MSI-X table"));
        }
        Ok(())
    }
}

impl AssignedDevice {
    /// Replays a saved configuration through the guest-visible interface, in an order
    /// that works: BARs (decoding off), interrupt line, decoding on, the MSI-X table,
    /// the capabilities (MSI, MSI-X enable, PCIe device control), then the command
    /// register with bus mastering.
    fn replay_config(&self, d: &DeviceState) -> Result<(), String> {
        use abi::pci::{command, reg};
        use pci::PciFunction;
        let c = &d.config;
        if c.len() < 0x40 {
            return Err(format!("device {}: a configuration space of {} bytes", self.name(), c.len()));
        }
        let (slot, pci) = (self.slot(), self.root());
        for off in (reg::BAR0..reg::BAR0 + 24).step_by(4) {
            pci.config_write(slot, off, &c[usize::from(off)..usize::from(off) + 4]);
        }
        pci.config_write(slot, reg::INTERRUPT_LINE, &c[usize::from(reg::INTERRUPT_LINE)..][..1]);
        let cmd = u16::from_le_bytes([c[usize::from(reg::COMMAND)], c[usize::from(reg::COMMAND) + 1]]);
        pci.config_write(slot, reg::COMMAND, &(cmd & !command::MASTER).to_le_bytes());
        if let Some((bar, offset, table)) = &d.msix {
            for (i, chunk) in table.chunks(4).enumerate() {
                self.function().bar_write(*bar, offset + (i * 4) as u64, chunk);
            }
        }
        for off in (0x40..c.len()).step_by(4) {
            if off + 4 <= c.len() {
                pci.config_write(slot, off as u16, &c[off..off + 4]);
            }
        }
        pci.config_write(slot, reg::COMMAND, &cmd.to_le_bytes());
        Ok(())
    }

    /// Why a snapshot cannot save it, if it cannot.
    pub fn cannot_save(&self) -> Option<String> {
        if self.is_torn_down() {
            return Some(format!("device {} is gone: unplug it first", self.name()));
        }
        if !self.function().migration_supported() {
            return Some(format!(
                "device {} does not support migration (vfio-user DEVICE_FEATURE MIGRATION with STOP_COPY)",
                self.name()
            ));
        }
        None
    }
}

impl Snapshottable for AssignedDevice {
    fn id(&self) -> String {
        format!("device/{}", self.name())
    }

    fn can_save(&self) -> Result<(), ComponentError> {
        self.cannot_save().map_or(Ok(()), |why| Err(ComponentError::new(self.id(), why)))
    }

    /// Its state, read while it is stopped.
    fn save(&self) -> Result<Option<Section>, ComponentError> {
        let f = self.function();
        let device = f.save_device_state().map_err(|e| ComponentError::new(self.id(), e))?;
        let state =
            DeviceState { config: f.config_bytes(), msix: f.msix_table(), device, noncoherent: f.is_noncoherent() };
        Section::new(&self.id(), STATE_VERSION, &state).map(Some)
    }

    /// Back to its saved state, attached again with its saved name and slot: its
    /// configuration replayed (the routes and irqfds follow), its non-coherence
    /// declared, its own state loaded (RESUMING -> STOP). It stays stopped until
    /// [`Pausable::resume`].
    fn restore(&self, section: &Section) -> Result<(), ComponentError> {
        let e = |why: String| ComponentError::new(self.id(), why);
        let d: DeviceState = section.read(&self.id(), STATE_VERSION)?;
        d.check(self.name()).map_err(e)?;
        self.replay_config(&d).map_err(e)?;
        if d.noncoherent {
            self.function().mark_noncoherent();
        }
        self.function().set_migration_state(mig::STATE_STOP).map_err(e)?;
        self.function().load_device_state(&d.device).map_err(e)
    }
}

impl Pausable for AssignedDevice {
    /// vfio-user migration STOP.
    fn pause(&self) -> Result<(), ComponentError> {
        if let Some(why) = self.cannot_save() {
            return Err(ComponentError::new(self.id(), format!("cannot be quiesced: {why}")));
        }
        self.function().set_migration_state(mig::STATE_STOP).map_err(|e| ComponentError::new(self.id(), e))
    }

    /// vfio-user migration RUNNING.
    fn resume(&self) -> Result<(), ComponentError> {
        self.function().set_migration_state(mig::STATE_RUNNING).map_err(|e| ComponentError::new(self.id(), e))
    }
}
