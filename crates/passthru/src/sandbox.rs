//! The seccomp filter of device processes passthru spawns (rust-vmm `seccompiler`).
//!
//! A device process, once connected, only talks on its socket, maps the files the VMM
//! sends, writes its interrupt eventfds and runs its own threads. Everything else
//! (opening files, new sockets, exec, ptrace, signals to others...) kills the process:
//! the VMM sees the connection close and treats it as a surprise removal.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// System calls a device process makes after it is connected.
const ALLOWED: &[i64] = &[
    // Its socket: messages with descriptors, plain reads, back-pressure waits.
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_shutdown,
    libc::SYS_close,
    // DMA windows: inspect and map the files the VMM sends (fstat, seals, access mode).
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_fcntl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads (the engine's worker, the connection's writer) and their waits.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The filter: the calls above are allowed, anything else kills the process.
pub fn device_filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, vec![])).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("building the device's seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("compiling the device's seccomp filter: {e}"))
}

/// Confines every thread of this process to [`ALLOWED`].
pub fn confine_device() -> Result<(), String> {
    let prog = device_filter()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| format!("applying the device's seccomp filter: {e}"))
}
