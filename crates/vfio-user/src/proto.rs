//! The vfio-user wire format (little-endian, as the spec and libvfio-user use).

use std::fmt;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// Largest data transfer one REGION/DMA message may carry (advertised as
/// `max_data_xfer_size`).
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Largest message accepted (a data transfer plus its fixed fields).
pub const MAX_MESSAGE: usize = HEADER_SIZE + 64 + MAX_DATA_XFER;
/// Most file descriptors one message may carry (advertised as `max_msg_fds`).
pub const MAX_FDS: usize = 16;
/// Protocol version spoken.
pub const VERSION_MAJOR: u16 = 0;
/// Protocol version spoken.
pub const VERSION_MINOR: u16 = 1;
/// DMA windows a server may hold at once when it does not say (the spec's default of
/// `max_dma_maps`), and what passthru's own server accepts.
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;
/// passthru's own capability object in VERSION (`"passthru": {...}`): a server that
/// sets `posted_dma_map` accepts DMA_MAP with No_reply and reaches by messages any
/// window it could not map, so the client need not wait for each DMA_MAP.
pub const PASSTHRU_CAPABILITY: &str = "passthru";

/// Commands.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Version negotiation (first message).
    Version = 1,
    /// Map guest memory for DMA.
    DmaMap = 2,
    /// Unmap guest memory.
    DmaUnmap = 3,
    /// Device information.
    DeviceGetInfo = 4,
    /// Region information.
    DeviceGetRegionInfo = 5,
    /// Region I/O fds.
    DeviceGetRegionIoFds = 6,
    /// Interrupt information.
    DeviceGetIrqInfo = 7,
    /// Set interrupt eventfds.
    DeviceSetIrqs = 8,
    /// Read a device region.
    RegionRead = 9,
    /// Write a device region.
    RegionWrite = 10,
    /// Device reads guest memory (server to client).
    DmaRead = 11,
    /// Device writes guest memory (server to client).
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Several region writes.
    RegionWriteMulti = 15,
    /// Device features (migration, dirty logging).
    DeviceFeature = 16,
    /// Migration data read.
    MigDataRead = 17,
    /// Migration data write.
    MigDataWrite = 18,
}

impl Command {
    /// Decodes a command number.
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// Header flag: the message is a reply.
pub const FLAG_REPLY: u32 = 1;
/// Header flag mask of the message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Header flag: no reply wanted.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: the reply is an error; `error` holds an errno.
pub const FLAG_ERROR: u32 = 1 << 5;

/// DMA_UNMAP flag: report dirty pages (not supported: refused).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap every window (address and size must then be 0).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
/// DMA_MAP / region flags: readable.
pub const DMA_READ_FLAG: u32 = 1;
/// DMA_MAP / region flags: writable.
pub const DMA_WRITE_FLAG: u32 = 2;
/// Region flag: mmap-able.
pub const REGION_MMAP: u32 = 4;
/// Region flag: capabilities follow the region info.
pub const REGION_CAPS: u32 = 8;
/// Region capability id: sparse mmap areas.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Most sparse mmap areas accepted in one region's capability.
pub const MAX_SPARSE_AREAS: usize = 64;
/// The argsz a client sends with DEVICE_GET_REGION_INFO: room for a sparse mmap
/// capability of [`MAX_SPARSE_AREAS`] areas.
pub const REGION_INFO_ARGSZ: u32 = RegionInfo::SIZE + 16 + 16 * MAX_SPARSE_AREAS as u32;
/// Device flag: resettable.
pub const DEVICE_FLAGS_RESET: u32 = 1;
/// Device flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 2;
/// IRQ info flag: eventfd signalling.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// SET_IRQS: no data.
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// SET_IRQS: the data are booleans (one byte per vector).
pub const IRQ_SET_DATA_BOOL: u32 = 2;
/// SET_IRQS: the data are eventfds (passed as fds).
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// SET_IRQS: the mask action.
pub const IRQ_SET_ACTION_MASK: u32 = 8;
/// SET_IRQS: the unmask action (with an eventfd: the event the device watches).
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
/// SET_IRQS: the trigger action.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;

/// PCI region indexes.
pub const PCI_BAR0: u32 = 0;
/// PCI BAR 1.
pub const PCI_BAR1: u32 = 1;
/// PCI config space region.
pub const PCI_CONFIG: u32 = 7;
/// Number of PCI regions (BAR0-5, ROM, config, VGA).
pub const PCI_NUM_REGIONS: u32 = 9;
/// PCI IRQ indexes: INTx.
pub const PCI_INTX: u32 = 0;
/// MSI.
pub const PCI_MSI: u32 = 1;
/// MSI-X.
pub const PCI_MSIX: u32 = 2;
/// Number of PCI IRQ indexes (INTx, MSI, MSI-X, ERR, REQ).
pub const PCI_NUM_IRQS: u32 = 5;
/// IRQ index of PCI error reporting (AER): the device signals an error.
pub const PCI_ERR: u32 = 3;
/// IRQ index of a device request: the device asks to be released (unplugged).
pub const PCI_REQ: u32 = 4;

/// A malformed message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Shorter than its fixed fields.
    #[error("{what}: {got} bytes, at least {need} needed")]
    Short {
        /// The message.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A size field disagrees with the bytes present or exceeds a limit.
    #[error("{0}")]
    BadSize(&'static str),
    /// Unknown command number.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// Flags with bits the spec does not define.
    #[error("{what}: undefined flag bits {flags:#x}")]
    BadFlags {
        /// The message.
        what: &'static str,
        /// The flags.
        flags: u32,
    },
    /// Bad version data.
    #[error("bad version data: {0}")]
    BadVersion(String),
}

impl ProtoError {
    /// The errno an error reply carries for this.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::UnknownCommand(_) => libc::ENOSYS,
            _ => libc::EINVAL,
        }
    }
}

/// The message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Message id (a reply carries its request's).
    pub id: u16,
    /// Command number.
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Flags.
    pub flags: u32,
    /// Errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Encodes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Decodes and checks the size field.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Result<Header, ProtoError> {
        let h = Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        if (h.size as usize) < HEADER_SIZE || h.size as usize > MAX_MESSAGE {
            return Err(ProtoError::BadSize("message size outside the header size .. the maximum"));
        }
        if h.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR) != 0 || h.flags & FLAG_TYPE_MASK > FLAG_REPLY {
            return Err(ProtoError::BadFlags { what: "header", flags: h.flags });
        }
        Ok(h)
    }

    /// True for replies.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_REPLY
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }
}

/// Little-endian field reader that reports short input instead of panicking.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `b`, naming the message `what` in errors.
    pub fn new(b: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { b, at: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(ProtoError::Short { what: self.what, got: self.b.len(), need: self.at + n });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// A u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    /// A u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let s = self.take(8)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(s);
        Ok(u64::from_le_bytes(x))
    }

    /// The remaining bytes.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
}

/// Little-endian field writer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// VERSION payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Capabilities (JSON object).
    pub capabilities: serde_json::Value,
}

impl Version {
    /// Ours: 0.1, with our limits.
    pub fn ours() -> Version {
        Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            capabilities: serde_json::json!({
                "capabilities": {
                    "max_msg_fds": MAX_FDS,
                    "max_data_xfer_size": MAX_DATA_XFER,
                    "max_dma_maps": DEFAULT_MAX_DMA_MAPS,
                    "pgsizes": 4096,
                    "migration": { "pgsize": 4096 },
                    PASSTHRU_CAPABILITY: { "posted_dma_map": true }
                }
            }),
        }
    }

    /// The limits the peer announced, with the spec's defaults for what it left out.
    pub fn limits(&self) -> Limits {
        let caps = &self.capabilities["capabilities"];
        let num = |k: &str, default: u64| caps[k].as_u64().unwrap_or(default);
        Limits {
            max_msg_fds: usize::try_from(num("max_msg_fds", 1)).unwrap_or(1).min(MAX_FDS),
            max_data_xfer_size: usize::try_from(num("max_data_xfer_size", MAX_DATA_XFER as u64))
                .unwrap_or(MAX_DATA_XFER)
                .clamp(1, MAX_DATA_XFER),
            max_dma_maps: num("max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            posted_dma_map: caps[PASSTHRU_CAPABILITY]["posted_dma_map"].as_bool().unwrap_or(false),
        }
    }

    /// Encodes (the JSON is NUL-terminated).
    pub fn encode(&self) -> Vec<u8> {
        let json = self.capabilities.to_string();
        Writer::default().u16(self.major).u16(self.minor).bytes(json.as_bytes()).bytes(&[0]).0
    }

    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<Version, ProtoError> {
        let mut r = Reader::new(b, "VERSION");
        let (major, minor) = (r.u16()?, r.u16()?);
        let rest = r.rest();
        let text = match rest.iter().position(|c| *c == 0) {
            Some(n) => &rest[..n],
            None => rest,
        };
        let capabilities = if text.is_empty() {
            serde_json::json!({})
        } else {
            let s = std::str::from_utf8(text).map_err(|_| ProtoError::BadVersion("not UTF-8".into()))?;
            serde_json::from_str(s).map_err(|e| ProtoError::BadVersion(e.to_string()))?
        };
        Ok(Version { major, minor, capabilities })
    }
}

/// What a peer announced in its VERSION (or the spec's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Descriptors it receives in one message (spec default 1).
    pub max_msg_fds: usize,
    /// Largest data transfer of one message (spec default 1 MiB; never above ours).
    pub max_data_xfer_size: usize,
    /// DMA windows it holds at once (spec default 65535).
    pub max_dma_maps: u64,
    /// It accepts DMA_MAP with No_reply (passthru's own capability).
    pub posted_dma_map: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Version { major: 0, minor: 0, capabilities: serde_json::json!({}) }.limits()
    }
}

/// DMA_MAP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// READ | WRITE.
    pub flags: u32,
    /// Offset of `address` in the fd passed along (if any).
    pub offset: u64,
    /// IOVA.
    pub address: u64,
    /// Bytes.
    pub size: u64,
}

impl DmaMap {
    /// Wire size.
    pub const SIZE: u32 = 32;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(Self::SIZE).u32(self.flags).u64(self.offset).u64(self.address).u64(self.size).0
    }
    /// Decodes; unknown flag bits are refused (EINVAL), as the spec requires.
    pub fn decode(b: &[u8]) -> Result<DmaMap, ProtoError> {
        let mut r = Reader::new(b, "DMA_MAP");
        let argsz = r.u32()?;
        let m = DmaMap { flags: r.u32()?, offset: r.u64()?, address: r.u64()?, size: r.u64()? };
        if argsz < Self::SIZE {
            return Err(ProtoError::BadSize("DMA_MAP argsz below 32"));
        }
        if m.flags & !(DMA_READ_FLAG | DMA_WRITE_FLAG) != 0 {
            return Err(ProtoError::BadFlags { what: "DMA_MAP", flags: m.flags });
        }
        if m.size == 0 || m.address.checked_add(m.size).is_none() {
            return Err(ProtoError::BadSize("DMA_MAP range empty or wrapping"));
        }
        Ok(m)
    }
}

/// DMA_UNMAP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Flags: 0, or [`DMA_UNMAP_FLAG_ALL`] (dirty bitmaps are not supported).
    pub flags: u32,
    /// IOVA.
    pub address: u64,
    /// Bytes.
    pub size: u64,
}

impl DmaUnmap {
    /// Wire size.
    pub const SIZE: u32 = 24;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(Self::SIZE).u32(self.flags).u64(self.address).u64(self.size).0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<DmaUnmap, ProtoError> {
        let mut r = Reader::new(b, "DMA_UNMAP");
        let argsz = r.u32()?;
        let m = DmaUnmap { flags: r.u32()?, address: r.u64()?, size: r.u64()? };
        if argsz < Self::SIZE {
            return Err(ProtoError::BadSize("DMA_UNMAP argsz below 24"));
        }
        if m.flags & !DMA_UNMAP_FLAG_ALL != 0 {
            return Err(ProtoError::BadFlags { what: "DMA_UNMAP", flags: m.flags });
        }
        if m.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if m.address != 0 || m.size != 0 {
                return Err(ProtoError::BadSize("DMA_UNMAP of all windows takes address 0 and size 0"));
            }
        } else if m.size == 0 || m.address.checked_add(m.size).is_none() {
            return Err(ProtoError::BadSize("DMA_UNMAP range empty or wrapping"));
        }
        Ok(m)
    }
}

/// DEVICE_GET_INFO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// DEVICE_FLAGS_*.
    pub flags: u32,
    /// Regions.
    pub num_regions: u32,
    /// IRQ indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Wire size.
    pub const SIZE: u32 = 16;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(Self::SIZE).u32(self.flags).u32(self.num_regions).u32(self.num_irqs).0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<DeviceInfo, ProtoError> {
        let mut r = Reader::new(b, "DEVICE_GET_INFO");
        let _argsz = r.u32()?;
        Ok(DeviceInfo { flags: r.u32()?, num_regions: r.u32()?, num_irqs: r.u32()? })
    }
}

/// DEVICE_GET_REGION_INFO request/reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// READ | WRITE | MMAP.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Capability offset (0: none).
    pub cap_offset: u32,
    /// Bytes.
    pub size: u64,
    /// Offset for mmap.
    pub offset: u64,
}

impl RegionInfo {
    /// Wire size.
    pub const SIZE: u32 = 32;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(Self::SIZE)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.cap_offset)
            .u64(self.size)
            .u64(self.offset)
            .0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<RegionInfo, ProtoError> {
        let mut r = Reader::new(b, "DEVICE_GET_REGION_INFO");
        let _argsz = r.u32()?;
        Ok(RegionInfo { flags: r.u32()?, index: r.u32()?, cap_offset: r.u32()?, size: r.u64()?, offset: r.u64()? })
    }

    /// Encodes with a sparse mmap capability listing `areas` (offset, size), if the
    /// client's `argsz` leaves room for it (the reply's argsz says what is needed).
    pub fn encode_with_areas(&self, areas: &[(u64, u64)], client_argsz: u32) -> Vec<u8> {
        let cap_len = 16 + 16 * areas.len() as u32;
        let need = Self::SIZE + cap_len;
        let mut info = *self;
        info.flags |= REGION_CAPS;
        if client_argsz < need {
            info.cap_offset = 0;
            let mut b = info.encode();
            b[0..4].copy_from_slice(&need.to_le_bytes());
            return b;
        }
        info.cap_offset = Self::SIZE;
        let mut w = Writer(info.encode());
        w.0[0..4].copy_from_slice(&need.to_le_bytes());
        w = w.u16(REGION_CAP_SPARSE_MMAP).u16(1).u32(0).u32(areas.len() as u32).u32(0);
        for &(o, sz) in areas {
            w = w.u64(o).u64(sz);
        }
        w.0
    }
}

/// The sparse mmap areas of a region info reply (`payload` is the whole reply, caps
/// included): `Ok(None)` if it has no such capability. A malformed chain is an error.
pub fn sparse_areas(payload: &[u8], info: &RegionInfo) -> Result<Option<Vec<(u64, u64)>>, ProtoError> {
    if info.flags & REGION_CAPS == 0 || info.cap_offset == 0 {
        return Ok(None);
    }
    let mut at = info.cap_offset as usize;
    let mut seen = 0;
    while at != 0 {
        if at < RegionInfo::SIZE as usize || seen > 16 {
            return Err(ProtoError::BadSize("region capability chain loops or points inside the region info"));
        }
        seen += 1;
        let mut r = Reader::new(
            payload.get(at..).ok_or(ProtoError::BadSize("region capability past the reply"))?,
            "region capability",
        );
        let (id, _version, next) = (r.u16()?, r.u16()?, r.u32()?);
        if id == REGION_CAP_SPARSE_MMAP {
            let n = r.u32()? as usize;
            let _reserved = r.u32()?;
            if n > MAX_SPARSE_AREAS {
                return Err(ProtoError::BadSize("too many sparse mmap areas"));
            }
            let mut areas = Vec::with_capacity(n);
            for _ in 0..n {
                areas.push((r.u64()?, r.u64()?));
            }
            return Ok(Some(areas));
        }
        at = next as usize;
    }
    Ok(None)
}

/// DEVICE_GET_IRQ_INFO request/reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// IRQ_INFO_*.
    pub flags: u32,
    /// Index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

impl IrqInfo {
    /// Wire size.
    pub const SIZE: u32 = 16;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(Self::SIZE).u32(self.flags).u32(self.index).u32(self.count).0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<IrqInfo, ProtoError> {
        let mut r = Reader::new(b, "DEVICE_GET_IRQ_INFO");
        let _argsz = r.u32()?;
        Ok(IrqInfo { flags: r.u32()?, index: r.u32()?, count: r.u32()? })
    }
}

/// DEVICE_SET_IRQS payload (eventfds travel as fds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetIrqs {
    /// IRQ_SET_*.
    pub flags: u32,
    /// Index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
}

impl SetIrqs {
    /// Wire size.
    pub const SIZE: u32 = 20;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(Self::SIZE).u32(self.flags).u32(self.index).u32(self.start).u32(self.count).0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<SetIrqs, ProtoError> {
        let mut r = Reader::new(b, "DEVICE_SET_IRQS");
        let _argsz = r.u32()?;
        Ok(SetIrqs { flags: r.u32()?, index: r.u32()?, start: r.u32()?, count: r.u32()? })
    }
}

/// REGION_READ / REGION_WRITE fixed fields (data follows for writes and read replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Encodes with `data` appended.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        Writer::default().u64(self.offset).u32(self.region).u32(self.count).bytes(data).0
    }
    /// Decodes; returns the data that follows. `with_data`: the count must match it.
    pub fn decode(b: &[u8], with_data: bool) -> Result<(RegionAccess, &[u8]), ProtoError> {
        let mut r = Reader::new(b, "REGION_READ/WRITE");
        let a = RegionAccess { offset: r.u64()?, region: r.u32()?, count: r.u32()? };
        let data = r.rest();
        if a.count as usize > MAX_DATA_XFER {
            return Err(ProtoError::BadSize("region access above max_data_xfer_size"));
        }
        if with_data && data.len() != a.count as usize {
            return Err(ProtoError::BadSize("region access count differs from its data"));
        }
        Ok((a, data))
    }
}

/// DMA_READ / DMA_WRITE fixed fields (data follows for writes and read replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    /// IOVA.
    pub address: u64,
    /// Bytes.
    pub count: u64,
}

impl DmaAccess {
    /// Encodes with `data` appended.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        Writer::default().u64(self.address).u64(self.count).bytes(data).0
    }
    /// Decodes; returns the data that follows. `with_data`: the count must match it.
    pub fn decode(b: &[u8], with_data: bool) -> Result<(DmaAccess, &[u8]), ProtoError> {
        let mut r = Reader::new(b, "DMA_READ/WRITE");
        let a = DmaAccess { address: r.u64()?, count: r.u64()? };
        let data = r.rest();
        if a.count as usize > MAX_DATA_XFER || a.count > MAX_DATA_XFER as u64 {
            return Err(ProtoError::BadSize("DMA access above max_data_xfer_size"));
        }
        if with_data && data.len() as u64 != a.count {
            return Err(ProtoError::BadSize("DMA access count differs from its data"));
        }
        Ok((a, data))
    }
}

/// A decoded request (what either side may receive as a command).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version(Version),
    /// DMA_MAP.
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo,
    /// DEVICE_GET_REGION_INFO of an index, with the client's argsz.
    DeviceGetRegionInfo(u32, u32),
    /// DEVICE_GET_IRQ_INFO of an index.
    DeviceGetIrqInfo(u32),
    /// DEVICE_SET_IRQS.
    DeviceSetIrqs(SetIrqs),
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE with its data.
    RegionWrite(RegionAccess, Vec<u8>),
    /// DMA_READ.
    DmaRead(DmaAccess),
    /// DMA_WRITE with its data.
    DmaWrite(DmaAccess, Vec<u8>),
    /// DEVICE_RESET.
    DeviceReset,
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature),
    /// MIG_DATA_READ of up to `size` bytes.
    MigDataRead(MigData),
    /// MIG_DATA_WRITE with its data.
    MigDataWrite(MigData, Vec<u8>),
    /// A command this implementation does not serve.
    Unsupported(Command),
}

/// Migration (protocol 0.2, as linux's vfio.h and libvfio-user number them).
pub mod mig {
    /// DEVICE_FEATURE flags: the feature index.
    pub const FEATURE_MASK: u32 = 0xffff;
    /// DEVICE_FEATURE flags: read the feature.
    pub const FEATURE_GET: u32 = 1 << 16;
    /// DEVICE_FEATURE flags: set the feature.
    pub const FEATURE_SET: u32 = 1 << 17;
    /// DEVICE_FEATURE flags: ask whether the operation is supported.
    pub const FEATURE_PROBE: u32 = 1 << 18;
    /// Feature: migration support (GET: u64 flags).
    pub const FEATURE_MIGRATION: u32 = 1;
    /// Feature: the device's migration state (GET/SET: u32 state, u32 data_fd).
    pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
    /// Feature: DMA dirty logging on (SET: u64 page size, u32 ranges, u32 reserved,
    /// ranges of u64 iova and length).
    pub const FEATURE_DMA_LOGGING_START: u32 = 6;
    /// Feature: DMA dirty logging off (SET).
    pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
    /// Feature: the dirty bitmap of a range (GET: u64 iova, length, page size; the
    /// reply appends the bitmap).
    pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
    /// MIGRATION flag: the STOP_COPY state (saving while stopped).
    pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
    /// MIGRATION flag: the P2P states.
    pub const MIGRATION_P2P: u64 = 1 << 1;
    /// MIGRATION flag: the PRE_COPY states.
    pub const MIGRATION_PRE_COPY: u64 = 1 << 2;
    /// Device state: error (a failed transition; only reset leaves it).
    pub const STATE_ERROR: u32 = 0;
    /// Device state: stopped (no DMA, no interrupts, no state changes).
    pub const STATE_STOP: u32 = 1;
    /// Device state: running.
    pub const STATE_RUNNING: u32 = 2;
    /// Device state: stopped, its state readable with MIG_DATA_READ.
    pub const STATE_STOP_COPY: u32 = 3;
    /// Device state: stopped, taking a state through MIG_DATA_WRITE.
    pub const STATE_RESUMING: u32 = 4;
    /// Device state: running, P2P quiesced (unused in vfio-user).
    pub const STATE_RUNNING_P2P: u32 = 5;
    /// Device state: running, state readable before stopping.
    pub const STATE_PRE_COPY: u32 = 6;
    /// Device state: PRE_COPY with P2P quiesced (unused in vfio-user).
    pub const STATE_PRE_COPY_P2P: u32 = 7;
}

/// DEVICE_FEATURE payload: argsz (the largest reply payload the client takes), flags,
/// then the feature's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFeature {
    /// Largest reply payload accepted.
    pub argsz: u32,
    /// Feature index and GET/SET/PROBE.
    pub flags: u32,
    /// The feature's data.
    pub data: Vec<u8>,
}

impl DeviceFeature {
    /// Fixed fields.
    pub const SIZE: u32 = 8;
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default().u32(self.argsz).u32(self.flags).bytes(&self.data).0
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<DeviceFeature, ProtoError> {
        let mut r = Reader::new(b, "DEVICE_FEATURE");
        let (argsz, flags) = (r.u32()?, r.u32()?);
        let data = r.rest().to_vec();
        let ops = mig::FEATURE_GET | mig::FEATURE_SET | mig::FEATURE_PROBE;
        if flags & !(mig::FEATURE_MASK | ops) != 0 {
            return Err(ProtoError::BadFlags { what: "DEVICE_FEATURE", flags });
        }
        Ok(DeviceFeature { argsz, flags, data })
    }
}

/// MIG_DATA_READ / MIG_DATA_WRITE fixed fields: argsz, size (data follows for writes
/// and read replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigData {
    /// 8 + bytes of data.
    pub argsz: u32,
    /// Bytes of data (asked for, or carried).
    pub size: u32,
}

impl MigData {
    /// Encodes with `data` appended.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        Writer::default().u32(self.argsz).u32(self.size).bytes(data).0
    }
    /// Decodes; returns the data that follows (a write's must be exactly `size` bytes).
    pub fn decode(b: &[u8], with_data: bool) -> Result<(MigData, &[u8]), ProtoError> {
        let mut r = Reader::new(b, "MIG_DATA");
        let m = MigData { argsz: r.u32()?, size: r.u32()? };
        let data = r.rest();
        if m.size as usize > MAX_DATA_XFER {
            return Err(ProtoError::BadSize("migration data above max_data_xfer_size"));
        }
        if with_data && data.len() != m.size as usize {
            return Err(ProtoError::BadSize("MIG_DATA_WRITE size differs from its data"));
        }
        Ok((m, data))
    }
}

/// Decodes a command message's payload. Never panics.
pub fn decode_request(header: &Header, payload: &[u8]) -> Result<Request, ProtoError> {
    if payload.len() != header.payload_len() {
        return Err(ProtoError::BadSize("payload length differs from the header's size"));
    }
    let cmd = Command::from_u16(header.command).ok_or(ProtoError::UnknownCommand(header.command))?;
    Ok(match cmd {
        Command::Version => Request::Version(Version::decode(payload)?),
        Command::DmaMap => Request::DmaMap(DmaMap::decode(payload)?),
        Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::decode(payload)?),
        Command::DeviceGetInfo => {
            Reader::new(payload, "DEVICE_GET_INFO").u32()?;
            Request::DeviceGetInfo
        }
        Command::DeviceGetRegionInfo => {
            let argsz = Reader::new(payload, "DEVICE_GET_REGION_INFO").u32()?;
            Request::DeviceGetRegionInfo(RegionInfo::decode(payload)?.index, argsz)
        }
        Command::DeviceGetIrqInfo => Request::DeviceGetIrqInfo(IrqInfo::decode(payload)?.index),
        Command::DeviceSetIrqs => Request::DeviceSetIrqs(SetIrqs::decode(payload)?),
        Command::RegionRead => Request::RegionRead(RegionAccess::decode(payload, false)?.0),
        Command::RegionWrite => {
            let (a, d) = RegionAccess::decode(payload, true)?;
            Request::RegionWrite(a, d.to_vec())
        }
        Command::DmaRead => Request::DmaRead(DmaAccess::decode(payload, false)?.0),
        Command::DmaWrite => {
            let (a, d) = DmaAccess::decode(payload, true)?;
            Request::DmaWrite(a, d.to_vec())
        }
        Command::DeviceReset => Request::DeviceReset,
        Command::DeviceFeature => Request::DeviceFeature(DeviceFeature::decode(payload)?),
        Command::MigDataRead => Request::MigDataRead(MigData::decode(payload, false)?.0),
        Command::MigDataWrite => {
            let (m, d) = MigData::decode(payload, true)?;
            Request::MigDataWrite(m, d.to_vec())
        }
        other => Request::Unsupported(other),
    })
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_byte_exact() {
        let h = Header { id: 0x0102, command: 2, size: 48, flags: FLAG_REPLY | FLAG_ERROR, error: 22 };
        let b = h.to_bytes();
        assert_eq!(b, [0x02, 0x01, 2, 0, 48, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0]);
        assert_eq!(Header::from_bytes(&b), Ok(h));
    }

    #[test]
    fn dma_map_layout_is_byte_exact_and_unknown_flags_are_refused() {
        let m = DmaMap { flags: DMA_READ_FLAG | DMA_WRITE_FLAG, offset: 0x1000, address: 0x2000, size: 0x3000 };
        let b = m.encode();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..8], &[32, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&b[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x2000u64.to_le_bytes());
        assert_eq!(DmaMap::decode(&b), Ok(m));
        let mut bad = b.clone();
        bad[4] = 0x7;
        assert!(matches!(DmaMap::decode(&bad), Err(ProtoError::BadFlags { .. })));
        assert!(matches!(DmaMap::decode(&b[..31]), Err(ProtoError::Short { .. })));
    }

    #[test]
    fn region_and_dma_accesses_check_their_counts() {
        let a = RegionAccess { offset: 8, region: 0, count: 4 };
        assert_eq!(RegionAccess::decode(&a.encode(&[1, 2, 3, 4]), true).unwrap().1, &[1, 2, 3, 4]);
        assert!(RegionAccess::decode(&a.encode(&[1, 2, 3]), true).is_err());
        let d = DmaAccess { address: 0x1000, count: u64::MAX };
        assert!(DmaAccess::decode(&d.encode(&[]), false).is_err(), "count above the transfer limit");
    }

    #[test]
    fn migration_messages_are_byte_exact_and_checked() {
        let f = DeviceFeature { argsz: 16, flags: mig::FEATURE_GET | mig::FEATURE_MIG_DEVICE_STATE, data: vec![] };
        assert_eq!(f.encode(), [16, 0, 0, 0, 2, 0, 1, 0]);
        assert_eq!(DeviceFeature::decode(&f.encode()), Ok(f));
        assert!(DeviceFeature::decode(&[8, 0, 0, 0, 2, 0, 0, 0x80]).is_err(), "undefined op bit");
        let w = MigData { argsz: 11, size: 3 };
        assert_eq!(w.encode(&[1, 2, 3]), [11, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3]);
        assert_eq!(MigData::decode(&w.encode(&[1, 2, 3]), true).unwrap().1, &[1, 2, 3]);
        assert!(MigData::decode(&w.encode(&[1, 2]), true).is_err());
        assert!(MigData::decode(&MigData { argsz: 8, size: u32::MAX }.encode(&[]), false).is_err());
    }

    #[test]
    fn version_round_trips_and_garbage_is_an_error() {
        let v = Version::ours();
        assert_eq!(Version::decode(&v.encode()), Ok(v));
        assert!(Version::decode(&[0, 0, 1, 0, b'{', b'x', 0]).is_err());
        assert!(Version::decode(&[0]).is_err());
    }
}
