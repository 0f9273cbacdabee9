//! `tce`: DMA through TCE tables (`--device dma-engine,dma=tce`, and a second engine in
//! another group for the sharing part). Queries and creates a 64-bit window, maps the
//! ring, completion records and buffers with H_PUT_TCE_INDIRECT, drives the engine
//! through the window (FILL, COPY, CRC32C, all checked), reads entries back with
//! H_GET_TCE, clears the destination with H_STUFF_TCE and checks DMA there faults; then
//! a second engine's group creates a window on the same table (one table, two groups)
//! and reads the same buffer through it.
//! With argument 1 it instead creates the largest window QUERY advertises and clears it
//! whole with H_STUFF_TCE, over and over, until the VM is stopped (a guest that tries to
//! stall the VMM: each clear costs what is mapped, 3 entries, not 2^45).
//! Exit: 0 ok, 1 wrong, 2 missing engine, 3 a call failed.
#![no_std]
#![no_main]

use rt::abi::dma_engine::{Descriptor, completion, op};
use rt::abi::layout;
use rt::abi::tce as t;
use rt::dma_engine::Engine;
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::mmio::{read64, write64};
use rt::{BootInfo, println};

const P: u64 = 4096;
const RING: u64 = layout::GUEST_FREE_RAM;
const DONE: u64 = RING + P;
const SRC: u64 = RING + 0x10_0000;
const DST: u64 = RING + 0x20_0000;
const LIST: u64 = RING + 0x30_0000;
const LEN: u64 = 16 * P;
/// Where each thing lands in the window (entries).
const E_RING: u64 = 0;
const E_DONE: u64 = 1;
const E_SRC: u64 = 16;
const E_DST: u64 = 32;

/// A TCE call: (PAPR code, result 1, result 2).
fn tce(nr: u64, a: [u64; 4]) -> (i64, u64, u64) {
    let r = hcall(nr, [a[0], a[1], a[2], a[3], 0]);
    (r.r[0] as i64, r.r[1], r.r[2])
}

fn map(liobn: u64, bus: u64, entry: u64, gpa: u64, pages: u64, perm: u64) -> bool {
    for i in 0..pages {
        // SAFETY: the list page is guest RAM owned by this program.
        unsafe { write64(LIST + 8 * i, (gpa + i * P) | perm) };
    }
    tce(t::PUT_TCE_INDIRECT, [liobn, bus + entry * P, LIST, pages]).0 == t::H_SUCCESS
}

fn run(e: &mut Engine, d: Descriptor) -> (u32, u64) {
    let seq = e.push(d);
    e.ring();
    e.wait(seq).map(|r| (r.0, r.2)).unwrap_or((0, 0))
}

/// Argument 1: clear the largest window whole, forever.
fn stuff_forever(group: u64) -> u8 {
    let (_, _, largest) = tce(t::QUERY_WINDOW, [group, 0, 0, 0]);
    let shift = 12 + u64::from(largest.trailing_zeros());
    let (code, liobn, bus) = tce(t::CREATE_WINDOW, [group, 12, shift, 0]);
    if code != t::H_SUCCESS {
        println!("tce: CREATE of the largest window (2^{} bytes) answered {}", Dec(shift), Dec(code as u64));
        return 3;
    }
    let mut rounds = 0u64;
    loop {
        for ioba in [bus, bus + (largest / 2) * P, bus + (largest - 1) * P] {
            if tce(t::PUT_TCE, [liobn, ioba, SRC | t::READ, 0]).0 != t::H_SUCCESS {
                return 3;
            }
        }
        if tce(t::STUFF_TCE, [liobn, bus, 0, largest]).0 != t::H_SUCCESS {
            return 3;
        }
        rounds += 1;
        if rounds == 1 {
            println!("tce: clearing a window of 2^{} entries, over and over", Dec(u64::from(largest.trailing_zeros())));
        }
    }
}

fn main(boot: &BootInfo) -> u8 {
    let Some(fa) = Engine::find(0) else {
        println!("tce: no DMA engine");
        return 2;
    };
    let (code, group, _default) = tce(t::DEVICE_GROUP, [u64::from(fa.bdf()), 0, 0, 0]);
    if code != t::H_SUCCESS {
        println!("tce: the engine is not on TCE (code {})", Dec(code as u64));
        return 3;
    }
    if boot.arg_count > 0 && boot.args[0] == 1 {
        return stuff_forever(group);
    }
    let (_, avail, _) = tce(t::QUERY_WINDOW, [group, 0, 0, 0]);
    let (code, liobn, bus) = tce(t::CREATE_WINDOW, [group, 12, 32, 0]);
    if avail != 1 || code != t::H_SUCCESS {
        println!("tce: QUERY said {} windows free, CREATE answered {}", Dec(avail), Dec(code as u64));
        return 3;
    }
    println!("tce: group {} window liobn {:#x} at bus offset {:#x}", Dec(group), liobn, bus);
    let rw = t::READ | t::WRITE;
    if !(map(liobn, bus, E_RING, RING, 1, t::READ)
        && map(liobn, bus, E_DONE, DONE, 1, t::WRITE)
        && map(liobn, bus, E_SRC, SRC, 16, rw)
        && map(liobn, bus, E_DST, DST, 16, t::WRITE))
    {
        println!("tce: H_PUT_TCE_INDIRECT failed");
        return 3;
    }
    let iova = |e: u64| bus + e * P;
    let Some(mut a) = Engine::new(fa, (RING, iova(E_RING)), (DONE, iova(E_DONE)), 16) else { return 1 };
    let pattern = 0x7463_6574_6365_7421u64;
    let (s1, _) = run(&mut a, Descriptor { op: op::FILL, dst: iova(E_SRC), len: LEN, pattern, ..Default::default() });
    let (s2, _) =
        run(&mut a, Descriptor { op: op::COPY, src: iova(E_SRC), dst: iova(E_DST), len: LEN, ..Default::default() });
    let (s3, crc) = run(&mut a, Descriptor { op: op::CRC32C, src: iova(E_SRC), len: LEN, ..Default::default() });
    // SAFETY: DST is guest RAM owned by this program.
    let seen = unsafe { read64(DST + LEN - 8) };
    if [s1, s2, s3] != [completion::SUCCESS; 3] || seen != pattern {
        println!(
            "tce: statuses {} {} {}, DST holds {:#x}",
            Dec(u64::from(s1)),
            Dec(u64::from(s2)),
            Dec(u64::from(s3)),
            seen
        );
        return 1;
    }
    let (_, entry, _) = tce(t::GET_TCE, [liobn, iova(E_DST + 3), 0, 0]);
    if entry != (DST + 3 * P) | t::WRITE {
        println!("tce: H_GET_TCE read {:#x}", entry);
        return 1;
    }
    // Cleared entries are gone for the device.
    if tce(t::STUFF_TCE, [liobn, iova(E_DST), 0, 16]).0 != t::H_SUCCESS {
        return 3;
    }
    let (s4, _) = run(&mut a, Descriptor { op: op::FILL, dst: iova(E_DST), len: P, pattern: 1, ..Default::default() });
    if s4 != completion::DMA_FAULT {
        println!("tce: DMA to a cleared entry completed with {}", Dec(u64::from(s4)));
        return 1;
    }
    println!("tce: 64 KiB filled, copied, CRC32C {:#x} through the window; cleared entries fault", crc);
    // One table, two groups: a second engine (its own group) shares the window's table.
    let Some(fb) = Engine::find(1) else {
        println!("tce: one engine only: the sharing part is skipped");
        return 0;
    };
    let (_, group_b, _) = tce(t::DEVICE_GROUP, [u64::from(fb.bdf()), 0, 0, 0]);
    let (code, _liobn_b, bus_b) = tce(t::CREATE_WINDOW, [group_b, 12, 32, liobn]);
    if code != t::H_SUCCESS || group_b == group {
        println!("tce: the alias window answered {} (groups {} and {})", Dec(code as u64), Dec(group), Dec(group_b));
        return 3;
    }
    let iova_b = |e: u64| bus_b + e * P;
    // The table maps the same pages for B: B takes over the ring and records A used.
    let Some(mut b) = Engine::new(fb, (RING, iova_b(E_RING)), (DONE, iova_b(E_DONE)), 16) else {
        return 1;
    };
    let (s5, crc_b) = run(&mut b, Descriptor { op: op::CRC32C, src: iova_b(E_SRC), len: LEN, ..Default::default() });
    if s5 != completion::SUCCESS || crc_b != crc {
        println!("tce: B through the shared table: status {}, CRC {:#x} vs {:#x}", Dec(u64::from(s5)), crc_b, crc);
        return 1;
    }
    println!("tce: group {} reads the same buffer through the shared table: CRC32C {:#x}", Dec(group_b), crc_b);
    0
}

rt::entry!(main);
