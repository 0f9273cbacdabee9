//! The registry against a mock hypervisor that behaves like KVM's irqfd: an assigned
//! eventfd is consumed as it is written (every write counted, none coalesced), and a
//! count pending at assignment is delivered then. Checks the API's error rules,
//! lossless switching under fire, level state carried across switches, and teardown
//! that leaves no irqfd, watch, route, eventfd, thread or device reference behind.
#![allow(clippy::unwrap_used, missing_docs)]

use irq::{GuestIrq, IrqChip, IrqError, IrqRegistry, IrqSource, Mode, MsiMessage, SourceId, Trigger};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A fake KVM: a thread polls assigned eventfds and counts what it consumes.
#[derive(Default)]
struct MockChip {
    assigned: Mutex<HashMap<i32, (EventFd, u32)>>,
    kvm_delivered: AtomicU64,
    vmm_msis: AtomicU64,
    line_pulses: AtomicU64,
    routes: Mutex<HashMap<u32, MsiMessage>>,
    assigns: AtomicU64,
    deassigns: AtomicU64,
    stop: AtomicBool,
}

impl MockChip {
    fn start() -> (Arc<MockChip>, std::thread::JoinHandle<()>) {
        let chip = Arc::new(MockChip::default());
        let c = Arc::clone(&chip);
        let t = std::thread::spawn(move || {
            while !c.stop.load(Ordering::Relaxed) {
                c.poll_once();
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        (chip, t)
    }

    fn poll_once(&self) {
        let a = self.assigned.lock().unwrap();
        for (fd, _) in a.values() {
            if let Ok(n) = fd.read() {
                self.kvm_delivered.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl IrqChip for MockChip {
    fn assign_irqfd(&self, fd: &EventFd, gsi: u32, _resample: Option<&EventFd>) -> io::Result<()> {
        let mut a = self.assigned.lock().unwrap();
        if a.contains_key(&fd.as_raw_fd()) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let dup = fd.try_clone()?;
        // Like KVM: a count already pending is delivered at assignment.
        if let Ok(n) = dup.read() {
            self.kvm_delivered.fetch_add(n, Ordering::Relaxed);
        }
        a.insert(fd.as_raw_fd(), (dup, gsi));
        self.assigns.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn deassign_irqfd(&self, fd: &EventFd, _gsi: u32) -> io::Result<()> {
        let mut a = self.assigned.lock().unwrap();
        match a.remove(&fd.as_raw_fd()) {
            Some((dup, _)) => {
                // KVM consumed every write at signal time; the poller may lag: flush it.
                if let Ok(n) = dup.read() {
                    self.kvm_delivered.fetch_add(n, Ordering::Relaxed);
                }
                self.deassigns.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }
    fn set_msi_route(&self, gsi: u32, msi: MsiMessage) -> io::Result<()> {
        self.routes.lock().unwrap().insert(gsi, msi);
        Ok(())
    }
    fn remove_msi_route(&self, gsi: u32) -> io::Result<()> {
        self.routes.lock().unwrap().remove(&gsi);
        Ok(())
    }
    fn signal_msi(&self, _msi: MsiMessage) -> io::Result<()> {
        self.vmm_msis.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn set_irq_line(&self, _gsi: u32, level: bool) -> io::Result<()> {
        if level {
            self.line_pulses.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Device;

/// The teardown test counts the process's threads and eventfds: tests of this file run
/// one at a time so none of them changes those counts under another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn msi_source(dev: &str) -> (IrqSource, EventFd) {
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let writer = fd.try_clone().unwrap();
    (IrqSource { id: SourceId::new(dev, 2, 0), trigger: Trigger::Edge(fd) }, writer)
}

fn open_eventfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|l| l.to_string_lossy().contains("eventfd"))
        .count()
}

/// Threads of this process named like the registry's delivery thread.
fn delivery_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.trim() == "irq-delivery")
        .count()
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn forwarding_twice_and_unknown_sources_are_errors_unforward_of_known_is_not() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap();
    let dev = Arc::new(Device);
    let (src, _w) = msi_source("nic");
    let id = src.id.clone();
    reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), dev.clone()).unwrap();
    assert!(matches!(reg.forward(&id), Err(IrqError::AlreadyForwarded(_))));
    let ghost = SourceId::new("ghost", 2, 0);
    assert!(matches!(reg.unforward(&ghost), Err(IrqError::Unknown(_))));
    assert!(matches!(reg.forward(&ghost), Err(IrqError::Unknown(_))));
    assert!(matches!(reg.detach(&ghost), Err(IrqError::Unknown(_))));
    reg.unforward(&id).unwrap();
    reg.unforward(&id).unwrap(); // a known source: cannot fail
    assert_eq!(reg.stats(&id).unwrap().mode, Mode::Vmm);
    reg.forward(&id).unwrap();
    let (dup, _w2) = msi_source("nic");
    assert!(matches!(
        reg.attach(dup, GuestIrq::Msi(MsiMessage::fixed(0, 0x41)), dev.clone()),
        Err(IrqError::AlreadyAttached(_))
    ));
    let (edge, _w3) = msi_source("nic2");
    assert!(matches!(reg.attach(edge, GuestIrq::Level(10), dev.clone()), Err(IrqError::Mismatch(..))));
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn a_device_reference_is_held_exactly_while_attached() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap();
    let dev = Arc::new(Device);
    let mut ids = Vec::new();
    for sub in 0..3 {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let src = IrqSource { id: SourceId::new("nic", 2, sub), trigger: Trigger::Edge(fd) };
        ids.push(src.id.clone());
        reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40 + sub as u8)), dev.clone()).unwrap();
    }
    assert_eq!(Arc::strong_count(&dev), 4, "one reference per attached source");
    reg.unforward(&ids[0]).unwrap();
    reg.forward(&ids[0]).unwrap();
    assert_eq!(Arc::strong_count(&dev), 4, "switching does not count");
    reg.detach(&ids[1]).unwrap();
    assert_eq!(Arc::strong_count(&dev), 3);
    assert_eq!(reg.detach_device("nic"), 2);
    assert_eq!(Arc::strong_count(&dev), 1);
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn switching_while_firing_loses_and_duplicates_nothing() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = Arc::new(IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap());
    let (src, writer) = msi_source("storm");
    let id = src.id.clone();
    reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), Arc::new(Device)).unwrap();
    const N: u64 = 5_000;
    let total = {
        let chip = chip.clone();
        move || chip.kvm_delivered.load(Ordering::Relaxed) + chip.vmm_msis.load(Ordering::Relaxed)
    };
    // Each interrupt waits for the previous one to arrive (as a driver acknowledging
    // it would): then delivery is exact whatever path each one took.
    let firing = {
        let total = total.clone();
        std::thread::spawn(move || {
            for i in 0..N {
                writer.write(1).unwrap();
                assert!(wait_until(|| total() > i), "interrupt {i} was lost");
            }
        })
    };
    let mut switches = 0;
    while !firing.is_finished() || switches < 2000 {
        reg.set_mode(&id, if switches % 2 == 0 { Mode::Vmm } else { Mode::Forwarded }).unwrap();
        switches += 1;
    }
    firing.join().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(total(), N, "nothing lost, nothing duplicated across {switches} switches");
    assert!(chip.vmm_msis.load(Ordering::Relaxed) > 0 && chip.kvm_delivered.load(Ordering::Relaxed) > 0);
    assert_eq!(reg.stats(&id).unwrap().vmm_delivered, chip.vmm_msis.load(Ordering::Relaxed));
    drop(reg);
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn one_huge_eventfd_write_is_one_interrupt_in_vmm_mode() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Vmm).unwrap();
    let (src, writer) = msi_source("storm");
    let id = src.id.clone();
    reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), Arc::new(Device)).unwrap();
    // The largest count an eventfd holds: the device asks for 2^64-2 interrupts at once.
    writer.write(u64::MAX - 1).unwrap();
    assert!(wait_until(|| chip.vmm_msis.load(Ordering::Relaxed) >= 1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(chip.vmm_msis.load(Ordering::Relaxed), 1, "one wake-up, one injection (as KVM's irqfd)");
    assert_eq!(reg.stats(&id).unwrap().vmm_delivered, 1);
    writer.write(1).unwrap();
    assert!(wait_until(|| chip.vmm_msis.load(Ordering::Relaxed) == 2), "the next write is the next interrupt");
    drop(reg);
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

/// A chip whose MSI injection blocks until the test lets it go.
struct SlowChip {
    inner: Arc<MockChip>,
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl IrqChip for SlowChip {
    fn assign_irqfd(&self, fd: &EventFd, gsi: u32, r: Option<&EventFd>) -> io::Result<()> {
        self.inner.assign_irqfd(fd, gsi, r)
    }
    fn deassign_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.inner.deassign_irqfd(fd, gsi)
    }
    fn set_msi_route(&self, gsi: u32, msi: MsiMessage) -> io::Result<()> {
        self.inner.set_msi_route(gsi, msi)
    }
    fn remove_msi_route(&self, gsi: u32) -> io::Result<()> {
        self.inner.remove_msi_route(gsi)
    }
    fn signal_msi(&self, msi: MsiMessage) -> io::Result<()> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv_timeout(Duration::from_secs(10));
        self.inner.signal_msi(msi)
    }
    fn set_irq_line(&self, gsi: u32, level: bool) -> io::Result<()> {
        self.inner.set_irq_line(gsi, level)
    }
}

/// A registry over a [`SlowChip`] with one VMM-delivered MSI source `dev` whose first
/// interrupt is being injected (blocked in the chip) when this returns: the registry,
/// the chip's counters, the source's id and the sender that lets the injection finish.
fn injection_in_flight(dev: &str) -> (Arc<IrqRegistry>, Arc<MockChip>, SourceId, std::sync::mpsc::Sender<()>) {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let inner = Arc::new(MockChip::default());
    let chip =
        Arc::new(SlowChip { inner: inner.clone(), entered: Mutex::new(entered_tx), release: Mutex::new(release_rx) });
    let reg = Arc::new(IrqRegistry::new(chip, Mode::Vmm).unwrap());
    let (src, writer) = msi_source(dev);
    let id = src.id.clone();
    reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), Arc::new(Device)).unwrap();
    writer.write(1).unwrap();
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    (reg, inner, id, release)
}

#[test]
fn the_registry_answers_while_an_injection_is_in_flight_and_detach_waits_for_it() {
    let _s = serial();
    let (reg, inner, id, release) = injection_in_flight("slow");
    // Registry calls from other threads (a vCPU reprogramming an MSI) still complete.
    let r = Arc::clone(&reg);
    let i = id.clone();
    let answer = std::thread::spawn(move || {
        r.set_msi(&i, MsiMessage::fixed(0, 0x41)).unwrap();
        r.stats(&i).unwrap().vmm_delivered
    });
    let t = Instant::now();
    while !answer.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(5), "the registry is blocked by an injection");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(answer.join().unwrap(), 1);
    // A detach started now returns only after the injection finished.
    let r = Arc::clone(&reg);
    let i = id.clone();
    let detach = std::thread::spawn(move || r.detach(&i).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    assert!(!detach.is_finished(), "detach returned while its source was still being injected");
    release.send(()).unwrap();
    detach.join().unwrap();
    assert_eq!(inner.vmm_msis.load(Ordering::Relaxed), 1);
}

#[test]
fn a_level_source_is_asked_to_recheck_its_line_at_every_switch() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let device_resample = resample.try_clone().unwrap();
    let id = SourceId::new("intx-dev", 0, 0);
    reg.attach(
        IrqSource { id: id.clone(), trigger: Trigger::Level { trigger, resample } },
        GuestIrq::Level(10),
        Arc::new(Device),
    )
    .unwrap();
    assert!(device_resample.read().is_err(), "no re-check at attach: nothing to carry over");
    reg.unforward(&id).unwrap();
    assert_eq!(device_resample.read().unwrap(), 1, "re-check after switching to the VMM");
    assert_eq!(reg.counts().irqfds, 1, "VMM mode raises the line through a resample relay");
    reg.forward(&id).unwrap();
    assert_eq!(device_resample.read().unwrap(), 1, "re-check after switching back");
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn teardown_leaves_no_irqfd_watch_route_eventfd_thread_or_reference() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let threads_before = delivery_threads();
    let fds_before = open_eventfds();
    let dev = Arc::new(Device);
    {
        let reg = IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap();
        assert!(wait_until(|| delivery_threads() == threads_before + 1), "one delivery thread");
        for sub in 0..4 {
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            let mode = if sub % 2 == 0 { Mode::Forwarded } else { Mode::Vmm };
            let src = IrqSource { id: SourceId::new("nic", 2, sub), trigger: Trigger::Edge(fd) };
            reg.attach_in(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40 + sub as u8)), dev.clone(), mode).unwrap();
        }
        let level = IrqSource {
            id: SourceId::new("nic", 0, 0),
            trigger: Trigger::Level {
                trigger: EventFd::new(EFD_NONBLOCK).unwrap(),
                resample: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        };
        reg.attach_in(level, GuestIrq::Level(11), dev.clone(), Mode::Vmm).unwrap();
        let c = reg.counts();
        assert_eq!((c.sources, c.forwarded, c.msi_routes), (5, 2, 4));
        assert_eq!(c.irqfds, 3, "two forwarded + one level relay");
        assert_eq!(Arc::strong_count(&dev), 6);
        // The registry is dropped here, sources still attached: Drop tears down.
    }
    assert_eq!(Arc::strong_count(&dev), 1, "no device reference left");
    assert_eq!(chip.assigned.lock().unwrap().len(), 0, "every irqfd deassigned");
    assert_eq!(chip.assigns.load(Ordering::Relaxed), chip.deassigns.load(Ordering::Relaxed));
    assert!(chip.routes.lock().unwrap().is_empty(), "every MSI route removed");
    assert_eq!(open_eventfds(), fds_before, "no eventfd left open");
    assert_eq!(delivery_threads(), threads_before, "delivery thread joined");
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn a_masked_source_keeps_one_interrupt_pending_and_delivers_it_at_unmask() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Forwarded).unwrap();
    let (src, writer) = msi_source("msix");
    let id = src.id.clone();
    reg.attach(src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), Arc::new(Device)).unwrap();
    let total = || chip.kvm_delivered.load(Ordering::Relaxed) + chip.vmm_msis.load(Ordering::Relaxed);
    writer.write(1).unwrap();
    assert!(wait_until(|| total() == 1));
    reg.set_masked(&id, true).unwrap();
    assert_eq!(reg.counts().irqfds, 0, "KVM no longer injects it");
    for _ in 0..5 {
        writer.write(1).unwrap();
    }
    assert!(wait_until(|| reg.is_pending(&id)), "the vector is pending");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(total(), 1, "nothing injected while masked");
    reg.set_masked(&id, false).unwrap();
    assert_eq!(total(), 2, "one pending interrupt delivered at unmask");
    assert!(!reg.is_pending(&id));
    assert_eq!(reg.stats(&id).unwrap().mode, Mode::Forwarded, "forwarded again");
    assert_eq!(reg.counts().irqfds, 1);
    writer.write(1).unwrap();
    assert!(wait_until(|| total() == 3));
    // Switching while masked is recorded and applied at unmask.
    reg.set_masked(&id, true).unwrap();
    reg.unforward(&id).unwrap();
    reg.set_masked(&id, false).unwrap();
    assert_eq!((reg.stats(&id).unwrap().mode, reg.counts().irqfds, reg.counts().watched), (Mode::Vmm, 0, 1));
    drop(reg);
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

/// `settle` is the barrier a snapshot needs before it reads the local APIC: every
/// interrupt signalled before it returns has reached the irqchip, whether the VMM or
/// KVM (the mock's lagging poller) delivers it, and whatever the source did between.
#[test]
fn settle_returns_only_when_every_signalled_interrupt_reached_the_chip() {
    let _s = serial();
    let (chip, t) = MockChip::start();
    let reg = IrqRegistry::new(chip.clone(), Mode::Vmm).unwrap();
    let (vmm_src, vmm_writer) = msi_source("settle-vmm");
    reg.attach(vmm_src, GuestIrq::Msi(MsiMessage::fixed(0, 0x40)), Arc::new(Device)).unwrap();
    let (kvm_src, kvm_writer) = msi_source("settle-kvm");
    let kvm_id = kvm_src.id.clone();
    reg.attach(kvm_src, GuestIrq::Msi(MsiMessage::fixed(0, 0x41)), Arc::new(Device)).unwrap();
    reg.set_mode(&kvm_id, Mode::Forwarded).unwrap();
    for i in 1..=2000u64 {
        vmm_writer.write(1).unwrap();
        kvm_writer.write(1).unwrap();
        reg.settle();
        assert_eq!(chip.vmm_msis.load(Ordering::Relaxed), i, "a VMM-delivered interrupt was still on its way");
        assert_eq!(chip.kvm_delivered.load(Ordering::Relaxed), i, "a forwarded interrupt was still on its way");
    }
    assert_eq!(reg.stats(&kvm_id).unwrap().mode, Mode::Forwarded, "settling changed the mode");
    assert_eq!(reg.stats(&kvm_id).unwrap().switches, 1, "settling counted as switches");
    drop(reg);
    chip.stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn settle_waits_for_an_injection_in_flight() {
    let _s = serial();
    let (reg, inner, _, release) = injection_in_flight("slow-settle");
    let r = Arc::clone(&reg);
    let settle = std::thread::spawn(move || r.settle());
    std::thread::sleep(Duration::from_millis(50));
    assert!(!settle.is_finished(), "settle returned with an injection still in flight");
    release.send(()).unwrap();
    settle.join().unwrap();
    assert_eq!(inner.vmm_msis.load(Ordering::Relaxed), 1);
}
