//! `interrupts`: the VMM's test source injects MSIs through an irqfd; the guest counts
//! them in its IDT handler, acknowledges each one (an ioeventfd write, no exit) and
//! reports the count. Exits 0 only when every injected interrupt arrived.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::abi::{hcall, ports};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::{BootInfo, apic, idt, pio, println};

const VECTOR: u8 = 0x40;
const ABORT_VECTOR: u8 = 0x41;
const COUNT: u64 = 2000;

static COUNTED: AtomicU64 = AtomicU64::new(0);
static ABORTED: AtomicBool = AtomicBool::new(false);

fn on_test_irq(_vector: u8) {
    COUNTED.fetch_add(1, Ordering::Relaxed);
    apic::eoi();
    pio::outb(ports::TEST_IRQ_ACK, 1);
}

fn on_abort(_vector: u8) {
    ABORTED.store(true, Ordering::Relaxed);
    apic::eoi();
}

fn main(_boot: &BootInfo) -> u8 {
    apic::enable_x2apic();
    idt::set_handler(VECTOR, on_test_irq);
    idt::set_handler(ABORT_VECTOR, on_abort);
    let setup = hcall(hcall::TEST_IRQ_SETUP, [u64::from(VECTOR), u64::from(ABORT_VECTOR), 0, 0, 0]);
    if setup.status != hcall::Status::Success {
        println!("interrupts: TEST_IRQ_SETUP failed: {:?}", setup.status);
        return 1;
    }
    let gsi = setup.r[0];
    let fire = hcall(hcall::TEST_IRQ_FIRE, [COUNT, 0, 0, 0, 0]);
    if fire.status != hcall::Status::Success {
        println!("interrupts: TEST_IRQ_FIRE failed: {:?}", fire.status);
        return 1;
    }
    while COUNTED.load(Ordering::Relaxed) < COUNT && !ABORTED.load(Ordering::Relaxed) {
        idt::wait();
    }
    let counted = COUNTED.load(Ordering::Relaxed);
    let report = hcall(hcall::TEST_IRQ_REPORT, [counted, 0, 0, 0, 0]);
    let fired = report.r[0];
    println!(
        "interrupts: guest counted {} of {} injected (asked {}, vector {:#x}, gsi {}, unexpected {})",
        Dec(counted),
        Dec(fired),
        Dec(COUNT),
        VECTOR,
        Dec(gsi),
        Dec(idt::unexpected())
    );
    if counted == fired && fired == COUNT && idt::unexpected() == 0 { 0 } else { 1 }
}

rt::entry!(main);
