//! The hypercall helper (register convention in [`abi::hcall`]).

use abi::hcall::{Ret, Status};

/// Makes hypercall `nr` with arguments `a` and returns the VMM's answer.
/// A status the runtime does not know is reported as [`Status::Internal`].
#[inline]
pub fn hcall(nr: u64, a: [u64; 5]) -> Ret {
    let status: u64;
    let (r0, r1, r2): (u64, u64, u64);
    // SAFETY: the hypercall port is a PIO exit; the VMM reads and writes only the
    // registers named here. Guest memory named by arguments is the caller's business.
    unsafe {
        core::arch::asm!(
            "out {port}, eax",
            port = const abi::ports::HCALL,
            inout("rax") nr => status,
            inout("rdi") a[0] => r0,
            inout("rsi") a[1] => r1,
            inout("rdx") a[2] => r2,
            in("r10") a[3],
            in("r8") a[4],
            options(nostack),
        );
    }
    Ret { status: Status::from_raw(status).unwrap_or(Status::Internal), r: [r0, r1, r2] }
}

/// Hypercall with fewer arguments; the rest are zero.
#[inline]
pub fn hcall1(nr: u64, a0: u64) -> Ret {
    hcall(nr, [a0, 0, 0, 0, 0])
}
