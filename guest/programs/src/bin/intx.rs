//! `intx`: a level-triggered line (the VMM's INTx test source on IOAPIC pin 10). The
//! guest's handler reads the device status, deasserts the line and EOIs; the device
//! asserts again only after that. One interrupt per assertion, the line re-armed by
//! each EOI. Arguments: N assertions (default 1000), M forwarding switches (default 0).
//! An interrupt that finds the line already deasserted is counted as spurious.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::abi::{hcall, ports};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::{BootInfo, apic, idt, ioapic, pio, println};

const PIN: u8 = 10;
const VECTOR: u8 = 0x50;
const ABORT_VECTOR: u8 = 0x51;

static COUNTED: AtomicU64 = AtomicU64::new(0);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static ABORTED: AtomicBool = AtomicBool::new(false);

fn on_irq(_v: u8) {
    if pio::inb(ports::TEST_INTX_STATUS) == 1 {
        COUNTED.fetch_add(1, Ordering::Relaxed);
        pio::outb(ports::TEST_INTX_STATUS, 0); // deassert at the device
    } else {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
    }
    apic::eoi(); // level: the EOI reaches the IOAPIC, KVM resamples
}

fn on_abort(_v: u8) {
    ABORTED.store(true, Ordering::Relaxed);
    apic::eoi();
}

fn main(boot: &BootInfo) -> u8 {
    let n = boot.arg(0, 1000);
    let m = boot.arg(1, 0);
    apic::enable_x2apic();
    idt::set_handler(VECTOR, on_irq);
    idt::set_handler(ABORT_VECTOR, on_abort);
    ioapic::route(PIN, VECTOR, true, apic::id() as u8);
    let setup = hcall(hcall::TEST_INTX_SETUP, [u64::from(PIN), u64::from(ABORT_VECTOR), 0, 0, 0]);
    let fire = hcall(hcall::TEST_INTX_FIRE, [n, m, 0, 0, 0]);
    if setup.status != hcall::Status::Success || fire.status != hcall::Status::Success {
        println!("intx: set-up failed: {:?} {:?}", setup.status, fire.status);
        return 1;
    }
    while COUNTED.load(Ordering::Relaxed) < n && !ABORTED.load(Ordering::Relaxed) {
        idt::wait();
    }
    let counted = COUNTED.load(Ordering::Relaxed);
    let r = hcall(hcall::TEST_INTX_REPORT, [counted, 0, 0, 0, 0]);
    let spurious = SPURIOUS.load(Ordering::Relaxed);
    println!(
        "intx: guest counted {} of {} assertions (asked {}, spurious {}, device saw {} resamples)",
        Dec(counted),
        Dec(r.r[0]),
        Dec(n),
        Dec(spurious),
        Dec(r.r[2])
    );
    // Every assertion seen exactly once. An interrupt that finds the line already
    // deasserted (a device re-check racing an EOI, as with VFIO INTx) is reported,
    // handled like Linux's IRQ_NONE, and not counted as an assertion.
    let _ = m;
    if counted == r.r[0] && counted == n { 0 } else { 1 }
}

rt::entry!(main);
