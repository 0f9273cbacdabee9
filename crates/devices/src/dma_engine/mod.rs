//! The DMA engine device (register layout in [`abi::dma_engine`]): a ring of COPY,
//! FILL and CRC32C descriptors executed by a worker thread, each completed by a
//! completion record written by DMA and, when asked, an MSI-X vector. Every byte it
//! touches goes through its [`DeviceMemory`] (the device's DMA endpoint); an access
//! that faults completes the descriptor with `DMA_FAULT` and is counted in
//! `FAULTS`/`LAST_FAULT`.
//!
//! The model is a vfio-user device ([`vfio`]): the VMM drives it through the same
//! generic PCI path whether it runs in the VMM (`process=inline`) or in a device
//! process.

pub mod memory;
pub mod scratch;
pub mod vfio;

pub use memory::{DeviceMemory, InProcess, MemFault, Remote};
pub use scratch::Scratch;

use abi::dma_engine::{self as de, Completion, Descriptor, completion, op, regs, status};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// Register state.
#[derive(Clone, Copy, Debug, Default)]
struct Regs {
    ring_base: u64,
    ring_size: u32,
    head: u32,
    tail: u32,
    status: u32,
    irq_ctrl: u32,
    errors: u32,
    faults: u32,
    last_fault: u64,
    bytes: u64,
}

/// The 32-bit register at `offset` (64-bit registers as two halves).
fn register(r: &Regs, offset: u64) -> u32 {
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    match offset {
        regs::ID => de::ID_VALUE,
        regs::RING_BASE => lo(r.ring_base),
        regs::RING_BASE_HI => hi(r.ring_base),
        regs::RING_SIZE => r.ring_size,
        regs::HEAD => r.head,
        regs::TAIL => r.tail,
        regs::STATUS => r.status,
        regs::IRQ_CTRL => r.irq_ctrl,
        regs::CONTROL => r.status & status::ENABLED,
        regs::ERRORS => r.errors,
        regs::FAULTS => r.faults,
        regs::LAST_FAULT => lo(r.last_fault),
        o if o == regs::LAST_FAULT + 4 => hi(r.last_fault),
        regs::BYTES => lo(r.bytes),
        o if o == regs::BYTES + 4 => hi(r.bytes),
        _ => 0,
    }
}

impl Regs {
    /// One more DMA fault, at `f`.
    fn count_fault(&mut self, f: MemFault) {
        self.faults = self.faults.wrapping_add(1);
        self.last_fault = f.iova;
    }
}

struct State {
    regs: Regs,
    /// Bumped by reset: a worker mid-descriptor notices and drops its work.
    epoch: u64,
    /// Stopped for migration: the worker takes no new descriptor.
    stopped: bool,
    /// The worker is between taking a descriptor and finishing it (completion written,
    /// interrupt raised).
    busy: bool,
}

/// Bytes of the engine's saved state ([`DmaEngine::save`]).
pub const STATE_BYTES: usize = 4 + 4 + 8 + 4 * 4 + 4 * 4 + 8 + 8;
/// First bytes of a saved state: "PTDE" and the layout version.
const STATE_MAGIC: u32 = u32::from_le_bytes(*b"PTDE");
const STATE_VERSION: u32 = 1;

struct Shared {
    state: Mutex<State>,
    doorbell: Condvar,
    /// Signalled when the worker finishes a descriptor (for `stop`).
    idle: Condvar,
    /// The eventfd of each MSI-X vector, when the VMM gave one.
    irqs: Mutex<[Option<EventFd>; de::MSIX_VECTORS as usize]>,
    scratch: Scratch,
    stop: AtomicBool,
}

/// A DMA engine: registers, scratch memory and its worker.
pub struct DmaEngine {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine").finish_non_exhaustive()
    }
}

impl DmaEngine {
    /// An engine reaching guest memory through `memory`; its worker starts now.
    pub fn new(memory: Box<dyn DeviceMemory>) -> std::io::Result<DmaEngine> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { regs: Regs::default(), epoch: 0, stopped: false, busy: false }),
            doorbell: Condvar::new(),
            idle: Condvar::new(),
            irqs: Mutex::new(Default::default()),
            scratch: Scratch::new(de::SCRATCH_SIZE as usize)?,
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let worker = std::thread::Builder::new().name("dma-engine".into()).spawn(move || run(&s, memory))?;
        Ok(DmaEngine { shared, worker: Some(worker) })
    }

    /// Sets (or clears) the eventfd the engine writes to raise MSI-X vector `vector`.
    pub fn set_irq(&self, vector: u16, irq: Option<EventFd>) {
        if let Some(slot) = self.shared.irqs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(usize::from(vector)) {
            *slot = irq;
        }
    }

    /// The scratch memory (BAR 1).
    pub fn scratch(&self) -> &Scratch {
        &self.shared.scratch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read of BAR 0 (registers), any width: each byte comes from the 32-bit
    /// register that holds it. Unknown offsets read as zero.
    pub fn read_reg(&self, offset: u64, data: &mut [u8]) {
        let r = self.lock().regs;
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *d = register(&r, at & !3).to_le_bytes()[(at & 3) as usize];
        }
    }

    /// A write of BAR 0 (registers). Writes to read-only or unknown offsets are ignored.
    pub fn write_reg(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let mut st = self.lock();
        let r = &mut st.regs;
        match offset {
            regs::RING_BASE => r.ring_base = if n >= 8 { v } else { (r.ring_base & !0xffff_ffff) | (v & 0xffff_ffff) },
            regs::RING_BASE_HI => r.ring_base = (r.ring_base & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
            regs::RING_SIZE => r.ring_size = v as u32,
            regs::TAIL => {
                r.tail = v as u32;
                self.shared.doorbell.notify_all();
            }
            regs::IRQ_CTRL => r.irq_ctrl = v as u32 & (de::irq_ctrl::COMPLETION | de::irq_ctrl::ERROR),
            regs::CONTROL => {
                if v as u32 & de::control::RESET != 0 {
                    st.regs = Regs::default();
                    st.epoch += 1;
                    self.shared.scratch.clear(de::SCRATCH_USABLE as usize);
                } else if v as u32 & de::control::ENABLE != 0 {
                    st.regs.status = (st.regs.status | status::ENABLED) & !status::RING_FAULT;
                    self.shared.doorbell.notify_all();
                } else {
                    st.regs.status &= !status::ENABLED;
                }
            }
            _ => {}
        }
    }

    /// Stops the engine for migration: waits (at most `deadline`) for the descriptor in
    /// flight to finish, completion and interrupt included; no new one starts until
    /// [`DmaEngine::start`]. On timeout the engine runs on and the error says so.
    pub fn stop(&self, deadline: std::time::Duration) -> Result<(), String> {
        let until = std::time::Instant::now() + deadline;
        let mut st = self.lock();
        st.stopped = true;
        while st.busy {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                st.stopped = false;
                return Err(format!("a descriptor did not finish within {deadline:?}"));
            }
            st = self.shared.idle.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    /// Lets a stopped engine run again.
    pub fn start(&self) {
        let mut st = self.lock();
        st.stopped = false;
        self.shared.doorbell.notify_all();
    }

    /// The register state, for migration (little-endian, versioned; pending
    /// descriptors stay in the guest's ring, which HEAD and TAIL point into).
    pub fn save(&self) -> Vec<u8> {
        let r = self.lock().regs;
        let mut b = Vec::with_capacity(STATE_BYTES);
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&r.ring_base.to_le_bytes());
        for v in [r.ring_size, r.head, r.tail, r.status, r.irq_ctrl, r.errors, r.faults, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&r.last_fault.to_le_bytes());
        b.extend_from_slice(&r.bytes.to_le_bytes());
        b
    }

    /// Loads a state made by [`DmaEngine::save`]; a malformed one changes nothing.
    pub fn load(&self, b: &[u8]) -> Result<(), String> {
        if b.len() != STATE_BYTES {
            return Err(format!("engine state of {} bytes, {STATE_BYTES} expected", b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        if u32_at(0) != STATE_MAGIC || u32_at(4) != STATE_VERSION {
            return Err("not a DMA engine state of this version".into());
        }
        let r = Regs {
            ring_base: u64_at(8),
            ring_size: u32_at(16),
            head: u32_at(20),
            tail: u32_at(24),
            status: u32_at(28),
            irq_ctrl: u32_at(32),
            errors: u32_at(36),
            faults: u32_at(40),
            last_fault: u64_at(48),
            bytes: u64_at(56),
        };
        let mut st = self.lock();
        st.regs = r;
        st.epoch += 1;
        self.shared.doorbell.notify_all();
        Ok(())
    }

    /// A read of BAR 1 (scratch memory). Out of range reads as zero.
    pub fn read_scratch(&self, offset: u64, data: &mut [u8]) {
        self.shared.scratch.read(offset, data);
    }

    /// A write of BAR 1. Out of range is dropped.
    pub fn write_scratch(&self, offset: u64, data: &[u8]) {
        self.shared.scratch.write(offset, data);
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.doorbell.notify_all();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The worker: executes descriptors from HEAD to TAIL while enabled.
fn run(shared: &Shared, mut memory: Box<dyn DeviceMemory>) {
    loop {
        let (regs, epoch) = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            // Whatever the last descriptor did (completed, faulted, dropped) is over.
            st.busy = false;
            // Only a stop waits for idle (it sets `stopped` first, under this lock): no
            // wake-up per descriptor otherwise.
            if st.stopped {
                shared.idle.notify_all();
            }
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let r = st.regs;
                let ready = !st.stopped
                    && r.status & status::ENABLED != 0
                    && r.status & status::RING_FAULT == 0
                    && r.head != r.tail
                    && r.ring_size.is_power_of_two()
                    && r.ring_size <= 4096;
                if ready {
                    break;
                }
                st = shared.doorbell.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.busy = true;
            (st.regs, st.epoch)
        };
        let slot = u64::from(regs.head % regs.ring_size);
        let at = regs.ring_base.wrapping_add(slot * de::DESCRIPTOR_SIZE);
        let mut raw = [0u8; 64];
        if let Err(f) = memory.read(at, &mut raw) {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.epoch == epoch {
                st.regs.status |= status::RING_FAULT;
                st.regs.count_fault(f);
            }
            continue;
        }
        let d = Descriptor::from_bytes(&raw);
        let (mut c, fault) = execute(memory.as_mut(), &d);
        c.sequence = u64::from(regs.head);
        // The counters move before the completion is written: a driver that sees the
        // completion and then reads FAULTS or ERRORS finds this descriptor counted.
        {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.epoch != epoch {
                continue; // reset meanwhile: forget this descriptor
            }
            let r = &mut st.regs;
            if let Some(f) = fault {
                r.count_fault(f);
            }
            if c.status != completion::SUCCESS {
                r.errors = r.errors.wrapping_add(1);
            }
            r.bytes = r.bytes.wrapping_add(c.bytes);
        }
        let completion_fault = memory.write(d.completion, &c.to_bytes()).err();
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.epoch != epoch {
            continue;
        }
        let r = &mut st.regs;
        if let Some(f) = completion_fault {
            r.count_fault(f);
        }
        r.head = r.head.wrapping_add(1);
        let done = d.flags & de::FLAG_INTERRUPT != 0 && r.irq_ctrl & de::irq_ctrl::COMPLETION != 0;
        let failed = c.status != completion::SUCCESS && r.irq_ctrl & de::irq_ctrl::ERROR != 0;
        drop(st);
        let irqs = shared.irqs.lock().unwrap_or_else(|e| e.into_inner());
        for (raise, v) in [(done, de::vector::COMPLETION), (failed, de::vector::ERROR)] {
            if raise && let Some(irq) = irqs[usize::from(v)].as_ref() {
                let _ = irq.write(1);
            }
        }
    }
}

/// Runs one descriptor; returns its completion record and the fault, if any.
fn execute(memory: &mut dyn DeviceMemory, d: &Descriptor) -> (Completion, Option<MemFault>) {
    let mut c = Completion::default();
    if d.flags & !de::FLAG_INTERRUPT != 0 || d.len > de::MAX_LEN {
        c.status = completion::INVALID;
        return (c, None);
    }
    let result = match d.op {
        op::COPY => memory.copy(d.src, d.dst, d.len).map(|()| 0),
        op::FILL => fill(memory, d.dst, d.len, d.pattern).map(|()| 0),
        op::CRC32C => crc(memory, d.src, d.len),
        _ => {
            c.status = completion::INVALID;
            return (c, None);
        }
    };
    match result {
        Ok(r) => {
            c.status = completion::SUCCESS;
            c.bytes = d.len;
            c.result = r;
            (c, None)
        }
        Err(f) => {
            c.status = completion::DMA_FAULT;
            (c, Some(f))
        }
    }
}

fn fill(memory: &mut dyn DeviceMemory, dst: u64, len: u64, pattern: u64) -> Result<(), MemFault> {
    let chunk: Vec<u8> = pattern.to_le_bytes().iter().copied().cycle().take(memory::CHUNK.min(len) as usize).collect();
    let mut done = 0;
    while done < len {
        let n = memory::CHUNK.min(len - done) as usize;
        memory.write(dst + done, &chunk[..n])?;
        done += n as u64;
    }
    Ok(())
}

fn crc(memory: &mut dyn DeviceMemory, src: u64, len: u64) -> Result<u64, MemFault> {
    let mut buf = vec![0u8; memory::CHUNK.min(len) as usize];
    let (mut done, mut crc) = (0, 0u32);
    while done < len {
        let n = memory::CHUNK.min(len - done) as usize;
        memory.read(src + done, &mut buf[..n])?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    Ok(u64::from(crc))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

    const RAM: u64 = 0x10000;
    const RING: u64 = 0x1000;
    const DONE: u64 = 0x2000;

    /// Device memory of `RAM` bytes at IOVA 0 that pauses each completion write until
    /// the test lets it go.
    struct Gated {
        ram: Vec<u8>,
        at_completion: SyncSender<()>,
        go: Receiver<()>,
    }

    impl DeviceMemory for Gated {
        fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), MemFault> {
            let end = iova.checked_add(buf.len() as u64).filter(|&e| e <= RAM).ok_or(MemFault { iova })?;
            buf.copy_from_slice(&self.ram[iova as usize..end as usize]);
            Ok(())
        }

        fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), MemFault> {
            let end = iova.checked_add(data.len() as u64).filter(|&e| e <= RAM).ok_or(MemFault { iova })?;
            if iova == DONE {
                // Bounded waits: a failing test must not leave the worker stuck.
                let _ = self.at_completion.send(());
                let _ = self.go.recv_timeout(std::time::Duration::from_secs(10));
            }
            self.ram[iova as usize..end as usize].copy_from_slice(data);
            Ok(())
        }
    }

    fn reg32(e: &DmaEngine, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        e.read_reg(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_faulting_descriptor_is_counted_before_its_completion_is_written() {
        let (at_completion, completion_reached) = sync_channel(0);
        let (let_go, go) = sync_channel(0);
        let mut ram = vec![0u8; RAM as usize];
        // A copy whose destination runs past the end of memory: it faults.
        let d = Descriptor {
            op: de::op::COPY,
            src: 0,
            dst: RAM - 0x800,
            len: 0x1000,
            completion: DONE,
            ..Default::default()
        };
        ram[RING as usize..RING as usize + 64].copy_from_slice(&d.to_bytes());
        let e = DmaEngine::new(Box::new(Gated { ram, at_completion, go })).unwrap();
        e.write_reg(regs::RING_BASE, &RING.to_le_bytes());
        e.write_reg(regs::RING_SIZE, &4u32.to_le_bytes());
        e.write_reg(regs::CONTROL, &de::control::ENABLE.to_le_bytes());
        e.write_reg(regs::TAIL, &1u32.to_le_bytes());
        completion_reached.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        // The completion is about to become visible: the fault and the error are
        // already in the registers a driver reads next.
        assert_eq!(reg32(&e, regs::FAULTS), 1);
        assert_eq!(reg32(&e, regs::ERRORS), 1);
        assert_eq!(reg32(&e, regs::LAST_FAULT), (RAM - 0x800) as u32);
        assert_eq!(reg32(&e, regs::HEAD), 0, "the head moves once the completion is written");
        let_go.send(()).unwrap();
        let t = std::time::Instant::now();
        while reg32(&e, regs::HEAD) != 1 {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "the descriptor never completed");
            std::thread::yield_now();
        }
    }
}
