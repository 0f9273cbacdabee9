//! Saving and loading an assigned function for snapshots: the device's own state over
//! vfio-user migration (DEVICE_FEATURE, MIG_DATA_READ/WRITE; the same calls reach a
//! device model in the VMM), and what the VMM keeps for it (the guest's view of its
//! configuration space, the emulated MSI-X table), which a restore replays through the
//! guest-visible interface.

use super::AssignedFunction;
use pci::PciFunction;
use vfio_user::proto::mig;

/// Largest device state accepted (a malformed device must not make the VMM allocate
/// without bound).
pub const MAX_DEVICE_STATE: usize = 64 << 20;

impl AssignedFunction {
    /// True when the device can be migrated (DEVICE_FEATURE MIGRATION offers STOP_COPY).
    pub fn migration_supported(&self) -> bool {
        self.backend
            .device_feature(mig::FEATURE_GET | mig::FEATURE_MIGRATION, &[], 16)
            .ok()
            .and_then(|d| d.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes))
            .is_some_and(|f| f & mig::MIGRATION_STOP_COPY != 0)
    }

    /// Moves the device to migration state `state` (its arcs walked by the device).
    pub fn set_migration_state(&self, state: u32) -> Result<(), String> {
        let data = [state.to_le_bytes(), u32::MAX.to_le_bytes()].concat();
        self.backend
            .device_feature(mig::FEATURE_SET | mig::FEATURE_MIG_DEVICE_STATE, &data, 16)
            .map(|_| ())
            .map_err(|e| format!("device {}: migration state {state}: {e}", self.name))
    }

    /// The device's state: it must be stopped; STOP -> STOP_COPY, read to the end, STOP.
    pub fn save_device_state(&self) -> Result<Vec<u8>, String> {
        self.set_migration_state(mig::STATE_STOP_COPY)?;
        let mut out = Vec::new();
        loop {
            let chunk = self
                .backend
                .mig_data_read(64 << 10)
                .map_err(|e| format!("device {}: MIG_DATA_READ: {e}", self.name))?;
            if chunk.is_empty() {
                break;
            }
            if out.len() + chunk.len() > MAX_DEVICE_STATE {
                return Err(format!("device {}: its state is over {MAX_DEVICE_STATE} bytes", self.name));
            }
            out.extend_from_slice(&chunk);
        }
        self.set_migration_state(mig::STATE_STOP)?;
        Ok(out)
    }

    /// Loads a state from [`AssignedFunction::save_device_state`]: RESUMING, the data,
    /// STOP (the device checks and applies it). It stays stopped.
    pub fn load_device_state(&self, state: &[u8]) -> Result<(), String> {
        self.set_migration_state(mig::STATE_RESUMING)?;
        self.backend.mig_data_write(state).map_err(|e| format!("device {}: MIG_DATA_WRITE: {e}", self.name))?;
        self.set_migration_state(mig::STATE_STOP)
    }

    /// Dirty logging on for the device's own writes (a device process writing guest
    /// memory in place through a shared file: invisible to the VMM otherwise).
    pub fn dirty_start(&self) -> Result<(), String> {
        let own = self.backend.dirty_start().map_err(|e| format!("device {}: DMA_LOGGING_START: {e}", self.name))?;
        self.dirty_logging.store(own, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Dirty logging off (logging is off on the VMM's side even if the device refuses).
    pub fn dirty_stop(&self) -> Result<(), String> {
        if self.dirty_logging.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.backend.dirty_stop().map_err(|e| format!("device {}: DMA_LOGGING_STOP: {e}", self.name))?;
        }
        Ok(())
    }

    /// The guest-physical pages (4 KiB) the device wrote in place since the last call,
    /// through each mapping of its domain; the device clears what it reports.
    pub fn dirty_take(&self, out: &mut Vec<u64>) -> Result<(), String> {
        if !self.dirty_logging.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let Some(domain) = self.domain() else { return Ok(()) };
        for m in domain.mappings() {
            let bits = self
                .backend
                .dirty_report(m.iova.0, m.size)
                .map_err(|e| format!("device {}: DMA_LOGGING_REPORT at {:#x}: {e}", self.name, m.iova.0))?;
            // The device's bits name pages of this mapping only.
            dma::pages_of_bits(m.gpa.0, &bits, m.size.div_ceil(4096), out);
        }
        Ok(())
    }

    /// The configuration space as the guest reads it.
    pub fn config_bytes(&self) -> Vec<u8> {
        let size = self.lock().config.size;
        let mut out = vec![0u8; usize::from(size)];
        for (i, chunk) in out.chunks_mut(4).enumerate() {
            self.config_read((i * 4) as u16, chunk);
        }
        out
    }

    /// The emulated MSI-X table: its BAR, its offset there, its bytes.
    pub fn msix_table(&self) -> Option<(u8, u64, Vec<u8>)> {
        let c = self.msix?;
        let mut bytes = vec![0u8; c.table_size() as usize];
        let st = self.lock();
        let t = st.irqs.table.as_ref()?;
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            t.read((i * 4) as u64, chunk);
        }
        Some((c.table.0, c.table.1, bytes))
    }
}
