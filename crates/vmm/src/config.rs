//! How to build a machine: [`VmConfig`] and its policies.

use irq::Mode;
use std::io::Write;

use crate::accel::AccelKind;

/// How to build a machine.
pub struct VmConfig {
    /// Bytes of guest RAM.
    pub memory: u64,
    /// KVM or qtest.
    pub accel: AccelKind,
    /// Where the guest console (COM1) goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where the error console (panic messages) goes.
    pub err_out: Box<dyn Write + Send>,
    /// Iterations per probe handed to benchmark guests.
    pub bench_iterations: u64,
    /// How device interrupts are delivered when they attach.
    pub irq_mode: Mode,
    /// The VM's locked-memory limit for pinned DMA memory (None: RLIMIT_MEMLOCK).
    pub locked_memory: Option<u64>,
    /// End the VM when the guest calls a DMA front-end with invalid arguments (off:
    /// the guest gets a status).
    pub dma_kill_on_misuse: bool,
    /// The guest-physical range devices may address without a guest IOMMU (the PCI
    /// bus's upstream window): what the identity front-end maps.
    pub dma_window: std::ops::Range<u64>,
    /// What host-side reads of guest memory (dumps, snapshots) do while a non-coherent
    /// device is attached.
    pub noncoherent_reads: NonCoherentReads,
    /// DMA front-ends to build with the VM (those its devices name; one named later by
    /// a hot-plugged device is built then).
    pub frontends: Vec<String>,
    /// Build the test interrupt sources (interrupt tests and benchmarks only).
    #[cfg(feature = "test-sources")]
    pub test_sources: bool,
}

/// What the VMM does before reading guest memory a non-coherent device may have
/// written behind the CPU caches (`--noncoherent-migration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonCoherentReads {
    /// Flush exactly the flagged ranges first (CLFLUSHOPT, else CLFLUSH).
    Flush,
    /// Refuse the read (a snapshot or dump) while a non-coherent device is attached.
    Refuse,
}

impl std::str::FromStr for NonCoherentReads {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<NonCoherentReads, String> {
        match s {
            "flush" => Ok(NonCoherentReads::Flush),
            "refuse" => Ok(NonCoherentReads::Refuse),
            _ => Err(format!("'{s}': use flush or refuse")),
        }
    }
}

/// The default DMA window: the whole 48-bit guest-physical space (RAM, and the 32- and
/// 64-bit BAR windows).
pub const DEFAULT_DMA_WINDOW: std::ops::Range<u64> = 0..(1 << 48);

impl VmConfig {
    /// Defaults: 256 MiB, console to stdout, errors to stderr.
    pub fn new(accel: AccelKind) -> VmConfig {
        VmConfig {
            memory: 256 << 20,
            accel,
            serial_out: Box::new(std::io::stdout()),
            err_out: Box::new(std::io::stderr()),
            bench_iterations: 10_000,
            irq_mode: Mode::Forwarded,
            locked_memory: None,
            dma_kill_on_misuse: false,
            dma_window: DEFAULT_DMA_WINDOW,
            noncoherent_reads: NonCoherentReads::Flush,
            frontends: Vec::new(),
            #[cfg(feature = "test-sources")]
            test_sources: false,
        }
    }
}
