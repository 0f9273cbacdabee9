//! Guest memory as a snapshot component (`memory`): its section lists the RAM
//! hot-added since boot; the bytes themselves, only the pages ever touched (the
//! memfds' data extents), are streamed to `ram.bin` (by memfd offset) and
//! `hotram.bin` (by guest-physical address) in 4 MiB pieces, and read back the same
//! way, every byte checksummed as it goes.

use super::format::{CHUNK, Checked, DATA_MAGIC, Out, SectionFile, walk_records};
use crate::error::{Error, Result};
use crate::vm::Vm;
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::path::Path;
use vm_api::{ComponentError, Section, Snapshottable};

fn err(what: impl Into<String>) -> Error {
    Error::Snapshot(what.into())
}

/// The format version of [`MemoryState`].
pub const STATE_VERSION: u32 = 1;

/// What the `memory` section holds.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryState {
    /// RAM hot-added since boot: (guest-physical start, size); contents in hotram.bin.
    pub hot_ram: Vec<(u64, u64)>,
}

impl MemoryState {
    /// Hot-added regions of positive size that neither wrap nor overlap.
    pub fn check(&self) -> Result<()> {
        let mut hot = self.hot_ram.clone();
        hot.sort_unstable();
        if hot.iter().any(|(g, s)| *s == 0 || g.checked_add(*s).is_none()) {
            return Err(err("a malformed hot-added RAM region"));
        }
        if hot.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(err("hot-added RAM regions overlap"));
        }
        Ok(())
    }

    /// True if `[gpa, gpa + len)` lies in one hot-added region.
    fn covers(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| self.hot_ram.iter().any(|&(g, s)| gpa >= g && end <= g.saturating_add(s)))
    }
}

/// The guest memory of `vm` as a component: saved, the hot-added regions; restored,
/// those regions added again (their bytes come with [`apply`]).
pub struct MemoryComponent<'a>(pub &'a Vm);

impl MemoryComponent<'_> {
    /// The regions added since boot.
    fn hot_ram(&self) -> Vec<(u64, u64)> {
        let vm = self.0;
        let boot = vm.ram().regions();
        vm.memory_map()
            .regions()
            .into_iter()
            .filter(|r| r.kind == vm_api::RegionKind::Ram && !boot.iter().any(|b| b.gpa == r.gpa))
            .map(|r| (r.gpa, r.size))
            .collect()
    }
}

impl Snapshottable for MemoryComponent<'_> {
    fn id(&self) -> String {
        "memory".into()
    }

    fn save(&self) -> std::result::Result<Option<Section>, ComponentError> {
        Section::new(&self.id(), STATE_VERSION, &MemoryState { hot_ram: self.hot_ram() }).map(Some)
    }

    fn restore(&self, section: &Section) -> std::result::Result<(), ComponentError> {
        let m: MemoryState = section.read(&self.id(), STATE_VERSION)?;
        for &(gpa, size) in &m.hot_ram {
            self.0.add_ram(gpa, size).map_err(|e| ComponentError::new("memory", e.to_string()))?;
        }
        Ok(())
    }
}

/// The data extents (pages ever touched) of `[start, end)` of a memfd: (offset, length).
fn extents(memfd: &std::fs::File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = memfd.as_raw_fd();
    let mut out = Vec::new();
    let mut at = i64::try_from(start).unwrap_or(i64::MAX);
    let end = i64::try_from(end).unwrap_or(i64::MAX);
    while at < end {
        // SAFETY: lseek on a descriptor this VM owns; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        at = hole;
    }
    out
}

/// Streams the touched pages of guest RAM into `ram.bin` and `hotram.bin` in `tmp`
/// through `buf`; returns both files and the bytes of RAM written.
pub fn write(vm: &Vm, tmp: &Path, buf: &mut [u8]) -> Result<(SectionFile, SectionFile, u64)> {
    use std::os::unix::fs::FileExt;
    let mut bytes = 0u64;
    let mut put_extent = |out: &mut Out, file: &std::fs::File, addr: u64, off: u64, len: u64| -> Result<()> {
        out.put(&addr.to_le_bytes())?;
        out.put(&len.to_le_bytes())?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off + done).map_err(|e| err(format!("reading guest RAM: {e}")))?;
            out.put(&buf[..n])?;
            done += n as u64;
        }
        bytes += len;
        Ok(())
    };
    let mut ram = Out::create(&tmp.join("ram.bin"))?;
    ram.put(DATA_MAGIC)?;
    let memfd = vm.ram().memfd();
    for (off, len) in extents(memfd, 0, vm.ram().size()) {
        put_extent(&mut ram, memfd, off, off, len)?;
    }
    let mut hot = Out::create(&tmp.join("hotram.bin"))?;
    hot.put(DATA_MAGIC)?;
    for (gpa, size) in MemoryComponent(vm).hot_ram() {
        let (file, base, _) =
            vm.dma().backing_of(gpa).ok_or_else(|| err(format!("hot-added RAM at {gpa:#x} has no file")))?;
        for (off, len) in extents(&file, base, base + size) {
            put_extent(&mut hot, &file, gpa + (off - base), off, len)?;
        }
    }
    Ok((ram.finish("ram", "ram.bin")?, hot.finish("hotram", "hotram.bin")?, bytes))
}

/// Checks `ram.bin` (every record inside `size` bytes of boot RAM) and `hotram.bin`
/// (every record inside a hot-added region of `m`), checksummed whole.
pub fn check(
    ram: (&SectionFile, &std::fs::File),
    hot: Option<(&SectionFile, &std::fs::File)>,
    size: u64,
    m: &MemoryState,
) -> Result<()> {
    walk_records(
        ram.1,
        ram.0,
        |off, len| {
            if off.checked_add(len).is_none_or(|e| e > size) {
                return Err(err(format!("ram.bin: a record at {off:#x}+{len:#x} lies outside {size:#x} bytes of RAM")));
            }
            Ok(())
        },
        None,
    )?;
    match hot {
        Some((hs, hf)) => walk_records(
            hf,
            hs,
            |gpa, len| {
                if !m.covers(gpa, len) {
                    return Err(err(format!("hotram.bin: a record at {gpa:#x}+{len:#x} lies in no hot-added region")));
                }
                Ok(())
            },
            None,
        ),
        None if !m.hot_ram.is_empty() => Err(err("the snapshot lists hot-added RAM but has no hotram section")),
        None => Ok(()),
    }
}

/// Writes the saved RAM into `vm`'s memfd (the VM has the snapshot's RAM size), and
/// hot-added RAM into the regions the memory component added again; every byte
/// checksummed as it goes. Returns the bytes written.
pub fn apply(
    vm: &Vm,
    ram: (&SectionFile, &std::fs::File),
    hot: Option<(&SectionFile, &std::fs::File)>,
    m: &MemoryState,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let size = vm.ram().size();
    let memfd = vm.ram().memfd();
    let mut total = 0;
    walk_records(
        ram.1,
        ram.0,
        |off, len| {
            total += len;
            // Checked at load; checked again: the bytes come from the file as it is now.
            if off.checked_add(len).is_none_or(|e| e > size) {
                return Err(err("ram.bin: a record outside RAM"));
            }
            Ok(())
        },
        Some(&mut |off, at, b| memfd.write_all_at(b, off + at).map_err(|e| err(format!("guest RAM: {e}")))),
    )?;
    if let Some((hs, hf)) = hot {
        walk_records(
            hf,
            hs,
            |gpa, len| {
                total += len;
                if !m.covers(gpa, len) {
                    return Err(err("hotram.bin: a record outside hot-added RAM"));
                }
                Ok(())
            },
            Some(&mut |gpa, at, b| vm.write_memory_for_host(gpa + at, b)),
        )?;
    }
    Ok(total)
}

/// A `devmem.bin` checksummed whole (its magic first).
pub fn check_devmem(ds: &SectionFile, df: &std::fs::File) -> Result<()> {
    let mut r = Checked::new(df, ds);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| err("devmem.bin: too short"))?;
    if &magic != DATA_MAGIC {
        return Err(err("devmem.bin: bad magic"));
    }
    r.pass(r.left(), None)?;
    r.finish()
}

/// Bytes moved at a time (the buffer a save streams through).
pub fn buffer() -> Vec<u8> {
    vec![0u8; CHUNK]
}
