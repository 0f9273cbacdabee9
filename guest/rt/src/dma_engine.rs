//! A driver for the DMA engine, a PCI function (layout in `abi::dma_engine`): found by
//! vendor and device id, memory decoding and bus mastering enabled, a descriptor ring
//! in guest memory, completion records, the doorbell, MSI-X programming, and
//! detection of a surprise-removed device (its registers read all-ones).

use crate::mmio::{read32, read64, write32, write64};
use crate::pci::Function;
use abi::dma_engine::{self as de, Descriptor, regs};
use abi::pci::command;

/// Why waiting for a completion stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The device's registers read all-ones: it is gone.
    DeviceGone,
    /// No completion in the polling budget.
    Timeout,
}

/// One engine.
pub struct Engine {
    function: Function,
    bar0: u64,
    ring: u64,
    completions: u64,
    completions_iova: u64,
    size: u32,
    tail: u32,
}

impl Engine {
    /// The `n`th DMA engine on the bus (from 0), if there is one.
    pub fn find(n: usize) -> Option<Function> {
        crate::pci::find(de::VENDOR_ID, de::DEVICE_ID, n)
    }

    /// Drives `function` with a ring of `size` descriptors and completion records.
    /// Each is given twice: where the CPU writes it (guest-physical) and where the
    /// device reaches it (its IOVA; equal under an identity domain). Enables memory
    /// decoding and bus mastering, resets the engine, programs the ring and enables it.
    /// None if its register BAR does not decode.
    pub fn new(function: Function, ring: (u64, u64), completions: (u64, u64), size: u32) -> Option<Engine> {
        function.enable(command::MEMORY | command::MASTER);
        let bar0 = function.bar(de::REGS_BAR)?;
        let e = Engine {
            function,
            bar0,
            ring: ring.0,
            completions: completions.0,
            completions_iova: completions.1,
            size,
            tail: 0,
        };
        // SAFETY: the register BAR decodes at `bar0` (read back from the function).
        unsafe {
            write32(bar0 + regs::CONTROL, de::control::RESET);
            // Writes are posted: this read returns once the reset is done (the scratch
            // memory zeroed), so it cannot land on what a peer writes there next.
            let _ = read32(bar0 + regs::STATUS);
            write64(bar0 + regs::RING_BASE, ring.1);
            write32(bar0 + regs::RING_SIZE, size);
            write32(bar0 + regs::CONTROL, de::control::ENABLE);
        }
        Some(e)
    }

    /// The PCI function.
    pub fn function(&self) -> &Function {
        &self.function
    }

    /// Where the register BAR decodes.
    pub fn bar0(&self) -> u64 {
        self.bar0
    }

    /// Reads a 32-bit register.
    pub fn reg(&self, offset: u64) -> u32 {
        // SAFETY: a BAR 0 register.
        unsafe { read32(self.bar0 + offset) }
    }

    /// Reads a 64-bit register.
    pub fn reg64(&self, offset: u64) -> u64 {
        // SAFETY: a BAR 0 register.
        unsafe { read64(self.bar0 + offset) }
    }

    /// True if the device reads as removed.
    pub fn gone(&self) -> bool {
        self.reg(regs::ID) == u32::MAX
    }

    /// Routes the completion vector (MSI-X) to `vector` on APIC `dest` and enables
    /// completion interrupts. False if the function has no usable MSI-X.
    pub fn enable_msix(&self, dest: u8, vector: u8) -> bool {
        if !self.function.msix_vector(de::vector::COMPLETION, dest, vector) {
            return false;
        }
        // SAFETY: a register of the decoding register BAR.
        unsafe { write32(self.bar0 + regs::IRQ_CTRL, de::irq_ctrl::COMPLETION) };
        true
    }

    /// Guest-physical address of the completion record of sequence number `seq`.
    pub fn completion_addr(&self, seq: u32) -> u64 {
        self.completions + u64::from(seq % self.size) * de::COMPLETION_SIZE
    }

    /// The device's address (IOVA) of the same record.
    fn completion_iova(&self, seq: u32) -> u64 {
        self.completions_iova + u64::from(seq % self.size) * de::COMPLETION_SIZE
    }

    /// Puts `d` in the ring (its completion record address is filled in, the record
    /// cleared) without ringing the doorbell; returns its sequence number.
    pub fn push(&mut self, mut d: Descriptor) -> u32 {
        let seq = self.tail;
        d.completion = self.completion_iova(seq);
        let record = self.completion_addr(seq);
        let slot = self.ring + u64::from(seq % self.size) * de::DESCRIPTOR_SIZE;
        let bytes = d.to_bytes();
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            // SAFETY: the ring lies in guest RAM owned by this program.
            unsafe { write64(slot + 8 * i as u64, u64::from_le_bytes(w)) };
        }
        for i in 0..4 {
            // SAFETY: the completion record lies in guest RAM owned by this program.
            unsafe { write64(record + 8 * i, 0) };
        }
        self.tail = self.tail.wrapping_add(1);
        seq
    }

    /// Rings the doorbell: the device executes everything pushed so far.
    pub fn ring(&self) {
        // SAFETY: the doorbell register.
        unsafe { write32(self.bar0 + regs::TAIL, self.tail) };
    }

    /// Waits for descriptor `seq` to complete; returns (status, bytes, result).
    pub fn wait(&self, seq: u32) -> Result<(u32, u64, u64), WaitError> {
        let rec = self.completion_addr(seq);
        let mut polls: u64 = 0;
        loop {
            // SAFETY: the record lies in guest RAM; the device writes it by DMA.
            let status = unsafe { read32(rec) };
            if status != de::completion::PENDING {
                // SAFETY: as above.
                let (bytes, result) = unsafe { (read64(rec + 8), read64(rec + 16)) };
                return Ok((status, bytes, result));
            }
            polls += 1;
            if polls % 64 == 0 && self.gone() {
                return Err(WaitError::DeviceGone);
            }
            if polls > 50_000_000 {
                return Err(WaitError::Timeout);
            }
            core::hint::spin_loop();
        }
    }
}
