//! `passthru acpi-dump DIR`: the ACPI tables passthru builds for a VM with the devices
//! given, each written to DIR as the raw table (`dsdt.dat`, `facp.dat`, ...), for
//! ACPICA's `iasl -d` or `acpidump`-style tools. The VM is built without a vCPU.

use crate::device::DeviceArg;
use std::path::PathBuf;
use std::process::ExitCode;

/// `passthru acpi-dump`.
#[derive(clap::Args, Debug)]
pub struct AcpiDumpArgs {
    /// Where the tables go (made if missing).
    dir: PathBuf,
    /// The VM's devices (as `run --device`).
    #[arg(long = "device", value_name = "SPEC", value_parser = crate::device::parse_device)]
    devices: Vec<DeviceArg>,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
    memory: u64,
}

/// Writes the tables; one line per table on standard output.
pub fn run(args: AcpiDumpArgs) -> Result<ExitCode, String> {
    // Nothing runs: the account only has to let every device's domain be built.
    let locked = args.memory.saturating_mul(args.devices.len() as u64 + 1);
    let vm = crate::device::headless_vm(args.memory, locked, &args.devices)?;
    let t = vm.acpi_tables();
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let write = |name: &str, at: u64, data: &[u8]| -> Result<(), String> {
        let path = args.dir.join(format!("{}.dat", name.to_ascii_lowercase()));
        std::fs::write(&path, data).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("{name} at {at:#07x}: {:>5} bytes -> {}", data.len(), path.display());
        Ok(())
    };
    write("RSDP", vmm::acpi::RSDP_ADDR, &t.rsdp)?;
    for (sig, at, data) in &t.tables {
        write(&String::from_utf8_lossy(sig), *at, data)?;
    }
    println!("{} bytes in all", t.size());
    Ok(ExitCode::SUCCESS)
}
