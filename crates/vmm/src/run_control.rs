//! Pause and resume, and the vCPU exit counters.
//!
//! `pause` asks the vCPU to stop and kicks it out of KVM_RUN with a signal
//! ([`kick_signal`], SIGRTMIN+2 with a no-op handler: KVM_RUN returns EINTR); the vCPU parks at the
//! top of its loop, between two guest instructions, and acknowledges. A signal that
//! lands just before the vCPU enters KVM_RUN would be lost, so the kick repeats until
//! the acknowledgement or [`PAUSE_DEADLINE`]. The vCPU thread registers itself while it
//! runs, and deregisters under the same lock the kicker holds, so a kick never targets
//! a thread that has ended. Without a running vCPU (qtest, or before the guest starts)
//! a pause takes effect at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long `pause` waits for the vCPU to stop.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(2);
/// Interval between kicks while a pause is pending.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// The signal that kicks the vCPU out of KVM_RUN (SIGRTMIN + 2; the handler does
/// nothing).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

/// Whether the machine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Running (or ready to).
    Running,
    /// Paused by the operator.
    Paused,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        })
    }
}

/// Why a pause or resume did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    /// Already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// Not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// The vCPU did not stop in time (the pause was withdrawn).
    #[error("the vCPU did not stop within {0:?}; the VM goes on running")]
    Timeout(Duration),
    /// No vCPU runs (qtest, or the guest has not started or has ended).
    #[error("no vCPU is running")]
    NoVcpu,
}

/// Work for the parked vCPU thread: it gets the vCPU (`kvm_ioctls::VcpuFd`) as `Any`.
type Job = Box<dyn FnOnce(&mut dyn std::any::Any) + Send>;

#[derive(Default)]
struct State {
    /// The operator asked for a pause and has not resumed.
    requested: bool,
    /// The vCPU is parked.
    parked: bool,
    /// The running vCPU's thread.
    vcpu: Option<libc::pthread_t>,
    /// When the current pause took effect.
    since: Option<Instant>,
    /// Work the parked vCPU runs on its own thread (saving its state).
    jobs: Vec<Job>,
    /// Quick work the running vCPU does between two KVM_RUNs without parking (a
    /// register read for `vm.info`): no pause, no device stopped.
    asks: Vec<Job>,
}

/// Pause and resume of the machine.
#[derive(Default)]
pub struct RunControl {
    state: Mutex<State>,
    changed: Condvar,
    /// Mirrors `state.requested` for the vCPU's lock-free check on every exit.
    pending: AtomicBool,
    /// True while `state.asks` holds work (the vCPU's other lock-free check).
    asked: AtomicBool,
    pauses: AtomicU64,
    paused_ns: AtomicU64,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl RunControl {
    /// A running machine.
    pub fn new() -> RunControl {
        RunControl::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        if self.lock().requested { RunState::Paused } else { RunState::Running }
    }

    /// Pauses taken so far, and the total time spent paused (ended pauses).
    pub fn pauses(&self) -> (u64, Duration) {
        (self.pauses.load(Ordering::Relaxed), Duration::from_nanos(self.paused_ns.load(Ordering::Relaxed)))
    }

    /// Stops the vCPU at an instruction boundary; returns once it is parked (or at
    /// once when no vCPU runs). On timeout the request is withdrawn.
    pub fn pause(&self) -> Result<(), RunError> {
        let mut s = self.lock();
        if s.requested {
            return Err(RunError::AlreadyPaused);
        }
        s.requested = true;
        self.pending.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_DEADLINE;
        while s.vcpu.is_some() && !s.parked {
            if Instant::now() >= deadline {
                s.requested = false;
                self.pending.store(false, Ordering::SeqCst);
                self.changed.notify_all();
                return Err(RunError::Timeout(PAUSE_DEADLINE));
            }
            kick(&s);
            s = self.changed.wait_timeout(s, KICK_INTERVAL).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.since = Some(Instant::now());
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<(), RunError> {
        let mut s = self.lock();
        if !s.requested {
            return Err(RunError::NotPaused);
        }
        s.requested = false;
        self.pending.store(false, Ordering::SeqCst);
        // Work not run by now never will be: its callers stop waiting.
        s.jobs.clear();
        if let Some(t) = s.since.take() {
            self.paused_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Wakes the vCPU wherever it waits (parked, or in KVM_RUN), e.g. to see an exit
    /// request.
    pub fn wake(&self) {
        let s = self.lock();
        self.changed.notify_all();
        kick(&s);
    }

    /// Runs `f` on the parked vCPU's thread with the vCPU (as `Any`: a
    /// `kvm_ioctls::VcpuFd`), and returns its result. The VM must be paused.
    pub fn on_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn std::any::Any) -> R + Send + 'static,
    ) -> Result<R, RunError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut s = self.lock();
            if !s.requested {
                return Err(RunError::NotPaused);
            }
            if s.vcpu.is_none() {
                return Err(RunError::NoVcpu);
            }
            s.jobs.push(Box::new(move |v| {
                let _ = tx.send(f(v));
            }));
            self.changed.notify_all();
        }
        match rx.recv_timeout(PAUSE_DEADLINE) {
            Ok(r) => Ok(r),
            // Dropped unrun: the pause ended or the vCPU left first.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(RunError::NotPaused),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(RunError::Timeout(PAUSE_DEADLINE)),
        }
    }

    /// Runs `f` on the vCPU's thread with the vCPU between two of its KVM_RUNs, without
    /// a pause (nothing parks, no device stops, no pause is counted): for quick reads
    /// of vCPU state. Waits at most `within` (a vCPU busy in a device call does not
    /// hold the caller); a paused vCPU runs it while parked.
    pub fn ask<R: Send + 'static>(
        &self,
        within: Duration,
        f: impl FnOnce(&mut dyn std::any::Any) -> R + Send + 'static,
    ) -> Result<R, RunError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |v| {
            let _ = tx.send(f(v));
        });
        let deadline = Instant::now() + within;
        {
            let mut s = self.lock();
            if s.vcpu.is_none() {
                return Err(RunError::NoVcpu);
            }
            if s.requested {
                s.jobs.push(job);
                self.changed.notify_all();
            } else {
                s.asks.push(job);
                self.asked.store(true, Ordering::SeqCst);
                kick(&s);
            }
        }
        loop {
            // A kick that landed just before KVM_RUN is lost: repeat it.
            match rx.recv_timeout(KICK_INTERVAL.min(deadline.saturating_duration_since(Instant::now()))) {
                Ok(r) => return Ok(r),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(RunError::NoVcpu),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(RunError::Timeout(within));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => kick(&self.lock()),
            }
        }
    }

    /// The vCPU's other check on every loop: runs the work [`RunControl::ask`] posted.
    /// One atomic load when there is none.
    pub(crate) fn serve_asks(&self, vcpu: &mut dyn std::any::Any) {
        if !self.asked.load(Ordering::Acquire) {
            return;
        }
        let asks = {
            let mut s = self.lock();
            self.asked.store(false, Ordering::SeqCst);
            std::mem::take(&mut s.asks)
        };
        for job in asks {
            job(vcpu);
        }
    }

    /// Called by the vCPU thread before it first enters the guest: kicks may now
    /// target it.
    pub(crate) fn vcpu_started(&self) {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        HANDLER.call_once(|| match vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            Ok(()) => INSTALLED.store(true, Ordering::Release),
            Err(e) => tracing::warn!("cannot install the vCPU kick handler ({e}): pauses wait for the next exit"),
        });
        // Without the handler a kick would kill the process: the thread is not
        // registered then, and pauses take effect at the vCPU's next exit.
        if INSTALLED.load(Ordering::Acquire) {
            // SAFETY: pthread_self has no preconditions.
            self.lock().vcpu = Some(unsafe { libc::pthread_self() });
        }
    }

    /// Called by the vCPU thread as it leaves its loop (any way): no kick targets it
    /// after this returns.
    pub(crate) fn vcpu_stopped(&self) {
        let mut s = self.lock();
        s.vcpu = None;
        s.parked = false;
        s.jobs.clear();
        s.asks.clear();
        self.asked.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// True while a pause is requested (one atomic load: the vCPU's check per exit).
    pub(crate) fn pause_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The vCPU's check on every loop: parks while a pause is requested and `stop()`
    /// is false, running the jobs posted meanwhile with `vcpu`. Costs one atomic load
    /// when no pause is pending.
    pub(crate) fn checkpoint(&self, vcpu: &mut dyn std::any::Any, stop: impl Fn() -> bool) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        s.parked = true;
        self.changed.notify_all();
        while s.requested && !stop() {
            if let Some(job) = s.jobs.pop() {
                drop(s);
                job(vcpu);
                s = self.lock();
                continue;
            }
            s = self.changed.wait_timeout(s, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.parked = false;
        s.jobs.clear();
    }
}

/// Signals the registered vCPU thread (the caller holds the state lock, so the thread
/// cannot deregister and end meanwhile).
fn kick(s: &State) {
    if let Some(t) = s.vcpu {
        // SAFETY: `t` is a live thread: it deregisters under the lock held by the
        // caller before it ends. The kick signal has a handler installed.
        unsafe { libc::pthread_kill(t, kick_signal()) };
    }
}

/// vCPU exits by kind.
#[derive(Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes (not the hypercall port).
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Hypercalls (writes to the hypercall port).
    pub hypercall: AtomicU64,
    /// KVM_RUN interrupted by a signal (kicks).
    pub interrupted: AtomicU64,
}

impl ExitCounters {
    /// `(kind, count)` for every kind.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", l(&self.io_in)),
            ("io_out", l(&self.io_out)),
            ("mmio_read", l(&self.mmio_read)),
            ("mmio_write", l(&self.mmio_write)),
            ("hypercall", l(&self.hypercall)),
            ("interrupted", l(&self.interrupted)),
        ]
    }

    /// Adds one to `c`. The vCPU thread is the only writer, so a plain load and store
    /// suffice (no locked read-modify-write on every exit); readers see a count that is
    /// at most one behind.
    pub(crate) fn bump(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn without_a_vcpu_pause_and_resume_take_effect_at_once_and_are_not_repeated() {
        let rc = RunControl::new();
        assert_eq!(rc.resume(), Err(RunError::NotPaused));
        rc.pause().unwrap();
        assert_eq!(rc.state(), RunState::Paused);
        assert_eq!(rc.pause(), Err(RunError::AlreadyPaused));
        rc.resume().unwrap();
        assert_eq!((rc.state(), rc.pauses().0), (RunState::Running, 1));
    }

    /// A thread standing for the vCPU: runs (counts loops) with a check between two
    /// runs. While paused the count must not move, and every pause must be
    /// acknowledged; many times, so a vCPU that goes on after acknowledging shows.
    #[test]
    fn a_pause_holds_a_running_vcpu_still_until_resume() {
        let rc = Arc::new(RunControl::new());
        let stop = Arc::new(AtomicBool::new(false));
        let loops = Arc::new(AtomicU64::new(0));
        let (r, s, l) = (Arc::clone(&rc), Arc::clone(&stop), Arc::clone(&loops));
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            r.vcpu_started();
            tx.send(()).unwrap();
            while !s.load(Ordering::SeqCst) {
                r.checkpoint(&mut (), || s.load(Ordering::SeqCst));
                l.fetch_add(1, Ordering::SeqCst);
                // As KVM_RUN: the guest runs a little, then the next exit.
                std::thread::sleep(Duration::from_micros(20));
            }
            r.vcpu_stopped();
        });
        rx.recv().unwrap();
        for _ in 0..200 {
            rc.pause().unwrap();
            // Work posted to the parked vCPU runs on its thread.
            let (ctx, thread) = rc.on_vcpu(|v| (v.is::<()>(), std::thread::current().id())).unwrap();
            assert!(ctx && thread != std::thread::current().id(), "ran on the vCPU thread with its context");
            let frozen = loops.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(loops.load(Ordering::SeqCst), frozen, "the vCPU ran while paused");
            rc.resume().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        rc.wake();
        // The vCPU may be back in pause(): keep waking it until it leaves.
        while !vcpu.is_finished() {
            rc.wake();
            std::thread::sleep(Duration::from_millis(1));
        }
        vcpu.join().unwrap();
        assert_eq!(rc.pauses().0, 200);
    }
}
