//! IRQ sources: a device's eventfds and its VFIO-style name.

use std::fmt;
use vmm_sys_util::eventfd::EventFd;

/// A source's name as VFIO gives it: the device, the IRQ index (INTx 0, MSI 1,
/// MSI-X 2, ...) and the sub-index (the vector). Only the device layer interprets
/// index and sub-index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId {
    /// Device name.
    pub device: String,
    /// IRQ index.
    pub index: u32,
    /// Sub-index (vector within the index).
    pub sub: u32,
}

impl SourceId {
    /// A source name.
    pub fn new(device: &str, index: u32, sub: u32) -> SourceId {
        SourceId { device: device.to_string(), index, sub }
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.device, self.index, self.sub)
    }
}

/// How the device signals.
#[derive(Debug)]
pub enum Trigger {
    /// Each write of the eventfd is one interrupt (MSI, MSI-X, edge pins).
    Edge(EventFd),
    /// The eventfd is written when the line goes high; the device re-checks its line
    /// and writes `trigger` again if still high whenever `resample` is written (after
    /// the guest's EOI, or after a mode switch).
    Level {
        /// Written by the device when its line is (still) high.
        trigger: EventFd,
        /// Written by the registry when the device must re-check its line.
        resample: EventFd,
    },
}

/// One IRQ source of a device.
#[derive(Debug)]
pub struct IrqSource {
    /// Its name.
    pub id: SourceId,
    /// Its eventfds.
    pub trigger: Trigger,
}

impl IrqSource {
    pub(crate) fn trigger_fd(&self) -> &EventFd {
        match &self.trigger {
            Trigger::Edge(fd) => fd,
            Trigger::Level { trigger, .. } => trigger,
        }
    }

    pub(crate) fn resample_fd(&self) -> Option<&EventFd> {
        match &self.trigger {
            Trigger::Edge(_) => None,
            Trigger::Level { resample, .. } => Some(resample),
        }
    }
}
