//! The memory type the guest gets for a page, as KVM's EPT code decides it
//! (`vmx_get_mt_mask`, arch/x86/kvm/vmx/vmx.c), as a pure function so it can be
//! table-tested and reported (`--stats`, qtest `memtype`).
//!
//! Three kernels are modelled ([`Kernel`]):
//! - [`Kernel::Pre611`]: before the v6.11 MTRR removal (kvm-x86-mtrrs-6.11): MMIO is UC,
//!   no non-coherent DMA in the VM is WB ignoring the guest PAT, guest CR0.CD follows the
//!   CD_NW_CLEARED quirk, otherwise the guest's MTRR type combined with its PAT;
//! - [`Kernel::Current`]: after commit 54590a4003d9 (KVM_X86_QUIRK_IGNORE_GUEST_PAT):
//!   MMIO is UC (PAT may still choose WC), no non-coherent DMA with the quirk on is WB
//!   ignoring PAT, otherwise WB with the guest's PAT deciding — VM-wide;
//! - [`Kernel::PerSlot`]: the per-memslot KVM_MEM_NON_COHERENT_DMA proposal (Yan Zhao,
//!   2024-01, not merged): a flagged slot is WB with the guest's PAT deciding (MTRRs
//!   ignored) whatever the rest of the VM does; an unflagged slot as in `Current`
//!   with no non-coherent DMA. This is the model passthru implements with its per-slot
//!   flags; upstream KVM has no such memslot flag, so passthru records the flag and
//!   reports what the policy would be.

/// An x86 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Uncacheable.
    Uc,
    /// Write-combining.
    Wc,
    /// Write-through.
    Wt,
    /// Write-protected.
    Wp,
    /// Write-back.
    Wb,
}

impl std::fmt::Display for MemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemType::Uc => "UC",
            MemType::Wc => "WC",
            MemType::Wt => "WT",
            MemType::Wp => "WP",
            MemType::Wb => "WB",
        })
    }
}

/// The IA32_PAT MSR's index.
pub const IA32_PAT: u32 = 0x277;
/// IA32_PAT at reset (WB, WT, UC-, UC, repeated).
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// The eight entries of an IA32_PAT value (UC- counts as UC; reserved encodings as UC).
pub fn pat_entries(pat: u64) -> [MemType; 8] {
    let mut out = [MemType::Uc; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = match (pat >> (8 * i)) & 7 {
            1 => MemType::Wc,
            4 => MemType::Wt,
            5 => MemType::Wp,
            6 => MemType::Wb,
            _ => MemType::Uc,
        };
    }
    out
}

/// Which kernel's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Before v6.11 (guest MTRRs virtualized).
    Pre611,
    /// v6.11 and later with KVM_X86_QUIRK_IGNORE_GUEST_PAT (VM-wide non-coherent DMA).
    Current,
    /// The per-slot KVM_MEM_NON_COHERENT_DMA proposal (passthru's model).
    PerSlot,
}

/// What the decision depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Host MMIO (not RAM, not a RAM-device mapping).
    pub mmio: bool,
    /// Some device in the VM is non-coherent (KVM's noncoherent_dma_count > 0).
    pub vm_noncoherent: bool,
    /// The page's slot is flagged non-coherent.
    pub slot_noncoherent: bool,
    /// KVM_X86_QUIRK_IGNORE_GUEST_PAT is enabled (the default).
    pub quirk_ignore_guest_pat: bool,
    /// The guest's CR0.CD.
    pub cr0_cd: bool,
    /// KVM_X86_QUIRK_CD_NW_CLEARED is enabled (the default; pre-6.11 only).
    pub quirk_cd_nw_cleared: bool,
    /// The guest MTRR type of the page (pre-6.11 only).
    pub guest_mtrr: MemType,
    /// The guest PAT type of the mapping.
    pub guest_pat: MemType,
}

impl Default for Page {
    fn default() -> Page {
        Page {
            mmio: false,
            vm_noncoherent: false,
            slot_noncoherent: false,
            quirk_ignore_guest_pat: true,
            cr0_cd: false,
            quirk_cd_nw_cleared: true,
            guest_mtrr: MemType::Wb,
            guest_pat: MemType::Wb,
        }
    }
}

/// KVM's decision: the EPT type, and whether the guest's PAT is ignored (IPAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The EPT memory type.
    pub ept: MemType,
    /// EPT "ignore PAT".
    pub ignore_pat: bool,
    /// The rule that decided (for reports).
    pub rule: &'static str,
}

impl Decision {
    /// The type the guest's access gets: the EPT type alone with IPAT, else the EPT
    /// type combined with the guest's PAT type as the SDM combines MTRR and PAT types.
    pub fn effective(&self, pat: MemType) -> MemType {
        if self.ignore_pat { self.ept } else { combine(self.ept, pat) }
    }
}

/// An EPT (or MTRR) type combined with a PAT type (Intel SDM vol. 3, "Memory Types and
/// their Properties" / MTRR x PAT table).
pub fn combine(ept: MemType, pat: MemType) -> MemType {
    use MemType::*;
    match (ept, pat) {
        (_, Uc) => Uc,
        (_, Wc) => Wc,
        (Wb, p) => p,
        (Uc, _) => Uc,
        (Wc, _) => {
            if pat == Wb {
                Wc
            } else {
                Uc
            }
        }
        (Wt, Wb) | (Wt, Wt) => Wt,
        (Wt, Wp) => Wp,
        (Wp, Wt) => Wt,
        (Wp, Wb) | (Wp, Wp) => Wp,
    }
}

/// The decision for `page` under `kernel`'s rules.
pub fn decide(kernel: Kernel, page: &Page) -> Decision {
    let d = |ept, ignore_pat, rule| Decision { ept, ignore_pat, rule };
    match kernel {
        Kernel::Pre611 => {
            // if (is_mmio) return MTRR_TYPE_UNCACHABLE << VMX_EPT_MT_EPTE_SHIFT;
            if page.mmio {
                return d(MemType::Uc, false, "pre-6.11: host MMIO is UC");
            }
            // if (!kvm_arch_has_noncoherent_dma(vcpu->kvm)) return WB | VMX_EPT_IPAT_BIT;
            if !page.vm_noncoherent {
                return d(MemType::Wb, true, "pre-6.11: no non-coherent DMA: WB, guest PAT ignored");
            }
            // if (kvm_read_cr0_bits(vcpu, X86_CR0_CD)) { CD_NW_CLEARED ? WB : UC | IPAT }
            if page.cr0_cd {
                return if page.quirk_cd_nw_cleared {
                    d(MemType::Wb, false, "pre-6.11: CR0.CD with the CD_NW_CLEARED quirk: WB")
                } else {
                    d(MemType::Uc, true, "pre-6.11: CR0.CD without the quirk: UC, guest PAT ignored")
                };
            }
            // return kvm_mtrr_get_guest_memory_type(vcpu, gfn) << VMX_EPT_MT_EPTE_SHIFT;
            d(page.guest_mtrr, false, "pre-6.11: non-coherent DMA: the guest's MTRR type, with its PAT")
        }
        Kernel::Current => {
            // if (is_mmio) return MTRR_TYPE_UNCACHABLE << VMX_EPT_MT_EPTE_SHIFT;
            if page.mmio {
                return d(MemType::Uc, false, "current: host MMIO is UC (guest PAT may choose WC)");
            }
            // if (vmx_ignore_guest_pat(vcpu->kvm)) return WB | VMX_EPT_IPAT_BIT;
            if !page.vm_noncoherent && page.quirk_ignore_guest_pat {
                return d(MemType::Wb, true, "current: no non-coherent DMA, IGNORE_GUEST_PAT: WB");
            }
            // return (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT);
            d(MemType::Wb, false, "current: WB, the guest's PAT decides (VM-wide)")
        }
        Kernel::PerSlot => {
            if page.mmio {
                return d(MemType::Uc, false, "per-slot: host MMIO is UC");
            }
            // The proposal: a KVM_MEM_NON_COHERENT_DMA slot -> WB without IPAT, MTRRs
            // ignored, whatever the VM-wide count says.
            if page.slot_noncoherent {
                return d(MemType::Wb, false, "per-slot: flagged slot: WB, the guest's PAT decides");
            }
            if page.quirk_ignore_guest_pat {
                return d(MemType::Wb, true, "per-slot: unflagged slot: WB, guest PAT ignored");
            }
            d(MemType::Wb, false, "per-slot: unflagged, quirk off: the guest's PAT decides")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MemType::*;
    use super::*;

    /// (kernel, page, expected EPT type, IPAT, effective type for the page's PAT).
    #[test]
    fn every_row_of_the_policy() {
        let p = Page::default();
        let nc = Page { vm_noncoherent: true, ..p };
        let rows: Vec<(Kernel, Page, MemType, bool, MemType)> = vec![
            // Pre-6.11.
            (Kernel::Pre611, Page { mmio: true, guest_pat: Wc, ..p }, Uc, false, Wc),
            (Kernel::Pre611, Page { mmio: true, ..p }, Uc, false, Uc),
            (Kernel::Pre611, Page { guest_pat: Uc, ..p }, Wb, true, Wb),
            (Kernel::Pre611, Page { cr0_cd: true, ..nc }, Wb, false, Wb),
            (Kernel::Pre611, Page { cr0_cd: true, quirk_cd_nw_cleared: false, ..nc }, Uc, true, Uc),
            (Kernel::Pre611, Page { guest_mtrr: Wc, ..nc }, Wc, false, Wc),
            (Kernel::Pre611, Page { guest_mtrr: Uc, ..nc }, Uc, false, Uc),
            (Kernel::Pre611, Page { guest_mtrr: Wb, guest_pat: Wc, ..nc }, Wb, false, Wc),
            (Kernel::Pre611, Page { guest_mtrr: Wt, guest_pat: Wb, ..nc }, Wt, false, Wt),
            // Current (VM-wide).
            (Kernel::Current, Page { mmio: true, guest_pat: Wc, ..p }, Uc, false, Wc),
            (Kernel::Current, Page { guest_pat: Uc, ..p }, Wb, true, Wb),
            (Kernel::Current, Page { guest_pat: Wc, quirk_ignore_guest_pat: false, ..p }, Wb, false, Wc),
            (Kernel::Current, Page { guest_pat: Wc, ..nc }, Wb, false, Wc),
            (Kernel::Current, Page { guest_pat: Wb, cr0_cd: true, ..nc }, Wb, false, Wb),
            // Per-slot (passthru's model).
            (Kernel::PerSlot, Page { mmio: true, guest_pat: Wc, ..p }, Uc, false, Wc),
            (Kernel::PerSlot, Page { slot_noncoherent: true, guest_pat: Wc, ..p }, Wb, false, Wc),
            (Kernel::PerSlot, Page { slot_noncoherent: true, guest_pat: Uc, guest_mtrr: Wb, ..p }, Wb, false, Uc),
            (Kernel::PerSlot, Page { guest_pat: Wc, ..nc }, Wb, true, Wb),
            (Kernel::PerSlot, Page { guest_pat: Wc, quirk_ignore_guest_pat: false, ..p }, Wb, false, Wc),
        ];
        for (i, (k, page, ept, ipat, eff)) in rows.iter().enumerate() {
            let d = decide(*k, page);
            assert_eq!((d.ept, d.ignore_pat), (*ept, *ipat), "row {i}: {k:?} {page:?} ({})", d.rule);
            assert_eq!(d.effective(page.guest_pat), *eff, "row {i}: effective ({})", d.rule);
        }
    }

    #[test]
    fn the_per_slot_model_differs_from_the_vm_wide_one_only_where_it_should() {
        // A non-coherent device in the VM: the VM-wide kernel honours PAT everywhere,
        // the per-slot model only on the device's slots (RAM stays WB, PAT ignored).
        let ram = Page { vm_noncoherent: true, guest_pat: Uc, ..Page::default() };
        assert_eq!(decide(Kernel::Current, &ram).effective(Uc), Uc);
        assert_eq!(decide(Kernel::PerSlot, &ram).effective(Uc), Wb);
        let bar = Page { slot_noncoherent: true, ..ram };
        assert_eq!(decide(Kernel::PerSlot, &bar).effective(Wc), Wc);
    }

    #[test]
    fn combine_follows_the_sdm_table() {
        for t in [Uc, Wc, Wt, Wp, Wb] {
            assert_eq!(combine(Wb, t), t, "WB defers to PAT");
            assert_eq!(combine(t, Uc), Uc, "PAT UC wins");
        }
        assert_eq!(combine(Uc, Wc), Wc);
        assert_eq!(combine(Uc, Wb), Uc);
        assert_eq!(combine(Wc, Wb), Wc);
        assert_eq!(combine(Wc, Wt), Uc);
        assert_eq!(combine(Wt, Wp), Wp);
        assert_eq!(combine(Wp, Wb), Wp);
    }
}
