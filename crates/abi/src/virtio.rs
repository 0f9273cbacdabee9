//! Virtio over PCI (virtio 1.x, modern), as the guest sees a passthru virtio device:
//! the vendor-specific capabilities that locate each structure, the common
//! configuration's registers, device status bits. Spec: OASIS virtio 1.2, "Virtio
//! Over PCI Bus". (The VMM takes the standard constants it can from the
//! `virtio-bindings` crate and checks they agree with these.)

/// PCI vendor of virtio devices.
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern virtio device of type `t` (0x1040 + t).
pub const fn device_id(t: u16) -> u16 {
    0x1040 + t
}
/// PCI revision of a modern device (at least 1).
pub const REVISION: u8 = 1;
/// PCI subsystem ID of a modern device (at least 0x40).
pub const SUBSYSTEM_ID: u16 = 0x40;

/// The feature bit every modern device offers and every modern driver accepts.
pub const F_VERSION_1: u32 = 32;

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (`device_status`).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues live.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// The virtio PCI capability (a vendor-specific capability, id 0x09): `cfg_type` at
/// +3, `bar` at +4, `offset` (le32) at +8, `length` (le32) at +12; the notify
/// capability adds `notify_off_multiplier` (le32) at +16.
pub mod cap {
    /// Its PCI capability id (vendor-specific).
    pub const ID: u8 = 0x09;
    /// Offset of `cfg_type`.
    pub const CFG_TYPE: u16 = 3;
    /// Offset of `bar`.
    pub const BAR: u16 = 4;
    /// Offset of `offset`.
    pub const OFFSET: u16 = 8;
    /// Offset of `length`.
    pub const LENGTH: u16 = 12;
    /// Offset of the notify capability's `notify_off_multiplier`.
    pub const NOTIFY_MULTIPLIER: u16 = 16;
    /// Length of a capability (20 for the notify one).
    pub const LEN: u8 = 16;
    /// The common configuration.
    pub const COMMON: u8 = 1;
    /// Queue notifications.
    pub const NOTIFY: u8 = 2;
    /// The ISR status.
    pub const ISR: u8 = 3;
    /// The device-specific configuration.
    pub const DEVICE: u8 = 4;
}

/// Registers of the common configuration structure (offsets).
pub mod common {
    /// Selects which 32 bits `DEVICE_FEATURE` shows (le32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// The device's features, 32 at a time (le32, read-only).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// Selects which 32 bits `DRIVER_FEATURE` takes (le32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// The features the driver accepts, 32 at a time (le32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// MSI-X vector of configuration changes (le16).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// Queues the device has (le16, read-only).
    pub const NUM_QUEUES: u64 = 0x12;
    /// Device status (u8; 0 resets the device).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// Configuration generation (u8, read-only).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// Selects the queue the registers below refer to (le16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// Its size (le16; at most its maximum, which it reads as at reset).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// Its MSI-X vector (le16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// Its enable bit (le16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// Its notification offset, in units of the notify multiplier (le16, read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// Its descriptor table (le64).
    pub const QUEUE_DESC: u64 = 0x20;
    /// Its available ring (le64).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// Its used ring (le64).
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Bytes of the structure.
    pub const SIZE: u64 = 0x38;
}

/// Split virtqueue layout (the parts a driver writes).
pub mod ring {
    /// A descriptor continues in `next`.
    pub const DESC_F_NEXT: u16 = 1;
    /// A descriptor the device writes.
    pub const DESC_F_WRITE: u16 = 2;
    /// Bytes of a descriptor (addr le64, len le32, flags le16, next le16).
    pub const DESC_SIZE: u64 = 16;
}
