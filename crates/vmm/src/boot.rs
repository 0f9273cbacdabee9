//! Puts a guest program in memory and the boot vCPU in 64-bit long mode: identity page
//! tables for 0..4 GiB (2 MiB pages), a flat GDT, SSE enabled, entry at the ELF's
//! entry point with `rdi` = boot information (see `abi::layout`).

use crate::error::{Error, Result};
use abi::layout::{self, BootInfo};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries: null, 64-bit code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0x008f_8900_0000_ffff];

/// Where the guest starts.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Entry point (ELF e_entry).
    pub rip: u64,
    /// One past the highest byte the image occupies.
    pub image_end: u64,
}

/// Loads a static x86-64 ELF whose loadable segments all lie between
/// [`layout::IMAGE_ADDR`] and `low_ram_end`.
pub fn load_elf(mem: &GuestMemoryMmap, elf: &[u8], low_ram_end: u64) -> Result<Entry> {
    check_segments(elf, low_ram_end)?;
    let mut cursor = std::io::Cursor::new(elf);
    use linux_loader::loader::KernelLoader;
    let r = linux_loader::loader::Elf::load(mem, None, &mut cursor, Some(GuestAddress(layout::IMAGE_ADDR)))
        .map_err(|e| Error::Elf(e.to_string()))?;
    let rip = r.kernel_load.0;
    if rip >= r.kernel_end {
        return Err(Error::Elf(format!("entry point {rip:#x} lies outside the loaded image")));
    }
    Ok(Entry { rip, image_end: r.kernel_end })
}

fn le(elf: &[u8], off: usize, len: usize) -> Result<u64> {
    let b = elf.get(off..off + len).ok_or_else(|| Error::Elf(format!("truncated at byte {off}")))?;
    Ok(b.iter().rev().fold(0, |v, &x| (v << 8) | u64::from(x)))
}

/// Refuses images whose segments would overwrite the VMM's boot structures or fall
/// outside RAM, before anything is copied.
pub(crate) fn check_segments(elf: &[u8], low_ram_end: u64) -> Result<()> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err(Error::Elf("not an ELF file (bad magic)".into()));
    }
    if elf[4] != 2 || elf[5] != 1 || le(elf, 18, 2)? != 62 {
        return Err(Error::Elf("not a 64-bit little-endian x86-64 ELF".into()));
    }
    let (phoff, phentsize, phnum) = (le(elf, 32, 8)?, le(elf, 54, 2)?, le(elf, 56, 2)?);
    if phentsize != 56 || phnum == 0 {
        return Err(Error::Elf(format!("unexpected program headers (size {phentsize}, count {phnum})")));
    }
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * 56).map_err(|_| Error::Elf("program header offset overflows".into()))?;
        if le(elf, at, 4)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) =
            (le(elf, at + 8, 8)?, le(elf, at + 24, 8)?, le(elf, at + 32, 8)?, le(elf, at + 40, 8)?);
        let end = paddr.checked_add(memsz).ok_or_else(|| Error::Elf("segment end overflows".into()))?;
        if filesz > memsz || offset.checked_add(filesz).is_none_or(|e| e > elf.len() as u64) {
            return Err(Error::Elf(format!("segment {i} has inconsistent sizes or lies past the file end")));
        }
        if paddr < layout::IMAGE_ADDR || end > low_ram_end {
            return Err(Error::Elf(format!(
                "segment {i} at {paddr:#x}..{end:#x} is outside {:#x}..{low_ram_end:#x}; link guest programs at {:#x} \
                 (see guest/.cargo/config.toml) and keep them within RAM",
                layout::IMAGE_ADDR,
                layout::IMAGE_ADDR
            )));
        }
    }
    Ok(())
}

/// Writes the GDT, page tables and boot information into guest memory.
pub fn write_boot_structures(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<()> {
    let w = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).map_err(|e| Error::Memory(e.to_string()));
    for (i, e) in GDT.iter().enumerate() {
        w(layout::GDT_ADDR + 8 * i as u64, *e)?;
    }
    let pdpt = layout::PML4_ADDR + 0x1000;
    let pd0 = pdpt + 0x1000;
    w(layout::PML4_ADDR, pdpt | 0x3)?;
    for gib in 0..4u64 {
        let pd = pd0 + gib * 0x1000;
        w(pdpt + 8 * gib, pd | 0x3)?;
        for j in 0..512u64 {
            // present | writable | 2 MiB page
            w(pd + 8 * j, ((gib << 30) + (j << 21)) | 0x83)?;
        }
    }
    let mut words = vec![info.magic, info.low_ram_size, info.high_ram_size, info.apic_id, info.arg_count];
    words.extend_from_slice(&info.args);
    for (i, v) in words.iter().enumerate() {
        w(layout::BOOT_INFO_ADDR + 8 * i as u64, *v)?;
    }
    Ok(())
}

/// A flat segment: base 0, 4 GiB. KVM takes the limit already scaled by the
/// granularity (a descriptor's 0xfffff pages is 0xffff_ffff here); long mode ignores
/// limits, 32-bit protected mode (PVH) does not.
fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT of [`write_boot_structures`] loaded: `code` in CS (0x08), flat data (0x10)
/// in the others, the TSS (0x18), no IDT.
fn flat_segments(mut sregs: kvm_sregs, code: kvm_segment) -> kvm_sregs {
    let data = segment(0x10, 0x3, 1, 0, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, 0xb, 0, 0, 0);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs
}

/// Special registers for long mode with the structures of [`write_boot_structures`].
pub fn long_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, segment(0x08, 0xb, 1, 1, 0));
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for 32-bit protected mode without paging (the PVH entry): a
/// 32-bit code segment, CR0.PE only.
pub fn protected_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat_segments(sregs, segment(0x08, 0xb, 1, 0, 1));
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers at entry.
pub fn entry_regs(entry: Entry) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsp: layout::STACK_TOP - 8,
        rdi: layout::BOOT_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_misplaced_elves_are_refused_with_a_reason() {
        let ram = crate::memory::GuestRam::new(crate::memory::MIN_RAM).unwrap();
        let end = crate::memory::MIN_RAM;
        let e =
            load_elf(ram.memory(), b"not an elf at all, just some bytes........................................", end);
        assert!(e.unwrap_err().to_string().contains("bad magic"));
        let hello = guests::get("hello").unwrap().elf;
        assert!(load_elf(ram.memory(), &hello[..40], end).is_err(), "truncated header");
        // Move the first PT_LOAD below the image address: it would overwrite page tables.
        let mut moved = hello.to_vec();
        let phoff = le(&moved, 32, 8).unwrap() as usize;
        let load = (0..le(&moved, 56, 2).unwrap() as usize)
            .map(|i| phoff + 56 * i)
            .find(|&a| le(&moved, a, 4).unwrap() == 1)
            .unwrap();
        moved[load + 24..load + 32].copy_from_slice(&0x9000u64.to_le_bytes());
        let e = load_elf(ram.memory(), &moved, end).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn hello_loads_at_the_image_address() {
        let ram = crate::memory::GuestRam::new(crate::memory::MIN_RAM).unwrap();
        let e = load_elf(ram.memory(), guests::get("hello").unwrap().elf, crate::memory::MIN_RAM).unwrap();
        assert!(e.rip >= layout::IMAGE_ADDR && e.rip < e.image_end);
        let mut magic = [0u8; 4];
        ram.memory().read_slice(&mut magic, GuestAddress(layout::IMAGE_ADDR)).unwrap();
        assert_ne!(magic, [0; 4], "something was copied to the image address");
    }
}
