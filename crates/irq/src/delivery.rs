//! The VMM's delivery thread: one per registry, an epoll over the eventfds of sources
//! in VMM mode. For each event it reads the eventfd under the registry's state lock
//! (so it never overlaps a mode switch of the same source) and injects one interrupt,
//! whatever the counter held (a device cannot turn one write of 2^64-2 into as many
//! interrupts), with only the injection lock held.

use crate::chip::{GuestIrq, IrqChip};
use crate::source::SourceId;
use crate::state::{Entry, State};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What an epoll event means.
#[derive(Clone, Debug)]
pub(crate) enum Token {
    /// Stop the thread.
    Stop,
    /// A source's trigger fired.
    Trigger(SourceId),
    /// The guest EOI'd a level source delivered through its relay.
    Resample(SourceId),
}

/// Epoll tokens: the last number handed out, number -> meaning, fd -> number.
#[derive(Default)]
struct Tokens {
    last: u64,
    by_number: HashMap<u64, Token>,
    by_fd: HashMap<RawFd, u64>,
}

pub(crate) struct Shared {
    pub(crate) chip: Arc<dyn IrqChip>,
    state: Mutex<State>,
    /// Held by the delivery thread while it injects (taken before it lets the state
    /// lock go); teardown takes it to wait for an injection in flight. Order: state ->
    /// injection.
    injection: Mutex<()>,
    epoll: Epoll,
    tokens: Mutex<Tokens>,
    /// Sources that could not be watched (epoll_ctl failed): polled every millisecond.
    fallback: Mutex<BTreeSet<SourceId>>,
    tid: AtomicI32,
}

impl Shared {
    pub(crate) fn new(chip: Arc<dyn IrqChip>) -> io::Result<Shared> {
        Ok(Shared {
            chip,
            state: Mutex::new(State { entries: HashMap::new(), gsi_used: BTreeSet::new() }),
            injection: Mutex::new(()),
            epoll: Epoll::new()?,
            tokens: Mutex::new(Tokens::default()),
            fallback: Mutex::new(BTreeSet::new()),
            tid: AtomicI32::new(0),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn injecting(&self) -> MutexGuard<'_, ()> {
        self.injection.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn watch(&self, fd: RawFd, token: Token) -> io::Result<()> {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        t.last += 1;
        let n = t.last;
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, n))?;
        t.by_number.insert(n, token);
        t.by_fd.insert(fd, n);
        Ok(())
    }

    pub(crate) fn unwatch(&self, fd: RawFd) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.by_fd.remove(&fd) {
            t.by_number.remove(&n);
            if let Err(e) = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()) {
                tracing::error!("irq delivery: epoll delete of fd {fd}: {e}");
            }
        }
    }

    pub(crate) fn poll_fallback(&self, id: &SourceId) {
        self.fallback.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone());
    }

    pub(crate) fn clear_poll_fallback(&self, id: &SourceId) {
        self.fallback.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn token(&self, n: u64) -> Option<Token> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).by_number.get(&n).cloned()
    }

    /// CPU time of the delivery thread (ns), from /proc/self/task/TID/schedstat.
    pub(crate) fn thread_cpu_ns(&self) -> u64 {
        let tid = self.tid.load(Ordering::Acquire);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }
}

/// Reads an eventfd's count without blocking (0 if nothing is pending).
pub(crate) fn drain(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

/// Where one VMM-path injection goes, captured under the state lock.
pub(crate) enum Target {
    Msi(crate::MsiMessage),
    Edge(u32),
    Level(Arc<EventFd>),
}

/// Records one delivery of `entry` (however many signals its eventfd counted: as KVM's
/// irqfd does, one wake-up is one interrupt) and says where it goes.
pub(crate) fn target(entry: &mut Entry) -> Option<Target> {
    if entry.masked {
        entry.pending = true;
        return None;
    }
    let t = match entry.guest {
        GuestIrq::Msi(msi) => Target::Msi(msi),
        GuestIrq::Edge(gsi) => Target::Edge(gsi),
        // A level line is raised once however often the device wrote; KVM lowers it
        // at the guest's EOI and the relay's resample tells us.
        GuestIrq::Level(_) => Target::Level(Arc::clone(&entry.relay.as_ref()?.trigger)),
    };
    entry.vmm_delivered += 1;
    Some(t)
}

/// Injects one interrupt.
pub(crate) fn inject(chip: &dyn IrqChip, target: &Target) -> io::Result<()> {
    match target {
        Target::Msi(msi) => chip.signal_msi(*msi),
        Target::Edge(gsi) => {
            chip.set_irq_line(*gsi, true)?;
            chip.set_irq_line(*gsi, false)
        }
        Target::Level(relay) => relay.write(1),
    }
}

/// Delivers what `entry` has pending now, with the state lock held (mode switches).
pub(crate) fn deliver_pending(shared: &Shared, entry: &mut Entry) {
    if drain(entry.source.trigger_fd()) > 0
        && let Some(t) = target(entry)
        && let Err(e) = inject(shared.chip.as_ref(), &t)
    {
        tracing::error!("IRQ source {}: VMM delivery failed: {e}", entry.source.id);
    }
}

fn handle(shared: &Shared, token: &Token) {
    let mut st = shared.lock();
    match token {
        Token::Stop => {}
        Token::Trigger(id) => {
            let Some(entry) = st.entries.get_mut(id) else { return };
            if drain(entry.source.trigger_fd()) == 0 {
                return;
            }
            let Some(t) = target(entry) else { return };
            // Hand over from the state lock to the injection lock: registry calls go on
            // while we inject, and a detach waits for this injection before it returns.
            let guard = shared.injecting();
            drop(st);
            if let Err(e) = inject(shared.chip.as_ref(), &t) {
                tracing::error!("IRQ source {id}: VMM delivery failed: {e}");
            }
            drop(guard);
        }
        Token::Resample(id) => {
            // Forward the EOI count as read: the device learns of every EOI.
            if let Some(entry) = st.entries.get_mut(id)
                && let Some(relay) = &entry.relay
                && let n = drain(&relay.resample)
                && n > 0
                && let Some(r) = entry.source.resample_fd()
                && let Err(e) = r.write(n)
            {
                tracing::error!("IRQ source {id}: forwarding the EOI to the device: {e}");
            }
        }
    }
}

/// The thread's body.
pub(crate) fn run(shared: &Shared) {
    // SAFETY: gettid has no arguments and cannot fail.
    shared.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let polling = !shared.fallback.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        let n = match shared.epoll.wait(if polling { 1 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("irq delivery: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match shared.token(ev.data()) {
                Some(Token::Stop) => return,
                Some(t) => handle(shared, &t),
                None => {} // unwatched after the event was queued
            }
        }
        if polling {
            let ids: Vec<SourceId> =
                shared.fallback.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
            for id in ids {
                handle(shared, &Token::Trigger(id));
            }
        }
    }
}
