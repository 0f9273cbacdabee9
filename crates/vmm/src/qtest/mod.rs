//! The qtest driver port: a line protocol that drives a machine with no vCPU.
//!
//! One command per line, answered `OK [values]` or `FAIL reason`; interrupts arrive
//! asynchronously as `IRQ raise N` / `IRQ lower N` lines once `irq_intercept_in` was
//! sent. The commands follow QEMU's qtest where QEMU has one; `hcall` is passthru's
//! own and takes exactly the dispatch path of a vCPU's hypercall-port write. The
//! protocol is documented in `docs/qtest.md`.

mod commands;

use crate::accel::{IrqSink, MsiMessage};
use crate::vm::Vm;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};

/// The session's output, shared with the interrupt reporter.
pub type SharedOut = Arc<Mutex<Box<dyn Write + Send>>>;

/// Largest `read`/`write`/`memset` one command may move (a driver bug, not a reason to
/// allocate without bound).
pub const MAX_BULK: u64 = 16 << 20;

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The input closed.
    Eof,
    /// The exit port was written: the machine stops with this status.
    Exit(u8),
}

struct Sink(SharedOut);

impl Sink {
    fn line(&self, s: &str) {
        let mut o = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }
}

impl IrqSink for Sink {
    fn raise(&self, gsi: u32) {
        self.line(&format!("IRQ raise {gsi}"));
    }
    fn lower(&self, gsi: u32) {
        self.line(&format!("IRQ lower {gsi}"));
    }
    fn msi(&self, msi: MsiMessage) {
        self.line(&format!("IRQ msi {:#x} {:#x}", msi.address, msi.data));
    }
}

/// Serves one session on `vm` until the input closes or the guest-visible exit port
/// is written.
pub fn serve(vm: &Vm, input: impl BufRead, out: SharedOut) -> std::io::Result<End> {
    serve_lines(vm, input.lines(), out)
}

/// Serves one session whose lines come from `lines` (a reader thread owns the input),
/// until the input closes, the exit port is written, or an exit is requested from
/// elsewhere (the control API's `vm.shutdown`), which ends the session at once.
pub fn serve_channel(
    vm: &Vm,
    lines: std::sync::mpsc::Receiver<std::io::Result<String>>,
    out: SharedOut,
) -> std::io::Result<End> {
    let incoming = std::iter::from_fn(|| {
        loop {
            if vm.exit_status().is_some() {
                return None;
            }
            match lines.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(line) => return Some(line),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    });
    let end = serve_lines(vm, incoming, out)?;
    Ok(match vm.exit_status() {
        Some(status) => End::Exit(status),
        None => end,
    })
}

fn serve_lines(vm: &Vm, lines: impl Iterator<Item = std::io::Result<String>>, out: SharedOut) -> std::io::Result<End> {
    let mut session = Session { vm, out, intercepting: false };
    let result = session.run(lines);
    if let Some(q) = vm.qtest() {
        q.set_sink(None);
    }
    result
}

struct Session<'a> {
    vm: &'a Vm,
    out: SharedOut,
    intercepting: bool,
}

impl Session<'_> {
    fn run(&mut self, lines: impl Iterator<Item = std::io::Result<String>>) -> std::io::Result<End> {
        for line in lines {
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            let answer = match self.command(&words) {
                Ok(a) => a,
                Err(reason) => format!("FAIL {reason}"),
            };
            self.reply(&answer)?;
            if let Some(status) = self.vm.exit_status() {
                return Ok(End::Exit(status));
            }
        }
        Ok(End::Eof)
    }

    fn reply(&self, s: &str) -> std::io::Result<()> {
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(o, "{s}")?;
        o.flush()
    }

    fn command(&mut self, w: &[&str]) -> Result<String, String> {
        match commands::TABLE.iter().find(|(name, _)| *name == w[0]) {
            Some((_, run)) => run(self, w),
            None => commands::frontend_info(self, w),
        }
    }
}

/// "0:0xc0000000+0x1000,1:0x10000000000+0x10000" ("-" when none decodes).
fn bars(w: &[pci::BarWindow]) -> String {
    if w.is_empty() {
        return "-".into();
    }
    let list: Vec<String> =
        w.iter().map(|b| format!("{}{}:{:#x}+{:#x}", b.bar, if b.io { "io" } else { "" }, b.addr, b.size)).collect();
    list.join(",")
}

fn arg<'a>(w: &[&'a str], i: usize) -> Result<&'a str, String> {
    w.get(i).copied().ok_or_else(|| format!("{} needs argument {i}", w[0]))
}

/// Parses a number as QEMU does: `0x` hexadecimal or decimal.
fn num(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("invalid number '{s}'"))
}

fn num32(s: &str) -> Result<u32, String> {
    u32::try_from(num(s)?).map_err(|_| format!("'{s}' is above 0xffffffff"))
}

fn port(s: &str) -> Result<u16, String> {
    u16::try_from(num(s)?).map_err(|_| format!("port '{s}' is above 0xffff"))
}

fn bulk_size(s: &str) -> Result<usize, String> {
    let n = num(s)?;
    if n == 0 || n > MAX_BULK {
        return Err(format!("size {n} is outside 1..={MAX_BULK}"));
    }
    usize::try_from(n).map_err(|_| format!("size {n} too large"))
}

fn check_fits(value: u64, size: usize) -> Result<(), String> {
    if size < 8 && value >> (8 * size) != 0 {
        return Err(format!("value {value:#x} does not fit in {size} byte(s)"));
    }
    Ok(())
}

fn io_size(cmd: &str) -> usize {
    match cmd.as_bytes().last() {
        Some(b'w') => 2,
        Some(b'l') => 4,
        _ => 1,
    }
}

fn mem_size(cmd: &str) -> usize {
    match cmd.as_bytes().last() {
        Some(b'w') => 2,
        Some(b'l') => 4,
        Some(b'q') => 8,
        _ => 1,
    }
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(2 * b.len());
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let h = s.strip_prefix("0x").ok_or_else(|| format!("data '{s}' must start with 0x"))?;
    if h.len() % 2 != 0 {
        return Err("hex data has an odd number of digits".into());
    }
    // Bytes, not string slices: the data may hold any UTF-8, not only hex digits.
    let digit = |c: u8| char::from(c).to_digit(16);
    h.as_bytes()
        .chunks_exact(2)
        .map(|p| match (digit(p[0]), digit(p[1])) {
            (Some(a), Some(b)) => Ok((a * 16 + b) as u8),
            _ => Err(format!("invalid hex data '{}'", s.chars().take(40).collect::<String>())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_as_qemu_does() {
        assert_eq!(num("0x10"), Ok(16));
        assert_eq!(num("16"), Ok(16));
        assert!(num("zz").is_err());
        assert!(num("-1").is_err());
        assert_eq!(port("0xffff"), Ok(0xffff));
        assert!(port("0x10000").is_err());
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex("0x00ff10"), Ok(vec![0, 0xff, 0x10]));
        assert_eq!(hex(&[0, 0xff, 0x10]), "00ff10");
        assert!(unhex("00ff").is_err());
        assert!(unhex("0xabc").is_err());
        assert!(unhex("0xzz").is_err());
        assert!(unhex("0x\u{d7bc}\u{d7bc}").is_err(), "multi-byte characters (a fuzzer's find) are errors, not panics");
    }

    #[test]
    fn values_must_fit_their_width() {
        assert!(check_fits(0xff, 1).is_ok());
        assert!(check_fits(0x100, 1).is_err());
        assert!(check_fits(u64::MAX, 8).is_ok());
    }
}
