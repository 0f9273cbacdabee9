//! A virtio-iommu driver (layout in `abi::viommu`), as Linux's drives the device:
//! VERSION_1 and MAP_UNMAP required, one PROBE per endpoint, requests of one
//! device-readable and one device-writable buffer, a batch per notification, a
//! status read only when the used length is the writable size, event buffers posted
//! at start.

use crate::mmio::{read8, read32, read64, write32, write64};
use crate::pci::Function;
use crate::virtio::{Queue, VirtioPci, ring_bytes};
use abi::viommu::{self as v, config, feature, req, size};

/// Entries of the request queue (two descriptors a request).
pub const REQUEST_QUEUE: u16 = 64;
/// Requests one batch holds.
pub const BATCH: usize = (REQUEST_QUEUE / 2) as usize;
/// Event buffers posted.
pub const EVENTS: u16 = 8;
/// Bytes of one request slot.
const SLOT: u64 = 1024;
/// Bytes of guest memory the driver needs at its base.
pub const MEMORY: u64 = 0x3000 + BATCH as u64 * SLOT;

/// A request.
#[derive(Clone, Copy, Debug)]
pub enum Request {
    /// ATTACH (`bypass`: ATTACH_F_BYPASS).
    Attach { domain: u32, endpoint: u32, bypass: bool },
    /// DETACH.
    Detach { domain: u32, endpoint: u32 },
    /// MAP of `[iova, iova + size)` to `gpa`.
    Map { domain: u32, iova: u64, gpa: u64, size: u64, flags: u32 },
    /// UNMAP of `[iova, iova + size)`.
    Unmap { domain: u32, iova: u64, size: u64 },
}

/// A fault report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Reason.
    pub reason: u8,
    /// Flags.
    pub flags: u32,
    /// Endpoint.
    pub endpoint: u32,
    /// Address.
    pub address: u64,
}

/// Why the driver could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// No virtio-iommu on the bus, or its structures are missing.
    NotFound,
    /// The device refused the features, or lacks VERSION_1 or MAP_UNMAP.
    Features,
    /// A queue could not be set up.
    Queue,
    /// page_size_mask is 0, or its granule is above 4 KiB.
    PageSize,
}

/// The driver.
pub struct Viommu {
    dev: VirtioPci,
    rq: Queue,
    eq: Queue,
    slots: u64,
    events: u64,
    /// Features accepted.
    pub features: u64,
    /// page_size_mask.
    pub page_size_mask: u64,
    /// First and last domain ids.
    pub domain_range: (u32, u32),
    /// probe_size.
    pub probe_size: u32,
    /// Requests sent, notifications made.
    pub requests: u64,
    /// See `requests`.
    pub kicks: u64,
}

/// Statuses of a batch (None: the used length was not the writable size).
pub type Statuses = [Option<u8>; BATCH];

fn put(at: u64, bytes: &[(u64, u64, u8)]) {
    for &(off, val, width) in bytes {
        // SAFETY: the request slot this driver owns.
        unsafe {
            match width {
                4 => write32(at + off, val as u32),
                _ => write64(at + off, val),
            }
        }
    }
}

impl Viommu {
    /// Finds the device, negotiates, sets up its queues in `memory` (at least
    /// [`MEMORY`] bytes), DRIVER_OK, posts the event buffers (no notification).
    pub fn init(memory: u64) -> Result<Viommu, InitError> {
        let f = crate::pci::find(abi::virtio::VENDOR_ID, abi::virtio::device_id(v::DEVICE_TYPE), 0)
            .ok_or(InitError::NotFound)?;
        Self::init_on(f, memory)
    }

    fn init_on(f: Function, memory: u64) -> Result<Viommu, InitError> {
        let dev = VirtioPci::new(f).ok_or(InitError::NotFound)?;
        let want =
            [feature::INPUT_RANGE, feature::DOMAIN_RANGE, feature::MAP_UNMAP, feature::PROBE, feature::BYPASS_CONFIG]
                .iter()
                .fold(1u64 << abi::virtio::F_VERSION_1, |a, b| a | (1 << b));
        let features = dev.negotiate(want).ok_or(InitError::Features)?;
        let needed = (1u64 << abi::virtio::F_VERSION_1) | (1 << feature::MAP_UNMAP);
        if features & needed != needed {
            return Err(InitError::Features);
        }
        let page_size_mask = dev.config64(config::PAGE_SIZE_MASK);
        if page_size_mask == 0 || page_size_mask.trailing_zeros() > 12 {
            return Err(InitError::PageSize);
        }
        let rq = dev.queue(v::REQUESTQ, REQUEST_QUEUE, memory).ok_or(InitError::Queue)?;
        let eq_at = (memory + ring_bytes(REQUEST_QUEUE) + 0xfff) & !0xfff;
        let mut eq = dev.queue(v::EVENTQ, EVENTS, eq_at).ok_or(InitError::Queue)?;
        let events = (eq_at + ring_bytes(EVENTS) + 0xfff) & !0xfff;
        dev.driver_ok();
        for i in 0..EVENTS {
            eq.push_writable(i, events + u64::from(i) * size::FAULT, size::FAULT as u32);
        }
        eq.publish();
        let domain_range = if features & (1 << feature::DOMAIN_RANGE) != 0 {
            (dev.config32(config::DOMAIN_START), dev.config32(config::DOMAIN_END))
        } else {
            (0, u32::MAX)
        };
        Ok(Viommu {
            probe_size: dev.config32(config::PROBE_SIZE),
            dev,
            rq,
            eq,
            slots: events + 0x1000,
            events,
            features,
            page_size_mask,
            domain_range,
            requests: 0,
            kicks: 0,
        })
    }

    /// Sends `reqs` (at most [`BATCH`]) with one notification; their statuses.
    pub fn batch(&mut self, reqs: &[Request]) -> Statuses {
        let mut out = [None; BATCH];
        let n = reqs.len().min(BATCH);
        for (i, r) in reqs[..n].iter().enumerate() {
            let at = self.slots + i as u64 * SLOT;
            let len = match *r {
                Request::Attach { domain, endpoint, bypass } => {
                    put(at, &[(0, u64::from(req::ATTACH), 4), (4, u64::from(domain), 4), (8, u64::from(endpoint), 4)]);
                    put(at, &[(12, u64::from(bypass) * u64::from(v::ATTACH_F_BYPASS), 4), (16, 0, 4)]);
                    size::ATTACH
                }
                Request::Detach { domain, endpoint } => {
                    put(at, &[(0, u64::from(req::DETACH), 4), (4, u64::from(domain), 4), (8, u64::from(endpoint), 4)]);
                    put(at, &[(12, 0, 8)]);
                    size::DETACH
                }
                Request::Map { domain, iova, gpa, size: s, flags } => {
                    put(at, &[(0, u64::from(req::MAP), 4), (4, u64::from(domain), 4), (8, iova, 8)]);
                    put(at, &[(16, iova + s - 1, 8), (24, gpa, 8), (32, u64::from(flags), 4)]);
                    size::MAP
                }
                Request::Unmap { domain, iova, size: s } => {
                    put(at, &[(0, u64::from(req::UNMAP), 4), (4, u64::from(domain), 4), (8, iova, 8)]);
                    put(at, &[(16, iova + s - 1, 8), (24, 0, 4)]);
                    size::UNMAP
                }
            };
            // The tail: poisoned, so a status the device did not write is not OK.
            put(at + 0x100, &[(0, 0xffff_ffff, 4)]);
            self.rq.push_request(i as u16, (at, len as u32), (at + 0x100, size::TAIL as u32));
        }
        self.send(n, &mut out);
        out
    }

    fn send(&mut self, n: usize, out: &mut Statuses) {
        self.rq.publish();
        self.rq.notify();
        self.kicks += 1;
        self.requests += n as u64;
        for _ in 0..n {
            let Some((head, len)) = self.rq.wait_used() else { return };
            let slot = u64::from(head / 2);
            let Some(o) = out.get_mut(slot as usize) else { continue };
            let tail = self.slots + slot * SLOT + 0x100;
            // SAFETY: the slot's tail, in this driver's memory.
            let status = unsafe { read8(tail) };
            *o = (u64::from(len) == size::TAIL).then_some(status);
        }
    }

    /// One request's status.
    pub fn one(&mut self, r: Request) -> Option<u8> {
        self.batch(&[r])[0]
    }

    /// PROBE of `endpoint`: the status and the first RESV_MEM MSI region, if any.
    pub fn probe(&mut self, endpoint: u32) -> (Option<u8>, Option<(u64, u64)>) {
        let at = self.slots;
        put(at, &[(0, u64::from(req::PROBE), 4), (4, u64::from(endpoint), 4)]);
        for o in (8..size::PROBE).step_by(8) {
            put(at, &[(o, 0, 8)]);
        }
        let props = at + 0x100;
        let writable = self.probe_size + size::TAIL as u32;
        self.rq.push_request(0, (at, size::PROBE as u32), (props, writable));
        self.rq.publish();
        self.rq.notify();
        self.kicks += 1;
        self.requests += 1;
        let Some((_, len)) = self.rq.wait_used() else { return (None, None) };
        if len != writable {
            return (None, None);
        }
        // SAFETY: the slot's writable part, in this driver's memory.
        let status = unsafe { read8(props + u64::from(self.probe_size)) };
        let mut msi = None;
        let mut o = 0u64;
        while o + 4 <= u64::from(self.probe_size) {
            // SAFETY: as above.
            let head = unsafe { read32(props + o) };
            let (kind, len) = (head & 0xfff, u64::from(head >> 16));
            if kind == 0 {
                break;
            }
            // SAFETY: as above (a RESV_MEM property's subtype, start and end).
            let (sub, start, end) = unsafe { (read8(props + o + 4), read64(props + o + 8), read64(props + o + 16)) };
            if u16::try_from(kind).ok() == Some(v::probe::T_RESV_MEM) && sub == v::probe::RESV_MEM_T_MSI {
                msi = Some((start, end));
            }
            o += 4 + len;
        }
        (Some(status), msi)
    }

    /// The next fault report, if the device wrote one (its buffer posted again).
    pub fn fault(&mut self) -> Option<Fault> {
        let (head, _) = self.eq.pop_used()?;
        let at = self.events + u64::from(head) * size::FAULT;
        // SAFETY: an event buffer of this driver.
        let f = unsafe {
            Fault { reason: read8(at), flags: read32(at + 4), endpoint: read32(at + 8), address: read64(at + 16) }
        };
        self.eq.push_writable(head, at, size::FAULT as u32);
        self.eq.publish();
        Some(f)
    }

    /// Waits for a fault report, polling at most `polls` times.
    pub fn wait_fault(&mut self, polls: u64) -> Option<Fault> {
        for _ in 0..polls {
            if let Some(f) = self.fault() {
                return Some(f);
            }
            core::hint::spin_loop();
        }
        None
    }

    /// Writes `bypass` (BYPASS_CONFIG).
    pub fn set_bypass(&self, on: bool) {
        self.dev.config_write8(config::BYPASS, u8::from(on));
    }
}
