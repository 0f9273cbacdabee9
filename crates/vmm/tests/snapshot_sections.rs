//! Every component's saved state round-trips through its section: typed state ->
//! versioned section -> the JSON a snapshot holds -> section -> the same typed state;
//! and a section of another version is refused, naming the component. (The vCPU's and
//! the irqchip's states, made of KVM structures, are checked in their modules.)
#![allow(clippy::unwrap_used, missing_docs)]

use devices::test_irq_state::{IntxSourceState, MsiSourceState, RunState, TestSourcesState};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vm_api::Section;

/// `state` through a section of version `v` and the snapshot's JSON, and back.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(id: &str, v: u32, state: &T) {
    let s = Section::new(id, v, state).unwrap();
    let text = serde_json::to_string(&s).unwrap();
    let back: Section = serde_json::from_str(&text).unwrap();
    assert_eq!(&back.read::<T>(id, v).unwrap(), state, "{id}");
    let e = back.read::<T>(id, v + 1).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{id}: state of format version {v}")), "{e}");
}

fn run_state() -> impl Strategy<Value = RunState> {
    (any::<[u64; 5]>(), any::<[bool; 3]>(), option::of(any::<u64>())).prop_map(|(n, b, guest_counted)| RunState {
        count: n[0],
        toggles: n[1],
        fired: n[2],
        toggled: n[3],
        resamples: n[4],
        in_flight: b[0],
        done: b[1],
        timed_out: b[2],
        guest_counted,
    })
}

fn test_sources() -> impl Strategy<Value = TestSourcesState> {
    let msi = (any::<u8>(), any::<u8>(), option::of(run_state()))
        .prop_map(|(vector, abort_vector, run)| MsiSourceState { vector, abort_vector, run });
    let intx = (any::<u32>(), any::<u8>(), any::<bool>(), option::of(run_state()))
        .prop_map(|(gsi, abort_vector, asserted, run)| IntxSourceState { gsi, abort_vector, asserted, run });
    (option::of(msi), option::of(intx)).prop_map(|(msi, intx)| TestSourcesState { msi, intx })
}

fn pvdma() -> impl Strategy<Value = iommu::pvdma::SavedState> {
    let mapping = (any::<[u64; 3]>(), any::<[bool; 2]>()).prop_map(|(n, rw)| iommu::pvdma::SavedMapping {
        iova: n[0],
        gpa: n[1],
        size: n[2],
        read: rw[0],
        write: rw[1],
    });
    let counters = (any::<[u64; 5]>(), any::<u64>(), any::<[u64; 10]>(), any::<(u64, u64)>())
        .prop_map(|(calls, unknown, statuses, pages)| iommu::pvdma::StatsSnapshot { calls, unknown, statuses, pages });
    let device = (any::<u64>(), counters, vec(mapping, 0..6))
        .prop_map(|(id, counters, mappings)| iommu::pvdma::SavedDevice { id, counters, mappings });
    vec(device, 0..4).prop_map(|devices| iommu::pvdma::SavedState { devices })
}

fn tce() -> impl Strategy<Value = iommu::tce::SavedState> {
    let window =
        (any::<u32>(), any::<u64>(), any::<(u32, u32)>(), vec(any::<u32>(), 0..3), vec(any::<(u64, u64)>(), 0..8))
            .prop_map(|(liobn, bus_offset, (page_shift, window_shift), shared_with, entries)| {
                iommu::tce::SavedWindow { liobn, bus_offset, page_shift, window_shift, shared_with, entries }
            });
    let group = (any::<u32>(), vec(any::<u16>(), 0..3), any::<u32>(), vec(window, 0..3)).prop_map(
        |(group, devices, default_liobn, windows)| iommu::tce::SavedGroup { group, devices, default_liobn, windows },
    );
    vec(group, 0..3).prop_map(|groups| iommu::tce::SavedState { groups })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_components_state_round_trips_through_its_section(
        config in vec(any::<u8>(), 0x40..0x140),
        msix in option::of((0u8..6, any::<u64>(), vec(any::<u8>(), 0..64))),
        device in vec(any::<u8>(), 0..256),
        noncoherent in any::<bool>(),
        hot_ram in vec(any::<(u64, u64)>(), 0..6),
        sources in vec(("[a-z0-9-]{1,8}", any::<u32>(), any::<u32>(), prop_oneof![Just("forwarded"), Just("vmm")]), 0..8),
        test in test_sources(),
        pv in pvdma(),
        t in tce(),
    ) {
        let d = vmm::device_state::DeviceState { config, msix, device, noncoherent };
        round_trip("device/dma0", vmm::device_state::STATE_VERSION, &d);
        round_trip("memory", vmm::snapshot::memory::STATE_VERSION, &vmm::snapshot::memory::MemoryState { hot_ram });
        let sources = sources.into_iter().map(|(n, i, s, m)| (n, i, s, m.to_string())).collect();
        round_trip("irqs", irq::STATE_VERSION, &irq::SavedModes { sources });
        round_trip("test-sources", devices::test_irq_state::STATE_VERSION, &test);
        round_trip("frontend/pvdma", iommu::pvdma::STATE_VERSION, &pv);
        round_trip("frontend/tce", iommu::tce::STATE_VERSION, &t);
    }
}
