//! `bench exits`: the cost of a null hypercall-port exit, an MMIO exit and an ioeventfd
//! write, the figures later benchmarks are reported against.

use super::*;

/// One measured figure.
#[derive(Serialize, Debug)]
struct Figure {
    name: &'static str,
    /// Nanoseconds per operation, the guest loop's own cost subtracted.
    ns_per_op: f64,
    /// Nanoseconds per operation as measured (loop included).
    raw_ns_per_op: f64,
    /// Ratio to the null hypercall-port exit of the same run.
    ratio_to_null_exit: f64,
}

#[derive(Serialize, Debug)]
struct ExitsReport {
    iterations: u64,
    loop_ns_per_iteration: f64,
    figures: Vec<Figure>,
}

pub(super) fn exits(iterations: u64, runs: u32, json: Option<PathBuf>) -> Result<ExitCode, String> {
    if iterations == 0 {
        return Err("--iterations must be at least 1".into());
    }
    let title = format!("passthru bench exits: {iterations} iterations per probe");
    repeat(&title, runs, json, || measure(iterations), figures)?;
    Ok(ExitCode::SUCCESS)
}

fn figures(r: &ExitsReport) -> Vec<Fig> {
    let mut v: Vec<Fig> = r.figures.iter().map(|f| Fig::new(format!("{} ns", f.name), "ns", f.ns_per_op)).collect();
    v.extend(r.figures.iter().skip(1).map(|f| Fig::new(format!("{} x null exit", f.name), "x", f.ratio_to_null_exit)));
    v.push(Fig::new("empty guest loop iteration (subtracted)", "ns", r.loop_ns_per_iteration));
    v
}

fn measure(iterations: u64) -> Result<ExitsReport, String> {
    let elf = guests::load("exits")?;
    let mut config = VmConfig::new(AccelKind::Kvm);
    config.bench_iterations = iterations;
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let status = vm.run_guest(&elf).map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!("the exits probe guest failed with status {status}"));
    }
    let marks = vm.bench().marks();
    let t = |tag: u64| marks.iter().find(|(m, _, _)| *m == tag).map(|(_, _, i)| *i);
    let span = |a: u64, b: u64| -> Result<f64, String> {
        let (a, b) = (t(a).ok_or("missing mark")?, t(b).ok_or("missing mark")?);
        Ok(b.duration_since(a).as_nanos() as f64 / iterations as f64)
    };
    let (hcall, mmio, ioev, lp) = (span(0, 1)?, span(1, 2)?, span(2, 3)?, span(3, 4)?);
    let net = |x: f64| (x - lp).max(0.0);
    let null = net(hcall);
    let fig = |name, raw: f64| Figure {
        name,
        ns_per_op: net(raw),
        raw_ns_per_op: raw,
        ratio_to_null_exit: if null > 0.0 { net(raw) / null } else { f64::NAN },
    };
    Ok(ExitsReport {
        iterations,
        loop_ns_per_iteration: lp,
        figures: vec![
            fig("null hypercall-port exit", hcall),
            fig("MMIO write exit", mmio),
            fig("ioeventfd write (no exit)", ioev),
        ],
    })
}
