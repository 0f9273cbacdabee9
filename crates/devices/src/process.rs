//! Device processes passthru spawned: held by a pidfd, so the VMM can kill one and know
//! it is gone (reaped) before it goes on, with no risk of signalling a recycled pid.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

/// A spawned device process.
#[derive(Debug)]
pub struct DeviceProcess {
    pid: u32,
    pidfd: OwnedFd,
    child: Mutex<Option<Child>>,
    status: Mutex<Option<std::process::ExitStatus>>,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(pid, flags) takes two integers and returns a new descriptor
    // or -1; nothing else is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).unwrap_or(-1), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor (close-on-exec by the kernel's default for pidfds).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl DeviceProcess {
    /// Takes over `child`, which nobody has waited for (so its pid still names it).
    pub fn new(child: Child) -> io::Result<DeviceProcess> {
        let pid = child.id();
        let pidfd = pidfd_open(pid)?;
        Ok(DeviceProcess { pid, pidfd, child: Mutex::new(Some(child)), status: Mutex::new(None) })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True once it has exited (reaped or not).
    pub fn has_exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits at most `timeout` for it to exit.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; a pidfd polls readable once the process exited.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        r > 0
    }

    fn reap_now(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            match c.wait() {
                Ok(s) => *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
                Err(e) => tracing::warn!("device process {}: waiting for it: {e}", self.pid),
            }
        }
    }

    /// Kills it (SIGKILL through the pidfd) and reaps it: when this returns the process
    /// no longer exists, unless it is stuck in the kernel beyond `timeout` (logged).
    pub fn kill_and_reap(&self, timeout: Duration) {
        if self.child.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return; // reaped already
        }
        // SAFETY: pidfd_send_signal(pidfd, sig, info = NULL, flags = 0).
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!("device process {}: SIGKILL: {e}", self.pid);
            }
        }
        if self.wait_exit(timeout) {
            self.reap_now();
        } else {
            tracing::error!("device process {} did not die within {timeout:?} of SIGKILL", self.pid);
        }
    }

    /// Lets it exit by itself (its connection is closed) for at most `grace`, then kills
    /// it; reaps it either way.
    pub fn reap(&self, grace: Duration) {
        if self.wait_exit(grace) {
            self.reap_now();
        } else {
            tracing::warn!(
                "device process {} still running {grace:?} after its connection closed; killing it",
                self.pid
            );
            self.kill_and_reap(grace);
        }
    }

    /// Its exit status, once reaped.
    pub fn status(&self) -> Option<std::process::ExitStatus> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        // Never leave a device process (it may hold guest memory) or a zombie behind.
        self.kill_and_reap(Duration::from_secs(5));
    }
}
