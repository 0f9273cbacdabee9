//! Console output: COM1 (copied to the VMM's standard output) and the error console
//! (copied to the VMM's standard error).

use crate::pio::outb;
use abi::ports;

/// COM1, the guest's standard output. Each byte is one port write (one exit).
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(ports::SERIAL_COM1, b);
        }
        Ok(())
    }
}

/// The error console, for panic and fatal-exception reports.
pub struct ErrConsole;

impl core::fmt::Write for ErrConsole {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(ports::ERR_CONSOLE, b);
        }
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Serial, $($arg)*);
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Serial, $($arg)*);
    }};
}

/// Prints a line to the error console.
#[macro_export]
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::ErrConsole, $($arg)*);
    }};
}
