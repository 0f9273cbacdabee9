//! The DMA engine device: a small cousin of Intel's I/OAT/DSA, a PCI function shared by
//! the device model, the VMM and guest programs so they agree by construction.
//!
//! BAR 0 holds the registers (little-endian), BAR 1 is scratch memory the device offers
//! for mapping (2 MiB: room for peer-to-peer copies of 1 MiB), with the MSI-X table
//! and pending bits in its last 8 KiB. The guest
//! puts [`Descriptor`]s in a ring (an IOVA), writes the producer index to
//! [`regs::TAIL`]; the device executes them in order, writes a [`Completion`] record by
//! DMA for each, advances [`regs::HEAD`] and raises MSI-X vector
//! [`vector::COMPLETION`] when a descriptor asks for it ([`vector::ERROR`] when one
//! fails).

/// PCI vendor id (the QEMU/Red Hat vendor id used by emulated test devices).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id.
pub const DEVICE_ID: u16 = 0x11e8;
/// PCI class code: system peripheral, other.
pub const CLASS: u16 = 0x0880;

/// The registers' BAR.
pub const REGS_BAR: u8 = 0;
/// Size of the registers' BAR.
pub const REGS_SIZE: u64 = 0x1000;
/// The scratch memory's BAR (64-bit, prefetchable, offered for mmap).
pub const SCRATCH_BAR: u8 = 1;
/// Size of the scratch BAR.
pub const SCRATCH_SIZE: u64 = 0x20_0000;
/// Bytes of scratch memory before the MSI-X structures.
pub const SCRATCH_USABLE: u64 = 0x1f_e000;
/// Offset of the MSI-X table in the scratch BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x1f_e000;
/// Offset of the MSI-X pending-bit array in the scratch BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x1f_f000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 2;

/// What each MSI-X vector means.
pub mod vector {
    /// A descriptor with [`super::FLAG_INTERRUPT`] completed.
    pub const COMPLETION: u16 = 0;
    /// A descriptor completed with an error (a DMA fault or an invalid descriptor).
    pub const ERROR: u16 = 1;
}

/// Register offsets in BAR 0.
pub mod regs {
    /// Read-only identification ([`super::ID_VALUE`]).
    pub const ID: u64 = 0x00;
    /// Descriptor ring base (IOVA, 64-bit, 64-byte aligned; the upper half at
    /// [`RING_BASE_HI`] for 32-bit writes).
    pub const RING_BASE: u64 = 0x08;
    /// Upper half of [`RING_BASE`].
    pub const RING_BASE_HI: u64 = 0x0c;
    /// Ring size in descriptors (power of two, 1..=4096).
    pub const RING_SIZE: u64 = 0x10;
    /// Consumer index (read-only): descriptors completed so far, modulo 2^32.
    pub const HEAD: u64 = 0x14;
    /// Producer index (doorbell): the guest writes how many descriptors it posted.
    pub const TAIL: u64 = 0x18;
    /// Status bits ([`super::status`]).
    pub const STATUS: u64 = 0x1c;
    /// Interrupt control ([`super::irq_ctrl`]).
    pub const IRQ_CTRL: u64 = 0x20;
    /// Control ([`super::control`]).
    pub const CONTROL: u64 = 0x24;
    /// Descriptors completed with an error (read-only). Counted before the
    /// descriptor's completion record is written.
    pub const ERRORS: u64 = 0x28;
    /// DMA faults seen by the device (read-only). A descriptor's own fault is counted
    /// before its completion record is written.
    pub const FAULTS: u64 = 0x2c;
    /// IOVA of the last DMA fault (read-only, 64-bit).
    pub const LAST_FAULT: u64 = 0x30;
    /// Bytes moved by completed descriptors (read-only, 64-bit).
    pub const BYTES: u64 = 0x48;
}

/// Bits of [`regs::IRQ_CTRL`].
pub mod irq_ctrl {
    /// Raise [`super::vector::COMPLETION`] for descriptors that ask for it.
    pub const COMPLETION: u32 = 1 << 0;
    /// Raise [`super::vector::ERROR`] when a descriptor fails.
    pub const ERROR: u32 = 1 << 1;
}

/// Bits of [`regs::CONTROL`].
pub mod control {
    /// Run the ring.
    pub const ENABLE: u32 = 1 << 0;
    /// Reset the engine (self-clearing): registers to their defaults, the usable
    /// scratch memory zeroed. Register writes are posted (a device process may take
    /// them later); the reset is done once a later read of a register returns.
    pub const RESET: u32 = 1 << 1;
}

/// Value of [`regs::ID`] ("DMAE" + version 1).
pub const ID_VALUE: u32 = 0x4541_4d44;

/// Bits of [`regs::STATUS`].
pub mod status {
    /// The engine is enabled.
    pub const ENABLED: u32 = 1 << 0;
    /// The ring itself faulted (descriptor fetch): the engine stopped.
    pub const RING_FAULT: u32 = 1 << 1;
    /// The device is gone (surprise removal): reads come back all-ones anyway.
    pub const DEAD: u32 = 1 << 31;
}

/// Descriptor operations.
pub mod op {
    /// Copy `len` bytes from `src` to `dst`.
    pub const COPY: u32 = 1;
    /// Fill `len` bytes at `dst` with the 8-byte `pattern`, repeated.
    pub const FILL: u32 = 2;
    /// CRC32C (Castagnoli) of `len` bytes at `src`, into the completion's result.
    pub const CRC32C: u32 = 3;
}

/// Descriptor flag: raise the MSI when this descriptor completes.
pub const FLAG_INTERRUPT: u32 = 1 << 0;

/// Largest `len` of one descriptor.
pub const MAX_LEN: u64 = 1 << 30;

/// One descriptor (64 bytes, in the ring).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// [`op`] code.
    pub op: u32,
    /// [`FLAG_INTERRUPT`] and nothing else.
    pub flags: u32,
    /// Source IOVA (COPY, CRC32C).
    pub src: u64,
    /// Destination IOVA (COPY, FILL).
    pub dst: u64,
    /// Bytes.
    pub len: u64,
    /// FILL pattern.
    pub pattern: u64,
    /// IOVA of this descriptor's [`Completion`] record (32 bytes, 8-byte aligned).
    pub completion: u64,
    /// Reserved, zero.
    pub reserved: [u64; 2],
}

/// Size of a [`Descriptor`].
pub const DESCRIPTOR_SIZE: u64 = 64;

/// Completion record (32 bytes), written by the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// [`completion`] status.
    pub status: u32,
    /// Reserved.
    pub reserved: u32,
    /// Bytes processed.
    pub bytes: u64,
    /// CRC32C result.
    pub result: u64,
    /// Sequence number of the descriptor (its ring position, unwrapped).
    pub sequence: u64,
}

/// Size of a [`Completion`].
pub const COMPLETION_SIZE: u64 = 32;

/// Completion statuses.
pub mod completion {
    /// Not yet written (the guest clears records before posting).
    pub const PENDING: u32 = 0;
    /// Done.
    pub const SUCCESS: u32 = 1;
    /// A DMA access was refused (outside the device's mappings, or no permission).
    pub const DMA_FAULT: u32 = 2;
    /// Unknown op, bad length or flags.
    pub const INVALID: u32 = 3;
}

impl Descriptor {
    /// The descriptor as little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.src.to_le_bytes());
        b[16..24].copy_from_slice(&self.dst.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.pattern.to_le_bytes());
        b[40..48].copy_from_slice(&self.completion.to_le_bytes());
        b
    }

    /// Parses little-endian bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Descriptor {
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Descriptor {
            op: u32at(0),
            flags: u32at(4),
            src: u64at(8),
            dst: u64at(16),
            len: u64at(24),
            pattern: u64at(32),
            completion: u64at(40),
            reserved: [u64at(48), u64at(56)],
        }
    }
}

impl Completion {
    /// The record as little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        b[16..24].copy_from_slice(&self.result.to_le_bytes());
        b[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        b
    }
}
