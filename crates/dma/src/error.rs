//! Errors of map and unmap (VFIO type1 v2 semantics) and reasons of access faults.

use crate::addr::Iova;

/// Why a map or unmap was refused. The VFIO errno each one corresponds to is noted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Malformed request: misaligned, zero size, no permission, outside the aperture,
    /// in a reserved region, or an unmap that would split a mapping (EINVAL).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The IOVA range overlaps an existing mapping (EEXIST).
    #[error("{iova} overlaps an existing mapping")]
    Exists {
        /// Start of the refused range.
        iova: Iova,
    },
    /// The guest-physical range is not backed by guest memory (EFAULT).
    #[error("guest-physical range {gpa:#x}+{size:#x} is not guest memory")]
    BadAddress {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// The domain holds its maximum number of mappings (ENOSPC).
    #[error("the domain already holds its maximum of {max} mappings")]
    NoSpace {
        /// The limit.
        max: usize,
    },
    /// A device behind the domain refused the mapping (its process failed the
    /// DMA_MAP, or is gone).
    #[error("the device refused the mapping: {0}")]
    Rejected(String),
    /// Pinning would exceed the VM's locked-memory limit (ENOMEM). Transient: unmap
    /// something, or raise the limit.
    #[error(
        "locked-memory limit reached: {locked} bytes locked + {wanted} more > limit {limit} \
         (raise it with --locked-memory or `ulimit -l`)"
    )]
    NoMemory {
        /// Bytes locked now.
        locked: u64,
        /// Bytes this request would add.
        wanted: u64,
        /// The limit.
        limit: u64,
    },
}

/// Why a device access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// No mapping covers (part of) the range.
    NotMapped,
    /// A mapping covers it without the needed permission.
    Permission,
    /// The range wraps around the address space.
    Overflow,
    /// The device's endpoint is attached to no domain (bus mastering off, or the device
    /// is gone): every access faults.
    Blocked,
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultReason::NotMapped => "not mapped",
            FaultReason::Permission => "permission denied",
            FaultReason::Overflow => "range wraps around",
            FaultReason::Blocked => "no DMA domain (bus mastering off)",
        })
    }
}
