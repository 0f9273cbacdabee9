//! Shared mappings of a peer's file that survive the file shrinking under them.
//!
//! A device process maps the files the VMM sends with DMA_MAP. If the sender later
//! shrinks such a file (or sent one smaller than it claimed), touching the lost pages
//! raises SIGBUS, which would kill the device. passthru's own VMM seals its guest-RAM
//! memfd against shrinking (`F_SEAL_SHRINK`), so this cannot happen with it; any other
//! client's file is guarded instead: every mapping is registered here, and a SIGBUS
//! inside a registered mapping replaces the whole mapping with anonymous zero pages
//! and marks it broken. The interrupted copy then completes harmlessly, and its caller
//! sees [`FileMapping::is_broken`] and reports a DMA fault: the device lives on and
//! every later access to that file faults. A SIGBUS anywhere else goes to the handler
//! that was installed before (Rust's stack-overflow reporter, or the default action).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Mappings that can be guarded at once (distinct files a device maps).
pub const MAX_GUARDED: usize = 256;

struct Slot {
    /// Start address; 0 while the slot is free. Written last on claim, first on release.
    start: AtomicUsize,
    len: AtomicUsize,
    claimed: AtomicBool,
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    claimed: AtomicBool::new(false),
    broken: AtomicBool::new(false),
};
static SLOTS: [Slot; MAX_GUARDED] = [FREE; MAX_GUARDED];
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// SIGBUS handler. Async-signal-safe: it takes no lock and allocates nothing; it does
/// lock-free atomic loads and stores on static slots, reads `PREVIOUS` (set before the
/// handler is installed: a plain atomic load), and makes two system calls, `mmap` and
/// `sigaction` (raw kernel calls in glibc, no user-space state). It keeps `errno` as
/// the interrupted code left it. If the repair itself fails, SIGBUS's default action is
/// restored, so the re-executed access kills the process (a device that dies is
/// handled by the VMM) instead of faulting forever.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno; reading it is async-signal-safe.
    let saved = unsafe { *libc::__errno_location() };
    handle_sigbus(sig, info, ctx);
    // SAFETY: as above; restores what the interrupted code had.
    unsafe { *libc::__errno_location() = saved };
}

/// Restores SIGBUS's default action: the faulting access, run again, kills.
fn default_sigbus() {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

fn handle_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS {
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            // SAFETY: [start, start + len) is a mapping this module made and still owns
            // (the slot is released before it is unmapped); replacing it with private
            // anonymous memory of the same size keeps every pointer into it valid.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            slot.broken.store(true, Ordering::Release);
            if p == libc::MAP_FAILED {
                default_sigbus();
            }
            return;
        }
    }
    // Not ours: whoever handled SIGBUS before us decides.
    match PREVIOUS.get() {
        Some(prev) if prev.sa_flags & libc::SA_SIGINFO != 0 && prev.sa_sigaction > libc::SIG_IGN => {
            // SAFETY: an SA_SIGINFO handler has exactly this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(prev) if prev.sa_sigaction > libc::SIG_IGN => {
            // SAFETY: a plain handler takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig);
        }
        // Default action: restore it; returning re-raises the fault, which kills.
        _ => default_sigbus(),
    }
}

/// Installs the SIGBUS handler (once). Mappings install it themselves; a sandboxed
/// process installs it before its filter forbids `rt_sigaction`.
pub fn install_sigbus_guard() -> io::Result<()> {
    static INSTALLED: OnceLock<io::Result<()>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction with a zero-initialised struct naming our SA_SIGINFO handler;
        // the previous action is saved first so the handler can chain to it.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return Err(io::Error::last_os_error());
            }
            let _ = PREVIOUS.set(old);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// A shared mapping of a whole file, guarded against the file shrinking.
#[derive(Debug)]
pub struct FileMapping {
    ptr: usize,
    len: usize,
    writable: bool,
    slot: usize,
    /// Identity of the file (device, inode): one mapping per file.
    pub id: (u64, u64),
    /// The file carried `F_SEAL_SHRINK`: it cannot shrink at all.
    pub sealed: bool,
}

impl FileMapping {
    /// Maps the first `len` bytes of `file` shared (writable if the descriptor allows).
    pub fn new(file: &impl AsRawFd, len: usize, id: (u64, u64), writable: bool, sealed: bool) -> io::Result<Self> {
        install_sigbus_guard()?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let slot = (0..MAX_GUARDED)
            .find(|&i| SLOTS[i].claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping chosen by the kernel of a descriptor we hold;
        // the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            SLOTS[slot].claimed.store(false, Ordering::Release);
            return Err(e);
        }
        let s = &SLOTS[slot];
        s.broken.store(false, Ordering::Relaxed);
        s.len.store(len, Ordering::Release);
        s.start.store(p as usize, Ordering::Release);
        Ok(FileMapping { ptr: p as usize, len, writable, slot, id, sealed })
    }

    /// Host address of byte `offset`.
    pub fn addr(&self, offset: u64) -> usize {
        self.ptr + offset as usize
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a mapping of no bytes (never: construction refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if the mapping may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// True once the file shrank under the mapping (a SIGBUS was absorbed): nothing
    /// read from it since can be trusted and writes to it are lost.
    pub fn is_broken(&self) -> bool {
        SLOTS[self.slot].broken.load(Ordering::Acquire)
    }

    /// Mappings guarded now (for leak checks).
    pub fn guarded() -> usize {
        SLOTS.iter().filter(|s| s.claimed.load(Ordering::Acquire)).count()
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.start.store(0, Ordering::Release);
        // SAFETY: exactly the mapping made in `new` (or its anonymous replacement of the
        // same range), unmapped once; nobody accesses it any more (its owners are gone).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        s.claimed.store(false, Ordering::Release);
    }
}

// SAFETY: the mapping is plain shared memory addressed by a usize; accesses are made by
// the owners under their own locking (the DMA window table).
unsafe impl Send for FileMapping {}
// SAFETY: as above.
unsafe impl Sync for FileMapping {}
