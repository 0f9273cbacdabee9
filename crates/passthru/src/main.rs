//! `passthru`: the command-line program. `passthru run` runs a machine (a guest program
//! on KVM, or the qtest driver port), `passthru guests` lists the built-in guest
//! programs, `passthru bench` measures.

mod bench;
mod device;
mod run;
mod sandbox;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A KVM virtual machine monitor built around device assignment.
#[derive(Parser, Debug)]
#[command(name = "passthru", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a machine: a guest program on KVM, or the qtest driver port.
    Run(run::RunArgs),
    /// List the built-in guest programs.
    Guests,
    /// Measure the machine (results as a table, optionally JSON).
    Bench(bench::BenchArgs),
    /// Run a device process (vfio-user server).
    Device(device::DeviceArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PASSTHRU_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Guests => {
            for p in guests::all() {
                println!("{:<12} {}", p.name, p.description);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::bench(args),
        Command::Device(args) => device::device(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("passthru: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a memory size: bytes, or a number with a K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size; write e.g. 256M, 1G or 33554432"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
