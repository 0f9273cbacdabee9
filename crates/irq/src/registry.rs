//! The per-VM forwarding registry.
//!
//! Switching modes without losing an interrupt relies on how KVM's irqfd consumes the
//! eventfd: while an irqfd is assigned, every write is consumed (and injected) at
//! once, so a deassigned irqfd leaves nothing stranded, and a count pending when an
//! irqfd is assigned is injected by KVM at assignment. Hence:
//!
//! - forward: stop watching in the VMM, drain and inject what is pending, assign the
//!   irqfd (a write landing between drain and assignment is injected by KVM);
//! - unforward: deassign the irqfd, start watching (a pending count wakes the VMM's
//!   delivery thread at once).
//!
//! For level-triggered sources the line state is carried over instead: deassigning a
//! resample irqfd lowers the line, so after every switch the registry asks the device
//! to re-check its line (a resample); a line still high is raised again on the new path.

use crate::chip::{GuestIrq, IrqChip};
use crate::delivery::{self, Shared, Token};
use crate::source::{IrqSource, SourceId, Trigger};
use crate::state::{Entry, Mode, Relay, State};
use std::any::Any;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// Errors of the registry's fallible operations (attach, forward, lookups).
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The source is attached already.
    #[error("IRQ source {0} is already attached")]
    AlreadyAttached(SourceId),
    /// No source of that name is attached.
    #[error("IRQ source {0} is not attached")]
    Unknown(SourceId),
    /// The source is forwarded already.
    #[error("IRQ source {0} is already forwarded")]
    AlreadyForwarded(SourceId),
    /// The guest IRQ does not suit the source's trigger.
    #[error("IRQ source {0}: {1}")]
    Mismatch(SourceId, &'static str),
    /// All MSI GSIs are in use.
    #[error("no free GSI for the MSI route of {0}")]
    NoGsi(SourceId),
    /// The hypervisor refused an operation.
    #[error("IRQ source {id}: {op} failed: {source}")]
    Chip {
        /// The source.
        id: SourceId,
        /// The operation.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// What one source has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceStats {
    /// Current mode.
    pub mode: Mode,
    /// Interrupts the VMM delivered itself.
    pub vmm_delivered: u64,
    /// Mode switches.
    pub switches: u64,
}

/// Resources the registry holds (for leak checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqCounts {
    /// Attached sources.
    pub sources: usize,
    /// Of which forwarded.
    pub forwarded: usize,
    /// irqfds assigned in KVM (forwarded sources and level relays).
    pub irqfds: usize,
    /// Eventfds the delivery thread watches.
    pub watched: usize,
    /// MSI routes held.
    pub msi_routes: usize,
}

/// The interrupt-forwarding registry of one VM.
pub struct IrqRegistry {
    shared: Arc<Shared>,
    default_mode: Mode,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Told of every switch of a source's mode (after it happened, no lock held).
    on_switch: std::sync::RwLock<Option<SwitchHook>>,
}

/// What [`IrqRegistry::on_switch`] calls: the source and its new mode.
pub type SwitchHook = Arc<dyn Fn(&SourceId, Mode) + Send + Sync>;

impl IrqRegistry {
    /// A registry over `chip`; sources attach in `default_mode` unless told otherwise.
    pub fn new(chip: Arc<dyn IrqChip>, default_mode: Mode) -> io::Result<IrqRegistry> {
        let stop = crate::eventfd()?;
        let shared = Arc::new(Shared::new(chip)?);
        shared.watch(stop.as_raw_fd(), Token::Stop)?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("irq-delivery".into()).spawn(move || delivery::run(&s))?;
        Ok(IrqRegistry { shared, default_mode, stop, thread: Some(thread), on_switch: std::sync::RwLock::new(None) })
    }

    /// Calls `hook` after every switch of a source between forwarded and VMM delivery
    /// (an operator's, a restore's, a test source's), with no registry lock held. It
    /// must not block.
    pub fn on_switch(&self, hook: SwitchHook) {
        *self.on_switch.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn switched(&self, id: &SourceId, mode: Mode) {
        let hook = self.on_switch.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(id, mode);
        }
    }

    /// The mode sources attach in by default.
    pub fn default_mode(&self) -> Mode {
        self.default_mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn chip_err<'a>(id: &'a SourceId, op: &'static str) -> impl FnOnce(io::Error) -> IrqError + 'a {
        move |source| IrqError::Chip { id: id.clone(), op, source }
    }

    /// Attaches `source` to `guest` in the default mode, holding `owner` (the device)
    /// until it is detached.
    pub fn attach(
        &self,
        source: IrqSource,
        guest: GuestIrq,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), IrqError> {
        self.attach_in(source, guest, owner, self.default_mode)
    }

    /// Attaches `source` in `mode`.
    pub fn attach_in(
        &self,
        source: IrqSource,
        guest: GuestIrq,
        owner: Arc<dyn Any + Send + Sync>,
        mode: Mode,
    ) -> Result<(), IrqError> {
        let id = source.id.clone();
        match (&source.trigger, guest) {
            (Trigger::Level { .. }, GuestIrq::Level(_)) | (Trigger::Edge(_), GuestIrq::Msi(_) | GuestIrq::Edge(_)) => {}
            (Trigger::Level { .. }, _) => {
                return Err(IrqError::Mismatch(id, "a level source needs a level guest IRQ"));
            }
            (Trigger::Edge(_), _) => {
                return Err(IrqError::Mismatch(id, "an edge source cannot drive a level guest IRQ"));
            }
        }
        set_nonblocking(source.trigger_fd()).map_err(Self::chip_err(&id, "setting O_NONBLOCK"))?;
        let mut st = self.lock();
        if st.entries.contains_key(&id) {
            return Err(IrqError::AlreadyAttached(id));
        }
        let mut entry = Entry {
            source,
            guest,
            gsi: None,
            mode,
            relay: None,
            _owner: owner,
            vmm_delivered: 0,
            switches: 0,
            masked: false,
            pending: false,
            parked: false,
        };
        if let GuestIrq::Msi(msi) = guest {
            let chip = &self.shared.chip;
            let first = chip.first_msi_gsi();
            let gsi =
                (first..chip.gsi_count()).find(|g| !st.gsi_used.contains(g)).ok_or(IrqError::NoGsi(id.clone()))?;
            chip.set_msi_route(gsi, msi).map_err(Self::chip_err(&id, "setting the MSI route"))?;
            st.gsi_used.insert(gsi);
            entry.gsi = Some(gsi);
        }
        let started = match mode {
            Mode::Forwarded => self.start_forwarded(&mut entry),
            Mode::Vmm => self.start_vmm(&mut entry),
        };
        if let Err(e) = started {
            self.release_route(&mut st, &mut entry);
            return Err(e);
        }
        st.entries.insert(id, entry);
        Ok(())
    }

    /// Hands `id` to KVM. Forwarding twice, or an unknown source, is an error.
    pub fn forward(&self, id: &SourceId) -> Result<(), IrqError> {
        self.forward_locked(id)?;
        self.switched(id, Mode::Forwarded);
        Ok(())
    }

    fn forward_locked(&self, id: &SourceId) -> Result<(), IrqError> {
        let mut st = self.lock();
        let entry = st.entries.get_mut(id).ok_or_else(|| IrqError::Unknown(id.clone()))?;
        if entry.mode == Mode::Forwarded {
            return Err(IrqError::AlreadyForwarded(id.clone()));
        }
        if entry.masked {
            // Stays with the VMM until unmasked; forwarded then.
            entry.mode = Mode::Forwarded;
            entry.parked = true;
            entry.switches += 1;
            return Ok(());
        }
        self.stop_vmm(entry);
        if let Err(e) = self.start_forwarded(entry) {
            // Stay with the VMM: the source keeps working.
            if let Err(e2) = self.start_vmm(entry) {
                tracing::error!("IRQ source {id}: back to VMM delivery failed too: {e2}");
            }
            return Err(e);
        }
        entry.mode = Mode::Forwarded;
        entry.switches += 1;
        kick_resample(entry);
        Ok(())
    }

    /// Hands `id` back to the VMM. An unknown source is an error; for a known one this
    /// cannot fail (a source already with the VMM stays there).
    pub fn unforward(&self, id: &SourceId) -> Result<(), IrqError> {
        if self.unforward_locked(id)? {
            self.switched(id, Mode::Vmm);
        }
        Ok(())
    }

    /// True if it switched.
    fn unforward_locked(&self, id: &SourceId) -> Result<bool, IrqError> {
        let mut st = self.lock();
        let entry = st.entries.get_mut(id).ok_or_else(|| IrqError::Unknown(id.clone()))?;
        if entry.mode == Mode::Vmm {
            return Ok(false);
        }
        if entry.parked {
            // Masked: already watched by the VMM.
            entry.parked = false;
            entry.mode = Mode::Vmm;
            entry.switches += 1;
            return Ok(true);
        }
        self.stop_forwarded(entry);
        if let Err(e) = self.start_vmm(entry) {
            // Only watching the eventfd can fail here (epoll_ctl: out of memory). The
            // source must not go silent: the delivery thread polls unwatched sources.
            tracing::error!("IRQ source {id}: VMM delivery set-up failed ({e}); falling back to polling");
            self.shared.poll_fallback(id);
        }
        entry.mode = Mode::Vmm;
        entry.switches += 1;
        kick_resample(entry);
        Ok(true)
    }

    /// Switches `id` to `mode`. A source already in `mode` is left alone.
    pub fn set_mode(&self, id: &SourceId, mode: Mode) -> Result<(), IrqError> {
        match mode {
            Mode::Forwarded => match self.forward(id) {
                Err(IrqError::AlreadyForwarded(_)) => Ok(()),
                r => r,
            },
            Mode::Vmm => self.unforward(id),
        }
    }

    /// Makes every edge or MSI interrupt signalled before the call reach the irqchip
    /// (a paused VM's local APIC is read next): what VMM-delivered sources have pending
    /// is injected now, and an injection the delivery thread has in flight is waited
    /// for; forwarded sources have their irqfd deassigned and assigned again, which
    /// waits for KVM's injection work (a count left in between is injected at
    /// assignment, as in a switch). Level lines are states the devices keep, not
    /// events: they are left alone.
    pub fn settle(&self) {
        let mut st = self.lock();
        for entry in st.entries.values_mut() {
            if matches!(entry.guest, GuestIrq::Level(_)) {
                continue;
            }
            if entry.mode == Mode::Forwarded && !entry.parked {
                self.stop_forwarded(entry);
                self.forward_or_fall_back(entry, "settling");
            } else {
                delivery::deliver_pending(&self.shared, entry);
            }
        }
        drop(self.shared.injecting());
    }

    /// Masks or unmasks `id` (an MSI-X vector's mask bit, an MSI mask bit, INTx
    /// disable). While masked nothing is injected and an interrupt that arrives is kept
    /// pending; unmasking delivers a pending one. A forwarded source is watched by the
    /// VMM while masked (KVM would inject it) and forwarded again at unmask.
    pub fn set_masked(&self, id: &SourceId, masked: bool) -> Result<(), IrqError> {
        let mut st = self.lock();
        let entry = st.entries.get_mut(id).ok_or_else(|| IrqError::Unknown(id.clone()))?;
        if entry.masked == masked {
            return Ok(());
        }
        if masked {
            entry.masked = true;
            if entry.mode == Mode::Forwarded {
                self.stop_forwarded(entry);
                if let Err(e) = self.start_vmm(entry) {
                    tracing::error!("IRQ source {id}: watching it while masked failed ({e}); polling it");
                    self.shared.poll_fallback(id);
                }
                entry.parked = true;
            }
            return Ok(());
        }
        entry.masked = false;
        if entry.pending {
            entry.pending = false;
            match entry.guest {
                GuestIrq::Level(_) => {}
                _ => {
                    if let Some(t) = delivery::target(entry)
                        && let Err(e) = delivery::inject(self.shared.chip.as_ref(), &t)
                    {
                        tracing::error!("IRQ source {id}: delivering a pending interrupt: {e}");
                    }
                }
            }
        }
        if entry.parked {
            entry.parked = false;
            self.stop_vmm(entry);
            self.forward_or_fall_back(entry, "unmask");
        }
        // A level line still asserted is raised again on the path now in use.
        kick_resample(entry);
        Ok(())
    }

    /// True if `id` is masked with an interrupt pending (the MSI-X PBA bit).
    pub fn is_pending(&self, id: &SourceId) -> bool {
        self.lock().entries.get(id).is_some_and(|e| e.pending)
    }

    /// Changes the MSI message of an attached MSI source (the guest reprogrammed it).
    pub fn set_msi(&self, id: &SourceId, msi: crate::MsiMessage) -> Result<(), IrqError> {
        let mut st = self.lock();
        let entry = st.entries.get_mut(id).ok_or_else(|| IrqError::Unknown(id.clone()))?;
        let (GuestIrq::Msi(_), Some(gsi)) = (entry.guest, entry.gsi) else {
            return Err(IrqError::Mismatch(id.clone(), "not an MSI source"));
        };
        self.shared.chip.set_msi_route(gsi, msi).map_err(Self::chip_err(id, "updating the MSI route"))?;
        entry.guest = GuestIrq::Msi(msi);
        Ok(())
    }

    /// Detaches `id`: nothing more is delivered, its irqfd, route and watch are gone,
    /// and its device reference is dropped. An unknown source is an error; for a known
    /// one the teardown cannot fail.
    pub fn detach(&self, id: &SourceId) -> Result<(), IrqError> {
        let mut st = self.lock();
        let mut entry = st.entries.remove(id).ok_or_else(|| IrqError::Unknown(id.clone()))?;
        self.teardown(&mut st, &mut entry);
        Ok(())
    }

    /// Detaches every source of `device` (device removal or death); returns how many.
    pub fn detach_device(&self, device: &str) -> usize {
        let mut st = self.lock();
        let ids: Vec<SourceId> = st.entries.keys().filter(|k| k.device == device).cloned().collect();
        for id in &ids {
            if let Some(mut e) = st.entries.remove(id) {
                self.teardown(&mut st, &mut e);
            }
        }
        ids.len()
    }

    /// The GSI of an MSI source's route.
    pub fn msi_gsi(&self, id: &SourceId) -> Option<u32> {
        self.lock().entries.get(id).and_then(|e| e.gsi)
    }

    /// The mode and counters of `id`.
    pub fn stats(&self, id: &SourceId) -> Option<SourceStats> {
        let st = self.lock();
        st.entries.get(id).map(|e| SourceStats { mode: e.mode, vmm_delivered: e.vmm_delivered, switches: e.switches })
    }

    /// The attached sources, sorted.
    pub fn sources(&self) -> Vec<SourceId> {
        let mut v: Vec<SourceId> = self.lock().entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// Resources held now.
    pub fn counts(&self) -> IrqCounts {
        let st = self.lock();
        let mut c = IrqCounts { sources: st.entries.len(), msi_routes: st.gsi_used.len(), ..Default::default() };
        for e in st.entries.values() {
            match e.mode {
                Mode::Forwarded if !e.parked => {
                    c.forwarded += 1;
                    c.irqfds += 1;
                }
                _ => {
                    c.watched += 1 + usize::from(e.relay.is_some());
                    c.irqfds += usize::from(e.relay.is_some());
                }
            }
        }
        c
    }

    /// CPU time the delivery thread has used, in nanoseconds (from the kernel's
    /// scheduler statistics).
    pub fn delivery_cpu_ns(&self) -> u64 {
        self.shared.thread_cpu_ns()
    }

    // --- mode transitions (caller holds the state lock) ---

    fn start_forwarded(&self, entry: &mut Entry) -> Result<(), IrqError> {
        let id = entry.source.id.clone();
        let gsi = entry.kvm_gsi().ok_or_else(|| IrqError::NoGsi(id.clone()))?;
        // Anything that arrived while nobody watched is delivered now, by the VMM.
        if !matches!(entry.guest, GuestIrq::Level(_)) {
            delivery::deliver_pending(&self.shared, entry);
        }
        self.shared
            .chip
            .assign_irqfd(entry.source.trigger_fd(), gsi, entry.source.resample_fd())
            .map_err(Self::chip_err(&id, "assigning the irqfd"))?;
        Ok(())
    }

    /// Forwards a source that nobody delivers right now (after `after`); if KVM
    /// refuses, the VMM delivers it (a switch), or polls it if it cannot watch it: the
    /// source never goes silent.
    fn forward_or_fall_back(&self, entry: &mut Entry, after: &str) {
        let Err(e) = self.start_forwarded(entry) else { return };
        let id = entry.source.id.clone();
        tracing::error!("IRQ source {id}: forwarding again after {after} failed ({e}); the VMM delivers it");
        entry.mode = Mode::Vmm;
        entry.switches += 1;
        if let Err(e) = self.start_vmm(entry) {
            tracing::error!("IRQ source {id}: {e}; polling it");
            self.shared.poll_fallback(&id);
        }
    }

    fn stop_forwarded(&self, entry: &mut Entry) {
        if let Some(gsi) = entry.kvm_gsi()
            && let Err(e) = self.shared.chip.deassign_irqfd(entry.source.trigger_fd(), gsi)
        {
            tracing::error!("IRQ source {}: deassigning its irqfd: {e}", entry.source.id);
        }
    }

    fn start_vmm(&self, entry: &mut Entry) -> Result<(), IrqError> {
        let id = entry.source.id.clone();
        if let GuestIrq::Level(gsi) = entry.guest {
            let relay = Relay {
                trigger: Arc::new(crate::eventfd().map_err(Self::chip_err(&id, "creating relay eventfds"))?),
                resample: crate::eventfd().map_err(Self::chip_err(&id, "creating relay eventfds"))?,
            };
            self.shared
                .chip
                .assign_irqfd(&relay.trigger, gsi, Some(&relay.resample))
                .map_err(Self::chip_err(&id, "assigning the level relay irqfd"))?;
            if let Err(e) = self.shared.watch(relay.resample.as_raw_fd(), Token::Resample(id.clone())) {
                let _ = self.shared.chip.deassign_irqfd(&relay.trigger, gsi);
                return Err(IrqError::Chip { id, op: "watching the relay", source: e });
            }
            entry.relay = Some(relay);
        }
        if let Err(e) = self.shared.watch(entry.source.trigger_fd().as_raw_fd(), Token::Trigger(id.clone())) {
            self.drop_relay(entry);
            return Err(IrqError::Chip { id, op: "watching the trigger", source: e });
        }
        Ok(())
    }

    fn stop_vmm(&self, entry: &mut Entry) {
        self.shared.unwatch(entry.source.trigger_fd().as_raw_fd());
        self.shared.clear_poll_fallback(&entry.source.id);
        self.drop_relay(entry);
    }

    fn drop_relay(&self, entry: &mut Entry) {
        if let Some(relay) = entry.relay.take() {
            self.shared.unwatch(relay.resample.as_raw_fd());
            if let GuestIrq::Level(gsi) = entry.guest
                && let Err(e) = self.shared.chip.deassign_irqfd(&relay.trigger, gsi)
            {
                tracing::error!("IRQ source {}: deassigning the relay irqfd: {e}", entry.source.id);
            }
        }
    }

    fn release_route(&self, st: &mut State, entry: &mut Entry) {
        if let Some(gsi) = entry.gsi.take() {
            if let Err(e) = self.shared.chip.remove_msi_route(gsi) {
                tracing::error!("IRQ source {}: removing MSI route {gsi}: {e}", entry.source.id);
            }
            st.gsi_used.remove(&gsi);
        }
    }

    /// Infallible teardown of one detached entry (state lock held). Waits for an
    /// injection of it that the delivery thread may have in flight: after a detach
    /// returns, nothing more of the source reaches the guest.
    fn teardown(&self, st: &mut State, entry: &mut Entry) {
        match entry.mode {
            Mode::Forwarded if !entry.parked => self.stop_forwarded(entry),
            _ => self.stop_vmm(entry),
        }
        drop(self.shared.injecting());
        self.release_route(st, entry);
    }
}

impl Drop for IrqRegistry {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = self.lock();
        let entries: Vec<SourceId> = st.entries.keys().cloned().collect();
        for id in entries {
            if let Some(mut e) = st.entries.remove(&id) {
                self.teardown(&mut st, &mut e);
            }
        }
    }
}

/// Asks a level source's device to re-check its line (carries the line state across a
/// mode switch); nothing for edge sources.
fn kick_resample(entry: &Entry) {
    if let Some(r) = entry.source.resample_fd()
        && let Err(e) = r.write(1)
    {
        tracing::error!("IRQ source {}: resample kick: {e}", entry.source.id);
    }
}

fn set_nonblocking(fd: &EventFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we hold; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Who delivers each attached source, as a snapshot holds it (version
/// [`STATE_VERSION`]): `(device, index, sub-index, mode)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedModes {
    /// Every attached source and its mode (`forwarded` or `vmm`).
    pub sources: Vec<(String, u32, u32, String)>,
}

/// The format version of [`SavedModes`].
pub const STATE_VERSION: u32 = 1;

/// The registry as a snapshot component (`irqs`): the forwarding mode of every
/// source. Restored once the devices have attached their sources again (their
/// configuration replayed enabled exactly what the guest had enabled).
impl vm_api::Snapshottable for IrqRegistry {
    fn id(&self) -> String {
        "irqs".into()
    }

    fn save(&self) -> Result<Option<vm_api::Section>, vm_api::ComponentError> {
        let sources = self
            .sources()
            .iter()
            .filter_map(|id| self.stats(id).map(|s| (id.device.clone(), id.index, id.sub, s.mode.to_string())))
            .collect();
        vm_api::Section::new(&self.id(), STATE_VERSION, &SavedModes { sources }).map(Some)
    }

    fn restore(&self, section: &vm_api::Section) -> Result<(), vm_api::ComponentError> {
        let saved: SavedModes = section.read(&self.id(), STATE_VERSION)?;
        for (device, index, sub, mode) in &saved.sources {
            let id = SourceId::new(device, *index, *sub);
            let bad = |e: String| vm_api::ComponentError::new("irqs", format!("interrupt source {id}: {e}"));
            let m = mode.parse::<Mode>().map_err(bad)?;
            self.set_mode(&id, m).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }
}
