//! I/O notifications a device can ask the VM for: an eventfd signalled by a guest write
//! to a port or MMIO address, without an exit to the VMM (KVM's ioeventfd; emulated
//! under qtest).

use vmm_sys_util::eventfd::EventFd;

/// An I/O address an ioeventfd can watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoAddr {
    /// A port.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// Registers ioeventfds with whatever runs the VM.
pub trait IoEvents: Send + Sync {
    /// Signals `fd` on guest writes to `addr` instead of exiting to the VMM.
    fn register_ioevent(&self, fd: &EventFd, addr: IoAddr) -> std::io::Result<()>;
    /// Undoes [`IoEvents::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoAddr) -> std::io::Result<()>;
}

/// No ioeventfds: every registration is refused (EOPNOTSUPP), so a device falls back
/// to trapped writes. For devices exercised without a VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIoEvents;

impl IoEvents for NoIoEvents {
    fn register_ioevent(&self, _fd: &EventFd, _addr: IoAddr) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(95))
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: IoAddr) -> std::io::Result<()> {
        Ok(())
    }
}
