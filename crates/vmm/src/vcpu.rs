//! The boot vCPU and its run loop: port and MMIO exits go to the machine's dispatch,
//! writes to the hypercall port go to the hypercall registry with the registers as
//! arguments, and the run ends when the guest writes the exit port.

use crate::accel::KvmAccel;
use crate::boot::{Entry, entry_regs, long_mode_sregs};
use crate::error::{Error, Result};
use crate::run_control::ExitCounters;
use crate::vm::Vm;
use abi::hcall::Args;
use abi::ports;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// A vCPU in long mode.
pub struct Vcpu {
    fd: VcpuFd,
    /// KVM ships the general registers in `kvm_run` on every exit (KVM_CAP_SYNC_REGS),
    /// so a hypercall costs no KVM_GET_REGS/KVM_SET_REGS ioctl.
    sync_regs: bool,
}

impl Vcpu {
    /// Creates vCPU `id` with the host's supported CPUID, long-mode registers and SSE.
    pub fn new(kvm: &KvmAccel, id: u64, entry: Entry) -> Result<Vcpu> {
        let fd = kvm.vm().create_vcpu(id).map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let cpuid = kvm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        fd.set_cpuid2(&cpuid).map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        let sregs = fd.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        fd.set_sregs(&long_mode_sregs(sregs)).map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        fd.set_fpu(&fpu).map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
        let mut fd = fd;
        fd.set_regs(&entry_regs(entry)).map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        let sync_regs = kvm.kvm().check_extension(kvm_ioctls::Cap::SyncRegs);
        if sync_regs {
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        Ok(Vcpu { fd, sync_regs })
    }

    /// Points `rsi` at a Linux kernel's boot parameters (the 64-bit boot protocol).
    pub fn set_boot_params(&mut self, zero_page: u64) -> Result<()> {
        let mut regs = self.fd.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        regs.rsi = zero_page;
        regs.rdi = 0;
        self.fd.set_regs(&regs).map_err(|e| Error::Kvm("KVM_SET_REGS", e))
    }

    /// Enters at `rip` in 32-bit protected mode, paging off, flat segments, `ebx` =
    /// `start_info` (the PVH boot protocol).
    pub fn enter_pvh(&mut self, rip: u64, start_info: u64) -> Result<()> {
        let sregs = self.fd.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        self.fd.set_sregs(&crate::boot::protected_mode_sregs(sregs)).map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        let regs = kvm_bindings::kvm_regs { rip, rbx: start_info, rflags: 0x2, ..Default::default() };
        self.fd.set_regs(&regs).map_err(|e| Error::Kvm("KVM_SET_REGS", e))
    }

    /// Runs until the guest writes the exit port (returns its status) or stops in a
    /// way the VMM cannot continue from (an error naming the reason).
    pub fn run(&mut self, vm: &Vm) -> Result<u8> {
        /// Deregisters the vCPU thread from pause kicks however the loop ends.
        struct Registered<'a>(&'a crate::run_control::RunControl);
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.0.vcpu_stopped();
            }
        }
        vm.run_control().vcpu_started();
        let _registered = Registered(vm.run_control());
        let exits = vm.exit_counters();
        // A pause asked: the last exit's completion (a port or MMIO read's data, a
        // hypercall's results, the rest of a string I/O) is landed by one more KVM_RUN
        // with immediate_exit before the vCPU parks, so its saved registers are whole.
        let mut settled = false;
        loop {
            // Quick reads asked of the running vCPU (no pause).
            vm.run_control().serve_asks(&mut self.fd);
            // Set afresh before every KVM_RUN: a pause withdrawn (timed out) after the
            // flag was set must not leave it set, or KVM_RUN returns EINTR forever.
            let settle = settle_first(vm.run_control().pause_pending(), settled);
            self.fd.set_kvm_immediate_exit(u8::from(settle));
            if !settle {
                // A pause parks here, between two guest instructions.
                vm.run_control().checkpoint(&mut self.fd, || vm.exit_status().is_some());
                settled = false;
            }
            if let Some(status) = vm.exit_status() {
                return Ok(status);
            }
            let hcall_port = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == ports::HCALL {
                        ExitCounters::bump(&exits.hypercall);
                        true
                    } else {
                        ExitCounters::bump(&exits.io_out);
                        vm.pio_write(port, data);
                        false
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    ExitCounters::bump(&exits.io_in);
                    vm.pio_read(port, data);
                    false
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    ExitCounters::bump(&exits.mmio_write);
                    vm.mmio_write(addr, data);
                    false
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    ExitCounters::bump(&exits.mmio_read);
                    vm.mmio_read(addr, data);
                    false
                }
                Ok(VcpuExit::Hlt) => {
                    return Err(self.crashed("halted with interrupts disabled (hlt exit)"));
                }
                Ok(VcpuExit::Shutdown) => {
                    return Err(self.crashed("triple fault (an exception with no usable handler)"));
                }
                Ok(VcpuExit::InternalError) => {
                    let code = self.code_at_rip(vm);
                    return Err(self.crashed(&format!(
                        "KVM internal error: most often an instruction this hypervisor does not emulate \
                         (x87, xsave, scalar floating point); build guests for baseline x86-64{code}"
                    )));
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(self.crashed(&format!("VM entry failed (hardware reason {reason:#x})")));
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Err(self.crashed(&format!("system event {kind} (reset or shutdown request)")));
                }
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    return Err(self.crashed(&what));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitCounters::bump(&exits.interrupted);
                    // Nothing left to complete: park at the next checkpoint if the pause
                    // still stands.
                    settled = vm.run_control().pause_pending();
                    false
                }
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            };
            if hcall_port {
                self.hypercall(vm)?;
            }
        }
    }

    /// Loads a saved state (a restore), its CPUID first.
    pub fn load(&mut self, state: &crate::vcpu_state::CpuState) -> Result<()> {
        crate::vcpu_state::load_cpu(&mut self.fd, state)
    }

    fn hypercall(&mut self, vm: &Vm) -> Result<()> {
        let regs = if self.sync_regs {
            self.fd.sync_regs().regs
        } else {
            self.fd.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?
        };
        let args = Args { nr: regs.rax, a: [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8] };
        let ret = vm.hypercall(&args);
        let write = |r: &mut kvm_bindings::kvm_regs| {
            r.rax = ret.status as u64;
            r.rdi = ret.r[0];
            r.rsi = ret.r[1];
            r.rdx = ret.r[2];
        };
        if self.sync_regs {
            write(&mut self.fd.sync_regs_mut().regs);
            self.fd.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
            Ok(())
        } else {
            let mut regs = regs;
            write(&mut regs);
            self.fd.set_regs(&regs).map_err(|e| Error::Kvm("KVM_SET_REGS", e))
        }
    }

    /// The bytes of the instruction at `rip` (translated through the guest's page
    /// tables), for a report; empty if they cannot be read.
    fn code_at_rip(&self, vm: &Vm) -> String {
        let Ok(regs) = self.fd.get_regs() else { return String::new() };
        let Ok(t) = self.fd.translate_gva(regs.rip) else { return String::new() };
        if t.valid == 0 {
            return String::new();
        }
        let mut b = [0u8; 15];
        if !vm.phys_read(t.physical_address, &mut b) {
            return String::new();
        }
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(" (instruction bytes at guest-physical {:#x}: {})", t.physical_address, hex.join(" "))
    }

    fn crashed(&self, what: &str) -> Error {
        let rip = self.fd.get_regs().map(|r| format!(" at rip {:#x}", r.rip)).unwrap_or_default();
        Error::GuestCrashed(format!("{what}{rip}"))
    }
}

/// Whether the next KVM_RUN only completes the last exit (`immediate_exit`) instead of
/// the vCPU parking at its checkpoint: while a pause is pending and that completion
/// has not happened yet. Decided before every KVM_RUN, from the pause as it stands.
fn settle_first(pause_pending: bool, settled: bool) -> bool {
    pause_pending && !settled
}

#[cfg(test)]
mod tests {
    use super::settle_first;

    /// immediate_exit follows the pause as it stands at each KVM_RUN: set to complete
    /// the last exit while a pause is pending, clear once that is done (the vCPU
    /// parks), and clear when the pause was withdrawn meanwhile (the guest runs on:
    /// a flag left set would make every KVM_RUN return EINTR).
    #[test]
    fn immediate_exit_follows_the_pause_as_it_stands() {
        assert!(settle_first(true, false), "a pause asked: complete the last exit first");
        assert!(!settle_first(true, true), "completed: park");
        assert!(!settle_first(false, false), "withdrawn before the completion: run the guest");
        assert!(!settle_first(false, true), "withdrawn after it: run the guest");
    }
}
