//! A vCPU's state: read on the parked vCPU thread for a snapshot, loaded into a fresh
//! vCPU on restore, its CPUID checked against what this host gives.

use crate::error::{Error, Result};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

fn err(what: impl Into<String>) -> Error {
    Error::Snapshot(what.into())
}

/// A vCPU's state.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuState {
    /// What the guest was told of the CPU: set again before anything else on restore
    /// (a guest must not see its CPU change under it).
    cpuid: Vec<kvm_cpuid_entry2>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

/// On the parked vCPU thread (its last exit completed before it parked, see
/// `Vcpu::run`): reads every piece of state.
pub(crate) fn save_cpu(v: &mut dyn std::any::Any, msr_indexes: &[u32]) -> Result<CpuState> {
    let fd = v.downcast_mut::<kvm_ioctls::VcpuFd>().ok_or_else(|| err("the vCPU job got no vCPU"))?;
    let k = |what, e| Error::Kvm(what, e);
    let mut msrs = Vec::new();
    let mut rest: Vec<u32> = msr_indexes.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| err("too many MSRs"))?;
        let n = fd.get_msrs(&mut m).map_err(|e| k("KVM_GET_MSRS", e))?;
        msrs.extend_from_slice(&m.as_slice()[..n]);
        // The MSR at `n` cannot be read: skip it and go on after it.
        rest = rest.split_off((n + 1).min(rest.len()));
    }
    Ok(CpuState {
        cpuid: fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| k("KVM_GET_CPUID2", e))?
            .as_slice()
            .to_vec(),
        regs: fd.get_regs().map_err(|e| k("KVM_GET_REGS", e))?,
        sregs: fd.get_sregs().map_err(|e| k("KVM_GET_SREGS", e))?,
        xsave: fd.get_xsave().map_err(|e| k("KVM_GET_XSAVE", e))?,
        xcrs: fd.get_xcrs().map_err(|e| k("KVM_GET_XCRS", e))?,
        lapic: fd.get_lapic().map_err(|e| k("KVM_GET_LAPIC", e))?,
        msrs,
        mp_state: fd.get_mp_state().map_err(|e| k("KVM_GET_MP_STATE", e))?,
        events: fd.get_vcpu_events().map_err(|e| k("KVM_GET_VCPU_EVENTS", e))?,
        debugregs: fd.get_debug_regs().map_err(|e| k("KVM_GET_DEBUGREGS", e))?,
    })
}

/// CPUID leaves whose registers are feature bits a guest may rely on, with the bits
/// KVM changes at run time (OSXSAVE, OSPKE: they follow the guest's CR4) left out:
/// (function, index, [eax, ebx, ecx, edx] masks).
const FEATURE_LEAVES: [(u32, u32, [u32; 4]); 6] = [
    (0x1, 0, [0, 0, !(1 << 27), u32::MAX]),
    (0x7, 0, [0, u32::MAX, !(1 << 4), u32::MAX]),
    (0x7, 1, [u32::MAX, 0, 0, 0]),
    (0xd, 1, [u32::MAX, 0, 0, 0]),
    (0x8000_0001, 0, [0, 0, u32::MAX, u32::MAX]),
    (0x4000_0001, 0, [u32::MAX, 0, 0, 0]),
];

/// Checks that this host can give the saved CPUID: every saved feature of
/// [`FEATURE_LEAVES`] is one a fresh vCPU here has (`given`), and every saved leaf
/// exists here.
pub fn check_cpuid(given: &[kvm_cpuid_entry2], saved: &[kvm_cpuid_entry2]) -> Result<()> {
    let supported = given;
    let find = |list: &[kvm_cpuid_entry2], f: u32, i: u32| {
        list.iter()
            .find(|e| e.function == f && (e.index == i || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
            .copied()
    };
    for e in saved {
        if find(supported, e.function, e.index).is_none() {
            return Err(err(format!(
                "the snapshot's CPUID leaf {:#x}.{} does not exist on this host: restore it where KVM offers it",
                e.function, e.index
            )));
        }
    }
    for (f, i, masks) in FEATURE_LEAVES {
        let (Some(want), Some(have)) = (find(saved, f, i), find(supported, f, i)) else { continue };
        let regs = |e: kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
        for ((w, h), (m, name)) in
            regs(want).into_iter().zip(regs(have)).zip(masks.into_iter().zip(["eax", "ebx", "ecx", "edx"]))
        {
            let missing = w & m & !h;
            if missing != 0 {
                return Err(err(format!(
                    "the snapshot's vCPU has CPUID {f:#x}.{i} {name} features this host's KVM does not offer \
                     (bits {missing:#x}): restore it on a host that has them"
                )));
            }
        }
    }
    Ok(())
}

/// Loads a vCPU's state (into a vCPU created for it and never run): its CPUID first
/// (XSAVE and MSRs depend on it), checked against what the fresh vCPU has: all this
/// host gives (KVM's supported CPUID, as this hypervisor reports it back).
pub fn load_cpu(fd: &mut kvm_ioctls::VcpuFd, c: &CpuState) -> Result<()> {
    let k = |what, e| Error::Kvm(what, e);
    let given = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|e| k("KVM_GET_CPUID2", e))?;
    check_cpuid(given.as_slice(), &c.cpuid)?;
    let cpuid = kvm_bindings::CpuId::from_entries(&c.cpuid).map_err(|_| err("too many CPUID entries"))?;
    fd.set_cpuid2(&cpuid).map_err(|e| k("KVM_SET_CPUID2", e))?;
    fd.set_sregs(&c.sregs).map_err(|e| k("KVM_SET_SREGS", e))?;
    fd.set_regs(&c.regs).map_err(|e| k("KVM_SET_REGS", e))?;
    // SAFETY: `c.xsave` is a whole kvm_xsave as KVM_GET_XSAVE returned it; passthru
    // never enables KVM_CAP_XSAVE2, so the kernel reads no more than that struct.
    unsafe { fd.set_xsave(&c.xsave) }.map_err(|e| k("KVM_SET_XSAVE", e))?;
    fd.set_xcrs(&c.xcrs).map_err(|e| k("KVM_SET_XCRS", e))?;
    fd.set_debug_regs(&c.debugregs).map_err(|e| k("KVM_SET_DEBUGREGS", e))?;
    fd.set_lapic(&c.lapic).map_err(|e| k("KVM_SET_LAPIC", e))?;
    let m = kvm_bindings::Msrs::from_entries(&c.msrs).map_err(|_| err("too many MSRs"))?;
    let n = fd.set_msrs(&m).map_err(|e| k("KVM_SET_MSRS", e))?;
    if n != c.msrs.len() {
        return Err(err(format!("KVM took {n} of {} MSRs (first refused: {:#x})", c.msrs.len(), c.msrs[n].index)));
    }
    fd.set_mp_state(c.mp_state).map_err(|e| k("KVM_SET_MP_STATE", e))?;
    fd.set_vcpu_events(&c.events).map_err(|e| k("KVM_SET_VCPU_EVENTS", e))?;
    Ok(())
}

/// The format version of [`CpuState`].
pub const STATE_VERSION: u32 = 1;

/// The boot vCPU of `vm` as a snapshot component (`vcpu0`). Saved on the vCPU's own
/// thread while it is parked (its last exit completed); restored into the VM, which
/// loads it into the vCPU it creates to continue the guest.
pub struct VcpuComponent<'a>(pub &'a crate::vm::Vm);

impl vm_api::Snapshottable for VcpuComponent<'_> {
    fn id(&self) -> String {
        "vcpu0".into()
    }

    /// None when no vCPU ran (qtest).
    fn save(&self) -> std::result::Result<Option<vm_api::Section>, vm_api::ComponentError> {
        let e = |why: String| vm_api::ComponentError::new("vcpu0", why);
        let Some(kvm) = self.0.kvm() else { return Ok(None) };
        let msr_list = kvm.kvm().get_msr_index_list().map_err(|x| e(format!("KVM_GET_MSR_INDEX_LIST: {x}")))?;
        let indexes: Vec<u32> = msr_list.as_slice().to_vec();
        match self.0.run_control().on_vcpu(move |v| save_cpu(v, &indexes)) {
            Ok(c) => vm_api::Section::new(&self.id(), STATE_VERSION, &c.map_err(|x| e(x.to_string()))?).map(Some),
            Err(crate::run_control::RunError::NoVcpu) => Ok(None),
            Err(x) => Err(e(x.to_string())),
        }
    }

    /// Checks the state and leaves it for the vCPU the restored guest runs on.
    fn restore(&self, section: &vm_api::Section) -> std::result::Result<(), vm_api::ComponentError> {
        section.read::<CpuState>(&self.id(), STATE_VERSION)?;
        self.0.set_restored_cpu(section.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    proptest::proptest! {
        /// A vCPU's state round-trips through its section: the JSON a snapshot holds
        /// reads back as the same state (compared as that JSON again).
        #[test]
        fn a_vcpus_state_round_trips_through_its_section(
            gprs in proptest::prelude::any::<[u64; 18]>(),
            msrs in proptest::collection::vec(proptest::prelude::any::<(u32, u64)>(), 0..16),
            cpuid in proptest::collection::vec(proptest::prelude::any::<[u32; 6]>(), 0..8),
            lapic in proptest::prelude::any::<[u8; 32]>(),
        ) {
            let mut c = CpuState {
                cpuid: cpuid.iter().map(|l| leaf(l[0], l[1], [l[2], l[3], l[4], l[5]])).collect(),
                regs: kvm_regs::default(),
                sregs: kvm_sregs::default(),
                xsave: kvm_xsave::default(),
                xcrs: kvm_xcrs::default(),
                lapic: kvm_lapic_state::default(),
                msrs: msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect(),
                mp_state: kvm_mp_state::default(),
                events: kvm_vcpu_events::default(),
                debugregs: kvm_debugregs::default(),
            };
            let r = &mut c.regs;
            [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags] = gprs;
            for (d, v) in c.lapic.regs.iter_mut().zip(lapic) {
                *d = v as _;
            }
            let s = vm_api::Section::new("vcpu0", STATE_VERSION, &c).unwrap();
            let back: vm_api::Section = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            let again: CpuState = back.read("vcpu0", STATE_VERSION).unwrap();
            proptest::prop_assert_eq!(serde_json::to_value(&again).unwrap(), s.state);
            proptest::prop_assert!(back.read::<CpuState>("vcpu0", STATE_VERSION + 1).is_err());
        }
    }

    #[test]
    fn a_saved_cpuid_must_be_one_the_host_gives() {
        let host = [leaf(1, 0, [0x906a3, 0, 0x8000_0001, 0xff]), leaf(7, 0, [0, 0x1, 0, 0])];
        check_cpuid(&host, &host).unwrap();
        // OSXSAVE follows the guest's CR4: not a feature the host must offer.
        check_cpuid(&host, &[leaf(1, 0, [0, 0, 0x8800_0001, 0xff])]).unwrap();
        let e = check_cpuid(&host, &[leaf(7, 0, [0, 0x3, 0, 0])]).unwrap_err().to_string();
        assert!(e.contains("0x7.0 ebx") && e.contains("0x2"), "{e}");
        let e = check_cpuid(&host, &[leaf(0xd, 0, [0; 4])]).unwrap_err().to_string();
        assert!(e.contains("0xd.0 does not exist"), "{e}");
    }
}
