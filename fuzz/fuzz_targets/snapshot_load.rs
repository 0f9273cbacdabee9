//! Fuzzes the snapshot loader: a directory built from arbitrary bytes (vm.json,
//! ram.bin, hotram.bin, devmem.bin, and usually a manifest whose sizes and checksums
//! match them, so the parsers behind the checksums are reached) is loaded and checked.
//! It must be accepted or refused with an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

/// The next length-prefixed piece (u16 little-endian length).
fn piece<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let n = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    let rest = data.get(2..).unwrap_or(&[]);
    let (p, r) = rest.split_at(n.min(rest.len()));
    *data = r;
    p
}

fn dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    base.join(format!("passthru-fuzz-snapshot-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let d = dir();
    let _ = std::fs::remove_dir_all(&d);
    if std::fs::create_dir_all(&d).is_err() {
        return;
    }
    let files = ["vm.json", "ram.bin", "hotram.bin", "devmem.bin"];
    let names = ["vm", "ram", "hotram", "devmem"];
    let mut sections = Vec::new();
    for (file, name) in files.iter().zip(names) {
        let bytes = piece(&mut rest);
        if std::fs::write(d.join(file), bytes).is_err() {
            return;
        }
        sections.push(serde_json::json!({
            "name": name, "file": file, "bytes": bytes.len(), "crc32c": crc32c::crc32c(bytes)
        }));
    }
    let manifest = if mode & 1 == 0 {
        serde_json::to_vec(&serde_json::json!({
            "format": vmm::snapshot::FORMAT, "version": vmm::snapshot::VERSION, "writer": "fuzz", "sections": sections
        }))
        .unwrap_or_default()
    } else {
        rest.to_vec()
    };
    if std::fs::write(d.join("manifest.json"), manifest).is_ok() {
        let _ = vmm::snapshot::Snapshot::load(&d);
    }
    let _ = std::fs::remove_dir_all(&d);
});
