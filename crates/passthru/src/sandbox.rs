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
    // Threads (the engine's worker, the connection's writer) and their waits; clone
    // only with the flags of a new thread (below), clone3 answered ENOSYS.
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
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

/// The clone flags of a new thread (glibc's pthread_create): the only clone allowed.
/// A new process, a new namespace or a vfork would need other flags.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// The prctl options a device process uses: naming its threads.
const PRCTL_OPTIONS: [i32; 2] = [libc::PR_SET_NAME, libc::PR_GET_NAME];

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(|e| e.to_string())
}

fn eq64(arg: u8, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value).map_err(|e| e.to_string())
}

fn compile(filter: SeccompFilter) -> Result<BpfProgram, String> {
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("compiling the device's seccomp filter: {e}"))
}

/// The filters for process `pid`, to be installed together: the calls above are
/// allowed, clone only to make a thread, prctl only for thread names, plus what the
/// SIGSYS reporter needs to end the process (restoring SIGSYS's default action,
/// sending SIGSYS to itself); anything else traps. The other filter (installed first)
/// answers clone3 with ENOSYS (its flags sit in memory a filter cannot read; glibc then
/// uses clone), which the main one lets through: of two filters the stricter answer
/// wins.
pub fn device_filters(pid: u32) -> Result<[BpfProgram; 2], String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, vec![])).collect();
    let sigsys = libc::SIGSYS as u64;
    let only = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(|e| e.to_string());
    rules.insert(libc::SYS_rt_sigaction, vec![only(vec![eq(0, sigsys)?])?]);
    rules.insert(libc::SYS_kill, vec![only(vec![eq(0, u64::from(pid))?, eq(1, sigsys)?])?]);
    rules.insert(libc::SYS_clone, vec![only(vec![eq64(0, THREAD_CLONE_FLAGS)?])?]);
    rules.insert(libc::SYS_clone3, vec![]);
    let prctl = PRCTL_OPTIONS.iter().map(|o| only(vec![eq(0, *o as u64)?])).collect::<Result<_, String>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    let main = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("building the device's seccomp filter: {e}"))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| format!("building the device's seccomp filter: {e}"))?;
    // The clone3 filter first: once the main one is in, installing another is a
    // forbidden call.
    Ok([compile(clone3)?, compile(main)?])
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
    for prog in device_filters(std::process::id())? {
        seccompiler::apply_filter_all_threads(&prog)
            .map_err(|e| format!("applying the device's seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `call` in a forked child confined by the device filters (no SIGSYS
    /// reporter: a trapped call kills the child with SIGSYS); returns how it ended:
    /// Ok(exit code) or Err(signal).
    fn confined(call: fn() -> i32) -> Result<i32, i32> {
        let progs = device_filters(0).unwrap();
        // SAFETY: fork; the child only installs the prebuilt filters, makes one raw
        // system call and exits with _exit, all without allocating.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            for p in &progs {
                if seccompiler::apply_filter(p).is_err() {
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(99) };
                }
            }
            let code = call();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a live int.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) { Ok(libc::WEXITSTATUS(status)) } else { Err(libc::WTERMSIG(status)) }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn a_device_makes_threads_names_them_and_nothing_else() {
        // A new process (fork's flags) is a forbidden call.
        // SAFETY: a raw clone with fork's flags; the filter stops it before the kernel runs it.
        let fork = || unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) as i32 };
        assert_eq!(confined(fork), Err(libc::SIGSYS));
        // clone3 answers ENOSYS (glibc falls back to clone with thread flags).
        let clone3 = || {
            let args = [0u64; 11];
            // SAFETY: clone3 given a zeroed clone_args of its size; the filter answers it.
            let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) };
            i32::from(!(r == -1 && errno() == libc::ENOSYS))
        };
        assert_eq!(confined(clone3), Ok(0));
        // prctl: thread names only.
        // SAFETY: prctl with plain integer arguments.
        let dumpable = || unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        assert_eq!(confined(dumpable), Err(libc::SIGSYS));
        let name = || {
            // SAFETY: PR_SET_NAME with a NUL-terminated string that outlives the call.
            let r = unsafe { libc::prctl(libc::PR_SET_NAME, c"device".as_ptr(), 0, 0, 0) };
            i32::from(r != 0)
        };
        assert_eq!(confined(name), Ok(0));
    }
}
