//! The saved state of the test interrupt sources (`test_irq`), as a snapshot holds it.
//! Plain data, present whether or not the sources are built, so a snapshot's format
//! does not depend on a build feature.

use serde::{Deserialize, Serialize};

/// The format version of [`TestSourcesState`] in a snapshot.
pub const STATE_VERSION: u32 = 1;

/// Both test sources.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSourcesState {
    /// The MSI source, if the guest set it up.
    pub msi: Option<MsiSourceState>,
    /// The INTx source, if the guest set it up.
    pub intx: Option<IntxSourceState>,
}

/// The MSI source: its set-up and its run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MsiSourceState {
    /// Vector of its interrupts.
    pub vector: u8,
    /// Vector signalled when the guest stops acknowledging (0: none).
    pub abort_vector: u8,
    /// Its last (or current) run.
    pub run: Option<RunState>,
}

/// The INTx source: its set-up, its line and its run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IntxSourceState {
    /// IOAPIC pin of its line.
    pub gsi: u32,
    /// Vector signalled when the guest stops acknowledging (0: none).
    pub abort_vector: u8,
    /// The line is asserted (the guest has not cleared it yet).
    pub asserted: bool,
    /// Its last (or current) run.
    pub run: Option<RunState>,
}

/// A firing run, stopped between two steps.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    /// Interrupts the run was asked for.
    pub count: u64,
    /// Forwarding switches it was asked for.
    pub toggles: u64,
    /// Interrupts fired so far (the in-flight one included).
    pub fired: u64,
    /// Forwarding switches made so far.
    pub toggled: u64,
    /// Resamples seen so far (INTx).
    pub resamples: u64,
    /// The last interrupt fired awaits the guest's acknowledgement.
    pub in_flight: bool,
    /// The run ended.
    pub done: bool,
    /// It ended because the guest stopped acknowledging.
    pub timed_out: bool,
    /// The count the guest reported, if it did.
    pub guest_counted: Option<u64>,
}
