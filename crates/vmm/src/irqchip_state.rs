//! The in-kernel irqchip (PIC master, PIC slave, IOAPIC) and the clock as a snapshot
//! component (`irqchip`, KVM only).

use crate::accel::KvmAccel;
use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use vm_api::{ComponentError, Section, Snapshottable};

/// The format version of [`ChipState`].
pub const STATE_VERSION: u32 = 1;

/// The irqchip and the clock.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ChipState {
    chips: Vec<kvm_irqchip>,
    clock: kvm_clock_data,
}

impl Snapshottable for KvmAccel {
    fn id(&self) -> String {
        "irqchip".into()
    }

    fn save(&self) -> Result<Option<Section>, ComponentError> {
        let e = |what: &str, err: kvm_ioctls::Error| ComponentError::new("irqchip", format!("{what}: {err}"));
        let mut chips = Vec::new();
        for id in 0..3 {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.vm().get_irqchip(&mut c).map_err(|x| e("KVM_GET_IRQCHIP", x))?;
            chips.push(c);
        }
        let clock = self.vm().get_clock().map_err(|x| e("KVM_GET_CLOCK", x))?;
        Section::new(&self.id(), STATE_VERSION, &ChipState { chips, clock }).map(Some)
    }

    /// Loads the chips, then the clock's value (the flags KVM_GET_CLOCK reports are
    /// not all settable).
    fn restore(&self, section: &Section) -> Result<(), ComponentError> {
        let e = |what: &str, err: kvm_ioctls::Error| ComponentError::new("irqchip", format!("{what}: {err}"));
        let c: ChipState = section.read(&self.id(), STATE_VERSION)?;
        for chip in &c.chips {
            self.vm().set_irqchip(chip).map_err(|x| e("KVM_SET_IRQCHIP", x))?;
        }
        let clock = kvm_clock_data { clock: c.clock.clock, ..Default::default() };
        self.vm().set_clock(&clock).map_err(|x| e("KVM_SET_CLOCK", x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The irqchip's and clock's state round-trips through its section.
        #[test]
        fn the_irqchips_state_round_trips_through_its_section(clock in proptest::prelude::any::<u64>(), ids in proptest::prelude::any::<[u8; 3]>()) {
            let chips = ids.iter().map(|&i| kvm_irqchip { chip_id: u32::from(i % 3), ..Default::default() }).collect();
            let c = ChipState { chips, clock: kvm_clock_data { clock, ..Default::default() } };
            let s = Section::new("irqchip", STATE_VERSION, &c).unwrap();
            let back: Section = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            let again: ChipState = back.read("irqchip", STATE_VERSION).unwrap();
            proptest::prop_assert_eq!(serde_json::to_value(&again).unwrap(), s.state);
        }
    }
}
