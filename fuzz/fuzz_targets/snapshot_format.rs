//! Fuzzes the snapshot format alone (no VM): a manifest parsed from arbitrary bytes,
//! and a data file of arbitrary bytes walked as records and read whole under a
//! manifest entry that says its size and checksum (so the record parser behind the
//! checksum is reached, and a wrong size or checksum is refused). Accepted or refused
//! with an error, never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use vmm::snapshot::format::{self, SectionFile};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = std::path::Path::new("/fuzz");
    if mode & 1 == 0 {
        let _ = format::parse_manifest(rest, dir);
        return;
    }
    let Ok(mut f) = tempfile() else { return };
    if f.write_all(rest).is_err() {
        return;
    }
    // A truthful entry most of the time; a lying one (size or checksum) otherwise.
    let crc = crc32c::crc32c(rest) ^ u32::from(mode & 4 != 0);
    let bytes = rest.len() as u64 + u64::from(mode & 8 != 0);
    let s = SectionFile { name: "ram".into(), file: "ram.bin".into(), bytes, crc32c: crc };
    let mut total = 0u64;
    let _ = format::walk_records(
        &f,
        &s,
        |addr, len| {
            total = total.saturating_add(len);
            if mode & 2 != 0 && addr > 1 << 40 { Err(vmm::Error::Snapshot("out of range".into())) } else { Ok(()) }
        },
        Some(&mut |_, _, _| Ok(())),
    );
    let _ = format::read_whole(&f, &s, 4096);
});

/// An anonymous file (memfd) for the data.
fn tempfile() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}
