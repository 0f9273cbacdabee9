//! The virtio-iommu device (virtio device 23) as passthru offers it: the spec's
//! request, status, feature and fault values (OASIS virtio 1.2, "IOMMU device"), and
//! passthru's choices (its PCI slot, page sizes, ranges, probe size, the reserved MSI
//! region it reports).

/// Virtio device type.
pub const DEVICE_TYPE: u16 = 23;
/// The PCI slot the device is plugged at (before any endpoint attaches).
pub const SLOT: u8 = 31;
/// The request queue.
pub const REQUESTQ: u16 = 0;
/// The event queue.
pub const EVENTQ: u16 = 1;
/// Entries of each queue at most: a request takes two descriptors (Linux's layout), so
/// 512 requests fit in one notification.
pub const QUEUE_SIZE: u16 = 1024;

/// Feature bits.
pub mod feature {
    /// `input_range` is valid.
    pub const INPUT_RANGE: u32 = 0;
    /// `domain_range` is valid.
    pub const DOMAIN_RANGE: u32 = 1;
    /// MAP and UNMAP requests.
    pub const MAP_UNMAP: u32 = 2;
    /// Legacy bypass of unattached endpoints (passthru never offers it).
    pub const BYPASS: u32 = 3;
    /// PROBE requests.
    pub const PROBE: u32 = 4;
    /// The MAP flag MMIO.
    pub const MMIO: u32 = 5;
    /// The configuration's `bypass` field and the ATTACH flag BYPASS.
    pub const BYPASS_CONFIG: u32 = 6;
}

/// The device configuration (offsets; little-endian).
pub mod config {
    /// Page sizes (le64; the lowest set bit is the granule).
    pub const PAGE_SIZE_MASK: u64 = 0;
    /// `input_range.start` (le64).
    pub const INPUT_START: u64 = 8;
    /// `input_range.end` (le64, inclusive).
    pub const INPUT_END: u64 = 16;
    /// `domain_range.start` (le32).
    pub const DOMAIN_START: u64 = 24;
    /// `domain_range.end` (le32, inclusive).
    pub const DOMAIN_END: u64 = 28;
    /// `probe_size` (le32).
    pub const PROBE_SIZE: u64 = 32;
    /// `bypass` (u8).
    pub const BYPASS: u64 = 36;
    /// Bytes of the configuration.
    pub const SIZE: u64 = 40;
}

/// Request types.
pub mod req {
    /// Attach an endpoint to a domain (created if new).
    pub const ATTACH: u8 = 1;
    /// Detach an endpoint from its domain.
    pub const DETACH: u8 = 2;
    /// Map a range.
    pub const MAP: u8 = 3;
    /// Unmap the mappings in a range.
    pub const UNMAP: u8 = 4;
    /// An endpoint's properties.
    pub const PROBE: u8 = 5;
}

/// Bytes of each request's device-readable part (head and payload) and of its tail.
pub mod size {
    /// Head: type, reserved[3].
    pub const HEAD: u64 = 4;
    /// Tail: status, reserved[3].
    pub const TAIL: u64 = 4;
    /// ATTACH: head, domain, endpoint, flags, reserved[4].
    pub const ATTACH: u64 = 20;
    /// DETACH: head, domain, endpoint, reserved[8].
    pub const DETACH: u64 = 20;
    /// MAP: head, domain, virt_start, virt_end, phys_start, flags.
    pub const MAP: u64 = 36;
    /// UNMAP: head, domain, virt_start, virt_end, reserved[4].
    pub const UNMAP: u64 = 28;
    /// PROBE: head, endpoint, reserved[64] (then probe_size bytes of properties).
    pub const PROBE: u64 = 72;
    /// A fault report.
    pub const FAULT: u64 = 24;
}

/// Request statuses.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// Virtio communication error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
    /// Internal device error.
    pub const DEVERR: u8 = 3;
    /// Invalid parameters.
    pub const INVAL: u8 = 4;
    /// Out-of-range parameters.
    pub const RANGE: u8 = 5;
    /// Entry not found.
    pub const NOENT: u8 = 6;
    /// Bad address.
    pub const FAULT: u8 = 7;
    /// Insufficient resources.
    pub const NOMEM: u8 = 8;
}

/// ATTACH flag: the domain is a bypass domain (with BYPASS_CONFIG).
pub const ATTACH_F_BYPASS: u32 = 1;

/// MAP flags.
pub mod map {
    /// Endpoints may read.
    pub const READ: u32 = 1;
    /// Endpoints may write.
    pub const WRITE: u32 = 2;
    /// Memory-mapped I/O (with the MMIO feature).
    pub const MMIO: u32 = 4;
}

/// PROBE properties.
pub mod probe {
    /// Property type: a reserved memory region.
    pub const T_RESV_MEM: u16 = 1;
    /// RESV_MEM subtype: addresses that cannot be mapped.
    pub const RESV_MEM_T_RESERVED: u8 = 0;
    /// RESV_MEM subtype: an MSI doorbell.
    pub const RESV_MEM_T_MSI: u8 = 1;
    /// Bytes of a RESV_MEM property after its 4-byte header (subtype, reserved[3],
    /// start le64, end le64).
    pub const RESV_MEM_LEN: u16 = 20;
}

/// Fault reports on the event queue.
pub mod fault {
    /// Unknown reason.
    pub const R_UNKNOWN: u8 = 0;
    /// The endpoint is attached to no domain.
    pub const R_DOMAIN: u8 = 1;
    /// The address is not mapped, or not with the access's permission.
    pub const R_MAPPING: u8 = 2;
    /// A read.
    pub const F_READ: u32 = 1;
    /// A write.
    pub const F_WRITE: u32 = 2;
    /// `address` is valid.
    pub const F_ADDRESS: u32 = 1 << 8;
}

/// Page sizes passthru's device offers: 4 KiB (the granule), 2 MiB, 1 GiB.
pub const PAGE_SIZE_MASK: u64 = (1 << 12) | (1 << 21) | (1 << 30);
/// The input range: 48 bits of IOVA.
pub const INPUT_RANGE: (u64, u64) = (0, (1 << 48) - 1);
/// The domain IDs the device accepts. It starts at 0 as QEMU's does: Linux takes the
/// first for its identity (bypass) domain and names domain 0 when it detaches an
/// endpoint from that domain.
pub const DOMAIN_RANGE: (u32, u32) = (0, 0xffff);
/// Bytes of properties a PROBE request carries.
pub const PROBE_SIZE: u32 = 512;
/// The MSI doorbell every endpoint reports as a RESV_MEM MSI region (x86: the LAPIC
/// window; an endpoint's writes there are interrupt messages, not memory).
pub const MSI_REGION: (u64, u64) = (crate::layout::MSI_ADDR_BASE, crate::layout::MSI_ADDR_END - 1);
