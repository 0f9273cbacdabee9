//! `irqstorm`: N MSIs from the VMM's test source while the VMM switches the source
//! between forwarded and VMM delivery M times. Each interrupt is acknowledged before
//! the next is fired, so the guest's count must equal N exactly.
//! Arguments: N (default 100000), M (default 10000).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use rt::abi::{hcall, ports};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::{BootInfo, apic, idt, pio, println};

const VECTOR: u8 = 0x40;
const ABORT_VECTOR: u8 = 0x41;

static COUNTED: AtomicU64 = AtomicU64::new(0);
static ABORTED: AtomicBool = AtomicBool::new(false);

fn on_irq(_v: u8) {
    COUNTED.fetch_add(1, Ordering::Relaxed);
    apic::eoi();
    pio::outb(ports::TEST_IRQ_ACK, 1);
}

fn on_abort(_v: u8) {
    ABORTED.store(true, Ordering::Relaxed);
    apic::eoi();
}

fn main(boot: &BootInfo) -> u8 {
    let n = boot.arg(0, 100_000);
    let m = boot.arg(1, 10_000);
    apic::enable_x2apic();
    idt::set_handler(VECTOR, on_irq);
    idt::set_handler(ABORT_VECTOR, on_abort);
    let setup = hcall(hcall::TEST_IRQ_SETUP, [u64::from(VECTOR), u64::from(ABORT_VECTOR), 0, 0, 0]);
    let fire = hcall(hcall::TEST_IRQ_FIRE, [n, m, 0, 0, 0]);
    if setup.status != hcall::Status::Success || fire.status != hcall::Status::Success {
        println!("irqstorm: set-up failed: {:?} {:?}", setup.status, fire.status);
        return 1;
    }
    while COUNTED.load(Ordering::Relaxed) < n && !ABORTED.load(Ordering::Relaxed) {
        idt::wait();
    }
    let counted = COUNTED.load(Ordering::Relaxed);
    let fired = hcall(hcall::TEST_IRQ_REPORT, [counted, 0, 0, 0, 0]).r[0];
    println!(
        "irqstorm: guest counted {} of {} fired (asked {}, {} forwarding switches asked)",
        Dec(counted),
        Dec(fired),
        Dec(n),
        Dec(m)
    );
    if counted == fired && fired == n && idt::unexpected() == 0 { 0 } else { 1 }
}

rt::entry!(main);
