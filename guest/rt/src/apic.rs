//! Local APIC in x2APIC mode (MSR interface), enough to take and end interrupts.

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_ID: u32 = 0x802;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
/// Vector of spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdmsr of architectural APIC MSRs has no memory effects.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: wrmsr of architectural APIC MSRs has no memory effects visible to Rust.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack, preserves_flags))
    }
}

/// Switches the local APIC to x2APIC mode and software-enables it.
pub fn enable_x2apic() {
    let base = rdmsr(IA32_APIC_BASE);
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    wrmsr(X2APIC_SVR, 0x100 | u64::from(SPURIOUS_VECTOR));
}

/// This CPU's x2APIC id.
pub fn id() -> u32 {
    rdmsr(X2APIC_ID) as u32
}

/// Ends the interrupt in service.
#[inline(always)]
pub fn eoi() {
    wrmsr(X2APIC_EOI, 0);
}
