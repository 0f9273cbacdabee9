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

#[derive(Serialize, Debug)]
struct IrqReport {
    interrupts: u64,
    /// Forwarded, then VMM-delivered.
    figures: Vec<IrqFigure>,
}

pub(super) fn irq_bench(interrupts: u64, runs: u32, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if interrupts == 0 {
        return Err("--interrupts must be at least 1".into());
    }
    let title = format!("passthru bench irq: {interrupts} MSIs per mode, guest-paced");
    repeat(&title, runs, json, || measure(interrupts), figures)?;
    println!("goal: forwarded interrupts cost the VMM no CPU per interrupt (KVM delivers them)");
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &IrqReport) -> Vec<Fig> {
    let mut v = Vec::new();
    for f in &r.figures {
        v.push(Fig::new(format!("{}: interrupts per second", f.mode), "1/s", f.rate_per_s));
        let cpu = Fig::new(format!("{}: VMM CPU per interrupt", f.mode), "ns", f.vmm_cpu_ns_per_irq);
        // "No CPU per interrupt": below a microsecond, i.e. nothing but timer noise
        // spread over the run.
        v.push(if f.mode == "forwarded" { cpu.goal(Goal::AtMost(1000.0)) } else { cpu });
        v.push(Fig::new(format!("{}: interrupts the VMM injected", f.mode), "count", f.vmm_delivered as f64));
    }
    if let [fw, vmm] = &r.figures[..] {
        v.push(Fig::new("forwarded rate / vmm rate", "ratio", fw.rate_per_s / vmm.rate_per_s));
    }
    v
}

fn measure(interrupts: u64) -> Result<IrqReport, String> {
    let elf = guests::load("irqstorm")?;
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
    Ok(IrqReport { interrupts, figures })
}
