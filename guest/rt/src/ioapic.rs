//! The IOAPIC: routing an irqchip pin (GSI) to a vector on this CPU.

use crate::mmio::write32;
use abi::layout::IOAPIC_ADDR;

const IOREGSEL: u64 = IOAPIC_ADDR;
const IOWIN: u64 = IOAPIC_ADDR + 0x10;
const REDIR_BASE: u32 = 0x10;

fn write_reg(reg: u32, value: u32) {
    // SAFETY: the IOAPIC window is identity-mapped MMIO emulated by the in-kernel
    // irqchip; selecting a register then writing the window has no other effect.
    unsafe {
        write32(IOREGSEL, reg);
        write32(IOWIN, value);
    }
}

/// Routes `pin` to `vector` on APIC `dest` (physical, fixed delivery, active high),
/// edge- or level-triggered, unmasked.
pub fn route(pin: u8, vector: u8, level: bool, dest: u8) {
    let low = u32::from(vector) | (u32::from(level) << 15);
    let reg = REDIR_BASE + 2 * u32::from(pin);
    write_reg(reg + 1, u32::from(dest) << 24);
    write_reg(reg, low);
}

/// Masks `pin`.
pub fn mask(pin: u8) {
    write_reg(REDIR_BASE + 2 * u32::from(pin), 1 << 16);
}
