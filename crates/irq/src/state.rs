//! The registry's state, shared by the registry (which changes it) and its delivery
//! thread (which reads it): attached sources, their modes, relays and GSIs.

use crate::chip::GuestIrq;
use crate::source::{IrqSource, SourceId};
use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Who delivers a source's interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// KVM, through an irqfd: no VMM work per interrupt.
    Forwarded,
    /// The VMM's delivery thread.
    Vmm,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "forwarded" => Ok(Mode::Forwarded),
            "vmm" => Ok(Mode::Vmm),
            _ => Err(format!("'{s}' is not an IRQ mode; use forwarded or vmm")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Forwarded => "forwarded",
            Mode::Vmm => "vmm",
        })
    }
}

/// Relay eventfds of a level source delivered by the VMM: the VMM raises the line by
/// writing `trigger` (a resample irqfd) and learns of the guest's EOI from `resample`.
pub(crate) struct Relay {
    /// Shared with an injection in flight on the delivery thread.
    pub(crate) trigger: Arc<EventFd>,
    pub(crate) resample: EventFd,
}

pub(crate) struct Entry {
    pub(crate) source: IrqSource,
    pub(crate) guest: GuestIrq,
    /// MSI sources: the GSI of their route (kept while attached).
    pub(crate) gsi: Option<u32>,
    pub(crate) mode: Mode,
    pub(crate) relay: Option<Relay>,
    /// The device reference a source holds exactly while attached.
    pub(crate) _owner: Arc<dyn Any + Send + Sync>,
    pub(crate) vmm_delivered: u64,
    pub(crate) switches: u64,
    /// Masked (MSI-X vector control, INTx disable): nothing is injected; an interrupt
    /// that arrives is remembered as pending.
    pub(crate) masked: bool,
    pub(crate) pending: bool,
    /// Forwarded, but watched by the VMM while masked (KVM cannot hold it back).
    pub(crate) parked: bool,
}

impl Entry {
    /// The GSI KVM raises for this source.
    pub(crate) fn kvm_gsi(&self) -> Option<u32> {
        match self.guest {
            GuestIrq::Msi(_) => self.gsi,
            GuestIrq::Edge(g) | GuestIrq::Level(g) => Some(g),
        }
    }
}

pub(crate) struct State {
    pub(crate) entries: HashMap<SourceId, Entry>,
    pub(crate) gsi_used: BTreeSet<u32>,
}
