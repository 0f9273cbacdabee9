//! The qtest driver port: a line protocol that drives a machine with no vCPU.
//!
//! One command per line, answered `OK [values]` or `FAIL reason`; interrupts arrive
//! asynchronously as `IRQ raise N` / `IRQ lower N` lines once `irq_intercept_in` was
//! sent. The commands follow QEMU's qtest where QEMU has one; `hcall` is passthru's
//! own and takes exactly the dispatch path of a vCPU's hypercall-port write. The
//! protocol is documented in `docs/qtest.md`.

use crate::accel::{IrqSink, MsiMessage};
use crate::vm::Vm;
use abi::hcall::Args;
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
        match w[0] {
            "outb" | "outw" | "outl" => {
                let size = io_size(w[0]);
                let (port, value) = (port(arg(w, 1)?)?, num(arg(w, 2)?)?);
                check_fits(value, size)?;
                if port == abi::ports::HCALL {
                    return Err("the hypercall port needs registers: use `hcall NR A0 A1 A2 A3 A4`".into());
                }
                self.vm.pio_write(port, &value.to_le_bytes()[..size]);
                Ok("OK".into())
            }
            "inb" | "inw" | "inl" => {
                let size = io_size(w[0]);
                let port = port(arg(w, 1)?)?;
                let mut buf = [0u8; 8];
                self.vm.pio_read(port, &mut buf[..size]);
                Ok(format!("OK 0x{:0width$x}", u64::from_le_bytes(buf), width = 2 * size))
            }
            "readb" | "readw" | "readl" | "readq" => {
                let size = mem_size(w[0]);
                let addr = num(arg(w, 1)?)?;
                let mut buf = [0u8; 8];
                self.vm.phys_read(addr, &mut buf[..size]);
                Ok(format!("OK 0x{:016x}", u64::from_le_bytes(buf)))
            }
            "writeb" | "writew" | "writel" | "writeq" => {
                let size = mem_size(w[0]);
                let (addr, value) = (num(arg(w, 1)?)?, num(arg(w, 2)?)?);
                check_fits(value, size)?;
                self.vm.phys_write(addr, &value.to_le_bytes()[..size]);
                Ok("OK".into())
            }
            "read" => {
                let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
                let mut buf = vec![0u8; size];
                if !self.vm.phys_read(addr, &mut buf) {
                    return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
                }
                Ok(format!("OK 0x{}", hex(&buf)))
            }
            "write" => {
                let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
                let mut data = unhex(arg(w, 3)?)?;
                if data.len() > size {
                    return Err(format!("{} bytes of data for a {size}-byte write", data.len()));
                }
                data.resize(size, 0); // as QEMU: short data is zero-padded
                if !self.vm.phys_write(addr, &data) {
                    return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
                }
                Ok("OK".into())
            }
            "memset" => {
                let (addr, size, value) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?, num(arg(w, 3)?)?);
                check_fits(value, 1)?;
                if !self.vm.phys_write(addr, &vec![value as u8; size]) {
                    return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
                }
                Ok("OK".into())
            }
            "irq_intercept_in" | "irq_intercept_out" => {
                arg(w, 1)?;
                if self.intercepting {
                    return Err("Interception already enabled".into());
                }
                let q = self.vm.qtest().ok_or("interrupt interception needs --accel qtest")?;
                q.set_sink(Some(Arc::new(Sink(Arc::clone(&self.out)))));
                self.intercepting = true;
                Ok("OK".into())
            }
            "hcall" => {
                let nr = num(arg(w, 1)?)?;
                if w.len() > 7 {
                    return Err("hcall takes a number and at most 5 arguments".into());
                }
                let mut a = [0u64; 5];
                for (i, v) in w.iter().skip(2).enumerate() {
                    a[i] = num(v)?;
                }
                let r = self.vm.hypercall(&Args { nr, a });
                Ok(format!("OK {:#x} {:#x} {:#x} {:#x}", r.status as u64, r.r[0], r.r[1], r.r[2]))
            }
            "irq_forward" | "irq_unforward" | "irq_mode" => {
                let id = irq::SourceId::new(arg(w, 1)?, num32(arg(w, 2)?)?, num32(arg(w, 3)?)?);
                let irqs = self.vm.irqs();
                let r = match w[0] {
                    "irq_forward" => irqs.forward(&id),
                    "irq_unforward" => irqs.unforward(&id),
                    _ => irqs.set_mode(&id, arg(w, 4)?.parse::<irq::Mode>()?),
                };
                r.map(|()| "OK".to_string()).map_err(|e| e.to_string())
            }
            "irq_eoi" => {
                // passthru extension: the guest's EOI of a level-triggered line.
                let gsi = num32(arg(w, 1)?)?;
                let q = self.vm.qtest().ok_or("irq_eoi needs the qtest accelerator")?;
                Ok(format!("OK {}", q.eoi(gsi)))
            }
            "irq_list" => {
                let irqs = self.vm.irqs();
                let list: Vec<String> =
                    irqs.sources().iter().filter_map(|id| irqs.stats(id).map(|s| format!("{id}={}", s.mode))).collect();
                Ok(format!("OK {}", list.join(" ")).trim_end().to_string())
            }
            "irq_counts" => {
                let c = self.vm.irqs().counts();
                Ok(format!(
                    "OK sources={} forwarded={} irqfds={} watched={} msi_routes={}",
                    c.sources, c.forwarded, c.irqfds, c.watched, c.msi_routes
                ))
            }
            "dev_info" => {
                let name = arg(w, 1)?;
                let dev = self.vm.device(name).ok_or_else(|| format!("no device '{name}'"))?;
                let f = dev.function();
                let ep = dev.endpoint();
                let last = ep.faults().recent().last().map(|f| f.iova.0).unwrap_or(0);
                Ok(format!(
                    "OK bdf={} dead={} frontend={} bus_master={} irq={} bars={} mappings={} faults={} \
                     last_fault={last:#x} bar_accesses={} err_irqs={} req_irqs={} violations={}",
                    dev.bdf_string(),
                    u8::from(dev.is_torn_down()),
                    dev.frontend().name(),
                    u8::from(f.bus_master()),
                    f.irq_mode(),
                    bars(&dev.bars()),
                    // The device's domain, whether or not bus mastering lets it through.
                    f.domain().map_or(0, |d| d.mapping_count()),
                    ep.faults().total(),
                    f.bar_accesses(),
                    f.notifications().0,
                    f.notifications().1,
                    f.violations()
                ) + &dev
                    .frontend()
                    .device_stats(dev.bdf())
                    .map(|s| s.words().split_whitespace().map(|w| format!(" frontend.{w}")).collect::<String>())
                    .unwrap_or_default())
            }
            "pci_list" => {
                let assigned = self.vm.devices();
                let list: Vec<String> = self
                    .vm
                    .pci()
                    .list()
                    .into_iter()
                    .map(|(slot, f)| {
                        let id = pci::read32(f.as_ref(), abi::pci::reg::VENDOR_ID);
                        let class = pci::read32(f.as_ref(), abi::pci::reg::REVISION) >> 16;
                        let dev = assigned.iter().find(|d| d.slot() == slot);
                        let irq = dev.map_or("none".to_string(), |d| d.function().irq_mode().to_string());
                        format!(
                            "00:{slot:02x}.0 {:04x}:{:04x} class={class:04x} name={} bars={} irq={irq}",
                            id & 0xffff,
                            id >> 16,
                            f.name(),
                            bars(&self.vm.pci().windows(slot))
                        )
                    })
                    .collect();
                Ok(format!("OK {}", list.join("; ")))
            }
            "resources" => Ok(format!("OK {}", crate::resources())),
            "dump" => {
                // passthru extension: the VMM's own read of guest memory (a dump): RAM
                // and device memory, flushed first where flagged non-coherent.
                let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
                let mut buf = vec![0u8; size];
                self.vm.read_memory_for_host(addr, &mut buf).map_err(|e| e.to_string())?;
                Ok(format!("OK 0x{}", hex(&buf)))
            }
            "noncoherent" => {
                let nc = self.vm.device_manager().noncoherent();
                let devices = nc.devices();
                Ok(format!(
                    "OK count={} transitions={} devices={} flushed={}",
                    nc.count(),
                    nc.transitions(),
                    if devices.is_empty() { "-".into() } else { devices.join(",") },
                    crate::flush::flushed_bytes()
                ))
            }
            "mem_flag" => {
                let gpa = num(arg(w, 1)?)?;
                let on = match arg(w, 2)? {
                    "noncoherent" => true,
                    "coherent" => false,
                    other => return Err(format!("'{other}': use noncoherent or coherent")),
                };
                let mut flags = self
                    .vm
                    .memory_map()
                    .regions()
                    .iter()
                    .find(|r| r.gpa == gpa)
                    .map(|r| r.flags)
                    .ok_or_else(|| format!("no region starts at {gpa:#x}"))?;
                flags.noncoherent_dma = on;
                self.vm.memory_map().set_flags(gpa, flags)?;
                Ok("OK".into())
            }
            "memtype" => {
                let list: Vec<String> = self
                    .vm
                    .memory_types()
                    .iter()
                    .map(|(r, flagged, t)| {
                        format!(
                            "{:#x}:{}:slot-wb={},slot-wc={},vmwide-wb={},vmwide-wc={}",
                            r.gpa,
                            if *flagged { "noncoherent" } else { "coherent" },
                            t[0],
                            t[1],
                            t[2],
                            t[3]
                        )
                    })
                    .collect();
                Ok(format!("OK {}", list.join(" ")))
            }
            "dirty_start" => {
                // passthru extension: dirty tracking (vCPU, DMA core, device processes).
                self.vm.dirty_start().map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "dirty_stop" => {
                self.vm.dirty_stop().map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "dirty_take" => {
                // The pages written since the last take, as runs: OK N 0xGPA+0xLEN,...
                let pages = self.vm.dirty_take().map_err(|e| e.to_string())?;
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for p in &pages {
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == *p => *l += 4096,
                        _ => runs.push((*p, 4096)),
                    }
                }
                let list: Vec<String> = runs.iter().map(|(s, l)| format!("{s:#x}+{l:#x}")).collect();
                Ok(format!("OK {} {}", pages.len(), list.join(",")).trim_end().to_string())
            }
            "pause" => {
                // passthru extension (QMP's stop): the vCPU, if any, parks.
                let left = self.vm.pause().map_err(|e| e.to_string())?;
                Ok(if left.is_empty() { "OK".into() } else { format!("OK unquiesced={}", left.join(",")) })
            }
            "resume" => {
                let failed = self.vm.resume().map_err(|e| e.to_string())?;
                Ok(if failed.is_empty() { "OK".into() } else { format!("OK failed={}", failed.join(",")) })
            }
            "run_state" => {
                let (pauses, paused) = self.vm.run_control().pauses();
                Ok(format!("OK {} pauses={pauses} paused_us={}", self.vm.run_control().state(), paused.as_micros()))
            }
            "device_del" => {
                self.vm.detach_device(arg(w, 1)?).map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "ram_add" => {
                // passthru extension: hot-add RAM (the guest is not told).
                let (gpa, size) = (num(arg(w, 1)?)?, num(arg(w, 2)?)?);
                self.vm.add_ram(gpa, size).map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "ram_remove" => {
                self.vm.remove_ram(num(arg(w, 1)?)?).map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "memory_regions" => {
                // passthru extension: the guest memory map (what KVM memory slots and
                // DMA listeners see): RAM, and RAM-device regions with their owner.
                let list: Vec<String> = self
                    .vm
                    .memory_map()
                    .regions()
                    .iter()
                    .map(|r| {
                        let flags = if r.flags == vm_api::RegionFlags::default() {
                            String::new()
                        } else {
                            format!("[{}]", r.flags)
                        };
                        match &r.kind {
                            vm_api::RegionKind::Ram => format!("{:#x}+{:#x}:ram{flags}", r.gpa, r.size),
                            vm_api::RegionKind::RamDevice { device } => {
                                format!("{:#x}+{:#x}:{device}{flags}", r.gpa, r.size)
                            }
                        }
                    })
                    .collect();
                Ok(format!("OK {}", list.join(" ")))
            }
            "frontend_stats" => {
                let name = arg(w, 1)?;
                let fe = self.vm.frontends().get(name).ok_or_else(|| match iommu::registry::find(name) {
                    Some(_) => format!("DMA front-end '{name}' is not in this VM (no device uses it)"),
                    None => format!("no DMA front-end '{name}' (there are: {})", iommu::registry::names()),
                })?;
                match w.get(2) {
                    None => Ok(format!("OK {}", fe.stats())),
                    Some(d) => {
                        let id = match self.vm.device(d) {
                            Some(dev) => dev.bdf(),
                            None => u16::try_from(num(d)?).map_err(|_| format!("{d} is not a device or a BDF"))?,
                        };
                        fe.device_stats(id)
                            .map(|s| format!("OK {s}"))
                            .ok_or_else(|| format!("{name} has no device {d}"))
                    }
                }
            }
            "endianness" => Ok("OK little".into()),
            other => {
                // `NAME_info ARG`: a DMA front-end's own query (e.g. `tce_info LIOBN`).
                if let Some(name) = other.strip_suffix("_info")
                    && let Some(fe) = self.vm.frontends().get(name)
                {
                    let a = arg(w, 1)?;
                    let q = fe.queries().ok_or_else(|| format!("{name} answers no queries"))?;
                    return q.query("info", a).map(|ans| format!("OK {}", ans.fields)).map_err(|e| e.to_string());
                }
                Err(format!("Unknown command '{other}'"))
            }
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
