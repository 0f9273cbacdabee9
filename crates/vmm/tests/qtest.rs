//! The qtest driver port, driven in-process over a socket pair: every command, the
//! error answers, hypercall dispatch and asynchronous `IRQ raise` lines.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::qtest::{End, SharedOut, serve};
use vmm::{AccelKind, Vm, VmConfig};

struct Driver {
    w: UnixStream,
    r: BufReader<UnixStream>,
    irqs: Vec<String>,
}

impl Driver {
    fn line(&mut self) -> String {
        let mut s = String::new();
        assert!(self.r.read_line(&mut s).unwrap() > 0, "session closed");
        s.trim_end().to_string()
    }

    /// Sends a command and returns its answer; IRQ lines seen meanwhile are kept.
    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.w, "{c}").unwrap();
        loop {
            let l = self.line();
            if l.starts_with("IRQ ") {
                self.irqs.push(l);
            } else {
                return l;
            }
        }
    }

    fn next_irq(&mut self) -> String {
        if !self.irqs.is_empty() {
            return self.irqs.remove(0);
        }
        let l = self.line();
        assert!(l.starts_with("IRQ "), "expected an IRQ line, got {l:?}");
        l
    }
}

fn qtest_vm() -> Vm {
    qtest_vm_with(|_| {})
}

fn qtest_vm_with(f: impl FnOnce(&mut VmConfig)) -> Vm {
    let mut c = VmConfig::new(AccelKind::Qtest);
    f(&mut c);
    c.memory = 64 << 20;
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    Vm::new(c).unwrap()
}

/// Runs `f` against a live session on `vm`; returns how the session ended.
fn with_session(vm: &Vm, f: impl FnOnce(&mut Driver)) -> End {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let out: SharedOut = Arc::new(Mutex::new(Box::new(theirs.try_clone().unwrap())));
            serve(vm, BufReader::new(theirs), out).unwrap()
        });
        let mut d = Driver { w: ours.try_clone().unwrap(), r: BufReader::new(ours.try_clone().unwrap()), irqs: vec![] };
        // A failed assertion in `f` must end the session too, or the scope waits forever.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut d)));
        ours.shutdown(std::net::Shutdown::Write).unwrap();
        let end = server.join().unwrap();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
        end
    })
}

#[test]
fn memory_commands_write_and_read_guest_ram() {
    let vm = qtest_vm();
    let end = with_session(&vm, |d| {
        assert_eq!(d.cmd("writeb 0x2000 0xab"), "OK");
        assert_eq!(d.cmd("readb 0x2000"), "OK 0x00000000000000ab");
        assert_eq!(d.cmd("writew 0x2002 0x1234"), "OK");
        assert_eq!(d.cmd("readw 0x2002"), "OK 0x0000000000001234");
        assert_eq!(d.cmd("writel 0x2004 0xdeadbeef"), "OK");
        assert_eq!(d.cmd("readl 0x2004"), "OK 0x00000000deadbeef");
        assert_eq!(d.cmd("writeq 0x2008 0x0123456789abcdef"), "OK");
        assert_eq!(d.cmd("readq 0x2008"), "OK 0x0123456789abcdef");
        assert_eq!(d.cmd("read 0x2000 4"), "OK 0xab003412");
        assert_eq!(d.cmd("write 0x3000 3 0x010203"), "OK");
        assert_eq!(d.cmd("read 0x3000 4"), "OK 0x01020300");
        assert_eq!(d.cmd("write 0x3000 4 0xff"), "OK", "short data is zero-padded");
        assert_eq!(d.cmd("read 0x3000 4"), "OK 0xff000000");
        assert_eq!(d.cmd("memset 0x4000 8 0x5a"), "OK");
        assert_eq!(d.cmd("read 0x3fff 10"), "OK 0x005a5a5a5a5a5a5a5a00");
        assert_eq!(d.cmd("endianness"), "OK little");
    });
    assert_eq!(end, End::Eof);
    // The session wrote the VMM's own view of guest RAM.
    use vm_memory::Bytes;
    assert_eq!(vm.memory().read_obj::<u64>(vm_memory::GuestAddress(0x2008)).unwrap(), 0x0123456789abcdef);
}

#[test]
fn malformed_commands_get_fail_answers_and_the_session_goes_on() {
    let vm = qtest_vm();
    with_session(&vm, |d| {
        assert_eq!(d.cmd("frobnicate 1 2"), "FAIL Unknown command 'frobnicate'");
        assert_eq!(d.cmd("readb"), "FAIL readb needs argument 1");
        assert_eq!(d.cmd("readb 0xzz"), "FAIL invalid number '0xzz'");
        assert_eq!(d.cmd("writeb 0x1000 0x100"), "FAIL value 0x100 does not fit in 1 byte(s)");
        assert_eq!(d.cmd("outb 0x10000 1"), "FAIL port '0x10000' is above 0xffff");
        assert_eq!(d.cmd("outl 0xf6 0"), "FAIL the hypercall port needs registers: use `hcall NR A0 A1 A2 A3 A4`");
        assert!(d.cmd("read 0x1000 0").starts_with("FAIL size 0 is outside"));
        assert!(d.cmd("read 0x1000 0x2000000").starts_with("FAIL size"), "bulk size capped");
        assert!(d.cmd("write 0x1000 2 0x010203").starts_with("FAIL 3 bytes of data"));
        assert_eq!(d.cmd("write 0x1000 2 0102"), "FAIL data '0102' must start with 0x");
        assert!(d.cmd("read 0xe0200000 4").starts_with("FAIL nothing at 0xe0200000"));
        assert!(d.cmd("memset 0xffffffffffff 4 1").starts_with("FAIL nothing at"));
        assert_eq!(d.cmd("hcall 0 1 2 3 4 5 6"), "FAIL hcall takes a number and at most 5 arguments");
        // Still alive and correct after all of that.
        assert_eq!(d.cmd("writeb 0x1000 7"), "OK");
        assert_eq!(d.cmd("readb 0x1000"), "OK 0x0000000000000007");
    });
}

#[test]
fn port_and_mmio_commands_reach_devices_and_unassigned_reads_are_all_ones() {
    let vm = qtest_vm();
    with_session(&vm, |d| {
        // COM1 line status register: transmitter empty.
        let lsr = d.cmd("inb 0x3fd");
        let v = u64::from_str_radix(lsr.trim_start_matches("OK 0x"), 16).unwrap();
        assert_ne!(v & 0x20, 0, "{lsr}");
        assert_eq!(d.cmd("inb 0x80"), "OK 0xff", "nobody decodes port 0x80");
        assert_eq!(d.cmd("inw 0x80"), "OK 0xffff");
        assert_eq!(d.cmd("inl 0x80"), "OK 0xffffffff");
        assert_eq!(d.cmd("readl 0xe0100000"), "OK 0x0000000000000000", "the null MMIO device");
        assert_eq!(d.cmd("readl 0xe0200000"), "OK 0x00000000ffffffff", "unassigned MMIO");
        assert_eq!(d.cmd("outw 0x80 0xffff"), "OK");
    });
}

#[test]
fn pci_configuration_space_answers_through_ecam_and_the_legacy_ports() {
    let vm = qtest_vm();
    with_session(&vm, |d| {
        // The host bridge at 00:00.0 through ECAM, then through 0xcf8/0xcfc.
        assert_eq!(d.cmd("readl 0xe0000000"), "OK 0x0000000000081b36");
        assert_eq!(d.cmd("readw 0xe000000a"), "OK 0x0000000000000600", "class: host bridge");
        assert_eq!(d.cmd("outl 0xcf8 0x80000000"), "OK");
        assert_eq!(d.cmd("inl 0xcfc"), "OK 0x00081b36");
        assert_eq!(d.cmd("inw 0xcfe"), "OK 0x0008", "device id through the upper data port");
        // An empty slot reads all-ones both ways; a latch without the enable bit too.
        assert_eq!(d.cmd("readl 0xe0008000"), "OK 0x00000000ffffffff");
        assert_eq!(d.cmd("outl 0xcf8 0x80000800"), "OK");
        assert_eq!(d.cmd("inl 0xcfc"), "OK 0xffffffff");
        assert_eq!(d.cmd("outl 0xcf8 0x00000000"), "OK");
        assert_eq!(d.cmd("inl 0xcfc"), "OK 0xffffffff");
        // Read-only: the host bridge's identity does not change.
        assert_eq!(d.cmd("writel 0xe0000000 0x12345678"), "OK");
        assert_eq!(d.cmd("readl 0xe0000000"), "OK 0x0000000000081b36");
        assert_eq!(d.cmd("pci_list"), "OK 00:00.0 1b36:0008 class=0600 name=host-bridge bars=- irq=none");
    });
}

#[test]
fn exit_port_ends_the_session_with_its_status() {
    let vm = qtest_vm();
    let end = with_session(&vm, |d| {
        assert_eq!(d.cmd("outb 0xf4 3"), "OK");
    });
    assert_eq!(end, End::Exit(3));
}

#[test]
fn hcall_goes_through_the_hypercall_registry() {
    let vm = qtest_vm();
    vm.bench().set_iterations(1234);
    with_session(&vm, |d| {
        assert_eq!(d.cmd("hcall 0"), "OK 0x0 0x0 0x0 0x0", "null call succeeds");
        assert_eq!(d.cmd("hcall 0x1 7"), "OK 0x0 0x4d2 0x0 0x0", "BENCH_MARK answers the iteration count");
        assert_eq!(d.cmd("hcall 0x9999"), "OK 0x1 0x0 0x0 0x0", "unknown call number");
        assert_eq!(d.cmd("hcall 0x10 0x40 0x41"), "OK 0x1 0x0 0x0 0x0", "no test sources in this VM");
    });
    // The mark reached the same BenchMarks a vCPU's hypercall would.
    assert_eq!(vm.bench().marks().iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), vec![(7, 0)]);
}

#[cfg(feature = "test-sources")]
#[test]
fn test_source_calls_check_their_arguments() {
    let vm = qtest_vm_with(|c| c.test_sources = true);
    with_session(&vm, |d| {
        assert_eq!(d.cmd("hcall 0x10 5"), "OK 0x2 0x0 0x0 0x0", "vector below 32 is invalid");
        assert_eq!(d.cmd("hcall 0x11 1"), "OK 0x8 0x0 0x0 0x0", "firing before set-up: not found");
    });
}

#[cfg(feature = "test-sources")]
#[test]
fn irq_lines_arrive_once_intercepted_one_per_acknowledged_interrupt() {
    let vm = qtest_vm_with(|c| c.test_sources = true);
    with_session(&vm, |d| {
        assert_eq!(d.cmd("irq_intercept_in ioapic"), "OK");
        assert_eq!(d.cmd("irq_intercept_in ioapic"), "FAIL Interception already enabled");
        assert_eq!(d.cmd("hcall 0x10 0x40 0x41"), "OK 0x0 0x18 0x0 0x0", "set-up answers GSI 24");
        assert_eq!(d.cmd("hcall 0x11 3"), "OK 0x0 0x0 0x0 0x0");
        for i in 0..3 {
            assert_eq!(d.next_irq(), "IRQ raise 24", "interrupt {i}");
            // Acknowledge through the ack port: an emulated ioeventfd, as the guest does.
            assert_eq!(d.cmd("outb 0xf9 1"), "OK");
        }
        // Fired 3, all acknowledged: the source is done.
        let mut done = String::new();
        for _ in 0..100 {
            done = d.cmd("hcall 0x12 3");
            if done == "OK 0x0 0x3 0x1 0x0" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(done, "OK 0x0 0x3 0x1 0x0");
        assert_eq!(d.cmd("hcall 0x11 1"), "OK 0x0 0x0 0x0 0x0", "a second run may start");
        assert_eq!(d.next_irq(), "IRQ raise 24");
        assert_eq!(d.cmd("outb 0xf9 1"), "OK");
    });
    let s = vm.test_sources().unwrap().msi.summary();
    assert_eq!((s.fired, s.guest_counted, s.timed_out), (1, None, false));
}

#[cfg(feature = "test-sources")]
#[test]
fn an_unacknowledged_interrupt_times_out_and_signals_the_abort_vector() {
    let vm = qtest_vm_with(|c| c.test_sources = true);
    with_session(&vm, |d| {
        assert_eq!(d.cmd("irq_intercept_in ioapic"), "OK");
        assert_eq!(d.cmd("hcall 0x10 0x40 0x41"), "OK 0x0 0x18 0x0 0x0");
        assert_eq!(d.cmd("hcall 0x11 2"), "OK 0x0 0x0 0x0 0x0");
        assert_eq!(d.cmd("hcall 0x11 2"), "OK 0x6 0x0 0x0 0x0", "busy while firing");
        assert_eq!(d.next_irq(), "IRQ raise 24");
        // No acknowledgement: after the timeout the abort MSI (vector 0x41) comes.
        assert_eq!(d.next_irq(), "IRQ msi 0xfee00000 0x41");
    });
    let s = vm.test_sources().unwrap().msi.summary();
    assert_eq!((s.fired, s.timed_out), (1, true));
}
