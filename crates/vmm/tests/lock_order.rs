//! The device manager's lock order, provoked: every path that takes two of its locks
//! runs at the same time as the others, many times, on real threads. A deadlock shows
//! as the watchdog's failure; a panic on any thread fails the test.
//!
//! The paths (docs/architecture.md, "Lock order"):
//! - attach and detach (manager -> root slots -> function state -> registry; front-end
//!   -> domain -> endpoint);
//! - configuration writes (function state -> endpoint switch -> domain update ->
//!   observers -> the device's socket; then root windows -> memory map);
//! - paravirtual DMA calls (front-end device table -> domain update -> observers);
//! - BAR accesses (no function lock across the device exchange);
//! - interrupt mode switches (registry);
//! - device deaths on the connection's reader thread (hooks: front-end, root windows).
#![allow(clippy::unwrap_used, missing_docs)]

use abi::hcall::Args;
use abi::pci::{cap, command, reg};
use abi::pvdma::{self as pv, dir};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vfio_user::endpoint::Endpoint;
use vfio_user::server::Server;
use vmm::{AccelKind, DeviceSpec, IommuMode, RemoteSpec, Vm, VmConfig};

/// A DMA engine served on a thread; it hangs up after `life` requests if given.
fn engine() -> RemoteSpec {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let server = Server::new(Endpoint::new(theirs));
        let mut dev = devices::dma_engine::vfio::EngineServer::remote(&server).unwrap();
        server.serve(&mut dev);
    });
    RemoteSpec { stream: ours, mode: IommuMode::SharedFd, process: None, timeout: Duration::from_secs(5) }
}

#[test]
fn attach_detach_config_dma_bar_irq_and_death_paths_run_together_without_deadlock() {
    let mut c = VmConfig::new(AccelKind::Qtest);
    c.memory = 64 << 20;
    c.locked_memory = Some(256 << 20);
    c.serial_out = Box::new(std::io::sink());
    c.err_out = Box::new(std::io::sink());
    let vm = Arc::new(Vm::new(c).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let deadline = Duration::from_secs(120);
    let started = Instant::now();

    std::thread::scope(|s| {
        // Attach, use, kill or detach, again.
        let (v, st, r) = (Arc::clone(&vm), Arc::clone(&stop), Arc::clone(&rounds));
        s.spawn(move || {
            for i in 0..60u64 {
                let frontend = if i % 2 == 0 { "pvdma" } else { "identity" };
                let spec = if i % 3 == 0 { DeviceSpec::Inline } else { DeviceSpec::Remote(engine()) };
                let d = v.attach_device(spec, frontend).unwrap();
                std::thread::sleep(Duration::from_millis(5));
                if i % 4 == 1 {
                    // A death: the device's connection closes under everything else.
                    d.function().died("the test cut it off");
                }
                v.detach_device(d.name()).unwrap();
                r.fetch_add(1, Ordering::Relaxed);
            }
            st.store(true, Ordering::Release);
        });
        // Configuration writes: bus mastering and MSI-X on and off, INTx disable.
        let (v, st) = (Arc::clone(&vm), Arc::clone(&stop));
        s.spawn(move || {
            let mut on = false;
            while !st.load(Ordering::Acquire) {
                on = !on;
                let cmd = command::MEMORY | if on { command::MASTER } else { command::INTX_DISABLE };
                v.pci().config_write(1, reg::COMMAND, &cmd.to_le_bytes());
                let mut capp = [0u8];
                v.pci().config_read(1, reg::CAPABILITIES, &mut capp);
                if capp[0] >= 0x40 {
                    let ctl = if on { cap::MSIX_ENABLE } else { 0 };
                    v.pci().config_write(1, u16::from(capp[0]) + 2, &ctl.to_le_bytes());
                }
            }
        });
        // Paravirtual DMA: map and unmap on the device in slot 1.
        let (v, st) = (Arc::clone(&vm), Arc::clone(&stop));
        s.spawn(move || {
            let dev = u64::from(abi::pci::bdf(0, 1, 0));
            while !st.load(Ordering::Acquire) {
                let r = v.hypercall(&Args { nr: pv::MAP, a: [dev, 0x10_0000, 0x4000, dir::BIDIRECTIONAL, 0] });
                if r.status == abi::hcall::Status::Success {
                    v.hypercall(&Args { nr: pv::UNMAP, a: [dev, r.r[0], 0x4000, 0, 0] });
                }
            }
        });
        // BAR accesses and interrupt mode switches.
        let (v, st) = (Arc::clone(&vm), Arc::clone(&stop));
        s.spawn(move || {
            let mut b = [0u8; 4];
            while !st.load(Ordering::Acquire) {
                v.mmio_read(abi::pci::MMIO32_BASE, &mut b);
                v.mmio_write(abi::pci::MMIO32_BASE + abi::dma_engine::regs::IRQ_CTRL, &1u32.to_le_bytes());
                for id in v.irqs().sources() {
                    let _ = v.irqs().set_mode(&id, irq::Mode::Vmm);
                    let _ = v.irqs().set_mode(&id, irq::Mode::Forwarded);
                }
                for f in v.frontends().all() {
                    let _ = f.stats();
                }
            }
        });
        // The watchdog.
        let (st, r) = (Arc::clone(&stop), Arc::clone(&rounds));
        s.spawn(move || {
            while !st.load(Ordering::Acquire) {
                assert!(
                    started.elapsed() < deadline,
                    "no progress for {deadline:?}: a deadlock ({} rounds done)",
                    r.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    assert_eq!(rounds.load(Ordering::Relaxed), 60);
    assert!(vm.devices().is_empty());
    assert_eq!(vm.dma().account().pinned(), 0, "every pin released");
    assert_eq!(vm.pci().list().len(), 1, "only the host bridge is left");
}
