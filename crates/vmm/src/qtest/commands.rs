//! The qtest commands, one function each, found by name in [`TABLE`]. Each takes the
//! session and the command's words and answers `OK ...` (or an error, sent as
//! `FAIL reason`).

use super::{Session, Sink, arg, bars, bulk_size, check_fits, hex, io_size, mem_size, num, num32, port, unhex};
use abi::hcall::Args;
use std::sync::Arc;

/// What runs one command.
pub(super) type Command = fn(&mut Session<'_>, &[&str]) -> Result<String, String>;

/// Every command by name.
pub(super) const TABLE: &[(&str, Command)] = &[
    ("outb", cmd_out),
    ("outw", cmd_out),
    ("outl", cmd_out),
    ("inb", cmd_in),
    ("inw", cmd_in),
    ("inl", cmd_in),
    ("readb", cmd_read_n),
    ("readw", cmd_read_n),
    ("readl", cmd_read_n),
    ("readq", cmd_read_n),
    ("writeb", cmd_write_n),
    ("writew", cmd_write_n),
    ("writel", cmd_write_n),
    ("writeq", cmd_write_n),
    ("read", cmd_read),
    ("write", cmd_write),
    ("memset", cmd_memset),
    ("irq_intercept_in", cmd_irq_intercept),
    ("irq_intercept_out", cmd_irq_intercept),
    ("hcall", cmd_hcall),
    ("irq_forward", cmd_irq_switch),
    ("irq_unforward", cmd_irq_switch),
    ("irq_mode", cmd_irq_switch),
    ("irq_eoi", cmd_irq_eoi),
    ("irq_list", cmd_irq_list),
    ("irq_counts", cmd_irq_counts),
    ("dev_info", cmd_dev_info),
    ("pci_list", cmd_pci_list),
    ("resources", cmd_resources),
    ("dump", cmd_dump),
    ("noncoherent", cmd_noncoherent),
    ("mem_flag", cmd_mem_flag),
    ("memtype", cmd_memtype),
    ("dirty_start", cmd_dirty_start),
    ("dirty_stop", cmd_dirty_stop),
    ("dirty_take", cmd_dirty_take),
    ("pause", cmd_pause),
    ("resume", cmd_resume),
    ("run_state", cmd_run_state),
    ("device_del", cmd_device_del),
    ("ram_add", cmd_ram_add),
    ("ram_remove", cmd_ram_remove),
    ("memory_regions", cmd_memory_regions),
    ("frontend_stats", cmd_frontend_stats),
    ("endianness", cmd_endianness),
];

/// `NAME_info ARG`: a DMA front-end's own `info` query (e.g. `tce_info LIOBN`); any
/// other word is an unknown command.
pub(super) fn frontend_info(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    if let Some(name) = w[0].strip_suffix("_info")
        && let Some(fe) = s.vm.frontends().get(name)
    {
        let a = arg(w, 1)?;
        let q = fe.queries().ok_or_else(|| format!("{name} answers no queries"))?;
        return q.query("info", a).map(|ans| format!("OK {}", ans.fields)).map_err(|e| e.to_string());
    }
    Err(format!("Unknown command '{}'", w[0]))
}

fn cmd_out(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let size = io_size(w[0]);
    let (port, value) = (port(arg(w, 1)?)?, num(arg(w, 2)?)?);
    check_fits(value, size)?;
    if port == abi::ports::HCALL {
        return Err("the hypercall port needs registers: use `hcall NR A0 A1 A2 A3 A4`".into());
    }
    s.vm.pio_write(port, &value.to_le_bytes()[..size]);
    Ok("OK".into())
}

fn cmd_in(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let size = io_size(w[0]);
    let port = port(arg(w, 1)?)?;
    let mut buf = [0u8; 8];
    s.vm.pio_read(port, &mut buf[..size]);
    Ok(format!("OK 0x{:0width$x}", u64::from_le_bytes(buf), width = 2 * size))
}

fn cmd_read_n(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let size = mem_size(w[0]);
    let addr = num(arg(w, 1)?)?;
    let mut buf = [0u8; 8];
    s.vm.phys_read(addr, &mut buf[..size]);
    Ok(format!("OK 0x{:016x}", u64::from_le_bytes(buf)))
}

fn cmd_write_n(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let size = mem_size(w[0]);
    let (addr, value) = (num(arg(w, 1)?)?, num(arg(w, 2)?)?);
    check_fits(value, size)?;
    s.vm.phys_write(addr, &value.to_le_bytes()[..size]);
    Ok("OK".into())
}

fn cmd_read(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
    let mut buf = vec![0u8; size];
    if !s.vm.phys_read(addr, &mut buf) {
        return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
    }
    Ok(format!("OK 0x{}", hex(&buf)))
}

fn cmd_write(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
    let mut data = unhex(arg(w, 3)?)?;
    if data.len() > size {
        return Err(format!("{} bytes of data for a {size}-byte write", data.len()));
    }
    data.resize(size, 0); // as QEMU: short data is zero-padded
    if !s.vm.phys_write(addr, &data) {
        return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
    }
    Ok("OK".into())
}

fn cmd_memset(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let (addr, size, value) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?, num(arg(w, 3)?)?);
    check_fits(value, 1)?;
    if !s.vm.phys_write(addr, &vec![value as u8; size]) {
        return Err(format!("nothing at {addr:#x}+{size:#x} (not RAM, no device)"));
    }
    Ok("OK".into())
}

fn cmd_irq_intercept(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    arg(w, 1)?;
    if s.intercepting {
        return Err("Interception already enabled".into());
    }
    let q = s.vm.qtest().ok_or("interrupt interception needs --accel qtest")?;
    q.set_sink(Some(Arc::new(Sink(Arc::clone(&s.out)))));
    s.intercepting = true;
    Ok("OK".into())
}

fn cmd_hcall(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let nr = num(arg(w, 1)?)?;
    if w.len() > 7 {
        return Err("hcall takes a number and at most 5 arguments".into());
    }
    let mut a = [0u64; 5];
    for (i, v) in w.iter().skip(2).enumerate() {
        a[i] = num(v)?;
    }
    let r = s.vm.hypercall(&Args { nr, a });
    Ok(format!("OK {:#x} {:#x} {:#x} {:#x}", r.status as u64, r.r[0], r.r[1], r.r[2]))
}

fn cmd_irq_switch(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let id = irq::SourceId::new(arg(w, 1)?, num32(arg(w, 2)?)?, num32(arg(w, 3)?)?);
    let irqs = s.vm.irqs();
    let r = match w[0] {
        "irq_forward" => irqs.forward(&id),
        "irq_unforward" => irqs.unforward(&id),
        _ => irqs.set_mode(&id, arg(w, 4)?.parse::<irq::Mode>()?),
    };
    r.map(|()| "OK".to_string()).map_err(|e| e.to_string())
}

fn cmd_irq_eoi(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    // passthru extension: the guest's EOI of a level-triggered line.
    let gsi = num32(arg(w, 1)?)?;
    let q = s.vm.qtest().ok_or("irq_eoi needs the qtest accelerator")?;
    Ok(format!("OK {}", q.eoi(gsi)))
}

fn cmd_irq_list(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let irqs = s.vm.irqs();
    let list: Vec<String> =
        irqs.sources().iter().filter_map(|id| irqs.stats(id).map(|s| format!("{id}={}", s.mode))).collect();
    Ok(format!("OK {}", list.join(" ")).trim_end().to_string())
}

fn cmd_irq_counts(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let c = s.vm.irqs().counts();
    Ok(format!(
        "OK sources={} forwarded={} irqfds={} watched={} msi_routes={}",
        c.sources, c.forwarded, c.irqfds, c.watched, c.msi_routes
    ))
}

fn cmd_dev_info(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let name = arg(w, 1)?;
    let dev = s.vm.device(name).ok_or_else(|| format!("no device '{name}'"))?;
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

fn cmd_pci_list(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let assigned = s.vm.devices();
    let list: Vec<String> =
        s.vm.pci()
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
                    bars(&s.vm.pci().windows(slot))
                )
            })
            .collect();
    Ok(format!("OK {}", list.join("; ")))
}

fn cmd_resources(_s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    Ok(format!("OK {}", crate::resources()))
}

fn cmd_dump(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    // passthru extension: the VMM's own read of guest memory (a dump): RAM
    // and device memory, flushed first where flagged non-coherent.
    let (addr, size) = (num(arg(w, 1)?)?, bulk_size(arg(w, 2)?)?);
    let mut buf = vec![0u8; size];
    s.vm.read_memory_for_host(addr, &mut buf).map_err(|e| e.to_string())?;
    Ok(format!("OK 0x{}", hex(&buf)))
}

fn cmd_noncoherent(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let nc = s.vm.device_manager().noncoherent();
    let devices = nc.devices();
    Ok(format!(
        "OK count={} transitions={} devices={} flushed={}",
        nc.count(),
        nc.transitions(),
        if devices.is_empty() { "-".into() } else { devices.join(",") },
        crate::flush::flushed_bytes()
    ))
}

fn cmd_mem_flag(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let gpa = num(arg(w, 1)?)?;
    let on = match arg(w, 2)? {
        "noncoherent" => true,
        "coherent" => false,
        other => return Err(format!("'{other}': use noncoherent or coherent")),
    };
    let mut flags =
        s.vm.memory_map()
            .regions()
            .iter()
            .find(|r| r.gpa == gpa)
            .map(|r| r.flags)
            .ok_or_else(|| format!("no region starts at {gpa:#x}"))?;
    flags.noncoherent_dma = on;
    s.vm.memory_map().set_flags(gpa, flags)?;
    Ok("OK".into())
}

fn cmd_memtype(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let list: Vec<String> =
        s.vm.memory_types()
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

fn cmd_dirty_start(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    // passthru extension: dirty tracking (vCPU, DMA core, device processes).
    s.vm.dirty_start().map_err(|e| e.to_string())?;
    Ok("OK".into())
}

fn cmd_dirty_stop(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    s.vm.dirty_stop().map_err(|e| e.to_string())?;
    Ok("OK".into())
}

fn cmd_dirty_take(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    // The pages written since the last take, as runs: OK N 0xGPA+0xLEN,...
    let pages = s.vm.dirty_take().map_err(|e| e.to_string())?;
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

fn cmd_pause(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    // passthru extension (QMP's stop): the vCPU, if any, parks.
    let left = s.vm.pause().map_err(|e| e.to_string())?;
    Ok(if left.is_empty() { "OK".into() } else { format!("OK unquiesced={}", left.join(",")) })
}

fn cmd_resume(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let failed = s.vm.resume().map_err(|e| e.to_string())?;
    Ok(if failed.is_empty() { "OK".into() } else { format!("OK failed={}", failed.join(",")) })
}

fn cmd_run_state(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    let (pauses, paused) = s.vm.run_control().pauses();
    Ok(format!("OK {} pauses={pauses} paused_us={}", s.vm.run_control().state(), paused.as_micros()))
}

fn cmd_device_del(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    s.vm.detach_device(arg(w, 1)?).map_err(|e| e.to_string())?;
    Ok("OK".into())
}

fn cmd_ram_add(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    // passthru extension: hot-add RAM (the guest is not told).
    let (gpa, size) = (num(arg(w, 1)?)?, num(arg(w, 2)?)?);
    s.vm.add_ram(gpa, size).map_err(|e| e.to_string())?;
    Ok("OK".into())
}

fn cmd_ram_remove(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    s.vm.remove_ram(num(arg(w, 1)?)?).map_err(|e| e.to_string())?;
    Ok("OK".into())
}

fn cmd_memory_regions(s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    // passthru extension: the guest memory map (what KVM memory slots and
    // DMA listeners see): RAM, and RAM-device regions with their owner.
    let list: Vec<String> =
        s.vm.memory_map()
            .regions()
            .iter()
            .map(|r| {
                let flags =
                    if r.flags == vm_api::RegionFlags::default() { String::new() } else { format!("[{}]", r.flags) };
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

fn cmd_frontend_stats(s: &mut Session<'_>, w: &[&str]) -> Result<String, String> {
    let name = arg(w, 1)?;
    let fe = s.vm.frontends().get(name).ok_or_else(|| match iommu::registry::find(name) {
        Some(_) => format!("DMA front-end '{name}' is not in this VM (no device uses it)"),
        None => format!("no DMA front-end '{name}' (there are: {})", iommu::registry::names()),
    })?;
    match w.get(2) {
        None => Ok(format!("OK {}", fe.stats())),
        Some(d) => {
            let id = match s.vm.device(d) {
                Some(dev) => dev.bdf(),
                None => u16::try_from(num(d)?).map_err(|_| format!("{d} is not a device or a BDF"))?,
            };
            fe.device_stats(id).map(|s| format!("OK {s}")).ok_or_else(|| format!("{name} has no device {d}"))
        }
    }
}

fn cmd_endianness(_s: &mut Session<'_>, _w: &[&str]) -> Result<String, String> {
    Ok("OK little".into())
}
