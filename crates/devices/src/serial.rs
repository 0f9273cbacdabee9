//! The guest console: a 16550 UART (vm-superio) whose output goes to a writer and
//! whose interrupt is an eventfd (wired to the guest as an irqfd on COM1's GSI).

use std::io::Write;
use vm_api::bus::BusDevice;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt line of the UART: writing the eventfd raises the guest IRQ.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> EventFdTrigger {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550 UART on the PIO bus.
pub struct SerialPort {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART raising `irq` and writing what the guest transmits to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialPort {
        SerialPort { uart: Serial::new(EventFdTrigger::new(irq), out) }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers; wider reads see the register then zeros.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            tracing::warn!("serial write failed: {e:?}");
        }
        // Line-buffered stdout would hold a guest's partial line; flush at newlines.
        if value == b'\n' {
            let _ = self.uart.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_and_lsr_reports_ready() {
        let sink = Sink::default();
        let mut port = SerialPort::new(EventFd::new(libc_nonblock()).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmit holding register empty");
    }

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }
}
