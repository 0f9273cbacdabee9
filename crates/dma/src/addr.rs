//! Address newtypes and permissions. Every DMA signature says which space an address
//! lives in.

use std::fmt;

/// An I/O virtual address: what a device puts on the bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

/// A guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iova {:#x}", self.0)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x}", self.0)
    }
}

/// What a mapping allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// Nothing (invalid for a mapping).
    pub const NONE: Perm = Perm(0);
    /// Device reads.
    pub const READ: Perm = Perm(1);
    /// Device writes.
    pub const WRITE: Perm = Perm(2);
    /// Both.
    pub const READ_WRITE: Perm = Perm(3);

    /// Builds a permission from flags.
    pub const fn new(read: bool, write: bool) -> Perm {
        Perm((read as u8) | ((write as u8) << 1))
    }

    /// True if `access` is allowed.
    pub const fn allows(self, access: Access) -> bool {
        self.0 & (access as u8) != 0
    }

    /// True if nothing is allowed.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }

    /// Raw bits (1 = read, 2 = write).
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// The direction of one device access.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads guest memory.
    Read = 1,
    /// The device writes guest memory.
    Write = 2,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}
