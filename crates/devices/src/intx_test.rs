//! The INTx test device (`abi::test_device`) as a built-in device model
//! (`--device intx-test`): registers in BAR 2, a level-triggered INTx line (pin A),
//! PCI Express function-level reset. The tests also run the same device on a
//! third-party vfio-user server (the rust-vmm crate), so passthru's PCI path is checked
//! against code it did not write; this one lets a user try the `pci` guest's INTx mode.
//!
//! The line follows vfio's INTx protocol: signalled on its trigger eventfd when
//! asserted (and then masked), signalled again at each unmask (the guest's EOI, through
//! the unmask eventfd) while still asserted.

use abi::pci::{cap, reg, status};
use abi::test_device::{self as td, regs};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};
use vfio_user::proto::{
    self, DeviceInfo, IRQ_INFO_EVENTFD, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD, IrqInfo,
    RegionInfo, SetIrqs,
};

/// Offset of its PCI Express capability.
const EXP_CAP: usize = 0x40;

#[derive(Default)]
struct State {
    scratch: u32,
    asserted: bool,
    /// Signalled and not unmasked since (vfio's automasking).
    masked: bool,
    assertions: u32,
    resets: u32,
    trigger: Option<File>,
    /// Which unmask watcher is the current one (an older one ends).
    unmask_gen: u64,
}

impl State {
    fn raise(&mut self) {
        if self.masked {
            return;
        }
        if let Some(t) = &mut self.trigger {
            self.masked = true;
            let _ = t.write_all(&1u64.to_le_bytes());
        }
    }

    fn unmask(&mut self) {
        self.masked = false;
        if self.asserted {
            self.raise();
        }
    }
}

/// The INTx test device.
#[derive(Default)]
pub struct IntxTest {
    state: Arc<Mutex<State>>,
}

impl IntxTest {
    /// A device after reset.
    pub fn new() -> IntxTest {
        IntxTest::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn config() -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0..2].copy_from_slice(&td::VENDOR_ID.to_le_bytes());
        c[2..4].copy_from_slice(&td::DEVICE_ID.to_le_bytes());
        c[6..8].copy_from_slice(&status::CAP_LIST.to_le_bytes());
        c[0x0a..0x0c].copy_from_slice(&td::CLASS.to_le_bytes());
        let bar = usize::from(reg::BAR0) + 4 * usize::from(td::REGS_BAR);
        c[bar..bar + 4].copy_from_slice(&0u32.to_le_bytes()); // 32-bit memory
        c[usize::from(reg::CAPABILITIES)] = EXP_CAP as u8;
        c[usize::from(reg::INTERRUPT_PIN)] = 1;
        c[EXP_CAP] = cap::EXP;
        c[EXP_CAP + 2] = 0x02; // version 2, endpoint
        c[EXP_CAP + 4..EXP_CAP + 8].copy_from_slice(&cap::EXP_DEVCAP_FLR.to_le_bytes());
        c
    }
}

/// Watches the unmask eventfd (the guest's EOI) and re-raises a line still asserted;
/// ends with the device, or when another unmask eventfd replaces this one (`generation`).
fn watch_unmask(state: Weak<Mutex<State>>, mut unmask: File, generation: u64) {
    let spawned = std::thread::Builder::new().name("intx-unmask".into()).spawn(move || {
        let mut b = [0u8; 8];
        loop {
            let mut p = libc::pollfd { fd: unmask.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one pollfd that lives across the call.
            let ready = unsafe { libc::poll(&mut p, 1, 100) } > 0;
            let Some(st) = state.upgrade() else { return };
            let mut st = st.lock().unwrap_or_else(|e| e.into_inner());
            if st.unmask_gen != generation {
                return;
            }
            if ready && unmask.read_exact(&mut b).is_ok() {
                st.unmask();
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("intx-test: cannot watch the unmask eventfd: {e}");
    }
}

impl vfio_user::server::Device for IntxTest {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: proto::PCI_NUM_REGIONS,
            num_irqs: 5,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            i if i == u32::from(td::REGS_BAR) => td::REGS_SIZE,
            proto::PCI_CONFIG => 256,
            i if i < proto::PCI_NUM_REGIONS => 0,
            _ => return None,
        };
        Some(RegionInfo { flags: if size > 0 { 3 } else { 0 }, index, cap_offset: 0, size, offset: 0 })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = u32::from(index == proto::PCI_INTX);
        (index < 5).then_some(IrqInfo { flags: IRQ_INFO_EVENTFD, index, count })
    }

    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let word = |v: u32| v.to_le_bytes();
        match region {
            proto::PCI_CONFIG => {
                let c = Self::config();
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = usize::try_from(offset).ok().and_then(|o| c.get(o + i)).copied().unwrap_or(0);
                }
            }
            r if r == u32::from(td::REGS_BAR) => {
                let st = self.lock();
                let v = match offset & !3 {
                    regs::ID => td::ID_VALUE,
                    regs::SCRATCH => st.scratch,
                    regs::IRQ_STATUS => u32::from(st.asserted),
                    regs::RESETS => st.resets,
                    regs::ASSERTIONS => st.assertions,
                    _ => 0,
                };
                let w = word(v);
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = w.get((offset & 3) as usize + i).copied().unwrap_or(0);
                }
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        if region == proto::PCI_CONFIG {
            return Ok(()); // what the VMM passes through is read-only here
        }
        if region != u32::from(td::REGS_BAR) {
            return Err(libc::EINVAL);
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let mut st = self.lock();
        match offset {
            regs::SCRATCH => st.scratch = v,
            regs::DOORBELL => {
                st.asserted = true;
                st.assertions = st.assertions.wrapping_add(1);
                st.raise();
            }
            regs::IRQ_STATUS if v == 0 => st.asserted = false,
            _ => {}
        }
        Ok(())
    }

    fn set_irqs(&mut self, irqs: &SetIrqs, fds: Vec<File>) -> Result<(), i32> {
        if irqs.index != proto::PCI_INTX {
            return Err(libc::EINVAL);
        }
        let mut fds = fds.into_iter();
        let eventfd = irqs.flags & IRQ_SET_DATA_EVENTFD != 0;
        if irqs.flags & IRQ_SET_ACTION_TRIGGER != 0 {
            self.lock().trigger = if irqs.count > 0 && eventfd { fds.next() } else { None };
        } else if irqs.flags & IRQ_SET_ACTION_UNMASK != 0
            && eventfd
            && let Some(unmask) = fds.next()
        {
            let generation = {
                let mut st = self.lock();
                st.unmask_gen = st.unmask_gen.wrapping_add(1);
                st.unmask_gen
            };
            watch_unmask(Arc::downgrade(&self.state), unmask, generation);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), i32> {
        let mut st = self.lock();
        st.scratch = 0;
        st.asserted = false;
        st.masked = false;
        st.assertions = 0;
        st.resets = st.resets.wrapping_add(1);
        Ok(())
    }
}
