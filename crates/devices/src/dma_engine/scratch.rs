//! The engine's scratch memory (BAR 1): a sealed memfd mapped here, whose descriptor
//! the device offers for mmap, so the guest (and a peer device) reach it without an
//! exit, while the device's own trapped accesses go through this mapping.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Shared memory of a fixed size.
#[derive(Debug)]
pub struct Scratch {
    file: File,
    ptr: usize,
    len: usize,
}

// SAFETY: the mapping is plain shared memory addressed by a usize; every access copies
// bytes (the guest may write it at any time: no Rust reference into it ever exists).
unsafe impl Send for Scratch {}
// SAFETY: as above.
unsafe impl Sync for Scratch {}

impl Scratch {
    /// `len` bytes of zeroed memory in a memfd sealed against resizing.
    pub fn new(len: usize) -> std::io::Result<Scratch> {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is taken over at once.
        let fd =
            unsafe { libc::memfd_create(c"dma-engine-scratch".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our memfd; no memory is passed.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh shared mapping chosen by the kernel; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Scratch { file, ptr: p as usize, len })
    }

    /// The memfd (offered to the VMM for mmap).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads at `offset`; bytes outside read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(n) = self.fit(offset, data.len()) else { return };
        // SAFETY: [offset, offset + n) lies inside the mapping (fit), alive while self is.
        unsafe { std::ptr::copy_nonoverlapping((self.ptr + offset as usize) as *const u8, data.as_mut_ptr(), n) };
    }

    /// Writes at `offset`; bytes outside are dropped.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let Some(n) = self.fit(offset, data.len()) else { return };
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.ptr + offset as usize) as *mut u8, n) };
    }

    /// Zeroes the first `len` bytes.
    pub fn clear(&self, len: usize) {
        // SAFETY: at most the mapping's length.
        unsafe { std::ptr::write_bytes(self.ptr as *mut u8, 0, len.min(self.len)) };
    }

    fn fit(&self, offset: u64, len: usize) -> Option<usize> {
        let o = usize::try_from(offset).ok().filter(|o| *o < self.len)?;
        Some(len.min(self.len - o))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
