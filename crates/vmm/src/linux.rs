//! Booting a Linux kernel (`passthru run --kernel FILE`), loaded with rust-vmm
//! `linux-loader`: a bzImage entered by the 64-bit boot protocol (boot parameters with
//! the e820 map from the VM's memory map, the command line, the initramfs, the RSDP),
//! or an ELF vmlinux entered at its PVH entry point (Xen's `hvm_start_info` with the
//! same memory map, command line, initramfs as a module, RSDP) in 32-bit protected
//! mode without paging. The ACPI tables (`crate::acpi`) are written below 1 MiB.

use crate::acpi;
use crate::boot::Entry;
use crate::error::{Error, Result};
use crate::vm::Vm;
use abi::{layout, pci};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, linux::LinuxBootConfigurator};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_api::RegionKind;
use vm_memory::{Bytes, GuestAddress};

/// The boot parameters ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The longest command line passthru passes (the boot protocol's usual limit).
pub const CMDLINE_MAX: usize = 2048;
/// The command line without `--cmdline`: the console on COM1, early messages there
/// too, no timer check (passthru has no PIT), and a panic ends the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 no_timer_check panic=-1";
/// Where low RAM stops for the kernel (the legacy VGA and BIOS area above is not RAM).
const LOW_RAM_END: u64 = 0xa_0000;
/// e820 types.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;
/// The bzImage's 64-bit entry, past its 32-bit one.
const ENTRY_64: u64 = 0x200;
/// `type_of_loader`: an undefined loader.
const LOADER_OTHER: u8 = 0xff;
/// `loadflags`: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 1;

/// PVH: the memory map after `hvm_start_info` (at [`ZERO_PAGE`]).
const PVH_MEMMAP: u64 = ZERO_PAGE + 0x100;
/// PVH: the module list (the initramfs).
const PVH_MODLIST: u64 = 0x6000;
/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEntry {
    /// The 64-bit boot protocol: long mode, `rsi` = the boot parameters.
    Linux64 {
        /// Entry point.
        rip: u64,
        /// The boot parameters.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh {
        /// Entry point.
        rip: u64,
        /// The start info.
        start_info: u64,
    },
}

/// A kernel to boot.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    /// The bzImage.
    pub image: Vec<u8>,
    /// The initramfs, if any.
    pub initramfs: Option<Vec<u8>>,
    /// The command line.
    pub cmdline: String,
}

/// One e820 entry: address, size, type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820 {
    /// Start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of a VM with RAM at `ram` (address, size): its RAM (boot RAM below
/// the legacy area and from 1 MiB, above 4 GiB, hot-added RAM), the BIOS area holding
/// the ACPI tables and the ECAM window reserved. Sorted by address.
pub fn e820(ram: &[(u64, u64)]) -> Vec<E820> {
    let mut out = vec![
        E820 { addr: acpi::RSDP_ADDR, size: acpi::TABLES_END - acpi::RSDP_ADDR, kind: E820_RESERVED },
        E820 { addr: pci::ECAM_BASE, size: pci::ECAM_SIZE, kind: E820_RESERVED },
    ];
    for &(gpa, size) in ram {
        let end = gpa.saturating_add(size);
        if gpa < acpi::TABLES_END {
            out.push(E820 { addr: gpa, size: LOW_RAM_END.min(end).saturating_sub(gpa), kind: E820_RAM });
            if end > acpi::TABLES_END {
                out.push(E820 { addr: acpi::TABLES_END, size: end - acpi::TABLES_END, kind: E820_RAM });
            }
        } else {
            out.push(E820 { addr: gpa, size, kind: E820_RAM });
        }
    }
    out.retain(|e| e.size > 0);
    out.sort_by_key(|e| e.addr);
    out
}

impl Vm {
    /// The ACPI tables for the VM as it is now (a device behind the virtio-iommu that
    /// was hot-plugged is in the VIOT of the next build).
    pub fn acpi_tables(&self) -> acpi::Tables {
        let name = iommu::viommu::REGISTRATION.name;
        let mut eps: Vec<u16> =
            self.devices().iter().filter(|d| d.frontend().name() == name).map(|d| d.bdf()).collect();
        eps.sort_unstable();
        let viommu = self.frontends().get(name).map(|_| (pci::bdf(0, abi::viommu::SLOT, 0), eps));
        acpi::build(&acpi::Machine { viommu })
    }

    /// Writes the ACPI tables where [`acpi::RSDP_ADDR`] says.
    pub fn write_acpi_tables(&self) -> Result<acpi::Tables> {
        let t = self.acpi_tables();
        let w = |at: u64, b: &[u8]| {
            self.memory().write_slice(b, GuestAddress(at)).map_err(|e| Error::Memory(format!("ACPI tables: {e}")))
        };
        if let Some((sig, at, data)) = t.tables.iter().find(|(_, at, d)| at + d.len() as u64 > acpi::TABLES_END) {
            return Err(Error::Kernel(format!(
                "the ACPI table {} ({} bytes at {at:#x}) does not fit below {:#x}",
                String::from_utf8_lossy(sig),
                data.len(),
                acpi::TABLES_END
            )));
        }
        w(acpi::RSDP_ADDR, &t.rsdp)?;
        for (_, at, data) in &t.tables {
            w(*at, data)?;
        }
        Ok(t)
    }

    /// Boots `kernel` on the boot vCPU (KVM only) and runs it until it ends (the exit
    /// port, a reset through the FADT's reset register) or stops in a way the VMM
    /// cannot continue from (an error naming the instruction).
    pub fn run_kernel(&self, kernel: &Kernel) -> Result<u8> {
        let kvm = self.kvm().ok_or_else(|| Error::GuestCrashed("a kernel needs --accel kvm".into()))?;
        let entry = self.load_kernel(kernel)?;
        // The kernel enumerates what is there; hot-plug events are for what comes later.
        self.acpi_hotplug().clear();
        // The GDT and the identity page tables the 64-bit boot protocol enters with.
        crate::boot::write_boot_structures(self.memory(), &layout::BootInfo::default())?;
        let (KernelEntry::Linux64 { rip, .. } | KernelEntry::Pvh { rip, .. }) = entry;
        let mut vcpu = crate::vcpu::Vcpu::new(kvm, 0, Entry { rip, image_end: rip + 1 })?;
        match entry {
            KernelEntry::Linux64 { zero_page, .. } => vcpu.set_boot_params(zero_page)?,
            KernelEntry::Pvh { rip, start_info } => vcpu.enter_pvh(rip, start_info)?,
        }
        self.events().publish(crate::events::Event::VmRunning);
        let status = vcpu.run(self)?;
        self.stopping(status);
        Ok(status)
    }

    /// The e820 map of this VM as it is.
    pub fn e820(&self) -> Vec<E820> {
        let ram: Vec<(u64, u64)> = self
            .memory_map()
            .regions()
            .iter()
            .filter(|r| matches!(r.kind, RegionKind::Ram))
            .map(|r| (r.gpa, r.size))
            .collect();
        e820(&ram)
    }

    /// Loads the kernel (a bzImage, or an ELF vmlinux with a PVH entry), its
    /// initramfs, command line, boot information and the ACPI tables; returns how to
    /// enter it.
    pub fn load_kernel(&self, kernel: &Kernel) -> Result<KernelEntry> {
        let bad = |what: String| Error::Kernel(what);
        if kernel.cmdline.len() >= CMDLINE_MAX {
            return Err(bad(format!(
                "the command line is {} bytes; at most {} fit",
                kernel.cmdline.len(),
                CMDLINE_MAX - 1
            )));
        }
        if kernel.image.starts_with(b"\x7fELF") {
            return self.load_pvh(kernel);
        }
        let mut cursor = std::io::Cursor::new(&kernel.image);
        let loaded = BzImage::load(self.memory(), None, &mut cursor, Some(GuestAddress(layout::IMAGE_ADDR)))
            .map_err(|e| bad(format!("not a bzImage passthru can load: {e}")))?;
        let mut hdr = loaded.setup_header.ok_or_else(|| bad("no setup header".into()))?;
        let low = self.ram().size().min(layout::MMIO_HOLE_START);
        // The kernel decompresses itself in place: it needs init_size bytes from where
        // it was loaded, more than the compressed image takes.
        let kernel_end = loaded.kernel_end.max(loaded.kernel_load.0.saturating_add(u64::from(hdr.init_size)));
        if kernel_end > low {
            return Err(bad(format!(
                "the kernel needs memory up to {kernel_end:#x}, past low RAM ({low:#x}): give more --memory"
            )));
        }
        // cmdline_size is the kernel's limit (boot protocol 2.06 and later).
        let (version, limit) = (hdr.version, hdr.cmdline_size);
        if version >= 0x0206 && kernel.cmdline.len() > limit as usize {
            return Err(bad(format!("the command line is {} bytes; this kernel takes {limit}", kernel.cmdline.len())));
        }
        hdr.type_of_loader = LOADER_OTHER;
        hdr.loadflags |= LOADED_HIGH;
        hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        let mut line = kernel.cmdline.as_bytes().to_vec();
        line.push(0);
        self.memory().write_slice(&line, GuestAddress(CMDLINE_ADDR)).map_err(|e| Error::Memory(e.to_string()))?;
        if let Some(initrd) = &kernel.initramfs {
            // As high in low RAM as the kernel allows, page-aligned.
            let max = u64::from(hdr.initrd_addr_max).min(low - 1);
            let size = initrd.len() as u64;
            let at = max.saturating_sub(size).saturating_add(1) & !0xfff;
            if at < kernel_end || size == 0 {
                return Err(bad(format!("the initramfs ({size} bytes) does not fit between the kernel and {max:#x}")));
            }
            self.memory().write_slice(initrd, GuestAddress(at)).map_err(|e| Error::Memory(e.to_string()))?;
            hdr.ramdisk_image = at as u32;
            hdr.ramdisk_size = size as u32;
        }
        self.write_acpi_tables()?;
        let mut params = boot_params { hdr, acpi_rsdp_addr: acpi::RSDP_ADDR, ..Default::default() };
        let map = self.e820();
        if map.len() > params.e820_table.len() {
            return Err(bad(format!("{} e820 entries; the zero page holds {}", map.len(), params.e820_table.len())));
        }
        for (slot, e) in params.e820_table.iter_mut().zip(&map) {
            *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
        }
        params.e820_entries = map.len() as u8;
        LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), self.memory())
            .map_err(|e| bad(format!("writing the boot parameters: {e}")))?;
        Ok(KernelEntry::Linux64 { rip: loaded.kernel_load.0 + ENTRY_64, zero_page: ZERO_PAGE })
    }

    /// An ELF vmlinux entered at its PVH entry (XEN_ELFNOTE_PHYS32_ENTRY).
    fn load_pvh(&self, kernel: &Kernel) -> Result<KernelEntry> {
        let bad = |what: String| Error::Kernel(what);
        let low = self.ram().size().min(layout::MMIO_HOLE_START);
        // Every segment between 1 MiB and the end of low RAM, before anything is copied
        // (linux-loader checks only the entry point): nothing over the boot structures.
        crate::boot::check_segments(&kernel.image, low).map_err(|e| bad(e.to_string()))?;
        let mut cursor = std::io::Cursor::new(&kernel.image);
        let loaded = Elf::load(self.memory(), None, &mut cursor, Some(GuestAddress(layout::IMAGE_ADDR)))
            .map_err(|e| bad(format!("not an ELF kernel passthru can load: {e}")))?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(bad("this ELF kernel has no PVH entry point (CONFIG_PVH): boot its bzImage instead".into()));
        };
        if loaded.kernel_end > low {
            return Err(bad(format!(
                "the kernel ends at {:#x}, past low RAM ({low:#x}): give more --memory",
                loaded.kernel_end
            )));
        }
        let w = |at: u64, b: &[u8]| {
            self.memory().write_slice(b, GuestAddress(at)).map_err(|e| Error::Memory(e.to_string()))
        };
        let mut line = kernel.cmdline.as_bytes().to_vec();
        line.push(0);
        w(CMDLINE_ADDR, &line)?;
        let mut info = hvm_start_info {
            magic: PVH_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE_ADDR,
            rsdp_paddr: acpi::RSDP_ADDR,
            memmap_paddr: PVH_MEMMAP,
            ..Default::default()
        };
        let mut module = None;
        if let Some(initrd) = &kernel.initramfs {
            let size = initrd.len() as u64;
            let at = low.saturating_sub(size) & !0xfff;
            if at < loaded.kernel_end || size == 0 {
                return Err(bad(format!("the initramfs ({size} bytes) does not fit above the kernel in low RAM")));
            }
            w(at, initrd)?;
            module = Some(hvm_modlist_entry { paddr: at, size, ..Default::default() });
            info.nr_modules = 1;
            info.modlist_paddr = PVH_MODLIST;
        }
        self.write_acpi_tables()?;
        let map: Vec<hvm_memmap_table_entry> = self
            .e820()
            .iter()
            .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
            .collect();
        // The map lies between the start info and the page tables (at PML4_ADDR).
        let room = ((layout::PML4_ADDR - PVH_MEMMAP) / 24) as usize;
        if map.len() > room {
            return Err(bad(format!("{} memory map entries; the start info holds {room}", map.len())));
        }
        info.memmap_entries = map.len() as u32;
        let mut params = BootParams::new(&info, GuestAddress(ZERO_PAGE));
        params.set_sections(&map, GuestAddress(PVH_MEMMAP));
        if let Some(m) = module {
            params.set_modules(&[m], GuestAddress(PVH_MODLIST));
        }
        PvhBootConfigurator::write_bootparams(&params, self.memory())
            .map_err(|e| bad(format!("writing the PVH start info: {e}")))?;
        Ok(KernelEntry::Pvh { rip: entry.0, start_info: ZERO_PAGE })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_e820_map_has_the_ram_and_reserves_the_bios_area_and_ecam() {
        let map = e820(&[(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)]);
        let want = [
            E820 { addr: 0, size: 0xa_0000, kind: E820_RAM },
            E820 { addr: 0xe_0000, size: 0x2_0000, kind: E820_RESERVED },
            E820 { addr: 0x10_0000, size: 0xc000_0000 - 0x10_0000, kind: E820_RAM },
            E820 { addr: pci::ECAM_BASE, size: pci::ECAM_SIZE, kind: E820_RESERVED },
            E820 { addr: 0x1_0000_0000, size: 0x4000_0000, kind: E820_RAM },
        ];
        assert_eq!(map, want);
    }
}
