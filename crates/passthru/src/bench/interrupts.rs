//! `bench irq`: forwarded against VMM-delivered interrupts.

use super::*;

#[derive(Serialize, Debug)]
struct IrqFigure {
    mode: String,
    interrupts: u64,
    wall_ms: f64,
    /// Interrupts delivered per second (guest-paced: each acknowledged before the next).
    rate_per_s: f64,
    /// CPU time of the VMM's delivery thread per interrupt.
    vmm_cpu_ns_per_irq: f64,
    /// Interrupts the VMM injected itself.
    vmm_delivered: u64,
}

pub(super) fn irq_bench(interrupts: u64, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if interrupts == 0 {
        return Err("--interrupts must be at least 1".into());
    }
    let elf = crate::run::load_guest("irqstorm")?;
    let mut figures = Vec::new();
    for mode in [irq::Mode::Forwarded, irq::Mode::Vmm] {
        let mut config = VmConfig::new(AccelKind::Kvm);
        config.irq_mode = mode;
        config.test_sources = true;
        config.serial_out = Box::new(std::io::sink());
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        let cpu0 = vm.irqs().delivery_cpu_ns();
        let t = Instant::now();
        let status = vm.run_guest_with_args(&elf, &[interrupts, 0]).map_err(|e| e.to_string())?;
        let wall = t.elapsed();
        let cpu = vm.irqs().delivery_cpu_ns().saturating_sub(cpu0);
        let s = vm.test_sources().map(|t| t.msi.summary()).unwrap_or_default();
        if status != 0 || s.guest_counted != Some(interrupts) {
            return Err(format!("the irqstorm guest failed in {mode} mode (status {status}, {s:?})"));
        }
        let vmm_delivered =
            vm.irqs().stats(&devices::test_irq::MsiTestSource::id()).map(|x| x.vmm_delivered).unwrap_or(0);
        figures.push(IrqFigure {
            mode: mode.to_string(),
            interrupts,
            wall_ms: wall.as_secs_f64() * 1e3,
            rate_per_s: interrupts as f64 / wall.as_secs_f64(),
            vmm_cpu_ns_per_irq: cpu as f64 / interrupts as f64,
            vmm_delivered,
        });
    }
    println!("passthru bench irq: {interrupts} MSIs per mode, guest-paced, one run");
    println!("{:<12} {:>10} {:>12} {:>16} {:>14}", "mode", "wall ms", "irq/s", "VMM CPU ns/irq", "VMM-injected");
    for f in &figures {
        println!(
            "{:<12} {:>10.1} {:>12.0} {:>16.0} {:>14}",
            f.mode, f.wall_ms, f.rate_per_s, f.vmm_cpu_ns_per_irq, f.vmm_delivered
        );
    }
    let (fw, vm) = (&figures[0], &figures[1]);
    println!(
        "forwarded / vmm: rate x{:.2}, VMM CPU per interrupt {:.0} ns vs {:.0} ns (goal: forwarded costs the VMM no CPU per interrupt)",
        fw.rate_per_s / vm.rate_per_s,
        fw.vmm_cpu_ns_per_irq,
        vm.vmm_cpu_ns_per_irq
    );
    write_json(json, &figures)?;
    Ok(ExitCode::SUCCESS)
}
