//! `viommu`: a DMA engine behind virtio-iommu, driven as Linux's driver does in strict
//! mode. Finds the device, negotiates, PROBEs the engine's endpoint (it must report
//! the x86 MSI doorbell as a RESV_MEM MSI region), attaches it to a domain, maps the
//! ring and completion records, then per transfer maps a source (read) and a
//! destination (write), copies, checks, unmaps both in one batch; a DMA through an
//! unmapped IOVA must fault, leave memory untouched and come back as a fault report
//! (reason MAPPING, the engine's endpoint, the IOVA). Then it moves the engine to a
//! second domain without a DETACH (as Linux does): the first domain's IOVAs fault,
//! the second's work. Arguments: mode (0 demo, 1 benchmark), transfers for the
//! benchmark (default 100). Exit: 0 ok, 1 wrong result, 3 device gone, 4 timeout.
#![no_std]
#![no_main]

use rt::abi::dma_engine::{Descriptor, completion, op};
use rt::abi::viommu::{self as v, fault, map, status};
use rt::abi::{hcall, layout};
use rt::dma_engine::{Engine, WaitError};
use rt::fmt::Dec;
use rt::hcall::hcall;
use rt::mmio::{read64, write64};
use rt::viommu::{Request, Viommu};
use rt::{BootInfo, println};

const RING: u64 = layout::GUEST_FREE_RAM;
const COMPLETIONS: u64 = RING + 0x1000;
const SRC: u64 = RING + 0x10_0000;
const DST: u64 = RING + 0x20_0000;
const DRIVER: u64 = RING + 0x40_0000;
/// Device addresses: the ring and records, then one IOVA per transfer buffer.
const RING_IOVA: u64 = 0x8000_0000;
const COMPLETIONS_IOVA: u64 = RING_IOVA + 0x1000;
const BUF_IOVA: u64 = 0x1_0000_0000;
const PAGE: u64 = 4096;
/// Polls of the event queue for a fault report (about a second here).
const FAULT_POLLS: u64 = 200_000;
const R: u32 = map::READ;
const W: u32 = map::WRITE;

fn peek(a: u64) -> u64 {
    // SAFETY: guest RAM owned by this program.
    unsafe { read64(a) }
}

fn poke(a: u64, x: u64) {
    // SAFETY: guest RAM owned by this program.
    unsafe { write64(a, x) }
}

struct Run {
    v: Viommu,
    e: Engine,
    ep: u32,
    domain: u32,
    next_iova: u64,
    transfers: u64,
    faults: u64,
}

impl Run {
    fn all_ok(&self, what: &str, s: &[Option<u8>]) -> Result<(), u8> {
        if let Some(bad) = s.iter().find(|s| **s != Some(status::OK)) {
            println!("viommu: {} failed: status {}", what, Dec(bad.map_or(0xff, u64::from)));
            return Err(1);
        }
        Ok(())
    }

    fn engine(&mut self, d: Descriptor) -> Result<u32, u8> {
        let seq = self.e.push(d);
        self.e.ring();
        match self.e.wait(seq) {
            Ok((s, _, _)) => Ok(s),
            Err(WaitError::DeviceGone) => {
                println!("viommu: the DMA engine is gone");
                Err(3)
            }
            Err(WaitError::Timeout) => {
                println!("viommu: timeout waiting for the DMA engine");
                Err(4)
            }
        }
    }

    /// One strict transfer of `len` bytes: map source and destination (one batch),
    /// copy, unmap both (one batch). Returns the destination's IOVA.
    fn transfer(&mut self, len: u64, pattern: u64) -> Result<u64, u8> {
        let (src, dst) = (self.next_iova, self.next_iova + len);
        self.next_iova += 2 * len;
        for o in (0..len).step_by(8) {
            poke(SRC + o, pattern);
        }
        poke(DST, 0);
        poke(DST + len - 8, 0);
        let d = self.domain;
        let s = self.v.batch(&[
            Request::Map { domain: d, iova: src, gpa: SRC, size: len, flags: R },
            Request::Map { domain: d, iova: dst, gpa: DST, size: len, flags: W },
        ]);
        self.all_ok("MAP", &s[..2])?;
        let st = self.engine(Descriptor { op: op::COPY, src, dst, len, ..Default::default() })?;
        if st != completion::SUCCESS || peek(DST) != pattern || peek(DST + len - 8) != pattern {
            println!(
                "viommu: a {} byte copy through domain {} failed (status {})",
                Dec(len),
                Dec(d.into()),
                Dec(st.into())
            );
            return Err(1);
        }
        let s = self.v.batch(&[
            Request::Unmap { domain: d, iova: src, size: len },
            Request::Unmap { domain: d, iova: dst, size: len },
        ]);
        self.all_ok("UNMAP", &s[..2])?;
        self.transfers += 1;
        Ok(dst)
    }

    /// A FILL of `iova` must fault and leave DST as it was; its report, if the VMM saw
    /// the access (a device in the VMM, or a device process's access the VMM checked),
    /// must say what happened. A device process refuses by itself an IOVA it was never
    /// given (vfio-user allows DMA_READ/DMA_WRITE only of exported ranges): no report.
    fn must_fault(&mut self, iova: u64, why: &str) -> Result<(), u8> {
        poke(DST, 0x5555);
        let st = self.engine(Descriptor { op: op::FILL, dst: iova, len: PAGE, pattern: 0x99, ..Default::default() })?;
        if st != completion::DMA_FAULT || peek(DST) != 0x5555 {
            println!("viommu: DMA to {:#x} ({}) was not refused", iova, why);
            return Err(1);
        }
        let Some(f) = self.v.wait_fault(FAULT_POLLS) else {
            println!("viommu: DMA to {:#x} ({}) faulted, memory untouched, not reported", iova, why);
            return Ok(());
        };
        let want = (fault::R_MAPPING, fault::F_WRITE | fault::F_ADDRESS, self.ep, iova);
        if (f.reason, f.flags, f.endpoint, f.address) != want {
            println!(
                "viommu: fault report reason {} flags {:#x} endpoint {:#x} address {:#x}; wanted reason 2 for {:#x} at {:#x}",
                Dec(f.reason.into()),
                f.flags,
                f.endpoint,
                f.address,
                self.ep,
                iova
            );
            return Err(1);
        }
        self.faults += 1;
        println!("viommu: DMA to {:#x} ({}) faulted, memory untouched, reported", iova, why);
        Ok(())
    }

    /// Attaches to `domain` (no DETACH first) and maps the ring and records there.
    fn enter(&mut self, domain: u32) -> Result<(), u8> {
        let s = self.v.batch(&[
            Request::Attach { domain, endpoint: self.ep, bypass: false },
            Request::Map { domain, iova: RING_IOVA, gpa: RING, size: PAGE, flags: R },
            Request::Map { domain, iova: COMPLETIONS_IOVA, gpa: COMPLETIONS, size: PAGE, flags: W },
        ]);
        self.all_ok("ATTACH and the ring's MAPs", &s[..3])?;
        self.domain = domain;
        Ok(())
    }
}

fn start() -> Result<Run, u8> {
    let Some(f) = Engine::find(0) else {
        println!("viommu: no DMA engine on the PCI bus");
        return Err(1);
    };
    let v = Viommu::init(DRIVER).map_err(|e| {
        println!("viommu: the virtio-iommu did not start: {:?}", e);
        1
    })?;
    println!(
        "viommu: features {:#x}, page sizes {:#x}, domains {}..{}, probe_size {}",
        v.features,
        v.page_size_mask,
        Dec(v.domain_range.0.into()),
        Dec(v.domain_range.1.into()),
        Dec(v.probe_size.into())
    );
    let ep = u32::from(f.bdf());
    let mut v = v;
    match v.probe(ep) {
        (Some(status::OK), Some(msi)) if msi == v::MSI_REGION => {
            println!("viommu: endpoint {:#x}: MSI doorbell {:#x}..{:#x} reserved", ep, msi.0, msi.1)
        }
        (st, msi) => {
            let (a, b) = msi.unwrap_or((0, 0));
            println!(
                "viommu: PROBE of {:#x}: status {}, MSI region {:#x}..{:#x} (wanted OK and the MSI doorbell)",
                ep,
                Dec(st.map_or(0xff, u64::from)),
                a,
                b
            );
            return Err(1);
        }
    }
    // Like Linux: the first domain id is kept for the identity domain.
    let first = v.domain_range.0 + 1;
    // The ring's device addresses are fixed; the engine starts once they are mapped.
    let s = v.batch(&[
        Request::Attach { domain: first, endpoint: ep, bypass: false },
        Request::Map { domain: first, iova: RING_IOVA, gpa: RING, size: PAGE, flags: R },
        Request::Map { domain: first, iova: COMPLETIONS_IOVA, gpa: COMPLETIONS, size: PAGE, flags: W },
    ]);
    let Some(e) = Engine::new(f, (RING, RING_IOVA), (COMPLETIONS, COMPLETIONS_IOVA), 64) else {
        println!("viommu: the DMA engine's registers do not decode");
        return Err(1);
    };
    let r = Run { v, e, ep, domain: first, next_iova: BUF_IOVA, transfers: 0, faults: 0 };
    r.all_ok("ATTACH and the ring's MAPs", &s[..3])?;
    Ok(r)
}

fn demo() -> Result<(), u8> {
    let mut r = start()?;
    let mut last = 0;
    for (i, len) in [PAGE, 4 * PAGE, 16 * PAGE].iter().enumerate() {
        last = r.transfer(*len, 0x0101_0101_0101_0101 * (i as u64 + 1))?;
    }
    println!("viommu: {} strict transfers in domain {} (map, copy, unmap)", Dec(r.transfers), Dec(r.domain.into()));
    r.must_fault(last, "unmapped")?;
    // A read-only mapping refuses the engine's write.
    let ro = r.next_iova;
    let s = r.v.one(Request::Map { domain: r.domain, iova: ro, gpa: DST, size: PAGE, flags: R });
    r.all_ok("MAP read-only", &[s])?;
    r.must_fault(ro, "read-only")?;
    // Move without DETACH: the first domain ceases to exist; its read-only page too.
    let (a, b) = (r.domain, r.domain + 1);
    r.enter(b)?;
    let s = r.v.one(Request::Map { domain: a, iova: ro, gpa: DST, size: PAGE, flags: W });
    if s != Some(status::NOENT) {
        println!(
            "viommu: domain {} should be gone once emptied (MAP: status {})",
            Dec(a.into()),
            Dec(s.map_or(0xff, u64::from))
        );
        return Err(1);
    }
    r.transfer(PAGE, 0x4242_4242_4242_4242)?;
    r.must_fault(ro, "mapped only in the old domain")?;
    println!("viommu: moved from domain {} to {} without DETACH, transfers go on", Dec(a.into()), Dec(b.into()));
    let s = r.v.one(Request::Detach { domain: b, endpoint: r.ep });
    r.all_ok("DETACH", &[s])?;
    println!(
        "viommu: {} transfers, {} faults reported by the VMM, {} requests in {} notifications",
        Dec(r.transfers),
        Dec(r.faults),
        Dec(r.v.requests),
        Dec(r.v.kicks)
    );
    Ok(())
}

/// `n` strict 4 KiB transfers between marks (the benchmark's measured section).
fn bench(n: u64) -> Result<(), u8> {
    let mut r = start()?;
    hcall(hcall::BENCH_MARK, [0xc0, n, 0, 0, 0]);
    for i in 0..n {
        r.next_iova = BUF_IOVA;
        r.transfer(PAGE, i)?;
    }
    hcall(hcall::BENCH_MARK, [0xc1, r.v.requests, r.v.kicks, 0, 0]);
    println!("viommu bench: {} strict 4 KiB transfers done", Dec(n));
    Ok(())
}

fn main(boot: &BootInfo) -> u8 {
    let r = match boot.arg(0, 0) {
        1 => bench(boot.arg(1, 100)),
        _ => demo(),
    };
    match r {
        Ok(()) => 0,
        Err(c) => c,
    }
}

rt::entry!(main);
