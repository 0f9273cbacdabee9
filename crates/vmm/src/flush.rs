//! Flushing CPU caches over guest memory a non-coherent device may have written, before
//! the VMM reads it through its own write-back mapping (snapshot, migration, dumps), and
//! after the VMM writes it (restore), as the kernel's `clflush_cache_range` does: a full
//! fence, one CLFLUSHOPT (or CLFLUSH where the CPU has no CLFLUSHOPT) per cache line,
//! a full fence. CLWB is not enough here: it may keep the line, and a line the device
//! wrote around must be evicted before the CPU reads it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The flush instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// CLFLUSHOPT (CPUID.(EAX=7,ECX=0):EBX[23]): unordered, fenced around.
    ClflushOpt,
    /// CLFLUSH (CPUID.01H:EDX[19]).
    Clflush,
}

/// What this CPU offers: the best method, and the cache line size (CPUID.01H:EBX[15:8]
/// x 8). None without CLFLUSH (not an x86-64 host).
pub fn cpu() -> Option<(Method, usize)> {
    static CPU: OnceLock<Option<(Method, usize)>> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid_count;
            let leaf1 = __cpuid_count(1, 0);
            if leaf1.edx & (1 << 19) == 0 {
                return None;
            }
            let line = (((leaf1.ebx >> 8) & 0xff) as usize * 8).max(32);
            let leaf7 = __cpuid_count(7, 0);
            let method = if leaf7.ebx & (1 << 23) != 0 { Method::ClflushOpt } else { Method::Clflush };
            Some((method, line))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// Bytes flushed so far by this process (every flushed range counted whole).
static FLUSHED: AtomicU64 = AtomicU64::new(0);

/// Bytes flushed so far.
pub fn flushed_bytes() -> u64 {
    FLUSHED.load(Ordering::Relaxed)
}

/// Flushes `[host, host + len)` with `method` (the CPU's best when None). Returns
/// false if the CPU cannot flush (nothing is done).
///
/// # Safety
/// `host` must be valid for reads of `len` bytes (a mapping the caller keeps alive).
pub unsafe fn flush_range(host: *const u8, len: usize, method: Option<Method>) -> bool {
    let Some((best, line)) = cpu() else { return false };
    let method = method.unwrap_or(best);
    if len == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let start = (host as usize) & !(line - 1);
        let end = host as usize + len;
        // SAFETY: MFENCE has no memory operands.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
        let mut p = start;
        while p < end {
            // SAFETY: `p` lies in the cache lines covering `[host, host + len)`, valid
            // for reads (the caller's contract); the flush writes back and evicts the
            // line, it changes no memory contents.
            unsafe {
                match method {
                    Method::ClflushOpt => {
                        core::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                    }
                    Method::Clflush => core::arch::asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags)),
                }
            }
            p += line;
        }
        // SAFETY: as above.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
        FLUSHED.fetch_add(len as u64, Ordering::Relaxed);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (host, line, method);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushing_counts_the_bytes_and_keeps_the_contents() {
        let Some((_, line)) = cpu() else { return };
        assert!(line.is_power_of_two() && line >= 32);
        let buf: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let before = flushed_bytes();
        for m in [Method::Clflush, Method::ClflushOpt] {
            if m == Method::ClflushOpt && cpu().map(|c| c.0) != Some(Method::ClflushOpt) {
                continue;
            }
            // SAFETY: `buf` is alive and 8 KiB long; 100 bytes from offset 3 are inside.
            assert!(unsafe { flush_range(buf.as_ptr().add(3), 100, Some(m)) });
        }
        assert!(flushed_bytes() >= before + 100);
        assert!(buf.iter().enumerate().all(|(i, b)| *b == i as u8), "a flush changes no contents");
    }
}
