//! `bench viommu`: the VMM's work per virtio-iommu MAP and UNMAP request (one per kick,
//! and kicks of 256), a device's translate through a virtio-iommu domain, and
//! strict-mode DMA (map, copy, unmap per I/O, as Linux's driver does it) as a ratio of
//! the same copies with identity DMA, with the device in the VMM and in its own process.

use super::engine::*;
use super::*;
use crate::device::DeviceArg;
use iommu::viommu::client::Client;
use iommu::viommu::wire::Request;
use vmm::IommuMode;

/// Where the in-process driver keeps its queues and requests.
const DRIVER_AT: u64 = 0x300_0000;
/// The domain the benchmark's endpoint sits in.
const DOMAIN: u32 = 1;
/// IOVAs the benchmark maps from (above 4 GiB, as a 64-bit driver's allocator gives).
const IOVA_BASE: u64 = 0x1_0000_0000;
/// Requests per kick in the batched figures.
const KICK: u64 = 256;
/// I/O sizes of the strict-mode figures.
const SIZES: [u64; 4] = [4 << 10, 16 << 10, 64 << 10, 256 << 10];
const PAGE: u64 = 4096;
/// Guest pages the MAP/UNMAP figures map (128 MiB from 64 MiB).
const PAGES: u64 = 0x400_0000;

#[derive(Serialize, Debug, Default)]
struct ViommuReport {
    requests: u64,
    ios: u64,
    /// VMM work of one MAP of 4 KiB, one request per kick (the device's own clock).
    map_ns: f64,
    unmap_ns: f64,
    /// Per request in kicks of 256.
    map_ns_kick256: f64,
    unmap_ns_kick256: f64,
    /// The same with the device in its own process.
    map_ns_device_process: f64,
    unmap_ns_device_process: f64,
    map_ns_kick256_device_process: f64,
    unmap_ns_kick256_device_process: f64,
    /// Device translate, IOTLB hit.
    translate_viommu_ns: f64,
    translate_pvdma_ns: f64,
    strict: Vec<StrictFigure>,
}

#[derive(Serialize, Debug, Default)]
struct StrictFigure {
    mode: &'static str,
    bytes: u64,
    identity_ns_per_io: f64,
    strict_ns_per_io: f64,
}

/// Device modes of the strict-mode figures: label, in the VMM.
const MODES: [(&str, bool); 2] = [("device in the VMM", true), ("device process", false)];

pub(super) fn viommu_bench(
    requests: u64,
    ios: u64,
    runs: u32,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let requests = requests.max(KICK);
    let ios = ios.max(1);
    let title = format!("passthru bench viommu: {requests} requests per figure, {ios} strict I/Os per size");
    let (_, spreads) = repeat(&title, runs, json, || measure(requests, ios), figures)?;
    if let Some(path) = plot {
        let series = |mode: &str| crate::plot::Series {
            name: format!("strict, {mode}"),
            points: SIZES
                .iter()
                .filter_map(|b| spread::median_of(&spreads, &strict_name(mode, *b)).map(|r| (*b as f64 / 1024.0, r)))
                .collect(),
        };
        plot_to(
            &path,
            &crate::plot::Chart {
                title: "virtio-iommu strict mode: map, copy, unmap per I/O, x identity DMA",
                x: "I/O size (KiB)",
                y: "throughput x identity DMA (median of the runs)",
                log_x: true,
            },
            &MODES.map(|(m, _)| series(m)),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn strict_name(mode: &str, bytes: u64) -> String {
    format!("strict {} KiB I/O x identity, {mode}", bytes >> 10)
}

fn figures(r: &ViommuReport) -> Vec<Fig> {
    let mut v = vec![
        Fig::new("VMM work of MAP 4 KiB, one per kick", "ns", r.map_ns).goal(Goal::AtMost(300.0)),
        Fig::new("VMM work of UNMAP 4 KiB, one per kick", "ns", r.unmap_ns).goal(Goal::AtMost(300.0)),
        Fig::new("VMM work of MAP 4 KiB, kicks of 256, per request", "ns", r.map_ns_kick256).goal(Goal::AtMost(300.0)),
        Fig::new("VMM work of UNMAP 4 KiB, kicks of 256, per request", "ns", r.unmap_ns_kick256)
            .goal(Goal::AtMost(300.0)),
        Fig::new("VMM work of MAP, device process, one per kick", "ns", r.map_ns_device_process),
        Fig::new("VMM work of UNMAP, device process, one per kick", "ns", r.unmap_ns_device_process),
        Fig::new("VMM work of MAP, device process, kicks of 256, per request", "ns", r.map_ns_kick256_device_process),
        Fig::new(
            "VMM work of UNMAP, device process, kicks of 256, per request",
            "ns",
            r.unmap_ns_kick256_device_process,
        ),
        Fig::new("device translate hit through a virtio-iommu domain", "ns", r.translate_viommu_ns),
        Fig::new("device translate hit through a pvdma domain", "ns", r.translate_pvdma_ns),
    ];
    for s in &r.strict {
        v.push(Fig::new(strict_name(s.mode, s.bytes), "ratio", s.identity_ns_per_io / s.strict_ns_per_io));
    }
    for s in &r.strict {
        v.push(Fig::new(format!("strict {} KiB I/O, {}", s.bytes >> 10, s.mode), "ns", s.strict_ns_per_io));
    }
    v
}

/// A qtest VM (no vCPU) with one DMA engine, behind `frontend`, bus mastering on.
fn engine_vm(frontend: &str, inline: bool) -> Result<Vm, String> {
    let mut config = VmConfig::new(AccelKind::Qtest);
    config.memory = 256 << 20;
    config.locked_memory = Some(1 << 30);
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    crate::device::attach(&vm, &DeviceArg::engine(IommuMode::SharedFd, inline, frontend))?;
    enable_engine(&vm)?;
    Ok(vm)
}

/// The VM's virtio-iommu driver, its endpoint attached to [`DOMAIN`] with the engine's
/// ring and completion records mapped for good (IOVA = guest-physical).
fn driver(vm: &Vm) -> Result<Client<&Vm>, String> {
    let mem = std::sync::Arc::clone(vm.ram().memory_arc());
    let mut c = Client::start(vm, mem, DRIVER_AT, Client::<&Vm>::linux_features())?;
    let endpoint = vm.devices().first().map(|d| u32::from(d.bdf())).ok_or("no device")?;
    let setup = [
        Request::Attach { domain: DOMAIN, endpoint, flags: 0, reserved: false },
        map(RING, RING, 2 * 0x1_0000, abi::viommu::map::READ | abi::viommu::map::WRITE),
    ];
    expect_ok(&c.send(&setup)?)?;
    Ok(c)
}

fn map(iova: u64, gpa: u64, size: u64, flags: u32) -> Request {
    Request::Map { domain: DOMAIN, virt_start: iova, virt_end: iova + size - 1, phys_start: gpa, flags }
}

fn unmap(iova: u64, size: u64) -> Request {
    Request::Unmap { domain: DOMAIN, virt_start: iova, virt_end: iova + size - 1, reserved: false }
}

fn expect_ok(replies: &[iommu::viommu::client::Reply]) -> Result<(), String> {
    match replies.iter().find(|r| r.status != Some(abi::viommu::status::OK)) {
        None => Ok(()),
        Some(r) => Err(format!("a virtio-iommu request failed: status {:?}", r.status)),
    }
}

/// A total of the virtio-iommu's statistics.
fn total(vm: &Vm, key: &str) -> u64 {
    let Some(fe) = vm.frontends().get(iommu::viommu::REGISTRATION.name) else { return 0 };
    match fe.stats().get(key) {
        Some(iommu::StatValue::Total(n)) => *n,
        _ => 0,
    }
}

/// The device's own time per request of `kind` (map, unmap) while `f` runs.
fn vmm_ns(vm: &Vm, kind: &str, f: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let (n0, t0) = (total(vm, kind), total(vm, &format!("{kind}_ns")));
    f()?;
    let (n, t) = (total(vm, kind) - n0, total(vm, &format!("{kind}_ns")) - t0);
    if n == 0 {
        return Err(format!("no {kind} request reached the device"));
    }
    Ok(t as f64 / n as f64)
}

/// MAPs then UNMAPs `n` 4 KiB pages, `per_kick` requests per notification; the
/// device's time per MAP and per UNMAP.
fn map_unmap(vm: &Vm, c: &mut Client<&Vm>, n: u64, per_kick: u64) -> Result<(f64, f64), String> {
    let rw = abi::viommu::map::READ | abi::viommu::map::WRITE;
    // Distinct pages (as `bench pvdma` maps them): each MAP pins a page of its own.
    let maps: Vec<Request> = (0..n).map(|i| map(IOVA_BASE + i * PAGE, PAGES + (i % 32768) * PAGE, PAGE, rw)).collect();
    let unmaps: Vec<Request> = (0..n).map(|i| unmap(IOVA_BASE + i * PAGE, PAGE)).collect();
    let per = per_kick as usize;
    let m = vmm_ns(vm, "map", || maps.chunks(per).try_for_each(|k| expect_ok(&c.send(k)?)))?;
    let u = vmm_ns(vm, "unmap", || unmaps.chunks(per).try_for_each(|k| expect_ok(&c.send(k)?)))?;
    Ok((m, u))
}

/// A host-side driver of one VM's DMA engine doing synchronous COPYs (each waited
/// for); with a virtio-iommu driver, each buffer is mapped before its I/O and unmapped
/// after it, one request per kick, as Linux's driver does in strict mode.
struct Copier<'v> {
    vm: &'v Vm,
    bar0: u64,
    client: Option<Client<&'v Vm>>,
    done: u64,
}

impl<'v> Copier<'v> {
    fn new(vm: &'v Vm, client: Option<Client<&'v Vm>>) -> Result<Copier<'v>, String> {
        use abi::dma_engine::{self as de, regs};
        let bar0 = enable_engine(vm)?;
        let w32 = |off: u64, v: u32| vm.mmio_write(bar0 + off, &v.to_le_bytes());
        w32(regs::CONTROL, de::control::RESET);
        vm.mmio_write(bar0 + regs::RING_BASE, &RING.to_le_bytes());
        w32(regs::RING_SIZE, RING_SIZE as u32);
        w32(regs::CONTROL, de::control::ENABLE);
        Ok(Copier { vm, bar0, client, done: 0 })
    }

    /// One COPY of `size` bytes, SRC to DST; its time.
    fn copy(&mut self, size: u64) -> Result<std::time::Duration, String> {
        use abi::dma_engine::{self as de, Descriptor, op, regs};
        use abi::viommu::map::{READ, WRITE};
        use vm_memory_bytes::write_bytes;
        let t = Instant::now();
        let slot = self.done % RING_SIZE;
        // A fresh IOVA per I/O, as an allocator hands out (the IOTLB misses each time).
        let (src, dst) = match self.client {
            Some(_) => {
                let at = IOVA_BASE + (self.done % 64) * 2 * size;
                (at, at + size)
            }
            None => (SRC, DST),
        };
        if let Some(c) = self.client.as_mut() {
            expect_ok(&c.send(&[map(src, SRC, size, READ)])?)?;
            expect_ok(&c.send(&[map(dst, DST, size, WRITE)])?)?;
        }
        let completion = COMPLETIONS + slot * de::COMPLETION_SIZE;
        let d = Descriptor { op: op::COPY, src, dst, len: size, completion, ..Default::default() };
        write_bytes(self.vm, RING + slot * de::DESCRIPTOR_SIZE, &d.to_bytes())?;
        write_bytes(self.vm, completion, &[0; 4])?;
        self.done += 1;
        self.vm.mmio_write(self.bar0 + regs::TAIL, &(self.done as u32).to_le_bytes());
        if wait_completion(self.vm, completion)? != de::completion::SUCCESS {
            return Err(format!("a COPY of {size} bytes failed"));
        }
        if let Some(c) = self.client.as_mut() {
            expect_ok(&c.send(&[unmap(src, size)])?)?;
            expect_ok(&c.send(&[unmap(dst, size)])?)?;
        }
        Ok(t.elapsed())
    }
}

/// `ios` I/Os of `size` with identity DMA and in strict mode, alternated one by one
/// (both see the same moments of a noisy machine); ns per I/O of each.
fn strict_and_identity(
    id: &mut Copier<'_>,
    strict: &mut Copier<'_>,
    size: u64,
    ios: u64,
) -> Result<(f64, f64), String> {
    for _ in 0..ios.min(16) {
        id.copy(size)?; // warm up
        strict.copy(size)?;
    }
    let (mut a, mut b) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for _ in 0..ios {
        a += id.copy(size)?;
        b += strict.copy(size)?;
    }
    Ok((a.as_nanos() as f64 / ios as f64, b.as_nanos() as f64 / ios as f64))
}

fn measure(requests: u64, ios: u64) -> Result<ViommuReport, String> {
    let mut r = ViommuReport { requests, ios, ..Default::default() };
    for (label, inline) in MODES {
        let vm = engine_vm(iommu::viommu::REGISTRATION.name, inline)?;
        let mut c = driver(&vm)?;
        map_unmap(&vm, &mut c, KICK, KICK)?; // warm up: pins, tree nodes, the device's buffers
        let single = if inline { requests } else { requests.min(1000) };
        let one = map_unmap(&vm, &mut c, single, 1)?;
        let kicks = map_unmap(&vm, &mut c, requests, KICK)?;
        if inline {
            (r.map_ns, r.unmap_ns) = one;
            (r.map_ns_kick256, r.unmap_ns_kick256) = kicks;
            // Translate: the endpoint's space through its domain, and a pvdma-style domain.
            let rw = abi::viommu::map::READ | abi::viommu::map::WRITE;
            expect_ok(&c.send(&[map(IOVA_BASE, SRC, PAGE, rw)])?)?;
            let ep = vm.devices().first().map(|d| d.endpoint().clone()).ok_or("no device")?;
            r.translate_viommu_ns = translate_hit(&dma::DmaSpace::of(&ep), IOVA_BASE + 0x10);
            expect_ok(&c.send(&[unmap(IOVA_BASE, PAGE)])?)?;
            let pv = vm.dma().create_domain("bench-pvdma", dma::DomainConfig::default());
            pv.map(dma::Iova(IOVA_BASE), dma::Gpa(SRC), PAGE, dma::Perm::READ_WRITE).map_err(|e| e.to_string())?;
            r.translate_pvdma_ns = translate_hit(&dma::DmaSpace::new(pv, "bench"), IOVA_BASE + 0x10);
        } else {
            (r.map_ns_device_process, r.unmap_ns_device_process) = one;
            (r.map_ns_kick256_device_process, r.unmap_ns_kick256_device_process) = kicks;
        }
        let identity = engine_vm(iommu::identity::REGISTRATION.name, inline)?;
        let mut id = Copier::new(&identity, None)?;
        let mut strict = Copier::new(&vm, Some(c))?;
        for bytes in SIZES {
            let (identity_ns_per_io, strict_ns_per_io) = strict_and_identity(&mut id, &mut strict, bytes, ios)?;
            r.strict.push(StrictFigure { mode: label, bytes, identity_ns_per_io, strict_ns_per_io });
        }
    }
    Ok(r)
}
