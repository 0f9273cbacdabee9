//! A function's configuration space as the VMM keeps it: bytes, which bits the guest
//! may write, which are write-one-to-clear, and the capability list.

use abi::pci::{reg, status};

/// Bytes of a PCIe function's configuration space.
pub const CONFIG_SIZE: usize = 4096;
/// Bytes reachable through the legacy ports (a conventional PCI header plus its caps).
pub const LEGACY_SIZE: usize = 256;

/// Configuration bytes with per-bit write permissions.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SIZE]>,
    writable: Box<[u8; CONFIG_SIZE]>,
    w1c: Box<[u8; CONFIG_SIZE]>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace").field("vendor", &self.u16(reg::VENDOR_ID)).finish_non_exhaustive()
    }
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            w1c: Box::new([0; CONFIG_SIZE]),
        }
    }
}

/// True if an access of `len` bytes at `offset` is a naturally aligned 1, 2 or 4 byte
/// access inside configuration space (anything else reads all-ones, writes nothing).
pub fn valid_access(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && (offset as usize).is_multiple_of(len) && offset as usize + len <= CONFIG_SIZE
}

impl ConfigSpace {
    /// All zero, nothing writable.
    pub fn new() -> ConfigSpace {
        ConfigSpace::default()
    }

    /// From bytes (a device's own configuration region); nothing writable yet.
    pub fn from_bytes(b: &[u8]) -> ConfigSpace {
        let mut c = ConfigSpace::new();
        let n = b.len().min(CONFIG_SIZE);
        c.bytes[..n].copy_from_slice(&b[..n]);
        c
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Reads as the guest does (no side effects).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let o = offset as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(o + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes as the guest does: only writable bits change; write-one-to-clear bits
    /// clear where a one is written.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let o = offset as usize;
        for (i, &v) in data.iter().enumerate() {
            let Some(at) = o.checked_add(i).filter(|a| *a < CONFIG_SIZE) else { return };
            let w = self.writable[at];
            let c = self.w1c[at];
            let b = &mut self.bytes[at];
            *b = (*b & !w) | (v & w);
            *b &= !(v & c);
        }
    }

    /// Sets bytes directly (the VMM's own view: no permission checks).
    pub fn set(&mut self, offset: u16, data: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.bytes.get_mut(o..o + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Marks bits the guest may write.
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.writable.get_mut(o..o + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Marks write-one-to-clear bits.
    pub fn set_w1c(&mut self, offset: u16, mask: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.w1c.get_mut(o..o + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// A byte.
    pub fn u8(&self, offset: u16) -> u8 {
        self.bytes.get(offset as usize).copied().unwrap_or(0xff)
    }

    /// A 16-bit register.
    pub fn u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// A 32-bit register.
    pub fn u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets a byte.
    pub fn set_u8(&mut self, offset: u16, v: u8) {
        self.set(offset, &[v]);
    }

    /// Sets a 16-bit register.
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Sets a 32-bit register.
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    /// The capabilities of the list (id, offset), in list order; stops at a loop or an
    /// offset outside the header+caps area (a malformed list is cut there).
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        if self.u16(reg::STATUS) & status::CAP_LIST == 0 {
            return out;
        }
        let mut at = u16::from(self.u8(reg::CAPABILITIES) & 0xfc);
        while at >= 0x40 && (at as usize) < LEGACY_SIZE && out.len() < 48 {
            if out.iter().any(|(_, o)| *o == at) {
                break;
            }
            out.push((self.u8(at), at));
            at = u16::from(self.u8(at + 1) & 0xfc);
        }
        out
    }

    /// The offset of capability `id`, if present.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        self.capabilities().into_iter().find(|(c, _)| *c == id).map(|(_, o)| o)
    }
}

/// Builds a configuration space with a capability list (device models use it for
/// their own configuration region).
#[derive(Debug)]
pub struct Builder {
    space: ConfigSpace,
    next_cap: u16,
    last_cap: Option<u16>,
}

impl Builder {
    /// A type-0 header with these identities and class code (`class << 8 | subclass`).
    pub fn new(vendor: u16, device: u16, class: u16, prog_if: u8) -> Builder {
        let mut s = ConfigSpace::new();
        s.set_u16(reg::VENDOR_ID, vendor);
        s.set_u16(reg::DEVICE_ID, device);
        s.set_u8(reg::CLASS_PROG, prog_if);
        s.set_u16(reg::CLASS_PROG + 1, class);
        s.set_u16(reg::SUBSYSTEM_VENDOR_ID, vendor);
        s.set_u16(reg::SUBSYSTEM_ID, device);
        Builder { space: s, next_cap: 0x40, last_cap: None }
    }

    /// Sets a register (BAR type bits, interrupt pin...).
    pub fn set_u32(mut self, offset: u16, v: u32) -> Builder {
        self.space.set_u32(offset, v);
        self
    }

    /// Sets a byte.
    pub fn set_u8(mut self, offset: u16, v: u8) -> Builder {
        self.space.set_u8(offset, v);
        self
    }

    /// Appends capability `id` with `body` (the bytes after id and next pointer);
    /// returns the builder and the capability's offset.
    pub fn capability(mut self, id: u8, body: &[u8]) -> (Builder, u16) {
        let at = self.next_cap;
        self.space.set_u8(at, id);
        self.space.set_u8(at + 1, 0);
        self.space.set(at + 2, body);
        match self.last_cap {
            Some(prev) => self.space.set_u8(prev + 1, at as u8),
            None => {
                self.space.set_u8(reg::CAPABILITIES, at as u8);
                let st = self.space.u16(reg::STATUS) | status::CAP_LIST;
                self.space.set_u16(reg::STATUS, st);
            }
        }
        self.last_cap = Some(at);
        self.next_cap = (at + 2 + body.len() as u16).next_multiple_of(4);
        (self, at)
    }

    /// The finished space.
    pub fn build(self) -> ConfigSpace {
        self.space
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_honour_writable_and_w1c_bits() {
        let mut c = ConfigSpace::new();
        c.set_u16(0x04, 0x0100);
        c.set_writable(0x04, &[0x07, 0x04]);
        c.write(0x04, &[0xff, 0xff]);
        assert_eq!(c.u16(0x04), 0x0507, "only writable bits took the ones; bit 8 stays");
        c.set_u16(0x06, 0x8010);
        c.set_w1c(0x06, &[0x00, 0x80]);
        c.write(0x06, &[0xff, 0x80]);
        assert_eq!(c.u16(0x06), 0x0010, "the w1c bit cleared, the read-only one kept");
    }

    #[test]
    fn capabilities_are_chained_and_a_looping_list_is_cut() {
        let (b, msi) = Builder::new(0x1234, 0x5678, 0x0880, 0).capability(abi::pci::cap::MSI, &[0; 8]);
        let (b, msix) = b.capability(abi::pci::cap::MSIX, &[0; 10]);
        let mut c = b.build();
        assert_eq!(c.capabilities(), vec![(abi::pci::cap::MSI, msi), (abi::pci::cap::MSIX, msix)]);
        assert_eq!(c.find_capability(abi::pci::cap::MSIX), Some(msix));
        c.set_u8(msix + 1, msi as u8); // a loop
        assert_eq!(c.capabilities().len(), 2);
        assert!(valid_access(0x10, 4) && !valid_access(0x11, 2) && !valid_access(0x10, 8));
    }
}
