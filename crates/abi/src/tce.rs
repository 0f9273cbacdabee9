//! TCE tables (the PAPR IOMMU) through the hypercall port (block [`BASE`]).
//!
//! Per device group (a partitionable endpoint) the guest owns DMA windows, each a table
//! of 64-bit translation control entries (TCEs), one per IOMMU page of the window: a
//! default 32-bit window at bus offset 0, and at most one more, created at run time (the
//! dynamic DMA window calls of RTAS, here hypercalls). Semantics follow Linux KVM's
//! `book3s_64_vio.c` where it is stricter than QEMU's `spapr_iommu.c`.
//!
//! Register convention: the hypercall's own status (`rax`) says the call reached the
//! TCE block (`success`) or not (`unknown_call`); the PAPR return code of the call is in
//! result 0 (`rdi`, as PAPR's r3), its results in results 1 and 2 (`rsi`, `rdx`, as
//! PAPR's r4, r5). Return codes are PAPR's values as two's-complement 64-bit numbers.

/// First call number of the block.
pub const BASE: u64 = 0x200;
/// H_PUT_TCE(liobn, ioba, tce): sets one entry. An entry with neither [`READ`] nor
/// [`WRITE`] clears it and is stored as 0 (the kernel keeps such a "poison" value as
/// written; passthru does not, so a clear never needs table memory and never fails for
/// it). A put that fails leaves the entry as it was, except when a device refuses the
/// new mapping after letting go of the old one: the entry is then clear (as the kernel
/// clears an entry whose map failed).
pub const PUT_TCE: u64 = BASE;
/// H_GET_TCE(liobn, ioba) -> the entry (result 1); 0 for an entry never set or cleared.
pub const GET_TCE: u64 = BASE + 1;
/// H_PUT_TCE_INDIRECT(liobn, ioba, list_gpa, count): `count` <= [`MAX_INDIRECT`] entries
/// from a 4 KiB-aligned list in guest memory (little-endian u64s). Every entry is
/// validated before any is applied: all or nothing.
pub const PUT_TCE_INDIRECT: u64 = BASE + 2;
/// H_STUFF_TCE(liobn, ioba, value, count): stores `value` in `count` entries. Only
/// clearing values (neither [`READ`] nor [`WRITE`]) are accepted, as the kernel does.
pub const STUFF_TCE: u64 = BASE + 3;
/// ibm,query-pe-dma-window(group) -> windows available (result 1), largest window in
/// 4 KiB pages (result 2: [`LARGEST_WINDOW_PAGES`], which CREATE accepts at every page
/// size). The page sizes: [`QUERY_PAGE_SIZES`].
pub const QUERY_WINDOW: u64 = BASE + 4;
/// ibm,create-pe-dma-window(group, page_shift, window_shift, alias_liobn) -> liobn
/// (result 1), bus offset (result 2). `alias_liobn` 0 makes a new table; a live liobn of
/// the same geometry makes the new window use that very table (passthru's extension:
/// one table for several groups).
pub const CREATE_WINDOW: u64 = BASE + 5;
/// ibm,remove-pe-dma-window(liobn): any window, the default one included.
pub const REMOVE_WINDOW: u64 = BASE + 6;
/// ibm,reset-pe-dma-window(group) -> the default window's liobn (result 1), its bus
/// offset 0 (result 2): every window removed, the default one back with the liobn it
/// had (the one [`DEVICE_GROUP`] names).
pub const RESET_WINDOWS: u64 = BASE + 7;
/// The group of device `bdf` (a requester id) -> group (result 1), its default window's
/// liobn (result 2, the same for the group's life, also while the guest has removed
/// that window); [`H_PARAMETER`] for a device not on TCE. (On POWER the device tree
/// says this.) Groups an operator names (`group=N`) are 0..=0xffff; a device given no
/// group gets one of its own from [`AUTO_GROUP_BASE`] up.
pub const DEVICE_GROUP: u64 = BASE + 8;
/// The page sizes a window may use (group) -> a mask of [`pagesize`] bits (result 1).
pub const QUERY_PAGE_SIZES: u64 = BASE + 9;

/// PAPR return codes (arch/powerpc/include/asm/hvcall.h).
pub const H_SUCCESS: i64 = 0;
/// Hardware error (QEMU's RTAS HW_ERROR for no free window).
pub const H_HARDWARE: i64 = -1;
/// A parameter is wrong.
pub const H_PARAMETER: i64 = -4;
/// Not enough resources (the locked-memory limit refused table memory or pins).
pub const H_RESOURCE: i64 = -16;

/// The device may read memory through the entry.
pub const READ: u64 = 0x1;
/// The device may write memory through the entry.
pub const WRITE: u64 = 0x2;

/// Most entries of one H_PUT_TCE_INDIRECT (one 4 KiB list).
pub const MAX_INDIRECT: u64 = 512;
/// Most levels of a table.
pub const MAX_LEVELS: u32 = 5;
/// Most entries of a window: 2^45 (five levels of 512).
pub const MAX_ENTRY_BITS: u32 = MAX_LEVELS * layout::LEVEL_BITS;
/// Largest window CREATE accepts, log2 of bytes: 2^58 (at 4 KiB pages the entry limit
/// makes it 2^57).
pub const MAX_WINDOW_SHIFT: u32 = 58;
/// The largest window QUERY_WINDOW advertises, in 4 KiB pages: 2^45, i.e. 2^57 bytes,
/// accepted at every page size (4 KiB pages: 2^45 entries; larger pages: fewer).
pub const LARGEST_WINDOW_PAGES: u64 = 1 << MAX_ENTRY_BITS;
/// The first group number given to a device that names none.
pub const AUTO_GROUP_BASE: u32 = 0x1_0000;
/// Windows a group may have at once.
pub const MAX_WINDOWS: u64 = 2;

/// The default window: bus offset 0, 1 GiB of 4 KiB pages.
pub const DEFAULT_WINDOW_SHIFT: u32 = 30;
/// The default window's page shift.
pub const DEFAULT_PAGE_SHIFT: u32 = 12;
/// Bus offset of a window created while another exists (QEMU's dma64_win_addr).
pub const WINDOW64_OFFSET: u64 = 1 << 59;

/// Page-size bits (RTAS_DDW_PGSIZE_*).
pub mod pagesize {
    /// 4 KiB.
    pub const SZ_4K: u64 = 0x01;
    /// 64 KiB.
    pub const SZ_64K: u64 = 0x02;
    /// 16 MiB.
    pub const SZ_16M: u64 = 0x04;
    /// 2 MiB (the 2022 extension).
    pub const SZ_2M: u64 = 0x100;
}

/// Layout of a table's file (mmap): a tree of 4 KiB pages of 512 little-endian u64
/// entries; the root is the first page; index bits are split 9 per level from the top;
/// an inner entry is the file offset of the next page | READ | WRITE (0: none); a leaf
/// entry is the TCE. Levels = ceil(log2(entries) / 9).
pub mod layout {
    /// Bytes of a table page.
    pub const PAGE: u64 = 4096;
    /// Index bits per level.
    pub const LEVEL_BITS: u32 = 9;
}
