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
