//! Small fixed devices of every passthru machine: the exit port, the error console
//! and a null device (the MMIO exit benchmark's target).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use vm_api::bus::BusDevice;

/// Where the exit port records the guest's exit status.
#[derive(Debug, Default)]
pub struct ExitLatch(AtomicU16);

const NO_EXIT: u16 = u16::MAX;

impl ExitLatch {
    /// A latch with no exit requested.
    pub fn new() -> Arc<ExitLatch> {
        Arc::new(ExitLatch(AtomicU16::new(NO_EXIT)))
    }

    /// The status the guest asked to exit with, if it did.
    pub fn status(&self) -> Option<u8> {
        let v = self.0.load(Ordering::Acquire);
        u8::try_from(v).ok()
    }

    /// Requests an exit with `status` (the first request wins).
    pub fn request(&self, status: u8) {
        let _ = self.0.compare_exchange(NO_EXIT, u16::from(status), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Forgets a request: a driver that keeps using the machine after the exit port
    /// (the qtest fuzzer replaying sessions) starts clean.
    pub fn clear(&self) {
        self.0.store(NO_EXIT, Ordering::Release);
    }
}

/// The exit port ([`abi::ports::EXIT`]): a write requests the end of the run.
#[derive(Debug)]
pub struct ExitPort(pub Arc<ExitLatch>);

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.0.request(status);
        }
    }
}

/// The error console ([`abi::ports::ERR_CONSOLE`]): bytes are written to `out`
/// (standard error) a line at a time, so guest reports are not interleaved mid-line.
pub struct ErrConsole {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

/// Longest line kept before it is flushed anyway: a guest cannot grow it unbounded.
const MAX_LINE: usize = 4096;

impl ErrConsole {
    /// An error console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> ErrConsole {
        ErrConsole { out, line: Vec::new() }
    }
}

impl BusDevice for ErrConsole {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// A byte per `out`; string I/O (`rep outsb`) brings many in one write.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                let _ = self.out.write_all(&self.line);
                let _ = self.out.flush();
                self.line.clear();
            }
        }
    }
}

impl Drop for ErrConsole {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let _ = self.out.write_all(&self.line);
            let _ = self.out.write_all(b"\n");
        }
    }
}

/// Reads as zero, ignores writes.
#[derive(Debug, Default)]
pub struct NullDevice;

impl BusDevice for NullDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_request_wins() {
        let latch = ExitLatch::new();
        assert_eq!(latch.status(), None);
        let mut port = ExitPort(latch.clone());
        port.write(0, &[7]);
        port.write(0, &[9]);
        assert_eq!(latch.status(), Some(7));
    }

    #[test]
    fn exit_status_zero_is_an_exit() {
        let latch = ExitLatch::new();
        ExitPort(latch.clone()).write(0, &[0]);
        assert_eq!(latch.status(), Some(0));
    }
}
