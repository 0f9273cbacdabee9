//! Hypercalls: the guest asks the VMM for a service through the hypercall port.
//!
//! Register convention (the guest executes `out HCALL, eax` with):
//!
//! | register | in                 | out              |
//! |----------|--------------------|------------------|
//! | `rax`    | call number        | [`Status`]       |
//! | `rdi`    | argument 0         | result 0         |
//! | `rsi`    | argument 1         | result 1         |
//! | `rdx`    | argument 2         | result 2         |
//! | `r10`    | argument 3         | unchanged        |
//! | `r8`     | argument 4         | unchanged        |
//!
//! Call numbers are grouped in blocks of [`BLOCK_SIZE`]; each front-end of the VMM
//! owns one block and the VMM dispatches a call to the owner of its block.

/// Number of call numbers in one front-end's block.
pub const BLOCK_SIZE: u64 = 0x100;

/// Block of the VMM core (null call, benchmarks, test sources).
pub const CORE_BASE: u64 = 0x000;

/// Does nothing and returns [`Status::Success`]: the null exit of the benchmarks.
pub const NULL: u64 = CORE_BASE;
/// Benchmark marker: the VMM records a timestamp with tag `a0` and value `a1`. Result 0
/// is the iteration count benchmark guests should run.
pub const BENCH_MARK: u64 = CORE_BASE + 0x01;
/// Test interrupt source, set-up: route MSI `vector` (a0) to the boot CPU through
/// an irqfd. Returns the GSI used in result 0.
pub const TEST_IRQ_SETUP: u64 = CORE_BASE + 0x10;
/// Test interrupt source: fire `count` (a0) interrupts, each after the previous one
/// was acknowledged on [`crate::ports::TEST_IRQ_ACK`], switching the source between
/// forwarded and VMM delivery `toggles` (a1) times while it fires. Returns at once.
pub const TEST_IRQ_FIRE: u64 = CORE_BASE + 0x11;
/// Test interrupt source: the guest reports the interrupts it counted (a0). Result 0
/// is the number the VMM fired, result 1 is 1 when the source has finished.
pub const TEST_IRQ_REPORT: u64 = CORE_BASE + 0x12;

/// Level-triggered test source (INTx), set-up: attach it to irqchip pin `gsi` (a0),
/// with `abort_vector` (a1) signalled as an MSI if the guest stops acknowledging.
pub const TEST_INTX_SETUP: u64 = CORE_BASE + 0x18;
/// Level-triggered test source: assert the line `count` (a0) times, each time after
/// the guest deasserted it through [`crate::ports::TEST_INTX_STATUS`], switching
/// delivery `toggles` (a1) times meanwhile. Returns at once.
pub const TEST_INTX_FIRE: u64 = CORE_BASE + 0x19;
/// Level-triggered test source: result 0 = assertions made, result 1 = 1 when done,
/// result 2 = resamples (EOIs) the device saw. a0 = the guest's count (recorded).
pub const TEST_INTX_REPORT: u64 = CORE_BASE + 0x1a;

/// Non-coherent DMA as the VMM sees it: result 0 = non-coherent devices in the VM now,
/// result 1 = 1 if the memory slot holding guest-physical `a0` is flagged non-coherent,
/// result 2 = the memory type ([`memtype`]) the guest gets there for a WC PAT entry
/// under passthru's per-slot model.
pub const NONCOHERENT_QUERY: u64 = CORE_BASE + 0x20;

/// Memory type codes of [`NONCOHERENT_QUERY`].
pub mod memtype {
    /// Uncacheable.
    pub const UC: u64 = 0;
    /// Write-combining.
    pub const WC: u64 = 1;
    /// Write-through.
    pub const WT: u64 = 4;
    /// Write-protected.
    pub const WP: u64 = 5;
    /// Write-back.
    pub const WB: u64 = 6;
}

/// Result of a hypercall, in `rax`. Values are stable: guests compare against them.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The call did what was asked.
    Success = 0,
    /// No front-end owns this call number.
    UnknownCall = 1,
    /// An argument is malformed (misaligned, zero length, out of range...).
    InvalidArgument = 2,
    /// The device is not assigned to this guest or not behind this front-end.
    NotAssigned = 3,
    /// The device's IOVA space has no room for the request.
    NoIovaSpace = 4,
    /// Pinning would exceed the VM's locked-memory limit. Transient: retry after
    /// unmapping, or quiesce the device.
    OverLockedLimit = 5,
    /// The resource is busy; retry later.
    Busy = 6,
    /// The request conflicts with the current state (e.g. a mapping already exists).
    Exists = 7,
    /// Nothing is mapped or registered at that address.
    NotFound = 8,
    /// The VMM failed internally; the guest may retry.
    Internal = 9,
}

impl Status {
    /// Decodes a raw status value; unknown values map to `None`.
    pub const fn from_raw(raw: u64) -> Option<Status> {
        Some(match raw {
            0 => Status::Success,
            1 => Status::UnknownCall,
            2 => Status::InvalidArgument,
            3 => Status::NotAssigned,
            4 => Status::NoIovaSpace,
            5 => Status::OverLockedLimit,
            6 => Status::Busy,
            7 => Status::Exists,
            8 => Status::NotFound,
            9 => Status::Internal,
            _ => return None,
        })
    }

    /// Short lower-case name, used in logs and counters.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::UnknownCall => "unknown_call",
            Status::InvalidArgument => "invalid_argument",
            Status::NotAssigned => "not_assigned",
            Status::NoIovaSpace => "no_iova_space",
            Status::OverLockedLimit => "over_locked_limit",
            Status::Busy => "busy",
            Status::Exists => "exists",
            Status::NotFound => "not_found",
            Status::Internal => "internal",
        }
    }
}

/// Arguments of one hypercall, as read from the guest's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// Call number (`rax`).
    pub nr: u64,
    /// Arguments 0..4 (`rdi`, `rsi`, `rdx`, `r10`, `r8`).
    pub a: [u64; 5],
}

/// Results of one hypercall, written back to the guest's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ret {
    /// Status (`rax`).
    pub status: Status,
    /// Results 0..2 (`rdi`, `rsi`, `rdx`).
    pub r: [u64; 3],
}

impl Ret {
    /// A successful result with the given values.
    pub const fn ok(r0: u64, r1: u64, r2: u64) -> Ret {
        Ret { status: Status::Success, r: [r0, r1, r2] }
    }

    /// A failed result: status only, results zero.
    pub const fn err(status: Status) -> Ret {
        Ret { status, r: [0; 3] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_raw() {
        for raw in 0..10 {
            let s = Status::from_raw(raw).expect("0..=9 are defined");
            assert_eq!(s as u64, raw);
        }
        assert_eq!(Status::from_raw(10), None);
        assert_eq!(Status::from_raw(u64::MAX), None);
    }
}
