//! The virtio-iommu's `bypass` across resets, as the spec's device requirements put it:
//! a device reset keeps what the driver wrote and forgets domains; a system reset
//! brings `bypass` back to its initial value. passthru has no VM-wide reset (a guest
//! reset ends the VM), so the system reset is checked here, on the device alone.
#![allow(clippy::unwrap_used, missing_docs)]

use dma::{Endpoint, LockedMemory, VmDma};
use iommu::frontend::{Context, Device};
use iommu::identity::Identity;
use iommu::viommu::device::Viommu;
use std::sync::Arc;
use vm_api::{HypercallRegistry, MemoryListener, MemoryMap, Region, RegionKind};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

fn bypass_config() -> u64 {
    1 << abi::viommu::feature::BYPASS_CONFIG | 1 << abi::viommu::feature::MAP_UNMAP | 1 << abi::virtio::F_VERSION_1
}

#[test]
fn bypass_survives_a_device_reset_and_a_system_reset_restores_it() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap());
    let vm = VmDma::new(Arc::clone(&mem), LockedMemory::new(64 * MIB));
    let map = Arc::new(MemoryMap::new());
    map.add_listener(Arc::clone(&vm) as Arc<dyn MemoryListener>).unwrap();
    let ctx =
        Context::standalone(Arc::clone(&vm), Arc::clone(&mem), Arc::clone(&map), Arc::new(HypercallRegistry::new()))
            .unwrap();
    let identity = Identity::new(&ctx);
    // Guest RAM in the memory map: what a bypassing endpoint reaches.
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `host` is the start of the 16 MiB guest memory `mem` maps, which the
    // test keeps alive (it is held by the region too).
    let r = unsafe { Region::from_raw(0, 16 * MIB, RegionKind::Ram, host, None, Some(Arc::clone(&mem) as _)) };
    map.add_region(r).unwrap();
    let dev = Viommu::new(Arc::clone(&vm), identity, true);
    let ep = Endpoint::new(&vm, "dev8");
    let device = Device { id: 8, name: "dev8".into(), endpoint: ep.clone(), fail: Arc::new(|_| {}), params: vec![] };
    dev.add_endpoint(&device);
    let bypass = |d: &Viommu| d.config()[abi::viommu::config::BYPASS as usize];
    let reaches_ram = |ep: &Endpoint| ep.domain().is_some_and(|d| d.lookup(dma::Iova(0x1000)).is_some());
    assert_eq!(bypass(&dev), 1, "bypass starts at 1 (boot bypass)");
    assert!(reaches_ram(&ep), "an unattached endpoint bypasses");
    // The driver turns bypass off: the endpoint reaches nothing.
    dev.set_features(bypass_config());
    dev.write_config(abi::viommu::config::BYPASS, &[0]);
    assert_eq!(bypass(&dev), 0);
    assert!(!reaches_ram(&ep));
    // A device reset leaves bypass as the driver wrote it.
    dev.reset();
    assert_eq!(bypass(&dev), 0, "a device reset keeps bypass");
    assert!(!reaches_ram(&ep));
    // A system reset restores the initial value, and unattached endpoints follow it.
    dev.system_reset();
    assert_eq!(bypass(&dev), 1, "a system reset restores bypass");
    assert!(reaches_ram(&ep), "bypassing again");
    // Without BYPASS_CONFIG the driver cannot write it.
    dev.set_features(1 << abi::viommu::feature::MAP_UNMAP | 1 << abi::virtio::F_VERSION_1);
    dev.write_config(abi::viommu::config::BYPASS, &[0]);
    assert_eq!(bypass(&dev), 1, "bypass is read-only without BYPASS_CONFIG");
}
