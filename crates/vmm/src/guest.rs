//! Running a guest: a program booted on the boot vCPU, or a restored guest continued
//! from its snapshot.

use crate::error::{Error, Result};
use crate::vm::Vm;
use abi::layout;

impl Vm {
    /// Leaves the vCPU's `state` (its section) for the vCPU that continues a restored
    /// guest.
    pub(crate) fn set_restored_cpu(&self, state: vm_api::Section) {
        *self.restored_cpu.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// Takes what [`Vm::set_restored_cpu`] left.
    pub(crate) fn take_restored_cpu(&self) -> Option<vm_api::Section> {
        self.restored_cpu.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Loads a guest program, prepares the boot vCPU and runs it until the guest
    /// exits; returns the guest's exit status. KVM only.
    pub fn run_guest(&self, elf: &[u8]) -> Result<u8> {
        self.run_guest_with_args(elf, &[])
    }

    /// Continues a restored guest: the vCPU gets the snapshot's state, the irqchip and
    /// clock theirs, the devices run again, and the guest goes on from where it was
    /// saved until it exits. KVM only; RAM and devices are restored first
    /// ([`crate::snapshot::Snapshot::apply_ram`], `apply_devices`).
    pub fn run_restored(&self, snap: &crate::snapshot::Snapshot) -> Result<u8> {
        let kvm = self.kvm().ok_or_else(|| Error::GuestCrashed("a restored guest needs --accel kvm".into()))?;
        // Left by the vCPU component's restore (Snapshot::apply_devices).
        let section =
            self.take_restored_cpu().ok_or_else(|| Error::Snapshot("the snapshot has no vCPU state".into()))?;
        let cpu: crate::vcpu_state::CpuState =
            section.read("vcpu0", crate::vcpu_state::STATE_VERSION).map_err(|e| Error::Snapshot(e.to_string()))?;
        let mut vcpu = crate::vcpu::Vcpu::new(kvm, 0, crate::boot::Entry { rip: 0, image_end: 0 })?;
        vcpu.load(&cpu)?;
        snap.start(self)?;
        self.events().publish(crate::events::Event::VmRunning);
        let status = vcpu.run(self)?;
        self.stopping(status);
        Ok(status)
    }

    /// As [`Vm::run_guest`], passing up to [`layout::MAX_GUEST_ARGS`] program arguments.
    pub fn run_guest_with_args(&self, elf: &[u8], args: &[u64]) -> Result<u8> {
        if args.len() > layout::MAX_GUEST_ARGS {
            return Err(Error::GuestArgs(args.len()));
        }
        let kvm = self.kvm().ok_or_else(|| Error::GuestCrashed("a guest program needs --accel kvm".into()))?;
        let low = self.ram().size().min(layout::MMIO_HOLE_START);
        let entry = crate::boot::load_elf(self.memory(), elf, low)?;
        let info = layout::BootInfo {
            magic: layout::BOOT_MAGIC,
            low_ram_size: low,
            high_ram_size: self.ram().size() - low,
            apic_id: 0,
            arg_count: args.len() as u64,
            args: {
                let mut a = [0; layout::MAX_GUEST_ARGS];
                a[..args.len()].copy_from_slice(args);
                a
            },
        };
        crate::boot::write_boot_structures(self.memory(), &info)?;
        let mut vcpu = crate::vcpu::Vcpu::new(kvm, 0, entry)?;
        self.events().publish(crate::events::Event::VmRunning);
        let status = vcpu.run(self)?;
        self.stopping(status);
        Ok(status)
    }
}
