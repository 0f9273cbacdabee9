//! The SIGBUS guard of shared mappings, in forked children: a file shrunk under a
//! mapping makes it read zeros and marks it broken, the interrupted code's errno
//! untouched; and when the repair itself fails, the process dies of SIGBUS instead of
//! faulting forever.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};
use vfio_user::mapping::FileMapping;

fn memfd(len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
    let fd = unsafe { libc::memfd_create(c"sigbus".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// Runs `child` in a forked process; how it ended within 10 s: Ok(exit code),
/// Err(signal), or None (still running: killed).
fn in_child(child: impl FnOnce() -> i32) -> Option<Result<i32, i32>> {
    // SAFETY: fork; the child runs `child` (system calls and volatile accesses, no
    // allocation) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let t = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polls our own child, writing into a live int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Err(libc::WTERMSIG(status))
            });
        }
        if t.elapsed() > Duration::from_secs(10) {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_repaired_fault_keeps_errno_and_a_failed_repair_kills_instead_of_spinning() {
    let f = memfd(8192);
    let m = FileMapping::new(&f, 8192, (0, 1), true, false).unwrap();
    let addr = m.addr(4096);
    f.set_len(0).unwrap(); // the peer shrinks the file under the mapping
    // Repaired: the read sees zeros, the mapping is broken, errno is what it was.
    let repaired = in_child(|| {
        // SAFETY: sets this thread's errno.
        unsafe { *libc::__errno_location() = libc::EDQUOT };
        // SAFETY: `addr` is inside the guarded mapping; the SIGBUS it raises is absorbed.
        let v = unsafe { std::ptr::read_volatile(addr as *const u64) };
        // SAFETY: reads this thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        i32::from(v != 0) | (i32::from(errno != libc::EDQUOT) << 1) | (i32::from(!m.is_broken()) << 2)
    });
    assert_eq!(repaired, Some(Ok(0)), "zeros read, errno kept, the mapping marked broken");
    // The repair's mmap refused (a filter answers mmap with ENOMEM): the process dies.
    let prog = seccompiler::SeccompFilter::new(
        [(libc::SYS_mmap, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOMEM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .unwrap();
    let prog: seccompiler::BpfProgram = prog.try_into().unwrap();
    let failed = in_child(move || {
        if seccompiler::apply_filter(&prog).is_err() {
            return 99;
        }
        // SAFETY: as above; this time the repair cannot map its zero pages.
        let _ = unsafe { std::ptr::read_volatile(addr as *const u64) };
        0
    });
    assert_eq!(failed, Some(Err(libc::SIGBUS)), "killed by the fault, not faulting forever");
}
