//! Endpoints: a device's attachment to a translation domain that can change.
//!
//! A device reaches memory through an [`Endpoint`] (its `DmaSpace`s are the endpoint's
//! accessors). The endpoint's domain can be switched at run time: a vIOMMU ATTACH, a
//! TCE window created or removed, the identity domain, or none at all (blocked: bus
//! mastering off, every access faults). Several endpoints may share one domain (a TCE
//! table shared by groups, two devices in one virtio-iommu domain).
//!
//! The handover keeps unmap-means-gone: when [`Endpoint::attach`] returns, no access
//! through the old domain can still succeed, in the VMM (the accessors' sections are
//! waited for, as for an unmap) or in a device process (the endpoint's observers, which
//! forward to the device, were told the old domain's mappings are gone and let go).
//!
//! Two parties decide where an endpoint translates: its front-end chooses a domain
//! ([`Endpoint::attach`]), and the device's bus-master enable gates it
//! ([`Endpoint::set_gated`]). While gated, the endpoint is blocked whatever the
//! front-end chose; lifting the gate brings the chosen domain back.
//!
//! Observers of an endpoint see the mappings of whatever domain it is attached to, in
//! order: on a switch, the old domain's mappings go (one batch), then the new domain's
//! come (one batch). An observer that refuses the new domain's mappings fails the
//! switch; the endpoint is then blocked, and the caller fails the device.

use crate::addr::Iova;
use crate::domain::Domain;
use crate::error::MapError;
use crate::faults::FaultLog;
use crate::mapping::{MapObserver, Mapping};
use crate::readers::Readers;
use crate::tracked::Tracked;
use crate::vmdma::VmDma;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

/// The state an endpoint shares with its accessors and its domain.
pub(crate) struct Inner {
    pub(crate) name: Arc<str>,
    pub(crate) vm: Arc<VmDma>,
    /// The domain accesses translate through; None: blocked.
    pub(crate) current: RwLock<Option<Arc<Domain>>>,
    /// Bumped by every switch and by every unmap of the current domain: accessors drop
    /// their IOTLB when it moves.
    pub(crate) generation: AtomicU64,
    pub(crate) readers: Readers,
    pub(crate) faults: FaultLog,
    /// Serialises switches and observer registration; holds what was asked for.
    switch: Mutex<Wanted>,
    observers: RwLock<Vec<Arc<dyn MapObserver>>>,
    /// The observer this endpoint registers with its current domain while it has
    /// observers of its own (a domain nobody outside the VMM watches pays nothing).
    relay: Mutex<Option<Arc<dyn MapObserver>>>,
    relayed: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Waits until no access that began before is still in flight, and makes later
    /// accesses re-translate (after a switch or an unmap of the current domain).
    pub(crate) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.readers.wait_for_inflight();
    }
}

impl Tracked for Inner {
    fn invalidate(&self) {
        Inner::invalidate(self);
    }
    fn accessors(&self) -> usize {
        self.readers.count()
    }
    fn faults_total(&self) -> u64 {
        self.faults.total()
    }
}

impl Inner {
    pub(crate) fn domain(&self) -> Option<Arc<Domain>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the endpoint was asked for: the domain its front-end chose, and whether the
/// device may master the bus. The endpoint translates through the domain only while
/// both say so.
#[derive(Default)]
struct Wanted {
    domain: Option<Arc<Domain>>,
    gated: bool,
}

impl Wanted {
    fn effective(&self) -> Option<Arc<Domain>> {
        if self.gated { None } else { self.domain.clone() }
    }
}

/// Forwards the current domain's changes to the endpoint's observers.
struct Relay(Weak<Inner>);

impl MapObserver for Relay {
    fn mapped(&self, maps: &[Mapping]) -> Result<(), String> {
        let Some(ep) = self.0.upgrade() else { return Ok(()) };
        let observers = ep.observers.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, o) in observers.iter().enumerate() {
            if let Err(e) = o.mapped(maps) {
                for done in observers[..i].iter().rev() {
                    done.unmapped(maps);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn unmapped(&self, maps: &[Mapping]) {
        if let Some(ep) = self.0.upgrade() {
            let observers = ep.observers.read().unwrap_or_else(|e| e.into_inner()).clone();
            for o in observers.iter().rev() {
                o.unmapped(maps);
            }
        }
    }
}

/// A device's attachment to a domain (or to none).
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.domain().map(|d| d.name().to_string());
        f.debug_struct("Endpoint").field("name", &self.inner.name).field("domain", &d).finish()
    }
}

impl Endpoint {
    /// This endpoint as a domain tracks it.
    fn tracked(&self) -> Weak<dyn Tracked> {
        Arc::downgrade(&self.inner) as Weak<dyn Tracked>
    }

    /// A blocked endpoint of `vm` named `name` (the device name faults carry).
    pub fn new(vm: &Arc<VmDma>, name: &str) -> Endpoint {
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            name: Arc::from(name),
            vm: Arc::clone(vm),
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            readers: Readers::default(),
            faults: FaultLog::default(),
            switch: Mutex::new(Wanted::default()),
            observers: RwLock::new(Vec::new()),
            relay: Mutex::new(Some(Arc::new(Relay(weak.clone())) as Arc<dyn MapObserver>)),
            relayed: std::sync::atomic::AtomicBool::new(false),
        });
        vm.register_endpoint(Arc::downgrade(&inner) as Weak<dyn Tracked>);
        Endpoint { inner }
    }

    /// An endpoint attached to `domain` from the start.
    pub fn attached(domain: &Arc<Domain>, name: &str) -> Endpoint {
        let ep = Endpoint::new(domain.vm(), name);
        // A new endpoint has no observers: attaching cannot be refused.
        let _ = ep.attach(Some(Arc::clone(domain)));
        ep
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The domain it translates through now (None: blocked).
    pub fn domain(&self) -> Option<Arc<Domain>> {
        self.inner.domain()
    }

    /// Accesses refused through this endpoint (blocked, unmapped, no permission).
    pub fn faults(&self) -> &FaultLog {
        &self.inner.faults
    }

    /// Accessors (DMA spaces) of this endpoint.
    pub fn accessor_count(&self) -> usize {
        self.inner.readers.count()
    }

    fn lock_switch(&self) -> MutexGuard<'_, Wanted> {
        self.inner.switch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relay(&self) -> Option<Arc<dyn MapObserver>> {
        self.inner.relay.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn has_observers(&self) -> bool {
        !self.inner.observers.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Switches to `domain` (None: blocked), the front-end's choice. When this returns,
    /// no access through the old domain can succeed any more, in the VMM or in a device
    /// process behind the endpoint's observers. If an observer refuses the new domain's
    /// mappings, the endpoint is left blocked and the error returned. While the endpoint
    /// is gated ([`Endpoint::set_gated`]) the choice is recorded and takes effect at
    /// ungating.
    pub fn attach(&self, domain: Option<Arc<Domain>>) -> Result<(), MapError> {
        let mut w = self.lock_switch();
        w.domain = domain;
        let target = w.effective();
        let r = self.switch_to(target);
        if r.is_err() {
            w.domain = None;
        }
        r
    }

    /// Gates the endpoint (bus mastering off: every access faults, the device holds no
    /// mapping) or lifts the gate (it translates through its front-end's domain again),
    /// with the same handover as [`Endpoint::attach`].
    pub fn set_gated(&self, gated: bool) -> Result<(), MapError> {
        let mut w = self.lock_switch();
        w.gated = gated;
        let target = w.effective();
        self.switch_to(target)
    }

    /// True while gated.
    pub fn is_gated(&self) -> bool {
        self.lock_switch().gated
    }

    /// The domain the front-end chose, gated or not.
    pub fn chosen_domain(&self) -> Option<Arc<Domain>> {
        self.lock_switch().domain.clone()
    }

    /// Moves to `domain`; the switch lock is held by the caller.
    fn switch_to(&self, domain: Option<Arc<Domain>>) -> Result<(), MapError> {
        let old = self.domain();
        if let (Some(a), Some(b)) = (&old, &domain)
            && Arc::ptr_eq(a, b)
        {
            return Ok(());
        }
        if old.is_none() && domain.is_none() {
            return Ok(());
        }
        if let Some(old) = &old {
            if self.inner.relayed.swap(false, Ordering::AcqRel)
                && let Some(r) = self.relay()
            {
                old.remove_observer(&r); // the device lets go of the old mappings
            }
            old.detach_endpoint(&self.tracked());
        }
        *self.inner.current.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.inner.invalidate(); // no in-process access through the old domain remains
        let Some(new) = domain else { return Ok(()) };
        new.attach_endpoint(self.tracked());
        *self.inner.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&new));
        if self.has_observers()
            && let Some(r) = self.relay()
        {
            if let Err(e) = new.add_observer(r) {
                *self.inner.current.write().unwrap_or_else(|e| e.into_inner()) = None;
                new.detach_endpoint(&self.tracked());
                self.inner.invalidate();
                return Err(e);
            }
            self.inner.relayed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Adds an observer: it is told the current domain's mappings now (one batch) and
    /// every change from then on, switches included. If it refuses, it is not added.
    pub fn add_observer(&self, observer: Arc<dyn MapObserver>) -> Result<(), MapError> {
        let _s = self.lock_switch();
        let push = |o: Arc<dyn MapObserver>| self.inner.observers.write().unwrap_or_else(|e| e.into_inner()).push(o);
        let Some(d) = self.domain() else {
            push(observer);
            return Ok(());
        };
        if self.inner.relayed.load(Ordering::Acquire) {
            return d.with_update(|maps| {
                if !maps.is_empty() {
                    observer.mapped(maps).map_err(MapError::Rejected)?;
                }
                push(observer);
                Ok(())
            });
        }
        // The first observer: register the relay, whose replay reaches it.
        push(Arc::clone(&observer));
        let Some(r) = self.relay() else { return Ok(()) };
        if let Err(e) = d.add_observer(r) {
            let mut obs = self.inner.observers.write().unwrap_or_else(|e| e.into_inner());
            obs.retain(|o| !Arc::ptr_eq(o, &observer));
            return Err(e);
        }
        self.inner.relayed.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes an observer; it is told the current domain's mappings are gone.
    pub fn remove_observer(&self, observer: &Arc<dyn MapObserver>) {
        let _s = self.lock_switch();
        let remove = || {
            let mut obs = self.inner.observers.write().unwrap_or_else(|e| e.into_inner());
            obs.iter().position(|o| Arc::ptr_eq(o, observer)).map(|p| obs.remove(p))
        };
        let Some(d) = self.domain() else {
            remove();
            return;
        };
        d.with_update(|maps| {
            if let Some(o) = remove()
                && !maps.is_empty()
            {
                o.unmapped(maps);
            }
        });
        if !self.has_observers()
            && self.inner.relayed.swap(false, Ordering::AcqRel)
            && let Some(r) = self.relay()
        {
            d.remove_observer(&r);
        }
    }

    /// The mapping covering `iova` in the current domain, if any.
    pub fn lookup(&self, iova: Iova) -> Option<Mapping> {
        self.domain().and_then(|d| d.lookup(iova))
    }

    /// Detaches from its domain for good (the device is gone): observers are told the
    /// mappings are gone, accessors fault from now on.
    pub fn close(&self) {
        {
            let mut w = self.lock_switch();
            w.domain = None;
            let _ = self.switch_to(None);
        }
        *self.inner.relay.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: leave the domain (its relay now forwards to nobody).
        let relay = self.relay.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(d) = self.current.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            if *self.relayed.get_mut()
                && let Some(r) = relay
            {
                d.remove_observer(&r);
            }
            d.forget_dead_endpoints();
        }
    }
}
