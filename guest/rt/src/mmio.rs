//! MMIO accessors: volatile loads and stores at guest-physical addresses (the guest
//! identity-maps 0..4 GiB, so a physical address is also a virtual one).

macro_rules! accessors {
    ($read:ident, $write:ident, $t:ty) => {
        /// Volatile read at a guest-physical address.
        ///
        /// # Safety
        /// `addr` must be mapped, aligned for the type, and readable without side
        /// effects the caller did not intend.
        #[inline(always)]
        pub unsafe fn $read(addr: u64) -> $t {
            // SAFETY: the caller guarantees the address is valid for this access.
            unsafe { core::ptr::read_volatile(addr as *const $t) }
        }

        /// Volatile write at a guest-physical address.
        ///
        /// # Safety
        /// As for the read: mapped, aligned, and the write intended.
        #[inline(always)]
        pub unsafe fn $write(addr: u64, value: $t) {
            // SAFETY: the caller guarantees the address is valid for this access.
            unsafe { core::ptr::write_volatile(addr as *mut $t, value) }
        }
    };
}

accessors!(read8, write8, u8);
accessors!(read16, write16, u16);
accessors!(read32, write32, u32);
accessors!(read64, write64, u64);
