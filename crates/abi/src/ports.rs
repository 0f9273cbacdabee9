//! I/O port numbers the guest uses (port I/O, so every access is one `in`/`out`).

/// COM1 16550 UART: guest console, copied to the VMM's standard output.
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_LEN: u16 = 8;
/// Guest IRQ line (GSI) of COM1.
pub const SERIAL_GSI: u32 = 4;

/// Exit port: an 8-bit write ends the run; the byte is the VMM's exit code.
pub const EXIT: u16 = 0xf4;

/// Error console: bytes written here go to the VMM's standard error (panic messages).
pub const ERR_CONSOLE: u16 = 0xe9;

/// Hypercall port: a 32-bit write of the call number (also in `rax`) makes a hypercall.
/// See [`crate::hcall`] for the register convention.
pub const HCALL: u16 = 0xf6;

/// A port bound to a KVM ioeventfd for the exit benchmark: writes never exit to the VMM.
pub const BENCH_IOEVENTFD: u16 = 0xf8;

/// Acknowledge port of the VMM's test interrupt source (an ioeventfd, no exit): the
/// guest writes it after handling a test interrupt so the source fires the next one.
pub const TEST_IRQ_ACK: u16 = 0xf9;

/// Status port of the level-triggered test source: reads 1 while its line is
/// asserted; any write deasserts it (the guest's "interrupt handled").
pub const TEST_INTX_STATUS: u16 = 0xfa;
