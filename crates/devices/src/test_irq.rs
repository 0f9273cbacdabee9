//! Test interrupt sources: device-like sources that go through the interrupt
//! forwarding registry like any device's, paced by the guest so every interrupt is
//! accounted for, and able to switch forwarding on and off while they fire.
//!
//! - [`MsiTestSource`] (`test-irq`, index 1 = MSI): one MSI per acknowledgement on
//!   [`abi::ports::TEST_IRQ_ACK`] (an ioeventfd: no exit).
//! - [`IntxTestSource`] (`test-intx`, index 0 = INTx): a level line the guest sees on an
//!   IOAPIC pin; it stays asserted until the guest writes [`abi::ports::TEST_INTX_STATUS`],
//!   and the device re-raises it on every resample while it is still asserted.
//!
//! If the guest stops acknowledging for [`ACK_TIMEOUT`], the source gives up and
//! signals the guest's abort vector, so a lost interrupt ends a test instead of
//! hanging it.
//!
//! The sources exist only in a VM built with them (`passthru run --test-sources`, the
//! interrupt guest programs and `bench irq`); their calls answer UNKNOWN_CALL
//! otherwise. [`TestSources`] answers the test calls of the core hypercall block.

use crate::BusDevice;
use crate::test_irq_state::{IntxSourceState, MsiSourceState, RunState, TestSourcesState};
use abi::hcall::{self, Args, Ret, Status};
use irq::{GuestIrq, IrqRegistry, IrqSource, Mode, MsiMessage, SourceId, Trigger};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_api::{IoAddr, IoEvents};
use vmm_sys_util::eventfd::EventFd;

/// How long a source waits for the guest before giving up.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most interrupts one FIRE may ask for.
pub const MAX_COUNT: u64 = 10_000_000;

/// What the test sources use of their VM.
pub struct Services {
    /// Where MSIs are signalled directly (the abort vector).
    pub chip: Arc<dyn irq::IrqChip>,
    /// Where the acknowledgement port's ioeventfd is registered.
    pub io: Arc<dyn IoEvents>,
    /// The interrupt forwarding registry the sources attach to.
    pub irqs: Arc<IrqRegistry>,
    /// The port bus (the INTx status port).
    pub pio: Arc<crate::Bus>,
}

/// Both test sources, answering the test calls of the core hypercall block.
pub struct TestSources {
    /// The MSI source.
    pub msi: MsiTestSource,
    /// The INTx source.
    pub intx: IntxTestSource,
}

impl TestSources {
    /// Both sources of a VM, not yet attached (the guest's SETUP calls attach them).
    pub fn new(vm: &Services) -> std::io::Result<TestSources> {
        Ok(TestSources { msi: MsiTestSource::new(vm)?, intx: IntxTestSource::new(vm)? })
    }

    /// True for the call numbers the sources answer.
    pub fn answers(nr: u64) -> bool {
        matches!(
            nr,
            hcall::TEST_IRQ_SETUP
                | hcall::TEST_IRQ_FIRE
                | hcall::TEST_IRQ_REPORT
                | hcall::TEST_INTX_SETUP
                | hcall::TEST_INTX_FIRE
                | hcall::TEST_INTX_REPORT
        )
    }

    /// Pauses both sources' runs (the VM is pausing): each parks between two steps,
    /// and no acknowledgement deadline runs until [`TestSources::resume`].
    pub fn pause(&self, deadline: Duration) -> Result<(), String> {
        let r = self.msi.runner.pause(deadline).and_then(|()| self.intx.runner.pause(deadline));
        if r.is_err() {
            self.resume();
        }
        r
    }

    /// Lets both sources' runs go on.
    pub fn resume(&self) {
        self.msi.runner.resume();
        self.intx.runner.resume();
    }

    /// Both sources' state (they must be paused).
    pub fn save(&self) -> Result<TestSourcesState, String> {
        Ok(TestSourcesState { msi: self.msi.save()?, intx: self.intx.save()? })
    }

    /// Brings both sources back as saved; their runs stay paused until
    /// [`TestSources::resume`].
    pub fn restore(&self, s: &TestSourcesState) -> Result<(), String> {
        if let Some(m) = &s.msi {
            self.msi.restore(m)?;
        }
        if let Some(i) = &s.intx {
            self.intx.restore(i)?;
        }
        Ok(())
    }

    /// One test call.
    pub fn call(&self, a: &Args) -> Ret {
        match a.nr {
            hcall::TEST_IRQ_SETUP => self.msi.setup(a.a[0], a.a[1]),
            hcall::TEST_IRQ_FIRE => self.msi.fire(a.a[0], a.a[1]),
            hcall::TEST_IRQ_REPORT => self.msi.report(a.a[0]),
            hcall::TEST_INTX_SETUP => self.intx.setup(a.a[0], a.a[1]),
            hcall::TEST_INTX_FIRE => self.intx.fire(a.a[0], a.a[1]),
            hcall::TEST_INTX_REPORT => self.intx.report(a.a[0]),
            _ => Ret::err(Status::UnknownCall),
        }
    }
}

/// The test sources as a snapshot component (`test-sources`), and as one that pauses
/// (their runs park between two steps; no acknowledgement deadline runs meanwhile).
impl vm_api::Snapshottable for TestSources {
    fn id(&self) -> String {
        "test-sources".into()
    }
    fn save(&self) -> Result<Option<vm_api::Section>, vm_api::ComponentError> {
        let state = TestSources::save(self).map_err(|e| vm_api::ComponentError::new(self.id(), e))?;
        vm_api::Section::new(&self.id(), crate::test_irq_state::STATE_VERSION, &state).map(Some)
    }
    fn restore(&self, section: &vm_api::Section) -> Result<(), vm_api::ComponentError> {
        let state: TestSourcesState = section.read(&self.id(), crate::test_irq_state::STATE_VERSION)?;
        TestSources::restore(self, &state).map_err(|e| vm_api::ComponentError::new(self.id(), e))
    }
}

impl vm_api::Pausable for TestSources {
    fn pause(&self) -> Result<(), vm_api::ComponentError> {
        TestSources::pause(self, PAUSE_DEADLINE).map_err(|e| vm_api::ComponentError::new("test-sources", e))
    }
    fn resume(&self) -> Result<(), vm_api::ComponentError> {
        TestSources::resume(self);
        Ok(())
    }
}

/// How long a pause waits for a source's run to park.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(2);

/// The device reference a test source's registration holds.
#[derive(Debug, Default)]
pub struct TestDevice;

/// What a test source did, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestIrqSummary {
    /// Interrupts fired (MSI) or assertions made (INTx).
    pub fired: u64,
    /// Count the guest reported, if it did.
    pub guest_counted: Option<u64>,
    /// The source gave up waiting for the guest.
    pub timed_out: bool,
    /// Forwarding switches made while firing.
    pub toggles: u64,
    /// Resamples (EOIs) the device saw (INTx only).
    pub resamples: u64,
}

/// Progress of a firing run, shared with its thread.
#[derive(Default)]
struct Progress {
    count: u64,
    toggles: u64,
    fired: AtomicU64,
    toggles_made: AtomicU64,
    resamples: AtomicU64,
    timed_out: AtomicBool,
    done: AtomicBool,
    stop: AtomicBool,
}

/// Pausing a firing run (the VM is paused): the source sets `paused`, its thread parks
/// at the next step boundary and says where.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
struct GateState {
    paused: bool,
    /// Where the firing thread is parked: `Some(true)` with an interrupt awaiting the
    /// guest's acknowledgement, `Some(false)` before it fires the next one.
    parked: Option<bool>,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the firing thread: waits while paused (or until `stop`). While it waits, no
    /// acknowledgement deadline runs: the guest cannot acknowledge while paused.
    fn hold(&self, in_flight: bool, stop: &AtomicBool) {
        let mut s = self.lock();
        while s.paused && !stop.load(Ordering::Acquire) {
            s.parked = Some(in_flight);
            self.changed.notify_all();
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = None;
    }

    /// On the firing thread, woken by the source's wake eventfd (read here): false
    /// if the run must stop, else true once not paused (holding with the interrupt in
    /// flight meanwhile); the caller waits for the guest afresh.
    fn woken(&self, wake: &EventFd, stop: &AtomicBool) -> bool {
        let _ = wake.read();
        if stop.load(Ordering::Acquire) {
            return false;
        }
        self.hold(true, stop);
        true
    }

    fn notify(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }
}

/// One step of a run: make an interrupt (`fire`; else only wait for the one in flight)
/// and wait for the guest. False: give up (timed out or stopped).
type Step = dyn Fn(&Progress, &Gate, bool) -> bool + Send + 'static;

/// The firing machinery both sources share.
struct Runner {
    chip: Arc<dyn irq::IrqChip>,
    io: Arc<dyn IoEvents>,
    irqs: Arc<IrqRegistry>,
    id: SourceId,
    progress: Mutex<Arc<Progress>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    guest_counted: Mutex<Option<u64>>,
    abort: Mutex<Option<MsiMessage>>,
    gate: Arc<Gate>,
    /// Written to wake a waiting firing thread when it must stop or pause.
    wake: EventFd,
}

impl Runner {
    fn new(vm: &Services, id: SourceId) -> std::io::Result<Runner> {
        let done = Progress::default();
        done.done.store(true, Ordering::Release);
        let irqs = Arc::clone(&vm.irqs);
        Ok(Runner {
            chip: Arc::clone(&vm.chip),
            io: Arc::clone(&vm.io),
            irqs,
            id,
            progress: Mutex::new(Arc::new(done)),
            thread: Mutex::new(None),
            guest_counted: Mutex::new(None),
            abort: Mutex::new(None),
            gate: Arc::new(Gate::default()),
            wake: irq::eventfd()?,
        })
    }

    fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn busy(&self) -> bool {
        !self.progress().done.load(Ordering::Acquire)
    }

    /// Stops a run in progress and joins its thread.
    fn stop(&self) {
        self.progress().stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        self.gate.notify();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        while self.wake.read().is_ok() {}
    }

    /// Pauses the run: returns once its thread is parked between two steps (or the
    /// run is over), or fails after `deadline`.
    fn pause(&self, deadline: Duration) -> Result<(), String> {
        self.gate.lock().paused = true;
        let _ = self.wake.write(1);
        let progress = self.progress();
        let end = Instant::now() + deadline;
        let mut s = self.gate.lock();
        loop {
            if s.parked.is_some() || progress.done.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= end {
                return Err(format!("test source {}: its firing thread did not stop within {deadline:?}", self.id));
            }
            s = self.gate.changed.wait_timeout(s, end - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Lets a paused run go on.
    fn resume(&self) {
        self.gate.lock().paused = false;
        self.gate.notify();
    }

    /// Starts a run of `count` steps (or goes on with a saved one, `from`: a restored
    /// run starts paused when the source is).
    fn start(&self, count: u64, toggles: u64, from: Option<RunState>, step: Box<Step>) -> Ret {
        if count == 0 || count > MAX_COUNT || toggles > count {
            return Ret::err(Status::InvalidArgument);
        }
        if self.busy() {
            return Ret::err(Status::Busy);
        }
        self.stop();
        let from = from.unwrap_or(RunState {
            count,
            toggles,
            fired: 0,
            toggled: 0,
            resamples: 0,
            in_flight: false,
            done: false,
            timed_out: false,
            guest_counted: None,
        });
        let progress = Arc::new(Progress {
            count,
            toggles,
            fired: AtomicU64::new(from.fired),
            toggles_made: AtomicU64::new(from.toggled),
            resamples: AtomicU64::new(from.resamples),
            timed_out: AtomicBool::new(from.timed_out),
            done: AtomicBool::new(from.done),
            stop: AtomicBool::new(false),
        });
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&progress);
        *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()) = from.guest_counted;
        if from.done {
            return Ret::ok(0, 0, 0);
        }
        let (irqs, id, accel, gate) =
            (Arc::clone(&self.irqs), self.id.clone(), Arc::clone(&self.chip), Arc::clone(&self.gate));
        let abort = *self.abort.lock().unwrap_or_else(|e| e.into_inner());
        let interval = count.checked_div(toggles).unwrap_or(0).max(1);
        let body = move || {
            let p = &*progress;
            // A restored run first waits for the interrupt it had in flight.
            let mut ok = if from.in_flight {
                gate.hold(true, &p.stop);
                step(p, &gate, false)
            } else {
                true
            };
            while ok {
                gate.hold(false, &p.stop);
                let n = p.fired.load(Ordering::Acquire);
                if p.stop.load(Ordering::Acquire) || n >= count {
                    break;
                }
                p.fired.store(n + 1, Ordering::Release);
                // Switch while this interrupt is in flight: the hard case.
                if toggles > 0 && (n + 1).is_multiple_of(interval) && p.toggles_made.load(Ordering::Acquire) < toggles {
                    let next = match irqs.stats(&id).map(|s| s.mode) {
                        Some(Mode::Forwarded) => Mode::Vmm,
                        _ => Mode::Forwarded,
                    };
                    match irqs.set_mode(&id, next) {
                        Ok(()) => {
                            p.toggles_made.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => tracing::error!("test source: switching to {next}: {e}"),
                    }
                }
                ok = step(p, &gate, true);
            }
            if !ok && !p.stop.load(Ordering::Acquire) {
                p.timed_out.store(true, Ordering::Release);
                if let Some(m) = abort {
                    let _ = accel.signal_msi(m);
                }
            }
            p.done.store(true, Ordering::Release);
            gate.notify();
        };
        match std::thread::Builder::new().name(self.id.device.clone()).spawn(body) {
            Ok(t) => {
                *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                Ret::ok(0, 0, 0)
            }
            Err(e) => {
                tracing::error!("test source: {e}");
                Ret::err(Status::Internal)
            }
        }
    }

    /// Starts the saved run `r` paused, with `run` (the source's own start), to go on
    /// at [`Runner::resume`].
    fn go_on(&self, r: RunState, run: impl FnOnce(RunState) -> Ret) -> Result<(), String> {
        self.gate.lock().paused = true;
        let ret = run(r);
        if ret.status == Status::Success {
            Ok(())
        } else {
            Err(format!("test source {}: its run could not be restored ({:?})", self.id, ret.status))
        }
    }

    /// The run, stopped between two steps: None if there never was one. Fails if the
    /// run is going on (not paused).
    fn save(&self) -> Result<Option<RunState>, String> {
        let p = self.progress();
        let done = p.done.load(Ordering::Acquire);
        let fired = p.fired.load(Ordering::Acquire);
        let guest_counted = *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner());
        if done && p.count == 0 {
            return Ok(None);
        }
        let parked = self.gate.lock().parked;
        if !done && parked.is_none() {
            return Err(format!("test source {} is firing (not paused): it cannot be saved", self.id));
        }
        Ok(Some(RunState {
            count: p.count,
            toggles: p.toggles,
            fired,
            toggled: p.toggles_made.load(Ordering::Acquire),
            resamples: p.resamples.load(Ordering::Acquire),
            in_flight: !done && parked == Some(true),
            done,
            timed_out: p.timed_out.load(Ordering::Acquire),
            guest_counted,
        }))
    }

    fn report(&self, counted: u64) -> Ret {
        *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()) = Some(counted);
        let p = self.progress();
        Ret::ok(
            p.fired.load(Ordering::Acquire),
            u64::from(p.done.load(Ordering::Acquire)),
            p.resamples.load(Ordering::Acquire),
        )
    }

    fn summary(&self) -> TestIrqSummary {
        let p = self.progress();
        TestIrqSummary {
            fired: p.fired.load(Ordering::Acquire),
            guest_counted: *self.guest_counted.lock().unwrap_or_else(|e| e.into_inner()),
            timed_out: p.timed_out.load(Ordering::Acquire),
            toggles: p.toggles_made.load(Ordering::Acquire),
            resamples: p.resamples.load(Ordering::Acquire),
        }
    }
}

/// A saved run that cannot be: more fired than asked, an in-flight interrupt before
/// any was fired...
fn check_run(r: &RunState) -> Result<(), String> {
    let ok = r.count > 0
        && r.count <= MAX_COUNT
        && r.toggles <= r.count
        && r.fired <= r.count
        && r.toggled <= r.toggles
        && (!r.in_flight || (r.fired > 0 && !r.done));
    if ok { Ok(()) } else { Err(format!("a malformed test source run: {r:?}")) }
}

/// Waits until one of `fds` is readable; returns its index, or None on timeout.
fn wait_any(fds: &[&EventFd], timeout: Duration) -> Option<usize> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|f| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `p` is a valid array of `p.len()` pollfds for the duration of the call.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if rc <= 0 {
            return None;
        }
        return p.iter().position(|x| x.revents & libc::POLLIN != 0);
    }
}

struct MsiWiring {
    trigger: Arc<EventFd>,
    ack: Arc<EventFd>,
    vector: u8,
    abort_vector: u8,
}

/// The MSI test source.
pub struct MsiTestSource {
    runner: Runner,
    wiring: Mutex<Option<MsiWiring>>,
    device: Arc<TestDevice>,
}

impl MsiTestSource {
    /// The source's name in the registry.
    pub fn id() -> SourceId {
        SourceId::new("test-irq", 1, 0)
    }

    /// A source not yet attached.
    pub fn new(vm: &Services) -> std::io::Result<MsiTestSource> {
        Ok(MsiTestSource {
            runner: Runner::new(vm, Self::id())?,
            wiring: Mutex::new(None),
            device: Arc::new(TestDevice),
        })
    }

    /// The device reference (tests count its holders).
    pub fn device(&self) -> &Arc<TestDevice> {
        &self.device
    }

    /// `TEST_IRQ_SETUP(vector, abort_vector)`.
    pub fn setup(&self, vector: u64, abort_vector: u64) -> Ret {
        if self.runner.busy() {
            return Ret::err(Status::Busy);
        }
        match self.set_up(vector, abort_vector) {
            Ok(Some(())) => {
                let gsi = self.runner.irqs.msi_gsi(&Self::id()).unwrap_or(0);
                Ret::ok(u64::from(gsi), 0, 0)
            }
            Ok(None) => Ret::err(Status::InvalidArgument),
            Err(e) => {
                tracing::error!("test-irq: set-up failed: {e}");
                Ret::err(Status::Internal)
            }
        }
    }

    /// Wires the source anew: Ok(None) for vectors that cannot be.
    fn set_up(&self, vector: u64, abort_vector: u64) -> Result<Option<()>, String> {
        let (Some(v), Some(abort)) = (msi_vector(vector), abort_msi(abort_vector, vector)) else {
            return Ok(None);
        };
        self.runner.stop();
        self.unwire();
        let w = self.wire(MsiMessage::fixed(0, v), v, u8::try_from(abort_vector).unwrap_or(0))?;
        *self.wiring.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        *self.runner.abort.lock().unwrap_or_else(|e| e.into_inner()) = abort;
        Ok(Some(()))
    }

    fn wire(&self, msi: MsiMessage, vector: u8, abort_vector: u8) -> Result<MsiWiring, String> {
        let trigger = irq::eventfd().map_err(|e| e.to_string())?;
        let writer = Arc::new(trigger.try_clone().map_err(|e| e.to_string())?);
        let ack = Arc::new(irq::eventfd().map_err(|e| e.to_string())?);
        let port = IoAddr::Pio(u64::from(abi::ports::TEST_IRQ_ACK));
        self.runner.io.register_ioevent(&ack, port).map_err(|e| e.to_string())?;
        let source = IrqSource { id: Self::id(), trigger: Trigger::Edge(trigger) };
        if let Err(e) = self.runner.irqs.attach(source, GuestIrq::Msi(msi), self.device.clone()) {
            let _ = self.runner.io.unregister_ioevent(&ack, port);
            return Err(e.to_string());
        }
        Ok(MsiWiring { trigger: writer, ack, vector, abort_vector })
    }

    fn unwire(&self) {
        if let Some(w) = self.wiring.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.runner.irqs.detach(&Self::id());
            let _ = self.runner.io.unregister_ioevent(&w.ack, IoAddr::Pio(u64::from(abi::ports::TEST_IRQ_ACK)));
        }
    }

    /// `TEST_IRQ_FIRE(count, toggles)`.
    pub fn fire(&self, count: u64, toggles: u64) -> Ret {
        self.run(count, toggles, None)
    }

    fn run(&self, count: u64, toggles: u64, from: Option<RunState>) -> Ret {
        let wiring = self.wiring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = wiring.as_ref() else {
            return Ret::err(Status::NotFound);
        };
        if from.is_none() {
            while w.ack.read().is_ok() {} // forget acknowledgements of an earlier run
        }
        let (trigger, ack, wake) = (Arc::clone(&w.trigger), Arc::clone(&w.ack), self.runner.wake.try_clone());
        let Ok(wake) = wake else {
            return Ret::err(Status::Internal);
        };
        drop(wiring);
        self.runner.start(
            count,
            toggles,
            from,
            Box::new(move |p: &Progress, gate: &Gate, fire: bool| {
                if fire && trigger.write(1).is_err() {
                    return false;
                }
                loop {
                    match wait_any(&[&ack, &wake], ACK_TIMEOUT) {
                        Some(0) => {
                            let _ = ack.read();
                            return true;
                        }
                        Some(1) if gate.woken(&wake, &p.stop) => {}
                        _ => return false,
                    }
                }
            }),
        )
    }

    /// `TEST_IRQ_REPORT(counted)`.
    pub fn report(&self, counted: u64) -> Ret {
        self.runner.report(counted)
    }

    /// What the source did.
    pub fn summary(&self) -> TestIrqSummary {
        self.runner.summary()
    }

    /// The source's set-up and run (paused, see [`TestSources::pause`]).
    pub fn save(&self) -> Result<Option<MsiSourceState>, String> {
        let Some((vector, abort_vector, ack)) = self
            .wiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|w| (w.vector, w.abort_vector, Arc::clone(&w.ack)))
        else {
            return Ok(None);
        };
        let mut run = self.runner.save()?;
        // Parked with an interrupt in flight, but the guest acknowledged it before it
        // stopped (the thread had not looked yet): that step is complete.
        if let Some(r) = run.as_mut()
            && r.in_flight
            && wait_any(&[&ack], Duration::ZERO) == Some(0)
        {
            r.in_flight = false;
        }
        Ok(Some(MsiSourceState { vector, abort_vector, run }))
    }

    /// Brings a saved source back: wired again, its run paused where it stopped.
    pub fn restore(&self, s: &MsiSourceState) -> Result<(), String> {
        if let Some(r) = &s.run {
            check_run(r)?;
        }
        if self.set_up(u64::from(s.vector), u64::from(s.abort_vector))?.is_none() {
            return Err(format!("test-irq: vectors {} and {} cannot be set up", s.vector, s.abort_vector));
        }
        match s.run {
            Some(r) => self.runner.go_on(r, |r| self.run(r.count, r.toggles, Some(r))),
            None => Ok(()),
        }
    }
}

impl Drop for MsiTestSource {
    fn drop(&mut self) {
        self.runner.stop();
        self.unwire();
    }
}

fn msi_vector(v: u64) -> Option<u8> {
    u8::try_from(v).ok().filter(|v| *v >= 32)
}

/// The abort MSI: none for 0, else a vector >= 32 different from `vector`.
fn abort_msi(abort: u64, vector: u64) -> Option<Option<MsiMessage>> {
    match abort {
        0 => Some(None),
        v if v != vector => msi_vector(v).map(|v| Some(MsiMessage::fixed(0, v))),
        _ => None,
    }
}

/// The line of the INTx test device, shared with its status port.
#[derive(Debug)]
struct Line {
    asserted: AtomicBool,
    acked: EventFd,
}

/// The INTx status port ([`abi::ports::TEST_INTX_STATUS`]).
struct StatusPort(Arc<Line>);

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = u8::from(self.0.asserted.load(Ordering::Acquire));
        }
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        if self.0.asserted.swap(false, Ordering::AcqRel) {
            let _ = self.0.acked.write(1);
        }
    }
}

struct IntxWiring {
    trigger: Arc<EventFd>,
    resample: Arc<EventFd>,
    gsi: u32,
    abort_vector: u8,
}

/// The level-triggered (INTx) test source.
pub struct IntxTestSource {
    runner: Runner,
    line: Arc<Line>,
    wiring: Mutex<Option<IntxWiring>>,
    device: Arc<TestDevice>,
}

impl IntxTestSource {
    /// The source's name in the registry.
    pub fn id() -> SourceId {
        SourceId::new("test-intx", 0, 0)
    }

    /// A source not yet attached; the VM's port bus gets its status port.
    pub fn new(vm: &Services) -> std::io::Result<IntxTestSource> {
        let line = Arc::new(Line { asserted: AtomicBool::new(false), acked: irq::eventfd()? });
        vm.pio
            .insert(u64::from(abi::ports::TEST_INTX_STATUS), 1, Arc::new(Mutex::new(StatusPort(Arc::clone(&line)))))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(IntxTestSource {
            runner: Runner::new(vm, Self::id())?,
            line,
            wiring: Mutex::new(None),
            device: Arc::new(TestDevice),
        })
    }

    /// The device reference (tests count its holders).
    pub fn device(&self) -> &Arc<TestDevice> {
        &self.device
    }

    /// `TEST_INTX_SETUP(gsi, abort_vector)`.
    pub fn setup(&self, gsi: u64, abort_vector: u64) -> Ret {
        if self.runner.busy() {
            return Ret::err(Status::Busy);
        }
        match self.set_up(gsi, abort_vector) {
            Ok(Some(gsi)) => Ret::ok(u64::from(gsi), 0, 0),
            Ok(None) => Ret::err(Status::InvalidArgument),
            Err(e) => {
                tracing::error!("test-intx: set-up failed: {e}");
                Ret::err(Status::Internal)
            }
        }
    }

    /// Wires the source anew: Ok(None) for a pin or vector that cannot be.
    fn set_up(&self, gsi: u64, abort_vector: u64) -> Result<Option<u32>, String> {
        let Some(abort) = abort_msi(abort_vector, 0) else {
            return Ok(None);
        };
        let Some(gsi) = u32::try_from(gsi).ok().filter(|g| {
            *g < abi::layout::IOAPIC_PINS && *g != abi::ports::SERIAL_GSI && *g != abi::layout::acpi_hotplug::GSI
        }) else {
            return Ok(None);
        };
        self.runner.stop();
        self.unwire();
        self.line.asserted.store(false, Ordering::Release);
        let w = self.wire(gsi, u8::try_from(abort_vector).unwrap_or(0))?;
        *self.wiring.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        *self.runner.abort.lock().unwrap_or_else(|e| e.into_inner()) = abort;
        Ok(Some(gsi))
    }

    fn wire(&self, gsi: u32, abort_vector: u8) -> Result<IntxWiring, String> {
        let trigger = irq::eventfd().map_err(|e| e.to_string())?;
        let resample = irq::eventfd().map_err(|e| e.to_string())?;
        let w = IntxWiring {
            trigger: Arc::new(trigger.try_clone().map_err(|e| e.to_string())?),
            resample: Arc::new(resample.try_clone().map_err(|e| e.to_string())?),
            gsi,
            abort_vector,
        };
        let source = IrqSource { id: Self::id(), trigger: Trigger::Level { trigger, resample } };
        self.runner.irqs.attach(source, GuestIrq::Level(gsi), self.device.clone()).map_err(|e| e.to_string())?;
        Ok(w)
    }

    fn unwire(&self) {
        if self.wiring.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
            let _ = self.runner.irqs.detach(&Self::id());
        }
    }

    /// `TEST_INTX_FIRE(count, toggles)`.
    pub fn fire(&self, count: u64, toggles: u64) -> Ret {
        self.run(count, toggles, None)
    }

    fn run(&self, count: u64, toggles: u64, from: Option<RunState>) -> Ret {
        let wiring = self.wiring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = wiring.as_ref() else {
            return Ret::err(Status::NotFound);
        };
        let (trigger, resample, line) = (Arc::clone(&w.trigger), Arc::clone(&w.resample), Arc::clone(&self.line));
        let Ok(wake) = self.runner.wake.try_clone() else {
            return Ret::err(Status::Internal);
        };
        drop(wiring);
        if from.is_none() {
            while line.acked.read().is_ok() {}
        }
        self.runner.start(
            count,
            toggles,
            from,
            Box::new(move |p: &Progress, gate: &Gate, fire: bool| {
                if fire {
                    line.asserted.store(true, Ordering::Release);
                }
                // A restored line still asserted is raised again on the new irqchip.
                if (fire || line.asserted.load(Ordering::Acquire)) && trigger.write(1).is_err() {
                    return false;
                }
                // Until the guest deasserts, re-raise the line on every resample that
                // finds it still asserted. KVM signals the resample at every EOI of the
                // pin and lowers the line there, whichever assertion the EOI belonged
                // to, so no resample may be ignored (VFIO unmasks INTx the same way);
                // the price is an occasional spurious interrupt that finds the line
                // already deasserted.
                loop {
                    match wait_any(&[&line.acked, &resample, &wake], ACK_TIMEOUT) {
                        Some(0) => {
                            let _ = line.acked.read();
                            return true;
                        }
                        Some(1) => {
                            // The count is the number of EOIs (and switch re-checks)
                            // since the last read.
                            p.resamples.fetch_add(resample.read().unwrap_or(0), Ordering::AcqRel);
                            if line.asserted.load(Ordering::Acquire) && trigger.write(1).is_err() {
                                return false;
                            }
                        }
                        Some(2) if gate.woken(&wake, &p.stop) => {}
                        _ => return false,
                    }
                }
            }),
        )
    }

    /// `TEST_INTX_REPORT(counted)`.
    pub fn report(&self, counted: u64) -> Ret {
        self.runner.report(counted)
    }

    /// What the source did.
    pub fn summary(&self) -> TestIrqSummary {
        self.runner.summary()
    }

    /// The source's set-up, line and run (paused, see [`TestSources::pause`]).
    pub fn save(&self) -> Result<Option<IntxSourceState>, String> {
        let Some((gsi, abort_vector)) =
            self.wiring.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|w| (w.gsi, w.abort_vector))
        else {
            return Ok(None);
        };
        let run = self.runner.save()?;
        Ok(Some(IntxSourceState { gsi, abort_vector, asserted: self.line.asserted.load(Ordering::Acquire), run }))
    }

    /// Brings a saved source back: wired again, its line as it was, its run paused
    /// where it stopped (the line is raised again when it goes on).
    pub fn restore(&self, s: &IntxSourceState) -> Result<(), String> {
        if let Some(r) = &s.run {
            check_run(r)?;
        }
        if self.set_up(u64::from(s.gsi), u64::from(s.abort_vector))?.is_none() {
            return Err(format!("test-intx: pin {} and vector {} cannot be set up", s.gsi, s.abort_vector));
        }
        self.line.asserted.store(s.asserted, Ordering::Release);
        // A line the guest cleared completed its step (its acknowledgement is that).
        match s.run.map(|r| RunState { in_flight: r.in_flight && s.asserted, ..r }) {
            Some(r) => self.runner.go_on(r, |r| self.run(r.count, r.toggles, Some(r))),
            None => Ok(()),
        }
    }
}

impl Drop for IntxTestSource {
    fn drop(&mut self) {
        self.runner.stop();
        self.unwire();
    }
}
