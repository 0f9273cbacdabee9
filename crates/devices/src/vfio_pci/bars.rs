//! The host-memory parts of an assigned function's BARs: regions the device offers for
//! mmap (its file and sparse areas) become RAM-device memory of the guest (KVM memory
//! slots: accesses never exit), except the MSI-X table and pending bits, which the VMM
//! traps even inside a mappable BAR.
//!
//! A file is mapped only if it is sealed against shrinking (`F_SEAL_SHRINK`): the guest
//! (through KVM) and the VMM access it directly, and a file shrunk under them would
//! fault in the VMM. An unsealed file's BAR is trapped instead (a warning says so).

use super::backend::VfioDevice;
use pci::msix::MsixCap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vfio_user::mapping::FileMapping;
use vm_api::{Backing, Region, RegionKind};

/// Host page size: memory slots need page-aligned areas.
const PAGE: u64 = 4096;

/// The mapped parts of one BAR: (offset in the BAR, memory).
#[derive(Clone, Debug, Default)]
pub struct BarMemory {
    /// Areas, by offset.
    pub areas: Vec<(u64, Region)>,
}

/// Removes `[cut_start, cut_end)` from the areas (page-rounded outwards).
fn cut(areas: Vec<(u64, u64)>, cut_start: u64, cut_end: u64) -> Vec<(u64, u64)> {
    let (s, e) = (cut_start / PAGE * PAGE, cut_end.div_ceil(PAGE) * PAGE);
    let mut out = Vec::new();
    for (o, len) in areas {
        let end = o + len;
        if end <= s || o >= e {
            out.push((o, len));
            continue;
        }
        if o < s {
            out.push((o, s - o));
        }
        if end > e {
            out.push((e, end - e));
        }
    }
    out
}

fn sealed_size(fd: &std::fs::File) -> Option<u64> {
    // SAFETY: fstat and F_GET_SEALS write only into our zeroed struct / return a value.
    let (st, seals) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return None;
        }
        (st, libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS))
    };
    (seals > 0 && seals & libc::F_SEAL_SHRINK != 0).then(|| u64::try_from(st.st_size).unwrap_or(0))
}

/// Maps what the device offers of BAR `bar` (region `bar`), minus the MSI-X table and
/// PBA. Never fails: whatever cannot be mapped is trapped (and said so once).
pub fn map_bar(dev: &dyn VfioDevice, name: &str, bar: u8, msix: Option<&MsixCap>) -> BarMemory {
    let Some(region) = dev.region(u32::from(bar)) else { return BarMemory::default() };
    let Some(m) = dev.region_mmap(u32::from(bar)) else { return BarMemory::default() };
    let Some(file_size) = sealed_size(&m.fd) else {
        tracing::warn!("{name}: BAR {bar} is offered for mmap in a file not sealed against shrinking; trapping it");
        return BarMemory::default();
    };
    let mut areas = m.areas.clone().unwrap_or_else(|| vec![(0, region.size)]);
    areas.retain(|&(o, len)| o.checked_add(len).is_some_and(|e| e <= region.size) && len > 0);
    if let Some(c) = msix {
        for (b, off, len) in [(c.table.0, c.table.1, c.table_size()), (c.pba.0, c.pba.1, c.pba_size())] {
            if b == bar {
                areas = cut(areas, off, off + len);
            }
        }
    }
    areas.retain(|&(o, len)| {
        let ok = o.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && (region.offset + o).is_multiple_of(PAGE);
        if !ok {
            tracing::warn!("{name}: BAR {bar} area {o:#x}+{len:#x} is not page-aligned; trapping it");
        }
        ok
    });
    let need = areas.iter().map(|&(o, len)| region.offset + o + len).max().unwrap_or(0);
    if areas.is_empty() || need > file_size {
        if need > file_size {
            tracing::warn!("{name}: BAR {bar}'s file is smaller than the region it backs; trapping it");
        }
        return BarMemory::default();
    }
    let writable = region.flags & vfio_user::proto::DMA_WRITE_FLAG != 0;
    let Ok(len) = usize::try_from(file_size) else { return BarMemory::default() };
    let mapping = match FileMapping::new(m.fd.as_ref(), len, (0, 0), writable, true) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            tracing::warn!("{name}: mapping BAR {bar}: {e}; trapping it");
            return BarMemory::default();
        }
    };
    let mut out = BarMemory::default();
    for (o, len) in areas {
        let host = mapping.addr(region.offset + o) as *mut u8;
        let backing = Some(Backing { fd: Arc::clone(&m.fd), offset: region.offset + o });
        let keep: Arc<dyn std::any::Any + Send + Sync> = mapping.clone();
        let kind = RegionKind::RamDevice { device: name.to_string() };
        // SAFETY: `host` points `region.offset + o` bytes into `mapping`, which covers the
        // whole file (at least `need` bytes, checked above), is kept alive by the region
        // (its keepalive), and cannot shrink under it (the file is sealed).
        out.areas.push((o, unsafe { Region::from_raw(0, len, kind, host, backing, Some(keep)) }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msix_pages_are_cut_out_of_a_mappable_bar() {
        assert_eq!(cut(vec![(0, 0x10000)], 0xe000, 0xe020), vec![(0, 0xe000), (0xf000, 0x1000)]);
        assert_eq!(cut(vec![(0, 0x10000)], 0, 0x10), vec![(0x1000, 0xf000)]);
        assert_eq!(cut(vec![(0, 0x2000), (0x4000, 0x1000)], 0x4000, 0x4008), vec![(0, 0x2000)]);
    }
}
