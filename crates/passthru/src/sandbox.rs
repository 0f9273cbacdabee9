//! The seccomp filter of device processes passthru spawns (rust-vmm `seccompiler`).
//!
//! A device process, once connected, only talks on its socket, maps the files the VMM
//! sends, writes its interrupt eventfds and runs its own threads. Everything else
//! (opening files, new sockets, exec, ptrace, signals to others...) ends the process:
//! the filter traps the call, a SIGSYS handler names it on standard error, and the
//! process dies of SIGSYS. The VMM sees the connection close and treats it as a
//! surprise removal.

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter};
use seccompiler::{SeccompRule, TargetArch};
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

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(|e| e.to_string())
}

/// The filter for process `pid`: the calls above are allowed, plus what the SIGSYS
/// reporter needs to end the process (restoring SIGSYS's default action, sending
/// SIGSYS to itself); anything else traps.
pub fn device_filter(pid: u32) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, vec![])).collect();
    let sigsys = libc::SIGSYS as u64;
    let only = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(|e| e.to_string());
    rules.insert(libc::SYS_rt_sigaction, vec![only(vec![eq(0, sigsys)?])?]);
    rules.insert(libc::SYS_kill, vec![only(vec![eq(0, u64::from(pid))?, eq(1, sigsys)?])?]);
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("building the device's seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("compiling the device's seccomp filter: {e}"))
}

/// Writes "passthru device: seccomp: forbidden system call N" with async-signal-safe
/// calls only, then ends the process with SIGSYS.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS from seccomp the kernel fills the _sigsys member: after the
    // common si_signo/si_errno/si_code ints (and padding to 8 bytes) come call_addr
    // (a pointer), then the system call number (an int).
    let nr = unsafe { *((info as *const u8).add(16 + std::mem::size_of::<usize>()) as *const libc::c_int) };
    let mut msg = *b"passthru device: seccomp: forbidden system call           \n";
    let mut n = nr.unsigned_abs();
    let mut at = msg.len() - 2;
    loop {
        msg[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 48 {
            break;
        }
        at -= 1;
    }
    // SAFETY: write(2) of a stack buffer to standard error, then restoring the default
    // action of SIGSYS and sending it to ourselves: all async-signal-safe, and exactly
    // the calls the filter lets through for this purpose.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), 48);
        libc::write(2, msg[at..].as_ptr().cast(), msg.len() - at);
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        libc::kill(libc::getpid(), libc::SIGSYS);
    }
}

/// Confines every thread of this process to [`ALLOWED`].
pub fn confine_device() -> Result<(), String> {
    // SAFETY: installs an SA_SIGINFO handler for SIGSYS with a zeroed, valid sigaction.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(format!("installing the SIGSYS reporter: {}", std::io::Error::last_os_error()));
        }
    }
    let prog = device_filter(std::process::id())?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| format!("applying the device's seccomp filter: {e}"))
}
