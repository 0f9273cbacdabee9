//! The VMM core's own hypercalls (block [`abi::hcall::CORE_BASE`]): the null call,
//! benchmark marks and the test interrupt source.

use crate::accel::{Accel, FIRST_MSI_GSI, IoAddr, MsiMessage};
use crate::hypercall::HypercallHandler;
use abi::hcall::{self, Args, Ret, Status};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Timestamps recorded by `BENCH_MARK` hypercalls.
#[derive(Debug)]
pub struct BenchMarks {
    iterations: AtomicU64,
    marks: Mutex<Vec<(u64, Instant)>>,
}

/// Most marks kept: a guest cannot grow the list without bound.
const MAX_MARKS: usize = 1024;

impl BenchMarks {
    /// A recorder telling guests to run `iterations` per probe.
    pub fn new(iterations: u64) -> BenchMarks {
        BenchMarks {
            iterations: AtomicU64::new(iterations),
            marks: Mutex::new(Vec::new()),
        }
    }

    /// Sets the iteration count handed to guests.
    pub fn set_iterations(&self, n: u64) {
        self.iterations.store(n, Ordering::Relaxed);
    }

    fn mark(&self, tag: u64) -> u64 {
        let now = Instant::now();
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < MAX_MARKS {
            m.push((tag, now));
        }
        self.iterations.load(Ordering::Relaxed)
    }

    /// The marks recorded so far, in order.
    pub fn marks(&self) -> Vec<(u64, Instant)> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// GSI of the test interrupt source's MSI route.
pub const TEST_IRQ_GSI: u32 = FIRST_MSI_GSI;
/// How long the source waits for the guest to acknowledge an interrupt before it gives
/// up and signals the abort vector.
pub const TEST_IRQ_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most interrupts one `TEST_IRQ_FIRE` may ask for.
pub const TEST_IRQ_MAX_COUNT: u64 = 10_000_000;

struct Wiring {
    irq: Arc<EventFd>,
    ack: Arc<EventFd>,
    abort: Option<MsiMessage>,
}

struct Firing {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

/// What the test source did, for the end-of-run report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestIrqSummary {
    /// Interrupts fired through the irqfd.
    pub fired: u64,
    /// Count the guest reported, if it did.
    pub guest_counted: Option<u64>,
    /// The source gave up waiting for an acknowledgement.
    pub timed_out: bool,
}

/// A device-like interrupt source for tests: fires MSIs through an irqfd, one per
/// acknowledgement on [`abi::ports::TEST_IRQ_ACK`] (an ioeventfd), so the guest's count
/// must equal the number fired exactly.
pub struct TestIrqSource {
    accel: Arc<dyn Accel>,
    wiring: Mutex<Option<Wiring>>,
    firing: Mutex<Option<Firing>>,
    fired: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    guest_counted: Mutex<Option<u64>>,
}

impl TestIrqSource {
    /// A source that is not wired until the guest asks.
    pub fn new(accel: Arc<dyn Accel>) -> TestIrqSource {
        TestIrqSource {
            accel,
            wiring: Mutex::new(None),
            firing: Mutex::new(None),
            fired: Arc::new(AtomicU64::new(0)),
            done: Arc::new(AtomicBool::new(true)),
            timed_out: Arc::new(AtomicBool::new(false)),
            guest_counted: Mutex::new(None),
        }
    }

    fn setup(&self, vector: u64, abort_vector: u64) -> Ret {
        let Ok(vector) = u8::try_from(vector) else {
            return Ret::err(Status::InvalidArgument);
        };
        let abort = match abort_vector {
            0 => None,
            v => match u8::try_from(v) {
                Ok(v) if v >= 32 && v != vector => Some(MsiMessage::fixed(0, v)),
                _ => return Ret::err(Status::InvalidArgument),
            },
        };
        if vector < 32 {
            return Ret::err(Status::InvalidArgument);
        }
        if !self.done.load(Ordering::Acquire) {
            return Ret::err(Status::Busy);
        }
        self.stop_firing();
        self.unwire();
        match self.wire(MsiMessage::fixed(0, vector), abort) {
            Ok(w) => {
                *self.wiring.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
                Ret::ok(u64::from(TEST_IRQ_GSI), 0, 0)
            }
            Err(e) => {
                tracing::error!("test irq source: wiring failed: {e}");
                Ret::err(Status::Internal)
            }
        }
    }

    fn wire(&self, msi: MsiMessage, abort: Option<MsiMessage>) -> crate::error::Result<Wiring> {
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(crate::error::Error::EventFd)?);
        let ack = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(crate::error::Error::EventFd)?);
        self.accel.set_msi_route(TEST_IRQ_GSI, msi)?;
        if let Err(e) = self.accel.register_irqfd(&irq, TEST_IRQ_GSI) {
            let _ = self.accel.remove_msi_route(TEST_IRQ_GSI);
            return Err(e);
        }
        if let Err(e) = self
            .accel
            .register_ioevent(&ack, IoAddr::Pio(u64::from(abi::ports::TEST_IRQ_ACK)))
        {
            let _ = self.accel.unregister_irqfd(&irq, TEST_IRQ_GSI);
            let _ = self.accel.remove_msi_route(TEST_IRQ_GSI);
            return Err(e);
        }
        Ok(Wiring { irq, ack, abort })
    }

    fn unwire(&self) {
        if let Some(w) = self.wiring.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let port = IoAddr::Pio(u64::from(abi::ports::TEST_IRQ_ACK));
            if let Err(e) = self.accel.unregister_ioevent(&w.ack, port) {
                tracing::warn!("test irq source: {e}");
            }
            if let Err(e) = self.accel.unregister_irqfd(&w.irq, TEST_IRQ_GSI) {
                tracing::warn!("test irq source: {e}");
            }
            let _ = self.accel.remove_msi_route(TEST_IRQ_GSI);
        }
    }

    fn fire(&self, count: u64) -> Ret {
        if count == 0 || count > TEST_IRQ_MAX_COUNT {
            return Ret::err(Status::InvalidArgument);
        }
        if self
            .done
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ret::err(Status::Busy);
        }
        // The previous run has finished (done was set): reap its thread.
        if let Some(f) = self.firing.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = f.thread.join();
        }
        let wiring = self.wiring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = wiring.as_ref() else {
            self.done.store(true, Ordering::Release);
            return Ret::err(Status::NotFound);
        };
        self.fired.store(0, Ordering::Release);
        self.timed_out.store(false, Ordering::Release);
        *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()) = None;
        while w.ack.read().is_ok() {} // forget acknowledgements of an earlier run
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = FireCtx {
            irq: Arc::clone(&w.irq),
            ack: Arc::clone(&w.ack),
            abort: w.abort,
            accel: Arc::clone(&self.accel),
            fired: Arc::clone(&self.fired),
            done: Arc::clone(&self.done),
            timed_out: Arc::clone(&self.timed_out),
            stop: Arc::clone(&stop),
        };
        match std::thread::Builder::new()
            .name("test-irq".into())
            .spawn(move || ctx.run(count))
        {
            Ok(thread) => {
                *self.firing.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Firing { thread, stop });
                Ret::ok(0, 0, 0)
            }
            Err(e) => {
                tracing::error!("test irq source: {e}");
                self.done.store(true, Ordering::Release);
                Ret::err(Status::Internal)
            }
        }
    }

    fn report(&self, counted: u64) -> Ret {
        *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()) = Some(counted);
        Ret::ok(
            self.fired.load(Ordering::Acquire),
            u64::from(self.done.load(Ordering::Acquire)),
            0,
        )
    }

    fn stop_firing(&self) {
        if let Some(f) = self.firing.lock().unwrap_or_else(|e| e.into_inner()).take() {
            f.stop.store(true, Ordering::Release);
            if let Some(w) = self
                .wiring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                let _ = w.ack.write(1);
            }
            let _ = f.thread.join();
        }
    }

    /// What the source did so far.
    pub fn summary(&self) -> TestIrqSummary {
        TestIrqSummary {
            fired: self.fired.load(Ordering::Acquire),
            guest_counted: *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()),
            timed_out: self.timed_out.load(Ordering::Acquire),
        }
    }
}

impl Drop for TestIrqSource {
    fn drop(&mut self) {
        if let Some(f) = self
            .firing
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            f.stop.store(true, Ordering::Release);
            if let Some(w) = self
                .wiring
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                let _ = w.ack.write(1);
            }
            let _ = f.thread.join();
        }
        self.unwire();
    }
}

struct FireCtx {
    irq: Arc<EventFd>,
    ack: Arc<EventFd>,
    abort: Option<MsiMessage>,
    accel: Arc<dyn Accel>,
    fired: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl FireCtx {
    fn run(self, count: u64) {
        for _ in 0..count {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = self.irq.write(1) {
                tracing::error!("test irq source: eventfd write: {e}");
                break;
            }
            self.fired.fetch_add(1, Ordering::AcqRel);
            if !wait_readable(&self.ack, TEST_IRQ_ACK_TIMEOUT) {
                self.timed_out.store(true, Ordering::Release);
                if let Some(m) = self.abort {
                    let _ = self.accel.signal_msi(m);
                }
                break;
            }
            let _ = self.ack.read();
        }
        self.done.store(true, Ordering::Release);
    }
}

/// Waits until `fd` is readable; false on timeout.
fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return rc > 0;
    }
}

/// The core hypercall block.
pub struct CoreCalls {
    /// Benchmark marks.
    pub bench: Arc<BenchMarks>,
    /// The test interrupt source.
    pub test_irq: Arc<TestIrqSource>,
}

impl HypercallHandler for CoreCalls {
    fn name(&self) -> &str {
        "core"
    }

    fn call(&self, a: &Args) -> Ret {
        match a.nr {
            hcall::NULL => Ret::ok(0, 0, 0),
            hcall::BENCH_MARK => Ret::ok(self.bench.mark(a.a[0]), 0, 0),
            hcall::TEST_IRQ_SETUP => self.test_irq.setup(a.a[0], a.a[1]),
            hcall::TEST_IRQ_FIRE => self.test_irq.fire(a.a[0]),
            hcall::TEST_IRQ_REPORT => self.test_irq.report(a.a[0]),
            _ => Ret::err(Status::UnknownCall),
        }
    }
}
