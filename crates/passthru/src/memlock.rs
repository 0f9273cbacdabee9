//! Locked memory that just works: when `--locked-memory` is not given, the limit the
//! configuration needs is computed (as libvirt does for VFIO guests) and
//! RLIMIT_MEMLOCK raised to it when the process may (its hard limit allows, or it has
//! CAP_SYS_RESOURCE, as root has). Otherwise nothing changes and the front-end that
//! needs the memory fails with today's message naming `--locked-memory`.

use crate::device::DeviceArg;

/// Room above guest RAM and tables. libvirt adds 1 GiB for VFIO guests because the
/// kernel pins the BARs mapped for peer-to-peer too; passthru never pins device
/// memory, so a small margin for rounding suffices.
pub const MARGIN: u64 = 2 << 20;

/// Bytes of locked memory a VM with `ram` bytes and these devices can need: all guest
/// RAM once any device (or a hot-plug through the API) may pin it (an identity domain
/// pins all of it at attach; paravirtual DMA and TCE pin what the guest maps, at most
/// all of it), TCE tables at 8 bytes per 4 KiB page of RAM per device (libvirt's
/// PPC64 formula), and a margin. Zero when no device can DMA.
pub fn needed(ram: u64, devices: &[DeviceArg], hotplug: bool) -> u64 {
    if devices.is_empty() && !hotplug {
        return 0;
    }
    let tce = devices.iter().filter(|d| d.frontend() == "tce").count() as u64;
    ram.saturating_add((ram / 512).saturating_mul(tce)).saturating_add(MARGIN)
}

/// Raises RLIMIT_MEMLOCK to `need` if it is lower and the process may: `Ok(Some(line))`
/// when it did, `Ok(None)` when nothing was needed, `Err(why)` when it may not.
pub fn raise_to(need: u64) -> Result<Option<String>, String> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if r.rlim_cur == libc::RLIM_INFINITY || r.rlim_cur >= need {
        return Ok(None);
    }
    let hard_ok = r.rlim_max == libc::RLIM_INFINITY || r.rlim_max >= need;
    let new = libc::rlimit { rlim_cur: need, rlim_max: if hard_ok { r.rlim_max } else { need } };
    // SAFETY: setrlimit reads the struct passed; raising the hard limit fails with
    // EPERM without CAP_SYS_RESOURCE, which leaves the limits as they were.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } != 0 {
        return Err(format!(
            "the locked-memory limit is {} KiB (hard limit {} KiB) and this process may not raise it to {} KiB \
             (it lacks CAP_SYS_RESOURCE)",
            r.rlim_cur >> 10,
            r.rlim_max >> 10,
            need >> 10
        ));
    }
    Ok(Some(format!(
        "passthru: raised the locked-memory limit (RLIMIT_MEMLOCK) from {} KiB to {} KiB for DMA (guest RAM, tables, margin); \
         --locked-memory SIZE sets it explicitly",
        r.rlim_cur >> 10,
        need >> 10
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::parse_device;

    #[test]
    fn the_need_follows_ram_devices_and_tables() {
        let ram = 256 << 20;
        assert_eq!(needed(ram, &[], false), 0);
        assert_eq!(needed(ram, &[], true), ram + MARGIN);
        let id = parse_device("dma-engine").unwrap();
        assert_eq!(needed(ram, &[id], false), ram + MARGIN);
        let t = [parse_device("dma-engine,dma=tce").unwrap(), parse_device("dma-engine,dma=tce").unwrap()];
        assert_eq!(needed(ram, &t, false), ram + 2 * (ram / 512) + MARGIN);
        assert_eq!(needed(u64::MAX, &t, false), u64::MAX);
    }

    /// In a child process (limits are per process): a soft limit below the hard one is
    /// raised without privilege; above the hard limit it needs CAP_SYS_RESOURCE.
    #[test]
    fn the_soft_limit_is_raised_up_to_the_hard_limit_and_beyond_only_with_the_capability() {
        let get = || {
            let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes into the struct passed.
            unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
            r
        };
        let hard = get().rlim_max;
        if hard == libc::RLIM_INFINITY || hard < 2 << 20 {
            eprintln!("skipped: the hard RLIMIT_MEMLOCK ({hard}) leaves no room for the test");
            return;
        }
        // SAFETY: fork in a test; the child only calls async-signal-safe functions
        // (setrlimit, getrlimit) and this crate's code that formats strings before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let low = libc::rlimit { rlim_cur: 1 << 20, rlim_max: hard };
            // SAFETY: as above.
            unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &low) };
            let raised = matches!(raise_to(2 << 20), Ok(Some(_))) && get().rlim_cur == 2 << 20;
            let nothing = matches!(raise_to(1 << 20), Ok(None));
            let above = raise_to(hard + (1 << 20));
            let above_ok = match above {
                Ok(Some(_)) => get().rlim_cur == hard + (1 << 20),
                Err(e) => e.contains("CAP_SYS_RESOURCE") && get().rlim_cur == 2 << 20,
                Ok(None) => false,
            };
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if raised && nothing && above_ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
    }
}
