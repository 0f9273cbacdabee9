//! Runtime for passthru guest programs.
//!
//! A program depends on this crate, writes `fn main(boot: &BootInfo) -> u8` and
//! invokes [`entry!`]. The runtime provides the ELF entry point, console output on
//! COM1 ([`println!`]), a panic handler that reports on the error console and ends the
//! run with [`abi::EXIT_PANIC`], an IDT with per-vector handlers, x2APIC helpers, the
//! hypercall helper and MMIO accessors, drivers for the DMA engine, paravirtual DMA,
//! virtio-pci and virtio-iommu.
//!
//! Print integers with [`fmt::Dec`] and use no width or precision specifiers: see
//! `guest/README.md` for what this machine's instruction emulator executes.
#![no_std]

pub mod apic;
pub mod console;
pub mod dma_engine;
pub mod fmt;
pub mod hcall;
pub mod idt;
pub mod ioapic;
pub mod mem;
pub mod mmio;
pub mod pci;
pub mod pio;
pub mod pvdma;
pub mod viommu;
pub mod virtio;

pub use abi;
pub use abi::layout::BootInfo;

/// Ends the run: the VMM exits with `status`.
pub fn exit(status: u8) -> ! {
    pio::outb(abi::ports::EXIT, status);
    // The VMM never resumes a guest after an exit-port write; spin defensively.
    loop {
        core::hint::spin_loop();
    }
}

/// Declares the program's `main`. The runtime's entry point installs the IDT, calls
/// `main` with the boot information and exits with the status `main` returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        extern "C" fn __rt_main(boot: &$crate::BootInfo) -> u8 {
            let f: fn(&$crate::BootInfo) -> u8 = $main;
            f(boot)
        }
    };
}

unsafe extern "C" {
    fn __rt_main(boot: &BootInfo) -> u8;
}

/// ELF entry point. The VMM starts the vCPU here in long mode with
/// `rsp = STACK_TOP - 8` and `rdi` pointing to the [`BootInfo`].
///
/// # Safety
/// Only the VMM calls this, once, with a valid boot-information pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start(boot: *const BootInfo) -> ! {
    idt::init();
    // Mask both legacy 8259 PICs: interrupts come through the IOAPIC and MSIs. KVM
    // resets the boot CPU's LINT0 to ExtINT, so an unmasked, uninitialised PIC would
    // turn irqchip pins into low vectors that look like exceptions.
    pio::outb(0x21, 0xff);
    pio::outb(0xa1, 0xff);
    // SAFETY: the VMM wrote a BootInfo at this address before starting the vCPU and
    // nothing writes it afterwards.
    let boot = unsafe { &*boot };
    if boot.magic != abi::layout::BOOT_MAGIC {
        panic!("bad boot information magic {:#x}", boot.magic);
    }
    // SAFETY: the program defined __rt_main through `entry!`.
    let status = unsafe { __rt_main(boot) };
    exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let mut err = console::ErrConsole;
    let _ = match info.location() {
        Some(l) => write!(err, "guest panicked at {}:{}: {}\n", l.file(), l.line(), info.message()),
        None => write!(err, "guest panicked: {}\n", info.message()),
    };
    exit(abi::EXIT_PANIC)
}

/// Required by the linker for `core` even with `panic=abort`; never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
