//! The fault log: device accesses refused by a domain, kept in a bounded ring with a
//! total counter (a misbehaving device cannot grow it).

use crate::addr::{Access, Iova};
use crate::error::FaultReason;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One refused access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// First IOVA of the access.
    pub iova: Iova,
    /// Bytes asked for.
    pub len: u64,
    /// Read or write.
    pub access: Access,
    /// Why it was refused.
    pub reason: FaultReason,
    /// The device (accessor name) that asked.
    pub device: std::sync::Arc<str>,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} of {:#x} bytes at {}: {}", self.device, self.access, self.len, self.iova, self.reason)
    }
}

/// Entries kept; older ones are dropped (the counter still counts them).
pub const FAULT_LOG_CAPACITY: usize = 256;

/// A bounded log of faults.
#[derive(Debug, Default)]
pub struct FaultLog {
    ring: Mutex<VecDeque<Fault>>,
    total: AtomicU64,
}

impl FaultLog {
    pub(crate) fn record(&self, fault: Fault) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == FAULT_LOG_CAPACITY {
            r.pop_front();
        }
        r.push_back(fault);
    }

    /// Faults ever recorded.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The most recent faults, oldest first.
    pub fn recent(&self) -> Vec<Fault> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Empties the ring (the total is kept) and returns what it held.
    pub fn drain(&self) -> Vec<Fault> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }
}

/// Told of the faults in a domain: the front-end that owns it (a virtio-iommu reports
/// them to the guest on its event queue). Called on the faulting device's access
/// path: it must not block (queue and drop, never wait).
pub trait FaultHandler: Send + Sync {
    /// One fault, after it was logged.
    fn fault(&self, fault: &Fault);
}

/// Faults passed to a domain's handler per second at most; the rest are counted.
pub const FAULT_REPORTS_PER_SECOND: u64 = 1000;

/// A domain's fault handler and its rate limit.
#[derive(Default)]
pub(crate) struct FaultReports {
    handler: std::sync::RwLock<Option<std::sync::Arc<dyn FaultHandler>>>,
    /// The second (since `origin`) the count is for, and faults reported in it.
    second: AtomicU64,
    in_second: AtomicU64,
    origin: std::sync::OnceLock<std::time::Instant>,
    /// Faults not passed on because of the limit.
    unreported: AtomicU64,
}

impl FaultReports {
    pub(crate) fn set(&self, handler: Option<std::sync::Arc<dyn FaultHandler>>) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    /// Passes `f` to the handler unless this second's reports are used up.
    pub(crate) fn report(&self, f: &Fault) {
        let h = self.handler.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(h) = h else { return };
        let now = self.origin.get_or_init(std::time::Instant::now).elapsed().as_secs();
        if self.second.swap(now, Ordering::AcqRel) != now {
            self.in_second.store(0, Ordering::Release);
        }
        if self.in_second.fetch_add(1, Ordering::AcqRel) < FAULT_REPORTS_PER_SECOND {
            h.fault(f);
        } else {
            self.unreported.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn unreported(&self) -> u64 {
        self.unreported.load(Ordering::Relaxed)
    }
}
