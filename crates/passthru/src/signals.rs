//! SIGINT, SIGTERM and SIGHUP for `passthru run` and `passthru ctl`.
//!
//! A VMM stops in order on the first one: the vCPU leaves its loop (parked first if it
//! was), every device is detached (interrupts, DMA windows, its process reaped), a
//! request under way (a snapshot being written) finishes, and the API socket file is
//! removed; one line says so and the exit status is 128 + the signal's number (130,
//! 143, 129), as a shell reports it. A second signal stops at once (the API socket
//! file removed first; a snapshot being written is abandoned, the previous one whole).
//!
//! How: the three signals are blocked in the main thread before any other starts (so
//! every thread inherits the block) and a `signals` thread takes them with `sigwait`.
//! Device processes passthru spawns get an empty mask from `Command`, and ignore
//! SIGINT and SIGHUP themselves (their VMM ends them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals handled.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The first signal received (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in SIGNALS {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// The signal's name as a shell prints it.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Blocks the three signals in this thread: every thread it starts from now on has
/// them blocked too, so only the thread of [`watch`] receives them. Call before
/// anything starts a thread.
pub fn block() {
    let s = set();
    // SAFETY: pthread_sigmask with a valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
}

/// The signal that asked this process to stop, if one did.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

/// Starts the `signals` thread: the first signal calls `stop(128 + N)` (an orderly
/// stop, after one line on standard error saying `what`, if not empty); the second
/// removes `files` (the socket
/// files the process made) and exits at once with 128 + N.
pub fn watch(what: &'static str, files: Vec<PathBuf>, stop: impl Fn(u8) + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let s = set();
            loop {
                let mut sig = 0;
                // SAFETY: sigwait with a valid set and a live int for the answer.
                if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                    continue;
                }
                let status = 128 + sig;
                if RECEIVED.compare_exchange(0, sig, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    if !what.is_empty() {
                        eprintln!("passthru: {}: {what} (again to stop at once)", name(sig));
                    }
                    stop(u8::try_from(status).unwrap_or(u8::MAX));
                } else {
                    for p in &files {
                        let _ = std::fs::remove_file(p);
                    }
                    eprintln!("passthru: {} again: stopping at once", name(sig));
                    std::process::exit(status);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

/// For a device process passthru spawned: SIGINT and SIGHUP (a terminal's Ctrl-C or
/// hang-up, sent to the whole process group) are ignored; the VMM ends the device when
/// it stops (its connection closes).
pub fn ignore_terminal_signals() {
    for sig in [libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sets a signal's disposition to SIG_IGN; no handler code runs.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}
