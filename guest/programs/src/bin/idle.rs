//! `idle`: a guest that stays up until the VMM stops it (the control API's
//! `vm.shutdown`), as a server would. Every period (arg 0, milliseconds, default 100;
//! the local APIC timer) it scans the PCI bus and prints each function that appeared
//! or left: how a guest without a hot-plug controller learns of hot-plug. Between ticks
//! it halts, so it costs the host nothing.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use rt::abi::pci::SLOTS;
use rt::fmt::Dec;
use rt::{BootInfo, apic, idt, pci, println};

const TIMER_VECTOR: u8 = 0x40;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_TIMER_INITIAL: u32 = 0x838;
const X2APIC_TIMER_DIVIDE: u32 = 0x83e;
const LVT_PERIODIC: u64 = 1 << 17;
/// Divide configuration 0b0011: the APIC bus clock divided by 16.
const DIVIDE_BY_16: u64 = 0b0011;
/// KVM's APIC bus runs at 1 GHz: ticks of the divided clock per millisecond.
const TICKS_PER_MS: u64 = 1_000_000 / 16;

static TICKS: AtomicU64 = AtomicU64::new(0);

fn on_timer(_vector: u8) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    apic::eoi();
}

fn scan(present: &mut [Option<(u16, u16)>; SLOTS as usize], report: bool) {
    for slot in 0..SLOTS {
        let now = pci::Function::at(slot).map(|f| (f.vendor, f.device));
        let before = present[usize::from(slot)];
        if now != before {
            if let Some((v, d)) = now {
                println!("idle: 00:{:02x}.0 {:04x}:{:04x} {}", slot, v, d, if report { "appeared" } else { "present" });
            } else if let Some((v, d)) = before {
                println!("idle: 00:{:02x}.0 {:04x}:{:04x} left", slot, v, d);
            }
            present[usize::from(slot)] = now;
        }
    }
}

fn main(boot: &BootInfo) -> u8 {
    let period_ms = if boot.arg_count > 0 && boot.args[0] > 0 { boot.args[0] } else { 100 };
    apic::enable_x2apic();
    idt::set_handler(TIMER_VECTOR, on_timer);
    apic::wrmsr(X2APIC_TIMER_DIVIDE, DIVIDE_BY_16);
    apic::wrmsr(X2APIC_LVT_TIMER, LVT_PERIODIC | u64::from(TIMER_VECTOR));
    apic::wrmsr(X2APIC_TIMER_INITIAL, (period_ms * TICKS_PER_MS).min(u64::from(u32::MAX)));
    let mut present = [None; SLOTS as usize];
    scan(&mut present, false);
    println!("idle: up, scanning the PCI bus every {} ms", Dec(period_ms));
    let mut seen = 0;
    loop {
        idt::wait();
        let t = TICKS.load(Ordering::Relaxed);
        if t != seen {
            seen = t;
            scan(&mut present, true);
        }
    }
}

rt::entry!(main);
