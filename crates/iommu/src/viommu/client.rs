//! A virtio-iommu driver in the VMM's own process, for tests, `passthru replay` and
//! benchmarks: it finds the device at [`abi::viommu::SLOT`], negotiates like Linux
//! (VERSION_1 and MAP_UNMAP required), lays its queues and request buffers in a
//! stretch of guest memory it is given, and sends requests as Linux does — one
//! device-readable and one device-writable buffer each, a batch per notification —
//! reading a status back only when the used length is the writable size.

use super::wire::{self, Request};
use abi::viommu::{self as v, feature, size};
use std::time::{Duration, Instant};
use virtio::driver::{Buf, Bus, Driver, ring_bytes};
use vm_memory::{Bytes, GuestAddress};

/// The interrupt vector of MSI-X vector 0 when the driver turns MSI-X on.
pub const MSI_VECTOR_BASE: u32 = 0x50;
/// Event buffers the driver keeps posted.
pub const EVENT_BUFFERS: u16 = 64;
/// Bytes of one request slot (the largest request with PROBE's properties fits).
const SLOT_BYTES: u64 = 1024;
/// How long a request may take before the driver gives up on the device.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The device's configuration as the driver reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// `input_range` (inclusive).
    pub input_range: (u64, u64),
    /// `domain_range` (inclusive).
    pub domain_range: (u32, u32),
    /// `probe_size`.
    pub probe_size: u32,
    /// `bypass`.
    pub bypass: u8,
}

/// A request as the driver sends it: its device-readable bytes and how many bytes it
/// gives the device to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// Device-readable bytes.
    pub readable: Vec<u8>,
    /// Device-writable bytes (4, or `probe_size` + 4 for PROBE).
    pub writable: u32,
}

impl Submission {
    /// `r` as Linux lays it out, for a device whose `probe_size` is `probe_size`.
    pub fn of(r: &Request, probe_size: u32) -> Submission {
        let tail = size::TAIL as u32;
        let writable = if matches!(r, Request::Probe { .. }) { probe_size.saturating_add(tail) } else { tail };
        Submission { readable: wire::encode(r), writable }
    }
}

/// What came back for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Used length.
    pub used: u32,
    /// The status, when the used length is the writable size (what Linux reads).
    pub status: Option<u8>,
    /// The writable bytes as the device left them.
    pub written: Vec<u8>,
}

impl Reply {
    /// PROBE's properties (the writable bytes before the tail).
    pub fn properties(&self) -> &[u8] {
        &self.written[..self.written.len().saturating_sub(size::TAIL as usize)]
    }
}

/// A fault report read from the event queue.
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
    /// The reserved fields were zero.
    pub reserved_zero: bool,
    /// Used length.
    pub used: u32,
}

/// The driver.
pub struct Client<B: Bus> {
    driver: Driver<B>,
    slots: u64,
    events: u64,
    /// Request slots (each chain takes two descriptors).
    nslots: u16,
    /// Configuration read at start.
    pub config: Config,
    /// Features accepted.
    pub features: u64,
}

/// Where the driver's memory goes, from its base.
struct Layout {
    requestq: u64,
    eventq: u64,
    events: u64,
    slots: u64,
    end: u64,
}

fn layout(base: u64) -> Layout {
    let page = |x: u64| x.next_multiple_of(4096);
    let requestq = base;
    let eventq = page(requestq + ring_bytes(v::QUEUE_SIZE));
    let events = page(eventq + ring_bytes(EVENT_BUFFERS));
    let slots = page(events + u64::from(EVENT_BUFFERS) * size::FAULT);
    let end = slots + u64::from(v::QUEUE_SIZE / 2) * SLOT_BYTES;
    Layout { requestq, eventq, events, slots, end }
}

impl<B: Bus> Client<B> {
    /// Bytes of guest memory the driver needs at its base.
    pub fn memory_needed() -> u64 {
        layout(0).end
    }

    /// Starts the driver on the device at the fixed slot, its memory at `base`:
    /// reset, features `want` (Linux's: all but BYPASS and MMIO), queues, DRIVER_OK,
    /// event buffers posted (without a notification, as Linux does).
    pub fn start(
        bus: B,
        memory: std::sync::Arc<vm_memory::GuestMemoryMmap>,
        base: u64,
        want: u64,
    ) -> Result<Self, String> {
        Self::start_with(bus, memory, base, want, false)
    }

    /// [`Client::start`], with MSI-X on when `msix`: vector 0 for configuration
    /// changes, 1 for the request queue, 2 for the event queue, each an MSI to the
    /// boot CPU with vector [`MSI_VECTOR_BASE`] + its number.
    pub fn start_with(
        bus: B,
        memory: std::sync::Arc<vm_memory::GuestMemoryMmap>,
        base: u64,
        want: u64,
        msix: bool,
    ) -> Result<Self, String> {
        let config = abi::pci::ECAM_BASE + (u64::from(v::SLOT) << 15);
        let mut driver = Driver::new(bus, memory, config)?;
        let features = driver.negotiate(want)?;
        let l = layout(base);
        let vector = |n: u16| msix.then_some(n);
        if msix {
            let msg = |n: u32| (abi::layout::MSI_ADDR_BASE, MSI_VECTOR_BASE + n);
            driver.enable_msix(&[msg(0), msg(1), msg(2)])?;
            driver.set_config_vector(0);
        }
        driver.setup_queue(v::REQUESTQ, v::QUEUE_SIZE, l.requestq, vector(1))?;
        driver.setup_queue(v::EVENTQ, EVENT_BUFFERS, l.eventq, vector(2))?;
        driver.driver_ok();
        let mut c = Client {
            driver,
            slots: l.slots,
            events: l.events,
            nslots: v::QUEUE_SIZE / 2,
            config: Config::default(),
            features,
        };
        c.config = c.read_config();
        c.post_events()?;
        Ok(c)
    }

    /// The same driver, the device now reached through `bus` and `memory` (a VM
    /// restored from a snapshot of this one).
    pub fn moved_to<B2: Bus>(self, bus: B2, memory: std::sync::Arc<vm_memory::GuestMemoryMmap>) -> Client<B2> {
        Client {
            driver: self.driver.moved_to(bus, memory),
            slots: self.slots,
            events: self.events,
            nslots: self.nslots,
            config: self.config,
            features: self.features,
        }
    }

    /// Features Linux asks for.
    pub fn linux_features() -> u64 {
        [
            abi::virtio::F_VERSION_1,
            feature::INPUT_RANGE,
            feature::DOMAIN_RANGE,
            feature::MAP_UNMAP,
            feature::PROBE,
            feature::BYPASS_CONFIG,
        ]
        .iter()
        .fold(0, |a, f| a | (1u64 << f))
    }

    /// The virtio driver underneath.
    pub fn driver(&mut self) -> &mut Driver<B> {
        &mut self.driver
    }

    /// Reads the configuration.
    pub fn read_config(&self) -> Config {
        let mut b = [0u8; v::config::SIZE as usize];
        self.driver.config_read(0, &mut b);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        Config {
            page_size_mask: u64_at(0),
            input_range: (u64_at(8), u64_at(16)),
            domain_range: (u32_at(24), u32_at(28)),
            probe_size: u32_at(32),
            bypass: b[36],
        }
    }

    /// Writes `bypass` (the driver's own value: any byte, to test the device).
    pub fn write_bypass(&self, value: u8) {
        self.driver.config_write(v::config::BYPASS, &[value]);
    }

    fn post_events(&mut self) -> Result<(), String> {
        let mem = std::sync::Arc::clone(self.driver.memory());
        let q = self.driver.queue(v::EVENTQ).ok_or("no event queue")?;
        for i in 0..u64::from(EVENT_BUFFERS) {
            let addr = self.events + i * size::FAULT;
            q.add(&mem, &[Buf { addr, len: size::FAULT as u32, write: true }]).ok_or("event queue full")?;
        }
        q.publish(&mem);
        Ok(())
    }

    /// Requests `r`, one notification, the replies in order.
    pub fn send(&mut self, r: &[Request]) -> Result<Vec<Reply>, String> {
        let ps = self.config.probe_size;
        let subs: Vec<Submission> = r.iter().map(|r| Submission::of(r, ps)).collect();
        self.submit(&subs)
    }

    /// One request's status (None: the used length was not the writable size).
    pub fn one(&mut self, r: Request) -> Result<Option<u8>, String> {
        Ok(self.send(&[r])?.first().and_then(|x| x.status))
    }

    /// Sends `subs` (as many per notification as the queue holds) and waits for every
    /// reply, in order.
    pub fn submit(&mut self, subs: &[Submission]) -> Result<Vec<Reply>, String> {
        let mut replies = Vec::with_capacity(subs.len());
        for chunk in subs.chunks(usize::from(self.nslots)) {
            replies.extend(self.submit_chunk(chunk)?);
        }
        Ok(replies)
    }

    fn submit_chunk(&mut self, subs: &[Submission]) -> Result<Vec<Reply>, String> {
        let mem = std::sync::Arc::clone(self.driver.memory());
        let mut heads = Vec::with_capacity(subs.len());
        {
            let q = self.driver.queue(v::REQUESTQ).ok_or("no request queue")?;
            for (i, s) in subs.iter().enumerate() {
                let at = self.slots + i as u64 * SLOT_BYTES;
                let w_at = at + 128;
                if s.readable.len() > 128 || u64::from(s.writable) > SLOT_BYTES - 128 {
                    return Err("a request larger than a slot".into());
                }
                mem.write_slice(&s.readable, GuestAddress(at)).map_err(|e| e.to_string())?;
                mem.write_slice(&vec![0xa5; s.writable as usize], GuestAddress(w_at)).map_err(|e| e.to_string())?;
                let bufs = [
                    Buf { addr: at, len: s.readable.len() as u32, write: false },
                    Buf { addr: w_at, len: s.writable, write: true },
                ];
                heads.push(q.add(&mem, &bufs).ok_or("request queue full")?);
            }
            q.publish(&mem);
        }
        self.driver.notify(v::REQUESTQ);
        let deadline = Instant::now() + DEADLINE;
        let mut used = vec![None; subs.len()];
        let q = self.driver.queue(v::REQUESTQ).ok_or("no request queue")?;
        for _ in 0..subs.len() {
            let u = q.wait_used(&mem, deadline).ok_or("the device did not answer in time")?;
            let k = heads.iter().position(|h| *h == u.head).ok_or("the device returned a chain it was not given")?;
            used[k] = Some(u.len);
        }
        let mut out = Vec::with_capacity(subs.len());
        for (i, (s, u)) in subs.iter().zip(used).enumerate() {
            let u = u.unwrap_or(0);
            let mut written = vec![0u8; s.writable as usize];
            mem.read_slice(&mut written, GuestAddress(self.slots + i as u64 * SLOT_BYTES + 128))
                .map_err(|e| e.to_string())?;
            let status = (u == s.writable && s.writable >= size::TAIL as u32)
                .then(|| written[written.len() - size::TAIL as usize]);
            out.push(Reply { used: u, status, written });
        }
        Ok(out)
    }

    /// Fault reports the device wrote since the last call (their buffers given back).
    pub fn faults(&mut self) -> Vec<Fault> {
        let mem = std::sync::Arc::clone(self.driver.memory());
        let events = self.events;
        let Some(q) = self.driver.queue(v::EVENTQ) else { return Vec::new() };
        let mut out = Vec::new();
        while let Some(u) = q.take_used(&mem) {
            let addr = events + u64::from(u.head) * size::FAULT;
            let mut b = [0u8; size::FAULT as usize];
            let _ = mem.read_slice(&mut b, GuestAddress(addr));
            let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            out.push(Fault {
                reason: b[0],
                flags: u32_at(4),
                endpoint: u32_at(8),
                address: u64::from(u32_at(16)) | (u64::from(u32_at(20)) << 32),
                reserved_zero: b[1..4].iter().chain(&b[12..16]).all(|x| *x == 0),
                used: u.len,
            });
            let _ = mem.write_slice(&[0u8; size::FAULT as usize], GuestAddress(addr));
            let _ = q.add(&mem, &[Buf { addr, len: size::FAULT as u32, write: true }]);
        }
        q.publish(&mem);
        out
    }

    /// Waits up to `within` for at least `n` fault reports in all.
    pub fn wait_faults(&mut self, n: usize, within: Duration) -> Vec<Fault> {
        let deadline = Instant::now() + within;
        let mut all = Vec::new();
        loop {
            all.extend(self.faults());
            if all.len() >= n || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
