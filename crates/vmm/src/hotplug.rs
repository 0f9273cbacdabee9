//! ACPI PCI hot-plug for Linux guests: the registers the DSDT's `\_SB.PHPR` region
//! maps (`abi::layout::acpi_hotplug`) and the Generic Event Device's interrupt. A device
//! plugged or unplugged sets its slot's bit and raises the GED's GSI; the guest's
//! `_EVT` calls `\_SB.PCI0.PCNT`, which reads the bits (clearing them) and notifies
//! each slot (device check for a plug, eject request for an unplug), so Linux's
//! acpiphp rescans instead of anyone polling the bus.

use abi::layout::acpi_hotplug as regs;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_api::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// The hot-plug state of one VM.
pub struct AcpiHotplug {
    state: Mutex<State>,
    irq: EventFd,
}

#[derive(Default)]
struct State {
    up: u32,
    down: u32,
    ejected: u32,
    events: u64,
}

impl AcpiHotplug {
    /// The registers, raising `irq` (the GED's source) on each change.
    pub fn new(irq: EventFd) -> Arc<AcpiHotplug> {
        Arc::new(AcpiHotplug { state: Mutex::new(State::default()), irq })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device was plugged at `slot`.
    pub fn plugged(&self, slot: u8) {
        self.changed(slot, true);
    }

    /// The device at `slot` was unplugged.
    pub fn unplugged(&self, slot: u8) {
        self.changed(slot, false);
    }

    fn changed(&self, slot: u8, up: bool) {
        let Some(bit) = 1u32.checked_shl(u32::from(slot)) else { return };
        {
            let mut s = self.lock();
            if up {
                s.up |= bit;
                s.down &= !bit;
            } else {
                s.down |= bit;
                s.up &= !bit;
            }
            s.events += 1;
        }
        let _ = self.irq.write(1);
    }

    /// Forgets what is pending (at boot: the kernel enumerates what is there).
    pub fn clear(&self) {
        let mut s = self.lock();
        s.up = 0;
        s.down = 0;
    }

    /// Slots the guest ejected (its `_EJ0`), and hot-plug events raised so far.
    pub fn counts(&self) -> (u32, u64) {
        let s = self.lock();
        (s.ejected, s.events)
    }

    /// The registers as a bus device.
    pub fn registers(self: &Arc<Self>) -> Registers {
        Registers(Arc::clone(self))
    }
}

/// The guest's view of [`AcpiHotplug`].
pub struct Registers(Arc<AcpiHotplug>);

impl BusDevice for Registers {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A whole register read takes (clears) its bits; a partial one only looks, so
        // no slot's bit is lost unseen.
        let whole = data.len() == 4;
        let v = {
            let mut s = self.0.lock();
            let take = |x: &mut u32| if whole { std::mem::take(x) } else { *x };
            match offset {
                regs::UP => take(&mut s.up),
                regs::DOWN => take(&mut s.down),
                regs::EJECT => s.ejected,
                _ => 0,
            }
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == regs::EJECT {
            let mut b = [0u8; 4];
            for (d, s) in b.iter_mut().zip(data) {
                *d = *s;
            }
            self.0.lock().ejected |= u32::from_le_bytes(b);
        }
    }
}
