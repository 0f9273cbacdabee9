//! The root complex with a plain emulated function: configuration through ECAM and the
//! legacy ports, empty slots all-ones, BARs placed as firmware would, moved by the
//! guest, following the command register, and host-memory parts in the memory map.
#![allow(clippy::unwrap_used, missing_docs)]

use abi::pci::{self as p, command, reg};
use pci::bar::{BarKind, BarSpec, Bars};
use pci::config::Builder;
use pci::{BarWindow, ConfigSpace, PciFunction, PciRoot};
use std::sync::{Arc, Mutex};
use vm_api::{Bus, MemoryListener, MemoryMap, Region, RegionKind};

/// A function with three BARs: 4 KiB memory (trapped), 64 KiB 64-bit memory whose
/// first 16 KiB are host memory, 256 bytes of I/O; INTA.
struct Fn {
    config: Mutex<(ConfigSpace, Bars)>,
    memory: Region,
    accesses: Mutex<Vec<(u8, u64, bool)>>,
}

impl Fn {
    fn new() -> Arc<Fn> {
        let space = Builder::new(0x1234, 0x5678, 0x0880, 0).set_u8(reg::INTERRUPT_PIN, 1).build();
        let bars = Bars::new(&[
            BarSpec { index: 0, kind: BarKind::Mem32 { prefetch: false }, size: 0x1000 },
            BarSpec { index: 2, kind: BarKind::Mem64 { prefetch: true }, size: 0x1_0000 },
            BarSpec { index: 4, kind: BarKind::Io, size: 0x100 },
        ])
        .unwrap();
        let buf: &'static mut [u8] = Box::leak(vec![0u8; 0x4000].into_boxed_slice());
        // SAFETY: a leaked buffer lives for the whole test process.
        let memory = unsafe { Region::from_raw(0, 0x4000, RegionKind::Ram, buf.as_mut_ptr(), None, None) };
        Arc::new(Fn { config: Mutex::new((space, bars)), memory, accesses: Mutex::new(vec![]) })
    }
}

impl PciFunction for Fn {
    fn name(&self) -> &str {
        "fn"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let c = self.config.lock().unwrap();
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            data.copy_from_slice(&c.1.read(usize::from((offset - reg::BAR0) / 4)).to_le_bytes());
        } else {
            c.0.read(offset, data);
        }
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut c = self.config.lock().unwrap();
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) && data.len() == 4 {
            c.1.write(usize::from((offset - reg::BAR0) / 4), u32::from_le_bytes(data.try_into().unwrap()));
        } else if offset == reg::COMMAND || offset == reg::INTERRUPT_LINE {
            c.0.set(offset, data);
        }
    }
    fn windows(&self) -> Vec<BarWindow> {
        let c = self.config.lock().unwrap();
        c.1.decoded(c.0.u16(reg::COMMAND))
            .into_iter()
            .map(|(s, addr)| BarWindow {
                bar: s.index,
                io: s.kind == BarKind::Io,
                addr,
                size: s.size,
                mapped: if s.index == 2 { vec![(0, self.memory.clone())] } else { vec![] },
            })
            .collect()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.accesses.lock().unwrap().push((bar, offset, false));
        data.fill(bar + 0x10);
    }
    fn bar_write(&self, bar: u8, offset: u64, _data: &[u8]) {
        self.accesses.lock().unwrap().push((bar, offset, true));
    }
}

#[derive(Default)]
struct Regions(Mutex<Vec<String>>);
impl MemoryListener for Regions {
    fn name(&self) -> &str {
        "regions"
    }
    fn region_added(&self, r: &Region) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("+{:#x}+{:#x}", r.gpa, r.size));
        Ok(())
    }
    fn region_removed(&self, r: &Region) {
        self.0.lock().unwrap().push(format!("-{:#x}", r.gpa));
    }
}

struct Machine {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    root: Arc<PciRoot>,
    regions: Arc<Regions>,
}

fn machine() -> Machine {
    let (mmio, pio, memory) = (Arc::new(Bus::new()), Arc::new(Bus::new()), Arc::new(MemoryMap::new()));
    let regions = Arc::new(Regions::default());
    memory.add_listener(regions.clone()).unwrap();
    let root = PciRoot::new(mmio.clone(), pio.clone(), memory).unwrap();
    Machine { mmio, pio, root, regions }
}

fn ecam(m: &Machine, slot: u64, reg: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    assert!(m.mmio.read(p::ECAM_BASE + (slot << 15) + u64::from(reg), &mut b[..len]));
    u32::from_le_bytes(b)
}

fn ecam_write(m: &Machine, slot: u64, reg: u16, v: u32) {
    assert!(m.mmio.write(p::ECAM_BASE + (slot << 15) + u64::from(reg), &v.to_le_bytes()));
}

#[test]
fn the_host_bridge_answers_and_empty_slots_read_all_ones() {
    let m = machine();
    assert_eq!(ecam(&m, 0, 0, 4), u32::from(p::HOST_BRIDGE_DEVICE) << 16 | u32::from(p::HOST_BRIDGE_VENDOR));
    assert_eq!(ecam(&m, 0, reg::CLASS_PROG + 1, 2), 0x0600, "a host bridge");
    assert_eq!(ecam(&m, 5, 0, 4), 0xffff_ffff, "empty slot");
    assert_eq!(ecam(&m, 0, 0x2, 4), 0xffff_ffff, "a misaligned access reads all-ones");
    let mut b = [0u8; 4];
    m.mmio.read(p::ECAM_BASE + (1 << 12), &mut b);
    assert_eq!(b, [0xff; 4], "function 1 does not exist");
    // The legacy ports reach the same space.
    let addr = p::CONFIG_ENABLE; // bus 0, device 0, function 0, register 0
    assert!(m.pio.write(u64::from(p::CONFIG_ADDRESS), &addr.to_le_bytes()));
    let mut d = [0u8; 2];
    m.pio.read(u64::from(p::CONFIG_DATA) + 2, &mut d);
    assert_eq!(u16::from_le_bytes(d), p::HOST_BRIDGE_DEVICE, "byte lanes of 0xcfc..0xcff");
    m.pio.write(u64::from(p::CONFIG_ADDRESS), &(addr & !p::CONFIG_ENABLE).to_le_bytes());
    m.pio.read(u64::from(p::CONFIG_DATA), &mut d);
    assert_eq!(d, [0xff; 2], "enable bit clear: all-ones");
}

#[test]
fn bars_are_placed_aligned_in_their_windows_and_decode_at_plug() {
    let m = machine();
    let f = Fn::new();
    let slot = m.root.plug(f.clone()).unwrap();
    assert_eq!(slot, 1);
    let w = m.root.windows(slot);
    assert_eq!(w.len(), 3, "{w:?}");
    for win in &w {
        assert_eq!(win.addr % win.size, 0, "naturally aligned: {win:?}");
        if win.io {
            assert!(win.addr >= p::IO_BASE && win.addr + win.size <= p::IO_BASE + p::IO_SIZE);
        } else {
            assert!(
                win.addr >= p::MMIO32_BASE && win.addr + win.size <= p::MMIO32_BASE + p::MMIO32_SIZE,
                "fits below 4 GiB"
            );
        }
    }
    assert_eq!(ecam(&m, 1, reg::INTERRUPT_LINE, 1), p::intx_gsi(1, 1), "firmware wrote the INTx line");
    assert_eq!(ecam(&m, 1, reg::COMMAND, 2) & u32::from(command::MEMORY | command::IO), 3);
    // Trapped accesses reach the function; the host-memory part is in the memory map.
    let bar0 = w.iter().find(|x| x.bar == 0).unwrap().addr;
    let mut b = [0u8; 4];
    assert!(m.mmio.read(bar0 + 8, &mut b));
    assert_eq!(b, [0x10; 4]);
    let bar2 = w.iter().find(|x| x.bar == 2).unwrap().addr;
    assert_eq!(*m.regions.0.lock().unwrap(), vec![format!("+{bar2:#x}+0x4000")]);
    assert_eq!(f.accesses.lock().unwrap().as_slice(), &[(0, 8, false)]);
}

#[test]
fn a_bar_the_guest_moves_moves_and_decoding_follows_the_command_register() {
    let m = machine();
    let f = Fn::new();
    let slot = u64::from(m.root.plug(f.clone()).unwrap());
    let old = m.root.windows(1).iter().find(|x| x.bar == 2).unwrap().addr;
    // The guest sizes BAR 2 with decoding off, as Linux does, then moves it.
    let cmd = ecam(&m, slot, reg::COMMAND, 2);
    ecam_write(&m, slot, reg::COMMAND, cmd & !u32::from(command::MEMORY));
    assert!(m.root.windows(1).iter().all(|x| x.io), "memory decoding off: only the I/O BAR is left");
    let mut b = [0u8; 4];
    assert!(!m.mmio.read(old, &mut b), "nothing at the old address");
    ecam_write(&m, slot, reg::BAR0 + 8, 0xffff_ffff);
    ecam_write(&m, slot, reg::BAR0 + 12, 0xffff_ffff);
    assert_eq!(ecam(&m, slot, reg::BAR0 + 8, 4), 0xffff_000c, "64 KiB, 64-bit, prefetchable");
    ecam_write(&m, slot, reg::BAR0 + 8, 0xd000_0000);
    ecam_write(&m, slot, reg::BAR0 + 12, 0);
    ecam_write(&m, slot, reg::COMMAND, cmd);
    let new = m.root.windows(1).iter().find(|x| x.bar == 2).unwrap().addr;
    assert_eq!(new, 0xd000_0000);
    assert!(m.mmio.read(0xd000_0000 + 0x8000, &mut b), "the new address reaches the function");
    assert!(!m.mmio.read(old + 0x8000, &mut b), "the old one does not");
    let log = m.regions.0.lock().unwrap().clone();
    assert_eq!(log, vec![format!("+{old:#x}+0x4000"), format!("-{old:#x}"), "+0xd0000000+0x4000".to_string()]);
    // Unplugged: nothing left.
    assert!(m.root.unplug(1).is_some());
    assert!(!m.mmio.read(0xd000_0000, &mut b));
    assert_eq!(ecam(&m, slot, 0, 4), 0xffff_ffff);
    assert_eq!(m.regions.0.lock().unwrap().last().unwrap(), "-0xd0000000");
    // The freed addresses are placed again for the next function.
    assert_eq!(m.root.plug(Fn::new()).unwrap(), 1);
}
